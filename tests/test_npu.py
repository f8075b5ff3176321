"""The rkllm backend against a stand-in librkllmrt.so (tests/npu_stub, built here with gcc for each
runtime ABI) on RK3588 fixture trees: choice, answers, perf timings, cancel, fallbacks, refusals."""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import BOARDS, Daemon, chat, clean_env, edged_exe, rkllm_abi_flags, run_edged, wait_until

from edged.backends.rkllm_abi import abi_for

pytestmark = pytest.mark.system

STUB = Path(__file__).parent / "npu_stub"
RELEASES = {"1.1.4": "110", "1.2.0": "120", "1.2.1b1": "120b1", "1.2.1": "121", "1.3.0": "130"}
"""Runtime release -> the stand-in's ABI build (rkllm_abi.h; 120b1 = 1.2.0 with 1.2.1's multimodal input)."""


def build_stub(out: Path, abi: str, version: str) -> Path:
    """The stand-in for one release; ``version`` "" builds a library that says no version at all."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is required to build the RKLLM stand-in")
    lib = out / f"librkllmrt-{abi}-{version or 'silent'}.so"
    subprocess.run(
        [
            gcc,
            "-std=c11",
            "-Wall",
            "-Werror",
            "-shared",
            "-fPIC",
            *rkllm_abi_flags(abi),
            f'-DSTUB_VERSION="{version}"',
            *([] if version else ["-DSTUB_SILENT"]),
            "-o",
            str(lib),
            str(STUB / "rkllm_stub.c"),
            "-lpthread",
        ],
        check=True,
        capture_output=True,
        cwd=STUB,
    )
    return lib


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("npu_stub")
    built = {version: build_stub(out, abi, version) for version, abi in RELEASES.items()}
    built["1.3.0-silent"] = build_stub(out, "130", "")  # no version string inside
    return built


@pytest.fixture
def rk_root(tmp_path: Path) -> Path:
    """An Orange Pi 5 tree with the NPU device node of the vendor kernel."""
    root = tmp_path / "opi5"
    shutil.copytree(BOARDS / "orangepi5", root, symlinks=True)
    (root / "dev").mkdir()
    (root / "dev" / "rknpu").write_text("")
    return root


@pytest.fixture
def rk_model(tmp_path: Path) -> Path:
    model = tmp_path / "DeepSeek-R1-Distill-Qwen-1.5B_W8A8_RK3588.rkllm"
    model.write_bytes(b"RKLLM stand-in model")
    return model


def npu_env(root: Path, lib: Path, model: Path, version: str | None = None, **extra: str) -> dict[str, str]:
    """The daemon on the stand-in; ``version`` pins rkllm.runtime_version (default: detected)."""
    return {
        "EDGED_BOARD__ROOT": str(root),
        "EDGED_RKLLM__LIBRARY": str(lib),
        "EDGED_RKLLM__MODEL": str(model),
        **({"EDGED_RKLLM__RUNTIME_VERSION": version} if version else {}),
        "STUB_TOKEN_MS": "5",
        **extra,
    }


def status(d: Daemon) -> dict:
    with d.client() as c:
        return c.get("/status").json()


def test_rk3588_picks_rkllm_and_answers_with_runtime_perf(start_daemon, rk_root, rk_model, stubs) -> None:
    d = start_daemon(**npu_env(rk_root, stubs["1.2.1"], rk_model))
    backend = status(d)["backend"]
    assert backend["name"] == "rkllm"
    assert backend["considered"][0] == {
        "name": "rkllm",
        "available": True,
        "reason": "RKLLM runtime 1.2.1 (ABI 1.2.1) on /dev/rknpu",
    }
    assert backend["details"]["abi"] == "1.2.1"
    assert backend["details"]["rknn_toolkit_lite2"]["installed"] is False
    with d.client() as c:
        body = c.post("/v1/chat/completions", json=chat("hello NPU", max_tokens=8)).json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    assert body["choices"][0]["finish_reason"] == "length"
    t = body["timings"]
    assert t["source"] == "runtime-perf"
    assert t["predicted_n"] == body["usage"]["completion_tokens"] == 8
    assert t["predicted_per_second"] > 0 and t["prompt_ms"] > 0


def test_the_npu_refuses_constrained_output_with_the_reason(start_daemon, rk_root, rk_model, stubs) -> None:
    """The RKLLM runtime cannot constrain sampling: a JSON schema, any JSON object or a grammar is
    not_supported (501) with the reason, /status says so, and plain jobs still run."""
    d = start_daemon(**npu_env(rk_root, stubs["1.2.1"], rk_model))
    schema = {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "object"}}}
    with d.client() as c:
        for fields, param in (
            ({"response_format": schema}, "response_format"),
            ({"response_format": {"type": "json_object"}}, "response_format"),
            ({"grammar": 'root ::= "yes"'}, "grammar"),
        ):
            r = c.post("/v1/chat/completions", json=chat("hello NPU", max_tokens=8, **fields))
            assert r.status_code == 501, r.text
            error = r.json()["error"]
            assert error["code"] == "not_supported"
            assert error["param"] == param
            assert "rkllm backend cannot constrain sampling" in error["message"]
        r = c.post("/v1/chat/completions", json=chat("hello NPU", max_tokens=8))
        assert r.status_code == 200, r.text
    available = status(d)["engine"]["structured_output"]
    assert available["available"] is False
    assert "rkllm" in available["reason"]


@pytest.mark.parametrize("version", list(RELEASES))
def test_every_supported_runtime_abi(start_daemon, rk_root, rk_model, stubs, version: str) -> None:
    d = start_daemon(**npu_env(rk_root, stubs[version], rk_model, version))
    assert status(d)["backend"]["name"] == "rkllm"
    with d.client() as c:
        with c.stream("POST", "/v1/chat/completions", json=chat("hi", max_tokens=5, stream=True)) as r:
            deltas = [
                json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                for line in r.iter_lines()
                if line.startswith("data: {")
            ]
        final = c.post("/v1/chat/completions", json=chat("hi", max_tokens=3)).json()
    assert "".join(deltas).strip() == "tok0 tok1 tok2 tok3 tok4"
    expected = "runtime-perf" if version in ("1.2.1", "1.3.0") else "wall-clock"
    assert final["timings"]["source"] == expected


def test_a_job_s_sampling_reaches_the_1_3_0_runtime(start_daemon, rk_root, rk_model, stubs, tmp_path) -> None:
    """1.3.0 takes sampling per run: the job's values arrive (top_k 0 stays 0: off); older releases
    fix it at init from the same defaults as llama.cpp (profile < config), and /status says so."""
    record = tmp_path / "runs.jsonl"
    d = start_daemon(**npu_env(rk_root, stubs["1.3.0"], rk_model, STUB_RECORD=str(record)))
    body = chat(
        "hi", max_tokens=6, temperature=1.3, top_p=0.5, top_k=0, repeat_penalty=1.2, presence_penalty=0.5
    )
    with d.client() as c:
        assert c.post("/v1/chat/completions", json=body).status_code == 200
    run = json.loads(record.read_text().splitlines()[-1])
    assert run["sampling"] == {
        "top_k": 0,
        "top_p": 0.5,
        "temperature": 1.3,
        "repeat_penalty": 1.2,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.5,
        "mirostat": 0,
    }
    assert run["max_new_tokens"] == 6 and run["role"] == "user"
    assert run["init"]["enabled_cpus_num"] == 4 and run["init"]["enabled_cpus_mask"] == 0xF0
    assert "temperature" in status(d)["backend"]["details"]["sampling"]["per_job"]
    d.stop()

    old_record = tmp_path / "old.jsonl"
    d = start_daemon(
        **npu_env(
            rk_root, stubs["1.2.1"], rk_model, STUB_RECORD=str(old_record), EDGED_MODEL__SAMPLING__TOP_K="0"
        )
    )
    with d.client() as c:
        assert c.post("/v1/chat/completions", json=body).status_code == 200
    run = json.loads(old_record.read_text().splitlines()[-1])
    assert "sampling" not in run and run["role"] == "user"
    assert run["init"] == {
        "top_k": 0,  # from the config, not turned into greedy
        "top_p": 0.9,
        "temperature": 0.6,
        "repeat_penalty": 1.0,
        "enabled_cpus_num": 4,
        "enabled_cpus_mask": 0xF0,
    }
    sampling = status(d)["backend"]["details"]["sampling"]
    assert "temperature" in sampling["ignored_per_job"] and sampling["at_init"]["top_k"] == 0
    with d.client() as c:
        notes = c.post("/v1/chat/completions", json={**body, "seed": 3}).json()["notes"]
    assert "temperature 1.3 not applied: runtime 1.2.1 fixes sampling at init (0.6)" in notes
    assert "seed not applied: the RKLLM runtime takes no seed" in notes
    assert not any(n.startswith("top_k") for n in notes)  # the job's 0 is the init value


def test_an_invalid_utf8_byte_does_not_stop_the_text(start_daemon, rk_root, rk_model, stubs) -> None:
    d = start_daemon(**npu_env(rk_root, stubs["1.2.1"], rk_model, STUB_BAD_UTF8_AT="2"))
    with d.client() as c:
        content = c.post("/v1/chat/completions", json=chat("hi", max_tokens=5)).json()["choices"][0][
            "message"
        ]
    assert content["content"] == "tok0 tok1 \ufffdtok3 tok4 "


def test_cancel_aborts_within_one_callback(start_daemon, rk_root, rk_model, stubs) -> None:
    d = start_daemon(**npu_env(rk_root, stubs["1.2.1"], rk_model, STUB_TOKEN_MS="20"))
    with (
        d.client() as c,
        c.stream("POST", "/v1/chat/completions", json=chat("long", max_tokens=500, stream=True)) as r,
    ):
        job_id = r.headers["x-edged-job-id"]
        seen = 0
        lines = r.iter_lines()
        for line in lines:
            if '"content":"tok' in line:
                seen += 1
            if seen == 5:
                break
        with d.client() as other:
            at_cancel = other.post(f"/v1/jobs/{job_id}/cancel").json()["completion_tokens"]
        list(lines)
    with d.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "cancelled"
    assert job["completion_tokens"] - at_cancel <= 1


def test_init_failure_falls_back_to_llamacpp_with_the_reason(start_daemon, rk_root, rk_model, stubs) -> None:
    d = start_daemon(**npu_env(rk_root, stubs["1.2.1"], rk_model, STUB_FAIL_INIT="1"))
    backend = status(d)["backend"]
    assert backend["name"] == "llamacpp"
    assert backend["fallback_reasons"] == [
        f"rkllm failed to load: rkllm_init failed with -1 (model {rk_model}, ABI 1.2.1)"
    ]
    with d.client() as c:
        content = c.post("/v1/chat/completions", json=chat("hi", max_tokens=4)).json()["choices"][0][
            "message"
        ]
    assert "tok0" not in content["content"]


def test_layout_mismatch_is_caught_by_the_runtime_check(start_daemon, rk_root, rk_model, stubs) -> None:
    """A 1.3.0 library without a version string, trusted as 1.2.1 on purpose: the structs do not match,
    the stand-in's sentinel check refuses them, and edged falls back instead of crashing."""
    d = start_daemon(
        **npu_env(rk_root, stubs["1.3.0-silent"], rk_model, "1.2.1", EDGED_RKLLM__TRUST_VERSION="true")
    )
    backend = status(d)["backend"]
    assert backend["name"] == "llamacpp"
    assert "rkllm_init failed with -2" in backend["fallback_reasons"][0]
    assert "layout mismatch" in d.log()


