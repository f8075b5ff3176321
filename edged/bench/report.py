"""The benchmark's result document (``--json``), its statistics and ratios, and its table."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edged import __version__


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    meaning: str
    median: bool = False  # the table shows median (min-max), not mean ± std
    count: bool = False  # 1 or 0 per run: the table shows how many of the runs (no ratio)


METRICS = (
    Metric(
        "ttft_ms", "TTFT ms", "submission to first generated text, at the client (median of a run's jobs)"
    ),
    Metric(
        "prefill_tok_s",
        "prefill tok/s",
        "prompt tokens processed per second of prefill, as the target times it (cached tokens excluded)",
    ),
    Metric("decode_tok_s", "decode tok/s", "per job: tokens after the first / time after the first (client)"),
    Metric(
        "aggregate_tok_s", "aggregate tok/s", "all tokens generated in a run / its wall time (prefill in)"
    ),
    Metric("s_per_1k_tokens", "s per 1k tokens", "1000 / aggregate tok/s: wall seconds per 1000 tokens"),
    Metric("ttft_cold_ms", "TTFT cold ms", "prefix-repeat: the first prompt with a new prefix"),
    Metric("ttft_warm_ms", "TTFT warm ms", "prefix-repeat: the same prefix again, another question"),
    Metric(
        "warm_over_cold", "TTFT warm/cold", "prefix-repeat: warm TTFT / cold TTFT (below 1: prefix reused)"
    ),
    Metric(
        "ttft_restart_ms", "TTFT after restart ms", "prefix-repeat --restart: same prefix, edged restarted"
    ),
    Metric(
        "restart_over_cold", "TTFT restart/cold", "prefix-repeat --restart: after-restart TTFT / cold TTFT"
    ),
    Metric("decode_schema_tok_s", "decode tok/s, JSON schema", "schema: the same prompt under the grammar"),
    Metric("schema_over_plain", "schema / free decode", "schema: constrained / free decode tok/s (1 = free)"),
    Metric("schema_tokens", "schema answer tokens", "schema: tokens of the constrained answer"),
    Metric(
        "call_s",
        "s to the call, median (min-max)",
        "tools: submission to the finished answer with its call (not streamed), at the client; over the "
        "runs whose call was valid",
        median=True,
    ),
    Metric(
        "call_valid",
        "valid calls",
        "tools: runs whose answer was one call, well formed, to a known tool, its arguments valid against "
        "the tool's schema (jsonschema, at the client); a refused answer (4xx/5xx) is an invalid call",
        count=True,
    ),
    Metric(
        "completion_tokens",
        "completion tokens, median (min-max)",
        "tools: tokens generated, reasoning and call (usage.completion_tokens), every answered run",
        median=True,
    ),
    Metric(
        "call_tok_s",
        "tok/s to the call, median (min-max)",
        "tools: completion tokens / seconds to the answer (prefill in), every answered run",
        median=True,
    ),
    Metric(
        "call_decode_tok_s",
        "decode tok/s (target's timings), median (min-max)",
        "tools: tokens generated per second of decoding, as the target times it "
        "(timings.predicted_per_second)",
        median=True,
    ),
    Metric("prompt_tokens", "prompt tokens", "prompt tokens per job (the chat template included)"),
    Metric("cache_n", "cached prompt tokens", "prompt tokens taken from a prefix cache (timings.cache_n)"),
    Metric("rss_anon_mb", "RssAnon peak MB", "peak anonymous memory of the target's process during the run"),
)
METRIC_KEYS = [m.key for m in METRICS]
COUNT_KEYS = {m.key for m in METRICS if m.count}
STARTUP = Metric(
    "ready_s",
    "ready s, median (min-max)",
    "start-up: edged and llama-server from starting the process to /health answering 200; raw the "
    "construction of Llama() on the model (in the running bench, llama_cpp imported); the model file "
    "in the page cache for all (the bench reads it first); the first start, and with --restart one "
    "more per further run",
)
RATIO_PAIRS = (("edged", "raw"), ("edged", "llama-server"))


class Figure(BaseModel):
    """One figure over the runs: mean ± sample standard deviation (None with a single run), median."""

    mean: float
    std: float | None
    median: float
    n: int
    values: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Figure:
        return cls(
            mean=statistics.fmean(values),
            std=statistics.stdev(values) if len(values) > 1 else None,
            median=statistics.median(values),
            n=len(values),
            values=values,
        )


class WorkloadResult(BaseModel):
    name: str
    summary: str
    generated_tokens_per_job: int
    jobs_per_run: int
    figures: dict[str, dict[str, Figure]] = Field(description="target -> metric -> figure over the runs")
    ratios: dict[str, dict[str, float]] = Field(
        description="'edged/raw', 'edged/llama-server' -> metric -> mean of edged / mean of the other"
    )
    paired_ratios: dict[str, dict[str, Figure]] = Field(
        default_factory=dict,
        description="tools: 'edged/llama-server' -> metric -> edged / the other, run by run (the same "
        "request), over the runs where both have the figure (call_s: both calls valid); the table shows "
        "their median (min-max)",
    )
    notes: list[str] = Field(default_factory=list, description="what the figures do not say (invalid calls)")


class StartupResult(BaseModel):
    """Seconds from start to ready per target (`STARTUP`): medians, as one slow start must not move it."""

    figures: dict[str, Figure] = Field(description="target -> seconds from start to ready, over the starts")
    ratios: dict[str, float] = Field(
        description="'edged/raw', 'edged/llama-server' -> median of edged / median of the other"
    )
    differences_s: dict[str, float] = Field(
        description="'edged/raw', 'edged/llama-server' -> median of edged - median of the other, seconds"
    )


class MachineInfo(BaseModel):
    cpu_model: str
    cores: int
    cores_available: int
    platform: str
    python: str
    llama_cpp_python: str
    edged: str


class ModelInfo(BaseModel):
    path: str
    name: str
    size_bytes: int


class TargetInfo(BaseModel):
    name: str
    notes: list[str]
    version: str | None = None


class BenchReport(BaseModel):
    schema_version: int = 1
    machine: MachineInfo
    model: ModelInfo
    threads: int
    runs: int
    concurrency: int
    slots: int | None = Field(
        description="EDGED_ENGINE__PARALLEL and llama-server -np (None: edged's default)"
    )
    targets: list[TargetInfo]
    startup: StartupResult | None = None
    workloads: list[WorkloadResult]
    definitions: dict[str, str]


def progress_bar(console: Console, *, transient: bool = False) -> Progress:
    """The benchmark's and the model builder's progress bar (only on a terminal: logs stay clean)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``model name`` of x86 (``Hardware``/``Model`` on Arm boards), else the platform's processor."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware"):
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def machine_info() -> MachineInfo:
    try:
        from importlib.metadata import version

        llama_version = version("llama-cpp-python")
    except Exception:  # not installed as a distribution: report what the module says
        llama_version = "?"
    return MachineInfo(
        cpu_model=cpu_model(),
        cores=os.cpu_count() or 0,
        cores_available=len(os.sched_getaffinity(0)),
        platform=platform.platform(),
        python=sys.version.split()[0],
        llama_cpp_python=llama_version,
        edged=__version__,
    )


