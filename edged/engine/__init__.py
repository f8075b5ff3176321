"""The engine owns jobs: admission, the queue, slots, deadlines, cancel and timings.

Data flows one way: transport -> engine -> backend -> engine -> transport. The package splits as
llama.cpp's server does: `job` (the job schema, states and events), `queue` (bounded FIFO and
back-pressure), `prepare` (template, tokens, cap, sampling), `scheduler` (the slots loop on the
backend's thread), `backend_host` (loading the backend, falling back), `timings`, `stats`,
`snapshot` (the one read view) and `engine` (the facade).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edged.engine.engine import Engine
    from edged.engine.job import (
        CallPiece,
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

_HOMES = {
    "Engine": "edged.engine.engine",
    **dict.fromkeys(
        (
            "CallPiece",
            "Delta",
            "Failed",
            "Finished",
            "Job",
            "JobEvent",
            "JobRequest",
            "JobResult",
            "JobState",
            "Message",
        ),
        "edged.engine.job",
    ),
    "Usage": "edged.engine.job",
    **dict.fromkeys(("EngineSnapshot", "EngineState", "SlotsInfo"), "edged.engine.snapshot"),
    "Timings": "edged.engine.timings",
}


def __getattr__(name: str) -> Any:
    """The names above, imported when first asked for: importing a submodule (``edged.engine.bounds``
    from ``edged.tools``) must not import the whole engine, which imports ``edged.tools`` back."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "CallPiece",
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