def test_mid_job_failure_is_backend_failed_and_the_next_job_runs_on_the_cpu(
    start_daemon, rk_root, rk_model, stubs
) -> None:
    d = start_daemon(**npu_env(rk_root, stubs["1.2.1"], rk_model, STUB_FAIL_AFTER="3"))
    with d.client() as c:
        r = c.post("/v1/chat/completions", json=chat("hi", max_tokens=10))
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "backend_failed"
        assert "rkllm" in r.json()["error"]["message"]
        again = c.post("/v1/chat/completions", json=chat("hi", max_tokens=4))
        assert again.status_code == 200
        assert "tok0" not in again.json()["choices"][0]["message"]["content"]
        now = c.get("/status").json()
    assert now["backend"]["name"] == "llamacpp"
    assert "rkllm failed during a job" in now["backend"]["fallback_reasons"][0]


def test_after_a_fallback_everything_names_the_cpu_backend(
    start_daemon, rk_root, rk_model, stubs, tmp_path
) -> None:
    """The retained MQTT status (and its will), /status, telemetry and edged_info follow the switch."""
    from mqtt_helpers import Broker, Probe
    from test_mqtt import mqtt_env, wait_connected

    broker = Broker(tmp_path / "broker").start()
    try:
        d = start_daemon(
            **npu_env(rk_root, stubs["1.2.1"], rk_model, STUB_FAIL_AFTER="2"), **mqtt_env(broker, "npu2")
        )
        wait_connected(d)
        with d.client() as c:
            assert c.post("/v1/chat/completions", json=chat("hi", max_tokens=6)).status_code == 500
            # The next job waits for the replacement backend, whose arrival republishes the presence.
            assert c.post("/v1/chat/completions", json=chat("hi", max_tokens=2)).status_code == 200
            metrics = c.get("/metrics").text
        assert 'backend="llamacpp"' in metrics and 'backend="rkllm"' not in metrics
        probe = Probe(broker.port)
        try:
            probe.subscribe("edged/npu2/status")
            _, retained, _ = probe.next(10)
            probe.subscribe("edged/npu2/telemetry")
            _, telemetry, _ = probe.next(30)
        finally:
            probe.close()
        assert retained["state"] == "online" and retained["backend"] == "llamacpp"
        assert json.dumps(telemetry).count('"rkllm"') == 0 and "llamacpp" in json.dumps(telemetry)
    finally:
        broker.stop()


