"""What a benchmark asks (`Job`), what one answer measured (`JobSample`), and what every target offers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class BenchError(Exception):
    """A target could not start or answer; the message says which and why (with its log's tail)."""


@dataclass(frozen=True)
class Job:
    """One chat completion: a single user message, greedy, exactly ``max_tokens`` generated."""

    user: str
    max_tokens: int
    ignore_eos: bool = True
    """False for a constrained answer: it ends when its grammar is complete."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """More request fields (edged's job schema: ``response_format``, ``think``)."""
    call: bool = False
    """A forced tool call (``extra`` has the tools): not streamed; the answer's call is checked."""
    reasoning_budget: int | None = None
    """Reasoning tokens before ``</think>`` is forced, in each target's own field."""


@dataclass
class JobSample:
    """Client-side times (``time.perf_counter`` seconds) and counts of one job, plus the server's own timings.

    ``t_submit`` is when the job was handed to the target (for jobs submitted together: the same
    instant), ``t_start`` when its prompt began to be processed where the client can tell (raw runs
    jobs one after another; for a server it equals ``t_submit``), ``t_first``/``t_last`` the arrival
    of the first and last generated text, ``t_done`` the end of the answer.
    """

    t_submit: float
    t_start: float
    t_first: float
    t_last: float
    t_done: float
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens processed per second of prefill: the server's timings; raw measures it.
    prefill_tok_s: float | None
    cache_n: int | None = None  # prompt tokens the target took from a prefix cache, when it says
    server_timings: dict[str, float] = field(default_factory=dict)
    call_valid: bool | None = None  # a call job: one call, well formed and valid against its tool's schema
    call_error: str | None = None  # why the call was not valid

    @property
    def ttft_ms(self) -> float:
        return (self.t_first - self.t_submit) * 1000

    @property
    def decode_tok_s(self) -> float | None:
        span = self.t_last - self.t_first
        return (self.completion_tokens - 1) / span if self.completion_tokens > 1 and span > 0 else None


class Target(Protocol):
    """Something that answers jobs: the edged daemon, raw llama-cpp-python, llama-server."""

    name: str
    notes: list[str]

    def start(self) -> float:
        """Start (load the model); the seconds until the target was ready to answer."""
        ...

    def start_again(self) -> float:
        """Stop and start again as after a crash or a deploy; the seconds until ready."""
        ...

    def run(self, jobs: list[Job]) -> list[JobSample]:
        """Submit ``jobs`` at once (or, where the target cannot, one after another) and measure each."""
        ...

    def pid(self) -> int | None:
        """The process whose memory is the target's (None: not running)."""
        ...

    def close(self) -> None: ...
