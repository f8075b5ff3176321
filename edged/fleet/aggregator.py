"""The fleet aggregator: every device's retained status and periodic telemetry, as one live view.

`Aggregator` is the state machine, fed one MQTT message at a time (`Aggregator.handle`) and free of
any network code, so `FleetMonitor` (a broker connection plus a ticker thread), `edged fleet` and a
later web page (`edged fleet serve`: SSE and ``/metrics``) all read the same API:

- `Aggregator.snapshot` - every device as a frozen `DeviceState` (``to_dict()`` for JSON), worst first;
- `Aggregator.history` - a device's series over time (decode tok/s, hottest °C, queue depth, ...);
- `Aggregator.latest_report` - a device's last telemetry document as it was published;
- `Aggregator.counters` / `Aggregator.problems` - messages seen, malformed, unknown schema, ...;
- `Aggregator.subscribe` (a callback) and `Aggregator.watch` (an asyncio queue, for SSE) - changes.

Every method is thread-safe (one lock; callbacks run outside it).

A device is ``online`` while it reports, ``stale`` when nothing was heard from it for
``stale_intervals`` (3) telemetry intervals, and ``offline`` on its retained ``offline`` status (a
clean stop) or its Last Will (a crash or a lost connection) - unless telemetry arrives after that,
which proves it is back. The interval is the ``interval_s`` a report or status carries if any, else
the median gap between its recent reports, else ``default_interval_s`` (10 s, telemetry.interval_s).

Memory is bounded: at most ``max_devices`` (1000) devices - a new one evicts the one offline the
longest, else the one stale the longest, else it is refused (counted); per device a history of
``history_points`` (360) points, one per ``history_s / history_points`` seconds (a later report in
the same bucket replaces the point), so 60 minutes at 10 s resolution, stored in ``array('d')``
columns (8 bytes a value: 8 columns x 360 points = 23 KiB a device); and the last raw report,
refused above ``max_payload_bytes`` (64 KiB; a real report is 2-6 KiB). Measured
(tests/test_fleet.py): 32 KiB a device with a full history and a 5 KiB report (a ROCK 5B's), so
about 32 MiB for 1000 devices; at most about 90 MiB if every device sent 64 KiB reports.

A malformed message (not UTF-8 JSON, nested too deeply for the parser, an integer of more digits
than Python converts, not an object, wrong types, too large, a bad device id) or one with an unknown
telemetry schema is counted and skipped, never fatal: `handle` catches any exception a message
causes, so one device publishing ``[[[[...`` cannot stop the view of the others.

`Aggregator.idle_s` is how long no message at all has arrived: ``edged fleet serve``'s ``/health``
turns unhealthy on it (a dead or silently unsubscribed connection, or a fleet gone quiet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics
import threading
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel

from edged.mqtt.broker import BrokerOptions
from edged.mqtt.client import Connection
from edged.wire import GovernorStatus, Presence, SlotFigures, TelemetryReport, Thermals, Unreadable, lenient

log = structlog.get_logger(__name__)
M = TypeVar("M", bound=BaseModel)

SCHEMAS = frozenset({1})
"""Telemetry schemas this aggregator reads (edged.telemetry.report.SCHEMA)."""
ONLINE, STALE, OFFLINE = "online", "stale", "offline"
STATES = (ONLINE, STALE, OFFLINE)
DEFAULT_INTERVAL_S = 10.0
STALE_INTERVALS = 3
MAX_DEVICES = 1000
HISTORY_POINTS = 360
HISTORY_S = 3600.0
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_DEVICE_ID = 128
GAPS_KEPT = 8
PROBLEMS_KEPT = 20
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.2, 3600.0

SERIES = (
    "decode_tok_s",
    "tokens_per_s",
    "s_per_1k_tokens",
    "ttft_ms_p50",
    "hottest_c",
    "queue_depth",
    "throttled",
)
"""The history's columns (besides ``t``, the wall-clock time of the report's arrival)."""


class Malformed(ValueError):
    """A message that cannot be read; counted and skipped."""


class UnknownSchema(ValueError):
    """A telemetry document of a schema this aggregator does not know; counted and skipped."""


@dataclass(frozen=True)
class DeviceState:
    """One device as the fleet sees it; plain data (``to_dict()`` is JSON-ready)."""

    device_id: str
    state: str
    """online, stale or offline."""
    board: str | None = None
    soc: str | None = None
    profile: str | None = None
    backend: str | None = None
    model: str | None = None
    version: str | None = None
    slots: int | None = None
    engine_state: str | None = None
    queue_depth: int | None = None
    queue_max_depth: int | None = None
    decode_tok_s: float | None = None
    tokens_per_s: float | None = None
    s_per_1k_tokens: float | None = None
    ttft_ms_p50: float | None = None
    window: str | None = None
    """The throughput window the figures above summarise (e.g. ``1m``)."""
    hottest_c: float | None = None
    hottest_zone: str | None = None
    throttled: bool | None = None
    governor: str | None = None
    """The thermal governor's state (normal, warm, derate, paused, ...)."""
    jobs_done: int | None = None
    last_seen: float | None = None
    """Wall-clock time of the last telemetry report (None: none heard since the aggregator started)."""
    last_seen_s: float | None = None
    """Seconds since then, at the time of the snapshot."""
    last_status: str | None = None
    """What the retained status said last (online/offline), None if no status was seen."""
    interval_s: float = DEFAULT_INTERVAL_S
    """The telemetry interval staleness is judged by."""
    since: float | None = None
    """Wall-clock time of the last change of ``state``."""
    reports: int = 0
    """Telemetry reports received from this device since the aggregator started."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FleetEvent:
    """A change: ``status`` (a status message), ``telemetry`` (a report), ``state`` (online/stale/
    offline changed; ``previous`` says from what) or ``removed`` (evicted, or its retained status
    cleared)."""

    kind: str
    device_id: str
    at: float
    device: DeviceState | None = None
    previous: str | None = None
    point: dict[str, float | None] | None = None
    """For ``telemetry``: the history point it added (``t`` and `SERIES`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "device_id": self.device_id,
            "at": self.at,
            "device": self.device.to_dict() if self.device is not None else None,
            "previous": self.previous,
            "point": self.point,
        }