@pytest.mark.parametrize("version", list(RELEASES))
def test_the_release_is_read_from_the_library_itself(rk_root, rk_model, stubs, version: str) -> None:
    """No pin: the stand-in carries its version the way the real release does (banner from 1.2.0,
    the bare literal beside the log format string for 1.1.x), and edged picks that release's ABI."""
    r = run_edged("board", "--json", env=clean_env(**npu_env(rk_root, stubs[version], rk_model)))
    rkllm = json.loads(r.stdout)["backend"]["considered"][0]
    assert rkllm["available"], rkllm
    assert rkllm["reason"] == f"RKLLM runtime {version} (ABI {abi_for(version).name}) on /dev/rknpu"


def test_a_library_that_says_no_version_needs_trust(rk_root, rk_model, stubs) -> None:
    silent = stubs["1.3.0-silent"]
    unpinned = run_edged("board", "--json", env=clean_env(**npu_env(rk_root, silent, rk_model)))
    reason = json.loads(unpinned.stdout)["backend"]["considered"][0]["reason"]
    assert "cannot tell which RKLLM runtime" in reason and "trust_version" in reason
    pinned = run_edged("board", "--json", env=clean_env(**npu_env(rk_root, silent, rk_model, "1.3.0")))
    reason = json.loads(pinned.stdout)["backend"]["considered"][0]["reason"]
    assert "does not say which runtime it is" in reason and "crashes" in reason
    trusted = clean_env(**npu_env(rk_root, silent, rk_model, "1.3.0", EDGED_RKLLM__TRUST_VERSION="true"))
    rkllm = json.loads(run_edged("board", "--json", env=trusted).stdout)["backend"]["considered"][0]
    assert rkllm["available"] and rkllm["reason"].startswith("RKLLM runtime 1.3.0 (ABI 1.3.0)")


