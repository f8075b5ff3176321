"""What a start does with the rows the last run left open (`edged.journal.intake`), against a
stand-in book: socket and TCP rows are closed, MQTT rows left to the MQTT transport, one row that
cannot be closed does not keep the others open, and a job the daemon died in too often is failed."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from structlog.testing import capture_logs

from edged.errors import BackendError
from edged.journal import JobRecord, RecordState
from edged.journal.intake import close_local_rows, exhausted


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


def test_socket_and_tcp_rows_are_closed_and_mqtt_rows_left_to_run_again() -> None:
    book = Book(
        pending=[
            record("s1", "socket", RecordState.RUNNING),
            record("m1", "mqtt", RecordState.ACCEPTED),
            record("t1", "tcp:kitchen", RecordState.ACCEPTED),
        ],
        unanswered=[record("s2", "socket", RecordState.DONE), record("m2", "mqtt", RecordState.FAILED)],
    )
    closed = asyncio.run(close_local_rows(book, "dev1"))  # type: ignore[arg-type]
    assert (closed.failed, closed.answered, closed.errors) == (2, 1, 0)
    assert [(key, answered) for key, _, answered in book.failed_rows] == [("s1", True), ("t1", True)]
    assert book.answered_rows == ["s2"]
    message = book.failed_rows[0][1]
    assert message["id"] == "job-s1" and message["device_id"] == "dev1" and message["status"] == "error"
    assert message["error"]["code"] == "cancelled" and "restarted" in message["error"]["message"]


def test_one_row_that_cannot_be_closed_does_not_keep_the_others_open() -> None:
    book = Book(
        pending=[record("bad", "socket", RecordState.RUNNING), record("ok", "socket", RecordState.RUNNING)],
        unanswered=[record("bad", "socket", RecordState.DONE), record("ok2", "socket", RecordState.FAILED)],
        broken="bad",
    )
    with capture_logs() as logs:
        closed = asyncio.run(close_local_rows(book, "dev1"))  # type: ignore[arg-type]
    assert (closed.failed, closed.answered, closed.errors) == (1, 1, 2)
    assert [k for k, _, _ in book.failed_rows] == ["ok"] and book.answered_rows == ["ok2"]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["key"] for e in errors] == ["bad", "bad"] and all("disk I/O" in e["error"] for e in errors)


def test_nothing_left_open_is_nothing_to_say() -> None:
    book = Book(pending=[record("m1", "mqtt", RecordState.RUNNING)], unanswered=[])
    with capture_logs() as logs:
        closed = asyncio.run(close_local_rows(book, "dev1"))  # type: ignore[arg-type]
    assert (closed.failed, closed.answered, closed.errors) == (0, 0, 0)
    assert logs == [] and book.failed_rows == []


def test_a_job_is_run_again_until_the_daemon_died_in_it_max_attempts_times() -> None:
    assert exhausted(record("k", "mqtt", RecordState.RUNNING, attempts=0), 3) is None
    assert exhausted(record("k", "mqtt", RecordState.RUNNING, attempts=2), 3) is None
    error = exhausted(record("k", "mqtt", RecordState.RUNNING, attempts=3), 3)
    assert isinstance(error, BackendError) and error.code == "backend_failed"
    assert "stopped 3 times" in error.message and "journal.max_attempts = 3" in error.message
    assert exhausted(record("k", "mqtt", RecordState.RUNNING, attempts=7), 3) is not None
