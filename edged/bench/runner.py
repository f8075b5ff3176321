"""One benchmark: start the targets, run each workload's runs on each of them, make the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from edged.bench.jobs import BenchError, Job, Target
from edged.bench.memory import PeakSampler
from edged.bench.prompts import ChatTokenizer, document
from edged.bench.raw import RawTarget
from edged.bench.report import (
    METRICS,
    STARTUP,
    BenchReport,
    Figure,
    ModelInfo,
    TargetInfo,
    WorkloadResult,
    machine_info,
    paired_ratios,
    progress_bar,
    summarise,
    summarise_startup,
)
from edged.bench.servers import EdgedTarget, LlamaServerTarget
from edged.bench.workloads import WORKLOADS, Options, Samples, Step

WARMUP_TOKENS = 4
PAGE_IN_CHUNK = 16 << 20


@dataclass(frozen=True)
class BenchConfig:
    model: Path
    threads: int
    runs: int
    workloads: list[str]
    concurrency: int
    parallel: int | None = None
    max_tokens: int | None = None
    restart: bool = False
    llama_server: Path | None = None
    edged_env: dict[str, str] = field(default_factory=dict)

    def slots(self) -> int | None:
        """Sequences edged and llama-server decode together: --parallel, else K when a workload submits
        K jobs at once, else edged's own default (llama-server: 1)."""
        if self.parallel is not None:
            return self.parallel
        if self.concurrency > 1 and any(WORKLOADS[w].concurrent for w in self.workloads):
            return self.concurrency
        return None


def _run_workload_once(target: Target, steps: list[Step], restartable: bool) -> Samples:
    samples: Samples = []
    for step in steps:
        if (step.edged_only and not restartable) or (step.servers_only and isinstance(target, RawTarget)):
            samples.append(None)
            continue
        if step.restart_first:
            if not restartable:
                samples.append(None)
                continue
            assert isinstance(target, EdgedTarget)
            target.restart()
        samples.append(target.run(step.jobs))
    return samples


RAW_HAS_NO_CALLS = (
    "raw: not run. llama-cpp-python's tool-call chat handlers (chatml-function-calling, functionary) "
    "impose their own prompt format, not the model's, and none parses R1's call markup: no fair equivalent"
)


def _call_notes(
    per_target: dict[str, list[dict[str, float]]], paired: dict[str, dict[str, Figure]]
) -> list[str]:
    """What a tool-call workload's figures do not say by themselves."""
    notes = [RAW_HAS_NO_CALLS]
    if "llama-server" not in per_target:
        notes.append("no llama-server to compare with (--llama-server PATH)")
    elif "call_s" not in paired.get("edged/llama-server", {}):
        notes.append("no run where both made a valid call: no edged/llama-server ratio of s to the call")
    return notes


def llama_server_template(raw: RawTarget) -> str | None:
    """The chat template llama-server is given for tool calls: R1-Distill's own for the R1-shaped model
    (whose GGUF carries a trimmed copy), else None (the GGUF's)."""
    from edged.bench.tools import R1_DISTILL_TEMPLATE
    from edged.bench.vocab import CHAT_TEMPLATE

    template = raw.llm.metadata.get("tokenizer.chat_template") if raw.llm is not None else None
    return R1_DISTILL_TEMPLATE if template == CHAT_TEMPLATE else None


def page_in(model: Path) -> None:
    """Read the model file once, so every target's first start finds it in the page cache (the first
    to start would otherwise pay the disk for the others)."""
    with model.open("rb", buffering=0) as f:
        buffer = bytearray(PAGE_IN_CHUNK)
        while f.readinto(buffer):
            pass


def start_up(targets: list[Target], first: dict[str, float], runs: int) -> dict[str, list[float]]:
    """Seconds to ready per target: its ``first`` start, then ``runs - 1`` more starts of each (stop,
    start), the targets in a rotating order."""
    seconds = {name: [s] for name, s in first.items()}
    for run in range(1, runs):
        shift = run % len(targets)
        for target in targets[shift:] + targets[:shift]:
            seconds[target.name].append(target.start_again())
    return seconds


