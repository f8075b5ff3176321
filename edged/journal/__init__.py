"""The durable job journal: "nothing accepted is ever lost".

A job is journaled (``accepted``) before its client is told it was accepted, moves through
``running`` to ``done`` / ``failed`` with its answer, and to ``answered`` once that answer was
acknowledged. At start, ``pending()`` jobs are run again and ``unanswered()`` answers published again;
the idempotency key makes a redelivery after a crash answered once, never generated twice.
`edged.journal.intake.JobIntake` is how the daemon, the engine and the MQTT transport use it.
"""

from edged.journal.records import AcceptResult, JobRecord, JournalEntry, RecordState, idempotency_key
from edged.journal.store import SCHEMA_VERSION, InvalidTransition, Journal, JournalUnavailable

__all__ = [
    "SCHEMA_VERSION",
    "AcceptResult",
    "InvalidTransition",
    "JobRecord",
    "Journal",
    "JournalEntry",
    "JournalUnavailable",
    "RecordState",
    "idempotency_key",
]