def summarise(
    per_target: dict[str, list[dict[str, float]]],
) -> tuple[dict[str, dict[str, Figure]], dict[str, dict[str, float]]]:
    """Figures over the runs for each target, then the ratios of their means."""
    figures: dict[str, dict[str, Figure]] = {}
    for target, runs in per_target.items():
        keys = [k for k in METRIC_KEYS if any(k in run for run in runs)]
        figures[target] = {k: Figure.of([run[k] for run in runs if k in run]) for k in keys}
    ratios: dict[str, dict[str, float]] = {}
    for a, b in RATIO_PAIRS:
        if a in figures and b in figures:
            shared = [
                k for k in figures[a] if k in figures[b] and figures[b][k].mean != 0 and k not in COUNT_KEYS
            ]
            ratios[f"{a}/{b}"] = {k: figures[a][k].mean / figures[b][k].mean for k in shared}
    return figures, ratios


def paired_ratios(per_target: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Figure]]:
    """Run by run (the targets were given the same request), each figure of edged over the other's, over
    the runs where both have it: the seconds to the call only where both calls were valid (a ratio of an
    invalid call's time is no measure of the same work), the tokens and tok/s where both answered. Only
    against a target that ran the workload."""
    out: dict[str, dict[str, Figure]] = {}
    for a, b in RATIO_PAIRS:
        runs_a, runs_b = per_target.get(a), per_target.get(b)
        if not runs_a or not runs_b or not any("call_valid" in run for run in runs_b):
            continue  # the other target did not run the workload (raw: only its memory was sampled)
        pair: dict[str, Figure] = {}
        for key in METRIC_KEYS:
            if key in COUNT_KEYS:
                continue
            values = [x[key] / y[key] for x, y in zip(runs_a, runs_b, strict=True) if y.get(key) and key in x]
            if values:
                pair[key] = Figure.of(values)
        if pair:
            out[f"{a}/{b}"] = pair
    return out


