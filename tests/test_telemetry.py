"""Thermals and throughput: sysfs parsing on fixture trees, the governor on a real job, telemetry on a
real Mosquitto, Home Assistant discovery and Prometheus /metrics."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import jinja2
import pytest
from conftest import BOARDS, Daemon, chat, clean_env, run_edged, wait_until
from mqtt_helpers import Broker, Probe, free_port
from prometheus_client.parser import text_string_to_metric_families
from test_mqtt import mqtt_env, wait_connected

from edged.board import HostFS, ThermalLimits
from edged.telemetry import hardware
from edged.telemetry.governor import ThermalState, next_state, watched
from edged.wire import Presence, StatusDocument, TelemetryReport, Wire


def same_as_model(model: type[Wire], doc: dict) -> None:
    """The document is exactly what its wire model writes: every field known, same order, same types."""
    assert json.dumps(model.model_validate(doc).dump()) == json.dumps(doc)


# -- parsing --------------------------------------------------------------------------------------


def test_rk3588_vendor_kernel_zones_clusters_and_npu() -> None:
    snap = hardware.read_all(HostFS(BOARDS / "orangepi5"))
    types = [z["type"] for z in snap["zones"]]
    assert types == [
        "soc-thermal",
        "bigcore0-thermal",
        "bigcore1-thermal",
        "littlecore-thermal",
        "center-thermal",
        "gpu-thermal",
        "npu-thermal",
    ]
    soc = snap["zones"][0]
    assert soc["temp_c"] == pytest.approx(47.23)
    assert [(t["type"], t["temp_c"]) for t in soc["trips"]] == [
        ("passive", 75.0),
        ("passive", 85.0),
        ("critical", 115.0),
    ]
    assert [(p["policy"], p["cpus"]) for p in snap["cpufreq"]] == [
        ("policy0", [0, 1, 2, 3]),
        ("policy4", [4, 5]),
        ("policy6", [6, 7]),
    ]
    assert snap["cpufreq"][1]["cur_mhz"] == 2256.0
    assert snap["npu"] == {"load_pct": {"core0": 12, "core1": 0, "core2": 0}, "freq_mhz": 1000.0}
    assert snap["throttling"] is None
    assert snap["system"]["mem_total_mb"] == pytest.approx(15737.2, abs=0.1)
    assert snap["system"]["load_1m"] == 1.23


def test_rk3588_mainline_kernel_zone_names_and_capped_clusters() -> None:
    snap = hardware.read_all(HostFS(BOARDS / "rock5b"))
    assert [z["type"] for z in snap["zones"]][:3] == [
        "package-thermal",
        "bigcore0-thermal",
        "bigcore2-thermal",
    ]
    assert snap["npu"] is None, "the NPU files are optional"
    policy4 = snap["cpufreq"][1]
    assert policy4["cur_mhz"] == 1416.0 and policy4["capped"] is False
    zones = hardware.thermal_zones(HostFS(BOARDS / "rock5b"))
    rk_zones = ["soc-thermal", "package-thermal", "bigcore0-thermal", "npu-thermal"]
    assert {z.type for z in watched(zones, rk_zones)} == {
        "package-thermal",
        "bigcore0-thermal",
        "npu-thermal",
    }


def test_raspberry_pi_throttled_flags_from_the_firmware_node() -> None:
    pi5 = hardware.throttling(HostFS(BOARDS / "rpi5"))
    assert pi5 is not None and pi5.raw == 0x50005
    assert pi5.now == {
        "under_voltage": True,
        "freq_capped": False,
        "throttled": True,
        "soft_temp_limit": False,
    }
    assert pi5.since_boot["under_voltage"] and pi5.since_boot["throttled"]
    assert pi5.active
    pi4 = hardware.throttling(HostFS(BOARDS / "rpi4"))
    assert pi4 is not None and not pi4.active and pi4.since_boot["freq_capped"]
    assert hardware.cpu_policies(HostFS(BOARDS / "rpi4"))[0].capped, "scaling_max 1500 < cpuinfo_max 1800"
    assert hardware.read_all(HostFS(BOARDS / "rpi5"))["zones"][0]["type"] == "cpu-thermal"


def test_x86_box_without_thermal_zones_reports_absent_not_a_crash() -> None:
    snap = hardware.read_all(HostFS(BOARDS / "x86"))
    assert (
        snap["zones"] == [] and snap["cpufreq"] == [] and snap["npu"] is None and snap["throttling"] is None
    )
    assert snap["system"]["uptime_s"] == 4242.42
    empty = hardware.read_all(HostFS(Path("/nonexistent-root")))
    assert empty["system"] == {
        "mem_total_mb": None,
        "mem_available_mb": None,
        "load_1m": None,
        "load_5m": None,
        "load_15m": None,
        "uptime_s": None,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("NPU load:  Core0: 12%, Core1:  0%, Core2:  0%,\n", {"core0": 12, "core1": 0, "core2": 0}),
        ("NPU load:  Core0: 100%, Core1: 99%, Core2:  7%,", {"core0": 100, "core1": 99, "core2": 7}),
        ("NPU load: 35%\n", {}),
        ("", {}),
    ],
)
def test_npu_load_format(text: str, expected: dict) -> None:
    assert hardware.parse_npu_load(text) == expected


def test_broken_files_are_absent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(BOARDS / "orangepi5", root, symlinks=True)
    (root / "sys/devices/virtual/thermal/thermal_zone0/temp").write_text("garbage\n")
    (root / "sys/devices/system/cpu/cpufreq/policy4/scaling_cur_freq").unlink()
    snap = hardware.read_all(HostFS(root))
    assert snap["zones"][0]["temp_c"] is None
    assert snap["cpufreq"][1]["cur_mhz"] is None


# -- the governor ---------------------------------------------------------------------------------

LIMITS = ThermalLimits(zones=[], warn_c=70, derate_c=75, pause_c=85, resume_c=68)


def test_state_machine_with_hysteresis() -> None:
    s = ThermalState.UNKNOWN
    trail = []
    for temp in (50, 71, 76, 80, 74, 69, 67, 86, 80, 70, 68.5, 67.9, 71, None):
        s = next_state(s, temp, LIMITS)
        trail.append(s.value)
    assert trail == [
        "normal",
        "warm",
        "derate",
        "derate",
        "derate",
        "derate",
        "normal",
        "paused",
        "paused",
        "paused",
        "paused",
        "normal",
        "warm",
        "unknown",
    ]


def write_temp(root: Path, zone: int, celsius: float) -> None:
    """Atomically, as the kernel's file never reads half-written (the governor polls every 0.1 s)."""
    temp = root / f"sys/devices/virtual/thermal/thermal_zone{zone}/temp"
    staged = temp.with_name("temp.new")
    staged.write_text(f"{int(celsius * 1000)}\n")
    os.replace(staged, temp)


