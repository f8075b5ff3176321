"""The MQTT transport against a real Mosquitto broker, the real daemon and foreign clients."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import Daemon, wait_until
from mqtt_helpers import Broker, Probe

pytestmark = pytest.mark.system


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def probe(broker: Broker):
    p = Probe(broker.port)
    yield p
    p.close()


def mqtt_env(broker: Broker, device: str = "dev1", **extra: str) -> dict[str, str]:
    return {
        "EDGED_MQTT__HOST": "127.0.0.1",
        "EDGED_MQTT__PORT": str(broker.port),
        "EDGED_DEVICE_ID": device,
        "EDGED_MQTT__RECONNECT_MAX_S": "2",
        **extra,
    }


def wait_mqtt(d: Daemon, connected: bool = True, timeout: float = 20) -> None:
    """Until /status says edged is (or is no longer) connected to its broker; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    with d.client(timeout=5) as c:
        while time.monotonic() < deadline:
            mqtt = c.get("/status").json()["mqtt"]
            if mqtt and mqtt["connected"] is connected:
                return
            time.sleep(0.05)
    pytest.fail(f"edged did not {'connect to' if connected else 'lose'} the broker:\n{d.log()}")


def wait_connected(d: Daemon, timeout: float = 20) -> None:
    wait_mqtt(d, True, timeout)


@pytest.fixture
def device(start_daemon, broker: Broker) -> Daemon:
    d = start_daemon(**mqtt_env(broker))
    wait_connected(d)
    return d


def test_foreign_client_gets_its_answer_with_correlation_data(device: Daemon, broker: Broker) -> None:
    client_id = f"foreign-{uuid.uuid4().hex[:8]}"
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-V",
            "mqttv5",
            "-i",
            client_id,
            "-p",
            str(broker.port),
            "-t",
            "lab/answers",
            "-F",
            "%D|%p",
            "-C",
            "1",
            "-W",
            "60",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # mosquitto_sub block-buffers its output into a pipe, so the broker's own log says when it has
        # answered the SUBSCRIBE (log_type all); publishing earlier would lose the answer
        wait_until(
            lambda: f"Sending SUBACK to {client_id}" in broker.text() or sub.poll() is not None,
            timeout=10,
            what="mosquitto_sub's subscription",
        )
        assert sub.poll() is None, f"mosquitto_sub exited with {sub.returncode}:\n{broker.text()}"
        publish_foreign_job(broker)
        out, _ = sub.communicate(timeout=70)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    assert sub.returncode == 0, f"mosquitto_sub got no answer within its 60 s (-W):\n{device.log()}"
    correlation, payload = out.strip().split("|", 1)
    assert correlation == "req-42"
    answer = json.loads(payload)
    assert answer["id"] == "foreign-1"
    assert answer["status"] == "done"
    assert answer["content"]
    assert answer["device_id"] == "dev1"
    assert answer["usage"]["completion_tokens"] <= 8
    assert answer["timings"]["predicted_n"] == answer["usage"]["completion_tokens"]


def publish_foreign_job(broker: Broker) -> None:
    subprocess.run(
        [
            "mosquitto_pub",
            "-V",
            "mqttv5",
            "-p",
            str(broker.port),
            "-t",
            "edged/dev1/jobs",
            "-m",
            '{"id": "foreign-1", "prompt": "Say hello", "max_tokens": 8}',
            "-D",
            "publish",
            "response-topic",
            "lab/answers",
            "-D",
            "publish",
            "correlation-data",
            "req-42",
        ],
        check=True,
        timeout=10,
    )


def test_bare_prompt_is_answered_on_the_results_topic(device: Daemon, probe: Probe) -> None:
    probe.subscribe("edged/dev1/results/#")
    probe.publish("edged/dev1/jobs", "What is the capital of France?")
    topic, answer, _ = probe.next()
    assert topic == f"edged/dev1/results/{answer['id']}"
    assert answer["status"] == "done" and answer["content"]


def test_reply_to_and_streaming_chunks(device: Daemon, probe: Probe) -> None:
    probe.subscribe("my/inbox")
    probe.publish(
        "edged/dev1/jobs",
        {
            "id": "s-1",
            "prompt": "Count to five.",
            "max_tokens": 24,
            "stream": True,
            "temperature": 0,
            "reply_to": "my/inbox",
        },
    )
    chunks, final = probe.until_final()
    assert final["status"] == "done"
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert len(chunks) > 3
    assert all(c["id"] == "s-1" for c in chunks)
    assert "".join(c["delta"] for c in chunks if c["kind"] == "content") == final["content"]


