#!/usr/bin/env python3
"""What the job journal costs per job, for journal.sync = full and normal, on this machine's disk.

A job's journal traffic as the daemon does it: accept (awaited before the PUBACK), running (not
awaited), done (awaited before the answer is published), answered (not awaited). Jobs one at a time
measure the latency a job pays; a burst measures the throughput with group commit.

    python scripts/journal_cost.py [--dir DIR] [--jobs 500] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import wait
from pathlib import Path

from edged.journal import Journal, JournalEntry

ANSWER = {"status": "done", "content": "x" * 200, "usage": {"completion_tokens": 50}}


def one_at_a_time(journal: Journal, jobs: int, tag: str) -> list[float]:
    costs = []
    for i in range(jobs):
        entry = JournalEntry(origin="mqtt", payload=b'{"prompt": "hi"}' * 8, job_id=f"{tag}-{i}")
        started = time.perf_counter()
        journal.accept(entry).result()
        journal.mark_running(entry.key)
        journal.mark_done(entry.key, ANSWER).result()
        journal.mark_answered(entry.key)
        costs.append((time.perf_counter() - started) * 1000)
    return costs


def burst(journal: Journal, jobs: int, tag: str) -> float:
    started = time.perf_counter()
    entries = [JournalEntry(origin="mqtt", payload=b"hi", job_id=f"{tag}-b{i}") for i in range(jobs)]
    wait([journal.accept(e) for e in entries])
    wait([journal.mark_done(e.key, ANSWER) for e in entries])
    return (time.perf_counter() - started) * 1000 / jobs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to put the journal (default: a temp dir)"
    )
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for sync in ("full", "normal"):
            with Journal.open(Path(tmp) / f"{sync}.sqlite3", sync=sync) as journal:  # type: ignore[arg-type]
                costs = one_at_a_time(journal, args.jobs, sync)
                per_job_burst = burst(journal, args.jobs, sync)
            results[sync] = {
                "jobs": args.jobs,
                "ms_per_job_p50": round(statistics.median(costs), 3),
                "ms_per_job_p90": round(sorted(costs)[int(0.9 * len(costs))], 3),
                "ms_per_job_in_a_burst": round(per_job_burst, 3),
            }
        results["filesystem"] = str(Path(tmp).resolve())
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for sync in ("full", "normal"):
        r = results[sync]
        print(
            f"journal.sync={sync:6}  one job at a time: p50 {r['ms_per_job_p50']} ms,"
            f" p90 {r['ms_per_job_p90']} ms per job;  in a burst: {r['ms_per_job_in_a_burst']} ms per job"
        )


if __name__ == "__main__":
    main()
