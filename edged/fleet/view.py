"""How `edged fleet` shows the aggregator: a rich table (live or once) and the ``--json`` document."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from edged.fleet.aggregator import OFFLINE, ONLINE, STALE, DeviceState

DASH = "—"
STATE_STYLE = {ONLINE: "green", STALE: "yellow", OFFLINE: "red"}
GOVERNOR_STYLE = {"normal": "green", "warm": "yellow", "derate": "red", "paused": "bold red"}


def age(seconds: float | None) -> str:
    """``4s``, ``2m05s``, ``1h02m``, ``3d04h``; a dash for never."""
    if seconds is None:
        return DASH
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _n(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _hot(device: DeviceState) -> Text:
    if device.hottest_c is None:
        return Text(DASH)
    style = "red" if device.hottest_c >= 80 else "yellow" if device.hottest_c >= 70 else ""
    text = Text(f"{device.hottest_c:.1f}", style=style)
    if device.hottest_zone:
        text.append(f" {device.hottest_zone}", style="dim")
    return text


def _board(device: DeviceState) -> Text:
    text = Text(device.board or DASH)
    text.append(f" / {device.profile or DASH}", style="dim")
    return text


def _queue(device: DeviceState) -> str:
    if device.queue_depth is None:
        return DASH
    return (
        f"{device.queue_depth}/{device.queue_max_depth}"
        if device.queue_max_depth
        else str(device.queue_depth)
    )


def render_table(
    devices: Sequence[DeviceState],
    *,
    counters: dict[str, int] | None = None,
    broker: str | None = None,
    connected: bool | None = None,
    now: float | None = None,
) -> Table:
    """One row per device in the order given (the aggregator's snapshot is worst first)."""
    now = time.time() if now is None else now
    table = Table(title=f"edged fleet · {broker}" if broker else "edged fleet", title_justify="left")
    for header, justify in (
        ("device", "left"),
        ("board / profile", "left"),
        ("backend", "left"),
        ("state", "left"),
        ("queue", "right"),
        ("tok/s", "right"),
        ("s/1k tok", "right"),
        ("TTFT p50 ms", "right"),
        ("hottest °C", "right"),
        ("throttled", "left"),
        ("governor", "left"),
        ("last seen", "right"),
    ):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for d in devices:
        table.add_row(
            Text(d.device_id, style="bold"),
            _board(d),
            d.backend or DASH,
            Text(d.state, style=STATE_STYLE.get(d.state, "")),
            _queue(d),
            _n(d.decode_tok_s),
            _n(d.s_per_1k_tokens),
            _n(d.ttft_ms_p50, 0),
            _hot(d),
            DASH if d.throttled is None else Text("yes", style="bold red") if d.throttled else "no",
            Text(d.governor or DASH, style=GOVERNOR_STYLE.get(d.governor or "", "")),
            age(now - d.last_seen) if d.last_seen is not None else DASH,
        )
    table.caption = caption(devices, counters, connected)
    table.caption_justify = "left"
    return table


def caption(devices: Sequence[DeviceState], counters: dict[str, int] | None, connected: bool | None) -> str:
    states = {s: sum(1 for d in devices if d.state == s) for s in (ONLINE, STALE, OFFLINE)}
    noun = "device" if len(devices) == 1 else "devices"
    parts = [f"{len(devices)} {noun}: " + ", ".join(f"{n} {s}" for s, n in states.items())]
    if counters:
        parts.append(f"{counters['messages']} messages")
        skipped = counters["malformed"] + counters["unknown_schema"]
        if skipped:
            parts.append(
                f"{counters['malformed']} malformed, {counters['unknown_schema']} unknown schema skipped"
            )
    if connected is False:
        parts.append("broker connection lost, reconnecting")
    if not devices:
        parts.append("no device has published its status or telemetry yet")
    return " · ".join(parts)


def fleet_document(
    devices: Sequence[DeviceState],
    *,
    counters: dict[str, int],
    problems: list[dict[str, Any]],
    broker: str,
    topic_prefix: str,
    collected_s: float,
) -> dict[str, Any]:
    """What ``edged fleet --once --json`` prints (devices worst first)."""
    return {
        "broker": broker,
        "topic_prefix": topic_prefix,
        "generated_at": round(time.time(), 3),
        "collected_s": round(collected_s, 3),
        "devices": [d.to_dict() for d in devices],
        "counters": counters,
        "problems": problems,
    }
