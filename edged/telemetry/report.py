"""The telemetry document (MQTT, /status) and the Prometheus view of the same figures.

Both read the engine only through its `EngineSnapshot`; the metrics' names, help and labels come from
`edged.telemetry.catalogue` (the fleet's /metrics reads the same catalogue)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from edged import __version__
from edged.telemetry import hardware
from edged.telemetry.catalogue import BY_NAME, MetricSpec
from edged.telemetry.governor import ThermalGovernor, ThermalState
from edged.telemetry.throughput import window_label
from edged.wire import TelemetryReport

if TYPE_CHECKING:
    from edged.board import HostFS
    from edged.config import Settings
    from edged.engine.snapshot import EngineSnapshot

SCHEMA = 1
CACHE_SUMMARY = ("lookups", "hits", "hit_tokens", "saved_prefill_ms", "parked", "disk_entries", "disk_hits")
"""The prefix cache's counters a telemetry report carries."""


class Snapshots(Protocol):
    """What telemetry needs of the engine: its snapshot, nothing else."""

    def snapshot(self) -> EngineSnapshot: ...


class Telemetry:
    """Collects what edged reports about itself; read by MQTT telemetry, /status and /metrics."""

    def __init__(self, settings: Settings, engine: Snapshots, governor: ThermalGovernor, fs: HostFS) -> None:
        self.settings = settings
        self.snapshot = engine.snapshot
        self.governor = governor
        self.fs = fs

    def thermals(self) -> dict[str, Any]:
        snapshot = hardware.read_all(self.fs)
        watched = set(self.governor.zone_names)
        for zone in snapshot["zones"]:
            zone["watched"] = zone["type"] in watched
        snapshot["governor"] = self.governor.status()
        return snapshot

    def document(self) -> TelemetryReport:
        snap = self.snapshot()
        windows = self.settings.telemetry.windows_s
        thermals = self.thermals()
        first = snap.throughput[window_label(windows[0])]
        throttling = thermals["throttling"]
        summary = {
            "window": window_label(windows[0]),
            "decode_tokens_per_s": first["decode_tokens_per_s_p50"],
            "tokens_per_s": first["tokens_per_s"],
            "s_per_1k_tokens": first["s_per_1k_tokens"],
            "ttft_ms_p50": first["ttft_ms_p50"],
            "hottest_c": self.governor.hottest_c,
            "thermal_state": self.governor.state.value,
            "throttled": self.governor.state in (ThermalState.DERATE, ThermalState.PAUSED)
            or bool(throttling and throttling["active"]),
        }
        return TelemetryReport(
            schema_=SCHEMA,
            device_id=self.settings.device_id,
            ts=round(time.time(), 3),
            interval_s=self.settings.telemetry.interval_s,
            version=__version__,
            backend=snap.backend,
            model=snap.model,
            state=snap.state.value,
            queue={"depth": snap.queue_depth, "max_depth": snap.queue_max_depth},
            slots={"total": snap.slots.total, "effective": snap.slots.effective, "active": snap.slots.active},
            jobs=dict(snap.counters),
            totals=dict(snap.totals),
            throughput=snap.throughput,
            prefix_cache=_cache_summary(snap),
            summary=summary,
            last_job=snap.last_job,
            thermals=thermals,
            # Cumulative per-job histograms since start, so a fleet aggregator can expose them to
            # Prometheus for boards it cannot scrape: {name: {"buckets": [[le, count]...], "sum", "count"}}.
            histograms={h.name: h.document() for h in snap.histograms},
        )

    def report(self) -> dict[str, Any]:
        """The telemetry message, as JSON (`TelemetryReport`)."""
        return self.document().dump()


def _cache_summary(snap: EngineSnapshot) -> dict[str, Any] | None:
    cache = snap.prefix_cache
    if cache is None:
        return None
    return {k: getattr(cache, k) for k in CACHE_SUMMARY}


def _spec(name: str, kind: str) -> MetricSpec:
    spec = BY_NAME[name]
    assert spec.kind == kind, f"{name} is a {spec.kind} in the catalogue"
    return spec


