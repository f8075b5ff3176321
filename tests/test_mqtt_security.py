"""Passwords, the shipped ACL (deploy/mosquitto/acl) and broker config, TLS, MQTT 3.1.1 and
`edged ask --mqtt`."""

from __future__ import annotations

import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import Daemon, clean_env, run_edged
from mqtt_helpers import Broker, Probe
from paho.mqtt import client as paho
from test_mqtt import mqtt_env, wait_connected

from edged.config import JobsConfig

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
USERS = {"devA": "pa55-a", "devB": "pa55-b", "dashboard": "pa55-d", "ops": "pa55-o"}
DEVICES = ("devA", "devB")
REQUESTERS = ("dashboard", "ops")
ACL = ROOT / "deploy" / "mosquitto" / "acl"
EXAMPLE_DEVICE, EXAMPLE_REQUESTER = "box-17", "dashboard"
"""The user blocks of the shipped ACL that stand for "one block per device/requester"."""


def fleet_acl(devices: tuple[str, ...], requesters: tuple[str, ...]) -> str:
    """The shipped ACL with its example device and requester blocks repeated for these users, as
    its comments tell an operator to do (the user's name replacing the example's in every line)."""
    blocks = ACL.read_text().split("\n\n")
    out = []
    for block in blocks:
        lines = block.splitlines()
        users = [line for line in lines if line.startswith("user ")]
        if users == [f"user {EXAMPLE_DEVICE}"]:
            out += [block.replace(EXAMPLE_DEVICE, name) for name in devices]
        elif users == [f"user {EXAMPLE_REQUESTER}"]:
            out += [block.replace(EXAMPLE_REQUESTER, name) for name in requesters]
        else:
            assert not users, f"an unexpected user block in {ACL}: {users}"
            out.append(block)
    text = "\n\n".join(out)
    for name in (*devices, *requesters):
        assert f"user {name}\n" in text, f"no block for {name}: the example blocks changed"
    return text


