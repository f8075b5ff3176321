"""The job journal on real SQLite files: durability across a real SIGKILL, duplicates, state flow,
pruning, a corrupt file, a journal that cannot be written, and a writer that never blocks the loop."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edged.errors import Unavailable
from edged.journal import (
    SCHEMA_VERSION,
    InvalidTransition,
    Journal,
    JournalEntry,
    JournalUnavailable,
    RecordState,
    idempotency_key,
)

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30  # seconds: every wait on a future is bounded


def mqtt_entry(n: int, *, job_id: str | None = None, correlation: bytes | None = None) -> JournalEntry:
    return JournalEntry(
        origin="mqtt",
        payload=json.dumps({"prompt": f"question {n}", "max_tokens": 8}).encode(),
        job_id=job_id,
        response_topic=f"edged/dev1/results/{n}",
        correlation=correlation if correlation is not None else f"corr-{n}".encode(),
        qos=1,
    )


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.db"


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_accepted_entry_is_there_after_reopen(journal_path: Path, sync: str) -> None:
    entry = mqtt_entry(1, job_id="job-1")
    with Journal.open(journal_path, sync=sync) as journal:  # type: ignore[arg-type]
        result = journal.accept(entry).result(WAIT)
    assert result.new and result.state is RecordState.ACCEPTED

    with Journal.open(journal_path, sync=sync) as journal:  # type: ignore[arg-type]
        record = journal.get(entry.key)
    assert record is not None
    assert record.state is RecordState.ACCEPTED
    assert record.payload == entry.payload
    assert record.response_topic == entry.response_topic
    assert record.correlation == entry.correlation
    assert record.qos == 1
    assert record.job_id == "job-1"
    assert record.origin == "mqtt"
    assert record.accepted_at == pytest.approx(time.time(), abs=60)


def test_file_is_a_versioned_wal_database_in_a_private_directory(journal_path: Path) -> None:
    with Journal.open(journal_path) as journal:
        journal.accept(mqtt_entry(1)).result(WAIT)
        conn = sqlite3.connect(journal_path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        finally:
            conn.close()
    assert stat.S_IMODE(journal_path.parent.stat().st_mode) == 0o700


def test_sync_must_be_full_or_normal(journal_path: Path) -> None:
    with pytest.raises(ValueError, match="sync"):
        Journal.open(journal_path, sync="always")  # type: ignore[arg-type]


def test_idempotency_key() -> None:
    mine = idempotency_key("abc", b"x", "t", b"c", origin="mqtt", owner="replies/a")
    assert mine.startswith("id:") and len(mine) == len("id:") + 64
    assert mine == idempotency_key("abc", b"y", None, b"c", origin="mqtt", owner="replies/a"), (
        "the same requester's id is the key, whatever the payload"
    )
    # A job id belongs to its requester: another requester's "abc" is another job.
    assert mine != idempotency_key("abc", b"x", "t", b"c", origin="mqtt", owner="replies/b")
    assert mine != idempotency_key("abc", b"x", "t", b"other", origin="mqtt", owner="replies/a")
    assert mine != idempotency_key("abc", b"x", "t", b"c", origin="tcp:webui", owner="replies/a")
    assert idempotency_key("abc", b"", None, None, origin="socket", owner="uid=0") != idempotency_key(
        "abc", b"", None, None, origin="socket", owner="uid=1000"
    )
    derived = idempotency_key(None, b"payload", "topic", b"corr")
    assert derived.startswith("sha256:") and len(derived) == len("sha256:") + 64
    assert derived == idempotency_key(None, b"payload", "topic", b"corr")
    assert derived == idempotency_key("", b"payload", "topic", b"corr"), "an empty id is no id"
    assert derived != idempotency_key(None, b"payload", "topic", b"other")
    assert derived != idempotency_key(None, b"payload", "other", b"corr")
    # Absent is not empty, and parts cannot be shifted into each other.
    assert idempotency_key(None, b"p", None, None) != idempotency_key(None, b"p", "", b"")
    assert idempotency_key(None, b"ab", "c", None) != idempotency_key(None, b"a", "bc", None)


def test_duplicate_by_client_id_returns_the_stored_answer(journal_path: Path) -> None:
    with Journal.open(journal_path) as journal:
        first = journal.accept(mqtt_entry(1, job_id="job-7")).result(WAIT)
        # A redelivery after a crash: same id and requester (here even another payload), nothing written.
        again = journal.accept(mqtt_entry(2, job_id="job-7", correlation=b"corr-1")).result(WAIT)
        assert first.new and not again.new
        assert again.state is RecordState.ACCEPTED and again.answer is None

        journal.mark_running(first.record.key).result(WAIT)
        assert journal.accept(mqtt_entry(1, job_id="job-7")).result(WAIT).state is RecordState.RUNNING

        answer = {"id": "job-7", "status": "ok", "text": "forty-two"}
        journal.mark_done(first.record.key, answer).result(WAIT)
        done = journal.accept(mqtt_entry(1, job_id="job-7")).result(WAIT)
        assert not done.new and done.state is RecordState.DONE and done.answer == answer

        journal.mark_answered(first.record.key).result(WAIT)
        answered = journal.accept(mqtt_entry(1, job_id="job-7")).result(WAIT)
        assert not answered.new and answered.state is RecordState.ANSWERED and answered.answer == answer
        assert len(journal.recent(10)) == 1


def test_duplicate_by_derived_key(journal_path: Path) -> None:
    with Journal.open(journal_path) as journal:
        first = journal.accept(mqtt_entry(3)).result(WAIT)
        assert first.record.key.startswith("sha256:")
        redelivered = journal.accept(mqtt_entry(3)).result(WAIT)
        assert not redelivered.new and redelivered.record.seq == first.record.seq
        other = journal.accept(mqtt_entry(3, correlation=b"another request")).result(WAIT)
        assert other.new, "same payload and topic but other correlation data is another job"

        error = {"code": "context_length_exceeded", "message": "too long"}
        journal.mark_failed(first.record.key, error).result(WAIT)
        failed = journal.accept(mqtt_entry(3)).result(WAIT)
        assert not failed.new and failed.state is RecordState.FAILED
        assert failed.record.error == error and failed.answer is None


def test_states_flow_with_timings_and_refuse_bad_transitions(journal_path: Path) -> None:
    with Journal.open(journal_path) as journal:
        key = journal.accept(mqtt_entry(1)).result(WAIT).record.key
        journal.mark_running(key).result(WAIT)
        journal.mark_running(key).result(WAIT)  # run again after a restart
        running = journal.get(key)
        assert running is not None and running.state is RecordState.RUNNING and running.attempts == 2
        journal.mark_done(key, {"text": "hi"}).result(WAIT)
        journal.mark_answered(key).result(WAIT)
        journal.mark_answered(key).result(WAIT)  # a second PUBACK for a re-published answer is fine
        record = journal.get(key)
        assert record is not None and record.state is RecordState.ANSWERED
        assert record.started_at is not None and record.finished_at is not None
        assert record.answered_at is not None
        assert record.accepted_at <= record.started_at <= record.finished_at <= record.answered_at

        with pytest.raises(InvalidTransition, match="is answered"):
            journal.mark_done(key, {"text": "again"}).result(WAIT)
        with pytest.raises(InvalidTransition, match="not in the journal"):
            journal.mark_running("id:nobody").result(WAIT)

        # A refused write does not undo the writes committed with it.
        other = journal.accept(mqtt_entry(2)).result(WAIT).record.key
        futures = [journal.mark_answered(other), journal.mark_running(other), journal.accept(mqtt_entry(9))]
        with pytest.raises(InvalidTransition):
            futures[0].result(WAIT)
        futures[1].result(WAIT)
        assert futures[2].result(WAIT).new
        assert journal.get(other).state is RecordState.RUNNING  # type: ignore[union-attr]

        # A socket job has no acknowledgement: done and answered in one commit.
        socket_job = JournalEntry(origin="socket", payload=b'{"prompt": "hi"}', job_id="job-s")
        journal.accept(socket_job).result(WAIT)
        journal.mark_done(socket_job.key, {"text": "hello"}, answered=True).result(WAIT)
        assert journal.get(socket_job.key).state is RecordState.ANSWERED  # type: ignore[union-attr]


CRASHING_CHILD = r"""
import json, os, signal, sys
from edged.journal import Journal, JournalEntry

