"""One consistent view of the engine for everything that reports on it.

/status, /v1/models, /health, MQTT telemetry and presence, and Prometheus all read an
`EngineSnapshot`, never the engine's backend or counters directly, so they agree with each other and
follow a backend switch (a fallback after a failure) the moment it happens.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from edged.backends.base import CacheStats, ModelFacts
from edged.telemetry.histogram import HistogramReading
from edged.wire import EngineStatus, JobInfo


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


@dataclass(frozen=True)
class SlotsInfo:
    total: int
    """Sequences the backend decodes together."""
    effective: int
    """Slots in use under the thermal governor (fewer while derated, none while paused)."""
    active: int


@dataclass(frozen=True)
class EngineSnapshot:
    state: EngineState
    backend: str
    model: str
    n_ctx: int
    fallback_reasons: list[str]
    load_error: str | None
    backend_details: dict[str, object]
    slots: SlotsInfo
    queue_depth: int
    queue_max_depth: int
    running: list[JobInfo]
    counters: dict[str, int]
    totals: dict[str, float]
    thermal: dict[str, Any]
    last_job: dict[str, Any] | None
    throughput: dict[str, dict[str, object]]
    prefix_cache: CacheStats | None
    """None for a backend without one, or before the model is loaded."""
    started_wall: float
    structured_output: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``available`` (JSON schemas, grammars, reasoning budgets) and ``reason`` when not."""
    profile: str = ""
    """The board profile's name."""
    histograms: tuple[HistogramReading, ...] = ()
    """The per-job histograms (cumulative since start), for /metrics and telemetry."""
    model_facts: ModelFacts | None = None
    """What the backend knows of its model: only its file format until it has loaded."""

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    def engine_status(self) -> EngineStatus:
        """The ``engine`` part of /status."""
        return EngineStatus(
            state=self.state.value,
            backend=self.backend,
            fallback_reasons=list(self.fallback_reasons),
            load_error=self.load_error,
            slots=dataclasses.asdict(self.slots),
            queue={"depth": self.queue_depth, "max_depth": self.queue_max_depth},
            running=self.running,
            jobs=dict(self.counters),
            totals=dict(self.totals),
            thermal=self.thermal,
            prefix_cache=dataclasses.asdict(self.prefix_cache) if self.prefix_cache is not None else None,
            structured_output=self.structured_output,
            last_job=self.last_job,
            throughput=self.throughput,
        )

    def status(self) -> dict[str, Any]:
        """The ``engine`` part of /status, as JSON."""
        return self.engine_status().dump()
