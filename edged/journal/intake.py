"""`JobIntake`: the one owner of what the journal promises, "accepted means answered".

Every journal write about a job goes through here, from the engine (socket and TCP jobs) and from
the MQTT transport; the journal's policy lives in one place:

- A job is journaled before its client is told it was accepted (`accept`; `accept_local` for a
  socket or TCP job, which the engine journals when ``journal.socket`` is on).
- Its start is recorded: an MQTT job's is counted (`attempt`) before anything native touches it,
  so a job the daemon keeps dying in is recognised (``journal.max_attempts``); a socket job is only
  marked `running` (nothing runs it again). A job that did not start after all is `not_started`.
- Its answer is recorded: `settle` (MQTT: before the answer is published; ``answered`` once its
  PUBACK comes back, `answered`); a socket job's row is closed when the engine settles it
  (`ended`): its client got the answer directly.
- `recover`, at every start (MQTT or not) and before any new job is taken, deals with the rows the
  last run left open. Socket and TCP rows still ``accepted``/``running`` are closed ``failed``
  (their clients waited on a connection that died with the process), their ``done``/``failed``
  rows closed ``answered``. MQTT rows are returned to the MQTT transport: answers to publish again
  and jobs to run again, except a job the daemon already died in ``journal.max_attempts`` times,
  which is answered ``backend_failed`` instead (one poison job must not crash-loop the board).
  Each row is handled on its own: one that cannot be closed is logged and the others go on.

Which rows are run again after a restart is decided by their origin (`REQUEUED_ORIGINS`); a job
carries a `Ticket` that says so, so the engine never asks where a job came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from edged.engine.answer import done_message, error_message
from edged.errors import BackendError, EdgedError, InvalidRequest, ShuttingDown
from edged.journal.book import JobBook
from edged.journal.records import AcceptResult, JobRecord, JournalEntry, RecordState

if TYPE_CHECKING:
    from edged.engine.job import JobRequest, JobResult

log = structlog.get_logger(__name__)

REQUEUED_ORIGINS = ("mqtt",)
"""Origins whose jobs are run again after a restart (their requester waits on the broker)."""


@dataclass(frozen=True)
class Ticket:
    """A job's row in the journal, carried by the job from submit to settle."""

    key: str
    requeued: bool
    """True: its transport publishes and records the answer, and the job runs again after a restart
    (MQTT). False: its client is told directly, and its row is closed when the job settles."""

    @classmethod
    def of(cls, record: JobRecord) -> Ticket:
        return cls(record.key, record.origin in REQUEUED_ORIGINS)


@dataclass(frozen=True)
class Recovery:
    """What `JobIntake.recover` found for the MQTT transport, and what it closed itself."""

    rerun: list[JobRecord] = field(default_factory=list)
    """MQTT jobs accepted or running when the last run stopped: to run again, oldest first."""
    republish: list[JobRecord] = field(default_factory=list)
    """MQTT answers recorded but never acknowledged: to publish again, oldest first."""
    given_up: list[JobRecord] = field(default_factory=list)
    """MQTT jobs the daemon died in ``journal.max_attempts`` times: their ``backend_failed`` answer is
    recorded (``record.error``) and is to be published."""
    closed_failed: int = 0
    """Socket and TCP jobs left accepted or running, closed failed."""
    closed_answered: int = 0
    """Socket and TCP answers closed answered."""
    errors: int = 0
    """Rows that could not be handled (logged; left as they were for the next start)."""


def exhausted(record: JobRecord, max_attempts: int) -> BackendError | None:
    """The error a journaled job is answered with when the daemon died in it ``max_attempts``
    times, else None (run it again)."""
    if record.attempts < max_attempts:
        return None
    return BackendError(
        f"edged stopped {record.attempts} times while working on this job (journal.max_attempts = "
        f"{max_attempts}); it is not run again"
    )


