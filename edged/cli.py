"""The `edged` command: run the daemon, ask it things, and inspect the board and configuration.

Exit codes (edged/cli_common.py): 0 ok, 1 the daemon answered with an error, 2 usage, 3 daemon not
reachable, 78 bad configuration (EX_CONFIG).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from edged import __version__
from edged.cli_common import (
    EXIT_CONFIG,
    EXIT_DAEMON_ERROR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ConfigOpt,
    JsonOpt,
    PasswordOpt,
    SocketOpt,
    TlsCaOpt,
    TlsCertOpt,
    TlsKeyOpt,
    TlsOpt,
    TlsVerifyOpt,
    UsernameOpt,
    broker_options,
    err,
    exit_config_error,
    fail,
    load_settings_or_exit,
    out,
)
from edged.errors import BackendUnavailable, ConfigError, EdgedError

if TYPE_CHECKING:
    from edged.mqtt.broker import BrokerOptions


class _Commands(TyperGroup):
    """`edged`'s commands, `bench` and `fleet` imported only when one of them runs or `--help` lists
    them: `edged serve` loads what start-up needs and nothing else (tests/unit/test_startup_imports.py)."""

    LAZY = {"bench": ("edged.bench.cli", "bench_app"), "fleet": ("edged.fleet.cli", "fleet_app")}

    def list_commands(self, ctx: Any) -> list[str]:  # ctx: typer's own click Context
        return [*super().list_commands(ctx), *(name for name in self.LAZY if name not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            module, attribute = self.LAZY[cmd_name]
            command = typer.main.get_command(getattr(importlib.import_module(module), attribute))
            command.name = cmd_name
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands and args[0] not in self.LAZY:
            for name in self.LAZY:  # not a command: load them all, so that Typer suggests among them
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_Commands,
    name="edged",
    help=(
        "LLM inference daemon for small boards (RK3588, Raspberry Pi).\n\n"
        'Start it with `edged serve`, then `edged ask "why is the sky blue?"`. '
        "Configuration: flags > EDGED_* environment (EDGED_MODEL__PATH, ...) > "
        "--config FILE (default /etc/edged/edged.toml) > defaults; see `edged config show`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"model.ctx": 1}`` -> ``{"model": {"ctx": 1}}``, dropping unset flags."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _version(value: bool) -> None:
    if value:
        out.print(f"edged {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """LLM inference daemon for small boards."""


@app.command()
def serve(
    config: ConfigOpt = None,
    socket: SocketOpt = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="GGUF model file (model.path).")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context window, at most 2048 (model.ctx).")] = None,
    threads: Annotated[int | None, typer.Option(help="Generation threads (model.threads).")] = None,
    backend: Annotated[str | None, typer.Option(help="'auto' or a backend name, e.g. llamacpp.")] = None,
    profile: Annotated[str | None, typer.Option(help="Board profile name or 'auto' (board.profile).")] = None,
    root: Annotated[Path | None, typer.Option(help="Root for /proc and /sys (board.root).")] = None,
    device_id: Annotated[str | None, typer.Option(help="Device name (device_id).")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error (log.level).")] = None,
) -> None:
    """Run the daemon: detect the board, load the model, answer on the Unix socket until SIGTERM."""
    started = time.perf_counter()
    settings = load_settings_or_exit(
        config,
        _nest(
            {
                "socket.path": socket,
                "model.path": model,
                "model.ctx": ctx,
                "model.threads": threads,
                "backend": backend,
                "board.profile": profile,
                "board.root": root,
                "device_id": device_id,
                "log.level": log_level,
            }
        ),
    )
    import asyncio

    from edged.daemon import plan
    from edged.daemon import serve as run_daemon
    from edged.logs import configure_logging

    configure_logging(settings.log.level, settings.log.format)
    import structlog

    log = structlog.get_logger("edged.cli")
    try:
        p = plan(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config error", problem=problem)
        exit_config_error(exc)
    except BackendUnavailable as exc:
        log.error("no usable backend", error=exc.message)
        fail(EXIT_CONFIG, exc.message)
    log.info(
        "starting",
        version=__version__,
        device_id=settings.device_id,
        board=p.board.model,
        soc=p.board.soc,
        profile=p.board.profile.name,
        profile_reason=p.board.reason,
        backend=p.choice.name,
        skipped=[{"name": c.name, "reason": c.reason} for c in p.choice.considered if not c.available],
        model=str(settings.model.path),
    )
    try:
        code = asyncio.run(run_daemon(p, started))
    except EdgedError as exc:
        log.error("cannot start", code=exc.code, error=exc.message)
        fail(EXIT_DAEMON_ERROR, exc.message)
    raise typer.Exit(code)


def _client(config: Path | None, socket: Path | None) -> Any:
    from edged.client import Client

    path = socket or load_settings_or_exit(config).socket.path
    return Client(path)


def _get(config: Path | None, socket: Path | None, path: str) -> Any:
    """GET a daemon route; exits 3 when the daemon is not reachable, 1 when it answers an error."""
    from edged.client import DaemonError, DaemonUnreachable

    with _client(config, socket) as client:
        try:
            return client.get(path)
        except DaemonUnreachable as exc:
            fail(EXIT_UNREACHABLE, str(exc))
        except DaemonError as exc:
            fail(EXIT_DAEMON_ERROR, f"{exc.error.get('message')} ({exc.error.get('code')})")


def _stats_line(result: dict[str, Any]) -> str:
    usage, t = result.get("usage") or {}, result.get("timings") or {}

    def fmt(value: Any, unit: str, digits: int = 1) -> str:
        return f"{value:.{digits}f} {unit}" if isinstance(value, (int, float)) else f"- {unit}"

    return (
        f"{usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} generated tokens"
        f" · TTFT {fmt(t.get('ttft_ms'), 'ms', 0)}"
        f" · prefill {fmt(t.get('prompt_per_second'), 'tok/s')}"
        f" · decode {fmt(t.get('predicted_per_second'), 'tok/s')}"
        f" · {fmt(t.get('s_per_1k_tokens'), 's per 1k tokens')}"
        f" · finish {result.get('finish_reason', '?')}"
    )


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from standard input.")],
    config: ConfigOpt = None,
    socket: SocketOpt = None,
    system: Annotated[str | None, typer.Option(help="A system message to send first.")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Most tokens to generate.")] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, max=2.0, help="Sampling temperature.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Sampling seed (reproducible output).")] = None,
    as_json: JsonOpt = False,
    mqtt: Annotated[
        str | None,
        typer.Option(help="Ask over MQTT through this broker, HOST[:PORT], instead of the local socket."),
    ] = None,
    schema: Annotated[
        Path | None,
        typer.Option(
            help="A JSON schema file: the answer is a JSON object of that schema (after the model's "
            "reasoning), validated, or an invalid_output error.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    json_object: Annotated[
        bool, typer.Option("--json-object", help="The answer is any JSON object.")
    ] = False,
    think: Annotated[
        bool | None,
        typer.Option("--think/--no-think", help="--no-think skips a thinking model's reasoning."),
    ] = None,
    reasoning_budget: Annotated[
        int | None, typer.Option(min=0, help="Most reasoning tokens before edged closes the block.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="With --mqtt: the device id to ask.")] = None,
    fleet: Annotated[
        bool, typer.Option("--fleet", help="With --mqtt: ask whichever device of the fleet.")
    ] = False,
    username: UsernameOpt = None,
    password: PasswordOpt = None,
    tls: TlsOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_verify: TlsVerifyOpt = None,
) -> None:
    """Send one prompt to the daemon and stream the answer (reasoning dimmed), then a stats line.

    With --mqtt it goes through a broker to a device (--device ID) or the fleet (--fleet); the
    broker options (--username, --password, --tls-ca, ...) default to the mqtt.* settings, as for
    `edged fleet`. Examples: edged ask --mqtt broker.lan --device box-17 "Hello";
    edged ask --mqtt [fd00::5]:8883 --tls-ca ca.crt --fleet --json "Hello"
    """
    from edged.client import DaemonError, DaemonUnreachable

    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        fail(EXIT_USAGE, "the prompt is empty")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    body: dict[str, Any] = {"messages": messages}
    body.update(
        {
            k: v
            for k, v in {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}.items()
            if v is not None
        }
    )
    if schema is not None and json_object:
        fail(EXIT_USAGE, "give --schema FILE or --json-object, not both")
    if schema is not None:
        try:
            loaded = json.loads(schema.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            fail(EXIT_USAGE, f"--schema {schema}: not a JSON file: {exc}")
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": schema.stem[:64] or "response", "schema": loaded},
        }
    elif json_object:
        body["response_format"] = {"type": "json_object"}
    if think is not None:
        body["think"] = think
    if reasoning_budget is not None:
        body["reasoning_budget"] = reasoning_budget
    if mqtt is not None:
        if bool(device) == fleet:
            fail(EXIT_USAGE, "with --mqtt give exactly one of --device ID or --fleet")
        cfg = load_settings_or_exit(config).mqtt
        try:
            options = broker_options(
                cfg, mqtt, username, password, tls, tls_ca, tls_cert, tls_key, tls_verify
            )
        except ValueError as exc:  # BrokerSetupError: a malformed address, a missing TLS file
            fail(EXIT_USAGE, str(exc))
        _ask_mqtt(options, cfg.topic_prefix, device, body, as_json)
        return
    if device or fleet:
        fail(EXIT_USAGE, "--device and --fleet need --mqtt HOST[:PORT]")
    with _client(config, socket) as client:
        try:
            if as_json:
                out.print_json(data=client.chat(body))
                return
            final: dict[str, Any] = {}
            in_reasoning = False
            for chunk in client.chat_stream(body):
                choice = chunk["choices"][0]
                delta = choice.get("delta") or {}
                if delta.get("reasoning_content"):
                    in_reasoning = _print_delta("reasoning", delta["reasoning_content"], in_reasoning)
                if delta.get("content"):
                    in_reasoning = _print_delta("content", delta["content"], in_reasoning)
                if choice.get("finish_reason"):
                    final = {**chunk, "finish_reason": choice["finish_reason"]}
            out.print()
            err.print(_stats_line(final), style="dim", markup=False)
        except DaemonUnreachable as exc:
            fail(EXIT_UNREACHABLE, str(exc))
        except DaemonError as exc:
            fail(EXIT_DAEMON_ERROR, f"{exc.error.get('message')} ({exc.error.get('code')})")


def _print_delta(kind: str, text: str, in_reasoning: bool) -> bool:
    """Print one streamed piece (reasoning dimmed); returns whether we are inside reasoning now."""
    if kind == "reasoning":
        out.print(text, style="dim", end="", markup=False)
        return True
    if in_reasoning:
        out.print("\n", end="")
    out.print(text, end="", markup=False)
    return False


def _ask_mqtt(
    options: BrokerOptions, prefix: str, device: str | None, body: dict[str, Any], as_json: bool
) -> None:
    from edged.fleet.ask import BrokerUnreachable, NoAnswer, ask_over_mqtt

    final: dict[str, Any] = {}
    in_reasoning = False
    try:
        for message in ask_over_mqtt(options, body, device=device, prefix=prefix):
            if "status" in message:
                final = message
            elif not as_json:
                in_reasoning = _print_delta(message.get("kind", "content"), message["delta"], in_reasoning)
    except (BrokerUnreachable, NoAnswer) as exc:
        fail(EXIT_UNREACHABLE, str(exc))
    if as_json:
        out.print_json(data=final)
    if final.get("status") != "done":
        error = final.get("error") or {}
        fail(EXIT_DAEMON_ERROR, f"{error.get('message')} ({error.get('code')})")
    if not as_json:
        out.print()
        err.print(f"[{final.get('device_id')}] " + _stats_line(final), style="dim", markup=False)


@app.command()
def status(config: ConfigOpt = None, socket: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """Show what the running daemon is doing: board, backend, model, queue, throughput."""
    from rich.table import Table

    doc = _get(config, socket, "/status")
    if as_json:
        out.print_json(data=doc)
        return
    engine, board, backend = doc["engine"], doc["board"], doc["backend"]
    table = Table(title=f"edged {doc['version']} on {doc['device_id']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("state", f"{engine['state']} (up {doc['uptime_s']} s)")
    table.add_row(
        "board", f"{board['model'] or '?'} · profile {board['profile']} ({board['profile_reason']})"
    )
    table.add_row("backend", backend["name"] + ("" if not backend["forced"] else " (forced)"))
    for c in backend["considered"]:
        if not c["available"]:
            table.add_row("", f"skipped {c['name']}: {c['reason']}")
    table.add_row("model", f"{doc['model']['name']} · ctx {doc['model']['ctx']}")
    table.add_row(
        "queue",
        f"{engine['queue']['depth']} / {engine['queue']['max_depth']} waiting"
        + (f" · running {engine['running']['id']}" if engine["running"] else ""),
    )
    jobs = engine["jobs"]
    table.add_row("jobs", ", ".join(f"{k} {v}" for k, v in jobs.items()))
    for window, t in engine["throughput"].items():
        table.add_row(
            f"last {window}",
            f"{t['jobs_done']} done · decode p50 {t['decode_tokens_per_s_p50']} tok/s"
            f" · {t['s_per_1k_tokens']} s per 1k tokens · TTFT p50 {t['ttft_ms_p50']} ms",
        )
    thermals = doc.get("thermals") or {}
    gov = thermals.get("governor") or {}
    if gov and gov["hottest_c"] is None:
        table.add_row("thermal", "no thermal zones to read here: nothing to protect")
    elif gov:
        table.add_row(
            "thermal",
            f"{gov['state']} · hottest {gov['hottest_c']:.1f} °C ({gov['hottest_zone']}) · "
            f"pause at {gov['limits']['pause_c']} °C, resume below {gov['limits']['resume_c']} °C",
        )
    zones = [z for z in thermals.get("zones", []) if z["temp_c"] is not None]
    if zones:
        table.add_row("zones", ", ".join(f"{z['type']} {z['temp_c']:.1f}" for z in zones))
    clocks = thermals.get("cpufreq") or []
    if clocks:
        table.add_row(
            "cpu MHz",
            ", ".join(
                f"{c['policy']} {c['cur_mhz']:.0f}/{c['hw_max_mhz']:.0f}" + (" capped" if c["capped"] else "")
                for c in clocks
                if c["cur_mhz"] is not None and c["hw_max_mhz"] is not None
            ),
        )
    throttling = thermals.get("throttling")
    if throttling:
        now = [k for k, v in throttling["now"].items() if v]
        since = [k for k, v in throttling["since_boot"].items() if v]
        table.add_row(
            "throttling", f"now: {', '.join(now) or 'none'} · since boot: {', '.join(since) or 'none'}"
        )
    out.print(table)


@app.command()
def jobs(
    config: ConfigOpt = None,
    socket: SocketOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Jobs to show (newest first).")] = 20,
    before: Annotated[
        int | None, typer.Option(min=1, help="Page on: the seq printed as 'next page' by the last call.")
    ] = None,
    origin: Annotated[
        str | None, typer.Option(help="Only jobs from this transport: mqtt, socket or tcp:<key name>.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List recent jobs from the daemon's journal: state, attempts, timings, errors.

    Jobs survive restarts in the journal (journal.path), so a job cut by a crash shows up with
    attempts 2 once it ran again. Prompts and answers are shown only when the daemon runs with
    log.content = true. Example: edged jobs --origin mqtt --limit 50 --json
    """
    from urllib.parse import urlencode

    from rich.table import Table

    query = {"limit": limit, "before": before, "origin": origin}
    path = "/v1/jobs?" + urlencode({k: v for k, v in query.items() if v is not None})
    doc = _get(config, socket, path)
    if as_json:
        out.print_json(data=doc)
        return
    if not doc["journal"]:
        err.print("edged: the journal is off (journal.enabled = false): jobs this process remembers")
    table = Table(title="recent jobs, newest first")
    for column in ("seq", "id", "origin", "state", "tries", "accepted", "took s", "tokens", "tok/s", "error"):
        table.add_column(column, overflow="fold")
    for job in doc["data"]:
        timings, usage = job.get("timings") or {}, job.get("usage") or {}
        accepted, finished = job.get("accepted_at"), job.get("finished_at")
        table.add_row(
            str(job.get("seq", "")),
            str(job.get("id") or ""),
            job.get("origin") or "",
            job["state"],
            str(job.get("attempts", "")),
            time.strftime("%H:%M:%S", time.localtime(accepted)) if accepted else "",
            f"{finished - accepted:.1f}" if accepted and finished else "",
            str(usage.get("completion_tokens", job.get("completion_tokens", ""))),
            f"{timings['predicted_per_second']:.1f}" if timings.get("predicted_per_second") else "",
            (job.get("error") or {}).get("code", ""),
        )
    out.print(table)
    for job in doc["data"]:  # log.content: the text, one job per line
        if job.get("content") is not None or job.get("prompt") is not None:
            prompt = job.get("prompt")
            if isinstance(prompt, list):
                prompt = " / ".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
            out.print(f"{job.get('seq')}: {str(prompt)[:120]!r} -> {str(job.get('content'))[:200]!r}")
    if doc.get("next_before"):
        out.print(f"next page: edged jobs --before {doc['next_before']}")


