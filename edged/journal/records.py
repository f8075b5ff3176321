"""What the job journal stores: the states a job goes through, the entry a transport submits, the
record a read returns, and the idempotency key that makes a redelivered job recognisable.

Kept apart from the store so transports can build entries and derive keys without importing
sqlite3 or the writer thread.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

from edged.errors import Unavailable


class JobState(str, enum.Enum):
    """A journaled job's state. ``accepted`` and ``running`` are run again after a restart;
    ``done`` and ``failed`` hold an answer not yet acknowledged, so it is published again;
    ``answered`` rows are only kept for the dedup window."""

    ACCEPTED = "accepted"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    ANSWERED = "answered"


def idempotency_key(
    job_id: str | None, payload: bytes, response_topic: str | None, correlation: bytes | None
) -> str:
    """The key under which a job is journaled, so a redelivery after a crash is recognised.

    A client's own job id is the key (``id:<job id>``): the client promised it is unique. Without
    one (or with an empty one) the key is the sha256 of the payload, response topic and correlation
    data, so the broker redelivering the very same message maps to the same row. Each part is
    length-prefixed and an absent part is told apart from an empty one, so no two different
    messages can be spelled into the same byte string.
    """
    if job_id:
        return f"id:{job_id}"
    digest = hashlib.sha256()
    topic = response_topic.encode() if response_topic is not None else None
    for part in (payload, topic, correlation):
        if part is None:
            digest.update(b"\x00")
        else:
            digest.update(b"\x01" + len(part).to_bytes(8, "big") + part)
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True, kw_only=True)
class JournalEntry:
    """A job as a transport received it, written (state ``accepted``) before the client is told
    it was accepted. ``key`` is derived, never given, so every transport keys jobs the same way."""

    origin: str
    """Which transport took the job: ``mqtt`` or ``socket`` (others may follow)."""
    payload: bytes
    """The request exactly as received, so a restart runs the same job."""
    job_id: str | None = None
    response_topic: str | None = None
    correlation: bytes | None = None
    qos: int = 0
    key: str = field(init=False)

    def __post_init__(self) -> None:
        key = idempotency_key(self.job_id, self.payload, self.response_topic, self.correlation)
        object.__setattr__(self, "key", key)


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """A journaled job as read back: the entry, its state, its timings (wall-clock seconds since
    the epoch, so they mean something across restarts) and its answer or error."""

    seq: int
    """Monotonic row number, never reused: the paging cursor for ``Journal.recent(before=...)``."""
    key: str
    origin: str
    state: JobState
    payload: bytes
    job_id: str | None
    response_topic: str | None
    correlation: bytes | None
    qos: int
    attempts: int
    """How many times the job was started; more than one means it was run again after a restart."""
    accepted_at: float
    started_at: float | None
    finished_at: float | None
    answered_at: float | None
    answer: dict[str, Any] | None
    error: dict[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class AcceptResult:
    """What ``Journal.accept`` found: a new job (run it) or a duplicate (do not run it again;
    answer from ``record.answer`` / ``record.error`` if it has finished, else let it finish)."""

    new: bool
    record: JobRecord

    @property
    def state(self) -> JobState:
        return self.record.state

    @property
    def answer(self) -> dict[str, Any] | None:
        return self.record.answer


class JournalUnavailable(Unavailable):
    """The job journal cannot be opened or written (disk full, read-only, I/O error, closed).

    A job whose ``accept`` fails this way was not recorded, so it must not be acknowledged: the
    client (or the broker, by not getting its PUBACK) retries later.
    """

    code = "storage_unavailable"


class InvalidTransition(ValueError):
    """A state change the journal refuses (unknown key, or e.g. ``done`` for an answered job).
    A bug in the caller, not a storage failure: nothing else in the same commit is undone."""

    def __init__(self, key: str, state: JobState | None, wanted: JobState) -> None:
        where = "is not in the journal" if state is None else f"is {state.value}"
        super().__init__(f"job {key!r} {where}; cannot mark it {wanted.value}")
        self.key = key
        self.state = state
        self.wanted = wanted
