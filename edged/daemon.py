"""`edged serve`: wire settings, board, backend, engine and transports together and run until told to stop.

Start-up time is part of the product (a restart waits for ``ready``), so this module imports at the
top only what comes before the model load; the HTTP app (FastAPI), the TCP listener and MQTT (paho)
are imported in the steps that run while the model loads or after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from edged import __version__
from edged.backends import BackendChoice, choose_backend
from edged.board import BoardInfo, HostFS, ThermalLimits, detect_board
from edged.cli_common import EXIT_CONFIG, EXIT_DAEMON_ERROR, EXIT_OK
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
from edged.transports.unix_socket import UnixServer, bind_unix_socket, make_server, unlink_socket
from edged.wire import BackendReport, BoardReport, ModelReport, Presence, StatusDocument, Thermals

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from edged.transports.mqtt import MqttTransport

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
        from edged.transports.tcp import check_tls, load_keys

        keys = load_keys(settings.http)
        check_tls(settings.http)
    return Plan(settings, board, choose_backend(board, settings), limits, keys)


def board_report(board: BoardInfo) -> BoardReport:
    return BoardReport(
        model=board.model,
        compatible=board.compatible,
        soc=board.soc,
        source=board.source,
        root=str(board.root),
        profile=board.profile.name,
        profile_file=str(board.profile_origin),
        profile_reason=board.reason,
    )


def considered(choice: BackendChoice) -> list[dict[str, Any]]:
    """Every backend of the profile and why it was (not) chosen, for /status."""
    return [dataclasses.asdict(c) for c in choice.considered]


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


async def serve(p: Plan, started: float) -> int:
    """Run the daemon; returns the process exit code. ``started``: `time.perf_counter` at launch."""
    try:
        journal = open_journal(p.settings)
    except JournalUnavailable as exc:
        log.error(
            "cannot open the job journal", error=exc.message, hint="check journal.path, or journal.enabled"
        )
        return EXIT_CONFIG
    return await Daemon(p, started, journal).run()


@dataclass
class Listeners:
    """The bound sockets and, once `Daemon.start_listeners` ran, their servers and tasks."""

    unix: socket.socket
    inherited: bool
    """The Unix socket came from systemd (socket activation): edged neither binds nor removes it."""
    tcp: socket.socket | None = None
    described: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """What /status says about each listener."""
    servers: list[UnixServer] = dataclasses.field(default_factory=list)
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    """One serving task per server, in the same order (the Unix socket's first)."""


class Daemon:
    """`edged serve` after `plan`: the steps of a start, the wait, and the shutdown, in that order.

    `run` checks first what can refuse the start (the journal's recovery, the listeners' bind), then
    starts the model load on the scheduler's thread, and does the rest of the wiring (the HTTP app,
    its servers, telemetry) while the model loads; clients see 503 ``loading`` until it is ready.
    MQTT starts once the model is loaded (presence, the Receive Maximum and the recovered jobs need
    it), and READY=1 goes to systemd after that. The shutdown undoes it in the reverse order.
    """

    def __init__(self, p: Plan, started: float, journal: Journal | None) -> None:
        settings = p.settings
        self.plan = p
        self.settings = settings
        self.started = started
        self.started_mono = time.monotonic()
        self.journal = journal
        self.intake: JobIntake | None = None
        if journal is not None:
            self.intake = JobIntake(
                JobBook(journal, content=settings.log.content),
                settings.device_id,
                max_attempts=settings.journal.max_attempts,
                local=settings.journal.socket,
            )
        self.recovery: Recovery | None = None
        """What the journal's recovery left to MQTT (None without a journal or when it failed)."""
        self.engine = Engine(settings, p.board, p.choice, self.intake)
        self.notifier = Notifier()
        fs = HostFS(settings.board.root)
        self.governor = ThermalGovernor(fs, p.limits, p.limits.zones, self.on_transition)
        self.telemetry = Telemetry(settings, self.engine, self.governor, fs)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TelemetryCollector(self.telemetry))
        self.mqtt: MqttTransport | None = None
        self.listeners: Listeners | None = None
        self.load_task: asyncio.Task[None] | None = None
        self.background: list[asyncio.Task[None]] = []
        self.metrics_server: WSGIServer | None = None

    # -- the documents ------------------------------------------------------------------------

    def presence_document(self) -> dict[str, Any]:
        """What the retained status message says about this device (read fresh from the engine's
        snapshot, so it follows a backend switch)."""
        board, snap = self.plan.board, self.engine.snapshot()
        return Presence(
            device_id=self.settings.device_id,
            board=board.model,
            soc=board.soc,
            profile=board.profile.name,
            backend=snap.backend,
            model=snap.model,
            slots=snap.slots.total,
            version=__version__,
        ).dump()

    def status_document(self) -> dict[str, Any]:
        """``GET /status``: this process, its board, backend, model, engine, thermals, MQTT, listeners."""
        snap = self.engine.snapshot()
        return StatusDocument(
            device_id=self.settings.device_id,
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self.started_mono, 1),
            board=board_report(self.plan.board),
            backend=BackendReport(
                name=snap.backend,
                forced=self.plan.choice.forced,
                considered=considered(self.plan.choice),
                fallback_reasons=snap.fallback_reasons,
                details=snap.backend_details,
            ),
            model=ModelReport(name=snap.model, path=str(self.settings.model.path), ctx=snap.n_ctx),
            engine=snap.engine_status(),
            thermals=Thermals.model_validate(self.telemetry.thermals()),
            mqtt=self.mqtt.status() if self.mqtt is not None else None,
            listeners=self.listeners.described if self.listeners is not None else [],
        ).dump()

    def on_transition(self, change: Transition) -> None:
        """The thermal governor's state changed: derate or pause the engine, tell systemd and MQTT."""
        hot = change.state in (ThermalState.DERATE, ThermalState.PAUSED)
        derate_s = self.settings.thermal.derate_pause_ms / 1000 if hot else 0.0
        self.engine.apply_thermal(paused=change.state is ThermalState.PAUSED, derate_s=derate_s)
        if self.engine.state is EngineState.READY:
            self.notifier.status(serving_status(change.state, change.temp_c))
        if self.mqtt is not None:
            self.mqtt.publish_telemetry({**self.telemetry.report(), "event": "thermal_transition"})

    # -- the steps of a start -----------------------------------------------------------------

    async def recover(self) -> bool:
        """The journal's recovery, at every start, MQTT or not, before any job is taken. False when
        it failed with MQTT configured: its MQTT jobs would wait unanswered until the next start."""
        if self.intake is None:
            return True
        try:
            self.recovery = await self.intake.recover()
        except EdgedError as exc:
            log.error("cannot read the job journal to recover the last run's jobs", error=exc.message)
            if self.settings.mqtt.host:
                return False
        return True

    def bind_listeners(self) -> Listeners:
        """The Unix socket (or the one systemd passed) and the TCP port, bound before the model
        loads: a socket in use or a port taken fails the start before anything heavy happens."""
        settings = self.settings
        inherited = inherited_sockets()
        if inherited:
            unix = inherited[0]
            log.info("using the socket systemd passed", fds=len(inherited))
        else:
            unix = bind_unix_socket(settings.socket.path, settings.socket.mode)
        listeners = Listeners(unix, inherited=bool(inherited))
        listeners.described.append(
            {"kind": "unix", "path": str(settings.socket.path), "mode": f"{settings.socket.mode:04o}"}
        )
        if settings.http.listen:
            from edged.transports.tcp import bind_tcp
            from edged.transports.tcp import describe as describe_tcp

            listeners.tcp = bind_tcp(settings.http)
            listeners.described.append({"kind": "tcp", **describe_tcp(settings.http, self.plan.http_keys)})
        return listeners

    async def start_engine(self) -> asyncio.Task[None]:
        """Begin loading the model on the scheduler's thread (the engine says ``loading`` meanwhile)."""
        self.notifier.status(f"loading model {self.settings.model.display_name} ({self.plan.choice.name})")
        task = asyncio.create_task(self.engine.start(), name="edged-load")
        await asyncio.sleep(0)  # let engine.start run up to its first await: the load thread is running
        return task

    def start_listeners(self, listeners: Listeners) -> None:
        """The HTTP app and a server on each bound socket (imported and built while the model loads)."""
        from edged.transports.http.app import create_app
        from edged.transports.limits import socket_limits

        settings, keys = self.settings, self.plan.http_keys
        app = create_app(settings, self.engine, self.status_document, lambda: generate_latest(self.registry))
        server = make_server(app, limits=socket_limits(settings.socket, settings.http))
        listeners.servers.append(server)
        listeners.tasks.append(asyncio.create_task(server.serve(sockets=[listeners.unix]), name="edged-unix"))
        log.info("listening", socket=str(settings.socket.path), mode=f"{settings.socket.mode:04o}")
        if listeners.tcp is not None:
            from edged.transports.tcp import KeyGate, listener_options

            tcp_server = make_server(KeyGate(app, settings.http, keys), **listener_options(settings.http))
            listeners.servers.append(tcp_server)
            listeners.tasks.append(
                asyncio.create_task(tcp_server.serve(sockets=[listeners.tcp]), name="edged-tcp")
            )
            log.info(
                "listening on tcp",
                listen=settings.http.listen,
                tls=settings.http.tls.cert is not None,
                keys=sorted(keys),
                anonymous=settings.http.allow_anonymous,
            )

    def start_telemetry(self) -> None:
        """The thermal governor's polling and, when asked for, the Prometheus port."""
        poll = _every(self.settings.thermal.poll_s, self.governor.poll)
        self.background.append(asyncio.create_task(poll, name="edged-governor"))
        cfg = self.settings.telemetry
        if cfg.metrics_port:
            self.metrics_server, _ = start_http_server(cfg.metrics_port, cfg.metrics_addr, self.registry)
            log.info("metrics on tcp", addr=cfg.metrics_addr, port=cfg.metrics_port)

    async def start_mqtt(self) -> MqttTransport:
        """Connect to the broker (the model is loaded: presence and the Receive Maximum read it);
        the recovered MQTT jobs are queued before any new delivery."""
        from edged.transports.mqtt import MqttTransport, Topics

        settings = self.settings
        discovery = None
        if settings.telemetry.homeassistant:
            topics = Topics.build(settings.mqtt.topic_prefix, settings.device_id, settings.mqtt.share_group)
            discovery = discovery_configs(
                settings.telemetry.discovery_prefix,
                settings.device_id,
                topics.telemetry,
                topics.status,
                self.presence_document(),
            )
        transport = MqttTransport(self.engine, settings, self.presence_document, discovery, self.intake)
        self.engine.on_backend_change(transport.publish_presence)
        await transport.start(self.recovery)
        return transport

    async def when_loaded(self, stop: asyncio.Task[Any]) -> None:
        """The model is loaded: MQTT (READY waits for the broker, bounded), READY=1, the watchdog."""
        settings = self.settings
        if settings.mqtt.host:
            self.mqtt = mqtt = await self.start_mqtt()
            self.background.append(
                asyncio.create_task(
                    _every(
                        settings.telemetry.interval_s, lambda: mqtt.publish_telemetry(self.telemetry.report())
                    ),
                    name="edged-telemetry",
                )
            )
            await _wait_mqtt(mqtt, stop)
        self.notifier.ready(serving_status(self.governor.state, self.governor.hottest_c))
        interval = watchdog_interval()
        if interval:
            self.background.append(
                asyncio.create_task(_every(interval, self._watchdog(interval * 2)), name="edged-watchdog")
            )
        snap = self.engine.snapshot()
        log.info(
            "ready",
            ready_ms=round((time.perf_counter() - self.started) * 1000, 1),
            backend=snap.backend,
            model=snap.model,
            slots=snap.slots.total,
        )

    def _watchdog(self, stall_s: float) -> Callable[[], None]:
        def ping() -> None:
            if self.engine.healthy(stall_s):
                self.notifier.watchdog()
            else:
                log.error("engine unhealthy: no watchdog ping", stall_s=stall_s)

        return ping

    # -- run and stop -------------------------------------------------------------------------

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT (or a failure), shut down; returns the exit code."""
        if not await self.recover():
            await self._close_journal()
            return EXIT_DAEMON_ERROR
        self.listeners = listeners = self.bind_listeners()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stop_task = asyncio.create_task(stop.wait())
        code = EXIT_OK
        try:
            self.load_task = load_task = await self.start_engine()
            self.start_listeners(listeners)
            self.start_telemetry()
            if self.settings.mqtt.host:  # paho and the transport load now, start_mqtt runs after the model
                import edged.transports.mqtt  # noqa: F401
            servers = set(listeners.tasks)
            done, _ = await asyncio.wait(
                {load_task, stop_task, *servers}, return_when=asyncio.FIRST_COMPLETED
            )
            if load_task in done and load_task.exception() is None:
                await self.when_loaded(stop_task)
                done, _ = await asyncio.wait({stop_task, *servers}, return_when=asyncio.FIRST_COMPLETED)
            elif load_task in done:
                code = self._load_failed(load_task.exception())
            for task in servers & done:
                log.error(f"the {task.get_name()} server stopped unexpectedly", error=repr(task.exception()))
                code = EXIT_DAEMON_ERROR
        finally:
            await self.shutdown(listeners)
            stop_task.cancel()
            log.info("stopped", code=code)
        return code

    @staticmethod
    def _load_failed(error: BaseException | None) -> int:
        log.error("model failed to load", error=str(error))
        if isinstance(error, BackendUnavailable):  # a bad model file (ModelFault): configuration
            print(f"edged: {error.message}", file=sys.stderr)
            return EXIT_CONFIG
        return EXIT_DAEMON_ERROR

    async def shutdown(self, listeners: Listeners) -> None:
        """Stop taking work, let running jobs finish (``jobs.drain_s``), answer them, release the
        model, close the journal, then the listeners: queued jobs stay journaled for the next start."""
        log.info("shutting down")
        self.notifier.stopping()
        for task in self.background:
            task.cancel()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.mqtt is not None:
            self.mqtt.pause_intake()
        if self.load_task is not None:
            if not self.load_task.done():
                self.load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, EdgedError):
                await self.load_task
        if self.engine.state is EngineState.READY:
            # Running jobs may finish (and their answers go out); queued ones stay journaled.
            await self.engine.drain(self.settings.jobs.drain_s)
        if self.mqtt is not None:
            await self.mqtt.stop()
        await self.engine.stop()
        await self._close_journal()
        for server in listeners.servers:
            server.should_exit = True
        for task in listeners.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not listeners.inherited:
            unlink_socket(self.settings.socket.path)

    async def _close_journal(self) -> None:
        if self.journal is not None:
            await asyncio.to_thread(self.journal.close)
