"""Nothing accepted is lost: the real daemon, the real broker (with persistence), real kills.

Every test here is bounded; answers are collected by a persistent MQTT v5 client of the test's own
(paho, not edged's code) that stays connected while edged is killed and restarted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, wait_until
from mqtt_helpers import Broker, Probe, free_port

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]


def mqtt_env(broker: Broker, device: str, journal: Path, **extra: str) -> dict[str, str]:
    return {
        "EDGED_MQTT__HOST": "127.0.0.1",
        "EDGED_MQTT__PORT": str(broker.port),
        "EDGED_DEVICE_ID": device,
        "EDGED_MQTT__RECONNECT_MAX_S": "1",
        "EDGED_JOURNAL__PATH": str(journal),
        **extra,
    }


def mqtt_connected(d: Daemon) -> bool:
    with d.client(timeout=5) as c:
        mqtt = c.get("/status").json()["mqtt"]
        return bool(mqtt and mqtt["connected"])


class Answers:
    """Every final answer the collector received, by job id."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def pump(self, timeout: float = 0.2) -> None:
        for message in self.probe.quiet(timeout):
            if "status" in message:
                self.by_id[str(message["id"])].append(message)

    def until(self, count: int, timeout: float) -> None:
        """Wait for ``count`` answered jobs; fail when ``timeout`` s pass without a new one (a lost
        job stalls the count; a loaded machine only slows it, which is not what this measures)."""
        deadline = time.monotonic() + timeout
        seen = len(self.by_id)
        while len(self.by_id) < count:
            if len(self.by_id) > seen:
                seen, deadline = len(self.by_id), time.monotonic() + timeout
            if time.monotonic() > deadline:
                missing = count - len(self.by_id)
                pytest.fail(f"{missing} jobs unanswered, none answered in the last {timeout} s")
            self.pump()

    def contents(self, job_id: str) -> set[str]:
        """Distinct answers for a job, ignoring the `duplicate` flag of a re-sent one."""
        return {
            json.dumps({k: v for k, v in m.items() if k != "duplicate"}, sort_keys=True)
            for m in self.by_id[job_id]
        }