def test_versions_refused_with_clear_reasons(rk_root, rk_model, stubs) -> None:
    env = clean_env(**npu_env(rk_root, stubs["1.2.1"], rk_model, "1.4.0"))
    r = run_edged("board", "--json", env=env)
    considered = {c["name"]: c for c in json.loads(r.stdout)["backend"]["considered"]}
    assert "unsupported RKLLM runtime version '1.4.0'" in considered["rkllm"]["reason"]
    assert json.loads(r.stdout)["backend"]["name"] == "llamacpp"
    forced = run_edged("serve", env={**env, "EDGED_BACKEND": "rkllm"})
    assert forced.returncode == 78
    assert "unsupported RKLLM runtime version '1.4.0'" in forced.stderr
    mismatch = run_edged(
        "board", "--json", env=clean_env(**npu_env(rk_root, stubs["1.2.1"], rk_model, "1.1.4"))
    )
    reason = json.loads(mismatch.stdout)["backend"]["considered"][0]["reason"]
    assert "says it is runtime 1.2.1 (SDK banner" in reason and "rkllm.runtime_version is 1.1.4" in reason
    b1_as_121 = clean_env(**npu_env(rk_root, stubs["1.2.1b1"], rk_model, "1.2.1"))
    reason = json.loads(run_edged("board", "--json", env=b1_as_121).stdout)["backend"]["considered"][0][
        "reason"
    ]
    assert "says it is runtime 1.2.1b1" in reason and "ABI 1.2.1b1 vs 1.2.1" in reason