def wait_governor(d: Daemon, reached: Callable[[dict], bool], what: str, timeout: float = 10) -> dict:
    """The governor's /status once ``reached`` holds for it; fails the test after ``timeout`` s."""
    gov: dict = {}
    deadline = time.monotonic() + timeout
    with d.client(timeout=5) as c:
        while time.monotonic() < deadline:
            gov = c.get("/status").json()["thermals"]["governor"]
            if reached(gov):
                return gov
            time.sleep(0.05)
    pytest.fail(f"governor never {what}: {gov}\n{d.log()[-3000:]}")


def wait_state(d: Daemon, state: str, timeout: float = 10) -> dict:
    return wait_governor(d, lambda gov: gov["state"] == state, f"reached {state}", timeout)


def wait_reading(d: Daemon, celsius: float, timeout: float = 10) -> dict:
    """The governor's status once its last poll read ``celsius`` as the hottest temperature."""
    return wait_governor(d, lambda gov: gov["hottest_c"] == celsius, f"read {celsius} C", timeout)


@pytest.fixture
def hot_board(tmp_path: Path) -> Path:
    root = tmp_path / "board"
    shutil.copytree(BOARDS / "orangepi5", root, symlinks=True)
    return root


@pytest.mark.system
def test_governor_derates_pauses_and_resumes_around_a_real_job(
    start_daemon, hot_board: Path, tmp_path: Path
) -> None:
    broker = Broker(tmp_path / "broker").start()
    probe = Probe(broker.port)
    try:
        d = start_daemon(
            "--root",
            str(hot_board),
            **mqtt_env(
                broker,
                "hot",
                EDGED_THERMAL__POLL_S="0.1",
                EDGED_THERMAL__DERATE_PAUSE_MS="30",
                EDGED_TELEMETRY__INTERVAL_S="60",
            ),
        )
        wait_connected(d)
        probe.subscribe("edged/hot/telemetry")
        assert wait_state(d, "normal")["hottest_zone"] == "bigcore0-thermal"

        # derate: a pause between tokens (a lower bound on the time per token, not a speed claim)
        write_temp(hot_board, 0, 76)
        gov = wait_state(d, "derate")
        assert gov["hottest_c"] == 76.0 and gov["hottest_zone"] == "soc-thermal"
        with d.client() as c:
            assert c.get("/status").json()["engine"]["thermal"] == {"paused": False, "derate_pause_ms": 30.0}
            r = c.post("/v1/chat/completions", json=chat("Count to ten.", max_tokens=12, ignore_eos=True))
            assert r.json()["timings"]["predicted_per_token_ms"] >= 30

        # pause while a job runs: it finishes; a new one waits in the queue; a short deadline still holds
        results: dict[str, object] = {}

        def post(name: str, body: dict) -> None:
            with d.client() as c:
                results[name] = c.post("/v1/chat/completions", json=body)

        write_temp(hot_board, 0, 60)
        wait_state(d, "normal")
        running = threading.Thread(
            target=post, args=("running", chat("Tell a story.", id="run-1", max_tokens=200, ignore_eos=True))
        )
        running.start()
        with d.client(timeout=5) as c:
            wait_until(
                lambda: c.get("/status").json()["engine"]["running"] or not running.is_alive(),
                what="a running job",
            )
        assert running.is_alive(), results["running"]
        write_temp(hot_board, 0, 90)
        wait_state(d, "paused")
        waiting = threading.Thread(target=post, args=("waiting", chat("hi", id="wait-1", max_tokens=4)))
        waiting.start()
        short = threading.Thread(
            target=post, args=("short", chat("hi", id="short-1", max_tokens=4, timeout_s=1))
        )
        short.start()
        running.join(60)
        assert results["running"].status_code == 200, "the running job finishes"
        short.join(10)
        assert results["short"].status_code == 504, "a job waiting on a hot board honours its deadline"
        with d.client() as c:
            assert c.get("/v1/jobs/wait-1").json()["state"] == "queued"
        write_temp(hot_board, 0, 70)  # below pause, above resume: still paused (hysteresis)
        gov = wait_reading(d, 70.0)  # the governor has read 70 C and decided on it
        assert gov["state"] == "paused", gov
        with d.client() as c:
            assert c.get("/v1/jobs/wait-1").json()["state"] == "queued"
        write_temp(hot_board, 0, 60)
        wait_state(d, "normal")
        waiting.join(30)
        assert results["waiting"].status_code == 200, "resumed: the queued job ran"

        # every transition is logged, counted and published
        log = d.log()
        assert log.count('"thermal state changed"') >= 5
        with d.client() as c:
            metrics = c.get("/metrics").text
            status = c.get("/status").json()["thermals"]["governor"]
        assert status["transitions"]["paused"] == 1 and status["transitions"]["derate"] == 1
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics)
            for s in f.samples
        }
        assert samples[("edged_thermal_transitions_total", (("to", "paused"),))] == 1
        events: list[dict] = []
        deadline = time.monotonic() + 20
        while not (
            events and events[-1].get("summary", {}).get("thermal_state") == "normal" and len(events) >= 4
        ):
            if time.monotonic() > deadline:
                pytest.fail(f"no telemetry back to normal within 20 s: {events}")
            events.append(probe.next(5)[1])
        states = [e["summary"]["thermal_state"] for e in events if e.get("event") == "thermal_transition"]
        assert "derate" in states and "paused" in states
    finally:
        probe.close()
        broker.stop()


