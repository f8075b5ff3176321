"""CPU cost of one telemetry collection (the MQTT report, a governor poll and a /metrics scrape),
measured with process_time on a board fixture tree (default: the Orange Pi 5 one).

    python scripts/bench_telemetry.py [--root tests/fixtures/boards/orangepi5] [--n 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from edged.backends import choose_backend
from edged.board import HostFS, detect_board
from edged.config import load_settings
from edged.engine import Engine
from edged.telemetry.governor import ThermalGovernor
from edged.telemetry.report import Telemetry, TelemetryCollector

ROOT = Path(__file__).resolve().parent.parent


def cpu_ms(action: object, n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        start = time.process_time()
        action()  # type: ignore[operator]
        samples.append((time.process_time() - start) * 1000)
    return {"median_ms": round(statistics.median(samples), 3), "max_ms": round(max(samples), 3)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=ROOT / "tests/fixtures/boards/orangepi5")
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    settings = load_settings(None, {"board": {"root": str(args.root)}})
    board = detect_board(args.root)
    engine = Engine(settings, board, choose_backend(board, settings))
    fs = HostFS(args.root)
    governor = ThermalGovernor(fs, board.profile.thermal, board.profile.thermal.zones, lambda _c: None)
    telemetry = Telemetry(settings, engine, governor, fs)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TelemetryCollector(telemetry))
    report = telemetry.report()
    print(
        json.dumps(
            {
                "root": str(args.root),
                "report_bytes": len(json.dumps(report)),
                "telemetry_report": cpu_ms(telemetry.report, args.n),
                "governor_poll": cpu_ms(governor.poll, args.n),
                "metrics_scrape": cpu_ms(lambda: generate_latest(registry), args.n),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