def test_drm_render_node_counts_as_the_npu(rk_root, rk_model, stubs) -> None:
    (rk_root / "dev" / "rknpu").unlink()
    drivers = rk_root / "sys/bus/platform/drivers/RKNPU"
    drivers.mkdir(parents=True)
    node = rk_root / "sys/class/drm/renderD129/device"
    node.mkdir(parents=True)
    (node / "driver").symlink_to("../../../../bus/platform/drivers/RKNPU")
    r = run_edged("board", "--json", env=clean_env(**npu_env(rk_root, stubs["1.2.1"], rk_model)))
    rkllm = json.loads(r.stdout)["backend"]["considered"][0]
    assert rkllm["available"] is True and "renderD129 (rknpu)" in rkllm["reason"]
    shutil.rmtree(rk_root / "sys/class/drm")
    r = run_edged("board", "--json", env=clean_env(**npu_env(rk_root, stubs["1.2.1"], rk_model)))
    assert "no NPU device" in json.loads(r.stdout)["backend"]["considered"][0]["reason"]


def test_x86_skips_rkllm_as_not_an_rk3588(rk_model, stubs) -> None:
    r = run_edged(
        "board",
        "--json",
        "--profile",
        "rk3588",
        env=clean_env(**npu_env(BOARDS / "x86", stubs["1.2.1"], rk_model)),
    )
    rkllm = json.loads(r.stdout)["backend"]["considered"][0]
    assert rkllm["name"] == "rkllm" and rkllm["available"] is False
    assert rkllm["reason"].startswith("not an RK3588")


