"""What the journal stores, without SQLite: an entry's key is derived from what identifies the job
(never given), and the errors a caller sees."""

from __future__ import annotations

import dataclasses

import pytest

from edged.errors import Unavailable
from edged.journal import (
    AcceptResult,
    InvalidTransition,
    JobRecord,
    JournalEntry,
    JournalUnavailable,
    RecordState,
)
from edged.journal.records import idempotency_key


def record(**fields: object) -> JobRecord:
    base: dict[str, object] = {
        "seq": 1,
        "key": "id:x",
        "origin": "mqtt",
        "state": RecordState.DONE,
        "payload": b"{}",
        "job_id": "j1",
        "response_topic": "r/a",
        "correlation": None,
        "qos": 1,
        "attempts": 1,
        "accepted_at": 1.0,
        "started_at": 2.0,
        "finished_at": 3.0,
        "answered_at": None,
        "answer": {"status": "done"},
        "error": None,
    }
    return JobRecord(**{**base, **fields})  # type: ignore[arg-type]


def test_an_entry_is_keyed_by_what_identifies_its_job() -> None:
    entry = JournalEntry(origin="mqtt", payload=b"{}", job_id="j1", response_topic="r/a", owner="r/a")
    assert entry.key == idempotency_key("j1", b"{}", "r/a", None, origin="mqtt", owner="r/a")
    redelivered = JournalEntry(origin="mqtt", payload=b"{}", job_id="j1", response_topic="r/a", owner="r/a")
    assert redelivered.key == entry.key
    assert JournalEntry(origin="mqtt", payload=b"{}", job_id="j1", owner="r/b").key != entry.key


def test_an_entry_without_an_id_is_keyed_by_its_message() -> None:
    one = JournalEntry(origin="mqtt", payload=b"hi", response_topic="r/a", correlation=b"c1", qos=1)
    assert one.key.startswith("sha256:")
    assert one.key == JournalEntry(origin="mqtt", payload=b"hi", response_topic="r/a", correlation=b"c1").key
    assert one.key != JournalEntry(origin="mqtt", payload=b"hi", response_topic="r/a", correlation=b"c2").key


def test_the_key_cannot_be_given_or_changed() -> None:
    with pytest.raises(TypeError):
        JournalEntry(origin="mqtt", payload=b"{}", key="id:mine")  # type: ignore[call-arg]
    entry = JournalEntry(origin="socket", payload=b"{}", job_id="j1", owner="uid=1000")
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.key = "id:other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        JournalEntry("mqtt", b"{}")  # type: ignore[misc]  # keywords only: a wide record


def test_an_accept_result_reads_through_to_its_record() -> None:
    found = AcceptResult(new=False, record=record(state=RecordState.ANSWERED, answer={"text": "4"}))
    assert (found.state, found.answer) == (RecordState.ANSWERED, {"text": "4"})


def test_invalid_transitions_say_what_the_row_is_and_what_was_wanted() -> None:
    missing = InvalidTransition("id:abc", None, RecordState.DONE)
    assert str(missing) == "job 'id:abc' is not in the journal; cannot mark it done"
    answered = InvalidTransition("id:abc", RecordState.ANSWERED, RecordState.RUNNING)
    assert str(answered) == "job 'id:abc' is answered; cannot mark it running"
    assert isinstance(answered, ValueError) and answered.wanted is RecordState.RUNNING


def test_a_journal_that_cannot_be_written_is_a_retryable_503() -> None:
    error = JournalUnavailable("disk full")
    assert isinstance(error, Unavailable)
    assert (error.code, error.http_status, error.retry_after) == ("storage_unavailable", 503, 1)