STATE_RANK = {OFFLINE: 0, STALE: 1, ONLINE: 2}


def worst_first(device: DeviceState) -> tuple[Any, ...]:
    """Sort key: offline, then stale, then online; within each, throttled first, then hottest."""
    hottest = device.hottest_c if device.hottest_c is not None else -math.inf
    return (STATE_RANK.get(device.state, 0), not device.throttled, -hottest, device.device_id)


class _Ring:
    """Fixed-size columns of float64 (NaN = no value): the bounded history of one device."""

    __slots__ = ("bucket", "columns", "count", "next")

    def __init__(self, size: int) -> None:
        blank = array("d", [math.nan]) * size
        self.columns = {name: array("d", blank) for name in ("t", *SERIES)}
        self.next = 0
        self.count = 0
        self.bucket: int | None = None

    def add(self, point: dict[str, float | None], bucket: int) -> None:
        size = len(self.columns["t"])
        if self.bucket == bucket and self.count:
            index = (self.next - 1) % size  # same bucket: the newer report replaces the point
        else:
            index = self.next
            self.next = (self.next + 1) % size
            self.count = min(self.count + 1, size)
            self.bucket = bucket
        for name, column in self.columns.items():
            value = point.get(name)
            column[index] = math.nan if value is None else float(value)

    def series(self, names: tuple[str, ...], since: float | None) -> dict[str, list[float | None]]:
        size = len(self.columns["t"])
        start = (self.next - self.count) % size
        order = [(start + i) % size for i in range(self.count)]
        times = self.columns["t"]
        if since is not None:
            order = [i for i in order if times[i] >= since]
        return {
            name: [None if math.isnan(v := self.columns[name][i]) else v for i in order]
            for name in ("t", *names)
        }


