"""Rolling throughput over finished jobs, for /status, /metrics and MQTT telemetry."""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class JobSample:
    finished: float
    ok: bool
    prompt_tokens: int
    completion_tokens: int
    prompt_per_second: float | None
    predicted_per_second: float | None
    ttft_ms: float | None
    queue_ms: float | None = None
    started: float | None = None
    """Monotonic time the job was submitted (for the aggregate rate over overlapping jobs)."""


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 2)


def window_label(seconds: float) -> str:
    return f"{int(seconds // 60)}m" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g}s"


class ThroughputWindow:
    """Keeps finished and rejected jobs for ``horizon_s`` and summarises any window up to that."""

    def __init__(self, horizon_s: float = 900.0) -> None:
        self._horizon = horizon_s
        self._samples: deque[JobSample] = deque()
        self._rejected: deque[float] = deque()

    def add(self, sample: JobSample) -> None:
        self._samples.append(sample)
        self._trim(sample.finished)

    def add_rejected(self, at: float) -> None:
        self._rejected.append(at)
        self._trim(at)

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0].finished < now - self._horizon:
            self._samples.popleft()
        while self._rejected and self._rejected[0] < now - self._horizon:
            self._rejected.popleft()

    def summary(self, window_s: float, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        self._trim(now)
        recent = [s for s in self._samples if s.finished >= now - window_s]
        ok = [s for s in recent if s.ok]
        decode = _median([s.predicted_per_second for s in ok if s.predicted_per_second])
        starts = [s.started for s in ok if s.started is not None]
        span = max(s.finished for s in ok) - min(starts) if starts and len(starts) == len(ok) else 0.0
        generated = sum(s.completion_tokens for s in ok)
        ttft = [s.ttft_ms for s in ok if s.ttft_ms is not None]
        return {
            "window_s": window_s,
            "jobs_done": len(ok),
            "jobs_failed": len(recent) - len(ok),
            "jobs_rejected": sum(1 for at in self._rejected if at >= now - window_s),
            "prompt_tokens": sum(s.prompt_tokens for s in ok),
            "completion_tokens": sum(s.completion_tokens for s in ok),
            "prefill_tokens_per_s_p50": _median([s.prompt_per_second for s in ok if s.prompt_per_second]),
            "decode_tokens_per_s_p50": decode,
            "ttft_ms_p50": _median(ttft),
            "ttft_ms_p95": _p95(ttft),
            "queue_wait_ms_p50": _median([s.queue_ms for s in ok if s.queue_ms is not None]),
            "s_per_1k_tokens": round(1000.0 / decode, 2) if decode else None,
            # All jobs together, from the first submission to the last end in the window: what
            # batching raises (per-job decode speed falls a little as more sequences share a step).
            "tokens_per_s": round(generated / span, 2) if span > 0 else None,
            "s_per_1k_tokens_aggregate": round(1000.0 * span / generated, 2)
            if span > 0 and generated
            else None,
        }
