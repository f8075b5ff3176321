"""The telemetry document (MQTT, /status) and the Prometheus view of the same figures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from edged import __version__
from edged.telemetry import hardware
from edged.telemetry.governor import ThermalGovernor, ThermalState
from edged.telemetry.throughput import window_label

if TYPE_CHECKING:
    from edged.board import HostFS
    from edged.config import Settings
    from edged.engine import Engine

SCHEMA = 1


class Telemetry:
    """Collects what edged reports about itself; read by MQTT telemetry, /status and /metrics."""

    def __init__(self, settings: Settings, engine: Engine, governor: ThermalGovernor, fs: HostFS) -> None:
        self.settings = settings
        self.engine = engine
        self.governor = governor
        self.fs = fs

    def thermals(self) -> dict[str, Any]:
        snapshot = hardware.read_all(self.fs)
        watched = set(self.governor.zone_names)
        for zone in snapshot["zones"]:
            zone["watched"] = zone["type"] in watched
        snapshot["governor"] = self.governor.status()
        return snapshot

    def report(self) -> dict[str, Any]:
        snap = self.engine.snapshot()
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
        return {
            "schema": SCHEMA,
            "device_id": self.settings.device_id,
            "ts": round(time.time(), 3),
            "interval_s": self.settings.telemetry.interval_s,
            "version": __version__,
            "backend": snap.backend,
            "model": snap.model,
            "state": snap.state.value,
            "queue": {"depth": snap.queue_depth, "max_depth": snap.queue_max_depth},
            "slots": {
                "total": snap.slots.total,
                "effective": snap.slots.effective,
                "active": snap.slots.active,
            },
            "jobs": dict(snap.counters),
            "totals": dict(snap.totals),
            "throughput": snap.throughput,
            "prefix_cache": _cache_summary(snap.prefix_cache),
            "summary": summary,
            "last_job": snap.last_job,
            "thermals": thermals,
            # Cumulative per-job histograms since start, so a fleet aggregator can expose them to
            # Prometheus for boards it cannot scrape: {name: {"buckets": [[le, count]...], "sum", "count"}}.
            "histograms": {h.name: h.snapshot() for h in self.engine.stats.histograms.values()},
        }


def _cache_summary(cache: dict[str, Any] | None) -> dict[str, Any] | None:
    if cache is None:
        return None
    keys = ("lookups", "hits", "hit_tokens", "saved_prefill_ms", "parked", "disk_entries", "disk_hits")
    return {k: cache[k] for k in keys}


def _g(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    if value is not None:
        family.add_metric(list((labels or {}).values()), value)
    return family


class TelemetryCollector(Collector):
    """Renders `Telemetry` as Prometheus metrics at scrape time (no global registry, no stale copies)."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        t = self.telemetry
        snap = t.engine.snapshot()
        settings = t.settings
        info = InfoMetricFamily("edged", "edged build and what it runs")
        info.add_metric(
            [],
            {
                "version": __version__,
                "backend": snap.backend,
                "model": snap.model,
                "profile": t.engine.board.profile.name,
                "device_id": settings.device_id,
            },
        )
        yield info
        jobs = CounterMetricFamily("edged_jobs", "Jobs by outcome", labels=["outcome"])
        for outcome, count in snap.counters.items():
            jobs.add_metric([outcome], count)
        yield jobs
        tokens = CounterMetricFamily("edged_tokens", "Tokens processed", labels=["kind"])
        tokens.add_metric(["prompt"], snap.totals["prompt_tokens"])
        tokens.add_metric(["completion"], snap.totals["completion_tokens"])
        tokens.add_metric(["cached_prompt"], snap.totals["cached_prompt_tokens"])
        yield tokens
        yield _g("edged_queue_depth", "Jobs waiting", snap.queue_depth)
        yield _g("edged_slots", "Sequences the backend decodes together", snap.slots.total)
        yield _g("edged_slots_effective", "Slots in use under the thermal governor", snap.slots.effective)
        yield _g("edged_slots_active", "Slots running a job now", snap.slots.active)
        yield from _cache_metrics(snap.prefix_cache)
        window = min(settings.telemetry.windows_s)
        summary = snap.throughput[window_label(window)]
        label = {"window": window_label(window)}
        # Per-job distributions as histograms (aggregatable across a fleet); the window's figures
        # that are true gauges (rates over the window) stay gauges.
        for histogram in t.engine.stats.histograms.values():
            yield histogram.family()
        for key, name, doc, scale in (
            ("s_per_1k_tokens", "edged_seconds_per_1k_tokens", "Seconds 1000 generated tokens take", 1.0),
            (
                "tokens_per_s",
                "edged_generated_tokens_per_second",
                "Generated tokens/s, all jobs together",
                1.0,
            ),
        ):
            value = summary[key]
            yield _g(name, doc, float(value) * scale if isinstance(value, (int, float)) else None, label)
        hw = hardware.read_all(t.fs)
        zones = GaugeMetricFamily(
            "edged_thermal_zone_celsius", "Thermal zone temperature", labels=["zone", "type"]
        )
        for zone in hw["zones"]:
            if zone["temp_c"] is not None:
                zones.add_metric([zone["zone"], zone["type"]], zone["temp_c"])
        yield zones
        freq = GaugeMetricFamily("edged_cpu_frequency_hertz", "CPU cluster clock", labels=["policy", "which"])
        for policy in hw["cpufreq"]:
            for which in ("cur", "max", "hw_max"):
                mhz = policy[f"{which}_mhz"]
                if mhz is not None:
                    freq.add_metric([policy["policy"], which], mhz * 1e6)
        yield freq
        if hw["npu"] and hw["npu"]["load_pct"] is not None:
            npu = GaugeMetricFamily("edged_npu_load_ratio", "RK3588 NPU core load", labels=["core"])
            for core, pct in hw["npu"]["load_pct"].items():
                npu.add_metric([core], pct / 100)
            yield npu
        if hw["throttling"]:
            flags = GaugeMetricFamily(
                "edged_throttled", "Raspberry Pi firmware flags", labels=["flag", "when"]
            )
            for when in ("now", "since_boot"):
                for flag, on in hw["throttling"][when].items():
                    flags.add_metric([flag, when], 1.0 if on else 0.0)
            yield flags
        gov = t.governor
        state = GaugeMetricFamily(
            "edged_thermal_state", "Current governor state (1 = current)", labels=["state"]
        )
        for s in ThermalState:
            state.add_metric([s.value], 1.0 if gov.state is s else 0.0)
        yield state
        changes = CounterMetricFamily("edged_thermal_transitions", "Governor state changes", labels=["to"])
        for to, count in gov.transitions.items():
            changes.add_metric([to], count)
        yield changes
        yield _g("edged_thermal_hottest_celsius", "Hottest watched zone", gov.hottest_c)
        mem = hw["system"]["mem_available_mb"]
        yield _g("edged_memory_available_bytes", "MemAvailable", mem * 1024 * 1024 if mem else None)
        yield _g("edged_load1", "1-minute load average", hw["system"]["load_1m"])


