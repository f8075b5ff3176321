"""`edged fleet serve`: the fleet as a live web page, a JSON API and one Prometheus endpoint.

One `Aggregator` (fed by a `FleetMonitor`) behind a FastAPI app served by uvicorn:

- ``GET /`` - the page (edged/fleet/static: index.html, app.js, style.css; no CDN, no build step),
  a fleet summary and a card per device with small charts of tok/s and the hottest temperature;
- ``GET /events`` - Server-Sent Events: first ``snapshot`` (the ``/api/fleet`` document), then
  ``changes`` at most every `BATCH_S` (the aggregator's events, batched) and at least every
  `SUMMARY_S` (the summary, so ages and rates move without traffic). A page that cannot keep up is
  cut off and its EventSource reconnects to a fresh snapshot, so a slow reader costs bounded memory;
- ``GET /api/fleet`` - summary, devices (worst first), their recent history, counters, problems;
- ``GET /api/devices/{id}`` - one device, its whole history and its last telemetry report;
- ``GET /metrics`` - every device's telemetry with a ``device`` label (edged.fleet.metrics);
- ``GET /health`` - 200 while the broker connection is up and messages arrive, else 503 (the page
  keeps serving): 503 when disconnected, or when no message at all (status or telemetry, from any
  device) arrived for `QUIET_INTERVALS` telemetry intervals (``--interval``), at least `QUIET_MIN_S`
  seconds - a connection that looks up but delivers nothing, or a fleet that has gone silent.

The page is read-only and has no login: bind it to loopback (the default) or put it behind a proxy
that authenticates. Device ids and every other string come from whatever publishes on the broker,
so the page only ever sets them as text, and a Content-Security-Policy allows nothing but this
origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edged import __version__
from edged.fleet.aggregator import OFFLINE, ONLINE, STALE, Aggregator, DeviceState, FleetEvent
from edged.fleet.metrics import CONTENT_TYPE, FleetCollector, exposition, registry

log = structlog.get_logger(__name__)

STATIC = Path(__file__).with_name("static")
PAGE_SERIES = ("decode_tok_s", "tokens_per_s", "hottest_c")
"""The history columns the page charts (and /api/fleet returns)."""
CHART_S = 900.0
"""How far back the page's charts reach (and /api/fleet's history by default)."""
JOBS_WINDOW_S = 60.0
BATCH_S = 0.25
SUMMARY_S = 1.0
CLIENT_QUEUE = 64
"""SSE messages waiting for one page before it is cut off (it reconnects to a fresh snapshot)."""
WATCH_QUEUE = 20_000
"""Aggregator events waiting for the hub (1000 devices every 10 s: 100 a second)."""
QUIET_INTERVALS = 3.0
"""/health is 503 after this many telemetry intervals without any message: the span after which one
device counts as stale (aggregator.STALE_INTERVALS), so "unhealthy" means every device looks stale."""
QUIET_MIN_S = 10.0
"""...and never sooner than this: a short --interval must not make /health flap (30 s at the 10 s
default interval, where this floor does not apply)."""
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class ListenError(ValueError):
    """--listen is not HOST:PORT, or that address cannot be bound."""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT``, or ``:PORT`` / ``PORT`` (loopback) -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        port = rest[1:] if bracket and rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ListenError(f"write an IPv6 address in brackets: [{host}]:{port}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenError(f"--listen takes HOST:PORT (e.g. 127.0.0.1:8088), not {text!r}")
    return host or "127.0.0.1", int(port)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts (a taken port fails fast)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


# -- the summary -----------------------------------------------------------------------------------


class JobRate:
    """Jobs finished across the fleet in the last ``window_s``, from each device's cumulative
    ``jobs.done`` (a fall is a daemon restart: counted from zero, as Prometheus' ``increase``).
    Thread-safe: fed on the event loop, read by API requests in the thread pool too.

    Bounded whatever a device publishes: reports less than `SAMPLE_GAP_S` apart without a restart
    between them are merged (the increments add up the same), so a steady device keeps about one
    sample a second; at most `MAX_SAMPLES` per device (a device "restarting" at every report loses
    its oldest samples, and only its own count is the poorer for it)."""

    SAMPLE_GAP_S = 1.0
    MAX_SAMPLES = 256

    def __init__(self, window_s: float = JOBS_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def add(self, device_id: str, at: float, jobs_done: int | None) -> None:
        if jobs_done is None:
            return
        with self._lock:
            samples = self._samples.setdefault(device_id, deque(maxlen=self.MAX_SAMPLES))
            if samples and at < samples[-1][0]:
                pass  # out of order: dropped
            elif (
                len(samples) >= 2
                and at - samples[-2][0] < self.SAMPLE_GAP_S
                and samples[-2][1] <= samples[-1][1] <= jobs_done
            ):
                samples[-1] = (at, jobs_done)  # no restart in between: the increments telescope
            else:
                samples.append((at, jobs_done))
            while len(samples) > 2 and samples[1][0] <= at - self.window_s:
                samples.popleft()  # keep one sample at or before the window's start

    def remove(self, device_id: str) -> None:
        with self._lock:
            self._samples.pop(device_id, None)

    def jobs(self, now: float) -> float:
        start = now - self.window_s
        total = 0
        with self._lock:
            for samples in self._samples.values():
                while len(samples) > 1 and samples[1][0] <= start:
                    samples.popleft()
                previous = None
                for _, done in samples:
                    if previous is not None:
                        total += done - previous if done >= previous else done
                    previous = done
        return float(total)


def summary(devices: list[DeviceState], jobs_per_min: float, now: float) -> dict[str, Any]:
    """Devices by state, the fleet's generated tok/s (online devices), jobs per minute, the hottest
    online device and how many are throttled."""
    online = [d for d in devices if d.state == ONLINE]
    hot = [d for d in online if d.hottest_c is not None]
    hottest = max(hot, key=lambda d: d.hottest_c or 0.0) if hot else None
    tokens = [d.tokens_per_s for d in online if d.tokens_per_s is not None]
    decode = [d.decode_tok_s for d in online if d.decode_tok_s is not None]
    return {
        "devices": len(devices),
        "online": len(online),
        "stale": sum(1 for d in devices if d.state == STALE),
        "offline": sum(1 for d in devices if d.state == OFFLINE),
        "tokens_per_s": round(sum(tokens), 2) if tokens else None,
        "decode_tok_s_mean": round(sum(decode) / len(decode), 2) if decode else None,
        "jobs_per_min": round(jobs_per_min, 2),
        "jobs_window_s": JOBS_WINDOW_S,
        "hottest": None
        if hottest is None
        else {"device_id": hottest.device_id, "hottest_c": hottest.hottest_c, "zone": hottest.hottest_zone},
        "throttled": sum(1 for d in online if d.throttled),
        "queue_depth": sum(d.queue_depth or 0 for d in online),
        "at": round(now, 3),
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return f"event: {event}\ndata: {text}\n\n".encode()


def _finite(value: Any) -> Any:
    """NaN/inf (never in the aggregator's output, but JSON must not carry them) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class Hub:
    """Reads the aggregator's events (one `Aggregator.watch` queue for every page), keeps the jobs
    rate, and fans batched SSE messages out to the pages, each through its own bounded queue."""

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        batch_s: float = BATCH_S,
        summary_s: float = SUMMARY_S,
        client_queue: int = CLIENT_QUEUE,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.aggregator = aggregator
        self.batch_s = batch_s
        self.summary_s = summary_s
        self.client_queue = client_queue
        self.wall = wall
        self.jobs = JobRate()
        self._clients: set[asyncio.Queue[bytes | None]] = set()
        self._closing = False
        self.cut_off = 0
        """Pages disconnected for falling behind."""
        self.sent = 0
        self._summary: dict[str, Any] | None = None
        self._summary_at = -math.inf
        self._summary_lock = threading.Lock()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def summary(self) -> dict[str, Any]:
        """The fleet summary, computed at most once per ``summary_s / 2``."""
        with self._summary_lock:
            now = time.monotonic()
            if self._summary is None or now - self._summary_at >= self.summary_s / 2:
                wall = self.wall()
                self._summary = summary(self.aggregator.snapshot(), self.jobs.jobs(wall), wall)
                self._summary_at = now
            return self._summary

    def _take(self, event: FleetEvent) -> None:
        if event.kind == "removed":
            self.jobs.remove(event.device_id)
        elif event.kind == "telemetry" and event.device is not None:
            self.jobs.add(event.device_id, event.at, event.device.jobs_done)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with self.aggregator.watch(loop, maxsize=WATCH_QUEUE) as events:
            # Devices known before the first event (a retained status arrived before startup).
            for device in self.aggregator.snapshot():
                self.jobs.add(device.device_id, self.wall(), device.jobs_done)
            dropped = 0
            while not self._closing:
                batch: list[FleetEvent] = []
                with contextlib.suppress(asyncio.TimeoutError):
                    batch.append(await asyncio.wait_for(events.get(), self.summary_s))
                    await asyncio.sleep(self.batch_s)  # let the rest of the burst arrive
                while not events.queue.empty():
                    batch.append(events.queue.get_nowait())
                for event in batch:
                    self._take(event)
                with self._summary_lock:
                    self._summary = None
                if events.dropped != dropped:  # the hub fell behind: every page starts over
                    dropped = events.dropped
                    if self._clients:
                        log.warning("fleet page events dropped; pages resynchronise", dropped=dropped)
                        self.broadcast(None)
                    continue
                if not self._clients:
                    continue
                message = {
                    "events": [_finite(e.to_dict()) for e in batch],
                    "summary": self.summary(),
                    "counters": self.aggregator.counters(),
                }
                self.broadcast(_sse("changes", message))

    def broadcast(self, message: bytes | None) -> None:
        """``message`` to every page; None ends every stream (the pages reconnect)."""
        for queue in list(self._clients):
            if message is None:
                self._end(queue)
                continue
            try:
                queue.put_nowait(message)
                self.sent += 1
            except asyncio.QueueFull:
                self.cut_off += 1
                self._end(queue)

    def _end(self, queue: asyncio.Queue[bytes | None]) -> None:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)
        self._clients.discard(queue)

    def connect(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(self.client_queue)
        if self._closing:
            queue.put_nowait(None)
        else:
            self._clients.add(queue)
        return queue

    def disconnect(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._clients.discard(queue)

    def close(self) -> None:
        """End every stream now (the server is stopping: it need not wait for them)."""
        self._closing = True
        self.broadcast(None)

    def metrics(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("edged_fleet_sse_clients", "Pages connected to /events", value=self.clients)
        yield CounterMetricFamily(
            "edged_fleet_sse_cut_off", "Pages disconnected for falling behind", value=self.cut_off
        )


# -- the app -----------------------------------------------------------------------------------------


class SecurityHeaders:
    """CSP and friends on every response (pure ASGI: it leaves the SSE stream alone)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", CSP)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if scope["path"].startswith("/static/"):
                    headers["Cache-Control"] = "no-cache"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def fleet_document(
    aggregator: Aggregator,
    hub: Hub,
    *,
    broker: str | None,
    topic_prefix: str,
    connected: bool | None,
    history_s: float | None,
) -> dict[str, Any]:
    """What /api/fleet returns and /events sends first."""
    devices = aggregator.snapshot()
    history: dict[str, Any] = {}
    if history_s is not None and history_s > 0:
        since = hub.wall() - history_s
        for device in devices:
            series = aggregator.history(device.device_id, PAGE_SERIES, since=since)
            if series is not None:
                history[device.device_id] = series
    return _finite(
        {
            "broker": broker,
            "topic_prefix": topic_prefix,
            "connected": connected,
            "version": __version__,
            "generated_at": round(hub.wall(), 3),
            "resolution_s": aggregator.resolution_s,
            "history_s": aggregator.history_s,
            "chart_s": min(CHART_S, aggregator.history_s),
            "summary": hub.summary(),
            "devices": [d.to_dict() for d in devices],
            "history": history,
            "counters": aggregator.counters(),
            "problems": aggregator.problems(),
        }
    )


def create_app(
    aggregator: Aggregator,
    *,
    broker: str | None = None,
    topic_prefix: str = "edged",
    connected: Callable[[], bool] | None = None,
    hub: Hub | None = None,
    quiet_intervals: float = QUIET_INTERVALS,
) -> FastAPI:
    """The web app over ``aggregator``; ``connected`` reports the broker connection (None: no broker,
    e.g. an aggregator fed in-process; then /health does not judge silence either)."""
    hub = hub or Hub(aggregator)
    quiet_limit_s = max(quiet_intervals * aggregator.default_interval_s, QUIET_MIN_S)
    collector = FleetCollector(aggregator, connected=connected, extra=hub.metrics)
    metrics_registry = registry(collector)

    def is_connected() -> bool | None:
        return connected() if connected is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(hub.run(), name="edged-fleet-hub")
        try:
            yield
        finally:
            hub.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="edged fleet",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.hub = hub
    app.add_middleware(SecurityHeaders)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/health")
    def health() -> JSONResponse:
        up = is_connected()
        idle_s = aggregator.idle_s()
        quiet = up is not None and idle_s > quiet_limit_s
        if up is False:
            status = "broker disconnected"
        elif quiet:
            status = f"no message for {idle_s:.0f} s (limit {quiet_limit_s:g} s)"
        else:
            status = "ok"
        body = {
            "status": status,
            "broker": broker,
            "connected": up,
            "devices": aggregator.counters()["devices"],
            "last_message_s": round(idle_s, 3),
            "quiet_limit_s": quiet_limit_s,
            "version": __version__,
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/api/fleet")
    def api_fleet(
        history: bool = True,
        since_s: float = Query(CHART_S, gt=0, description="History of the last this many seconds"),
    ) -> JSONResponse:
        return JSONResponse(
            fleet_document(
                aggregator,
                hub,
                broker=broker,
                topic_prefix=topic_prefix,
                connected=is_connected(),
                history_s=since_s if history else None,
            )
        )

    @app.get("/api/devices/{device_id:path}")
    def api_device(device_id: str) -> JSONResponse:
        device = aggregator.device(device_id)
        if device is None:
            return JSONResponse({"error": f"no device {device_id!r}"}, status_code=404)
        return JSONResponse(
            _finite(
                {
                    "device": device.to_dict(),
                    "history": aggregator.history(device_id),
                    "report": aggregator.latest_report(device_id),
                }
            )
        )

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(exposition(metrics_registry), media_type=CONTENT_TYPE)

    @app.get("/events")
    async def events() -> StreamingResponse:
        queue = hub.connect()

        async def stream() -> AsyncIterator[bytes]:
            try:
                document = await asyncio.to_thread(
                    fleet_document,
                    aggregator,
                    hub,
                    broker=broker,
                    topic_prefix=topic_prefix,
                    connected=is_connected(),
                    history_s=CHART_S,
                )
                yield b"retry: 2000\n\n" + _sse("snapshot", document)
                while (message := await queue.get()) is not None:
                    yield message
            finally:
                hub.disconnect(queue)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return app


class Server(uvicorn.Server):
    """uvicorn, ending the SSE streams as soon as it is told to stop (else it would wait for them)."""

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    def handle_exit(self, sig: int, frame: Any) -> None:
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_soon_threadsafe(self.hub.close)
        super().handle_exit(sig, frame)


class _Stop(Exception):
    """SIGTERM, re-raised by uvicorn once it has shut down gracefully."""


def _stop(_sig: int, _frame: Any) -> None:
    raise _Stop


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` on the bound ``sock`` until SIGINT or SIGTERM, then return (uvicorn shuts down
    gracefully, then re-raises the signal into the handler it found: here one that ends the run)."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        ws="none",
        timeout_graceful_shutdown=5,
    )
    server = Server(config, app.state.hub)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if main else None
    try:
        server.run(sockets=[sock])
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
