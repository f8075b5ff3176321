"""Per-job timings, named as llama.cpp server's ``timings`` (``result_timings``) plus edged's own."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field


class Timings(BaseModel):
    """Per-job timings, named as llama.cpp server's ``timings`` plus edged's own fields."""

    cache_n: int = Field(0, description="Prompt tokens taken from the prefix cache instead of computed.")
    prompt_n: int = Field(description="Prompt tokens evaluated (not counting cache_n).")
    prompt_ms: float = Field(description="Prefill time: the job's start in a slot to its first token.")
    prompt_per_token_ms: float | None = Field(description="prompt_ms / prompt_n.")
    prompt_per_second: float | None = Field(description="Prefill speed, tokens/s.")
    predicted_n: int = Field(description="Generated tokens.")
    predicted_ms: float = Field(description="First to last generated token.")
    predicted_per_token_ms: float | None = Field(description="Decode time per token after the first.")
    predicted_per_second: float | None = Field(description="Decode speed, tokens/s after the first token.")
    queue_ms: float = Field(description="Time waiting for a slot.")
    ttft_ms: float | None = Field(description="Submission to first token (queue + prefill).")
    total_ms: float = Field(description="Submission to the end of the job.")
    s_per_1k_tokens: float | None = Field(description="Seconds 1000 generated tokens take at this speed.")
    batch_size_avg: float | None = Field(
        None, description="Sequences decoded together, averaged over this job's decode steps."
    )
    source: str = Field("wall-clock", description="wall-clock, or runtime-perf (the NPU runtime's counters).")
    trimmed_messages: int = Field(
        0,
        description="The conversation's oldest messages dropped to fit the context (context_overflow: "
        "trim_history); 0 when it fit whole.",
    )


@dataclass
class Clock:
    """Wall-clock marks of one job (``time.perf_counter`` seconds)."""

    submitted: float
    started: float | None = None
    """Admitted into a slot."""
    first: float | None = None
    """First generated token."""
    ended: float | None = None
    batch_sum: int = 0
    batch_steps: int = 0


def compute_timings(
    clock: Clock,
    *,
    prompt_tokens: int,
    cache_n: int,
    predicted_n: int,
    perf: dict[str, float] | None = None,
    trimmed_messages: int = 0,
) -> Timings:
    """Wall-clock timings, or the runtime's own perf counters where the backend reports them."""
    end = clock.ended if clock.ended is not None else clock.submitted
    start = clock.started if clock.started is not None else end
    first = clock.first
    evaluated = max(0, prompt_tokens - cache_n)
    prefill_end = first if first is not None else end
    prompt_ms = (prefill_end - start) * 1000
    predicted_ms = (end - prefill_end) * 1000 if first is not None else 0.0
    n = predicted_n
    decode_per_s = (n - 1) / (predicted_ms / 1000) if n > 1 and predicted_ms > 0 else None
    source = "wall-clock"
    if perf and perf.get("generate_ms", 0) > 0:
        prompt_ms, predicted_ms, source = perf["prefill_ms"], perf["generate_ms"], "runtime-perf"
        decode_per_s = perf["generate_tokens"] / (predicted_ms / 1000)
    return Timings(
        cache_n=cache_n,
        prompt_n=evaluated,
        prompt_ms=round(prompt_ms, 2),
        prompt_per_token_ms=round(prompt_ms / evaluated, 3) if evaluated else None,
        prompt_per_second=round(evaluated / (prompt_ms / 1000), 2) if prompt_ms > 0 and evaluated else None,
        predicted_n=n,
        predicted_ms=round(predicted_ms, 2),
        predicted_per_token_ms=round(predicted_ms / (n - 1), 3) if n > 1 else None,
        predicted_per_second=round(decode_per_s, 2) if decode_per_s else None,
        queue_ms=round((start - clock.submitted) * 1000, 2),
        ttft_ms=round((first - clock.submitted) * 1000, 2) if first is not None else None,
        total_ms=round((end - clock.submitted) * 1000, 2),
        s_per_1k_tokens=round(1000 / decode_per_s, 2) if decode_per_s else None,
        batch_size_avg=round(clock.batch_sum / clock.batch_steps, 2) if clock.batch_steps else None,
        source=source,
        trimmed_messages=trimmed_messages,
    )