def test_watchdog_stops_when_the_npu_run_hangs(tmp_path: Path, rk_root, rk_model, stubs) -> None:
    """The engine hangs for real (the runtime never returns a token); systemd's pings stop."""
    where = Path(tempfile.mkdtemp(prefix="edged-wd-", dir="/tmp"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(where / "notify"))
    notify.settimeout(0.5)
    api = where / "edged.sock"
    log_path = tmp_path / "edged.log"
    log = log_path.open("wb")
    env = clean_env(
        NOTIFY_SOCKET=str(where / "notify"),
        WATCHDOG_USEC="400000",
        EDGED_SOCKET__PATH=str(api),
        EDGED_JOURNAL__PATH=str(tmp_path / "journal.sqlite3"),
        EDGED_LOG__FORMAT="json",
        **npu_env(rk_root, stubs["1.2.1"], rk_model, STUB_HANG_AFTER="2"),
    )
    proc = subprocess.Popen([edged_exe(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, f"no READY=1 within 60 s:\n{log_path.read_text()}"
            try:
                if "READY=1" in notify.recv(4096).decode():
                    break
            except TimeoutError:
                assert proc.poll() is None, log_path.read_text()
        # one second of pings, counted (the window is the scenario, not a wait for an event)
        pings_before = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            with contextlib.suppress(TimeoutError):
                pings_before += notify.recv(4096).decode() == "WATCHDOG=1"
        assert pings_before >= 3
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(api)), base_url="http://edged", timeout=1)
        threading.Thread(target=lambda: _post_quietly(client), daemon=True).start()
        # two tokens, then the runtime hangs; past the stall threshold (0.4 s) the ping is withheld
        wait_until(
            lambda: "engine unhealthy" in log_path.read_text(),
            timeout=10,
            what="the watchdog noticing the hung run",
        )
        notify.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(1000):
                notify.recv(4096)  # drop the pings sent before the hang was detected
        notify.settimeout(0.5)
        # then 1.5 s (over three ping intervals) without a single ping: a window, not a wait
        later = []
        t1 = time.monotonic()
        while time.monotonic() - t1 < 1.5:
            with contextlib.suppress(TimeoutError):
                later.append(notify.recv(4096).decode())
        assert "WATCHDOG=1" not in later, "a hung engine must stop the watchdog pings"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        log.close()
        notify.close()


def _post_quietly(client: httpx.Client) -> None:
    try:
        client.post("/v1/chat/completions", json=chat("hang", max_tokens=50))
    except httpx.HTTPError:
        pass
    finally:
        client.close()


def test_rkllm_answers_over_mqtt_streamed_with_perf(start_daemon, rk_root, rk_model, stubs, tmp_path) -> None:
    from mqtt_helpers import Broker, Probe
    from test_mqtt import mqtt_env, wait_connected

    broker = Broker(tmp_path / "broker").start()
    try:
        d = start_daemon(**npu_env(rk_root, stubs["1.3.0"], rk_model, "1.3.0"), **mqtt_env(broker, "npu1"))
        wait_connected(d)
        probe = Probe(broker.port)
        try:
            probe.subscribe("npu/answers")
            probe.publish(
                "edged/npu1/jobs",
                {"id": "n1", "prompt": "hi", "max_tokens": 6, "stream": True},
                response_topic="npu/answers",
            )
            chunks, final = probe.until_final()
        finally:
            probe.close()
        assert [c["delta"] for c in chunks] == [f"tok{i} " for i in range(6)]
        assert final["status"] == "done" and final["timings"]["source"] == "runtime-perf"
        assert final["timings"]["predicted_n"] == 6
    finally:
        broker.stop()


# -- tools ----------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now at a place.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["location", "unit"],
        },
    },
}
R1_REPLY = (  # what an R1 distill writes: reasoning, then its own call markup (not special tokens)
    "The user wants the weather, so I call the tool.\n</think>\n\n"
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"  # noqa: RUF001
    '```json\n{"location": "Paris", "unit": "celsius"}\n```'
    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"  # noqa: RUF001
)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_function_tools_api_is_where_the_releases_have_it(stubs) -> None:
    """rkllm_set_function_tools is in rkllm.h from 1.2.1 (not 1.2.1b1): edged's table and the
    stand-in builds agree."""
    for version in RELEASES:
        exported = hasattr(ctypes.CDLL(str(stubs[version])), "rkllm_set_function_tools")
        assert exported == abi_for(version).function_tools == (version in ("1.2.1", "1.3.0")), version


