"""`edged.journal.intake`: what a start does with the rows the last run left open (socket and TCP
rows closed, MQTT rows returned to run or publish again, a job the daemon died in too often answered
``backend_failed``, one row that cannot be written not keeping the others open), and a job's way
through the journal as the engine and MQTT drive it. Against a stand-in book where a write must
fail, else a real journal on a temporary SQLite file (no process, no socket)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from edged.engine import JobRequest, JobResult, Usage
from edged.engine.timings import Clock, compute_timings
from edged.errors import BackendError, Cancelled, InvalidRequest, NotReady, QueueFull, ShuttingDown
from edged.journal import JobRecord, Journal, JournalEntry, RecordState
from edged.journal.book import JobBook
from edged.journal.intake import JobIntake, Recovery, Ticket, exhausted

WAIT = 10


def record(key: str, origin: str, state: RecordState, attempts: int = 1) -> JobRecord:
    return JobRecord(
        seq=1,
        key=key,
        origin=origin,
        state=state,
        payload=b"{}",
        job_id=f"job-{key}",
        response_topic=None,
        correlation=None,
        qos=0,
        attempts=attempts,
        accepted_at=1.0,
        started_at=None,
        finished_at=None,
        answered_at=None,
        answer=None,
        error=None,
    )


class Book:
    """The part of `JobBook` recovery uses; records what it was asked to do."""

    def __init__(self, pending: list[JobRecord], unanswered: list[JobRecord], broken: str = "") -> None:
        self._pending, self._unanswered, self.broken = pending, unanswered, broken
        self.failed_rows: list[tuple[str, Mapping[str, Any], bool]] = []
        self.answered_rows: list[str] = []

    async def pending(self) -> list[JobRecord]:
        return self._pending

    async def unanswered(self) -> list[JobRecord]:
        return self._unanswered

    async def failed(self, key: str, error: Mapping[str, Any], *, answered: bool = False) -> None:
        if key == self.broken:
            raise OSError("disk I/O error")
        self.failed_rows.append((key, error, answered))

    async def mark_answered(self, key: str) -> None:
        if key == self.broken:
            raise OSError("disk I/O error")
        self.answered_rows.append(key)


def recover(book: Book, max_attempts: int = 3) -> Recovery:
    return asyncio.run(JobIntake(book, "dev1", max_attempts=max_attempts).recover())  # type: ignore[arg-type]


def test_socket_and_tcp_rows_are_closed_and_mqtt_rows_left_to_run_again() -> None:
    book = Book(
        pending=[
            record("s1", "socket", RecordState.RUNNING),
            record("m1", "mqtt", RecordState.ACCEPTED),
            record("t1", "tcp:kitchen", RecordState.ACCEPTED),
        ],
        unanswered=[record("s2", "socket", RecordState.DONE), record("m2", "mqtt", RecordState.FAILED)],
    )
    recovery = recover(book)
    assert (recovery.closed_failed, recovery.closed_answered, recovery.errors) == (2, 1, 0)
    assert [(key, answered) for key, _, answered in book.failed_rows] == [("s1", True), ("t1", True)]
    assert book.answered_rows == ["s2"]
    message = book.failed_rows[0][1]
    assert message["id"] == "job-s1" and message["device_id"] == "dev1" and message["status"] == "error"
    assert message["error"]["code"] == "cancelled" and "restarted" in message["error"]["message"]
    assert [r.key for r in recovery.rerun] == ["m1"] and [r.key for r in recovery.republish] == ["m2"]
    assert recovery.given_up == []


def test_one_row_that_cannot_be_closed_does_not_keep_the_others_open() -> None:
    book = Book(
        pending=[
            record("bad", "socket", RecordState.RUNNING),
            record("ok", "socket", RecordState.RUNNING),
            record("m1", "mqtt", RecordState.RUNNING),
        ],
        unanswered=[record("bad", "socket", RecordState.DONE), record("ok2", "socket", RecordState.FAILED)],
        broken="bad",
    )
    with capture_logs() as logs:
        recovery = recover(book)
    assert (recovery.closed_failed, recovery.closed_answered, recovery.errors) == (1, 1, 2)
    assert [k for k, _, _ in book.failed_rows] == ["ok"] and book.answered_rows == ["ok2"]
    assert [r.key for r in recovery.rerun] == ["m1"]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["key"] for e in errors] == ["bad", "bad"] and all("disk I/O" in e["error"] for e in errors)


def test_nothing_left_open_is_nothing_to_say() -> None:
    book = Book(pending=[record("m1", "mqtt", RecordState.RUNNING)], unanswered=[])
    with capture_logs() as logs:
        recovery = recover(book)
    assert (recovery.closed_failed, recovery.closed_answered, recovery.errors) == (0, 0, 0)
    assert logs == [] and book.failed_rows == []
    assert [r.key for r in recovery.rerun] == ["m1"]


def test_a_job_is_run_again_until_the_daemon_died_in_it_max_attempts_times() -> None:
    assert exhausted(record("k", "mqtt", RecordState.RUNNING, attempts=0), 3) is None
    assert exhausted(record("k", "mqtt", RecordState.RUNNING, attempts=2), 3) is None
    error = exhausted(record("k", "mqtt", RecordState.RUNNING, attempts=3), 3)
    assert isinstance(error, BackendError) and error.code == "backend_failed"
    assert "stopped 3 times" in error.message and "journal.max_attempts = 3" in error.message
    assert exhausted(record("k", "mqtt", RecordState.RUNNING, attempts=7), 3) is not None


# -- against a real journal --------------------------------------------------------------------------


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal.open(tmp_path / "journal.sqlite3") as journal:
        yield journal


def book_of(journal: Journal, *, content: bool = False) -> JobBook:
    return JobBook(journal, content=content)


def accept(journal: Journal, origin: str, job_id: str, *, runs: int = 0) -> str:
    """A row as the last run left it: accepted, then started ``runs`` times."""
    entry = JournalEntry(
        origin=origin,
        payload=b'{"prompt": "hi"}',
        job_id=job_id,
        response_topic="lab/answers" if origin == "mqtt" else None,
        owner=origin,
    )
    key = journal.accept(entry).result(WAIT).record.key
    for _ in range(runs):
        journal.mark_running(key).result(WAIT)
    return key


def state(journal: Journal, key: str) -> JobRecord:
    journal.prune().result(WAIT)  # a barrier: the writes not awaited before it are committed
    found = journal.get(key)
    assert found is not None
    return found


def test_socket_only_rows_are_closed_at_recovery(journal: Journal) -> None:
    running = accept(journal, "socket", "s-run", runs=1)
    accepted = accept(journal, "tcp:webui", "t-acc")
    done = accept(journal, "socket", "s-done", runs=1)
    journal.mark_done(done, {"id": "s-done", "status": "done"}).result(WAIT)
    recovery = asyncio.run(JobIntake(book_of(journal), "dev1").recover())
    assert (recovery.closed_failed, recovery.closed_answered, recovery.errors) == (2, 1, 0)
    assert recovery.rerun == recovery.republish == recovery.given_up == []
    for key, job_id in ((running, "s-run"), (accepted, "t-acc")):
        row = state(journal, key)
        assert row.state is RecordState.ANSWERED and row.answered_at is not None, row
        assert (
            row.error is not None and row.error["id"] == job_id and row.error["error"]["code"] == "cancelled"
        )
    closed = state(journal, done)
    assert closed.state is RecordState.ANSWERED and closed.answer == {"id": "s-done", "status": "done"}
    assert journal.pending() == journal.unanswered() == []
    again = asyncio.run(JobIntake(book_of(journal), "dev1").recover())  # the next start: nothing left
    assert (again.closed_failed, again.closed_answered, again.errors) == (0, 0, 0)


def test_mqtt_rows_are_returned_to_run_and_publish_again_untouched(journal: Journal) -> None:
    first = accept(journal, "mqtt", "m-acc")
    second = accept(journal, "mqtt", "m-run", runs=2)
    answer = {"id": "m-done", "status": "done", "content": "4"}
    finished = accept(journal, "mqtt", "m-done", runs=1)
    journal.mark_done(finished, answer).result(WAIT)
    recovery = asyncio.run(JobIntake(book_of(journal), "dev1", max_attempts=3).recover())
    assert [r.key for r in recovery.rerun] == [first, second]  # oldest first
    assert [r.attempts for r in recovery.rerun] == [0, 2]
    assert [(r.key, r.answer) for r in recovery.republish] == [(finished, answer)]
    assert recovery.given_up == [] and recovery.errors == 0
    assert state(journal, first).state is RecordState.ACCEPTED
    assert state(journal, second).state is RecordState.RUNNING
    assert state(journal, finished).state is RecordState.DONE


def test_a_row_the_daemon_died_in_max_attempts_times_is_answered_backend_failed(journal: Journal) -> None:
    poison = accept(journal, "mqtt", "poison", runs=3)
    other = accept(journal, "mqtt", "other", runs=2)
    with capture_logs() as logs:
        recovery = asyncio.run(JobIntake(book_of(journal), "dev1", max_attempts=3).recover())
    assert [r.key for r in recovery.rerun] == [other]
    (given_up,) = recovery.given_up
    assert given_up.key == poison and given_up.state is RecordState.FAILED and given_up.error is not None
    assert given_up.error["id"] == "poison" and given_up.error["error"]["code"] == "backend_failed"
    assert "3 times" in given_up.error["error"]["message"]
    row = state(journal, poison)  # recorded, not yet answered: the MQTT transport publishes it
    assert row.state is RecordState.FAILED and row.error == given_up.error and row.attempts == 3
    assert [r.key for r in journal.unanswered()] == [poison]
    assert [e["key"] for e in logs if e["log_level"] == "error"] == [poison]


def test_one_row_raising_does_not_stop_the_others(journal: Journal) -> None:
    class Broken(JobBook):
        async def failed(self, key: str, error: Mapping[str, Any], *, answered: bool = False) -> None:
            if key in broken:
                raise OSError("disk I/O error")
            await super().failed(key, error, answered=answered)

    socket_bad = accept(journal, "socket", "s-bad", runs=1)
    mqtt_bad = accept(journal, "mqtt", "m-bad", runs=5)
    socket_ok = accept(journal, "socket", "s-ok", runs=1)
    mqtt_ok = accept(journal, "mqtt", "m-ok", runs=1)
    mqtt_given_up = accept(journal, "mqtt", "m-given-up", runs=5)
    broken = {socket_bad, mqtt_bad}
    with capture_logs() as logs:
        recovery = asyncio.run(JobIntake(Broken(journal, content=False), "dev1").recover())
    assert recovery.errors == 2 and recovery.closed_failed == 1
    assert [r.key for r in recovery.rerun] == [mqtt_ok]
    assert [r.key for r in recovery.given_up] == [mqtt_given_up]
    assert state(journal, socket_ok).state is RecordState.ANSWERED
    assert state(journal, socket_bad).state is RecordState.RUNNING  # left for the next start
    assert state(journal, mqtt_bad).state is RecordState.RUNNING
    errors = [e for e in logs if e["log_level"] == "error" and "disk I/O" in e.get("error", "")]
    assert sorted(e["key"] for e in errors) == sorted(broken)


# -- a job's way through the journal ----------------------------------------------------------------


def result(job_id: str) -> JobResult:
    timings = compute_timings(Clock(submitted=0.0), prompt_tokens=3, cache_n=0, predicted_n=1)
    usage = Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4)
    return JobResult(
        id=job_id,
        model="m",
        created=0,
        content="four",
        reasoning_content=None,
        finish_reason="stop",
        usage=usage,
        timings=timings,
    )


@pytest.mark.parametrize("content", [False, True])
def test_a_socket_job_is_journaled_and_closed_by_the_intake(journal: Journal, content: bool) -> None:
    intake = JobIntake(book_of(journal, content=content), "dev1")
    request = JobRequest(prompt="2+2?", max_tokens=4)
    ticket = asyncio.run(intake.accept_local(request, "sock-1", "socket", "socket:uid=1000"))
    assert ticket is not None and not ticket.requeued
    row = state(journal, ticket.key)
    assert row.state is RecordState.ACCEPTED and row.origin == "socket" and row.job_id == "sock-1"
    assert row.payload == (request.model_dump_json(exclude_none=True).encode() if content else b"")
    intake.running(ticket)
    assert state(journal, ticket.key).state is RecordState.RUNNING
    intake.ended(ticket, "sock-1", result("sock-1"), None)
    closed = state(journal, ticket.key)
    assert closed.state is RecordState.ANSWERED and closed.answer is not None
    assert closed.answer["status"] == "done" and closed.answer["content"] == ("four" if content else None)
    with pytest.raises(InvalidRequest, match="already used"):
        asyncio.run(intake.accept_local(request, "sock-1", "socket", "socket:uid=1000"))


def test_a_socket_job_that_fails_or_does_not_start_is_closed_with_its_error(journal: Journal) -> None:
    intake = JobIntake(book_of(journal), "dev1")
    request = JobRequest(prompt="hi")
    full = asyncio.run(intake.accept_local(request, "full", "tcp:webui", "tcp:webui"))
    stopped = asyncio.run(intake.accept_local(request, "stopped", "socket", "socket"))
    assert full is not None and stopped is not None
    intake.not_started(full, "full", QueueFull("the queue is full"))
    intake.running(stopped)
    intake.ended(stopped, "stopped", None, ShuttingDown("edged is shutting down"))
    for ticket, code in ((full, "queue_full"), (stopped, "cancelled")):
        row = state(journal, ticket.key)
        assert row.state is RecordState.ANSWERED and row.error is not None, row
        assert row.error["error"]["code"] == code, row.error


def test_socket_jobs_are_not_journaled_with_journal_socket_off(journal: Journal) -> None:
    intake = JobIntake(book_of(journal), "dev1", local=False)
    assert asyncio.run(intake.accept_local(JobRequest(prompt="hi"), "s", "socket", "socket")) is None
    assert journal.recent() == []


def test_an_mqtt_job_is_counted_released_and_settled_by_its_transport(journal: Journal) -> None:
    intake = JobIntake(book_of(journal), "dev1")
    entry = JournalEntry(origin="mqtt", payload=b"hi", job_id="m", response_topic="lab/a", owner="lab/a")
    accepted = asyncio.run(intake.accept(entry))
    ticket = Ticket.of(accepted.record)
    assert accepted.new and ticket.requeued and ticket.key == entry.key
    asyncio.run(intake.attempt(ticket))
    assert state(journal, ticket.key).attempts == 1
    intake.not_started(ticket, "m", NotReady("edged is stopping"))  # not a start it died in
    assert (state(journal, ticket.key).state, state(journal, ticket.key).attempts) == (
        RecordState.ACCEPTED,
        0,
    )
    asyncio.run(intake.attempt(ticket))
    intake.running(ticket)  # counted by attempt already
    intake.ended(ticket, "m", None, ShuttingDown("edged is shutting down"))  # runs at the next start
    assert (state(journal, ticket.key).state, state(journal, ticket.key).attempts) == (
        RecordState.ACCEPTED,
        0,
    )
    asyncio.run(intake.attempt(ticket))
    intake.ended(ticket, "m", None, Cancelled("cancelled over MQTT"))  # the transport's to settle
    intake.ended(ticket, "m", result("m"), None)
    assert state(journal, ticket.key).state is RecordState.RUNNING
    message = {"id": "m", "status": "error", "error": {"code": "cancelled"}}
    asyncio.run(intake.settle(ticket.key, message))
    settled = state(journal, ticket.key)
    assert settled.state is RecordState.FAILED and settled.error == message and settled.attempts == 1
    intake.answered(ticket.key)  # its PUBACK
    assert state(journal, ticket.key).state is RecordState.ANSWERED
    duplicate = asyncio.run(intake.accept(entry))
    assert not duplicate.new and duplicate.record.error == message


def test_settle_records_a_done_message_as_done() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str, bool]] = []

        async def done(self, key: str, answer: Mapping[str, Any], *, answered: bool = False) -> None:
            self.calls.append(("done", key, answered))

        async def failed(self, key: str, error: Mapping[str, Any], *, answered: bool = False) -> None:
            self.calls.append(("failed", key, answered))

    book = Recorder()
    intake = JobIntake(book, "dev1")  # type: ignore[arg-type]
    asyncio.run(intake.settle("a", {"status": "done"}))
    asyncio.run(intake.settle("b", {"status": "error"}, answered=True))
    assert book.calls == [("done", "a", False), ("failed", "b", True)]


def test_a_ticket_says_whether_its_origin_is_run_again() -> None:
    assert Ticket.of(record("k", "mqtt", RecordState.ACCEPTED)) == Ticket("k", requeued=True)
    for origin in ("socket", "tcp:webui", ""):
        assert not Ticket.of(record("k", origin, RecordState.ACCEPTED)).requeued
