"""Per-job distributions as Prometheus histograms: cumulative bucket counts, sum and count, so
quantiles can be aggregated across a fleet in PromQL (``histogram_quantile`` over ``sum by (le)``),
which per-device p50 gauges cannot be."""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field

from prometheus_client.core import HistogramMetricFamily


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

    def family(self) -> HistogramMetricFamily:
        buckets, total = self.cumulative()
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=total)

    def snapshot(self) -> dict[str, object]:
        """The JSON form carried in MQTT telemetry."""
        buckets, total = self.cumulative()
        return {"buckets": [list(b) for b in buckets], "sum": round(total, 6), "count": buckets[-1][1]}


def _le(bound: float) -> str:
    return f"{bound:g}"


def job_histograms() -> dict[str, Histogram]:
    """The histograms the engine fills with one observation per finished job."""
    return {
        "ttft": Histogram(
            "edged_ttft_seconds",
            "Submission to first token, per job (queue + prefill)",
            (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
        ),
        "decode": Histogram(
            "edged_decode_tokens_per_second",
            "Decode speed after the first token, per job",
            (1, 2, 4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 60, 100, 200),
        ),
        "prefill": Histogram(
            "edged_prefill_tokens_per_second",
            "Prefill speed, per job",
            (5, 10, 20, 50, 100, 200, 500, 1000, 2000),
        ),
        "queue": Histogram(
            "edged_queue_wait_seconds",
            "Time waiting for a slot, per job",
            (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
        ),
    }
