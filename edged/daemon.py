"""`edged serve`: wire settings, board, backend, engine and transports together and run until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from edged import __version__
from edged.backends import BackendChoice, choose_backend
from edged.board import BoardInfo, HostFS, ThermalLimits, detect_board
from edged.config import Settings
from edged.engine import Engine, EngineState
from edged.errors import BackendUnavailable, EdgedError
from edged.journal import Journal, JournalUnavailable
from edged.journal.book import JobBook
from edged.journal.intake import JobIntake, Recovery
from edged.systemd import Notifier, inherited_sockets, watchdog_interval
from edged.telemetry.governor import ThermalGovernor, ThermalState, Transition, effective_limits
from edged.telemetry.homeassistant import discovery_configs
from edged.telemetry.report import Telemetry, TelemetryCollector
from edged.transports.http.app import create_app
from edged.transports.limits import socket_limits
from edged.transports.mqtt import MqttTransport, Topics
from edged.transports.tcp import KeyGate, bind_tcp, check_tls, listener_options, load_keys
from edged.transports.tcp import describe as describe_tcp
from edged.transports.unix_socket import bind_unix_socket, make_server, unlink_socket

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Plan:
    """What `edged serve` will run, decided before anything heavy is loaded."""

    settings: Settings
    board: BoardInfo
    choice: BackendChoice
    limits: ThermalLimits
    http_keys: dict[str, str] = dataclasses.field(default_factory=dict)
    """The TCP listener's keys: name -> sha256 (from http.api_keys and http.api_keys_file)."""


def plan(settings: Settings) -> Plan:
    """Detect the board and choose the backend; raises `ConfigError` / `BackendUnavailable`."""
    board = detect_board(settings.board.root, settings.board.profile, settings.board.profiles_dir)
    overrides = settings.thermal.model_dump(include={"warn_c", "derate_c", "pause_c", "resume_c"})
    limits = effective_limits(board.profile.thermal, overrides)
    keys: dict[str, str] = {}
    if settings.http.listen:
        keys = load_keys(settings.http)
        check_tls(settings.http)
    return Plan(settings, board, choose_backend(board, settings), limits, keys)


def board_report(board: BoardInfo) -> dict[str, Any]:
    return {
        "model": board.model,
        "compatible": board.compatible,
        "soc": board.soc,
        "source": board.source,
        "root": str(board.root),
        "profile": board.profile.name,
        "profile_file": str(board.profile_origin),
        "profile_reason": board.reason,
    }


def backend_report(choice: BackendChoice) -> dict[str, Any]:
    return {
        "name": choice.name,
        "forced": choice.forced,
        "considered": [dataclasses.asdict(c) for c in choice.considered],
    }


async def _every(period_s: float, action: Callable[[], object]) -> None:
    """Run ``action`` now and then every ``period_s``; an error is logged, never fatal."""
    while True:
        try:
            action()
        except Exception:
            log.exception("periodic task failed", action=getattr(action, "__qualname__", repr(action)))
        await asyncio.sleep(period_s)


def serving_status(state: ThermalState, temp_c: float | None) -> str:
    """The STATUS= line systemd shows: what edged is doing now."""
    temp = f" ({temp_c:.0f} C)" if temp_c is not None else ""  # ASCII: sdnotify encodes latin-1
    if state is ThermalState.PAUSED:
        return f"paused: too hot{temp}, queued jobs wait"
    if state is ThermalState.DERATE:
        return f"serving, derated: hot{temp}"
    return f"serving{temp}"