@pytest.mark.parametrize(
    ("payload", "code", "needle"),
    [
        (b'{"prompt": "hi", ', "invalid_request", "malformed JSON"),
        (b'{"id": "typed", "prompt": "hi", "max_tokens": "many"}', "invalid_request", "max_tokens"),
        (b'{"id": "extra", "prompt": "hi", "colour": 1}', "invalid_request", "colour"),
        (b"\xff\xfe not utf-8", "invalid_request", "UTF-8"),
        (b"[1, 2, 3]", "invalid_request", "JSON object"),
        (b"x" * 1_100_000, "payload_too_large", "exceeds the limit"),
        (json.dumps({"id": "long", "prompt": "word " * 3000}).encode(), "context_length_exceeded", "2048"),
    ],
)
def test_bad_payloads_get_error_answers_and_the_daemon_keeps_serving(
    device: Daemon, probe: Probe, payload: bytes, code: str, needle: str
) -> None:
    probe.subscribe("bad/answers")
    probe.subscribe("edged/dev1/errors")
    probe.publish("edged/dev1/jobs", payload, response_topic="bad/answers", correlation=b"c1")
    topic, answer, props = probe.next()
    assert topic == "bad/answers"
    assert props.CorrelationData == b"c1"
    assert answer["status"] == "error"
    assert answer["error"]["code"] == code
    assert needle in answer["error"]["message"]
    probe.subscribe("edged/dev1/results/#")
    probe.publish("edged/dev1/jobs", payload)  # no response topic
    topic, answer, _ = probe.next()
    # a job that parsed is answered on its results topic; one that did not, on the errors topic
    assert topic == ("edged/dev1/results/long" if code == "context_length_exceeded" else "edged/dev1/errors")
    assert answer["error"]["code"] == code
    probe.publish(
        "edged/dev1/jobs", {"prompt": "still there?", "max_tokens": 2}, response_topic="bad/answers"
    )
    assert probe.next()[1]["status"] == "done"


def test_cancel_over_mqtt(device: Daemon, probe: Probe) -> None:
    probe.subscribe("c/answers")
    probe.publish(
        "edged/dev1/jobs",
        {
            "id": "long-1",
            "prompt": "Write a long story.",
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
        },
        response_topic="c/answers",
    )
    probe.next()  # the first chunk: it is running
    # A cancel reaches the job answered on the cancel's own topic (job ids are the requester's).
    probe.publish("edged/dev1/cancel", {"id": "long-1"}, response_topic="c/answers")
    _, final = probe.until_final()
    assert final["status"] == "error"
    assert final["error"]["code"] == "cancelled"


def test_duplicate_job_id_returns_the_stored_answer(device: Daemon, probe: Probe) -> None:
    probe.subscribe("d/answers")
    job = {"id": "dup-1", "prompt": "Say hi", "max_tokens": 8}
    probe.publish("edged/dev1/jobs", job, response_topic="d/answers")
    first = probe.next()[1]
    probe.publish("edged/dev1/jobs", job, response_topic="d/answers")
    second = probe.next()[1]
    assert second["duplicate"] is True
    assert second["content"] == first["content"]
    assert second["timings"] == first["timings"], "the stored answer, not a second generation"
    with device.client() as c:
        assert c.get("/v1/jobs/dup-1").json()["state"] == "done"
        assert c.get("/status").json()["engine"]["jobs"]["done"] == 1


def test_presence_online_offline_and_last_will(start_daemon, broker: Broker, probe: Probe) -> None:
    d = start_daemon(**mqtt_env(broker, "dev9"))
    wait_connected(d)
    probe.subscribe("edged/dev9/status")
    _, status, _ = probe.next()
    assert status["state"] == "online"
    assert status["backend"] == "llamacpp" and status["profile"] == "generic" and status["version"]
    assert d.stop() == 0
    assert probe.next()[1]["state"] == "offline"
    d2 = start_daemon(**mqtt_env(broker, "dev9"))
    wait_connected(d2)
    assert probe.next()[1]["state"] == "online"
    d2.proc.send_signal(signal.SIGKILL)
    d2.proc.wait(10)
    will = probe.next(30)[1]
    assert will["state"] == "offline", "the broker publishes the last will when edged dies"
    retained = Probe(broker.port)
    try:
        retained.subscribe("edged/dev9/status")
        assert retained.next()[1]["state"] == "offline"
    finally:
        retained.close()