@dataclass
class _Device:
    device_id: str
    history: _Ring
    first_heard: float
    """Monotonic time we first heard of it."""
    status: dict[str, Any] = field(default_factory=dict)
    status_state: str | None = None
    status_at: float | None = None
    """Monotonic time of the last status message."""
    reading: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None
    telemetry_at: float | None = None
    """Monotonic time of the last telemetry report."""
    last_seen: float | None = None
    """Wall-clock time of the last telemetry report."""
    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=GAPS_KEPT))
    periodic_at: float | None = None
    """Monotonic time of the last periodic report (event reports excluded from the gaps)."""
    announced_interval: float | None = None
    reports: int = 0
    state: str | None = None
    """online/stale/offline; None until first judged (its first ``state`` event has no previous)."""
    since: float = 0.0
    """Wall-clock time of the last state change."""


def _decode(payload: bytes, limit: int) -> dict[str, Any]:
    if len(payload) > limit:
        raise Malformed(f"payload of {len(payload)} bytes exceeds {limit}")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except RecursionError:  # b"[" * 60000: deeper than the parser's recursion limit
        raise Malformed("JSON nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, an int of > 4300 digits
        raise Malformed(f"not UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise Malformed("not a JSON object")
    return doc


def _float(value: float | None) -> float | None:
    """A number as the fleet keeps it (a float, as JSON writes the figures back)."""
    return float(value) if value is not None else None


def _read(model: type[M], doc: dict[str, Any], shapes: frozenset[str] = frozenset()) -> M:
    """``doc`` as the wire model, each field of a wrong type left out; raises `Malformed`."""
    try:
        return lenient(model, doc, shapes=shapes)[0]
    except Unreadable as exc:
        raise Malformed(str(exc)) from None


TELEMETRY_SHAPES = frozenset(
    {
        "queue",
        "summary",
        "slots",
        "jobs",
        "thermals",
        "thermals.governor",
        "thermals.zones",
        "thermals.zones.*",
    }
)
"""The parts of a telemetry report that must be objects (lists) for it to be read at all."""


def parse_status(doc: dict[str, Any]) -> dict[str, Any]:
    """The retained status document (`edged.wire.Presence`) -> the fields kept; raises `Malformed`."""
    state = doc.get("state")
    if state not in (ONLINE, OFFLINE):
        raise Malformed(f"status state must be online or offline, not {state!r}")
    presence = _read(Presence, doc)
    return {
        "state": state,
        "board": presence.board,
        "soc": presence.soc,
        "profile": presence.profile,
        "backend": presence.backend,
        "model": presence.model,
        "version": presence.version,
        "slots": presence.slots,
        "interval_s": _float(presence.interval_s),
    }


def parse_telemetry(doc: dict[str, Any]) -> dict[str, Any]:
    """A telemetry document (`edged.wire.TelemetryReport`) -> the fields kept; raises `UnknownSchema`
    or `Malformed`."""
    schema = doc.get("schema")
    if isinstance(schema, bool) or schema not in SCHEMAS:
        raise UnknownSchema(f"telemetry schema {schema!r} (known: {sorted(SCHEMAS)})")
    report = _read(TelemetryReport, doc, TELEMETRY_SHAPES)
    summary = report.summary
    thermals = report.thermals or Thermals()
    governor = thermals.governor or GovernorStatus()
    hottest_c: float | None = None
    hottest_zone: str | None = None
    for zone in thermals.zones or []:
        if zone.temp_c is not None and (hottest_c is None or zone.temp_c > hottest_c):
            hottest_c, hottest_zone = float(zone.temp_c), zone.type or zone.zone
    if hottest_c is None:
        hottest_c = _float(summary.hottest_c)
        hottest_zone = governor.hottest_zone
    slots = report.slots or SlotFigures()
    return {
        "backend": report.backend,
        "model": report.model,
        "version": report.version,
        "engine_state": report.state,
        "slots": slots.total,
        "queue_depth": report.queue.depth,
        "queue_max_depth": report.queue.max_depth,
        "decode_tok_s": _float(summary.decode_tokens_per_s),
        "tokens_per_s": _float(summary.tokens_per_s),
        "s_per_1k_tokens": _float(summary.s_per_1k_tokens),
        "ttft_ms_p50": _float(summary.ttft_ms_p50),
        "window": summary.window,
        "hottest_c": hottest_c,
        "hottest_zone": hottest_zone,
        "throttled": summary.throttled,
        "governor": summary.thermal_state or governor.state,
        "jobs_done": (report.jobs or {}).get("done"),
        "interval_s": _float(report.interval_s),
        "event": report.event,
    }


class EventQueue:
    """Fleet events delivered into an asyncio queue (for SSE); the oldest are dropped when full."""

    def __init__(self, aggregator: Aggregator, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self.queue: asyncio.Queue[FleetEvent] = asyncio.Queue(maxsize)
        self.dropped = 0
        self._loop = loop
        self._unsubscribe = aggregator.subscribe(self._from_any_thread)

    def _from_any_thread(self, event: FleetEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: FleetEvent) -> None:
        while self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self) -> FleetEvent:
        return await self.queue.get()

    def close(self) -> None:
        self._unsubscribe()

    def __enter__(self) -> EventQueue:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Aggregator:
    """Latest state, bounded history and counters of every device under ``prefix``; thread-safe.

    ``clock`` (monotonic seconds) judges staleness, ``wall`` stamps times for people; both are
    injectable for tests of the state machine.
    """

    def __init__(
        self,
        *,
        prefix: str = "edged",
        default_interval_s: float = DEFAULT_INTERVAL_S,
        stale_intervals: float = STALE_INTERVALS,
        max_devices: int = MAX_DEVICES,
        history_points: int = HISTORY_POINTS,
        history_s: float = HISTORY_S,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if max_devices < 1 or history_points < 1 or history_s <= 0 or default_interval_s <= 0:
            raise ValueError("max_devices, history_points, history_s and default_interval_s must be positive")
        self.prefix = prefix.rstrip("/")
        self.default_interval_s = default_interval_s
        self.stale_intervals = stale_intervals
        self.max_devices = max_devices
        self.history_points = history_points
        self.history_s = history_s
        self.resolution_s = history_s / history_points
        self.max_payload_bytes = max_payload_bytes
        self._clock = clock
        self._wall = wall
        self._started = clock()
        self._last_message: float | None = None
        """Monotonic time of the last message of any kind (None: none yet)."""
        self._unexpected: set[str] = set()
        """Exception types already logged as unexpected (each logged once, then only counted)."""
        self._lock = threading.RLock()
        self._devices: dict[str, _Device] = {}
        self._listeners: dict[int, Callable[[FleetEvent], None]] = {}
        self._next_listener = 0
        self._problems: deque[dict[str, Any]] = deque(maxlen=PROBLEMS_KEPT)
        self._counters = dict.fromkeys(
            (
                "messages",
                "status",
                "telemetry",
                "malformed",
                "unknown_schema",
                "ignored",
                "devices_evicted",
                "devices_refused",
                "listener_errors",
            ),
            0,
        )

    # -- input ------------------------------------------------------------------------------------

    @property
    def topics(self) -> list[str]:
        """What to subscribe to."""
        return [f"{self.prefix}/+/status", f"{self.prefix}/+/telemetry"]

    def handle(self, topic: str, payload: bytes) -> None:
        """Take one message from ``<prefix>/<device>/status`` or ``.../telemetry``; never raises
        for bad input (it is counted in ``malformed``/``unknown_schema``/``ignored``), whatever the
        input: it runs in the MQTT client's network thread, which an exception would end."""
        events: list[FleetEvent] = []
        with self._lock:
            self._counters["messages"] += 1
            self._last_message = self._clock()
            head = self.prefix + "/"
            rest = topic[len(head) :] if topic.startswith(head) else ""
            device_id, _, kind = rest.rpartition("/")
            if kind not in ("status", "telemetry") or not device_id or "/" in device_id:
                self._counters["ignored"] += 1
                return
            self._counters[kind] += 1
            try:
                if len(device_id) > MAX_DEVICE_ID:
                    raise Malformed(f"device id longer than {MAX_DEVICE_ID} characters")
                if kind == "status":
                    self._status(device_id, bytes(payload), events)
                else:
                    self._telemetry(device_id, bytes(payload), events)
            except UnknownSchema as exc:
                self._skip("unknown_schema", topic, str(exc))
            except Malformed as exc:
                self._skip("malformed", topic, str(exc))
            except Exception as exc:  # a case the parsers above did not foresee: still only this message
                name = type(exc).__name__
                self._skip("malformed", topic, f"unexpected {name}: {str(exc)[:200]}")
                if name not in self._unexpected:
                    self._unexpected.add(name)
                    log.warning(
                        "fleet message skipped on an unexpected error", topic=topic[:200], exc_info=True
                    )
        self._emit(events)

    def idle_s(self) -> float:
        """Seconds since the last message of any kind (valid or not), or since the aggregator
        started if none has arrived yet."""
        with self._lock:
            last = self._last_message if self._last_message is not None else self._started
            return max(0.0, self._clock() - last)

    def _skip(self, counter: str, topic: str, reason: str) -> None:
        self._counters[counter] += 1
        self._problems.append({"at": self._wall(), "topic": topic[:200], "kind": counter, "reason": reason})
        log.debug("fleet message skipped", topic=topic[:200], kind=counter, reason=reason)

    def _status(self, device_id: str, payload: bytes, events: list[FleetEvent]) -> None:
        if not payload:  # the retained status was cleared: the device is gone from the fleet
            if self._devices.pop(device_id, None) is not None:
                events.append(FleetEvent("removed", device_id, self._wall(), previous="cleared"))
            return
        status = parse_status(_decode(payload, self.max_payload_bytes))
        device = self._device(device_id, events)
        if device is None:
            return
        device.status = status
        device.status_state = status["state"]
        device.status_at = self._clock()
        if status["interval_s"] is not None:
            device.announced_interval = status["interval_s"]
        self._rejudge(device, self._clock(), self._wall(), events)
        events.append(FleetEvent("status", device_id, self._wall(), self._state_of(device)))

    def _telemetry(self, device_id: str, payload: bytes, events: list[FleetEvent]) -> None:
        reading = parse_telemetry(_decode(payload, self.max_payload_bytes))
        device = self._device(device_id, events)
        if device is None:
            return
        now, wall = self._clock(), self._wall()
        if reading["event"] is None:  # periodic: its gap estimates the interval
            if device.periodic_at is not None:
                device.gaps.append(now - device.periodic_at)
            device.periodic_at = now
        if reading["interval_s"] is not None:
            device.announced_interval = reading["interval_s"]
        device.reading = reading
        device.raw = payload
        device.telemetry_at = now
        device.last_seen = wall
        device.reports += 1
        point: dict[str, float | None] = {"t": wall, **{name: reading[name] for name in SERIES}}
        device.history.add(point, math.floor(wall / self.resolution_s))
        self._rejudge(device, now, wall, events)
        events.append(FleetEvent("telemetry", device_id, wall, self._state_of(device), point=point))

    def _device(self, device_id: str, events: list[FleetEvent]) -> _Device | None:
        """The device's record, made (evicting if the fleet is full) if new; None if refused."""
        device = self._devices.get(device_id)
        if device is not None:
            return device
        if len(self._devices) >= self.max_devices:
            events.extend(self._refresh())
            candidates = [d for d in self._devices.values() if d.state in (STALE, OFFLINE)]
            if not candidates:
                self._counters["devices_refused"] += 1
                self._problems.append(
                    {"at": self._wall(), "topic": device_id, "kind": "devices_refused", "reason": "full"}
                )
                return None
            victim = min(candidates, key=lambda d: (STATE_RANK[d.state or ONLINE], self._heard(d)))
            del self._devices[victim.device_id]
            self._counters["devices_evicted"] += 1
            events.append(FleetEvent("removed", victim.device_id, self._wall(), previous="evicted"))
        device = _Device(device_id, _Ring(self.history_points), self._clock(), since=self._wall())
        self._devices[device_id] = device
        return device

    # -- the state machine ------------------------------------------------------------------------

    def _interval(self, device: _Device) -> float:
        if device.announced_interval is not None:
            value = device.announced_interval
        elif device.gaps:
            value = statistics.median(device.gaps)
        else:
            value = self.default_interval_s
        return min(max(value, MIN_INTERVAL_S), MAX_INTERVAL_S)

    @staticmethod
    def _heard(device: _Device) -> float:
        """Monotonic time of the last sign of life: telemetry, an online status, or first contact."""
        times = [device.first_heard]
        if device.telemetry_at is not None:
            times.append(device.telemetry_at)
        if device.status_at is not None and device.status_state == ONLINE:
            times.append(device.status_at)
        return max(times)

    def _judge(self, device: _Device, now: float) -> str:
        if (
            device.status_state == OFFLINE
            and device.status_at is not None
            and (device.telemetry_at is None or device.telemetry_at <= device.status_at)
        ):
            return OFFLINE
        if now - self._heard(device) > self.stale_intervals * self._interval(device):
            return STALE
        return ONLINE

    def _rejudge(self, device: _Device, now: float, wall: float, events: list[FleetEvent]) -> None:
        state = self._judge(device, now)
        if state != device.state:
            previous, device.state, device.since = device.state, state, wall
            events.append(FleetEvent("state", device.device_id, wall, self._state_of(device), previous))
            log.info("fleet device state", device_id=device.device_id, previous=previous, state=state)

    def _refresh(self) -> list[FleetEvent]:
        """Judge every device again; the transitions as events (called with the lock held)."""
        now, wall = self._clock(), self._wall()
        events: list[FleetEvent] = []
        for device in self._devices.values():
            self._rejudge(device, now, wall, events)
        return events

    def tick(self) -> None:
        """Judge staleness now (FleetMonitor calls this a few times a second): a device goes
        stale by time passing, not by a message."""
        with self._lock:
            events = self._refresh()
        self._emit(events)

    def _state_of(self, device: _Device) -> DeviceState:
        status, reading = device.status, device.reading
        wall = self._wall()
        return DeviceState(
            device_id=device.device_id,
            state=device.state or ONLINE,
            board=status.get("board"),
            soc=status.get("soc"),
            profile=status.get("profile"),
            backend=reading.get("backend") or status.get("backend"),
            model=reading.get("model") or status.get("model"),
            version=reading.get("version") or status.get("version"),
            slots=reading.get("slots") if reading.get("slots") is not None else status.get("slots"),
            engine_state=reading.get("engine_state"),
            queue_depth=reading.get("queue_depth"),
            queue_max_depth=reading.get("queue_max_depth"),
            decode_tok_s=reading.get("decode_tok_s"),
            tokens_per_s=reading.get("tokens_per_s"),
            s_per_1k_tokens=reading.get("s_per_1k_tokens"),
            ttft_ms_p50=reading.get("ttft_ms_p50"),
            window=reading.get("window"),
            hottest_c=reading.get("hottest_c"),
            hottest_zone=reading.get("hottest_zone"),
            throttled=reading.get("throttled"),
            governor=reading.get("governor"),
            jobs_done=reading.get("jobs_done"),
            last_seen=device.last_seen,
            last_seen_s=round(wall - device.last_seen, 3) if device.last_seen is not None else None,
            last_status=device.status_state,
            interval_s=round(self._interval(device), 3),
            since=device.since,
            reports=device.reports,
        )

    # -- output -----------------------------------------------------------------------------------

    def snapshot(self, worst_first_order: bool = True) -> list[DeviceState]:
        """Every device, judged now: worst first (offline, stale, throttled, hottest), else by id."""
        with self._lock:
            events = self._refresh()
            devices = [self._state_of(d) for d in self._devices.values()]
        self._emit(events)
        return sorted(devices, key=worst_first if worst_first_order else lambda d: d.device_id)

    def device(self, device_id: str) -> DeviceState | None:
        with self._lock:
            events = self._refresh()
            found = self._devices.get(device_id)
            state = self._state_of(found) if found is not None else None
        self._emit(events)
        return state

    def history(
        self, device_id: str, series: tuple[str, ...] = SERIES, since: float | None = None
    ) -> dict[str, list[float | None]] | None:
        """``{"t": [...], "decode_tok_s": [...], ...}`` oldest first (``t`` wall-clock seconds;
        None where a report had no value), points newer than ``since`` only if given; None for an
        unknown device. At most ``history_points`` points, one per ``resolution_s``."""
        unknown = set(series) - set(SERIES)
        if unknown:
            raise ValueError(f"unknown series {sorted(unknown)}; known: {list(SERIES)}")
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                return None
            horizon = self._wall() - self.history_s
            return device.history.series(series, horizon if since is None else max(since, horizon))

    def latest_report(self, device_id: str) -> dict[str, Any] | None:
        """The device's last telemetry document as published, or None."""
        with self._lock:
            device = self._devices.get(device_id)
            raw = device.raw if device is not None else None
        return json.loads(raw) if raw is not None else None

    def counters(self) -> dict[str, int]:
        """Messages seen, by kind, and what was skipped or evicted; plus devices by state."""
        with self._lock:
            events = self._refresh()
            counts = dict(self._counters)
            counts["devices"] = len(self._devices)
            for state in STATES:
                counts[state] = sum(1 for d in self._devices.values() if d.state == state)
        self._emit(events)
        return counts

    def problems(self) -> list[dict[str, Any]]:
        """The last skipped messages (topic, kind, reason), oldest first."""
        with self._lock:
            return list(self._problems)

    def reported_since_start(self) -> bool:
        """Whether every device not offline has reported since the aggregator started (what
        ``edged fleet --once`` waits for, up to --wait)."""
        with self._lock:
            events = self._refresh()
            done = all(d.reports > 0 for d in self._devices.values() if d.state != OFFLINE)
        self._emit(events)
        return done

    # -- changes ----------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[FleetEvent], None]) -> Callable[[], None]:
        """Call ``listener(event)`` on every change, from the thread that saw it (paho's network
        thread or the ticker), outside the aggregator's lock; returns the unsubscribe function.
        A listener that raises is logged and counted, never fatal."""
        with self._lock:
            key = self._next_listener
            self._next_listener += 1
            self._listeners[key] = listener

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.pop(key, None)

        return unsubscribe

    def watch(self, loop: asyncio.AbstractEventLoop | None = None, maxsize: int = 256) -> EventQueue:
        """An `EventQueue` on ``loop`` (default: the running loop), for SSE:
        ``with aggregator.watch() as events: event = await events.get()``."""
        return EventQueue(self, loop or asyncio.get_running_loop(), maxsize)

    def _emit(self, events: list[FleetEvent]) -> None:
        if not events:
            return
        with self._lock:
            listeners = list(self._listeners.values())
        for listener in listeners:
            for event in events:
                try:
                    listener(event)
                except Exception:
                    with self._lock:
                        self._counters["listener_errors"] += 1
                    log.exception("fleet listener failed", kind=event.kind)


class FleetMonitor:
    """An `Aggregator` fed by a broker connection, with a ticker thread judging staleness.

    ``with FleetMonitor(options, aggregator).start(): ...`` - `start` raises `BrokerUnreachable`;
    `stop` (or leaving the ``with``) disconnects and joins the ticker.
    """

    def __init__(
        self,
        options: BrokerOptions,
        aggregator: Aggregator | None = None,
        *,
        client_id: str | None = None,
        tick_s: float = 0.25,
    ) -> None:
        self.aggregator = aggregator or Aggregator()
        self.options = options
        self.tick_s = tick_s
        self.connection = Connection(
            options,
            client_id=client_id or f"edged-fleet-{uuid.uuid4().hex[:12]}",
            subscriptions=[(topic, 0) for topic in self.aggregator.topics],
            on_message=lambda m: self.aggregator.handle(m.topic, bytes(m.payload)),
        )
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self.connection.connected

    def start(self, timeout: float = 10.0) -> FleetMonitor:
        self.connection.open(timeout)
        self._ticker = threading.Thread(target=self._tick, name="edged-fleet-ticker", daemon=True)
        self._ticker.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.aggregator.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        self.connection.close()

    def __enter__(self) -> FleetMonitor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
