"""`edged serve`: wire settings, board, backend, engine and transports together and run until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import structlog

from edged import __version__
from edged.backends import BackendChoice, choose_backend
from edged.board import BoardInfo, detect_board
from edged.config import Settings
from edged.engine import Engine
from edged.errors import EdgedError
from edged.transports.mqtt import MqttTransport
from edged.transports.unix import bind_unix_socket, create_app, make_server, unlink_socket

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Plan:
    """What `edged serve` will run, decided before anything heavy is loaded."""

    settings: Settings
    board: BoardInfo
    choice: BackendChoice


def plan(settings: Settings) -> Plan:
    """Detect the board and choose the backend; raises `ConfigError` / `BackendUnavailable`."""
    board = detect_board(settings.board.root, settings.board.profile, settings.board.profiles_dir)
    return Plan(settings, board, choose_backend(board, settings))


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
        "considered": [{"name": n, "available": ok, "reason": why} for n, ok, why in choice.considered],
    }


def presence(p: Plan, engine: Engine) -> dict[str, Any]:
    """What the retained status message says about this device."""
    return {
        "device_id": p.settings.device_id,
        "board": p.board.model,
        "soc": p.board.soc,
        "profile": p.board.profile.name,
        "backend": p.choice.name,
        "model": engine.backend.model_name,
        "version": __version__,
    }


async def serve(p: Plan, started: float) -> int:
    """Run the daemon; returns the process exit code."""
    settings = p.settings
    engine = Engine(settings, p.board, p.choice)

    mqtt: MqttTransport | None = None

    def status() -> dict[str, Any]:
        return {
            "device_id": settings.device_id,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - started_mono, 1),
            "board": board_report(p.board),
            "backend": {**backend_report(p.choice), "details": engine.backend.describe()},
            "model": {
                "name": engine.backend.model_name,
                "path": str(settings.model.path),
                "ctx": engine.backend.n_ctx,
            },
            "engine": engine.status(),
            "mqtt": mqtt.status() if mqtt is not None else None,
        }

    started_mono = time.monotonic()
    sock = bind_unix_socket(settings.socket.path, settings.socket.mode)
    server = make_server(create_app(engine, status))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server_task = asyncio.create_task(server.serve(sockets=[sock]), name="edged-unix")
    log.info("listening", socket=str(settings.socket.path), mode=f"{settings.socket.mode:04o}")
    load_task = asyncio.create_task(engine.start(), name="edged-load")
    stop_task = asyncio.create_task(stop.wait())
    code = 0
    try:
        done, _ = await asyncio.wait({load_task, stop_task, server_task}, return_when=asyncio.FIRST_COMPLETED)
        if load_task in done and load_task.exception() is None:
            if settings.mqtt.host:
                mqtt = MqttTransport(engine, settings, presence(p, engine))
                mqtt.start()
            log.info(
                "ready",
                ready_ms=round((time.perf_counter() - started) * 1000, 1),
                backend=p.choice.name,
                model=engine.backend.model_name,
            )
            done, _ = await asyncio.wait({stop_task, server_task}, return_when=asyncio.FIRST_COMPLETED)
        elif load_task in done:
            exc = load_task.exception()
            log.error("model failed to load", error=str(exc))
            code = 1
        if server_task in done:
            log.error("the socket server stopped unexpectedly", error=repr(server_task.exception()))
            code = 1
    finally:
        log.info("shutting down")
        if mqtt is not None:
            await mqtt.stop()
        if not load_task.done():
            load_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, EdgedError):
            await load_task
        await engine.stop()
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await server_task
        stop_task.cancel()
        unlink_socket(settings.socket.path)
        log.info("stopped", code=code)
    return code