path, sync = sys.argv[1], sys.argv[2]
journal = Journal.open(path, sync=sync)
entries = [
    JournalEntry(
        origin="mqtt",
        payload=("prompt %d " % n).encode() + bytes(range(256)),
        job_id=("job-%d" % n) if n % 2 else None,
        response_topic="edged/dev/results/%d" % n,
        correlation=b"c%d" % n,
        qos=1,
    )
    for n in range(12)
]
for future in [journal.accept(e) for e in entries]:
    future.result(30)
keys = [e.key for e in entries]
waits = []
for k in keys[3:6]:
    waits.append(journal.mark_running(k))
for k in keys[6:8] + keys[9:11]:
    waits.append(journal.mark_running(k))
    waits.append(journal.mark_done(k, {"text": "answer " + k}))
waits.append(journal.mark_running(keys[8]))
waits.append(journal.mark_failed(keys[8], {"code": "backend_failed"}))
for k in keys[9:11]:
    waits.append(journal.mark_answered(k))
waits.append(journal.mark_running(keys[11]))
waits.append(journal.mark_running(keys[11]))
for future in waits:
    future.result(30)
print(json.dumps({"keys": keys, "payloads": [e.payload.hex() for e in entries]}), flush=True)
# Writes still in flight when the process dies: each is either fully there or not at all.
for n in range(100, 140):
    journal.accept(JournalEntry(origin="socket", payload=b"late %d" % n, job_id="late-%d" % n))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.system