@pytest.fixture
def secured(tmp_path: Path):
    passwd = tmp_path / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(
            ["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, password],
            check=True,
            capture_output=True,
        )
    passwd.chmod(0o600)
    acl = tmp_path / "acl"
    acl.write_text(fleet_acl(DEVICES, REQUESTERS))
    b = Broker(
        tmp_path / "broker", extra=f"password_file {passwd}\nacl_file {acl}\n", anonymous=False
    ).start()
    yield b
    b.stop()


def as_device(broker: Broker, device: str, password: str | None = None) -> dict[str, str]:
    return mqtt_env(
        broker,
        device,
        EDGED_MQTT__USERNAME=device,
        EDGED_MQTT__PASSWORD=password if password is not None else USERS[device],
    )


def test_wrong_password_is_refused_with_a_clear_log_line_and_retried(start_daemon, secured: Broker) -> None:
    d = start_daemon(**as_device(secured, "devA", password="wrong"))
    deadline = time.monotonic() + 20
    while d.log().count("mqtt broker refused the connection; retrying") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    refusals = [line for line in d.log().splitlines() if "refused the connection" in line]
    assert len(refusals) >= 2, d.log()
    assert "Not authorized" in refusals[0] or "password" in refusals[0].lower()
    assert "mqtt.username / mqtt.password" in refusals[0]
    with d.client() as c:
        assert c.get("/status").json()["mqtt"]["connected"] is False
        assert c.get("/health").status_code == 200, "the socket keeps serving while MQTT retries"


def test_acl_keeps_one_device_from_reading_another_devices_results(start_daemon, secured: Broker) -> None:
    a = start_daemon(**as_device(secured, "devA"))
    b = start_daemon(**as_device(secured, "devB"))
    wait_connected(a)
    wait_connected(b)
    spy = Probe(secured.port, username="devA", password=USERS["devA"])
    dashboard = Probe(secured.port, username="dashboard", password=USERS["dashboard"])
    try:
        # mosquitto 2.0 grants the subscription and enforces the ACL on every delivery
        spy.subscribe("edged/devB/results/#")
        dashboard.subscribe("edged/devB/results/#")
        dashboard.publish("edged/devB/jobs", {"id": "secret-1", "prompt": "hi", "max_tokens": 4})
        _, answer, _ = dashboard.next()
        assert answer["id"] == "secret-1" and answer["device_id"] == "devB"
        assert spy.quiet(2) == [], "devA must not read devB's results"
        # and the reply-topic path: the dashboard gets answers on replies/dashboard/...
        dashboard.subscribe("replies/dashboard/x")
        dashboard.publish(
            "edged/fleet/jobs", {"prompt": "hi", "max_tokens": 4}, response_topic="replies/dashboard/x"
        )
        assert dashboard.next()[1]["status"] == "done"
    finally:
        spy.close()
        dashboard.close()


def test_acl_keeps_fleet_jobs_and_reply_topics_to_the_devices(start_daemon, secured: Broker) -> None:
    """A requester can neither read fleet jobs (every prompt, with its reply topic and correlation
    data) nor write into another requester's reply topic; the devices still take fleet jobs and
    answer on the requesters' reply topics."""
    a = start_daemon(**as_device(secured, "devA"))
    wait_connected(a)
    snoop = Probe(secured.port, username="dashboard", password=USERS["dashboard"])
    ops = Probe(secured.port, username="ops", password=USERS["ops"])
    try:
        for topic in ("edged/fleet/jobs", "edged/fleet/jobs/+", "replies/ops/#"):
            snoop.subscribe(topic)  # mosquitto grants it and checks the ACL at every delivery
        ops.subscribe("replies/ops/x")
        # A forged answer, acknowledged by the broker before the job is even sent: had it been
        # delivered, it would reach ops ahead of the real answer.
        snoop.publish("replies/ops/x", {"id": "fleet-1", "status": "done", "content": "forged"})
        ops.publish(
            "edged/fleet/jobs",
            {"id": "fleet-1", "prompt": "hi", "max_tokens": 4},
            response_topic="replies/ops/x",
            correlation=b"c-1",
        )
        _, answer, props = ops.next()
        assert answer["status"] == "done" and answer["device_id"] == "devA", answer
        assert answer.get("content") != "forged" and bytes(props.CorrelationData) == b"c-1"
        # The job went to devA and its answer to ops long ago: the snoop got neither.
        assert snoop.quiet(1) == [], "a requester read a fleet job or another requester's answer"
    finally:
        snoop.close()
        ops.close()


def test_acl_binds_the_jobs_user_topic_to_its_user(secured: Broker) -> None:
    """``<jobs topic>/<user>`` names the sender for edged's rate limit: only that user may write it."""
    device = Probe(secured.port, username="devB", password=USERS["devB"])
    ops = Probe(secured.port, username="ops", password=USERS["ops"])
    try:
        device.subscribe("edged/devB/jobs/+")
        ops.publish("edged/devB/jobs/dashboard", {"id": "claims-dashboard", "prompt": "hi"})  # refused
        ops.publish("edged/devB/jobs/ops", {"id": "as-ops", "prompt": "hi"})  # same connection: after
        topic, job, _ = device.next(10)
        assert (topic, job["id"]) == ("edged/devB/jobs/ops", "as-ops")
    finally:
        device.close()
        ops.close()


def test_the_example_broker_config_caps_the_packet_size(tmp_path: Path) -> None:
    """deploy/mosquitto/mosquitto.conf's max_packet_size: the largest job edged accepts (with a long
    reply topic and correlation data) passes; a 2 MiB packet is dropped and its sender cut off."""
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    found = re.search(r"^max_packet_size (\d+)$", conf, re.MULTILINE)
    assert found, "the example broker config sets no max_packet_size"
    limit = int(found.group(1))
    payload_max = JobsConfig().max_payload_bytes
    assert payload_max + 16 * 1024 <= limit <= payload_max + 256 * 1024, (limit, payload_max)
    broker = Broker(tmp_path / "broker", extra=f"max_packet_size {limit}\n").start()
    listener = Probe(broker.port)
    sender = Probe(broker.port)
    cut_off = threading.Event()
    big = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"big-{uuid.uuid4().hex[:8]}")
    big.on_disconnect = lambda *_args: cut_off.set()
    try:
        listener.subscribe("big/#")
        sender.publish(
            "big/largest-job",
            b"x" * payload_max,
            response_topic="replies/requester/" + "r" * 1000,
            correlation=b"c" * 64,
        )
        topic, payload, _ = listener.messages.get(timeout=10)
        assert (topic, len(payload)) == ("big/largest-job", payload_max)
        # MQTT 3.1.1: the client learns no limit from the broker, so it sends the packet.
        connected = threading.Event()
        big.on_connect = lambda *_args: connected.set()
        big.connect_async("127.0.0.1", broker.port)
        big.loop_start()
        assert connected.wait(10), "the 3.1.1 client did not connect"
        big.publish("big/too-large", b"y" * (2 * 1024 * 1024), qos=0)
        assert cut_off.wait(10), "the broker kept a client that sent 2 MiB"
        sender.publish("big/after", b"marker")
        topic, payload, _ = listener.messages.get(timeout=10)
        assert (topic, payload) == ("big/after", b"marker"), "the 2 MiB packet was delivered"
    finally:
        big.loop_stop()
        listener.close()
        sender.close()
        broker.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.crt",
            "-days",
            "2",
            "-subj",
            f"/CN=edged test {ca}",
        )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    return {name: d / name for name in ("ca.crt", "other-ca.crt", "server.crt", "server.key")}


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, Path]):
    b = Broker(tmp_path / "broker")
    plain = b.port
    b.port = plain  # the TLS listener replaces the plain one
    b.conf.write_text(
        b.conf.read_text().replace(
            f"listener {plain} 127.0.0.1\n",
            f"listener {plain} 127.0.0.1\ncertfile {pki['server.crt']}\nkeyfile {pki['server.key']}\n",
        )
    )
    b.start()
    yield b
    b.stop()