def journal_rows(path: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return list(conn.execute("SELECT job_id, state, attempts FROM jobs WHERE origin = 'mqtt'"))


def test_kill_9_during_200_jobs_loses_none_and_answers_each_once(start_daemon, tmp_path: Path) -> None:
    """Five SIGKILLs of the daemon at random moments while 200 short jobs run; each restart picks up
    the journal. Every job id gets answers of exactly one content: none lost, none generated twice."""
    broker = Broker(tmp_path / "broker").start()
    journal = tmp_path / "journal.sqlite3"
    env = mqtt_env(
        broker,
        "k9",
        journal,
        EDGED_ENGINE__PARALLEL="4",
        EDGED_MODEL__THREADS="2",
        EDGED_QUEUE__MAX_DEPTH="8",
    )
    collector = Probe(broker.port, client_id="k9-collector", persistent=True)
    publisher = Probe(broker.port)
    try:
        collector.subscribe("k9/answers")
        d = start_daemon(**env)
        wait_until(lambda: mqtt_connected(d), 20, "edged connected to the broker")
        ids = [f"k9-{i:03d}" for i in range(200)]
        for job_id in ids:
            publisher.publish(
                "edged/k9/jobs",
                {"id": job_id, "prompt": f"Say a word about the number {job_id[-3:]}.", "max_tokens": 6},
                response_topic="k9/answers",
            )
        answers = Answers(collector)
        rng = random.Random(20261124)
        kills = []
        for target in sorted(rng.sample(range(15, 185), 5)):
            answers.until(target, timeout=180)
            time.sleep(rng.uniform(0, 0.3))  # a random moment after that answer, mid-run
            assert d.proc is not None
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
            answers.pump(0.1)
            kills.append(len(answers.by_id))
            d = start_daemon(**env)
        answers.until(len(ids), timeout=240)
        assert d.stop() == 0, d.log()
        answers.pump(1.0)  # late re-sends of answers whose PUBACK edged did not see before a kill
    finally:
        publisher.close()
        collector.close()
        broker.stop()

    lost = sorted(set(ids) - set(answers.by_id))
    regenerated = {i: answers.contents(i) for i in ids if len(answers.contents(i)) > 1}
    failed = [m for i in ids for m in answers.by_id[i] if m["status"] != "done"]
    deliveries = sum(len(v) for v in answers.by_id.values())
    rows = journal_rows(journal)
    rerun = sum(1 for _, _, attempts in rows if attempts > 1)
    report = {
        "sent": len(ids),
        "answered": len(answers.by_id),
        "lost": len(lost),
        "answered_twice_with_different_content": len(regenerated),
        "answer_messages": deliveries,
        "repeated_deliveries_same_content": deliveries - len(answers.by_id),
        "kills_after_answers": kills,
        "jobs_run_again_after_a_kill": rerun,
        "journal_states": sorted({state for _, state, _ in rows}),
    }
    print("kill -9 test:", json.dumps(report))
    assert not lost, lost
    assert not regenerated, regenerated
    assert not failed, failed[:3]
    assert len(kills) == 5 and kills[-1] < len(ids), f"every kill must land mid-run: {kills}"
    assert {state for _, state, _ in rows} == {"answered"}, "every answer's PUBACK recorded"


def test_broker_restart_during_100_jobs_answers_every_one(start_daemon, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker").start()
    env = mqtt_env(broker, "br", tmp_path / "journal.sqlite3", EDGED_ENGINE__PARALLEL="4")
    collector = Probe(broker.port, client_id="br-collector", persistent=True)
    publisher = Probe(broker.port, client_id="br-publisher", persistent=True)
    try:
        collector.subscribe("br/answers")
        d = start_daemon(**env)
        wait_until(lambda: mqtt_connected(d), 20, "edged connected to the broker")
        ids = [f"br-{i:03d}" for i in range(100)]
        for job_id in ids:
            publisher.publish(
                "edged/br/jobs",
                {"id": job_id, "prompt": "Name a colour.", "max_tokens": 8},
                response_topic="br/answers",
            )
        answers = Answers(collector)
        answers.until(20, timeout=120)
        # Killed (SIGTERM: mosquitto saves its persistence file; a SIGKILL would lose messages the
        # broker had acknowledged but not yet saved — the broker's durability, not edged's).
        broker.stop()
        wait_until(lambda: not mqtt_connected(d), 20, "edged noticed the broker was gone")
        broker.start()
        answers.until(len(ids), timeout=240)
    finally:
        publisher.close()
        collector.close()
        broker.stop()
    assert set(answers.by_id) == set(ids)
    assert all(len(answers.contents(i)) == 1 for i in ids)
    assert all(m["status"] == "done" for i in ids for m in answers.by_id[i])
    print("broker restart:", {"sent": 100, "answered": len(answers.by_id), "lost": 0})


def test_sigterm_drains_running_jobs_and_the_next_start_answers_the_queued(
    start_daemon, tmp_path: Path
) -> None:
    """SIGTERM: the running job finishes and is answered; queued jobs stay journaled (acknowledged
    to the broker), exit 0; the next start answers them without the broker delivering them again."""
    broker = Broker(tmp_path / "broker").start()
    journal = tmp_path / "journal.sqlite3"
    env = mqtt_env(broker, "dr", journal, EDGED_ENGINE__PARALLEL="1", EDGED_JOBS__DRAIN_S="120")
    collector = Probe(broker.port, client_id="dr-collector", persistent=True)
    try:
        collector.subscribe("dr/answers")
        d = start_daemon(**env)
        wait_until(lambda: mqtt_connected(d), 20, "edged connected to the broker")
        for i in range(4):
            collector.publish(
                "edged/dr/jobs",
                {"id": f"dr-{i}", "prompt": "Count to fifty.", "max_tokens": 96, "ignore_eos": True},
                response_topic="dr/answers",
            )
        wait_until(lambda: len(journal_rows(journal)) == 4, 20, "all four jobs journaled")
        with d.client() as c:
            wait_until(lambda: c.get("/status").json()["engine"]["running"], 20, "a job running")
        assert d.stop(timeout=150) == 0
        answers = Answers(collector)
        answers.pump(0.5)
        first = set(answers.by_id)
        assert 1 <= len(first) < 4, f"the running job finished within drain_s and was answered: {first}"
        left = {job_id for job_id, state, _ in journal_rows(journal) if state in ("accepted", "running")}
        assert left == {f"dr-{i}" for i in range(4)} - first
        drained = [json.loads(line) for line in d.log().splitlines() if '"event": "drained"' in line]
        assert drained and drained[0]["unfinished"] == 0 and drained[0]["queued"] == len(left), drained
        d2 = start_daemon(**env)
        answers.until(4, timeout=120)
        assert '"journal recovered"' in d2.log()
    finally:
        collector.close()
        broker.stop()
    assert all(m["status"] == "done" for ms in answers.by_id.values() for m in ms)


def socket_rows(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return list(conn.execute("SELECT job_id, state FROM jobs WHERE origin = 'socket' ORDER BY seq"))


def test_kill_9_without_mqtt_and_the_next_start_closes_the_socket_rows(start_daemon, tmp_path: Path) -> None:
    """No MQTT: kill -9 while one socket job streams and another waits in the queue. Their clients
    went with the connections, so the next start closes both rows failed (cancelled), before it
    takes a job, and serves again."""
    journal = tmp_path / "journal.sqlite3"
    env = {"EDGED_JOURNAL__PATH": str(journal), "EDGED_ENGINE__PARALLEL": "1"}
    d = start_daemon(**env)
    long_job = {
        "messages": [{"role": "user", "content": "Count from one to one thousand."}],
        "max_tokens": 1500,
        "ignore_eos": True,
    }
    streaming = threading.Event()

    def stream() -> None:
        body = {**long_job, "stream": True}
        with (
            contextlib.suppress(httpx.HTTPError),
            d.client() as c,
            c.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    streaming.set()

    def wait_in_queue() -> None:
        with contextlib.suppress(httpx.HTTPError), d.client() as c:
            c.post("/v1/chat/completions", json=long_job)

    clients = [
        threading.Thread(target=stream, daemon=True),
        threading.Thread(target=wait_in_queue, daemon=True),
    ]
    clients[0].start()
    assert streaming.wait(120), d.log()
    clients[1].start()
    wait_until(lambda: len(socket_rows(journal)) == 2, 20, "both socket jobs journaled")
    with d.client() as c:
        wait_until(lambda: c.get("/status").json()["engine"]["queue"]["depth"] == 1, 20, "one job queued")
    left = socket_rows(journal)
    assert {state for _, state in left} <= {"accepted", "running"}, left
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    for client in clients:
        client.join(10)
    assert socket_rows(journal) == left, "the kill left both rows open"

    d2 = start_daemon(**env)
    with d2.client() as c:
        for job_id, _ in left:
            document = c.get(f"/v1/jobs/{job_id}").json()
            assert document["state"] == "answered", document
            assert document["error"]["code"] == "cancelled" and "restarted" in document["error"]["message"]
        short = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=short).status_code == 200
    closed = [json.loads(line) for line in d2.log().splitlines() if "socket jobs left open" in line]
    assert len(closed) == 1 and (closed[0]["failed"], closed[0]["answered"]) == (2, 0), closed
    wait_until(lambda: {state for _, state in socket_rows(journal)} == {"answered"}, 10, "every row closed")
    assert d2.stop() == 0, d2.log()


def test_a_job_sent_while_the_model_loads_waits_for_it(start_daemon) -> None:
    """The socket is bound before the model loads; a job sent then is answered, not not_ready."""
    d = start_daemon(wait=False)
    wait_until(lambda: d.socket.exists(), 20, "the socket bound")
    with d.client() as c:
        health = c.get("/health")
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        answer = c.post("/v1/chat/completions", json=body)
    assert health.status_code == 503, "still loading when the job was sent"
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MB tmpfs for the journal (mount needs root, or CAP_SYS_ADMIN)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full test: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_refuses_new_jobs_and_recovers_by_itself(
    start_daemon, tmp_path: Path, small_disk: Path
) -> None:
    broker = Broker(tmp_path / "broker").start()
    env = mqtt_env(broker, "df", small_disk / "journal.sqlite3")
    collector = Probe(broker.port, client_id="df-collector", persistent=True)
    try:
        collector.subscribe("df/answers")
        d = start_daemon(**env)
        wait_until(lambda: mqtt_connected(d), 20, "edged connected to the broker")
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        with d.client() as c:
            assert c.post("/v1/chat/completions", json=body).status_code == 200
            filler = _fill(small_disk)
            refused = None
            for _ in range(200):  # the WAL reuses its own pages for a while; the disk fills soon
                r = c.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    refused = r
                    break
            assert refused is not None, "no job was refused on a full disk"
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "storage_unavailable"
            collector.publish(
                "edged/df/jobs", {"id": "df-1", "prompt": "hi", "max_tokens": 2}, response_topic="df/answers"
            )
            wait_until(lambda: "job journal cannot be written" in d.log(), 20, "edged saw the full disk")
            answers = Answers(collector)
            answers.pump(2.0)
            assert "df-1" not in answers.by_id, "a job the journal could not record must not be run"
            filler.unlink()
            answers.until(1, timeout=60)  # retried by itself once the space is back
            assert c.post("/v1/chat/completions", json=body).status_code == 200
    finally:
        collector.close()
        broker.stop()
    assert answers.by_id["df-1"][0]["status"] == "done"
    assert os.path.getsize(small_disk / "journal.sqlite3") > 0


class CuttableLink:
    """A TCP relay between edged and the broker that the test can cut (every connection closed,
    new ones refused) and restore on the same port: the network, not the broker, goes away."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._every: list[socket.socket] = []  # all sockets ever opened, closed at the end
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        self._listener = listener
        self._every.append(listener)
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._every.append(client)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._every.append(upstream)
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                pump = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                pump.start()
                self._threads.append(pump)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)
        for s in self._every:
            s.close()


def test_network_cut_while_streaming_every_job_answered(start_daemon, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker").start()
    link = CuttableLink(broker.port)
    env = mqtt_env(broker, "nc", tmp_path / "journal.sqlite3", EDGED_ENGINE__PARALLEL="2")
    env["EDGED_MQTT__PORT"] = str(link.port)
    collector = Probe(broker.port, client_id="nc-collector", persistent=True)
    try:
        collector.subscribe("nc/answers")
        d = start_daemon(**env)
        wait_until(lambda: mqtt_connected(d), 20, "edged connected through the link")
        ids = [f"nc-{i}" for i in range(4)]
        for job_id in ids:
            collector.publish(
                "edged/nc/jobs",
                {
                    "id": job_id,
                    "prompt": "Tell a story.",
                    "max_tokens": 160,
                    "ignore_eos": True,
                    "stream": True,
                },
                response_topic="nc/answers",
            )
        chunks: dict[str, list[int]] = defaultdict(list)
        finals: dict[str, list[dict[str, Any]]] = defaultdict(list)

        def collect(seconds: float) -> None:
            for message in collector.quiet(seconds):
                if "status" in message:
                    finals[message["id"]].append(message)
                else:
                    chunks[message["id"]].append(message["seq"])

        deadline = time.monotonic() + 60
        while sum(len(v) for v in chunks.values()) < 10:
            assert time.monotonic() < deadline, "no streamed chunks"
            collect(0.1)
        link.cut()  # mid-stream
        wait_until(lambda: not mqtt_connected(d), 20, "edged noticed the cut")
        before_restore = sum(len(v) for v in chunks.values())
        with d.client() as c:  # generation goes on meanwhile; chunks wait in paho's outbox
            wait_until(
                lambda: c.get("/status").json()["engine"]["jobs"]["done"] >= 1, 120, "a job done offline"
            )
        link.restore()
        deadline = time.monotonic() + 180
        while len(finals) < len(ids):
            assert time.monotonic() < deadline, f"unanswered: {set(ids) - set(finals)}"
            collect(0.2)
    finally:
        collector.close()
        link.close()
        broker.stop()
    assert all(m["status"] == "done" for ms in finals.values() for m in ms)
    assert all(len({json.dumps(m, sort_keys=True) for m in finals[i]}) == 1 for i in ids)
    for job_id in ids:  # every chunk arrived (at least once): seq 0..n without a gap
        seqs = sorted(set(chunks[job_id]))
        assert seqs == list(range(len(seqs))) and len(seqs) > 10, (job_id, seqs[:5], seqs[-5:])
        assert finals[job_id][0]["usage"]["completion_tokens"] == 160
    print("network cut:", {"jobs": len(ids), "chunks_before_cut": before_restore, "answered": len(finals)})