@pytest.mark.parametrize("sync", ["full", "normal"])
def test_committed_entries_survive_sigkill(journal_path: Path, sync: str) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_CHILD, str(journal_path), sync],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -9, child.stderr
    told = json.loads(child.stdout.splitlines()[-1])  # structlog writes its lines to stdout too
    keys: list[str] = told["keys"]

    with Journal.open(journal_path, sync=sync) as journal:  # type: ignore[arg-type]
        records = {key: journal.get(key) for key in keys}
        pending = journal.pending()
        unanswered = journal.unanswered()
        late = [r for r in journal.recent(1000) if r.origin == "socket"]

    for key, payload in zip(keys, told["payloads"], strict=True):
        record = records[key]
        assert record is not None, f"committed job {key} lost"
        assert record.payload.hex() == payload
    states = [records[key].state for key in keys]  # type: ignore[union-attr]
    A, R, D, F, N = (
        RecordState.ACCEPTED,
        RecordState.RUNNING,
        RecordState.DONE,
        RecordState.FAILED,
        RecordState.ANSWERED,
    )
    assert states == [A, A, A, R, R, R, D, D, F, N, N, R]
    assert [r.key for r in pending] == keys[0:6] + keys[11:12]
    assert records[keys[11]].attempts == 2  # type: ignore[union-attr]
    assert [r.key for r in unanswered] == keys[6:9]
    assert unanswered[0].answer == {"text": "answer " + keys[6]}
    assert unanswered[2].error == {"code": "backend_failed"}
    for record in late:
        assert record.state is RecordState.ACCEPTED and record.payload == f"late {record.job_id[5:]}".encode()  # type: ignore[index]


