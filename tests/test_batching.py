"""Continuous batching and the prompt-prefix cache on the real model, through the real daemon.

Correctness only (speed is `edged bench`'s business): at temperature 0 a job's text does not depend
on what runs beside it, on a cache hit, on a neighbour's cancel, or on a restart; a corrupt disk
entry is thrown away, never used.

A prefix shared between different prompts is not bit-reproducible: its cells were computed inside
another prompt's batch, and llama.cpp's CPU kernels round differently for different batch shapes,
so where the model's two best tokens are within rounding of each other a greedy token can flip
(llama-server documents the same for ``cache_prompt``). Text equality is therefore tested where it
holds exactly: jobs that do not share prefixes (``cache_prompt: false``) beside each other, and a
repeated prompt against its own cache hit. Sharing itself is tested by what it must do: who computes,
who reuses, how many tokens, and that a restart or a corrupt file changes nothing else."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import Daemon, wait_until

pytestmark = pytest.mark.system

# A long shared instruction (well over engine.prefix_min_tokens) and four different questions.
INSTRUCTION = (
    "You are the assistant of a small greenhouse. Sensors report temperature, humidity, soil moisture "
    "and light every minute. Answer in one or two short sentences, plainly, for a gardener who reads "
    "the answer on a phone. Never invent readings you were not given; say what you would check next. "
    "Readings today: temperature 24 C, humidity 61 percent, soil moisture 38 percent, light 12000 lux. "
)
QUESTIONS = ["How humid is it?", "Is the soil dry?", "What is the temperature?", "Should I open the windows?"]
REPEATED = "Should I water the tomatoes now?"


def ask(client: httpx.Client, content: str, **fields: object) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24}
    r = client.post("/v1/chat/completions", json={**body, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def text(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


def together(d: Daemon, prompts: list[str], **fields: object) -> list[dict]:
    def one(prompt: str) -> dict:
        with d.client() as c:
            return ask(c, prompt, **fields)

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_each_job_in_a_batch_of_four_says_what_it_says_alone(start_daemon) -> None:
    prompts = [
        "What is the capital of France?",
        "Name three colours.",
        "Why is the sky blue?",
        "Count to five.",
    ]
    alone_daemon = start_daemon(EDGED_ENGINE__PARALLEL="1", EDGED_ENGINE__PREFIX_CACHE="false")
    with alone_daemon.client() as c:
        alone = [text(ask(c, p)) for p in prompts]
    alone_daemon.stop()
    d = start_daemon(EDGED_ENGINE__PARALLEL="4")
    answers = together(d, prompts, cache_prompt=False)
    assert [text(a) for a in answers] == alone
    assert max(a["timings"]["batch_size_avg"] or 0 for a in answers) > 1.5, "they were decoded together"
    with d.client() as c:
        assert c.get("/status").json()["engine"]["slots"] == {"total": 4, "effective": 4, "active": 0}


def test_a_cache_hit_gives_the_same_text_as_a_miss(start_daemon) -> None:
    d = start_daemon(EDGED_ENGINE__PARALLEL="2")
    with d.client() as c:
        first = ask(c, INSTRUCTION + REPEATED)
        again = ask(c, INSTRUCTION + REPEATED)
        other = ask(c, INSTRUCTION + QUESTIONS[1])
        status = c.get("/status").json()["engine"]["prefix_cache"]
    assert first["timings"]["cache_n"] == 0
    n_prompt = first["usage"]["prompt_tokens"]
    assert again["timings"]["cache_n"] == n_prompt - 1, "all but the last prompt token came from the cache"
    assert again["timings"]["prompt_n"] == 1
    assert text(again) == text(first)
    assert other["timings"]["cache_n"] > 80, "the shared instruction is reused for another question"
    assert other["timings"]["cache_n"] + other["timings"]["prompt_n"] == other["usage"]["prompt_tokens"]
    assert status["hits"] >= 2 and status["hit_tokens"] >= again["timings"]["cache_n"]


def test_jobs_sharing_a_prefix_compute_it_once(start_daemon) -> None:
    d = start_daemon(EDGED_ENGINE__PARALLEL="4")
    answers = together(d, [INSTRUCTION + q for q in QUESTIONS])
    cached = sorted(a["timings"]["cache_n"] for a in answers)
    assert cached[0] == 0, "one job computes the shared instruction"
    assert all(n > 80 for n in cached[1:]), f"the other three take it from that job: {cached}"


def test_jobs_arriving_together_all_take_a_parked_prefix(start_daemon) -> None:
    d = start_daemon(EDGED_ENGINE__PARALLEL="4")
    with d.client() as c:
        warm = ask(c, INSTRUCTION + "Hello.")  # the instruction is computed once, here
        answers = together(d, [INSTRUCTION + q for q in QUESTIONS])
        cache = c.get("/status").json()["engine"]["prefix_cache"]
    shared = {a["timings"]["cache_n"] for a in answers}
    # Every question starts with a different word: each takes exactly the instruction, no more.
    assert len(shared) == 1 and 80 < min(shared) < warm["usage"]["prompt_tokens"], shared
    assert cache["hits"] >= 4


def test_cache_prompt_false_computes_the_whole_prompt(start_daemon) -> None:
    d = start_daemon(EDGED_ENGINE__PARALLEL="1")
    with d.client() as c:
        ask(c, INSTRUCTION + QUESTIONS[0])
        fresh = ask(c, INSTRUCTION + QUESTIONS[0], cache_prompt=False)
    assert fresh["timings"]["cache_n"] == 0
    assert fresh["timings"]["prompt_n"] == fresh["usage"]["prompt_tokens"]


def test_cancelling_one_sequence_leaves_the_others_unchanged(start_daemon) -> None:
    d = start_daemon(EDGED_ENGINE__PARALLEL="3")
    prompts = ["Name three colours.", "Why is the sky blue?"]
    with d.client() as c:
        alone = [text(ask(c, p, max_tokens=64, cache_prompt=False)) for p in prompts]
    results: dict[str, httpx.Response] = {}
    saw_three = threading.Event()

    def victim() -> None:
        with d.client() as c:
            body = {"id": "victim", "prompt": "Write a long story.", "max_tokens": 1500, "ignore_eos": True}
            results["victim"] = c.post("/v1/chat/completions", json=body)

    def cancel_when_all_three_run() -> None:
        with d.client() as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not saw_three.is_set():
                if c.get("/status").json()["engine"]["slots"]["active"] == 3:
                    saw_three.set()
                time.sleep(0.01)
            c.post("/v1/jobs/victim/cancel")  # always: a victim left running would hold the test

    thread = threading.Thread(target=victim)
    thread.start()
    with d.client() as c:
        wait_until(lambda: c.get("/v1/jobs/victim").status_code == 200, what="the victim job")
        wait_until(lambda: c.get("/v1/jobs/victim").json()["completion_tokens"] >= 2, what="victim running")
    canceller = threading.Thread(target=cancel_when_all_three_run)
    canceller.start()
    answers = together(d, prompts, max_tokens=64, cache_prompt=False)
    canceller.join(90)
    thread.join(90)
    assert saw_three.is_set(), "the victim was cancelled while the other two ran beside it"
    assert results["victim"].json()["error"]["code"] == "cancelled"
    assert [text(a) for a in answers] == alone


def test_the_disk_tier_survives_a_restart_and_a_corrupt_entry_is_ignored(
    start_daemon, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "prefixes"
    env = {"EDGED_ENGINE__PARALLEL": "2", "EDGED_ENGINE__PREFIX_CACHE_DIR": str(cache_dir)}
    d = start_daemon(**env)
    with d.client() as c:
        ask(c, INSTRUCTION + QUESTIONS[0])
        shared = ask(c, INSTRUCTION + QUESTIONS[1])  # takes the instruction from the first job
        computed = ask(c, INSTRUCTION + QUESTIONS[1], cache_prompt=False)
        assert shared["timings"]["cache_n"] > 80
        wait_until(
            lambda: c.get("/status").json()["engine"]["prefix_cache"]["disk_entries"] == 1, what="saved"
        )
    d.stop()
    files = list(cache_dir.rglob("*.pfx"))
    assert len(files) == 1

    # A restart: the instruction comes from disk (into KV as the model loads), and the answer is the
    # one it gave before.
    d = start_daemon(**env)
    with d.client() as c:
        warm = ask(c, INSTRUCTION + QUESTIONS[1])
        cache = c.get("/status").json()["engine"]["prefix_cache"]
    assert cache["disk_warmed"] == 1 and cache["hits"] == 1
    assert warm["timings"]["cache_n"] == shared["timings"]["cache_n"]
    assert text(warm) == text(shared)
    d.stop()

    # Corrupt the state bytes (the header still parses): detected at load, deleted, not used.
    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF
    files[0].write_bytes(bytes(data))
    d = start_daemon(**env)
    with d.client() as c:
        cold = ask(c, INSTRUCTION + QUESTIONS[1])
        cache = c.get("/status").json()["engine"]["prefix_cache"]
    assert cache["disk_hits"] == cache["disk_warmed"] == 0 and cache["disk_rejected"] == 1
    assert cold["timings"]["cache_n"] == 0
    assert text(cold) == text(computed)
    assert "discarding a bad disk entry" in d.log()
    assert not files[0].exists()

    # A truncated file is dropped when the daemon starts.
    files[0].write_bytes(b"EDGEDPFX" + b"\0" * 20)
    d.stop()
    d = start_daemon(**env)
    with d.client() as c:
        assert c.get("/status").json()["engine"]["prefix_cache"]["disk_rejected"] == 1
