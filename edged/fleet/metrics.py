"""The whole fleet's telemetry as one Prometheus exposition, every sample with a ``device`` label.

`FleetCollector` renders what the `Aggregator` holds at scrape time: for every device that is
``online``, the metrics a daemon exposes on its own ``/metrics`` (edged.telemetry.report.
TelemetryCollector), under the SAME names, rebuilt from its last MQTT telemetry report - so one
Prometheus scrape covers boards it cannot reach (NAT, cellular), and deploy/grafana/edged-fleet.json
reads both sources alike (for a board scraped directly, Prometheus adds ``device`` from a static
label, see deploy/prometheus/prometheus.yml). Plus ``edged_fleet_*`` metrics about the fleet itself
(up/state/last seen per device, messages received and skipped).

Devices that are stale or offline export only their ``edged_fleet_*`` series: repeating the last
values of a board that stopped reporting would draw flat lines where there is no data. When it
reports again its series come back, and counters and histograms are cumulative since the daemon
started, so ``rate()`` copes with the gap (and with a daemon restart, as a counter reset).

A report comes from anything that may publish on the broker: every field is checked, a field of the
wrong type or shape is left out (counted in ``edged_fleet_report_problems``), never fatal to the
scrape, and only the known histogram names are taken (a foreign name could collide with a gauge).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from edged.fleet.aggregator import ONLINE, STATES, Aggregator, DeviceState
from edged.telemetry.catalogue import DAEMON, FLEET_DEVICE, FLEET_WIDE, JOB_HISTOGRAMS, MetricSpec
from edged.telemetry.governor import ThermalState

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The text format generate_latest writes (what a daemon's /metrics says too)."""

HISTOGRAMS = tuple(spec.name for spec in JOB_HISTOGRAMS.values())
"""The per-job histograms a report carries (edged.telemetry.catalogue.JOB_HISTOGRAMS)."""
MAX_LABEL = 200
"""Longest label value taken from a report (longer ones are cut)."""
MAX_BUCKETS = 64

FAMILIES: tuple[MetricSpec, ...] = (*(spec for spec in DAEMON if spec.fleet), *FLEET_DEVICE)
"""Per device (a ``device`` label first): the daemon's metrics a report rebuilds, then the fleet's own
view of the device. The order of the exposition."""


class Families:
    """Metric families by name, made on first use with the labels of `FAMILIES` (``device`` first)."""

    def __init__(self, specs: Iterable[MetricSpec], device_label: bool) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._device = device_label
        self._families: dict[str, Metric] = {}

    def _family(self, name: str) -> Metric:
        family = self._families.get(name)
        if family is None:
            spec = self._specs[name]
            names = ["device", *spec.labels] if self._device else list(spec.labels)
            factory: Any = {
                "gauge": GaugeMetricFamily,
                "counter": CounterMetricFamily,
                "histogram": HistogramMetricFamily,
                "info": InfoMetricFamily,
            }[spec.kind]
            family = factory(name, spec.help, labels=names)
            self._families[name] = family
        return family

    def add(self, name: str, labels: list[str], value: float) -> None:
        self._family(name).add_metric(labels, value)  # type: ignore[attr-defined]

    def add_info(self, name: str, labels: list[str], info: dict[str, str]) -> None:
        self._family(name).add_metric(labels, info)  # type: ignore[attr-defined]

    def add_histogram(
        self, name: str, labels: list[str], buckets: list[tuple[str, float]], total: float
    ) -> None:
        self._family(name).add_metric(labels, buckets, total)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Metric]:
        """Every family of the spec, in its order (an empty one still says HELP and TYPE)."""
        for name in self._specs:
            yield self._family(name)


