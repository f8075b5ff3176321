"""Every Prometheus metric edged exposes, declared once: name, kind, help, labels.

A daemon's ``/metrics`` (`edged.telemetry.report.TelemetryCollector`) and the fleet's
(`edged.fleet.metrics`, which rebuilds a board's metrics from its MQTT telemetry under the same names
with a ``device`` label first) both read this catalogue, so the two expositions cannot drift apart.
The order here is the order of the exposition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["gauge", "counter", "histogram", "info"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """The family's name (``edged`` is exposed as ``edged_info``; counters gain ``_total``)."""
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    """Label names (the fleet puts ``device`` before them)."""
    fleet: bool = True
    """The fleet rebuilds it from a telemetry report (False: only on a daemon's own /metrics)."""
    buckets: tuple[float, ...] = ()
    """A histogram's upper bounds, ascending (+Inf implied)."""


def _m(
    name: str,
    kind: Kind,
    help: str,
    labels: tuple[str, ...] = (),
    *,
    fleet: bool = True,
    buckets: tuple[float, ...] = (),
) -> MetricSpec:
    return MetricSpec(name, kind, help, labels, fleet, buckets)


DAEMON: tuple[MetricSpec, ...] = (
    _m("edged", "info", "edged build and what it runs"),
    _m("edged_jobs", "counter", "Jobs by outcome", ("outcome",)),
    _m("edged_tokens", "counter", "Tokens processed", ("kind",)),
    _m("edged_queue_depth", "gauge", "Jobs waiting"),
    _m("edged_slots", "gauge", "Sequences the backend decodes together"),
    _m("edged_slots_effective", "gauge", "Slots in use under the thermal governor"),
    _m("edged_slots_active", "gauge", "Slots running a job now"),
    _m("edged_prefix_cache_lookups", "counter", "Prompts looked up in the prefix cache"),
    _m("edged_prefix_cache_hits", "counter", "Prompts that reused a cached prefix"),
    _m("edged_prefix_cache_hit_tokens", "counter", "Prompt tokens taken from the cache"),
    _m("edged_prefix_cache_disk_hits", "counter", "Prefixes loaded from the disk tier for a job"),
    _m(
        "edged_prefix_cache_disk_warmed",
        "counter",
        "Disk prefixes put into KV when the model loaded",
        fleet=False,
    ),
    _m("edged_prefix_cache_evictions", "counter", "Parked prefixes evicted for room", fleet=False),
    _m("edged_prefix_cache_saved_prefill_seconds", "counter", "Prefill time the cache saved"),
    _m("edged_prefix_cache_parked_tokens", "gauge", "Tokens of finished jobs kept in KV", fleet=False),
    _m("edged_prefix_cache_disk_bytes", "gauge", "Bytes in the disk tier", fleet=False),
    # Per-job distributions as histograms (aggregatable across a fleet); the figures of a window that
    # are true gauges (rates over the window) stay gauges.
    _m(
        "edged_ttft_seconds",
        "histogram",
        "Submission to first token, per job (queue + prefill)",
        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
    ),
    _m(
        "edged_decode_tokens_per_second",
        "histogram",
        "Decode speed after the first token, per job",
        buckets=(1, 2, 4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 60, 100, 200),
    ),
    _m(
        "edged_prefill_tokens_per_second",
        "histogram",
        "Prefill speed, per job",
        buckets=(5, 10, 20, 50, 100, 200, 500, 1000, 2000),
    ),
    _m(
        "edged_queue_wait_seconds",
        "histogram",
        "Time waiting for a slot, per job",
        buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
    ),
    _m("edged_seconds_per_1k_tokens", "gauge", "Seconds 1000 generated tokens take", ("window",)),
    _m("edged_generated_tokens_per_second", "gauge", "Generated tokens/s, all jobs together", ("window",)),
    _m("edged_thermal_zone_celsius", "gauge", "Thermal zone temperature", ("zone", "type")),
    _m("edged_cpu_frequency_hertz", "gauge", "CPU cluster clock", ("policy", "which")),
    _m("edged_npu_load_ratio", "gauge", "RK3588 NPU core load", ("core",)),
    _m("edged_throttled", "gauge", "Raspberry Pi firmware flags", ("flag", "when")),
    _m("edged_thermal_state", "gauge", "Current governor state (1 = current)", ("state",)),
    _m("edged_thermal_transitions", "counter", "Governor state changes", ("to",)),
    _m("edged_thermal_hottest_celsius", "gauge", "Hottest watched zone"),
    _m("edged_memory_available_bytes", "gauge", "MemAvailable"),
    _m("edged_load1", "gauge", "1-minute load average"),
)
"""What a daemon exposes on its /metrics, in order."""

BY_NAME = {spec.name: spec for spec in DAEMON}

JOB_HISTOGRAMS = {
    "ttft": BY_NAME["edged_ttft_seconds"],
    "decode": BY_NAME["edged_decode_tokens_per_second"],
    "prefill": BY_NAME["edged_prefill_tokens_per_second"],
    "queue": BY_NAME["edged_queue_wait_seconds"],
}
"""The per-job histograms the engine fills (one observation per finished job), by its short name;
a telemetry report carries them under their metric names."""

FLEET_DEVICE: tuple[MetricSpec, ...] = (
    _m("edged_fleet_device_up", "gauge", "1 while the device reports (online), 0 when stale or offline"),
    _m(
        "edged_fleet_device_state",
        "gauge",
        "The device's fleet state, 1 for the current one (online, stale, offline)",
        ("state",),
    ),
    _m(
        "edged_fleet_last_seen_timestamp_seconds",
        "gauge",
        "Unix time the device's last telemetry report arrived",
    ),
    _m(
        "edged_fleet_device_interval_seconds",
        "gauge",
        "The telemetry interval the device is judged by (stale after 3 of them)",
    ),
    _m(
        "edged_fleet_reports",
        "counter",
        "Telemetry reports received from the device since the aggregator started",
    ),
    _m(
        "edged_fleet_report_problems",
        "gauge",
        "Fields of the device's last report left out for a wrong type or shape",
    ),
)
"""The fleet's own per-device view (after the daemon's metrics, each with a ``device`` label)."""

FLEET_WIDE: tuple[MetricSpec, ...] = (
    _m("edged_fleet_devices", "gauge", "Devices the aggregator holds, by state", ("state",)),
    _m(
        "edged_fleet_messages",
        "counter",
        "MQTT messages received, by kind (status, telemetry, ignored: not an edged topic)",
        ("kind",),
    ),
    _m(
        "edged_fleet_messages_skipped",
        "counter",
        "Messages skipped, by reason (malformed, unknown_schema)",
        ("reason",),
    ),
    _m(
        "edged_fleet_devices_evicted",
        "counter",
        "Devices dropped to make room for a new one (the fleet was full)",
    ),
    _m("edged_fleet_devices_refused", "counter", "New devices refused: the fleet was full of online ones"),
    _m("edged_fleet_listener_errors", "counter", "Fleet event listeners that raised"),
    _m("edged_fleet_broker_connected", "gauge", "1 while the aggregator is connected to its broker"),
)
"""The fleet as a whole (no ``device`` label)."""