def run_bench(config: BenchConfig, progress_console: Console) -> BenchReport:
    """The start-up of every target, then every selected workload, ``runs`` times on every target,
    targets in a rotating order per run (drift such as a warming board then hits all alike)."""
    slots = config.slots()
    options = Options(concurrency=config.concurrency, max_tokens=config.max_tokens, restart=config.restart)
    raw = RawTarget(config.model, config.threads)
    targets: list[Target] = []
    try:
        page_in(config.model)
        first = {raw.name: raw.start()}
        edged = EdgedTarget(config.model, config.threads, slots=slots, extra_env=config.edged_env)
        targets = [edged, raw]
        first[edged.name] = edged.start()
        if slots is not None:
            edged.notes.append(f"EDGED_ENGINE__PARALLEL={slots}")
        if config.llama_server is not None:
            calls = any(WORKLOADS[w].calls for w in config.workloads)
            template = llama_server_template(raw) if calls else None
            server = LlamaServerTarget(
                config.llama_server,
                config.model,
                config.threads,
                slots=slots or 1,
                jinja=calls,
                chat_template=template,
            )
            targets.append(server)
            first[server.name] = server.start()
            server.notes.append(" ".join(["llama-server", *server.args]))
            if template is not None:
                server.notes.append(
                    "--chat-template-file: DeepSeek-R1-Distill-Qwen's own template (the R1-shaped GGUF's "
                    "is trimmed of the assistant tool_calls branch by which llama.cpp recognises R1's calls)"
                )
        startup = summarise_startup(start_up(targets, first, config.runs if config.restart else 1))
        assert raw.tokenizer is not None  # raw's last start made it
        tokenizer: ChatTokenizer = raw.tokenizer
        warmup = [Job(document(tokenizer, "warmup", 32), WARMUP_TOKENS)]
        for target in targets:  # pages the weights in, so the first measured run is not the slow one
            target.run(warmup)

        results: list[WorkloadResult] = []
        total = len(config.workloads) * config.runs * len(targets)
        with progress_bar(progress_console, transient=True) as progress:
            task = progress.add_task("benchmark", total=total)
            for name in config.workloads:
                workload = WORKLOADS[name]
                per_target: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
                notes: list[str] = []
                jobs_per_run = 0
                for run in range(config.runs):
                    steps = workload.steps(tokenizer, run, options)
                    jobs_per_run = sum(len(step.jobs) for step in steps)
                    shift = run % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        progress.update(
                            task, description=f"{name} · run {run + 1}/{config.runs} · {target.name}"
                        )
                        with PeakSampler(target.pid) as memory:
                            try:
                                samples = _run_workload_once(target, steps, isinstance(target, EdgedTarget))
                            except BenchError as exc:
                                raise BenchError(f"{name}, run {run + 1}, {target.name}: {exc}") from exc
                        notes += [
                            f"{target.name}, run {run + 1}: invalid call: {sample.call_error}"
                            for step_samples in samples
                            for sample in step_samples or []
                            if sample.call_error is not None
                        ]
                        run_figures = workload.figures(samples)
                        if memory.peak_mb is not None:
                            run_figures["rss_anon_mb"] = memory.peak_mb
                        per_target[target.name].append(run_figures)
                        progress.advance(task)
                figures, ratios = summarise(per_target)
                paired = paired_ratios(per_target) if workload.calls else {}
                if workload.calls:
                    notes = _call_notes(per_target, paired) + notes
                results.append(
                    WorkloadResult(
                        name=name,
                        summary=workload.summary,
                        generated_tokens_per_job=config.max_tokens or workload.tokens,
                        jobs_per_run=jobs_per_run,
                        figures=figures,
                        ratios=ratios,
                        paired_ratios=paired,
                        notes=notes,
                    )
                )
        if edged.restarts:
            edged.notes.append(f"restarted {edged.restarts} times (prefix-repeat --restart)")
        infos = [TargetInfo(name=t.name, notes=t.notes, version=getattr(t, "version", None)) for t in targets]
    finally:
        for target in reversed(targets or [raw]):
            target.close()
    return BenchReport(
        machine=machine_info(),
        model=ModelInfo(
            path=str(config.model), name=config.model.name, size_bytes=config.model.stat().st_size
        ),
        threads=config.threads,
        runs=config.runs,
        concurrency=config.concurrency,
        slots=slots,
        targets=infos,
        startup=startup,
        workloads=results,
        definitions={m.key: m.meaning for m in (*METRICS, STARTUP)},
    )
