"""The journal as the event loop uses it: every write awaited without blocking the loop (the writer
thread commits; ``asyncio.wrap_future`` waits for the COMMIT), reads run on a worker thread, and
background writes whose outcome nobody waits for are still logged when they fail."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import structlog

from edged.journal.records import AcceptResult, JobRecord, JournalEntry
from edged.journal.store import Journal

log = structlog.get_logger(__name__)


def _log_failure(future: Future[Any], what: str, key: str) -> None:
    def check(done: Future[Any]) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:
            log.error("job journal write failed", write=what, key=key, error=str(error))

    future.add_done_callback(check)


class JobBook:
    """Awaitable journal writes and reads. Writes go through `edged.journal.intake.JobIntake`,
    which holds the journal's policy; ``/v1/jobs`` reads here."""

    def __init__(self, journal: Journal, *, content: bool) -> None:
        self.journal = journal
        self.content = content
        """``log.content``: whether socket jobs' prompts and answers are kept (MQTT jobs always are:
        a restart must be able to run them again and publish their answers)."""

    async def accept(self, entry: JournalEntry) -> AcceptResult:
        """Raises ``JournalUnavailable`` when the entry could not be committed."""
        return await asyncio.wrap_future(self.journal.accept(entry))

    async def done(self, key: str, answer: Mapping[str, Any], *, answered: bool = False) -> None:
        await asyncio.wrap_future(self.journal.mark_done(key, answer, answered=answered))

    async def failed(self, key: str, error: Mapping[str, Any], *, answered: bool = False) -> None:
        await asyncio.wrap_future(self.journal.mark_failed(key, error, answered=answered))

    def running(self, key: str) -> None:
        """Not awaited: ``accepted`` and ``running`` both mean "run again after a restart"."""
        _log_failure(self.journal.mark_running(key), "running", key)

    async def attempt(self, key: str) -> None:
        """Count a start of a job that runs again after a restart, committed before anything native
        touches it: if the daemon dies in it, the next start knows (``journal.max_attempts``)."""
        await asyncio.wrap_future(self.journal.mark_running(key))

    def released(self, key: str) -> None:
        """Not awaited (committed before the journal closes): a graceful stop left the job to the
        next start, which does not count as a start the daemon died in."""
        _log_failure(self.journal.mark_released(key), "released", key)

    async def mark_answered(self, key: str) -> None:
        await asyncio.wrap_future(self.journal.mark_answered(key))

    def answered(self, key: str) -> None:
        """Callable from any thread (paho's): the answer's PUBACK came back."""
        _log_failure(self.journal.mark_answered(key), "answered", key)

    def close_later(
        self, key: str, answer: Mapping[str, Any] | None, error: Mapping[str, Any] | None
    ) -> None:
        """Close a row nobody has to be told about again (a socket job: its client got the answer)."""
        if answer is not None:
            future = self.journal.mark_done(key, answer, answered=True)
        else:
            future = self.journal.mark_failed(key, error or {}, answered=True)
        _log_failure(future, "close", key)

    async def pending(self) -> list[JobRecord]:
        return await asyncio.to_thread(self.journal.pending)

    async def unanswered(self) -> list[JobRecord]:
        return await asyncio.to_thread(self.journal.unanswered)

    async def recent(
        self, limit: int, *, before: int | None = None, origin: str | None = None
    ) -> list[JobRecord]:
        return await asyncio.to_thread(self.journal.recent, limit, before=before, origin=origin)

    async def find(self, job_id: str, *, origin: str | None = None) -> JobRecord | None:
        return await asyncio.to_thread(self.journal.find, job_id, origin=origin)
