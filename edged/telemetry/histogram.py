"""Per-job distributions as Prometheus histograms: cumulative bucket counts, sum and count, so
quantiles can be aggregated across a fleet in PromQL (``histogram_quantile`` over ``sum by (le)``),
which per-device p50 gauges cannot be."""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field

from prometheus_client.core import HistogramMetricFamily

from edged.telemetry.catalogue import JOB_HISTOGRAMS


@dataclass
class Histogram:
    name: str
    doc: str
    bounds: tuple[float, ...]
    """Upper bounds of the buckets, ascending; +Inf is implied."""
    _counts: list[int] = field(default_factory=list)
    _sum: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float | None) -> None:
        if value is None or math.isnan(value):
            return
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """``[(le, count of observations <= le)...]`` ending with ``+Inf``, and the sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets, running = [], 0
        for bound, count in zip((*map(_le, self.bounds), "+Inf"), counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets, total

    def reading(self) -> HistogramReading:
        buckets, total = self.cumulative()
        return HistogramReading(self.name, self.doc, tuple(buckets), total)


def _le(bound: float) -> str:
    return f"{bound:g}"


@dataclass(frozen=True)
class HistogramReading:
    """A histogram's cumulative counts at one moment (what `EngineSnapshot` carries)."""

    name: str
    doc: str
    buckets: tuple[tuple[str, int], ...]
    """``(le, count of observations <= le)``, ending with ``+Inf``."""
    sum: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1]

    def family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.doc, buckets=list(self.buckets), sum_value=self.sum)

    def document(self) -> dict[str, object]:
        """The JSON form carried in MQTT telemetry."""
        return {"buckets": [list(b) for b in self.buckets], "sum": round(self.sum, 6), "count": self.count}


def job_histograms() -> dict[str, Histogram]:
    """The histograms the engine fills with one observation per finished job (edged.telemetry.catalogue)."""
    return {key: Histogram(spec.name, spec.help, spec.buckets) for key, spec in JOB_HISTOGRAMS.items()}