def _cache_metrics(cache: dict[str, Any] | None) -> Iterator[Metric]:
    """The prefix cache's counters (absent for a backend without one)."""
    if cache is None:
        return
    for key, name, doc in (
        ("lookups", "edged_prefix_cache_lookups", "Prompts looked up in the prefix cache"),
        ("hits", "edged_prefix_cache_hits", "Prompts that reused a cached prefix"),
        ("hit_tokens", "edged_prefix_cache_hit_tokens", "Prompt tokens taken from the cache"),
        ("disk_hits", "edged_prefix_cache_disk_hits", "Prefixes loaded from the disk tier for a job"),
        ("disk_warmed", "edged_prefix_cache_disk_warmed", "Disk prefixes put into KV when the model loaded"),
        ("evictions", "edged_prefix_cache_evictions", "Parked prefixes evicted for room"),
    ):
        family = CounterMetricFamily(name, doc)
        family.add_metric([], cache[key])
        yield family
    saved = CounterMetricFamily("edged_prefix_cache_saved_prefill_seconds", "Prefill time the cache saved")
    saved.add_metric([], cache["saved_prefill_ms"] / 1000)
    yield saved
    yield _g("edged_prefix_cache_parked_tokens", "Tokens of finished jobs kept in KV", cache["parked_tokens"])
    yield _g("edged_prefix_cache_disk_bytes", "Bytes in the disk tier", cache["disk_bytes"])