def _gauge(name: str, value: float | None = None, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    """The catalogue's gauge ``name``, with ``value`` if given (else empty, or for the caller to fill)."""
    spec = _spec(name, "gauge")
    family = GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    if value is not None:
        family.add_metric(list((labels or {}).values()), value)
    return family


def _counter(name: str) -> CounterMetricFamily:
    spec = _spec(name, "counter")
    return CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def _info(name: str) -> InfoMetricFamily:
    spec = _spec(name, "info")
    return InfoMetricFamily(spec.name, spec.help, labels=list(spec.labels))


class TelemetryCollector(Collector):
    """Renders `Telemetry` as Prometheus metrics at scrape time (no global registry, no stale copies)."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        t = self.telemetry
        snap = t.snapshot()
        settings = t.settings
        info = _info("edged")
        info.add_metric(
            [],
            {
                "version": __version__,
                "backend": snap.backend,
                "model": snap.model,
                "profile": snap.profile,
                "device_id": settings.device_id,
            },
        )
        yield info
        jobs = _counter("edged_jobs")
        for outcome, count in snap.counters.items():
            jobs.add_metric([outcome], count)
        yield jobs
        tokens = _counter("edged_tokens")
        for kind in ("prompt", "completion", "cached_prompt"):
            tokens.add_metric([kind], snap.totals[f"{kind}_tokens"])
        yield tokens
        yield _gauge("edged_queue_depth", snap.queue_depth)
        yield _gauge("edged_slots", snap.slots.total)
        yield _gauge("edged_slots_effective", snap.slots.effective)
        yield _gauge("edged_slots_active", snap.slots.active)
        yield from _cache_metrics(snap)
        window = min(settings.telemetry.windows_s)
        summary = snap.throughput[window_label(window)]
        label = {"window": window_label(window)}
        # Per-job distributions as histograms (aggregatable across a fleet); the window's figures
        # that are true gauges (rates over the window) stay gauges.
        for histogram in snap.histograms:
            yield histogram.family()
        for key, name in (
            ("s_per_1k_tokens", "edged_seconds_per_1k_tokens"),
            ("tokens_per_s", "edged_generated_tokens_per_second"),
        ):
            value = summary[key]
            yield _gauge(name, float(value) if isinstance(value, (int, float)) else None, label)
        hw = hardware.read_all(t.fs)
        zones = _gauge("edged_thermal_zone_celsius")
        for zone in hw["zones"]:
            if zone["temp_c"] is not None:
                zones.add_metric([zone["zone"], zone["type"]], zone["temp_c"])
        yield zones
        freq = _gauge("edged_cpu_frequency_hertz")
        for policy in hw["cpufreq"]:
            for which in ("cur", "max", "hw_max"):
                mhz = policy[f"{which}_mhz"]
                if mhz is not None:
                    freq.add_metric([policy["policy"], which], mhz * 1e6)
        yield freq
        if hw["npu"] and hw["npu"]["load_pct"] is not None:
            npu = _gauge("edged_npu_load_ratio")
            for core, pct in hw["npu"]["load_pct"].items():
                npu.add_metric([core], pct / 100)
            yield npu
        if hw["throttling"]:
            flags = _gauge("edged_throttled")
            for when in ("now", "since_boot"):
                for flag, on in hw["throttling"][when].items():
                    flags.add_metric([flag, when], 1.0 if on else 0.0)
            yield flags
        gov = t.governor
        state = _gauge("edged_thermal_state")
        for s in ThermalState:
            state.add_metric([s.value], 1.0 if gov.state is s else 0.0)
        yield state
        changes = _counter("edged_thermal_transitions")
        for to, count in gov.transitions.items():
            changes.add_metric([to], count)
        yield changes
        yield _gauge("edged_thermal_hottest_celsius", gov.hottest_c)
        mem = hw["system"]["mem_available_mb"]
        yield _gauge("edged_memory_available_bytes", mem * 1024 * 1024 if mem else None)
        yield _gauge("edged_load1", hw["system"]["load_1m"])


def _cache_metrics(snap: EngineSnapshot) -> Iterator[Metric]:
    """The prefix cache's counters (absent for a backend without one)."""
    cache = snap.prefix_cache
    if cache is None:
        return
    for key in ("lookups", "hits", "hit_tokens", "disk_hits", "disk_warmed", "evictions"):
        family = _counter(f"edged_prefix_cache_{key}")
        family.add_metric([], getattr(cache, key))
        yield family
    saved = _counter("edged_prefix_cache_saved_prefill_seconds")
    saved.add_metric([], cache.saved_prefill_ms / 1000)
    yield saved
    yield _gauge("edged_prefix_cache_parked_tokens", cache.parked_tokens)
    yield _gauge("edged_prefix_cache_disk_bytes", cache.disk_bytes)