def test_prune_by_age_keeps_every_unanswered_row(journal_path: Path) -> None:
    with Journal.open(journal_path, keep_s=0) as journal:
        keys = [journal.accept(mqtt_entry(n)).result(WAIT).record.key for n in range(6)]
        for key in keys[:4]:
            journal.mark_running(key).result(WAIT)
        journal.mark_done(keys[0], {"text": "a"}).result(WAIT)
        journal.mark_failed(keys[1], {"code": "x"}).result(WAIT)
        journal.mark_done(keys[2], {"text": "c"}).result(WAIT)
        journal.mark_answered(keys[2]).result(WAIT)
        journal.mark_done(keys[3], {"text": "d"}).result(WAIT)
        journal.mark_answered(keys[3]).result(WAIT)

        assert journal.prune().result(WAIT) == 2
        left = {r.key: r.state for r in journal.recent(100)}
    assert set(left) == {keys[0], keys[1], keys[4], keys[5]}
    assert left[keys[0]] is RecordState.DONE and left[keys[1]] is RecordState.FAILED

    with Journal.open(journal_path, keep_s=3600) as journal:
        key = journal.accept(mqtt_entry(50)).result(WAIT).record.key
        journal.mark_done(key, {"text": "kept"}).result(WAIT)
        journal.mark_answered(key).result(WAIT)
        assert journal.prune().result(WAIT) == 0, "an answer inside the dedup window is kept"
        assert journal.get(key) is not None


def test_prune_by_row_count_drops_oldest_answered_only(journal_path: Path) -> None:
    with Journal.open(journal_path, max_rows=5) as journal:
        keys = [journal.accept(mqtt_entry(n)).result(WAIT).record.key for n in range(10)]
        unanswered = keys[0:3] + keys[9:10]
        for key in keys[3:9]:
            journal.mark_done(key, {"text": key}, answered=True).result(WAIT)
        journal.mark_done(keys[0], {"text": "waiting for its PUBACK"}).result(WAIT)

        assert journal.prune().result(WAIT) == 5
        assert {r.key for r in journal.recent(100)} == set(unanswered) | {keys[8]}

    with Journal.open(journal_path, max_rows=0) as journal:  # pruned at open, still never unanswered
        assert {r.key for r in journal.recent(100)} == set(unanswered)


def test_recent_pages_newest_first(journal_path: Path) -> None:
    with Journal.open(journal_path) as journal:
        for n in range(7):
            origin = "socket" if n % 3 == 0 else "mqtt"
            journal.accept(JournalEntry(origin=origin, payload=b"p%d" % n, job_id=f"job-{n}")).result(WAIT)
        first = journal.recent(3)
        second = journal.recent(3, before=first[-1].seq)
        third = journal.recent(3, before=second[-1].seq)
        sockets = journal.recent(10, origin="socket")
    assert [r.job_id for r in first + second + third] == [f"job-{n}" for n in range(6, -1, -1)]
    assert [r.job_id for r in sockets] == ["job-6", "job-3", "job-0"]