@pytest.mark.parametrize("version", ["1.1.4", "1.2.1", "1.3.0"])
def test_an_auto_tool_job_on_the_npu_gets_the_calls_parsed_from_the_text(
    start_daemon, rk_root, rk_model, stubs, r1_tiny, tmp_path, version: str
) -> None:
    """The R1 distill on the NPU (its GGUF: the R1-shaped model): edged renders the tools into the
    prompt the runtime gets, on every release, and never calls rkllm_set_function_tools (releases that
    have it too: it renders only with the runtime's own template, which edged switches off); the
    runtime's answer in R1's markup comes back as validated tool_calls."""
    record = tmp_path / "record.jsonl"
    d = start_daemon(
        **npu_env(rk_root, stubs[version], rk_model, STUB_RECORD=str(record), STUB_REPLY=R1_REPLY),
        EDGED_MODEL__PATH=str(r1_tiny),
    )
    details = status(d)["backend"]["details"]
    assert ("has rkllm_set_function_tools, not used" in details["function_tools"]) == (version != "1.1.4")
    with d.client() as c:
        r = c.post("/v1/chat/completions", json=chat("Weather in Paris?", tools=[WEATHER], max_tokens=200))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    assert message["reasoning_content"].startswith("The user wants the weather")
    [call] = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "Paris", "unit": "celsius"}
    [run] = records(record)  # one run, and no set_function_tools call
    assert "call" not in run
    assert "\nget_weather(location: string" in run["prompt"]  # the tools, as edged writes them
    assert run["prompt"].endswith("<｜Assistant｜><think>\n")  # noqa: RUF001 - R1's own template


def test_a_forced_tool_call_is_not_supported_on_the_npu(
    start_daemon, rk_root, rk_model, stubs, r1_tiny, tmp_path
) -> None:
    """``required`` and a named tool need a grammar: refused with the reason before anything runs;
    /status says which tool_choice modes work; ``none`` and plain jobs still run."""
    record = tmp_path / "record.jsonl"
    d = start_daemon(
        **npu_env(rk_root, stubs["1.3.0"], rk_model, STUB_RECORD=str(record)), EDGED_MODEL__PATH=str(r1_tiny)
    )
    named = {"type": "function", "function": {"name": "get_weather"}}
    with d.client() as c:
        for tool_choice in ("required", named):
            r = c.post(
                "/v1/chat/completions",
                json=chat("Weather in Paris?", tools=[WEATHER], tool_choice=tool_choice, max_tokens=8),
            )
            assert r.status_code == 501, r.text
            error = r.json()["error"]
            assert error["code"] == "not_supported" and error["param"] == "tool_choice"
            assert "rkllm backend cannot constrain output to a tool call" in error["message"]
        assert records(record) == []  # refused before the runtime saw anything
        r = c.post("/v1/chat/completions", json=chat("hi", tools=[WEATHER], tool_choice="none", max_tokens=4))
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]  # R1's template opened <think>: all of it reasoning
        assert message["reasoning_content"].strip() == "tok0 tok1 tok2 tok3" and "tool_calls" not in message
    tools = status(d)["engine"]["structured_output"]["tools"]
    assert tools["tool_choice"] == ["none", "auto"]
    assert "cannot constrain output to a tool call" in tools["reason"]


def test_the_generic_tool_form_is_not_supported_on_the_npu(start_daemon, rk_root, rk_model, stubs) -> None:
    """A model with no tool-call format of its own (the embedded SmolLM2) gets edged's generic form,
    whose JSON envelope needs a grammar: not even ``auto`` works on the NPU, and /status says so."""
    d = start_daemon(**npu_env(rk_root, stubs["1.2.1"], rk_model))
    with d.client() as c:
        r = c.post("/v1/chat/completions", json=chat("Weather in Paris?", tools=[WEATHER], max_tokens=8))
    assert r.status_code == 501, r.text
    error = r.json()["error"]
    assert error["code"] == "not_supported" and error["param"] == "tools"
    assert "no tool-call format of its own" in error["message"] and "rkllm" in error["message"]
    tools = status(d)["engine"]["structured_output"]["tools"]
    assert tools["tool_choice"] == ["none"] and "generic form" in tools["reason"]