class _Reader:
    """Typed access to one report; a wrong type is counted in ``problems`` and read as absent."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        self.problems = 0

    def obj(self, parent: dict[str, Any] | None, key: str) -> dict[str, Any]:
        if parent is None:
            return {}
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problems += 1
            return {}
        return value

    def items(self, parent: dict[str, Any], key: str) -> list[dict[str, Any]]:
        value = parent.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.problems += 1
            return []
        good = [item for item in value if isinstance(item, dict)]
        self.problems += len(value) - len(good)
        return good

    def num(self, parent: dict[str, Any], key: str) -> float | None:
        value = parent.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.problems += 1
            return None
        return float(value)

    def count(self, parent: dict[str, Any], key: str) -> float | None:
        """A counter's value: a number >= 0."""
        value = self.num(parent, key)
        if value is not None and value < 0:
            self.problems += 1
            return None
        return value

    def text(self, parent: dict[str, Any], key: str) -> str | None:
        value = parent.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.problems += 1
            return None
        return value[:MAX_LABEL]

    def histogram(self, value: Any) -> tuple[list[tuple[str, float]], float] | None:
        """``{"buckets": [[le, cumulative]...,["+Inf", n]], "sum": s, "count": n}`` -> buckets and sum,
        or None (counted) unless the buckets ascend, their counts never fall and end with +Inf."""
        try:
            buckets_in = value["buckets"]
            total = value["sum"]
            if not isinstance(buckets_in, list) or not 0 < len(buckets_in) <= MAX_BUCKETS:
                raise ValueError("buckets")
            if isinstance(total, bool) or not isinstance(total, (int, float)) or not math.isfinite(total):
                raise ValueError("sum")
            buckets: list[tuple[str, float]] = []
            previous_le, previous_count = -math.inf, 0.0
            for le, count in buckets_in:
                bound = float(le)  # "+Inf" included; a non-number raises
                if not isinstance(le, str) or math.isnan(bound) or bound <= previous_le:
                    raise ValueError("le")
                if isinstance(count, bool) or not isinstance(count, int) or count < previous_count:
                    raise ValueError("count")
                buckets.append((le, float(count)))
                previous_le, previous_count = bound, count
            if buckets[-1][0] != "+Inf":
                raise ValueError("+Inf")
            count = value.get("count")
            if count is not None and count != previous_count:
                raise ValueError("count")
            return buckets, float(total)
        except (KeyError, TypeError, ValueError):
            self.problems += 1
            return None


def device_metrics(families: Families, device: DeviceState, report: dict[str, Any]) -> int:
    """The daemon's metrics of one device, from its last report, into ``families``; returns how
    many fields were left out for a wrong type or shape."""
    r = _Reader(report)
    d = [device.device_id]
    jobs = r.obj(report, "jobs")
    totals = r.obj(report, "totals")
    queue = r.obj(report, "queue")
    slots = r.obj(report, "slots")
    cache = r.obj(report, "prefix_cache")
    summary = r.obj(report, "summary")
    thermals = r.obj(report, "thermals")
    governor = r.obj(thermals, "governor")
    system = r.obj(thermals, "system")

    families.add_info(
        "edged",
        d,
        {
            "version": r.text(report, "version") or device.version or "",
            "backend": r.text(report, "backend") or device.backend or "",
            "model": r.text(report, "model") or device.model or "",
            "profile": device.profile or "",
            "board": device.board or "",
            "device_id": r.text(report, "device_id") or device.device_id,
        },
    )
    for outcome in sorted(jobs):
        if (value := r.count(jobs, outcome)) is not None:
            families.add("edged_jobs", [*d, outcome[:MAX_LABEL]], value)
    for kind in ("prompt", "completion", "cached_prompt"):
        if (value := r.count(totals, f"{kind}_tokens")) is not None:
            families.add("edged_tokens", [*d, kind], value)
    for name, parent, key in (
        ("edged_queue_depth", queue, "depth"),
        ("edged_slots", slots, "total"),
        ("edged_slots_effective", slots, "effective"),
        ("edged_slots_active", slots, "active"),
    ):
        if (value := r.num(parent, key)) is not None:
            families.add(name, d, value)
    for key in ("lookups", "hits", "hit_tokens", "disk_hits"):
        if (value := r.count(cache, key)) is not None:
            families.add(f"edged_prefix_cache_{key}", d, value)
    if (saved_ms := r.count(cache, "saved_prefill_ms")) is not None:
        families.add("edged_prefix_cache_saved_prefill_seconds", d, saved_ms / 1000)

    histograms = r.obj(report, "histograms")
    for name in HISTOGRAMS:
        if name in histograms and (parsed := r.histogram(histograms[name])) is not None:
            families.add_histogram(name, d, *parsed)

    window = r.text(summary, "window") or "1m"
    for name, key in (
        ("edged_seconds_per_1k_tokens", "s_per_1k_tokens"),
        ("edged_generated_tokens_per_second", "tokens_per_s"),
    ):
        if (value := r.num(summary, key)) is not None:
            families.add(name, [*d, window], value)

    for zone in r.items(thermals, "zones"):
        zone_name, zone_type, temp = r.text(zone, "zone"), r.text(zone, "type"), r.num(zone, "temp_c")
        if zone_name is not None and temp is not None:
            families.add("edged_thermal_zone_celsius", [*d, zone_name, zone_type or zone_name], temp)
    for policy in r.items(thermals, "cpufreq"):
        if (label := r.text(policy, "policy")) is None:
            continue
        for which in ("cur", "max", "hw_max"):
            if (mhz := r.num(policy, f"{which}_mhz")) is not None:
                families.add("edged_cpu_frequency_hertz", [*d, label, which], mhz * 1e6)
    npu = r.obj(thermals, "npu")
    load = r.obj(npu, "load_pct")
    for core in sorted(load):
        if (pct := r.num(load, core)) is not None:
            families.add("edged_npu_load_ratio", [*d, core[:MAX_LABEL]], pct / 100)
    throttling = r.obj(thermals, "throttling")
    for when in ("now", "since_boot"):
        flags = r.obj(throttling, when)
        for flag in sorted(flags):
            if isinstance(flags[flag], bool):
                families.add("edged_throttled", [*d, flag[:MAX_LABEL], when], 1.0 if flags[flag] else 0.0)
            else:
                r.problems += 1

    state = r.text(governor, "state") or r.text(summary, "thermal_state")
    if state is not None:
        known = [s.value for s in ThermalState]
        for each in (*known, *([state] if state not in known else [])):
            families.add("edged_thermal_state", [*d, each], 1.0 if each == state else 0.0)
    transitions = r.obj(governor, "transitions")
    for to in sorted(transitions):
        if (count := r.count(transitions, to)) is not None:
            families.add("edged_thermal_transitions", [*d, to[:MAX_LABEL]], count)
    hottest = r.num(summary, "hottest_c")
    if hottest is None:
        hottest = r.num(governor, "hottest_c")
    if hottest is not None:
        families.add("edged_thermal_hottest_celsius", d, hottest)
    if mem_mb := r.num(system, "mem_available_mb"):
        families.add("edged_memory_available_bytes", d, mem_mb * 1024 * 1024)
    if (load1 := r.num(system, "load_1m")) is not None:
        families.add("edged_load1", d, load1)
    return r.problems


