"""The fleet aggregator and `edged fleet`: the state machine on a fake clock, then a real Mosquitto
with three real daemons on fixture boards (online, stale, offline; `--once --json`), IPv6, TLS,
passwords and the exit codes of the real command."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import socket
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, chat, clean_env, edged_exe, run_edged, wait_until
from mqtt_helpers import Broker, Probe, free_port
from test_mqtt import mqtt_env, wait_connected
from test_mqtt_security import USERS, pki, secured, tls_broker  # noqa: F401  (fixtures)

from edged.config import load_settings
from edged.fleet.aggregator import (
    HISTORY_POINTS,
    OFFLINE,
    ONLINE,
    STALE,
    Aggregator,
    FleetEvent,
    FleetMonitor,
)
from edged.fleet.ask import ask_over_mqtt
from edged.mqtt.broker import BrokerOptions, BrokerSetupError, parse_address
from edged.mqtt.client import BrokerUnreachable

BOARDS = {  # device id -> fixture board, board model, profile, hottest zone, °C, throttled, governor
    "fleet-rock": ("rock5b", "Radxa ROCK 5B", "rk3588", "bigcore0-thermal", 52.675, False, "normal"),
    "fleet-pi": ("rpi5", "Raspberry Pi 5 Model B Rev 1.0", "rpi5", "cpu-thermal", 61.45, True, "normal"),
    "fleet-x86": ("x86", None, "generic", None, None, False, "unknown"),  # no thermal zones at all
}


# -- helpers ---------------------------------------------------------------------------------------


class Clock:
    """A monotonic clock the test moves; ``wall`` is the same instant as a Unix time."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_700_000_000.0 + self.t


def report(
    tok_s: float | None = 20.0,
    hottest: float | None = 55.0,
    *,
    throttled: bool = False,
    depth: int = 0,
    schema: Any = 1,
    **extra: Any,
) -> bytes:
    """A telemetry document shaped like edged.telemetry.report (the parts the aggregator reads)."""
    zones = [] if hottest is None else [{"zone": "thermal_zone0", "type": "soc-thermal", "temp_c": hottest}]
    doc = {
        "schema": schema,
        "device_id": "d",
        "version": "0.1.0",
        "backend": "llamacpp",
        "model": "m",
        "state": "ready",
        "queue": {"depth": depth, "max_depth": 16},
        "slots": {"total": 2, "effective": 2, "active": 0},
        "jobs": {"done": 3},
        "summary": {
            "window": "1m",
            "decode_tokens_per_s": tok_s,
            "tokens_per_s": tok_s,
            "s_per_1k_tokens": round(1000 / tok_s, 2) if tok_s else None,
            "ttft_ms_p50": 120.0,
            "hottest_c": hottest,
            "thermal_state": "normal",
            "throttled": throttled,
        },
        "thermals": {"zones": zones, "governor": {"state": "normal"}},
        **extra,
    }
    return json.dumps(doc).encode()


def status(state: str = "online", **extra: Any) -> bytes:
    return json.dumps(
        {"state": state, "board": "Radxa ROCK 5B", "profile": "rk3588", "backend": "llamacpp", **extra}
    ).encode()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@functools.cache
def fleet_command() -> tuple[str, ...]:
    """`edged fleet`, the real console script; until edged/cli.py registers the sub-app (see
    test_edged_fleet_is_registered), the same Typer app run on its own."""
    if run_edged("fleet", "--help").returncode == 0:
        return (edged_exe(), "fleet")
    return (sys.executable, "-m", "edged.fleet.cli")


