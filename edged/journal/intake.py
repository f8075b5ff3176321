"""What a start does with the rows the last run left open, on every start (MQTT or not).

- Socket and TCP rows still ``accepted``/``running`` are closed ``failed``: their clients waited on
  a connection that died with the process, so nobody is left to run them for.
- Their ``done``/``failed`` rows are closed ``answered``: those clients got (or lost) the answer
  directly; there is nothing to publish again.
- MQTT rows are left to the MQTT transport, which runs them again and republishes their answers,
  except a job the daemon has already died in ``journal.max_attempts`` times: `exhausted` tells the
  transport to answer it ``backend_failed`` instead (one poison job must not crash-loop the board).

Each row is handled on its own: one that cannot be closed is logged and the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from edged.engine.answer import error_message
from edged.errors import BackendError, ShuttingDown
from edged.journal.book import JobBook
from edged.journal.records import JobRecord

log = structlog.get_logger(__name__)

REQUEUED_ORIGINS = ("mqtt",)
"""Origins whose jobs are run again after a restart (their requester waits on the broker)."""


@dataclass(frozen=True)
class LocalClosed:
    failed: int
    answered: int
    errors: int


async def close_local_rows(book: JobBook, device_id: str) -> LocalClosed:
    """Close the socket and TCP rows a previous run left open (see the module's doc)."""
    failed = answered = errors = 0
    for record in await book.pending():
        if record.origin in REQUEUED_ORIGINS:
            continue
        failure = ShuttingDown("edged restarted before the job finished; its client had gone")
        try:
            await book.failed(record.key, error_message(record.job_id, failure, device_id), answered=True)
            failed += 1
        except Exception as exc:  # one row must not keep the others open
            errors += 1
            log.error("could not close a journaled socket job", key=record.key, error=str(exc))
    for record in await book.unanswered():
        if record.origin in REQUEUED_ORIGINS:
            continue
        try:
            await book.mark_answered(record.key)
            answered += 1
        except Exception as exc:
            errors += 1
            log.error("could not close a journaled socket job", key=record.key, error=str(exc))
    if failed or answered or errors:
        log.info("journal: socket jobs left open by the last run closed", failed=failed, answered=answered)
    return LocalClosed(failed=failed, answered=answered, errors=errors)


def exhausted(record: JobRecord, max_attempts: int) -> BackendError | None:
    """The error a journaled job is answered with when the daemon died in it ``max_attempts``
    times, else None (run it again)."""
    if record.attempts < max_attempts:
        return None
    return BackendError(
        f"edged stopped {record.attempts} times while working on this job (journal.max_attempts = "
        f"{max_attempts}); it is not run again"
    )