class FleetCollector(Collector):
    """Renders the aggregator as Prometheus metrics at scrape time (nothing cached between scrapes).

    ``connected`` says whether the broker connection is up (None: not exported); ``extra`` yields
    more families (the web server's own, e.g. SSE clients)."""

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        connected: Callable[[], bool] | None = None,
        extra: Callable[[], Iterable[Metric]] | None = None,
    ) -> None:
        self.aggregator = aggregator
        self.connected = connected
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        agg = self.aggregator
        devices = agg.snapshot(worst_first_order=False)
        per_device = Families(FAMILIES, device_label=True)
        for device in devices:
            d = [device.device_id]
            per_device.add("edged_fleet_device_up", d, 1.0 if device.state == ONLINE else 0.0)
            for state in STATES:
                per_device.add("edged_fleet_device_state", [*d, state], 1.0 if device.state == state else 0.0)
            if device.last_seen is not None:
                per_device.add("edged_fleet_last_seen_timestamp_seconds", d, device.last_seen)
            per_device.add("edged_fleet_device_interval_seconds", d, device.interval_s)
            per_device.add("edged_fleet_reports", d, float(device.reports))
            if device.state != ONLINE:
                continue
            report = agg.latest_report(device.device_id)
            if report is None:  # an online status, no telemetry yet
                continue
            problems = device_metrics(per_device, device, report)
            if problems:
                per_device.add("edged_fleet_report_problems", d, float(problems))
        yield from per_device

        counts = agg.counters()
        fleet = Families(FLEET_WIDE, device_label=False)
        for state in STATES:
            fleet.add("edged_fleet_devices", [state], float(counts[state]))
        for kind in ("status", "telemetry", "ignored"):
            fleet.add("edged_fleet_messages", [kind], float(counts[kind]))
        for reason in ("malformed", "unknown_schema"):
            fleet.add("edged_fleet_messages_skipped", [reason], float(counts[reason]))
        fleet.add("edged_fleet_devices_evicted", [], float(counts["devices_evicted"]))
        fleet.add("edged_fleet_devices_refused", [], float(counts["devices_refused"]))
        fleet.add("edged_fleet_listener_errors", [], float(counts["listener_errors"]))
        if self.connected is not None:
            fleet.add("edged_fleet_broker_connected", [], 1.0 if self.connected() else 0.0)
        for family in fleet:
            if family.name != "edged_fleet_broker_connected" or self.connected is not None:
                yield family
        if self.extra is not None:
            yield from self.extra()


def registry(collector: FleetCollector) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding only ``collector``."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    """The text format (0.0.4), as a daemon's /metrics writes it."""
    return generate_latest(reg)