def test_two_daemons_share_the_fleet_topic(start_daemon, broker: Broker, probe: Probe) -> None:
    # one thread each: two daemons with two spinning llama.cpp threads each on a 2-core machine slow
    # every token down a hundredfold (OpenMP busy-waits), which is a property of the box, not of edged
    a = start_daemon(**mqtt_env(broker, "fleet-a", EDGED_MODEL__THREADS="1"))
    b = start_daemon(**mqtt_env(broker, "fleet-b", EDGED_MODEL__THREADS="1"))
    wait_connected(a)
    wait_connected(b)
    probe.subscribe("f/answers")
    for i in range(20):
        probe.publish(
            "edged/fleet/jobs",
            {"id": f"f-{i}", "prompt": f"Say the number {i}.", "max_tokens": 4},
            response_topic="f/answers",
        )
    answers = probe.finals(20, timeout=180)
    assert sorted(m["id"] for m in answers) == sorted(f"f-{i}" for i in range(20)), "each job answered once"
    assert all(m["status"] == "done" for m in answers)
    devices = {m["device_id"] for m in answers}
    assert devices == {"fleet-a", "fleet-b"}, "both daemons took jobs"
    assert probe.quiet(2) == [], "no job answered twice"


def test_jobs_published_while_the_daemon_is_away_are_answered(
    start_daemon, broker: Broker, probe: Probe
) -> None:
    d = start_daemon(**mqtt_env(broker, "away"))
    wait_connected(d)
    assert d.stop() == 0
    probe.subscribe("away/answers")
    for i in range(3):
        probe.publish(
            "edged/away/jobs",
            {"id": f"away-{i}", "prompt": "hi", "max_tokens": 4},
            response_topic="away/answers",
        )
    d2 = start_daemon(**mqtt_env(broker, "away"))
    answers = probe.finals(3)
    assert sorted(m["id"] for m in answers) == ["away-0", "away-1", "away-2"]
    connects = [json.loads(line) for line in d2.log().splitlines() if '"mqtt connected"' in line]
    assert connects[0]["session_present"] is True, "the broker kept the session while edged was away"


def test_broker_restart_during_a_run_loses_no_answer(start_daemon, broker: Broker) -> None:
    d = start_daemon(**mqtt_env(broker, "rb"))
    wait_connected(d)
    probe = Probe(broker.port, client_id="restart-probe", persistent=True)
    try:
        probe.subscribe("rb/answers")
        for i in range(8):
            probe.publish(
                "edged/rb/jobs",
                {"id": f"rb-{i}", "prompt": "Tell me a story.", "max_tokens": 120, "ignore_eos": True},
                response_topic="rb/answers",
            )
        seen = {m["id"] for m in probe.finals(1)}
        broker.stop()
        # the broker stays down until edged has noticed (jobs keep running; their answers must wait)
        wait_mqtt(d, connected=False)
        broker.start()
        # QoS 1 may deliver an answer twice across the restart; every job must be answered.
        deadline = time.monotonic() + 180
        while len(seen) < 8:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"only {sorted(seen)} answered within 180 s of the restart:\n{d.log()[-3000:]}")
            seen.update(m["id"] for m in probe.finals(1, timeout=left))
    finally:
        probe.close()
    assert sorted(seen) == sorted(f"rb-{i}" for i in range(8))
    assert "mqtt disconnected" in d.log()


def test_queue_is_never_overrun_jobs_wait_for_room(start_daemon, broker: Broker, probe: Probe) -> None:
    """With a queue of 1, ten jobs at once are all answered: MQTT holds them back instead of queue_full."""
    d = start_daemon(EDGED_QUEUE__MAX_DEPTH="1", **mqtt_env(broker, "narrow"))
    wait_connected(d)
    probe.subscribe("n/answers")
    for i in range(10):
        probe.publish(
            "edged/narrow/jobs",
            {"id": f"n-{i}", "prompt": "hi", "max_tokens": 16},
            response_topic="n/answers",
        )
    answers = probe.finals(10)
    assert all(m["status"] == "done" for m in answers), [m.get("error") for m in answers]
    with d.client() as c:
        assert c.get("/status").json()["engine"]["jobs"]["rejected"] == 0


def test_concurrent_socket_and_mqtt_jobs_share_one_engine(device: Daemon, probe: Probe) -> None:
    probe.subscribe("mix/answers")
    results = {}

    def over_socket() -> None:
        with device.client() as c:
            results["socket"] = c.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            ).status_code

    t = threading.Thread(target=over_socket)
    t.start()
    probe.publish("edged/dev1/jobs", {"prompt": "hi", "max_tokens": 8}, response_topic="mix/answers")
    assert probe.next()[1]["status"] == "done"
    t.join(60)
    assert results["socket"] == 200
