"""What the engine counts: outcomes, token totals, the rolling throughput window, the last job.

Updated on the event loop's thread only (the scheduler hands finished jobs over), read through
`EngineSnapshot`.
"""

from __future__ import annotations

import time
from typing import Any

from edged.engine.job import Job, JobResult, JobState
from edged.telemetry.histogram import job_histograms
from edged.telemetry.throughput import JobSample, ThroughputWindow


class EngineStats:
    def __init__(self, horizon_s: float) -> None:
        self.throughput = ThroughputWindow(horizon_s)
        self.counters = {"done": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self.totals: dict[str, float] = {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_prompt_tokens": 0,
            "queue_wait_ms": 0.0,
        }
        self.last_job: dict[str, Any] | None = None
        self.histograms = job_histograms()

    def rejected(self) -> None:
        self.counters["rejected"] += 1
        self.throughput.add_rejected(time.monotonic())

    def failed(self, job: Job, state: JobState) -> None:
        self.counters["cancelled" if state is JobState.CANCELLED else "failed"] += 1
        self.throughput.add(
            JobSample(
                finished=time.monotonic(),
                ok=False,
                prompt_tokens=len(job.prompt.tokens),
                completion_tokens=job.completion_tokens,
                prompt_per_second=None,
                predicted_per_second=None,
                ttft_ms=None,
            )
        )

    def done(self, result: JobResult) -> None:
        timings = result.timings
        self.counters["done"] += 1
        self.totals["prompt_tokens"] += result.usage.prompt_tokens
        self.totals["completion_tokens"] += result.usage.completion_tokens
        self.totals["cached_prompt_tokens"] += timings.cache_n
        self.totals["queue_wait_ms"] += timings.queue_ms
        h = self.histograms
        h["ttft"].observe(timings.ttft_ms / 1000 if timings.ttft_ms is not None else None)
        h["decode"].observe(timings.predicted_per_second)
        h["prefill"].observe(timings.prompt_per_second)
        h["queue"].observe(timings.queue_ms / 1000)
        self.throughput.add(
            JobSample(
                finished=time.monotonic(),
                ok=True,
                prompt_tokens=result.usage.prompt_tokens,
                completion_tokens=result.usage.completion_tokens,
                prompt_per_second=timings.prompt_per_second,
                predicted_per_second=timings.predicted_per_second,
                ttft_ms=timings.ttft_ms,
                queue_ms=timings.queue_ms,
                started=time.monotonic() - timings.total_ms / 1000,
            )
        )
        self.last_job = {  # no id: telemetry goes to every reader of the broker, ids are the requesters'
            "finish_reason": result.finish_reason,
            "usage": result.usage.model_dump(),
            "timings": timings.model_dump(),
        }
