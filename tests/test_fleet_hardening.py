"""The fleet view survives any message, and `edged ask` reads only its own answers.

- The aggregator skips what it cannot use (deep JSON, integers past Python's conversion limit, any
  exception) and counts it; the MQTT client's ``on_message`` wrapper keeps paho's network thread
  alive whatever the handler raises; `edged fleet serve`'s ``/health`` turns 503 when nothing has
  arrived for 3 telemetry intervals (at least 10 s) or the broker is gone.
- End to end: a real Mosquitto, two real daemons publishing telemetry every second, the real `edged
  fleet serve` and `edged fleet --once --json`, and a device publishing ``[`` x 60,000 on its
  telemetry topic and (retained) on its status topic: every other device keeps updating.
- `edged ask` (edged.fleet.ask) ignores replies without its Correlation Data or with another one.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from fastapi.testclient import TestClient
from mqtt_helpers import Broker, Probe
from structlog.testing import capture_logs
from test_fleet import Clock, fleet_json, report, status
from test_fleet_web import FleetServer
from test_mqtt import mqtt_env, wait_connected

import edged.fleet.aggregator as aggregator_module
from edged.fleet.aggregator import ONLINE, Aggregator
from edged.fleet.ask import ask_over_mqtt
from edged.fleet.web import QUIET_INTERVALS, QUIET_MIN_S, JobRate, create_app
from edged.mqtt.broker import BrokerOptions
from edged.mqtt.client import Connection

DEEP = b"[" * 60_000
"""Under the aggregator's 64 KiB cap, far over the JSON parser's recursion limit."""
HUGE_INT = b'{"schema": 1, "n": ' + b"7" * 5000 + b"}"
"""An integer of more digits than Python converts (4300): ValueError, not JSONDecodeError."""


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


# -- the aggregator --------------------------------------------------------------------------------


def test_deep_json_and_huge_integers_are_counted_and_skipped() -> None:
    clock = Clock()
    agg = Aggregator(clock=clock, wall=clock.wall)
    for topic in ("edged/x/telemetry", "edged/x/status"):
        agg.handle(topic, DEEP)  # RecursionError inside json.loads
        agg.handle(topic, HUGE_INT)  # ValueError inside json.loads
    agg.handle("edged/good/status", status())
    agg.handle("edged/good/telemetry", report(tok_s=12.5))
    counts = agg.counters()
    assert (counts["messages"], counts["malformed"], counts["devices"]) == (6, 4, 1)
    reasons = [p["reason"] for p in agg.problems()]
    assert reasons.count("JSON nested too deeply") == 2, reasons
    assert sum("4300" in r for r in reasons) == 2, reasons
    good = agg.device("good")
    assert good is not None and good.decode_tok_s == 12.5 and good.state == ONLINE
    assert agg.device("x") is None, "nothing unreadable makes a device"


def test_any_exception_of_one_message_is_counted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A case no parser foresaw (simulated: the telemetry parser raising KeyError) costs that one
    message, logged once per exception type."""

    def broken(_doc: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("unforeseen")

    agg = Aggregator()
    monkeypatch.setattr(aggregator_module, "parse_telemetry", broken)
    with capture_logs() as logs:
        agg.handle("edged/a/telemetry", report())
        agg.handle("edged/b/telemetry", report())
    assert agg.counters()["malformed"] == 2
    assert agg.problems()[-1]["reason"].startswith("unexpected KeyError")
    warnings = [e for e in logs if e["event"] == "fleet message skipped on an unexpected error"]
    assert len(warnings) == 1, logs
    monkeypatch.undo()
    agg.handle("edged/a/telemetry", report())
    assert agg.device("a") is not None and agg.counters()["malformed"] == 2


def test_idle_s_counts_from_the_last_message_of_any_kind() -> None:
    clock = Clock()
    agg = Aggregator(clock=clock, wall=clock.wall)
    clock.t += 4
    assert agg.idle_s() == 4, "none yet: since the start"
    agg.handle("edged/x/telemetry", DEEP)  # even an unreadable one shows the connection delivers
    clock.t += 1.5
    assert agg.idle_s() == 1.5


# -- the client: on_message cannot end paho's network thread ----------------------------------------


@pytest.mark.system
def test_a_handler_that_raises_does_not_end_the_network_thread(broker: Broker) -> None:
    got: queue.Queue[bytes] = queue.Queue()

    def handler(message: Any) -> None:
        if message.payload == b"poison":
            raise RecursionError("maximum recursion depth exceeded")
        got.put(bytes(message.payload))

    connection = Connection(
        BrokerOptions.parse(f"127.0.0.1:{broker.port}"),
        client_id="hardening-conn",
        subscriptions=[("t/#", 1)],
        on_message=handler,
    )
    probe = Probe(broker.port)
    try:
        with connection.open(timeout=10), capture_logs() as logs:
            for payload in (b"poison", b"after-1", b"poison", b"after-2"):
                probe.publish("t/x", payload)
            assert [got.get(timeout=10), got.get(timeout=10)] == [b"after-1", b"after-2"]
            assert connection.handler_errors == 2 and connection.connected
        failed = [e for e in logs if e["event"] == "mqtt message handler failed; message skipped"]
        assert len(failed) == 1 and failed[0]["topic"] == "t/x", logs
    finally:
        probe.close()


# -- /health of `edged fleet serve` ------------------------------------------------------------------


def test_health_is_503_when_no_message_arrived_for_three_intervals_or_the_broker_is_gone() -> None:
    clock = Clock()
    agg = Aggregator(default_interval_s=10, clock=clock, wall=clock.wall)
    up = {"connected": True}
    app = create_app(agg, broker="b:1883", connected=lambda: up["connected"])
    limit = QUIET_INTERVALS * 10
    assert limit > QUIET_MIN_S
    with TestClient(app) as client:
        ok = client.get("/health")
        assert ok.status_code == 200 and ok.json()["status"] == "ok", ok.text
        assert ok.json()["quiet_limit_s"] == limit
        clock.t += limit - 0.5
        assert client.get("/health").status_code == 200
        clock.t += 1
        quiet = client.get("/health")
        assert quiet.status_code == 503 and quiet.json()["status"].startswith("no message for 30 s"), (
            quiet.text
        )
        agg.handle("edged/d/telemetry", report())
        assert client.get("/health").status_code == 200, "a message makes it healthy again"
        up["connected"] = False
        gone = client.get("/health")
        assert gone.status_code == 503 and gone.json()["status"] == "broker disconnected"
    # A short --interval: never sooner than QUIET_MIN_S.
    fast = Aggregator(default_interval_s=0.5, clock=clock, wall=clock.wall)
    with TestClient(create_app(fast, connected=lambda: True)) as client:
        clock.t += QUIET_MIN_S - 0.5
        assert client.get("/health").status_code == 200
        clock.t += 1
        assert client.get("/health").status_code == 503
    # Fed in-process (no broker): silence is not a fault.
    with TestClient(create_app(Aggregator(clock=clock, wall=clock.wall))) as client:
        clock.t += 3600
        assert client.get("/health").status_code == 200


# -- end to end: one poisoned device, the rest of the fleet keeps updating ---------------------------


@pytest.mark.system
@pytest.mark.timeout(240)
def test_a_device_publishing_deep_json_leaves_the_fleet_view_updating(
    start_daemon, broker: Broker, tmp_path: Path
) -> None:
    devices = {"good-rock": "rock5b", "good-pi": "rpi5"}
    daemons = [
        start_daemon(
            board=board,
            wait=False,
            **mqtt_env(broker, device, EDGED_TELEMETRY__INTERVAL_S="1", EDGED_MODEL__THREADS="1"),
        )
        for device, board in devices.items()
    ]
    for d in daemons:
        d.wait_ready()
        wait_connected(d)
    server = FleetServer(broker, tmp_path)
    poison = Probe(broker.port)
    try:
        server.wait_ready()

        def reports() -> dict[str, int]:
            return {d: s["reports"] for d, s in server.devices().items()}

        wait_until(lambda: all(reports().get(d, 0) > 0 for d in devices), 30, "both devices reporting")
        # The attacker: deep JSON on its telemetry topic and, retained, on its status topic (so
        # every `edged fleet` that subscribes later receives it first thing).
        poison.publish("edged/evil/telemetry", DEEP)
        poison.publish("edged/evil/status", DEEP, retain=True)
        wait_until(lambda: server.fleet()["counters"]["malformed"] >= 2, 15, "the poison counted")
        after = reports()
        wait_until(
            lambda: all(reports()[d] >= after[d] + 3 for d in devices),
            30,
            "three more reports from every other device after the poison",
        )
        fleet = server.fleet()
        assert set(server.devices()) == set(devices), "no device made of the poison"
        assert fleet["connected"] is True and fleet["counters"]["malformed"] == 2
        assert {d["device_id"]: d["state"] for d in fleet["devices"]} == dict.fromkeys(devices, ONLINE)
        health = server.http.get("/health")
        assert health.status_code == 200 and health.json()["last_message_s"] < 3, health.text
        # A fresh `edged fleet --once --json` receives the retained poison first and still shows
        # both devices reporting.
        document = fleet_json("--mqtt", f"127.0.0.1:{broker.port}", "--wait", "10", "--interval", "1")
        rows = {d["device_id"]: d for d in document["devices"]}
        assert set(rows) == set(devices), document
        for device in devices:
            assert rows[device]["state"] == ONLINE and rows[device]["reports"] >= 1, rows[device]
        assert document["counters"]["malformed"] >= 1
        assert document["collected_s"] < 9, "it ended once both devices had reported"
    finally:
        poison.close()
        assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


# -- `edged ask`: only replies with its correlation data ---------------------------------------------


@pytest.mark.system
def test_ask_ignores_replies_without_its_correlation_data(broker: Broker) -> None:
    """A device stand-in answers the job, but first a forger publishes on the same reply topic: a
    final answer without Correlation Data, one with another correlation, and junk. ask returns the
    real answer (published last, on one connection, so delivered in this order)."""
    device = Probe(broker.port)
    device.subscribe("edged/dev1/jobs")
    forger = Probe(broker.port)
    served: list[str] = []

    def serve() -> None:
        _, job, props = device.next(30)
        topic, correlation = props.ResponseTopic, bytes(props.CorrelationData)
        served.append(topic)
        forger.publish(topic, {"id": job.get("id"), "status": "done", "content": "FORGED, no correlation"})
        forger.publish(
            topic,
            {"id": job.get("id"), "status": "done", "content": "FORGED, other correlation"},
            correlation=b"0" * len(correlation),
        )
        device.publish(topic, DEEP, correlation=correlation)  # unreadable: skipped, not fatal
        device.publish(topic, {"id": "j", "delta": "real "}, correlation=correlation)
        device.publish(
            topic, {"id": "j", "status": "done", "content": "real answer"}, correlation=correlation
        )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        answer = list(
            ask_over_mqtt(
                BrokerOptions.parse(f"127.0.0.1:{broker.port}"),
                {"prompt": "hi", "max_tokens": 4},
                device="dev1",
                timeout=30,
            )
        )
        thread.join(30)
        assert not thread.is_alive()
    finally:
        device.close()
        forger.close()
    assert served and served[0].startswith("replies/anonymous/")
    assert answer == [
        {"id": "j", "delta": "real "},
        {"id": "j", "status": "done", "content": "real answer"},
    ], answer


def test_help_examples_take_the_password_from_the_environment() -> None:
    """A --password on the command line shows in ps to every local user: the examples do not."""
    from edged.fleet.cli import HELP, SERVE_HELP

    examples = [p for p in f"{HELP}\n\n{SERVE_HELP}".split("\n\n") if "edged fleet --" in p]
    commands = [p.split("   (")[0] for p in examples]
    assert commands and not [c for c in commands if "--password" in c], commands
    assert sum("EDGED_MQTT__PASSWORD=" in c for c in commands) == 2, commands


def test_the_jobs_rate_stays_bounded_whatever_a_device_publishes() -> None:
    """L11: a device reporting a thousand times a second is merged to about a sample a second, with
    the same count; one that fakes a restart at every report is capped."""
    rate = JobRate(window_s=60)
    for i in range(10_000):  # 10 s of reports every millisecond, one job each
        rate.add("fast", 1000 + i / 1000, i)
    assert len(rate._samples["fast"]) <= 12
    assert rate.jobs(1010) == 9_999, "merging keeps the count"
    for i in range(10_000):
        rate.add("flapping", 1000 + i / 1000, i % 2)  # 0, 1, 0, 1: a "restart" every other report
    assert len(rate._samples["flapping"]) == JobRate.MAX_SAMPLES
