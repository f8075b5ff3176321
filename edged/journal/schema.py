"""The journal's file: its schema and migrations, rows as records, and opening it (WAL, the sync
mode, an integrity check, a corrupt file moved aside). The store (`store.py`) owns the writer thread."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from edged.journal.records import JobRecord, JournalUnavailable, RecordState

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000

COLUMNS = (
    "seq, key, origin, state, payload, job_id, response_topic, correlation, qos, attempts,"
    " accepted_at, started_at, finished_at, answered_at, answer, error"
)


def _v1(conn: sqlite3.Connection) -> None:
    # AUTOINCREMENT: a seq is never reused after prune, so a paging cursor never skips or repeats.
    conn.execute(
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            key TEXT NOT NULL UNIQUE,
            origin TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('accepted', 'running', 'done', 'failed', 'answered')),
            payload BLOB NOT NULL,
            job_id TEXT,
            response_topic TEXT,
            correlation BLOB,
            qos INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            accepted_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            answered_at REAL,
            answer TEXT,
            error TEXT
        )"""
    )
    # The start-up scans and the max_rows prune read by state; the age prune only answered rows.
    conn.execute("CREATE INDEX jobs_state ON jobs (state, seq)")
    conn.execute("CREATE INDEX jobs_answered ON jobs (answered_at) WHERE state = 'answered'")
    conn.execute("CREATE INDEX jobs_origin ON jobs (origin, seq)")


def _v2(conn: sqlite3.Connection) -> None:
    # Job ids belong to their requester (the key includes who sent it), so one id may name several
    # rows: `find` reads them by id, newest first.
    conn.execute("CREATE INDEX jobs_job_id ON jobs (job_id, seq)")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2]
"""``MIGRATIONS[n]`` takes a journal from ``user_version`` n to n + 1."""
assert len(MIGRATIONS) == SCHEMA_VERSION


class Corrupt(Exception):
    """The file is not a journal this version can use; it is moved aside."""


def record_of(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(
        seq=row[0],
        key=row[1],
        origin=row[2],
        state=RecordState(row[3]),
        payload=bytes(row[4]),
        job_id=row[5],
        response_topic=row[6],
        correlation=bytes(row[7]) if row[7] is not None else None,
        qos=row[8],
        attempts=row[9],
        accepted_at=row[10],
        started_at=row[11],
        finished_at=row[12],
        answered_at=row[13],
        answer=json.loads(row[14]) if row[14] is not None else None,
        error=json.loads(row[15]) if row[15] is not None else None,
    )


def get_record(conn: sqlite3.Connection, key: str) -> JobRecord | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE key = ?", (key,)).fetchone()
    return record_of(row) if row is not None else None


def dumps(document: Mapping[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def connect(path: Path, sync: str) -> sqlite3.Connection:
    """Open the journal's write connection (WAL, ``sync``, checked and migrated), moving a corrupt
    file aside once. Raises ``JournalUnavailable``."""
    for _ in range(2):
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise JournalUnavailable(f"cannot open the job journal {path}: {exc}") from exc
        try:
            _prepare(conn, path, sync)
            return conn
        except (Corrupt, sqlite3.DatabaseError) as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError):
                # Locked, read-only, I/O error, out of space: the file may be fine; keep it.
                raise JournalUnavailable(f"cannot open the job journal {path}: {exc}") from exc
            _move_aside(path, str(exc))
        except BaseException:
            conn.close()
            raise
    raise JournalUnavailable(f"the job journal {path} is still unusable after moving it aside")


def _prepare(conn: sqlite3.Connection, path: Path, sync: str) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        log.warning("job journal is not in WAL mode; writes will block reads", path=str(path), mode=mode)
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    if problems != ["ok"]:
        raise Corrupt("integrity_check: " + "; ".join(problems[:5]))
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise Corrupt(f"schema version {version} is newer than this edged's {SCHEMA_VERSION}")
    for step in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[step](conn)
            conn.execute(f"PRAGMA user_version = {step + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _move_aside(path: Path, reason: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
        n += 1
    try:
        os.replace(path, target)
        # The WAL goes with it (SQLite pairs "X" with "X-wal"); the -shm index is rebuilt.
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}-wal", f"{target}-wal")
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{path}-shm")
    except OSError as exc:
        raise JournalUnavailable(
            f"the job journal {path} is corrupt and cannot be moved aside: {exc}"
        ) from exc
    log.error(
        "job journal corrupt: moved aside, starting a fresh one; jobs in it are not run again",
        path=str(path),
        moved_to=str(target),
        reason=reason,
    )
