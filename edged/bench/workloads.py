"""The workloads: which jobs each run submits, and which figures it makes of their samples.

A workload run is a list of steps; a step's jobs are submitted together, steps one after another. Every
target gets the very same prompts in a run; each run has prompts of its own (a new tag), so a prefix
cache never serves one run from another.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from edged.bench.jobs import Job, JobSample
from edged.bench.prompts import ChatTokenizer, document, question
from edged.bench.tools import QUESTIONS as TOOL_QUESTIONS
from edged.bench.tools import TOOLS, reasoning_budget

SEEDS_PROMPT_TOKENS = 128
SHARED_PREFIX_TOKENS = 400


@dataclass(frozen=True)
class Step:
    jobs: list[Job]
    restart_first: bool = False  # restart the daemon before this step (edged only; others skip the step)
    edged_only: bool = False  # an edged feature (others skip the step)
    servers_only: bool = False  # raw llama-cpp-python has no equivalent (it skips the step)


@dataclass(frozen=True)
class Options:
    concurrency: int
    max_tokens: int | None  # overrides every workload's own count
    restart: bool


Samples = list[list[JobSample] | None]  # per step; None: the target skipped the step


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    tokens: int  # generated tokens per job unless --max-tokens
    plan: Callable[[ChatTokenizer, int, Options, int], list[Step]]  # tokenizer, run, options, tokens
    figures: Callable[[Samples], dict[str, float]]
    concurrent: bool = False  # submits several jobs at once (edged and llama-server then get slots)
    calls: bool = False  # forced tool calls: llama-server needs --jinja; ratios are paired per run

    def steps(self, tokenizer: ChatTokenizer, run: int, options: Options) -> list[Step]:
        tokens = options.max_tokens or self.tokens
        return self.plan(tokenizer, run, options, tokens)


def basic_figures(samples: list[JobSample]) -> dict[str, float]:
    """The figures of jobs submitted together: TTFT p50, mean per-job speeds, the batch's aggregate."""
    out: dict[str, float] = {
        "ttft_ms": statistics.median(s.ttft_ms for s in samples),
        "prompt_tokens": statistics.fmean(s.prompt_tokens for s in samples),
    }
    prefill = [s.prefill_tok_s for s in samples if s.prefill_tok_s is not None]
    if prefill:
        out["prefill_tok_s"] = statistics.fmean(prefill)
    decode = [d for d in (s.decode_tok_s for s in samples) if d is not None]
    if decode:
        out["decode_tok_s"] = statistics.fmean(decode)
    generated = sum(s.completion_tokens for s in samples)
    wall = max(s.t_done for s in samples) - min(s.t_submit for s in samples)
    if generated and wall > 0:
        out["aggregate_tok_s"] = generated / wall
        out["s_per_1k_tokens"] = 1000 * wall / generated
    cached = [s.cache_n for s in samples if s.cache_n is not None]
    if cached:
        out["cache_n"] = statistics.fmean(cached)
    return out


def _first_step(samples: Samples) -> dict[str, float]:
    first = samples[0]
    assert first is not None
    return basic_figures(first)


def _single(tokens_in: int, tag: str) -> Callable[[ChatTokenizer, int, Options, int], list[Step]]:
    def plan(tokenizer: ChatTokenizer, run: int, options: Options, tokens: int) -> list[Step]:
        return [Step([Job(document(tokenizer, f"{tag}-{run}", tokens_in), tokens)])]

    return plan


def _concurrent(tokenizer: ChatTokenizer, run: int, options: Options, tokens: int) -> list[Step]:
    jobs = [
        Job(document(tokenizer, f"concurrent-{run}-{j}", SEEDS_PROMPT_TOKENS), tokens)
        for j in range(options.concurrency)
    ]
    return [Step(jobs)]


def _shared_prefix(tokenizer: ChatTokenizer, run: int, options: Options, tokens: int) -> list[Step]:
    prefix = document(tokenizer, f"shared-{run}", SHARED_PREFIX_TOKENS)
    return [Step([Job(f"{prefix}\n\n{question(j)}", tokens) for j in range(options.concurrency)])]


def _prefix_repeat(tokenizer: ChatTokenizer, run: int, options: Options, tokens: int) -> list[Step]:
    prefix = document(tokenizer, f"repeat-{run}", SHARED_PREFIX_TOKENS)
    steps = [Step([Job(f"{prefix}\n\n{question(i)}", tokens)]) for i in range(2)]
    if options.restart:
        steps.append(Step([Job(f"{prefix}\n\n{question(2)}", tokens)], restart_first=True))
    return steps


def _prefix_repeat_figures(samples: Samples) -> dict[str, float]:
    cold, warm = samples[0], samples[1]
    assert cold is not None and warm is not None
    out = {"ttft_cold_ms": cold[0].ttft_ms, "ttft_warm_ms": warm[0].ttft_ms}
    out["warm_over_cold"] = out["ttft_warm_ms"] / out["ttft_cold_ms"]
    if warm[0].cache_n is not None:
        out["cache_n"] = float(warm[0].cache_n)
    restarted = samples[2] if len(samples) > 2 else None
    if restarted is not None:
        out["ttft_restart_ms"] = restarted[0].ttft_ms
        out["restart_over_cold"] = out["ttft_restart_ms"] / out["ttft_cold_ms"]
    return out


SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "readings",
        "schema": {
            "type": "object",
            "properties": {
                "readings": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "sensor": {"type": "string", "pattern": "^[A-Za-z0-9 ._-]{1,12}$"},
                            "celsius": {"type": "integer"},
                            "ok": {"type": "boolean"},
                        },
                        "required": ["sensor", "celsius", "ok"],
                    },
                    "minItems": 8,
                    "maxItems": 8,
                }
            },
            "required": ["readings"],
        },
    },
}
"""Every field bounded: any model (random weights too) completes it, in about 150-350 tokens. Strings
are printable ASCII: a model with random weights emits raw byte tokens that llama.cpp's grammar takes
as characters but UTF-8 does not (edged then answers invalid_output, as it must)."""


def _schema(tokenizer: ChatTokenizer, run: int, options: Options, tokens: int) -> list[Step]:
    prompt = document(tokenizer, f"schema-{run}", SEEDS_PROMPT_TOKENS) + "\n\nList eight sensor readings."
    plain = Job(prompt, tokens, extra={"think": False})
    schema = {"think": False, "response_format": SCHEMA_FORMAT}
    constrained = Job(prompt, 2 * tokens, ignore_eos=False, extra=schema)
    return [Step([plain], edged_only=True), Step([constrained], edged_only=True)]


def _schema_figures(samples: Samples) -> dict[str, float]:
    plain, constrained = samples[0], samples[1]
    if plain is None or constrained is None:
        return {}
    out: dict[str, float] = {}
    free, bound = plain[0].decode_tok_s, constrained[0].decode_tok_s
    if free is not None and bound is not None:
        out.update(decode_tok_s=free, decode_schema_tok_s=bound, schema_over_plain=bound / free)
    out["schema_tokens"] = float(constrained[0].completion_tokens)
    return out


TOOL_CHOICE = "required"
"""Not a named tool: llama-server (the pinned llama.cpp) takes tool_choice as a string only."""


def _tools(tokenizer: ChatTokenizer, run: int, options: Options, tokens: int) -> list[Step]:
    user = f"Request {run + 1}. {TOOL_QUESTIONS[run % len(TOOL_QUESTIONS)]}"
    extra = {"tools": TOOLS, "tool_choice": TOOL_CHOICE, "parallel_tool_calls": False}
    job = Job(
        user, tokens, ignore_eos=False, extra=extra, call=True, reasoning_budget=reasoning_budget(tokens)
    )
    return [Step([job], servers_only=True)]


def _tools_figures(samples: Samples) -> dict[str, float]:
    """The seconds to the call only of a valid call (an invalid one is counted, not timed as one); the
    tokens of every answered request (a refused one has none)."""
    first = samples[0]
    if first is None:
        return {}
    sample = first[0]
    wall = sample.t_done - sample.t_submit
    out = {"call_valid": 1.0 if sample.call_valid else 0.0}
    if sample.call_valid:
        out["call_s"] = wall
    if sample.prompt_tokens > 0:  # answered (usage)
        out["completion_tokens"] = float(sample.completion_tokens)
        out["prompt_tokens"] = float(sample.prompt_tokens)
        if sample.completion_tokens and wall > 0:
            out["call_tok_s"] = sample.completion_tokens / wall
        if sample.prefill_tok_s is not None:
            out["prefill_tok_s"] = sample.prefill_tok_s
        decode = sample.server_timings.get("predicted_per_second")
        if decode:  # the prompts differ (edged describes the tools; llama-server not to R1): decode alone
            out["call_decode_tok_s"] = decode
    return out


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "seeds",
            f"~{SEEDS_PROMPT_TOKENS} prompt tokens in, 256 out (the seeds' RK3588 figure: 16.2 s)",
            256,
            _single(SEEDS_PROMPT_TOKENS, "seeds"),
            _first_step,
        ),
        Workload(
            "1k",
            f"~{SEEDS_PROMPT_TOKENS} prompt tokens in, 1024 out",
            1024,
            _single(SEEDS_PROMPT_TOKENS, "1k"),
            _first_step,
        ),
        Workload(
            "concurrent",
            f"K different ~{SEEDS_PROMPT_TOKENS}-token prompts at once, 256 out each",
            256,
            _concurrent,
            _first_step,
            concurrent=True,
        ),
        Workload(
            "shared-prefix",
            f"K prompts at once sharing a ~{SHARED_PREFIX_TOKENS}-token prefix, then a short question each",
            64,
            _shared_prefix,
            _first_step,
            concurrent=True,
        ),
        Workload(
            "prefix-repeat",
            f"a ~{SHARED_PREFIX_TOKENS}-token prefix cold, then again with another question "
            "(and, with --restart, after restarting edged)",
            64,
            _prefix_repeat,
            _prefix_repeat_figures,
        ),
        Workload(
            "schema",
            f"edged only: one ~{SEEDS_PROMPT_TOKENS}-token prompt (think: false) free, then with a JSON "
            "schema (response_format): the cost of constrained decoding",
            256,
            _schema,
            _schema_figures,
        ),
        Workload(
            "tools",
            f"edged and llama-server only: a forced tool call (tool_choice {TOOL_CHOICE}, "
            f"{len(TOOLS)} tools, temperature 0, reasoning budget max_tokens/4): seconds to the finished "
            "call, valid calls",
            256,
            _tools,
            _tools_figures,
            calls=True,
        ),
    )
}