async def _wait_mqtt(mqtt: MqttTransport, stop: asyncio.Task[Any], timeout: float = 30.0) -> None:
    """READY waits for the broker, but not forever: a broker outage must not fail the start."""
    connected = asyncio.create_task(mqtt.connected.wait())
    done, _ = await asyncio.wait({connected, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if connected not in done:
        connected.cancel()
        log.warning("ready without MQTT: the broker is not reachable yet; retrying in the background")


def open_journal(settings: Settings) -> Journal | None:
    """The job journal, or None with ``journal.enabled = false``; raises ``JournalUnavailable``."""
    cfg = settings.journal
    if not cfg.enabled:
        log.warning("job journal disabled: accepted jobs are lost if edged is killed (journal.enabled)")
        return None
    journal = Journal.open(
        cfg.path, sync=cfg.sync, keep_s=cfg.keep_s, max_rows=cfg.max_rows, max_bytes=cfg.max_bytes
    )
    log.info("job journal open", path=str(cfg.path), sync=cfg.sync, socket_jobs=cfg.socket)
    return journal


async def start_mqtt(p: Plan, engine: Engine, recovery: Recovery | None) -> MqttTransport:
    settings = p.settings
    discovery = None
    if settings.telemetry.homeassistant:
        topics = Topics.build(settings.mqtt.topic_prefix, settings.device_id, settings.mqtt.share_group)
        discovery = discovery_configs(
            settings.telemetry.discovery_prefix,
            settings.device_id,
            topics.telemetry,
            topics.status,
            presence(p, engine),
        )
    transport = MqttTransport(engine, settings, lambda: presence(p, engine), discovery, engine.intake)
    engine.on_backend_change(transport.publish_presence)
    await transport.start(recovery)
    return transport


def presence(p: Plan, engine: Engine) -> dict[str, Any]:
    """What the retained status message says about this device (read fresh from the engine's
    snapshot, so it follows a backend switch)."""
    snap = engine.snapshot()
    return {
        "device_id": p.settings.device_id,
        "board": p.board.model,
        "soc": p.board.soc,
        "profile": p.board.profile.name,
        "backend": snap.backend,
        "model": snap.model,
        "slots": snap.slots.total,
        "version": __version__,
    }


async def serve(p: Plan, started: float) -> int:
    """Run the daemon; returns the process exit code."""
    settings = p.settings
    try:
        journal = open_journal(settings)
    except JournalUnavailable as exc:
        log.error(
            "cannot open the job journal", error=exc.message, hint="check journal.path, or journal.enabled"
        )
        return 78
    intake = None
    recovery = None
    if journal is not None:
        intake = JobIntake(
            JobBook(journal, content=settings.log.content),
            settings.device_id,
            max_attempts=settings.journal.max_attempts,
            local=settings.journal.socket,
        )
        try:  # every start, MQTT or not, before any job is taken
            recovery = await intake.recover()
        except EdgedError as exc:
            log.error("cannot read the job journal to recover the last run's jobs", error=exc.message)
            if settings.mqtt.host:  # its MQTT jobs would wait unanswered until the next start
                await asyncio.to_thread(journal.close)
                return 1
    engine = Engine(settings, p.board, p.choice, intake)
    fs = HostFS(settings.board.root)
    derate_s = settings.thermal.derate_pause_ms / 1000

    notifier = Notifier()

    def on_transition(change: Transition) -> None:
        hot = change.state in (ThermalState.DERATE, ThermalState.PAUSED)
        engine.apply_thermal(paused=change.state is ThermalState.PAUSED, derate_s=derate_s if hot else 0.0)
        if engine.state is EngineState.READY:
            notifier.status(serving_status(change.state, change.temp_c))
        if mqtt is not None:
            mqtt.publish_telemetry({**telemetry.report(), "event": "thermal_transition"})

    governor = ThermalGovernor(fs, p.limits, p.limits.zones, on_transition)
    telemetry = Telemetry(settings, engine, governor, fs)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TelemetryCollector(telemetry))

    mqtt: MqttTransport | None = None

    def status() -> dict[str, Any]:
        snap = engine.snapshot()
        return {
            "device_id": settings.device_id,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - started_mono, 1),
            "board": board_report(p.board),
            "backend": {
                **backend_report(p.choice),
                "name": snap.backend,
                "fallback_reasons": snap.fallback_reasons,
                "details": snap.backend_details,
            },
            "model": {
                "name": snap.model,
                "path": str(settings.model.path),
                "ctx": snap.n_ctx,
            },
            "engine": snap.status(),
            "thermals": telemetry.thermals(),
            "mqtt": mqtt.status() if mqtt is not None else None,
            "listeners": listeners,
        }

    started_mono = time.monotonic()
    notifier.status(f"loading model {settings.model.display_name} ({p.choice.name})")
    inherited = inherited_sockets()
    if inherited:
        sock = inherited[0]
        log.info("using the socket systemd passed", fds=len(inherited))
    else:
        sock = bind_unix_socket(settings.socket.path, settings.socket.mode)
    app = create_app(settings, engine, status, lambda: generate_latest(registry))
    server = make_server(app, limits=socket_limits(settings.socket, settings.http))
    listeners: list[dict[str, Any]] = [
        {"kind": "unix", "path": str(settings.socket.path), "mode": f"{settings.socket.mode:04o}"}
    ]
    tcp_server = None
    tcp_task: asyncio.Task[None] | None = None
    if settings.http.listen:
        tcp_sock = bind_tcp(settings.http)  # before serving anything: a port in use fails the start
        tcp_server = make_server(KeyGate(app, settings.http, p.http_keys), **listener_options(settings.http))
        listeners.append({"kind": "tcp", **describe_tcp(settings.http, p.http_keys)})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server_task = asyncio.create_task(server.serve(sockets=[sock]), name="edged-unix")
    log.info("listening", socket=str(settings.socket.path), mode=f"{settings.socket.mode:04o}")
    if tcp_server is not None:
        tcp_task = asyncio.create_task(tcp_server.serve(sockets=[tcp_sock]), name="edged-tcp")
        log.info(
            "listening on tcp",
            listen=settings.http.listen,
            tls=settings.http.tls.cert is not None,
            keys=sorted(p.http_keys),
            anonymous=settings.http.allow_anonymous,
        )
    load_task = asyncio.create_task(engine.start(), name="edged-load")
    background = [asyncio.create_task(_every(settings.thermal.poll_s, governor.poll), name="edged-governor")]
    metrics_server = None
    if settings.telemetry.metrics_port:
        metrics_server, _ = start_http_server(
            settings.telemetry.metrics_port, settings.telemetry.metrics_addr, registry
        )
        log.info("metrics on tcp", addr=settings.telemetry.metrics_addr, port=settings.telemetry.metrics_port)
    stop_task = asyncio.create_task(stop.wait())
    code = 0
    try:
        servers = {server_task} | ({tcp_task} if tcp_task is not None else set())
        done, _ = await asyncio.wait({load_task, stop_task, *servers}, return_when=asyncio.FIRST_COMPLETED)
        if load_task in done and load_task.exception() is None:
            if settings.mqtt.host:
                mqtt = await start_mqtt(p, engine, recovery)
                transport = mqtt
                background.append(
                    asyncio.create_task(
                        _every(
                            settings.telemetry.interval_s,
                            lambda: transport.publish_telemetry(telemetry.report()),
                        ),
                        name="edged-telemetry",
                    )
                )
            if mqtt is not None:
                await _wait_mqtt(mqtt, stop_task)
            notifier.ready(serving_status(governor.state, governor.hottest_c))
            interval = watchdog_interval()
            if interval:
                stall_s = interval * 2

                def ping() -> None:
                    if engine.healthy(stall_s):
                        notifier.watchdog()
                    else:
                        log.error("engine unhealthy: no watchdog ping", stall_s=stall_s)

                background.append(asyncio.create_task(_every(interval, ping), name="edged-watchdog"))
            snap = engine.snapshot()
            log.info(
                "ready",
                ready_ms=round((time.perf_counter() - started) * 1000, 1),
                backend=snap.backend,
                model=snap.model,
                slots=snap.slots.total,
            )
            done, _ = await asyncio.wait({stop_task, *servers}, return_when=asyncio.FIRST_COMPLETED)
        elif load_task in done:
            load_error = load_task.exception()
            log.error("model failed to load", error=str(load_error))
            code = 1
            if isinstance(load_error, BackendUnavailable):  # a bad model file (ModelFault): configuration
                print(f"edged: {load_error.message}", file=sys.stderr)
                code = 78  # EX_CONFIG, as cli.EXIT_CONFIG
        for task in servers & done:
            log.error(f"the {task.get_name()} server stopped unexpectedly", error=repr(task.exception()))
            code = 1
    finally:
        log.info("shutting down")
        notifier.stopping()
        for task in background:
            task.cancel()
        if metrics_server is not None:
            metrics_server.shutdown()
        if mqtt is not None:
            mqtt.pause_intake()
        if not load_task.done():
            load_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, EdgedError):
            await load_task
        if engine.state is EngineState.READY:
            # Running jobs may finish (and their answers go out); queued ones stay journaled.
            await engine.drain(settings.jobs.drain_s)
        if mqtt is not None:
            await mqtt.stop()
        await engine.stop()
        if journal is not None:
            await asyncio.to_thread(journal.close)
        server.should_exit = True
        if tcp_server is not None:
            tcp_server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await server_task
        if tcp_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await tcp_task
        stop_task.cancel()
        if not inherited:
            unlink_socket(settings.socket.path)
        log.info("stopped", code=code)
    return code
