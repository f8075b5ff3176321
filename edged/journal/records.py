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

from edged.errors import StorageUnavailable


class RecordState(str, enum.Enum):
    """A journaled job's state. ``accepted`` and ``running`` are run again after a restart;
    ``done`` and ``failed`` hold an answer not yet acknowledged, so it is published again;
    ``answered`` rows are only kept for the dedup window."""

    ACCEPTED = "accepted"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    ANSWERED = "answered"


def _digest(*parts: bytes | None) -> str:
    """sha256 of ``parts``, each length-prefixed and an absent part told apart from an empty one,
    so no two different tuples can be spelled into the same byte string."""
    digest = hashlib.sha256()
    for part in parts:
        if part is None:
            digest.update(b"\x00")
        else:
            digest.update(b"\x01" + len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def idempotency_key(
    job_id: str | None,
    payload: bytes,
    response_topic: str | None,
    correlation: bytes | None,
    *,
    origin: str = "mqtt",
    owner: str = "",
) -> str:
    """The key under which a job is journaled, so a redelivery after a crash is recognised.

    A client's own job id is unique only *for that client*: the key is the id together with who sent
    it (``origin``, ``owner`` — MQTT: the topic the answer goes to; TCP: the key's name; the socket:
    the peer's uid — and the v5 correlation data), so the same id from another requester is another
    job and never gets this one's answer (``id:<sha256>``). Without an id (or with an empty one) the
    key is the sha256 of the payload, response topic and correlation data, so the broker
    redelivering the very same message maps to the same row (``sha256:<hex>``).
    """
    if job_id:
        hexdigest = _digest(origin.encode(), owner.encode(), correlation, job_id.encode())
        return f"id:{hexdigest}"
    topic = response_topic.encode() if response_topic is not None else None
    return f"sha256:{_digest(payload, topic, correlation)}"


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
    owner: str = ""
    """Who sent it, within its origin (MQTT: the reply topic; TCP: the key name; socket: the uid):
    part of the key, so job ids of different requesters never collide."""
    key: str = field(init=False)

    def __post_init__(self) -> None:
        key = idempotency_key(
            self.job_id,
            self.payload,
            self.response_topic,
            self.correlation,
            origin=self.origin,
            owner=self.owner,
        )
        object.__setattr__(self, "key", key)


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """A journaled job as read back: the entry, its state, its timings (wall-clock seconds since
    the epoch, so they mean something across restarts) and its answer or error."""

    seq: int
    """Monotonic row number, never reused: the paging cursor for ``Journal.recent(before=...)``."""
    key: str
    origin: str
    state: RecordState
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
    def state(self) -> RecordState:
        return self.record.state

    @property
    def answer(self) -> dict[str, Any] | None:
        return self.record.answer


class JournalUnavailable(StorageUnavailable):
    """The job journal cannot be opened or written (disk full, read-only, I/O error, closed).

    A job whose ``accept`` fails this way was not recorded, so it must not be acknowledged: the
    client (or the broker, by not getting its PUBACK) retries later.
    """


class InvalidTransition(ValueError):
    """A state change the journal refuses (unknown key, or e.g. ``done`` for an answered job).
    A bug in the caller, not a storage failure: nothing else in the same commit is undone."""

    def __init__(self, key: str, state: RecordState | None, wanted: RecordState) -> None:
        where = "is not in the journal" if state is None else f"is {state.value}"
        super().__init__(f"job {key!r} {where}; cannot mark it {wanted.value}")
        self.key = key
        self.state = state
        self.wanted = wanted