class JobIntake:
    """The journal as the engine and the transports use it (see the module's doc)."""

    def __init__(self, book: JobBook, device_id: str, *, max_attempts: int = 3, local: bool = True) -> None:
        self.book = book
        self.device_id = device_id
        self.max_attempts = max_attempts
        """``journal.max_attempts``: starts the daemon may die in before a job is given up."""
        self.local = local
        """``journal.socket``: whether socket and TCP jobs are journaled too."""

    # -- taking a job -----------------------------------------------------------------------------

    async def accept(self, entry: JournalEntry) -> AcceptResult:
        """Journal a job before its client is told it was accepted (a key already journaled is a
        duplicate: nothing is written). Raises ``JournalUnavailable`` when it could not be committed."""
        return await self.book.accept(entry)

    async def accept_local(self, request: JobRequest, job_id: str, origin: str, owner: str) -> Ticket | None:
        """Journal a socket or TCP job before it is queued (None with ``journal.socket`` off); its
        request is kept only with ``log.content``. An id already journaled is `InvalidRequest`."""
        if not self.local:
            return None
        payload = request.model_dump_json(exclude_none=True).encode() if self.book.content else b""
        accepted = await self.accept(JournalEntry(origin=origin, payload=payload, job_id=job_id, owner=owner))
        if not accepted.new:
            raise InvalidRequest(
                f"job id {job_id!r} was already used (that job is {accepted.state.value});"
                " job ids must be unique",
                param="id",
            )
        return Ticket.of(accepted.record)

    # -- its start ------------------------------------------------------------------------------

    async def attempt(self, ticket: Ticket) -> None:
        """Count a start of a job that runs again after a restart, committed before anything native
        touches it: if the daemon dies in it, the next start knows (``journal.max_attempts``)."""
        await self.book.attempt(ticket.key)

    def running(self, ticket: Ticket) -> None:
        """The job was queued. A socket job's row goes to ``running`` (not awaited: nothing runs it
        again); a requeued job's start was counted by `attempt` already."""
        if not ticket.requeued:
            self.book.running(ticket.key)

    def not_started(self, ticket: Ticket, job_id: str, error: EdgedError) -> None:
        """A submitted job that did not start after all (the queue filled meanwhile, the engine
        stopped). A requeued job is released: its transport submits it again or the next start runs
        it, which is not a start the daemon died in. A socket job's row is closed with the error its
        client is told."""
        if ticket.requeued:
            self.book.released(ticket.key)
        else:
            self.book.close_later(ticket.key, None, error_message(job_id, error, self.device_id))

    # -- its answer -----------------------------------------------------------------------------

    def ended(self, ticket: Ticket, job_id: str, result: JobResult | None, error: EdgedError | None) -> None:
        """The engine settled the job. A socket job's row is closed ``answered`` (its client was told
        directly; the text is kept only with ``log.content``). A requeued job's answer is its
        transport's to `settle`, except a job a graceful stop ended (``ShuttingDown``): released, it
        runs again at the next start."""
        if ticket.requeued:
            if isinstance(error, ShuttingDown):
                self.book.released(ticket.key)
            return
        if result is not None:
            answer = done_message(result, self.device_id, content=self.book.content)
            self.book.close_later(ticket.key, answer, None)
        else:
            failure = error or EdgedError("the job ended without a result")
            self.book.close_later(ticket.key, None, error_message(job_id, failure, self.device_id))

    async def settle(self, key: str, message: Mapping[str, Any], *, answered: bool = False) -> None:
        """Record a job's answer (a ``done`` or ``error`` message, as it is published) before it is
        published: a crash in between publishes it again at the next start. ``answered=True`` also
        closes the row (nobody has to be told again)."""
        if message.get("status") == "done":
            await self.book.done(key, message, answered=answered)
        else:
            await self.book.failed(key, message, answered=answered)

    def answered(self, key: str) -> None:
        """Callable from any thread (paho's): the answer's PUBACK came back."""
        self.book.answered(key)

    # -- at start -------------------------------------------------------------------------------

    async def recover(self) -> Recovery:
        """Close the socket and TCP rows the last run left open, answer the MQTT jobs given up, and
        return the MQTT rows to run again and publish again (see the module's doc). Call it once per
        start, before any job is taken. Raises ``JournalUnavailable`` if the journal cannot be read;
        a row that cannot be written is logged and the others go on."""
        pending = await self.book.pending()
        unanswered = await self.book.unanswered()
        rerun: list[JobRecord] = []
        given_up: list[JobRecord] = []
        failed = answered = errors = 0
        for record in pending:
            requeued = record.origin in REQUEUED_ORIGINS
            try:
                if not requeued:
                    await self._close_gone(record)
                    failed += 1
                elif (record_now := await self._give_up(record)) is not None:
                    given_up.append(record_now)
                else:
                    rerun.append(record)
            except Exception as exc:  # one row must not keep the others open
                errors += 1
                what = (
                    "could not recover a journaled job"
                    if requeued
                    else "could not close a journaled socket job"
                )
                log.error(what, key=record.key, error=str(exc))
        for record in unanswered:
            if record.origin in REQUEUED_ORIGINS:
                continue
            try:
                await self.book.mark_answered(record.key)
                answered += 1
            except Exception as exc:
                errors += 1
                log.error("could not close a journaled socket job", key=record.key, error=str(exc))
        if failed or answered:
            log.info(
                "journal: socket jobs left open by the last run closed", failed=failed, answered=answered
            )
        return Recovery(
            rerun=rerun,
            republish=[record for record in unanswered if record.origin in REQUEUED_ORIGINS],
            given_up=given_up,
            closed_failed=failed,
            closed_answered=answered,
            errors=errors,
        )

    async def _close_gone(self, record: JobRecord) -> None:
        failure = ShuttingDown("edged restarted before the job finished; its client had gone")
        await self.settle(record.key, error_message(record.job_id, failure, self.device_id), answered=True)

    async def _give_up(self, record: JobRecord) -> JobRecord | None:
        """A job the daemon died in ``max_attempts`` times: its ``backend_failed`` answer recorded,
        and the record as it now stands; else None (run it again)."""
        error = exhausted(record, self.max_attempts)
        if error is None:
            return None
        log.error(
            "journaled job given up: edged died while working on it",
            key=record.key,
            job_id=record.job_id,
            attempts=record.attempts,
        )
        message = error_message(record.job_id, error, self.device_id)
        await self.settle(record.key, message)
        return dataclasses.replace(record, state=RecordState.FAILED, error=message)
