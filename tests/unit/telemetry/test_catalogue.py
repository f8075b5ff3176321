"""`edged.telemetry.catalogue`: a daemon's /metrics and the fleet's both expose exactly what the
catalogue declares (names, help, kinds, labels), rendered from real fixture boards and a real report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import BOARDS
from prometheus_client.core import Metric

from edged.backends.base import CacheStats
from edged.board import HostFS, ThermalLimits
from edged.config import Settings
from edged.engine.snapshot import EngineSnapshot
from edged.engine.stats import EngineStats
from edged.fleet.aggregator import Aggregator
from edged.fleet.metrics import FAMILIES, FleetCollector
from edged.telemetry.catalogue import BY_NAME, DAEMON, FLEET_DEVICE, FLEET_WIDE
from edged.telemetry.governor import ThermalGovernor
from edged.telemetry.report import Telemetry, TelemetryCollector
from unit.test_wire import result, snapshot

LIMITS = ThermalLimits(warn_c=70, derate_c=80, pause_c=90, resume_c=60)


class Engine:
    """What telemetry reads of an engine: its snapshot."""

    def __init__(self, cache: CacheStats | None) -> None:
        self.cache = cache

    def snapshot(self) -> EngineSnapshot:
        stats = EngineStats(900)
        stats.done(result())  # one finished job: every figure has a value
        window = stats.throughput.summary(60)
        return replace(
            snapshot(self.cache),
            counters=dict(stats.counters),
            totals=dict(stats.totals),
            profile="rk3588",
            histograms=tuple(h.reading() for h in stats.histograms.values()),
            throughput={"1m": window, "15m": stats.throughput.summary(900)},
        )


def telemetry(board: str, settings: Settings) -> Telemetry:
    fs = HostFS(BOARDS / board)
    governor = ThermalGovernor(fs, LIMITS, [], lambda _change: None)
    governor.poll()
    return Telemetry(settings, Engine(CacheStats(lookups=2, hits=1)), governor, fs)


def families(collector: Any) -> list[Metric]:
    return list(collector.collect())


@pytest.mark.parametrize("board", ["orangepi5", "rpi4", "x86"])
def test_a_daemons_metrics_are_the_catalogues(settings_of: Any, board: str) -> None:
    exposed = families(TelemetryCollector(telemetry(board, settings_of())))
    for family in exposed:
        spec = BY_NAME[family.name]
        assert (family.documentation, family.type) == (spec.help, spec.kind), family.name
        for sample in family.samples if spec.kind != "info" else ():  # an info's labels are its fields
            assert set(sample.labels) - {"le"} <= set(spec.labels), (family.name, sample.labels)
    names = [f.name for f in exposed]
    assert names == [s.name for s in DAEMON if s.name in names], "in the catalogue's order"
    if board == "orangepi5":
        missing = {s.name for s in DAEMON} - set(names) - {"edged_throttled"}  # a Pi's firmware flags
        assert not missing


def test_the_fleet_rebuilds_the_same_families_from_a_report(settings_of: Any) -> None:
    report = telemetry("orangepi5", settings_of(device_id="opi")).report()
    agg = Aggregator()
    agg.handle("edged/opi/status", json.dumps({"state": "online", "board": "Orange Pi 5"}).encode())
    agg.handle("edged/opi/telemetry", json.dumps(report).encode())
    exposed = {f.name: f for f in families(FleetCollector(agg, connected=lambda: True))}
    for spec in (*FAMILIES, *FLEET_WIDE):
        family = exposed.pop(spec.name)
        assert (family.documentation, family.type) == (spec.help, spec.kind)
    assert not exposed, "nothing outside the catalogue"
    rebuilt = {s.name for s in FAMILIES} - {s.name for s in FLEET_DEVICE}
    assert rebuilt == {s.name for s in DAEMON if s.fleet}
    assert {"edged_ttft_seconds", "edged_thermal_zone_celsius", "edged_npu_load_ratio"} <= rebuilt


def test_the_fleet_reads_every_family_it_declares(settings_of: Any, tmp_path: Path) -> None:
    """A family the fleet declares but never fills would be a copy that drifted: the report of a
    board with every reading fills each one (the Pi's throttling flags come from the rpi4 tree)."""
    filled: set[str] = set()
    for board in ("orangepi5", "rpi4"):
        report = telemetry(board, settings_of(device_id=board)).report()
        agg = Aggregator()
        agg.handle(f"edged/{board}/telemetry", json.dumps(report).encode())
        filled |= {f.name for f in families(FleetCollector(agg)) if f.samples}
    daemon_side = {s.name for s in DAEMON if s.fleet}
    assert daemon_side - filled == set()