def summarise_startup(per_target: dict[str, list[float]]) -> StartupResult:
    """The start-up figures of the targets that were started, and edged's against the others'."""
    figures = {target: Figure.of(seconds) for target, seconds in per_target.items() if seconds}
    ratios: dict[str, float] = {}
    differences: dict[str, float] = {}
    for a, b in RATIO_PAIRS:
        if a in figures and b in figures:
            differences[f"{a}/{b}"] = figures[a].median - figures[b].median
            if figures[b].median > 0:
                ratios[f"{a}/{b}"] = figures[a].median / figures[b].median
    return StartupResult(figures=figures, ratios=ratios, differences_s=differences)


def _digits(value: float) -> int:
    return 2 if abs(value) < 10 else 1 if abs(value) < 1000 else 0


def _median_cell(figure: Figure | None) -> str:
    if figure is None:
        return "-"
    digits = _digits(figure.median)
    text = f"{figure.median:.{digits}f}"
    if figure.n == 1:
        return text
    return f"{text} ({min(figure.values):.{digits}f}-{max(figure.values):.{digits}f})"


def _count_cell(figure: Figure | None) -> str:
    return "-" if figure is None else f"{round(sum(figure.values))}/{figure.n}"


def _ratio_cell(workload: WorkloadResult, pair: str, key: str) -> str:
    paired = workload.paired_ratios.get(pair, {}).get(key)
    if paired is not None:
        text = f"{paired.median:.3f}"
        return text if paired.n == 1 else f"{text} ({min(paired.values):.3f}-{max(paired.values):.3f})"
    calls = any("call_valid" in figures for figures in workload.figures.values())
    ratio = None if calls else workload.ratios.get(pair, {}).get(key)  # calls: paired valid runs only
    return "-" if ratio is None else f"{ratio:.3f}"


def _cell(figure: Figure | None) -> str:
    if figure is None:
        return "-"
    digits = _digits(figure.mean)
    text = f"{figure.mean:.{digits}f}"
    return text if figure.std is None else f"{text} ± {figure.std:.{digits}f}"


def render_table(report: BenchReport, console: Console) -> None:
    targets = [t.name for t in report.targets]
    m = report.machine
    title = (
        f"edged bench · {report.model.name} ({report.model.size_bytes / 1e9:.2f} GB) · "
        f"{report.threads} threads · {report.runs} runs (mean ± std) · "
        f"{m.cpu_model}, {m.cores_available} cores"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("workload")
    table.add_column("figure")
    for name in targets:
        table.add_column(name, justify="right")
    pairs = [f"{a}/{b}" for a, b in RATIO_PAIRS if a in targets and b in targets]
    for pair in pairs:
        table.add_column(pair, justify="right")
    metrics = {m.key: m for m in METRICS}
    startup = report.startup
    if startup is not None:
        table.add_row(
            "startup",
            STARTUP.label,
            *[_median_cell(startup.figures.get(t)) for t in targets],
            *["-" if pair not in startup.ratios else f"{startup.ratios[pair]:.3f}" for pair in pairs],
            end_section=True,
        )
    for workload in report.workloads:
        keys = [k for k in METRIC_KEYS if any(k in workload.figures.get(t, {}) for t in targets)]
        for i, key in enumerate(keys):
            metric = metrics[key]
            cell = _count_cell if metric.count else _median_cell if metric.median else _cell
            table.add_row(
                workload.name if i == 0 else "",
                metric.label,
                *[cell(workload.figures.get(t, {}).get(key)) for t in targets],
                *["-" if metric.count else _ratio_cell(workload, pair, key) for pair in pairs],
                end_section=i == len(keys) - 1,
            )
    console.print(table)
    for workload in report.workloads:
        for note in workload.notes:
            console.print(f"[dim]{workload.name}: {escape(note)}[/dim]")
    if startup is not None and "edged/llama-server" in startup.differences_s:
        n = startup.figures["edged"].n
        console.print(
            f"startup: edged - llama-server = {startup.differences_s['edged/llama-server']:+.2f} s "
            f"(medians of {n} start{'s' if n > 1 else ''} each)"
        )
    for target in report.targets:
        for note in target.notes:
            console.print(f"[dim]{target.name}: {note}[/dim]")