def run_fleet(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*fleet_command(), *args], env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def fleet_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = run_fleet(*args, "--once", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def by_id(devices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in devices}


# -- the client factory ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("broker.lan", ("broker.lan", None)),
        ("broker.lan:1884", ("broker.lan", 1884)),
        ("10.0.0.5:8883", ("10.0.0.5", 8883)),
        ("[::1]:1883", ("::1", 1883)),
        ("[fd00::5]", ("fd00::5", None)),
        ("::1", ("::1", None)),
        ("fe80::1%eth0", ("fe80::1%eth0", None)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["", "host:", ":1883", "host:99999", "host:x", "[::1", "[::1]x", "[nope]:1", "a:b:c"]
)
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(BrokerSetupError):
        parse_address(text)


@pytest.mark.system
def test_broker_options_from_config_and_overrides(tmp_path: Path, pki: dict[str, Path]) -> None:  # noqa: F811
    ca = str(pki["ca.crt"])
    cfg = load_settings(
        None, {"mqtt": {"host": "broker.lan", "username": "u", "password": "s3cret-pw", "tls": {"ca": ca}}}
    ).mqtt
    options = BrokerOptions.from_config(cfg)
    assert (options.host, options.effective_port, options.username, options.password) == (
        "broker.lan",
        8883,
        "u",
        "s3cret-pw",
    )
    assert options.tls_active and options.ca == Path(ca) and options.verify and options.protocol == "5"
    assert "s3cret-pw" not in repr(options)
    context = options.tls_context()
    assert context is not None and context.check_hostname
    # The command line wins; TLS is never guessed from the port.
    plain = BrokerOptions.from_config(cfg, "[::1]:8883", {"tls": False, "ca": None, "username": "v"})
    assert (plain.host, plain.port, plain.tls_active, plain.username, plain.address) == (
        "::1",
        8883,
        False,
        "v",
        "[::1]:8883",
    )
    assert plain.tls_context() is None
    unverified = BrokerOptions.parse("localhost", ca=pki["other-ca.crt"], verify=False).tls_context()
    assert unverified is not None and not unverified.check_hostname
    client_cert = BrokerOptions.parse("localhost", cert=pki["server.crt"], key=pki["server.key"])
    assert client_cert.tls_active and client_cert.tls_context() is not None
    with pytest.raises(BrokerSetupError, match="go together"):
        BrokerOptions.parse("localhost", cert=pki["server.crt"])
    with pytest.raises(BrokerSetupError, match="no such file"):
        BrokerOptions.parse("localhost", ca=tmp_path / "missing.crt")
    with pytest.raises(BrokerSetupError, match="no broker"):
        BrokerOptions.from_config(load_settings(None, {}).mqtt)


# -- the state machine (fake clock) ----------------------------------------------------------------


def test_online_stale_offline_on_a_fake_clock() -> None:
    clock = Clock()
    agg = Aggregator(default_interval_s=10, clock=clock, wall=clock.wall)
    events: list[FleetEvent] = []
    agg.subscribe(events.append)
    transitions = lambda: [(e.device_id, e.previous, e.device.state) for e in events if e.kind == "state"]  # noqa: E731

    agg.handle("edged/a/status", status())
    assert agg.device("a").state == ONLINE and agg.device("a").board == "Radxa ROCK 5B"
    for _ in range(3):  # reports every 5 s: the interval is learned from the gaps
        agg.handle("edged/a/telemetry", report())
        clock.t += 5
    assert agg.device("a").interval_s == 5
    clock.t += 9.9  # 14.9 s since the last report: not yet 3 intervals
    agg.tick()
    assert agg.device("a").state == ONLINE
    clock.t += 0.2
    agg.tick()
    assert agg.device("a").state == STALE
    agg.handle("edged/a/telemetry", report())
    assert agg.device("a").state == ONLINE
    agg.handle("edged/a/status", status("offline"))
    assert agg.device("a").state == OFFLINE and agg.device("a").last_status == OFFLINE
    clock.t += 1
    agg.handle("edged/a/telemetry", report())  # a report after the will: it is back
    assert agg.device("a").state == ONLINE
    # Announced intervals win over observed gaps.
    agg.handle("edged/a/telemetry", report(interval_s=60))
    assert agg.device("a").interval_s == 60

    # A retained "online" and then silence: stale after 3 default intervals from first contact.
    agg.handle("edged/b/status", status())
    clock.t += 30.1
    assert agg.device("b").state == STALE and agg.device("b").last_seen is None
    agg.handle("edged/b/status", b"")  # its retained status cleared: gone from the fleet
    assert agg.device("b") is None
    assert transitions() == [
        ("a", None, ONLINE),
        ("a", ONLINE, STALE),
        ("a", STALE, ONLINE),
        ("a", ONLINE, OFFLINE),
        ("a", OFFLINE, ONLINE),
        ("b", None, ONLINE),
        ("b", ONLINE, STALE),
    ]
    assert events[-1].kind == "removed" and events[-1].previous == "cleared"
    json.dumps([e.to_dict() for e in events])  # plain data, ready for SSE


def test_worst_first_and_the_table() -> None:
    clock = Clock()
    agg = Aggregator(clock=clock, wall=clock.wall)
    agg.handle("edged/cool/telemetry", report(hottest=40))
    agg.handle("edged/hot/telemetry", report(hottest=75))
    agg.handle("edged/throttled/telemetry", report(hottest=50, throttled=True))
    agg.handle("edged/down/status", status("offline"))
    agg.handle("edged/none/telemetry", report(hottest=None, tok_s=None))
    order = [d.device_id for d in agg.snapshot()]
    assert order == ["down", "throttled", "hot", "cool", "none"]

    from rich.console import Console

    from edged.fleet.view import render_table

    console = Console(width=200, record=True)
    console.print(render_table(agg.snapshot(), counters=agg.counters(), broker="b:1883", now=clock.wall()))
    text = console.export_text()
    assert "75.0 soc-thermal" in text and "Radxa ROCK 5B / rk3588" in text and "50.0" in text
    assert "5 devices: 4 online, 0 stale, 1 offline" in text


def test_malformed_and_unknown_schema_are_counted_and_skipped() -> None:
    agg = Aggregator(max_payload_bytes=4096)
    for topic, payload in [
        ("edged/x/telemetry", b"not json"),
        ("edged/x/telemetry", b"\xff\xfe"),
        ("edged/x/telemetry", b"[1, 2]"),
        ("edged/x/telemetry", json.dumps({"schema": 1, "summary": "fast", "queue": {}}).encode()),
        ("edged/x/telemetry", json.dumps({"schema": 1, "queue": {}}).encode()),
        ("edged/x/telemetry", report(tok_s=1.0) + b" " * 5000),
        ("edged/x/status", b'{"state": "sleepy"}'),
        ("edged/" + "x" * 200 + "/status", status()),
    ]:
        agg.handle(topic, payload)
    agg.handle("edged/y/telemetry", report(schema=2))
    agg.handle("edged/y/telemetry", report(schema=True))
    agg.handle("edged/y/telemetry", json.dumps({"no": "schema"}).encode())
    agg.handle("edged/a/b/telemetry", report())  # not one topic level: not ours
    agg.handle("other/z/telemetry", report())
    counts = agg.counters()
    assert counts["malformed"] == 8 and counts["unknown_schema"] == 3 and counts["ignored"] == 2
    assert counts["messages"] == 13 and counts["devices"] == 0
    assert agg.snapshot() == []
    problems = agg.problems()
    assert problems[0]["kind"] == "malformed" and "JSON" in problems[0]["reason"]
    assert any("schema 2" in p["reason"] for p in problems)


def test_memory_is_bounded() -> None:
    clock = Clock()
    agg = Aggregator(max_devices=2, history_points=4, history_s=40, clock=clock, wall=clock.wall)
    events: list[FleetEvent] = []
    agg.subscribe(events.append)
    agg.handle("edged/a/telemetry", report())
    agg.handle("edged/b/status", status("offline"))
    agg.handle("edged/c/telemetry", report())  # full: evicts b, the one offline
    assert {d.device_id for d in agg.snapshot()} == {"a", "c"}
    agg.handle("edged/d/telemetry", report())  # full of online devices: refused
    counts = agg.counters()
    assert (counts["devices_evicted"], counts["devices_refused"], counts["devices"]) == (1, 1, 2)
    assert [e.device_id for e in events if e.kind == "removed"] == ["b"]

    # History: one point per 10 s bucket (a later report replaces it), the last 4 kept.
    clock.t = 10_000.0  # a bucket boundary
    for step, tok_s in [(0, 1), (3, 2), (10, 3), (20, 4), (30, 5), (40, 6), (50, 7)]:
        clock.t = 10_000.0 + step
        agg.handle("edged/a/telemetry", report(tok_s=tok_s, hottest=40 + tok_s))
    history = agg.history("a", ("decode_tok_s", "hottest_c"))
    assert history is not None
    assert history["decode_tok_s"] == [4, 5, 6, 7] and history["hottest_c"] == [44, 45, 46, 47]
    assert history["t"] == [clock.wall() - 30, clock.wall() - 20, clock.wall() - 10, clock.wall()]
    assert agg.history("a", since=clock.wall() - 15)["decode_tok_s"] == [6, 7]  # type: ignore[index]
    assert agg.history("nobody") is None
    assert agg.latest_report("a")["summary"]["decode_tokens_per_s"] == 7  # type: ignore[index]


def test_memory_per_device_at_full_history() -> None:
    """20 devices with a full history (360 points, 60 min at 10 s) and a report the size of a real
    one (a ROCK 5B's is about 5 KiB): the per-device cost, times 1000 devices, stays under 48 MiB."""
    clock = Clock()
    agg = Aggregator(clock=clock, wall=clock.wall)
    payload = report(padding="x" * (5200 - len(report())))
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(HISTORY_POINTS + 5):
            clock.t += 10
            for n in range(20):
                agg.handle(f"edged/dev{n:02d}/telemetry", bytes(bytearray(payload)))  # a fresh copy each
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per_device = grown / 20
    assert len(agg.history("dev00")["t"]) == HISTORY_POINTS  # type: ignore[index]
    assert per_device * 1000 < 48 * 2**20, f"{per_device:.0f} bytes a device"
    print(f"memory: {per_device:.0f} bytes a device with {len(payload)}-byte reports")


def test_watch_delivers_events_to_an_asyncio_queue() -> None:
    agg = Aggregator()

    async def main() -> list[str]:
        with agg.watch(maxsize=8) as events:
            feeder = threading.Thread(target=lambda: agg.handle("edged/a/telemetry", report()))
            feeder.start()
            got = [await asyncio.wait_for(events.get(), 10), await asyncio.wait_for(events.get(), 10)]
            feeder.join()
            for n in range(20):  # a slow reader loses the oldest events, never blocks the aggregator
                agg.handle(f"edged/a{n}/telemetry", report())
            await asyncio.sleep(0)
            assert events.queue.qsize() == 8 and events.dropped > 0
        return [e.kind for e in got]

    assert asyncio.run(main()) == ["state", "telemetry"]


# -- real broker, real daemons ---------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.mark.system
def test_edged_fleet_is_registered() -> None:
    r = run_edged("fleet", "--help")
    assert r.returncode == 0, "edged/cli.py must register it: app.add_typer(fleet_app, name='fleet')"
    assert "--mqtt" in r.stdout and "Examples" in r.stdout and "--once" in r.stdout


@pytest.mark.system
def test_three_daemons_online_stale_offline(start_daemon, broker: Broker) -> None:
    daemons: dict[str, Daemon] = {}
    for device, (board, *_rest) in BOARDS.items():
        daemons[device] = start_daemon(
            board=board,
            wait=False,
            **mqtt_env(broker, device, EDGED_TELEMETRY__INTERVAL_S="1", EDGED_MODEL__THREADS="1"),
        )
    for d in daemons.values():
        d.wait_ready()
        wait_connected(d)
        with d.client() as c:  # one job each, so the throughput figures are real
            assert c.post("/v1/chat/completions", json=chat("Say hi.", max_tokens=8)).status_code == 200
    pi = daemons["fleet-pi"]
    assert pi.proc is not None
    events: list[FleetEvent] = []
    monitor = FleetMonitor(BrokerOptions.parse(f"127.0.0.1:{broker.port}"), Aggregator(default_interval_s=1))
    monitor.aggregator.subscribe(events.append)
    probe = Probe(broker.port)
    stopped = False
    try:
        with monitor.start():
            agg = monitor.aggregator

            def reported(device: str) -> bool:
                state = agg.device(device)
                return state is not None and state.state == ONLINE and (state.jobs_done or 0) >= 1

            wait_until(lambda: all(reported(d) for d in BOARDS), 30, "three devices online with their job")
            snapshot = agg.snapshot()
            assert [d.device_id for d in snapshot] == ["fleet-pi", "fleet-rock", "fleet-x86"]  # worst first
            for state in snapshot:
                _, model, profile, zone, hottest, throttled, governor = BOARDS[state.device_id]
                assert (state.board, state.profile, state.backend) == (model, profile, "llamacpp")
                assert (state.hottest_zone, state.hottest_c, state.throttled) == (zone, hottest, throttled)
                assert state.decode_tok_s is not None and state.decode_tok_s > 0
                assert state.s_per_1k_tokens == pytest.approx(1000 / state.decode_tok_s, rel=0.01)
                assert state.ttft_ms_p50 is not None and state.ttft_ms_p50 > 0
                assert state.queue_depth == 0 and state.queue_max_depth == 16
                assert state.governor == governor and state.slots and state.version
                assert state.interval_s == pytest.approx(1, abs=0.3)
                assert state.last_seen_s is not None and state.last_seen_s < 3
                history = agg.history(state.device_id)
                assert (
                    history is not None and history["t"] and history["decode_tok_s"][-1] == state.decode_tok_s
                )
            report_doc = agg.latest_report("fleet-rock")
            assert (
                report_doc is not None
                and report_doc["schema"] == 1
                and report_doc["device_id"] == "fleet-rock"
            )
            print(f"a real telemetry report: {len(json.dumps(report_doc))} bytes")

            document = fleet_json("--mqtt", f"127.0.0.1:{broker.port}", "--wait", "10", "--interval", "1")
            assert [d["device_id"] for d in document["devices"]] == ["fleet-pi", "fleet-rock", "fleet-x86"]
            assert document["collected_s"] < 9, "it ends once every device has reported"
            for device, row in by_id(document["devices"]).items():
                _, model, profile, zone, hottest, throttled, _governor = BOARDS[device]
                assert row["state"] == ONLINE and (row["board"], row["profile"]) == (model, profile)
                assert row["backend"] == "llamacpp" and row["decode_tok_s"] > 0 and row["ttft_ms_p50"] > 0
                assert (row["hottest_c"], row["throttled"]) == (hottest, throttled)
            assert document["counters"]["malformed"] == 0 and document["broker"] == f"127.0.0.1:{broker.port}"

            # Foreign junk is counted and skipped, and makes no device.
            probe.publish("edged/x/telemetry", b"{not json")
            probe.publish("edged/y/telemetry", {"schema": 99, "summary": {}, "queue": {}})
            wait_until(lambda: agg.counters()["unknown_schema"] == 1, 10, "the unknown schema counted")
            assert agg.counters()["malformed"] == 1
            assert {d.device_id for d in agg.snapshot()} == set(BOARDS)

            # Stale: the Pi's daemon frozen (its connection stays up, it just stops reporting).
            pi.proc.send_signal(signal.SIGSTOP)
            stopped = True
            wait_until(lambda: agg.device("fleet-pi").state == STALE, 15, "the frozen device stale")
            # Offline by the will: the ROCK's daemon killed outright.
            rock = daemons["fleet-rock"]
            assert rock.proc is not None
            rock.proc.kill()
            rock.proc.wait(10)
            wait_until(lambda: agg.device("fleet-rock").state == OFFLINE, 15, "the killed device offline")
            assert agg.device("fleet-rock").last_status == OFFLINE
            assert agg.device("fleet-x86").state == ONLINE

            # `edged fleet --once --json` from a fresh process sees the same three states.
            document = fleet_json("--mqtt", f"127.0.0.1:{broker.port}", "--wait", "5", "--interval", "1")
            rows = by_id(document["devices"])
            assert {d: rows[d]["state"] for d in BOARDS} == {
                "fleet-rock": OFFLINE,
                "fleet-pi": STALE,
                "fleet-x86": ONLINE,
            }
            assert [d["device_id"] for d in document["devices"]] == ["fleet-rock", "fleet-pi", "fleet-x86"]
            assert rows["fleet-rock"]["board"] == "Radxa ROCK 5B", "the will carries the presence"
            assert rows["fleet-pi"]["last_seen"] is None and rows["fleet-x86"]["decode_tok_s"] > 0

            # The Pi wakes up and reports again; the x86 stops cleanly (its retained offline).
            pi.proc.send_signal(signal.SIGCONT)
            stopped = False
            wait_until(lambda: agg.device("fleet-pi").state == ONLINE, 15, "the resumed device online")
            assert daemons["fleet-x86"].stop() == 0
            wait_until(lambda: agg.device("fleet-x86").state == OFFLINE, 15, "the stopped device offline")
            table = run_fleet(
                "--mqtt", f"127.0.0.1:{broker.port}", "--once", "--wait", "3", "--interval", "1"
            )
            assert table.returncode == 0, table.stderr
            assert "fleet-x86" in table.stdout and "offline" in table.stdout and "online" in table.stdout
    finally:
        if stopped:
            pi.proc.send_signal(signal.SIGCONT)
        probe.close()
    changes = [(e.device_id, e.previous, e.device.state) for e in events if e.kind == "state"]  # type: ignore[union-attr]
    for device in BOARDS:
        assert (device, None, ONLINE) in changes
    assert ("fleet-pi", ONLINE, STALE) in changes and ("fleet-pi", STALE, ONLINE) in changes
    assert ("fleet-rock", ONLINE, OFFLINE) in changes and ("fleet-x86", ONLINE, OFFLINE) in changes
    assert not monitor.connection.connected


@pytest.mark.system
@pytest.mark.skipif(not ipv6_loopback(), reason="this host has no IPv6 loopback (::1)")
def test_ipv6_broker_for_the_daemon_fleet_and_ask(start_daemon, tmp_path: Path) -> None:
    port6 = free_port()
    broker = Broker(tmp_path / "broker", extra=f"listener {port6} ::1\n").start()
    try:
        d = start_daemon(
            EDGED_MQTT__HOST="::1",
            EDGED_MQTT__PORT=str(port6),
            EDGED_DEVICE_ID="v6",
            EDGED_TELEMETRY__INTERVAL_S="1",
            EDGED_MQTT__RECONNECT_MAX_S="2",
        )
        wait_connected(d)
        target = f"[::1]:{port6}"
        with FleetMonitor(BrokerOptions.parse(target), Aggregator(default_interval_s=1)).start() as monitor:
            wait_until(lambda: (s := monitor.aggregator.device("v6")) is not None and s.reports > 0, 15, "v6")
        answer = list(
            ask_over_mqtt(
                BrokerOptions.parse(target),
                {"messages": chat("hi")["messages"], "max_tokens": 4},
                device="v6",
            )
        )
        assert answer[-1]["status"] == "done" and answer[-1]["device_id"] == "v6"
        # `edged ask --mqtt [::1]:PORT` parses it too.
        r = run_edged("ask", "--mqtt", target, "--device", "v6", "--max-tokens", "4", "hi")
        assert r.returncode == 0, r.stderr
        assert "[v6]" in r.stderr
        document = fleet_json("--mqtt", target, "--wait", "5", "--interval", "1")
        assert [(r["device_id"], r["state"]) for r in document["devices"]] == [("v6", ONLINE)]
        assert document["broker"] == target
    finally:
        broker.stop()


@pytest.mark.system
def test_tls_through_the_factory(tls_broker: Broker, pki: dict[str, Path]) -> None:  # noqa: F811
    # TLS: the right CA connects (TLS from the CA, not from a port guess), a wrong CA is refused,
    # --no-tls-verify accepts it.
    right = BrokerOptions.parse(f"localhost:{tls_broker.port}", ca=pki["ca.crt"])
    with FleetMonitor(right).start() as monitor:
        assert monitor.connected
    with pytest.raises(BrokerUnreachable, match="cannot connect"):
        FleetMonitor(BrokerOptions.parse(f"localhost:{tls_broker.port}", ca=pki["other-ca.crt"])).start(5)
    target = f"localhost:{tls_broker.port}"
    ok = run_fleet("--mqtt", target, "--tls-ca", str(pki["ca.crt"]), "--json", "--wait", "1")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["devices"] == []
    assert run_fleet("--mqtt", target, "--tls-ca", str(pki["other-ca.crt"]), "--json").returncode == 3
    unverified = run_fleet(
        "--mqtt", target, "--tls-ca", str(pki["other-ca.crt"]), "--no-tls-verify", "--json", "--wait", "1"
    )
    assert unverified.returncode == 0, unverified.stderr
    # The same options from the configuration (EDGED_MQTT__*), as the daemon reads them.
    env = clean_env(EDGED_MQTT__HOST="localhost", EDGED_MQTT__PORT=str(tls_broker.port))
    env["EDGED_MQTT__TLS__CA"] = str(pki["ca.crt"])
    assert run_fleet("--json", "--wait", "1", env=env).returncode == 0


@pytest.mark.system
def test_passwords_and_the_shipped_acl(secured: Broker) -> None:  # noqa: F811
    """The dashboard user of deploy/mosquitto/acl may read statuses and telemetry."""
    plain = f"127.0.0.1:{secured.port}"
    r = run_fleet(
        "--mqtt", plain, "--username", "dashboard", "--password", USERS["dashboard"], "--json", "--wait", "1"
    )
    assert r.returncode == 0, r.stderr
    wrong = run_fleet("--mqtt", plain, "--username", "dashboard", "--password", "nope", "--json")
    assert wrong.returncode == 3 and "refused" in wrong.stderr


@pytest.mark.system
def test_usage_and_unreachable_exit_codes(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    r = run_fleet("--mqtt", dead, "--json")
    assert r.returncode == 3 and "cannot connect" in r.stderr and dead in r.stderr
    for args, message in [
        ((), "no broker"),
        (("--mqtt", "[::1"), "bracket"),
        (("--mqtt", "host:99999"), "port"),
        (("--mqtt", dead, "--wait", "3"), "--wait goes with --once"),
        (("--mqtt", dead, "--tls-cert", str(tmp_path / "c.crt")), "go together"),
        (("--mqtt", dead, "--tls-ca", str(tmp_path / "none.crt")), "no such file"),
        (("--mqtt", dead, "--protocol", "4"), "5 or 3.1.1"),
        (("--mqtt", dead, "--topic-prefix", "a/+"), "wildcards"),
    ]:
        r = run_fleet(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
    r = run_fleet("--mqtt", dead, env=clean_env(EDGED_QUEUE__MAX_DEPTH="zero"))
    assert r.returncode == 78 and "config error" in r.stderr