@app.command()
def board(
    config: ConfigOpt = None,
    root: Annotated[Path | None, typer.Option(help="Root for /proc and /sys (board.root).")] = None,
    profile: Annotated[str | None, typer.Option(help="Force a profile instead of detecting it.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Detect the board and show the profile and the backend `edged serve` would choose, and why."""
    from rich.table import Table

    from edged.backends import choose_backend
    from edged.board import detect_board, plan_cpus
    from edged.daemon import board_report, considered

    settings = load_settings_or_exit(config, _nest({"board.root": root, "board.profile": profile}))
    try:
        info = detect_board(settings.board.root, settings.board.profile, settings.board.profiles_dir)
    except ConfigError as exc:
        exit_config_error(exc)
    report: dict[str, Any] = board_report(info).dump()
    cpus = plan_cpus(info.profile, settings.model.threads)
    report["cpu"] = {"threads": cpus.threads, "affinity": cpus.affinity, "note": cpus.note}
    report["thermal"] = info.profile.thermal.model_dump()
    if "rkllm" in info.profile.backends.order:
        from edged.backends.rkllm import rknn_lite_info

        report["npu"] = {"rknn_toolkit_lite2": rknn_lite_info()}
    code = EXIT_OK
    try:
        choice = choose_backend(info, settings)
        report["backend"] = {"name": choice.name, "forced": choice.forced, "considered": considered(choice)}
    except (BackendUnavailable, ConfigError) as exc:
        report["backend"] = {"name": None, "error": exc.message}
        code = EXIT_CONFIG
    if as_json:
        out.print_json(data=report)
        raise typer.Exit(code)
    table = Table(title="edged board", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", str(report["model"]))
    table.add_row("compatible", ", ".join(report["compatible"]) or f"(none; source {report['source']})")
    table.add_row("soc", str(report["soc"]))
    table.add_row(
        "profile", f"{report['profile']} ({report['profile_reason']}) from {report['profile_file']}"
    )
    table.add_row("cpu", f"{cpus.threads} threads · {cpus.note}")
    backend_info = report["backend"]
    if backend_info.get("name"):
        table.add_row("backend", f"{backend_info['name']}" + (" (forced)" if backend_info["forced"] else ""))
        for c in backend_info["considered"]:
            table.add_row("", f"{'use' if c['available'] else 'skip'} {c['name']}: {c['reason']}")
    else:
        table.add_row("backend", f"none: {backend_info['error']}")
    out.print(table)
    raise typer.Exit(code)


@config_app.command("show")
def config_show(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Print the effective configuration after file, environment and defaults are merged."""
    from edged.config import dump_settings

    data = dump_settings(load_settings_or_exit(config))
    if as_json:
        out.print_json(data=data)
        return

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out.print(f"{prefix} = {json.dumps(node)}", markup=False)

    walk("", data)


def main() -> None:
    app()
