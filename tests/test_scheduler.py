"""The engine's scheduler with a deterministic in-process backend: admission order, batching,
fairness, cancel, deadlines, KV pressure, stop strings, thermal derating and backend failure.
Fast and exact; the same behaviours run against the real model in test_batching.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import BOARDS
from scripted_backend import Script, ScriptedBackend, scripted_choice

from edged.board import detect_board
from edged.config import load_settings
from edged.engine import Engine, JobRequest, JobState
from edged.errors import BackendError, Cancelled, DeadlineExceeded, QueueFull


def make_engine(tmp_path: Path, parallel: int = 4, max_depth: int = 16, **script: Any) -> Engine:
    ScriptedBackend.script = Script(**script)
    settings = load_settings(
        None,
        {
            "board": {"root": str(BOARDS / "x86"), "profiles_dir": str(tmp_path)},
            "engine": {"parallel": parallel, "prefix_cache_dir": str(tmp_path / "pfx")},
            "queue": {"max_depth": max_depth},
        },
    )
    return Engine(settings, detect_board(BOARDS / "x86"), scripted_choice())


def run(engine: Engine, body: Callable[[Engine], Awaitable[None]]) -> None:
    async def main() -> None:
        await engine.start()
        try:
            await asyncio.wait_for(body(engine), timeout=30)
        finally:
            await engine.stop()

    asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        await asyncio.sleep(0.005)


def job(prompt: str, max_tokens: int = 5, **fields: Any) -> JobRequest:
    return JobRequest(prompt=prompt, max_tokens=max_tokens, **fields)


def test_jobs_decode_together_and_each_gets_its_own_text(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, parallel=4)

    async def body(e: Engine) -> None:
        jobs = [await e.submit(job(p, max_tokens=6)) for p in ("a", "c", "x", "m")]
        results = [await j.wait() for j in jobs]
        assert [r.content for r in results] == ["abcdef", "cdefgh", "xyzabc", "mnopqr"]
        assert all(r.finish_reason == "length" and r.usage.completion_tokens == 6 for r in results)
        assert max(ScriptedBackend.script.batch_sizes) == 4, "all four sequences share steps"
        assert results[0].timings.batch_size_avg is not None and results[0].timings.batch_size_avg > 1

    run(engine, body)


def test_admission_is_first_come_first_served_and_slots_bound_concurrency(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, parallel=2)

    async def body(e: Engine) -> None:
        ScriptedBackend.script.gate.clear()  # hold the first step until all five are queued
        jobs = [await e.submit(job(p, max_tokens=3)) for p in ("a", "b", "c", "d", "e")]
        ScriptedBackend.script.gate.set()
        results = [await j.wait() for j in jobs]
        assert ScriptedBackend.script.admitted == ["a", "b", "c", "d", "e"]
        assert max(ScriptedBackend.script.batch_sizes) == 2
        waited = [r.timings.queue_ms for r in results]
        assert waited[4] > waited[0], "the fifth job waited for a slot"

    run(engine, body)


def test_cancel_queued_and_running_jobs_leaves_the_others_unchanged(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, parallel=2, step_s=0.01)

    async def body(e: Engine) -> None:
        running = await e.submit(job("a", max_tokens=200))
        other = await e.submit(job("k", max_tokens=20))
        queued = await e.submit(job("q", max_tokens=5))
        await until(lambda: running.completion_tokens >= 3)
        e.cancel(queued.id)
        e.cancel(running.id)
        with pytest.raises(Cancelled):
            await queued.wait()
        with pytest.raises(Cancelled):
            await running.wait()
        assert queued.state is JobState.CANCELLED and "q" not in ScriptedBackend.script.admitted
        result = await other.wait()
        assert result.content == "klmnopqrstuvwxyzabcd"
        assert e.snapshot().counters["cancelled"] == 2

    run(engine, body)


def test_deadlines_while_queued_and_while_running(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, parallel=1, step_s=0.01)

    async def body(e: Engine) -> None:
        long = await e.submit(job("a", max_tokens=1000, timeout_s=0.3))
        waiting = await e.submit(job("b", max_tokens=5, timeout_s=0.1))
        with pytest.raises(DeadlineExceeded) as queued_info:
            await waiting.wait()
        assert "queued" in queued_info.value.message
        with pytest.raises(DeadlineExceeded) as running_info:
            await long.wait()
        assert "running" in running_info.value.message
        assert 0 < long.completion_tokens < 1000

    run(engine, body)


def test_kv_pressure_makes_admission_wait_and_never_fails_a_running_job(tmp_path: Path) -> None:
    # Room for one 1 + 30 token job at a time, although there are four slots.
    engine = make_engine(tmp_path, parallel=4, kv_cells=40)

    async def body(e: Engine) -> None:
        first = await e.submit(job("a", max_tokens=30))
        second = await e.submit(job("b", max_tokens=30))
        r1, r2 = await first.wait(), await second.wait()
        assert r1.usage.completion_tokens == r2.usage.completion_tokens == 30
        assert ScriptedBackend.script.refused > 0, "the second job had to wait for cells"
        assert max(ScriptedBackend.script.batch_sizes) == 1
        assert r2.timings.queue_ms > 0

    run(engine, body)


def test_a_stop_string_ends_the_job_in_the_step_that_completed_it(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, parallel=2)

    async def body(e: Engine) -> None:
        j = await e.submit(job("a", max_tokens=50, stop=["def"]))
        result = await j.wait()
        assert result.content == "abc"
        assert result.finish_reason == "stop"
        # a b c d e f: the sixth token completed the stop string; nothing after it was counted.
        assert result.usage.completion_tokens == 6

    run(engine, body)


def test_end_of_generation_is_not_counted(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, parallel=1, end_after=4)

    async def body(e: Engine) -> None:
        result = await (await e.submit(job("a", max_tokens=50))).wait()
        assert (result.content, result.finish_reason, result.usage.completion_tokens) == ("abcd", "stop", 4)

    run(engine, body)


def test_queue_full_counts_free_slots_as_room(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, parallel=2, max_depth=1)

    async def body(e: Engine) -> None:
        held = [await e.submit(job(p, max_tokens=100_000)) for p in ("a", "b")]  # two slots, no queue
        await until(lambda: e.snapshot().slots.active == 2)
        waiting = await e.submit(job("c", max_tokens=2))  # takes the one queue place
        with pytest.raises(QueueFull):
            await e.submit(job("d"))
        assert e.snapshot().counters["rejected"] == 1
        for j in held:
            e.cancel(j.id)
        assert (await waiting.wait()).content == "cd"

    run(engine, body)


def test_derate_halves_the_slots_and_pause_admits_nothing(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, parallel=4)

    async def body(e: Engine) -> None:
        e.apply_thermal(paused=False, derate_s=0.001)
        assert e.snapshot().slots.effective == 2
        jobs = [await e.submit(job(p, max_tokens=4)) for p in "abcd"]
        for j in jobs:
            await j.wait()
        assert max(ScriptedBackend.script.batch_sizes) == 2
        e.apply_thermal(paused=True, derate_s=0.001)
        paused = await e.submit(job("e", max_tokens=2))
        seen = e.scheduler.idle_checks
        await until(lambda: e.scheduler.idle_checks > seen)  # the loop looked at the queued job ...
        assert paused.state is JobState.QUEUED  # ... and a paused engine did not start it
        e.apply_thermal(paused=False, derate_s=0.0)
        assert (await paused.wait()).content == "ef"
        assert e.snapshot().slots.effective == 4

    run(engine, body)


def test_a_backend_failure_fails_the_running_jobs_and_the_engine_goes_on(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, parallel=2, fail_on_step=3)

    async def body(e: Engine) -> None:
        jobs = [await e.submit(job(p, max_tokens=10)) for p in ("a", "b")]
        for j in jobs:
            with pytest.raises(BackendError) as info:
                await j.wait()
            assert "scripted failure" in info.value.message
        after = await (await e.submit(job("c", max_tokens=3))).wait()
        assert after.content == "cde"
        assert e.snapshot().counters["failed"] == 2

    run(engine, body)


def test_a_job_the_backend_cannot_start_fails_alone(tmp_path: Path) -> None:
    """An exception while admitting (a sampler the runtime refuses, a backend bug) fails that job with
    the reason; the scheduler keeps running and the jobs around it are answered."""
    engine = make_engine(tmp_path, parallel=2, admit_raises_for="x")

    async def body(e: Engine) -> None:
        first = await e.submit(job("a", max_tokens=3))
        bad = await e.submit(job("xyz", max_tokens=3))
        last = await e.submit(job("d", max_tokens=3))
        with pytest.raises(BackendError) as info:
            await bad.wait()
        assert "could not start the job: TypeError: scripted admit bug" in info.value.message
        assert (await first.wait()).content == "abc"
        assert (await last.wait()).content == "def"
        assert e.healthy(stall_s=5)

    run(engine, body)


def test_snapshot_is_what_status_reads(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, parallel=3)

    async def body(e: Engine) -> None:
        await (await e.submit(job("a", max_tokens=2))).wait()
        snap = e.snapshot()
        status = snap.status()
        assert snap.backend == "scripted" and snap.model == "scripted"
        assert status["slots"] == {"total": 3, "effective": 3, "active": 0}
        assert status["jobs"]["done"] == 1
        assert status["last_job"]["usage"]["completion_tokens"] == 2
        assert e.receive_maximum == 3 + 16

    run(engine, body)