def test_tls_with_the_right_ca_works_and_a_wrong_ca_is_refused(
    start_daemon, tls_broker: Broker, pki: dict[str, Path]
) -> None:
    good = start_daemon(**mqtt_env(tls_broker, "tls-good", EDGED_MQTT__TLS__CA=str(pki["ca.crt"])))
    wait_connected(good)
    bad = start_daemon(**mqtt_env(tls_broker, "tls-bad", EDGED_MQTT__TLS__CA=str(pki["other-ca.crt"])))
    deadline = time.monotonic() + 15
    while "mqtt connection failed; retrying" not in bad.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "mqtt connection failed; retrying" in bad.log()
    assert "mqtt.tls.ca" in bad.log()
    with bad.client() as c:
        assert c.get("/status").json()["mqtt"]["connected"] is False


def test_mqtt_3_1_1_is_selectable(start_daemon, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker").start()
    try:
        d = start_daemon(**mqtt_env(broker, "old", EDGED_MQTT__PROTOCOL="3.1.1"))
        wait_connected(d)
        probe = Probe(broker.port)
        try:
            probe.subscribe("old/answers")
            probe.publish(
                "edged/old/jobs", {"id": "v3", "prompt": "hi", "max_tokens": 4, "reply_to": "old/answers"}
            )
            assert probe.next()[1]["status"] == "done"
        finally:
            probe.close()
    finally:
        broker.stop()


def test_edged_ask_over_mqtt(start_daemon, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker").start()
    try:
        d: Daemon = start_daemon(**mqtt_env(broker, "remote1"))
        wait_connected(d)
        target = f"127.0.0.1:{broker.port}"
        r = run_edged("ask", "--mqtt", target, "--device", "remote1", "--max-tokens", "12", "Say hello.")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip()
        assert "[remote1]" in r.stderr and "generated tokens" in r.stderr and "tok/s" in r.stderr
        r = run_edged("ask", "--mqtt", target, "--fleet", "--json", "--max-tokens", "4", "hi")
        assert r.returncode == 0, r.stderr
        assert '"status": "done"' in r.stdout
        r = run_edged("ask", "--mqtt", target, "--device", "remote1", "word " * 3000)
        assert r.returncode == 1 and "context_length_exceeded" in r.stderr
        assert run_edged("ask", "--mqtt", target, "hi").returncode == 2
    finally:
        broker.stop()
    r = run_edged(
        "ask", "--mqtt", f"127.0.0.1:{broker.port}", "--device", "remote1", "hi", env=clean_env(), timeout=60
    )
    assert r.returncode == 3


def test_require_tls_refuses_to_start_without_tls(tmp_path: Path) -> None:
    env = clean_env(
        EDGED_MQTT__HOST="127.0.0.1",
        EDGED_MQTT__REQUIRE_TLS="true",
        EDGED_SOCKET__PATH=str(tmp_path / "s.sock"),
        EDGED_JOURNAL__PATH=str(tmp_path / "journal.sqlite3"),
    )
    r = run_edged("serve", env=env, timeout=60)
    assert r.returncode == 78, r.stderr
    assert "require_tls is set but TLS is off" in r.stderr
    assert not (tmp_path / "s.sock").exists(), "refused before serving anything"


def test_rate_limit_per_mqtt_client(start_daemon, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker").start()
    probe = Probe(broker.port)
    try:
        d = start_daemon(**mqtt_env(broker, "rl", EDGED_MQTT__RATE_PER_MIN="2"))
        wait_connected(d)
        probe.subscribe("rl/#")
        for i in range(4):  # one client (its response topic): two pass, two are over the limit
            probe.publish(
                "edged/rl/jobs", {"id": f"a-{i}", "prompt": "hi", "max_tokens": 1}, response_topic="rl/a"
            )
        probe.publish("edged/rl/jobs", {"id": "b-0", "prompt": "hi", "max_tokens": 1}, response_topic="rl/b")
        finals = {m["id"]: m for m in probe.finals(5)}
        with d.client() as c:
            counters = c.get("/status").json()["mqtt"]["counters"]
    finally:
        probe.close()
        broker.stop()
    limited = sorted(i for i, m in finals.items() if m["status"] == "error")
    assert limited == ["a-2", "a-3"], finals
    for job_id in limited:
        error = finals[job_id]["error"]
        assert error["code"] == "rate_limited" and error["retry_after"] >= 1, error
        assert "mqtt.rate_per_min (2)" in error["message"]
    assert finals["b-0"]["status"] == "done", "another client has its own bucket"
    assert counters["rate_limited"] == 2
