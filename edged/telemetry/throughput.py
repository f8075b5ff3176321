"""Rolling throughput over finished jobs, for /status and (later) telemetry."""

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


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


class ThroughputWindow:
    """Keeps finished jobs for ``horizon_s`` and summarises any window up to that."""

    def __init__(self, horizon_s: float = 900.0) -> None:
        self._horizon = horizon_s
        self._samples: deque[JobSample] = deque()

    def add(self, sample: JobSample) -> None:
        self._samples.append(sample)
        self._trim(sample.finished)

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0].finished < now - self._horizon:
            self._samples.popleft()

    def summary(self, window_s: float, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        self._trim(now)
        recent = [s for s in self._samples if s.finished >= now - window_s]
        ok = [s for s in recent if s.ok]
        decode = [s.predicted_per_second for s in ok if s.predicted_per_second]
        median_decode = _median(decode)
        return {
            "window_s": window_s,
            "jobs_done": len(ok),
            "jobs_failed": len(recent) - len(ok),
            "prompt_tokens": sum(s.prompt_tokens for s in ok),
            "completion_tokens": sum(s.completion_tokens for s in ok),
            "prefill_tokens_per_s_p50": _median([s.prompt_per_second for s in ok if s.prompt_per_second]),
            "decode_tokens_per_s_p50": median_decode,
            "ttft_ms_p50": _median([s.ttft_ms for s in ok if s.ttft_ms is not None]),
            "s_per_1k_tokens": round(1000.0 / median_decode, 2) if median_decode else None,
        }