@pytest.mark.system
def test_thermal_overrides_from_config_and_bad_overrides_exit_78(hot_board: Path) -> None:
    r = run_edged("serve", "--root", str(hot_board), env=clean_env(EDGED_THERMAL__RESUME_C="99"))
    assert r.returncode == 78
    assert "resume_c < warn_c" in r.stderr


# -- telemetry, discovery, metrics ----------------------------------------------------------------


@pytest.mark.system
def test_telemetry_and_home_assistant_discovery_on_a_real_broker(
    start_daemon, hot_board: Path, tmp_path: Path
) -> None:
    broker = Broker(tmp_path / "broker").start()
    try:
        d = start_daemon(
            "--root", str(hot_board), **mqtt_env(broker, "tele", EDGED_TELEMETRY__INTERVAL_S="0.5")
        )
        wait_connected(d)
        with d.client() as c:
            assert c.post("/v1/chat/completions", json=chat("hi", max_tokens=8)).status_code == 200
        probe = Probe(broker.port)
        try:
            probe.subscribe("edged/tele/telemetry")
            deadline = time.monotonic() + 10
            message = probe.next(5)[1]
            while message["jobs"]["done"] < 1:  # a report from before the job may come first
                if time.monotonic() > deadline:
                    pytest.fail(f"no telemetry counting the job within 10 s: {message}")
                message = probe.next(5)[1]
            assert message["schema"] == 1 and message["device_id"] == "tele"
            one = message["throughput"]["1m"]
            assert one["jobs_done"] == 1 and one["decode_tokens_per_s_p50"] > 0
            assert one["s_per_1k_tokens"] == pytest.approx(1000 / one["decode_tokens_per_s_p50"], rel=0.01)
            assert one["ttft_ms_p50"] > 0 and one["ttft_ms_p95"] >= one["ttft_ms_p50"]
            assert "15m" in message["throughput"]
            zones = {z["type"]: z for z in message["thermals"]["zones"]}
            assert zones["soc-thermal"]["watched"] and zones["gpu-thermal"]["watched"] is False
            assert message["thermals"]["npu"]["load_pct"]["core0"] == 12
            assert message["summary"]["hottest_c"] == 48.153
            same_as_model(TelemetryReport, message)
            with d.client() as c:
                same_as_model(StatusDocument, c.get("/status").json())
            presence = Probe(broker.port)
            try:
                presence.subscribe("edged/tele/status")
                retained = presence.next(5)[1]
                assert retained["state"] == "online" and retained["device_id"] == "tele"
                same_as_model(Presence, retained)
            finally:
                presence.close()

            found = Probe(broker.port)
            try:
                found.subscribe("homeassistant/sensor/edged_tele/+/config")
                configs = {}
                deadline = time.monotonic() + 10
                while len(configs) < 5:
                    if time.monotonic() > deadline:
                        pytest.fail(f"only {sorted(configs)} discovery configs within 10 s")
                    topic, config, _ = found.next(5)
                    configs[topic.split("/")[3]] = config
            finally:
                found.close()
            assert set(configs) == {
                "tokens_per_s",
                "s_per_1k_tokens",
                "hottest_temp",
                "queue_depth",
                "throttled",
            }
            env = jinja2.Environment()
            for object_id, config in configs.items():
                for key in (
                    "name",
                    "unique_id",
                    "state_topic",
                    "value_template",
                    "availability_topic",
                    "device",
                ):
                    assert config[key], (object_id, key)
                assert config["state_topic"] == "edged/tele/telemetry"
                assert config["availability_topic"] == "edged/tele/status"
                assert config["device"]["identifiers"] == ["edged_tele"]
                rendered = env.from_string(config["value_template"]).render(value_json=message)
                float(rendered)  # every template yields a number from a real telemetry message
            assert configs["hottest_temp"]["device_class"] == "temperature"
            assert configs["hottest_temp"]["unit_of_measurement"] == "°C"
        finally:
            probe.close()
    finally:
        broker.stop()


