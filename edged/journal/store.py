"""The durable job journal: one SQLite file in WAL mode, one writer thread.

Why this shape: the asyncio loop must never wait on an fsync, so every write is handed to a single
thread that owns the write connection and gets back a ``concurrent.futures.Future`` that completes
only once the row is committed (``await asyncio.wrap_future(...)`` on the loop). The writer commits
whatever has queued up in one transaction (group commit), so a burst of jobs pays for one fsync, not
one each; each write runs in its own savepoint so one refused write does not undo its neighbours.
Reads open their own short read-only connection: WAL lets them run beside the writer.

Failure policy: a file that is not a database, or fails ``PRAGMA integrity_check``, is moved aside
(``<name>.corrupt-<timestamp>``, loudly) and a fresh journal started, because a daemon that cannot
start helps nobody and the bad file is kept for a post-mortem. A journal that cannot be written
fails the write's future with ``JournalUnavailable`` (HTTP 503, ``storage_unavailable``) and rolls
that transaction back; what was committed before stays committed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import structlog

from edged.journal.records import (
    AcceptResult,
    InvalidTransition,
    JobRecord,
    JournalEntry,
    JournalUnavailable,
    RecordState,
)
from edged.journal.schema import COLUMNS, SCHEMA_VERSION, connect, dumps, get_record, record_of

__all__ = ["SCHEMA_VERSION", "InvalidTransition", "Journal", "JournalUnavailable", "Sync"]

log = structlog.get_logger(__name__)

T = TypeVar("T")
Sync = Literal["full", "normal"]

_MAX_BATCH = 256
"""Writes committed together at most: bounds how long one commit holds the write lock."""
_PRUNE_EVERY = 256
"""New jobs between automatic prunes, so the file stays bounded even if nobody calls prune()."""


@dataclass
class _Write:
    fn: Callable[[sqlite3.Connection], Any]
    future: Future[Any]
    what: str


_STOP = object()


class Journal:
    """The job journal. Open with ``Journal.open``; writes return futures, reads are synchronous
    (a short SQLite query: call them from a thread, e.g. ``asyncio.to_thread``, on the loop)."""

    def __init__(
        self, path: Path, *, sync: Sync, keep_s: float, max_rows: int, max_bytes: int | None = None
    ) -> None:
        self.path = path
        self.sync = sync
        self.keep_s = keep_s
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._queue: queue.SimpleQueue[_Write | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._since_prune = 0
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="edged-journal", daemon=True)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        sync: Sync = "full",
        keep_s: float = 86400.0,
        max_rows: int = 10000,
        max_bytes: int | None = None,
    ) -> Journal:
        """Open (or create) the journal at ``path`` and start its writer thread.

        ``sync="full"`` fsyncs every commit, so a committed job survives a power cut; ``"normal"``
        survives a crash of the process but may lose the last commits on power loss (cheaper on SD
        cards). ``keep_s`` is the dedup window: how long an acknowledged answer is kept;
        ``max_rows`` bounds the file (only acknowledged rows are ever pruned); ``max_bytes`` bounds
        the rows' pages on disk (over it, the oldest acknowledged rows go first, then new jobs are
        refused with ``JournalUnavailable``). Blocks until the
        file is open and checked; raises ``JournalUnavailable`` if it cannot be.
        """
        if sync not in ("full", "normal"):
            raise ValueError(f"journal sync must be 'full' or 'normal', not {sync!r}")
        if keep_s < 0 or max_rows < 0:
            raise ValueError("journal keep_s and max_rows must not be negative")
        journal = cls(Path(path), sync=sync, keep_s=keep_s, max_rows=max_rows, max_bytes=max_bytes)
        try:
            # 0700: payloads are users' prompts. Only the directory we create; an existing one is
            # the operator's choice.
            journal.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalUnavailable(
                f"cannot create the job journal directory {journal.path.parent}: {exc}"
            ) from exc
        journal._thread.start()
        try:
            journal._ready.result()
        except BaseException:
            journal._thread.join()
            raise
        return journal

    # -- writes: each returns a future that completes once the change is committed --

    def accept(self, entry: JournalEntry) -> Future[AcceptResult]:
        """Record a job before the client is told it was accepted. A key already journaled is a
        duplicate: nothing is written and the result carries the stored row (state, answer)."""

        def write(conn: sqlite3.Connection) -> AcceptResult:
            known = get_record(conn, entry.key)
            if known is not None:
                return AcceptResult(new=False, record=known)
            self._make_room(conn, len(entry.payload) + len(entry.correlation or b"") + 512)
            inserted = conn.execute(
                "INSERT INTO jobs (key, origin, state, payload, job_id, response_topic, correlation, qos,"
                " accepted_at) VALUES (?, ?, 'accepted', ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                (
                    entry.key,
                    entry.origin,
                    entry.payload,
                    entry.job_id,
                    entry.response_topic,
                    entry.correlation,
                    entry.qos,
                    time.time(),
                ),
            ).rowcount
            record = get_record(conn, entry.key)
            assert record is not None
            if inserted:
                self._since_prune += 1
            return AcceptResult(new=bool(inserted), record=record)

        return self._submit(write, f"accept {entry.key}")

    def mark_running(self, key: str) -> Future[None]:
        """The daemon starts working on the job (again, after a restart: ``attempts`` counts the
        starts, so a job the daemon keeps dying in is recognised: ``journal.max_attempts``)."""
        return self._transition(
            key,
            RecordState.RUNNING,
            (RecordState.ACCEPTED, RecordState.RUNNING),
            "started_at = ?, attempts = attempts + 1",
            (time.time(),),
        )

    def mark_released(self, key: str) -> Future[None]:
        """The daemon stopped in order before the job ended (shutdown): back to ``accepted``, and
        this start is not counted against ``journal.max_attempts`` (only dying in it is)."""
        return self._transition(
            key,
            RecordState.ACCEPTED,
            (RecordState.RUNNING,),
            "attempts = max(attempts - 1, 0)",
            (),
        )

    def mark_done(self, key: str, answer: Mapping[str, Any], *, answered: bool = False) -> Future[None]:
        """Store the answer; it is published again after a restart until ``mark_answered``.
        ``answered=True`` (a socket job, whose answer has no acknowledgement) does both in one commit."""
        return self._finish(key, RecordState.DONE, "answer", dumps(answer), answered)

    def mark_failed(self, key: str, error: Mapping[str, Any], *, answered: bool = False) -> Future[None]:
        """Store the error body; like ``mark_done``. ``answered=True`` also closes a job nobody can
        be told about (a socket job found pending at start: its client has gone)."""
        return self._finish(key, RecordState.FAILED, "error", dumps(error), answered)

    def mark_answered(self, key: str) -> Future[None]:
        """The answer's own PUBACK came back: keep the row only for the dedup window. Idempotent,
        since a re-published answer can be acknowledged twice."""
        return self._transition(
            key,
            RecordState.ANSWERED,
            (RecordState.DONE, RecordState.FAILED, RecordState.ANSWERED),
            "answered_at = COALESCE(answered_at, ?)",
            (time.time(),),
        )

    def prune(self) -> Future[int]:
        """Delete acknowledged rows older than ``keep_s``, then the oldest acknowledged rows beyond
        ``max_rows``. An unacknowledged row is never deleted, whatever its age or the row count.
        Returns how many rows went. Also runs at open and every few hundred new jobs."""
        return self._submit(self._prune, "prune")

    def _finish(self, key: str, state: RecordState, column: str, body: str, answered: bool) -> Future[None]:
        now = time.time()
        target = RecordState.ANSWERED if answered else state
        return self._transition(
            key,
            target,
            (RecordState.ACCEPTED, RecordState.RUNNING),
            f"{column} = ?, finished_at = ?, answered_at = ?",
            (body, now, now if answered else None),
        )

    def _transition(
        self,
        key: str,
        target: RecordState,
        allowed: tuple[RecordState, ...],
        assignments: str,
        values: tuple[Any, ...],
    ) -> Future[None]:
        def write(conn: sqlite3.Connection) -> None:
            marks = ", ".join("?" for _ in allowed)
            changed = conn.execute(
                f"UPDATE jobs SET state = ?, {assignments} WHERE key = ? AND state IN ({marks})",
                (target.value, *values, key, *(state.value for state in allowed)),
            ).rowcount
            if not changed:
                row = conn.execute("SELECT state FROM jobs WHERE key = ?", (key,)).fetchone()
                raise InvalidTransition(key, RecordState(row[0]) if row else None, target)

        return self._submit(write, f"mark {key} {target.value}")

    def used_bytes(self, conn: sqlite3.Connection) -> int:
        """Bytes of the pages that hold rows (free pages are reused, so the file stops growing)."""
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
        return int((pages - free) * size)

    def _make_room(self, conn: sqlite3.Connection, need: int) -> None:
        """Keep the rows under ``max_bytes``: delete the oldest acknowledged rows (they only serve
        the dedup window), and refuse the new job when only unanswered rows are left."""
        if self.max_bytes is None:
            return
        while self.used_bytes(conn) + need > self.max_bytes:
            deleted = conn.execute(
                "DELETE FROM jobs WHERE seq IN"
                " (SELECT seq FROM jobs WHERE state = 'answered' ORDER BY seq LIMIT 64)"
            ).rowcount
            if not deleted:
                raise JournalUnavailable(
                    f"the job journal {self.path} holds {self.max_bytes} bytes of unanswered jobs "
                    "(journal.max_bytes); new jobs wait until answers are acknowledged"
                )

    def _prune(self, conn: sqlite3.Connection) -> int:
        self._since_prune = 0
        deleted = conn.execute(
            "DELETE FROM jobs WHERE state = 'answered' AND answered_at < ?", (time.time() - self.keep_s,)
        ).rowcount
        (rows,) = conn.execute("SELECT count(*) FROM jobs").fetchone()
        if rows > self.max_rows:
            deleted += conn.execute(
                "DELETE FROM jobs WHERE seq IN"
                " (SELECT seq FROM jobs WHERE state = 'answered' ORDER BY seq LIMIT ?)",
                (rows - self.max_rows,),
            ).rowcount
        return int(deleted)

    def _submit(self, fn: Callable[[sqlite3.Connection], T], what: str) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                future.set_exception(JournalUnavailable(f"the job journal {self.path} is closed ({what})"))
            else:
                self._queue.put(_Write(fn, future, what))
        return future

    # -- reads: a short read-only connection each, beside the writer --

    def get(self, key: str) -> JobRecord | None:
        """The journaled job with this key, if any."""
        with self._reader() as conn:
            return get_record(conn, key)

    def find(self, job_id: str, *, origin: str | None = None) -> JobRecord | None:
        """The job a client knows by this id: its own id (the newest row with it: ids belong to
        their requesters, so several may share one; ``origin`` keeps one requester's rows, e.g.
        ``tcp:<key name>``), or the ``job-<16 hex>`` name edged gives a job without one (the start
        of its payload-derived key)."""
        rows = self._select(
            "WHERE job_id = ?1 AND (?2 IS NULL OR origin = ?2) ORDER BY seq DESC LIMIT 1", (job_id, origin)
        )
        record = rows[0] if rows else None
        suffix = job_id.removeprefix("job-")
        if record is None and len(suffix) == 16 and all(c in "0123456789abcdef" for c in suffix):
            rows = self._select(
                "WHERE key >= ?1 AND key < ?2 AND job_id IS NULL AND (?3 IS NULL OR origin = ?3) LIMIT 1",
                (f"sha256:{suffix}", f"sha256:{suffix}g", origin),
            )
            record = rows[0] if rows else None
        return record

    def pending(self) -> list[JobRecord]:
        """Jobs accepted or running when the daemon stopped: to run again, oldest first."""
        return self._select("WHERE state IN ('accepted', 'running') ORDER BY seq", ())

    def unanswered(self) -> list[JobRecord]:
        """Finished jobs whose answer was never acknowledged: to publish again, oldest first."""
        return self._select("WHERE state IN ('done', 'failed') ORDER BY seq", ())

    def recent(
        self, limit: int = 50, *, before: int | None = None, origin: str | None = None
    ) -> list[JobRecord]:
        """The newest jobs first, for ``edged jobs`` / ``GET /v1/jobs``. Page on by passing the
        last record's ``seq`` as ``before``; ``origin`` keeps one transport's jobs."""
        return self._select(
            "WHERE (?1 IS NULL OR seq < ?1) AND (?2 IS NULL OR origin = ?2) ORDER BY seq DESC LIMIT ?3",
            (before, origin, limit),
        )

    def _select(self, where: str, params: tuple[Any, ...]) -> list[JobRecord]:
        with self._reader() as conn:
            return [record_of(row) for row in conn.execute(f"SELECT {COLUMNS} FROM jobs {where}", params)]

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise JournalUnavailable(f"the job journal {self.path} is closed")
        try:
            conn = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error as exc:
            raise JournalUnavailable(f"cannot read the job journal {self.path}: {exc}") from exc
        try:
            yield conn
        except sqlite3.Error as exc:
            raise JournalUnavailable(f"cannot read the job journal {self.path}: {exc}") from exc
        finally:
            conn.close()

    # -- lifecycle --

    def close(self) -> None:
        """Commit everything already submitted, then stop the writer. Later writes fail with
        ``JournalUnavailable``. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the writer thread --

    def _run(self) -> None:
        try:
            conn = connect(self.path, self.sync)
            self._commit([_Write(self._prune, Future(), "prune at open")], conn)
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            stopping = False
            while not stopping:
                batch: list[_Write] = []
                item = self._queue.get()
                while True:
                    if isinstance(item, _Write):
                        batch.append(item)
                    else:
                        stopping = True
                        break
                    if len(batch) >= _MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                self._commit(batch, conn)
                if self._since_prune >= _PRUNE_EVERY:
                    self._commit([_Write(self._prune, Future(), "automatic prune")], conn)
        finally:
            conn.close()

    def _commit(self, batch: list[_Write], conn: sqlite3.Connection) -> None:
        """Run a batch in one transaction and complete its futures only after COMMIT returned."""
        live = [write for write in batch if write.future.set_running_or_notify_cancel()]
        if not live:
            return
        outcomes: list[tuple[_Write, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in live:
                conn.execute("SAVEPOINT write")
                try:
                    value = write.fn(conn)
                except sqlite3.Error:
                    raise
                except Exception as exc:
                    conn.execute("ROLLBACK TO write")
                    conn.execute("RELEASE write")
                    outcomes.append((write, None, exc))
                    continue
                conn.execute("RELEASE write")
                outcomes.append((write, value, None))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            log.error(
                "job journal write failed; nothing in this commit was recorded",
                path=str(self.path),
                writes=[write.what for write in live],
                error=str(exc),
            )
            for write in live:
                write.future.set_exception(
                    JournalUnavailable(f"the job journal {self.path} cannot be written ({write.what}): {exc}")
                )
            return
        for write, value, error in outcomes:
            if error is not None:
                write.future.set_exception(error)
            else:
                write.future.set_result(value)
