"""The engine owns jobs: admission, the queue, slots, deadlines, cancel and timings.

Data flows one way: transport -> engine -> backend -> engine -> transport. The package splits as
llama.cpp's server does: `job` (the job schema, states and events), `queue` (bounded FIFO and
back-pressure), `prepare` (template, tokens, cap, sampling), `scheduler` (the slots loop on the
backend's thread), `backend_host` (loading the backend, falling back), `timings`, `stats`,
`snapshot` (the one read view) and `engine` (the facade).
"""

from edged.engine.engine import Engine
from edged.engine.job import (
    Delta,
    Failed,
    Finished,
    Job,
    JobEvent,
    JobRequest,
    JobResult,
    JobState,
    Message,
    Usage,
)
from edged.engine.snapshot import EngineSnapshot, EngineState, SlotsInfo
from edged.engine.timings import Timings

__all__ = [
    "Delta",
    "Engine",
    "EngineSnapshot",
    "EngineState",
    "Failed",
    "Finished",
    "Job",
    "JobEvent",
    "JobRequest",
    "JobResult",
    "JobState",
    "Message",
    "SlotsInfo",
    "Timings",
    "Usage",
]