@pytest.mark.system
def test_prometheus_metrics_on_the_socket_and_tcp(start_daemon, hot_board: Path) -> None:
    port = free_port()
    d = start_daemon("--root", str(hot_board), EDGED_TELEMETRY__METRICS_PORT=str(port))
    with d.client() as c:
        assert c.post("/v1/chat/completions", json=chat("hi", max_tokens=6)).status_code == 200
        text = c.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "edged_info",
        "edged_jobs",
        "edged_tokens",
        "edged_queue_depth",
        "edged_decode_tokens_per_second",
        "edged_seconds_per_1k_tokens",
        "edged_ttft_seconds",
        "edged_queue_wait_seconds",
        "edged_prefill_tokens_per_second",
        "edged_thermal_zone_celsius",
        "edged_cpu_frequency_hertz",
        "edged_npu_load_ratio",
        "edged_thermal_state",
    ):
        assert name in families, name
    jobs = {
        s.labels["outcome"]: s.value for s in families["edged_jobs"].samples if s.name == "edged_jobs_total"
    }
    assert jobs["done"] == 1
    tokens = {s.labels["kind"]: s.value for s in families["edged_tokens"].samples}
    assert tokens["completion"] >= 1 and tokens["prompt"] > 5
    for name in ("edged_ttft_seconds", "edged_decode_tokens_per_second", "edged_queue_wait_seconds"):
        family = families[name]
        assert family.type == "histogram", name
        count = [s.value for s in family.samples if s.name == f"{name}_count"]
        inf = [s.value for s in family.samples if s.name == f"{name}_bucket" and s.labels["le"] == "+Inf"]
        assert count == [1] and inf == [1], (name, family.samples)  # the one job, in some bucket
    ttft = {
        s.labels["le"]: s.value for s in families["edged_ttft_seconds"].samples if s.name.endswith("_bucket")
    }
    assert list(ttft.values()) == sorted(ttft.values()), "buckets are cumulative"
    zones = {s.labels["type"]: s.value for s in families["edged_thermal_zone_celsius"].samples}
    assert zones["npu-thermal"] == pytest.approx(47.23)
    tcp = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "edged_thermal_zone_celsius" in tcp


@pytest.mark.system
def test_status_command_shows_throughput_and_temperatures(start_daemon, hot_board: Path) -> None:
    d = start_daemon("--root", str(hot_board))
    with d.client() as c:
        c.post("/v1/chat/completions", json=chat("hi", max_tokens=8))
    r = run_edged("status", "--socket", str(d.socket))
    assert r.returncode == 0, r.stderr
    for needle in ("s per 1k tokens", "thermal", "bigcore0-thermal 48.2", "policy4 2256/2256", "rk3588"):
        assert needle in r.stdout, (needle, r.stdout)
    doc = json.loads(run_edged("status", "--socket", str(d.socket), "--json").stdout)
    assert doc["thermals"]["governor"]["state"] == "normal"