def test_garbage_file_is_moved_aside_and_a_fresh_journal_works(journal_path: Path) -> None:
    journal_path.parent.mkdir(mode=0o700)
    garbage = b"this is no sqlite file \x00\xff" * 400
    journal_path.write_bytes(garbage)

    with capture_logs() as logs, Journal.open(journal_path) as journal:
        assert journal.accept(mqtt_entry(1)).result(WAIT).new
        assert len(journal.recent(10)) == 1

    aside = list(journal_path.parent.glob("journal.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    loud = [e for e in logs if "corrupt" in e["event"]]
    assert loud and loud[0]["log_level"] == "error" and loud[0]["moved_to"] == str(aside[0])


def test_damaged_page_fails_integrity_check_and_is_moved_aside(journal_path: Path) -> None:
    with Journal.open(journal_path) as journal:
        for future in [journal.accept(mqtt_entry(n)) for n in range(300)]:
            future.result(WAIT)
    assert not Path(f"{journal_path}-wal").exists(), "closed cleanly: every row is in the main file"
    with open(journal_path, "r+b") as f:  # keep page 1 (the header), smash pages 3-4
        f.seek(2 * 4096)
        f.write(b"\xa5" * 8192)

    with capture_logs() as logs, Journal.open(journal_path) as journal:
        assert journal.recent(10) == []
        assert journal.accept(mqtt_entry(1)).result(WAIT).new
    assert len(list(journal_path.parent.glob("journal.db.corrupt-*"))) == 1
    assert any("corrupt" in e["event"] and e["log_level"] == "error" for e in logs)


def test_journal_under_a_file_is_storage_unavailable(tmp_path: Path) -> None:
    # Root ignores chmod 0500, but nobody can create a directory inside a regular file.
    (tmp_path / "not-a-dir").write_text("x")
    with pytest.raises(JournalUnavailable) as caught:
        Journal.open(tmp_path / "not-a-dir" / "state" / "journal.db")
    assert isinstance(caught.value, Unavailable)
    assert caught.value.code == "storage_unavailable" and caught.value.http_status == 503
    assert caught.value.to_dict()["error"]["code"] == "storage_unavailable"


FILLING_CHILD = r"""
import json, resource, signal, sys
from edged.journal import Journal, JournalEntry, JournalUnavailable

journal = Journal.open(sys.argv[1], sync="full")
# A file-size limit binds root too: past it write() fails with EFBIG, as on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
committed, failure = [], None
for n in range(2000):
    entry = JournalEntry(origin="mqtt", payload=bytes([n % 256]) * 8192, job_id="job-%d" % n)
    try:
        journal.accept(entry).result(30)
    except JournalUnavailable as exc:
        failure = {"key": entry.key, "code": exc.code, "message": exc.message}
        break
    committed.append(entry.key)
print(json.dumps({"committed": committed, "failure": failure}), flush=True)
journal.close()
"""


@pytest.mark.system
def test_write_on_a_full_disk_fails_with_storage_unavailable_and_keeps_committed_rows(
    journal_path: Path,
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", FILLING_CHILD, str(journal_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    told = json.loads(child.stdout.splitlines()[-1])  # structlog writes its lines to stdout too
    assert told["failure"] is not None, "the file-size limit never made a write fail"
    assert told["failure"]["code"] == "storage_unavailable"
    assert "cannot be written" in told["failure"]["message"]
    assert len(told["committed"]) >= 5

    with Journal.open(journal_path) as journal:
        for key in told["committed"]:
            record = journal.get(key)
            assert record is not None and record.state is RecordState.ACCEPTED, key
        assert journal.get(told["failure"]["key"]) is None, "a failed accept must not half-exist"
        assert journal.accept(mqtt_entry(1)).result(WAIT).new, "writable again once there is room"


def test_close_drains_submitted_writes_and_refuses_later_ones(journal_path: Path) -> None:
    journal = Journal.open(journal_path)
    futures = [journal.accept(mqtt_entry(n)) for n in range(200)]
    journal.close()
    assert all(f.done() for f in futures)
    assert all(f.result().new for f in futures)
    with pytest.raises(JournalUnavailable, match="closed"):
        journal.accept(mqtt_entry(999)).result(WAIT)
    journal.close()

    with Journal.open(journal_path) as reopened:
        assert len(reopened.recent(1000)) == 200


def test_writes_never_block_the_event_loop(journal_path: Path) -> None:
    journal = Journal.open(journal_path)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ticks: list[float] = []
        enough = asyncio.Event()
        wanted = 0

        def tick() -> None:
            ticks.append(time.monotonic())
            if len(ticks) >= wanted:
                enough.set()
            loop.call_later(0.005, tick)

        tick()
        # Another connection holds the write lock: the writer thread now waits on SQLite's busy
        # timeout. An accept that wrote on the caller's thread would freeze the loop right here.
        blocker = sqlite3.connect(journal_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            futures = [asyncio.wrap_future(journal.accept(mqtt_entry(n))) for n in range(50)]
            wanted = len(ticks) + 20
            await asyncio.wait_for(enough.wait(), WAIT)
            assert not any(f.done() for f in futures), "written while another connection held the lock?"
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert all(r.new for r in await asyncio.wait_for(asyncio.gather(*futures), WAIT))

        # Many durable (sync=full) accepts awaited on the loop while its timer keeps ticking.
        start = len(ticks)
        more = [asyncio.wrap_future(journal.accept(mqtt_entry(n))) for n in range(100, 400)]
        results = await asyncio.wait_for(asyncio.gather(*more), WAIT)
        assert all(r.new for r in results)
        during = [*ticks[start:], time.monotonic()]
        assert max(b - a for a, b in itertools.pairwise(during)) < 1.0

    try:
        asyncio.run(main())
    finally:
        journal.close()
    with Journal.open(journal_path) as reopened:
        assert len(reopened.recent(1000)) == 350


def test_the_same_id_from_another_requester_is_another_job(journal_path: Path) -> None:
    """Job ids are the requester's: the same id from someone else never finds this one's answer."""

    def entry(owner: str) -> JournalEntry:
        return JournalEntry(origin="mqtt", payload=b"{}", job_id="shared-1", owner=owner, qos=1)

    with Journal.open(journal_path) as journal:
        first = journal.accept(entry("replies/a")).result(WAIT)
        journal.mark_done(first.record.key, {"id": "shared-1", "content": "a's secret"}).result(WAIT)
        other = journal.accept(entry("replies/b")).result(WAIT)
        assert other.new and other.record.answer is None
        assert not journal.accept(entry("replies/a")).result(WAIT).new
        # find: the newest row with the id, or one origin's
        tcp = JournalEntry(origin="tcp:webui", payload=b"", job_id="shared-1", owner="tcp:webui")
        journal.accept(tcp).result(WAIT)
        found = journal.find("shared-1")
        assert found is not None and found.origin == "tcp:webui"
        mqtt = journal.find("shared-1", origin="mqtt")
        assert mqtt is not None and mqtt.key == other.record.key
        assert journal.find("shared-1", origin="tcp:homeassistant") is None


def test_a_graceful_stop_does_not_count_as_an_attempt(journal_path: Path) -> None:
    with Journal.open(journal_path) as journal:
        key = journal.accept(mqtt_entry(1, job_id="j")).result(WAIT).record.key
        journal.mark_running(key).result(WAIT)
        journal.mark_running(key).result(WAIT)  # run again after a crash
        journal.mark_released(key).result(WAIT)  # then left by a shutdown
        record = journal.get(key)
        assert record is not None and record.state is RecordState.ACCEPTED and record.attempts == 1
        with pytest.raises(InvalidTransition):
            journal.mark_released(key).result(WAIT)  # only a running job can be released


def test_max_bytes_drops_acknowledged_rows_then_refuses(journal_path: Path) -> None:
    """The journal is bounded by bytes, not only rows: acknowledged rows go first; when only
    unanswered ones are left, a new job is refused (JournalUnavailable: not acknowledged)."""
    budget = 2 * 1024 * 1024
    big = b"x" * (200 * 1024)
    with Journal.open(journal_path, max_bytes=budget) as journal:
        for n in range(30):  # 6 MB of answered jobs through a 2 MB budget
            entry = JournalEntry(origin="mqtt", payload=big + str(n).encode(), qos=1)
            key = journal.accept(entry).result(WAIT).record.key
            journal.mark_done(key, {"n": n}, answered=True).result(WAIT)
        rows = journal.recent(100)
        assert 0 < len(rows) < 15 and rows[0].answer == {"n": 29}, "the oldest acknowledged rows went"
        for n in range(100):  # unanswered jobs fill it up, then the next is refused
            entry = JournalEntry(origin="mqtt", payload=big + f"p{n}".encode(), qos=1)
            try:
                journal.accept(entry).result(WAIT)
            except JournalUnavailable as exc:
                assert "journal.max_bytes" in exc.message
                break
        else:
            pytest.fail("100 unanswered 200 KB jobs fitted in a 2 MB journal")
        assert len(journal.pending()) >= 5, "unanswered rows are never dropped to make room"
        assert all(r.state is RecordState.ACCEPTED for r in journal.pending())
    assert journal_path.stat().st_size < budget * 1.5
