"""`edged fleet serve`: the fleet page in a real headless Chromium (driven over the DevTools protocol),
its SSE and JSON API, and `/metrics` scraped by a real Prometheus next to a daemon's own `/metrics`,
with every query of the shipped Grafana dashboard run through Prometheus' HTTP API.

Three real daemons on fixture boards (a ROCK 5B and a Raspberry Pi 5, copied so the test can move
their temperatures, and an x86 box without sensors) publish telemetry every second to a real
Mosquitto; `edged fleet serve` runs as a real subprocess. Chromium is driven over
``--remote-debugging-pipe`` (CDP as NUL-terminated JSON on fds 3 and 4): no websocket client needed.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import math
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import BOARDS, Daemon, chat, clean_env, edged_exe, run_edged, wait_until
from mqtt_helpers import Broker, Probe, free_port
from prometheus_client.parser import text_string_to_metric_families
from test_mqtt import mqtt_env, wait_connected

from edged.fleet.aggregator import Aggregator
from edged.fleet.metrics import FleetCollector, exposition, registry
from edged.fleet.web import JobRate, ListenError, parse_listen, summary

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "edged-fleet.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SCREENSHOT = ROOT / "docs" / "fleet-dashboard.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

ROCK, PI, X86 = "fleet-rock", "fleet-pi", "fleet-x86"
PI_DIRECT = "pi-direct"
"""The Pi's daemon scraped directly by Prometheus, labelled so (prometheus.yml's edged-boards job)."""
DEVICES = {ROCK: "rock5b", PI: "rpi5", X86: "x86"}
HOT_ZONE = {ROCK: "thermal_zone1", PI: "thermal_zone0"}
"""The zone whose temperature the test moves (the hottest: bigcore0-thermal, cpu-thermal)."""


# -- helpers -------------------------------------------------------------------------------------------


def fleet_command() -> list[str]:
    """`edged fleet`, or the Typer app on its own if edged/cli.py does not register it (yet)."""
    if run_edged("fleet", "--help").returncode == 0:
        return [edged_exe(), "fleet"]
    return [sys.executable, "-m", "edged.fleet.cli"]


def set_temp(board: Path, zone: str, celsius: float) -> None:
    (board / "sys/devices/virtual/thermal" / zone / "temp").write_text(f"{round(celsius * 1000)}\n")


def num(text: str | None) -> float | None:
    return None if text in (None, "") else float(text)  # type: ignore[arg-type]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


class CDPError(RuntimeError):
    pass


class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe: commands go to its fd 3, answers and
    events come from its fd 4, each a JSON message ended by NUL."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)

        def high(fd: int) -> int:  # away from 0-9: the child's 3 and 4 must not collide with them
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(fd)
            return moved

        to_browser, self._cmd = map(high, os.pipe())
        self._res, from_browser = map(high, os.pipe())
        self.log_path = workdir / "chromium.log"
        self._log = self.log_path.open("wb")
        args = [
            "--headless",
            "--no-sandbox",
            "--remote-debugging-pipe",
            f"--user-data-dir={workdir / 'profile'}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--mute-audio",
            "--hide-scrollbars",
            "--window-size=1280,900",
            "about:blank",
        ]
        # A tiny exec shim puts the pipe ends on fds 3 and 4 (dash cannot redirect fds above 9).
        shim = (
            "import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
            "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", shim, str(to_browser), str(from_browser), CHROMIUM, *args],
            pass_fds=(to_browser, from_browser),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._res, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        waiter = self._waiting.pop(message["id"], None)
                    if waiter is not None:
                        waiter.put(message)
                else:
                    with self._lock:
                        self.events.append(message)
        with self._lock:
            for waiter in self._waiting.values():
                waiter.put({"error": {"message": "the browser closed its pipe"}})
            self._waiting.clear()

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        waiter: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._next += 1
            ident = self._next
            self._waiting[ident] = waiter
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._cmd, json.dumps(message).encode() + b"\0")
        try:
            answer = waiter.get(timeout=timeout)
        except queue.Empty:
            raise CDPError(f"{method}: no answer within {timeout} s") from None
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}\n{self.log_path.read_text(errors='replace')}")
        return answer["result"]

    def open(self, url: str, width: int = 1280, height: int = 900) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Network", "Log"):
            page.send(f"{domain}.enable")
        page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        page.send("Page.navigate", {"url": url})
        return page

    def session_events(self, session: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("sessionId") == session]

    def close(self) -> None:
        with contextlib.suppress(CDPError, OSError):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._cmd)
        self._reader.join(10)
        os.close(self._res)
        self._log.close()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass
class Page:
    browser: Chromium
    session: str

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def eval(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a JS expression until it is truthy (bounded)."""
        deadline = time.monotonic() + timeout
        while not (value := self.eval(expression)):
            if time.monotonic() > deadline:
                pytest.fail(f"the page: {what} not within {timeout} s")
            time.sleep(0.1)
        return value

    def state(self) -> dict[str, Any]:
        """What the page shows: every card's fields (data-value is the raw number or text), charts
        and badges, the summary, the order of the cards."""
        return json.loads(
            self.eval(
                """JSON.stringify({
                  order: [...document.querySelectorAll('.card')].map(c => c.dataset.device),
                  cards: Object.fromEntries([...document.querySelectorAll('.card')].map(c => [
                    c.dataset.device, {
                    state: c.dataset.state,
                    throttled: !c.querySelector('.badge.throttled').hidden,
                    meta: c.querySelector('.meta').textContent,
                    zone: c.querySelector('.zone').textContent,
                    fields: Object.fromEntries([...c.querySelectorAll('[data-field]')].map(
                      e => [e.dataset.field, {value: e.dataset.value, text: e.textContent}])),
                    charts: Object.fromEntries([...c.querySelectorAll('svg[data-series]')].map(
                      s => [s.dataset.series, {points: Number(s.dataset.points), last: s.dataset.last}])),
                  }])),
                  summary: {
                    online: document.getElementById('sum-online').dataset.value,
                    tokens: document.getElementById('sum-tokens').dataset.value,
                    jobs: document.getElementById('sum-jobs').dataset.value,
                    hottest: document.getElementById('sum-hottest').dataset.value,
                    hottest_c: document.getElementById('sum-hottest-c').dataset.value,
                  },
                  connection: document.getElementById('conn').dataset.state,
                })"""
            )
        )

    def screenshot(self, width: int = 1280) -> bytes:
        height = int(self.eval("Math.ceil(document.documentElement.scrollHeight)"))
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def problems(self) -> list[str]:
        """JS exceptions, console errors and log errors (CSP violations, failed loads) so far."""
        found = []
        for event in self.browser.session_events(self.session):
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    def requested(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.browser.session_events(self.session)
            if e["method"] == "Network.requestWillBeSent"
        ]


class FleetServer:
    """`edged fleet --mqtt ... serve --listen 127.0.0.1:PORT` as a subprocess."""

    def __init__(self, broker: Broker, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = workdir / "fleet-serve.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                *fleet_command(),
                "--mqtt",
                f"127.0.0.1:{broker.port}",
                "--interval",
                "1",
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                *extra,
            ],
            env=clean_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"edged fleet serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if self.http.get("/health").status_code == 200:
                    return
            time.sleep(0.05)
        pytest.fail(f"edged fleet serve not ready within {timeout} s:\n{self.log()}")

    def fleet(self) -> dict[str, Any]:
        return self.http.get("/api/fleet").json()

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["device_id"]: d for d in self.fleet()["devices"]}

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                pytest.fail(f"edged fleet serve did not stop within {timeout} s of SIGTERM:\n{self.log()}")
        self.http.close()
        self._log.close()
        return self.proc.returncode


@dataclass
class Fleet:
    broker: Broker
    daemons: dict[str, Daemon]
    boards: dict[str, Path]
    server: FleetServer
    pi_metrics_port: int
    probe: Probe
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The last telemetry document each device published (as the probe saw it)."""

    def job(self, device: str, max_tokens: int = 8, prompt: str = "Say hi.") -> None:
        with self.daemons[device].client() as c:
            r = c.post("/v1/chat/completions", json=chat(prompt, max_tokens=max_tokens))
            assert r.status_code == 200, r.text

    def drain(self) -> dict[str, dict[str, Any]]:
        """Read the telemetry the probe received so far; the last per device."""
        while True:
            try:
                topic, payload, _ = self.probe.messages.get_nowait()
            except queue.Empty:
                return self.latest
            self.latest[topic.split("/")[1]] = json.loads(payload)

    def next_report(self, device: str, timeout: float = 15, **condition: Any) -> dict[str, Any]:
        """The next telemetry of ``device`` published from now on (and matching ``condition``:
        ``jobs_done=N`` at least N jobs done)."""
        self.drain()
        seen = self.latest.get(device, {}).get("ts")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = self.drain().get(device)
            if report is not None and report.get("ts") != seen:
                if report["jobs"]["done"] >= condition.get("jobs_done", 0):
                    return report
                seen = report["ts"]
            time.sleep(0.05)
        pytest.fail(f"no new telemetry from {device} within {timeout} s")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Fleet]:
    """A broker, three daemons publishing telemetry every second, and `edged fleet serve` (history
    at 1 s resolution, so the charts fill within the test)."""
    work = tmp_path_factory.mktemp("fleet-web")
    broker = Broker(work / "broker").start()
    daemons: dict[str, Daemon] = {}
    boards: dict[str, Path] = {}
    server: FleetServer | None = None
    probe: Probe | None = None
    pi_metrics_port = free_port()
    try:
        for device, board in DEVICES.items():
            root = work / "boards" / board
            shutil.copytree(BOARDS / board, root, symlinks=True)
            boards[device] = root
            env = mqtt_env(
                broker,
                device,
                EDGED_TELEMETRY__INTERVAL_S="1",
                EDGED_MODEL__THREADS="1",
                EDGED_BOARD__ROOT=str(root),
            )
            if device == PI:
                env["EDGED_TELEMETRY__METRICS_PORT"] = str(pi_metrics_port)
            (work / device).mkdir()
            daemons[device] = Daemon(work / device, board, **env).start()
        for d in daemons.values():
            d.wait_ready()
            wait_connected(d)
        probe = Probe(broker.port)
        probe.subscribe("edged/+/telemetry")
        server = FleetServer(broker, work, "--resolution", "1", "--history", "10")
        server.wait_ready()
        wait_until(
            lambda: {d for d, s in server.devices().items() if s["reports"] > 0} == set(DEVICES),  # type: ignore[union-attr]
            30,
            "the three devices reporting to the fleet server",
        )
        yield Fleet(broker, daemons, boards, server, pi_metrics_port, probe)
    finally:
        if probe is not None:
            probe.close()
        codes = {}
        if server is not None:
            codes["fleet serve"] = server.stop()
        for device, d in daemons.items():
            if d.proc is not None:
                d.proc.send_signal(signal.SIGCONT)
                codes[device] = d.stop()
        broker.stop()
        assert all(code == 0 for code in codes.values()), (codes, server.log() if server else "")


# -- the page in Chromium ------------------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.timeout(240)
def test_the_page_in_headless_chromium(fleet: Fleet, tmp_path: Path) -> None:
    started = time.monotonic()
    # A few jobs while the temperatures move, so every card has figures and the charts a shape.
    for step in range(10):
        set_temp(fleet.boards[ROCK], HOT_ZONE[ROCK], 53 + 6 * math.sin(step / 2.5))
        set_temp(fleet.boards[PI], HOT_ZONE[PI], 60 + 4 * math.cos(step / 3))
        device = (ROCK, PI, X86)[step % 3]
        fleet.job(device, max_tokens=4 + 4 * (step % 4))
        fleet.next_report(device)
    for device in DEVICES:
        fleet.next_report(device, jobs_done=1)

    with Chromium(tmp_path / "chromium") as browser:
        page = browser.open(fleet.server.url)
        page.wait("document.querySelectorAll('.card').length === 3", 30, "three device cards")
        page.wait("document.getElementById('conn').dataset.state === 'live'", 10, "the live connection")

        # Every card shows what its device published last (the daemons are idle: it repeats).
        def mismatches() -> list[str]:
            shown = page.state()["cards"]
            published = fleet.drain()
            api = fleet.server.devices()
            wrong = []
            for device in DEVICES:
                card, report, state = shown[device], published[device], api[device]
                f = card["fields"]
                zones = [z["temp_c"] for z in report["thermals"]["zones"] if z["temp_c"] is not None]
                expected = {
                    "decode_tok_s": report["summary"]["decode_tokens_per_s"],
                    "tokens_per_s": report["summary"]["tokens_per_s"],
                    "s_per_1k_tokens": report["summary"]["s_per_1k_tokens"],
                    "ttft_ms_p50": report["summary"]["ttft_ms_p50"],
                    "hottest_c": max(zones) if zones else None,
                    "queue": report["queue"]["depth"],
                    "jobs_done": report["jobs"]["done"],
                }
                for key, value in expected.items():
                    if num(f[key]["value"]) != value:
                        wrong.append(f"{device} {key}: page {f[key]['value']!r}, telemetry {value!r}")
                if f["governor"]["value"] != report["summary"]["thermal_state"]:
                    wrong.append(f"{device} governor: {f['governor']['value']!r}")
                if card["state"] != "online" or card["throttled"] != report["summary"]["throttled"]:
                    wrong.append(f"{device} state {card['state']} throttled {card['throttled']}")
                if card["zone"] != (state["hottest_zone"] or ""):
                    wrong.append(f"{device} zone {card['zone']!r}, fleet {state['hottest_zone']!r}")
                for key in ("board", "profile", "backend", "model"):
                    if state[key] and state[key] not in card["meta"]:
                        wrong.append(f"{device} {key} {state[key]!r} not in {card['meta']!r}")
            return wrong

        deadline = time.monotonic() + 15
        while problems := mismatches():
            if time.monotonic() > deadline:
                pytest.fail("the cards do not show the published telemetry:\n" + "\n".join(problems))
            time.sleep(0.2)
        shown = page.state()
        assert shown["order"] == [PI, ROCK, X86], "worst first: the throttled Pi, then by name"
        assert shown["cards"][PI]["throttled"] and not shown["cards"][ROCK]["throttled"]
        assert (
            shown["cards"][PI]["fields"]["hottest_c"]["text"]
            == f"{fleet.latest[PI]['summary']['hottest_c']:.1f}"
        )
        assert shown["cards"][X86]["fields"]["hottest_c"]["value"] == "", "no sensors: no temperature"
        assert shown["cards"][X86]["charts"]["hottest_c"]["points"] == 0
        for device in (ROCK, PI):
            assert shown["cards"][device]["charts"]["hottest_c"]["points"] >= 5, shown["cards"][device]
            assert shown["cards"][device]["charts"]["decode_tok_s"]["points"] >= 5
        assert fleet.server.fleet()["summary"]["online"] == 3

        # The summary: devices online, their generated tok/s summed, jobs in the last minute, the
        # hottest device (by its hottest zone, as the cards).
        def summary_mismatches() -> list[str]:
            shown = page.state()["summary"]
            published = fleet.drain()
            hottest = max(
                (max(z["temp_c"] for z in published[d]["thermals"]["zones"]), d) for d in (ROCK, PI)
            )
            tokens = round(sum(published[d]["summary"]["tokens_per_s"] for d in DEVICES), 2)
            wrong = []
            if shown["online"] != "3":
                wrong.append(f"online {shown['online']!r}")
            if (shown["hottest"], num(shown["hottest_c"])) != (hottest[1], hottest[0]):
                wrong.append(f"hottest {shown['hottest']} {shown['hottest_c']}, published {hottest}")
            if num(shown["tokens"]) is None or abs(num(shown["tokens"]) - tokens) > 0.02:  # type: ignore[operator]
                wrong.append(f"tok/s {shown['tokens']!r}, published {tokens}")
            if (num(shown["jobs"]) or 0) < 10:
                wrong.append(f"jobs/min {shown['jobs']!r}: the warm-up ran 10 jobs")
            return wrong

        deadline = time.monotonic() + 10
        while problems := summary_mismatches():
            if time.monotonic() > deadline:
                pytest.fail("the summary does not match the telemetry:\n" + "\n".join(problems))
            time.sleep(0.2)

        # A new telemetry message changes the card: the ROCK warms up and finishes one more job.
        before = page.state()["cards"][ROCK]
        set_temp(fleet.boards[ROCK], HOT_ZONE[ROCK], 63.5)
        fleet.job(ROCK, max_tokens=12)
        report = fleet.next_report(ROCK, jobs_done=int(before["fields"]["jobs_done"]["value"]) + 1)
        rock = 'document.querySelector(\'.card[data-device="fleet-rock"] [data-field="%s"]\').dataset.value'
        page.wait(
            f"{rock % 'hottest_c'} === '63.5' && {rock % 'jobs_done'} === '{report['jobs']['done']}'",
            10,
            "the ROCK's new temperature and job",
        )
        after = page.state()["cards"][ROCK]
        assert (
            after["fields"]["hottest_c"]["text"] == "63.5" and after["charts"]["hottest_c"]["last"] == "63.5"
        )
        assert int(after["fields"]["jobs_done"]["value"]) == report["jobs"]["done"]
        assert num(after["fields"]["decode_tok_s"]["value"]) == report["summary"]["decode_tokens_per_s"]
        assert int(after["fields"]["reports"]["value"]) > int(before["fields"]["reports"]["value"])
        assert page.state()["summary"]["hottest"] == ROCK, "63.5 °C: now the hottest device"

        # A frozen daemon goes stale on the page, and comes back.
        x86 = fleet.daemons[X86].proc
        assert x86 is not None
        x86.send_signal(signal.SIGSTOP)
        try:
            page.wait(
                "document.querySelector('.card[data-device=\"fleet-x86\"]').dataset.state === 'stale'",
                15,
                "the frozen device stale",
            )
            assert page.state()["summary"]["online"] == "2"
        finally:
            x86.send_signal(signal.SIGCONT)
        page.wait(
            "document.querySelector('.card[data-device=\"fleet-x86\"]').dataset.state === 'online'",
            15,
            "the resumed device online",
        )
        page.wait("document.getElementById('sum-online').dataset.value === '3'", 10, "three online again")

        png = page.screenshot()
        width, height = png_size(png)
        assert width == 1280 and height >= 500 and len(png) > 30_000, (width, height, len(png))
        (tmp_path / "fleet-dashboard.png").write_bytes(png)
        if os.environ.get("EDGED_UPDATE_SCREENSHOT") == "1" or not SCREENSHOT.exists():
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(png)

        assert page.problems() == []
        requested = page.requested()
        assert requested and all(url.startswith(fleet.server.url) for url in requested), requested
        snapshots = page.eval("document.body.dataset.snapshots")
        assert snapshots == "1", "one SSE connection the whole time (no reconnect)"
    assert browser.proc.returncode == 0
    print(f"chromium test: {time.monotonic() - started:.1f} s; screenshot {width}x{height}, {len(png)} bytes")


# -- the API and SSE -----------------------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.timeout(120)
def test_api_and_server_sent_events(fleet: Fleet) -> None:
    http = fleet.server.http
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["connected"] is True
    doc = fleet.server.fleet()
    assert {d["device_id"] for d in doc["devices"]} == set(DEVICES)
    assert doc["resolution_s"] == 1 and doc["summary"]["devices"] == 3
    assert set(doc["history"]) == set(DEVICES)
    for series in doc["history"].values():
        assert set(series) == {"t", "decode_tok_s", "tokens_per_s", "hottest_c"}
        assert len(series["t"]) == len(series["hottest_c"]) > 0
    one = http.get(f"/api/devices/{PI}").json()
    assert one["device"]["device_id"] == PI and one["report"]["device_id"] == PI
    assert one["report"]["thermals"]["throttling"]["active"] is True
    assert http.get("/api/devices/nobody").status_code == 404
    page = http.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css", "favicon.svg"):
        assert http.get(f"/static/{asset}").status_code == 200, asset

    # SSE: the snapshot first, then batched changes carrying telemetry events and the summary.
    events: list[tuple[str, dict[str, Any]]] = []
    with (
        httpx.Client(base_url=fleet.server.url, timeout=httpx.Timeout(10, read=10)) as client,
        client.stream("GET", "/events") as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                telemetry = [
                    e for k, d in events if k == "changes" for e in d["events"] if e["kind"] == "telemetry"
                ]
                if {e["device_id"] for e in telemetry} == set(DEVICES):
                    break
    assert events[0][0] == "snapshot" and {d["device_id"] for d in events[0][1]["devices"]} == set(DEVICES)
    change = next(d for k, d in events if k == "changes" and d["events"])
    assert change["summary"]["online"] == 3 and change["counters"]["telemetry"] > 0
    event = next(e for e in change["events"] if e["kind"] == "telemetry")
    assert set(event["point"]) == {"t", "decode_tok_s", "tokens_per_s", "s_per_1k_tokens", "ttft_ms_p50",
                                   "hottest_c", "queue_depth", "throttled"}  # fmt: skip


# -- Prometheus and the Grafana dashboard --------------------------------------------------------------


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel (rows included)."""
    doc = json.loads(DASHBOARD.read_text())
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))

    walk(doc["panels"])
    return found


# Which devices each panel must show (the rest must show nothing): thermal panels need sensors (the
# x86 box has none), the throttling panel the Pi's firmware flags.
THERMAL = {ROCK, PI, PI_DIRECT}
EXPECTED = {
    "Temperature per zone": THERMAL,
    "Hottest watched zone": THERMAL,
    "Throttled (Pi firmware flags, now)": {PI, PI_DIRECT},
}
ALL = {ROCK, PI, X86, PI_DIRECT}


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


@pytest.mark.system
@pytest.mark.timeout(240)
def test_prometheus_scrapes_the_fleet_and_a_daemon(fleet: Fleet, tmp_path: Path) -> None:
    started = time.monotonic()
    # The shipped prometheus.yml with loopback targets and a 1 s scrape interval.
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["edged-fleet"]["honor_labels"] is True
    jobs["edged-fleet"]["static_configs"] = [{"targets": [f"127.0.0.1:{fleet.server.port}"]}]
    for job in jobs.values():  # the shipped per-job intervals (30 s for the fleet) become 1 s
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
    jobs["edged-boards"]["static_configs"] = [
        {"targets": [f"127.0.0.1:{fleet.pi_metrics_port}"], "labels": {"device": PI_DIRECT}}
    ]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [PROMTOOL, "check", "config", str(config_path)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr

    # Both expositions pass promtool's lint, and the fleet's carries the device label everywhere.
    fleet_text = fleet.server.http.get("/metrics").text
    with httpx.Client(timeout=10) as http:
        daemon_text = http.get(f"http://127.0.0.1:{fleet.pi_metrics_port}/metrics").text
    for name, text in (("fleet", fleet_text), ("daemon", daemon_text)):
        lint = promtool_check_metrics(text)
        assert lint.returncode == 0, (name, lint.stdout + lint.stderr)
    families = {f.name: f for f in text_string_to_metric_families(fleet_text)}
    daemon_families = {f.name for f in text_string_to_metric_families(daemon_text)}
    for family in families.values():
        for sample in family.samples:
            assert family.name.startswith("edged_fleet_") or sample.labels.get("device") in DEVICES, sample
    shared = {n for n in families if not n.startswith("edged_fleet_")}
    missing = daemon_families - shared
    # The daemon's own figures a report does not carry (yet): evicted/warmed/parked/disk bytes.
    assert missing <= {
        "edged_prefix_cache_disk_warmed",
        "edged_prefix_cache_evictions",
        "edged_prefix_cache_parked_tokens",
        "edged_prefix_cache_disk_bytes",
    }, missing
    assert {f.type for f in families.values() if f.name in HISTOGRAM_NAMES} == {"histogram"}

    port = free_port()
    prom_log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    results: dict[tuple[str, str, str], int] = {}
    try:

        def ready() -> bool:
            if prom.poll() is not None:
                pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()}")
            with contextlib.suppress(httpx.TransportError):
                return api.get("/-/ready").status_code == 200
            return False

        def query(expr: str) -> list[dict[str, Any]]:
            body = api.get("/api/v1/query", params={"query": expr}).json()
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        wait_until(ready, 30, "prometheus ready")
        wait_until(lambda: len([r for r in query("up") if r["value"][1] == "1"]) == 2, 30, "both targets up")

        # Jobs on every daemon while Prometheus scrapes: rates and histograms move.
        for round_ in range(3):
            for device in DEVICES:
                fleet.job(device, max_tokens=4 + 4 * round_)
            time.sleep(1.0)  # one scrape apart: the rates need samples before and after
        for device in DEVICES:
            fleet.next_report(device)

        # The fleet endpoint and the Pi's own /metrics agree on the same board.
        def same(expr: str) -> bool:
            values = {r["metric"]["device"]: r["value"][1] for r in query(expr)}
            return PI in values and values.get(PI) == values.get(PI_DIRECT)

        for expr in (
            'edged_jobs_total{outcome="done", device=~"fleet-pi|pi-direct"}',
            'edged_ttft_seconds_count{device=~"fleet-pi|pi-direct"}',
            'edged_thermal_zone_celsius{device=~"fleet-pi|pi-direct"}',
            'edged_throttled{when="now", flag="under_voltage", device=~"fleet-pi|pi-direct"}',
        ):
            wait_until(lambda expr=expr: same(expr), 20, f"the same value both ways: {expr}")

        # The dashboard's device variable: label_values(edged_queue_depth, device).
        labels = api.get("/api/v1/label/device/values", params={"match[]": "edged_queue_depth"}).json()
        assert set(labels["data"]) == ALL, labels

        # Every query of every panel, $device filled in, for every device.
        targets = dashboard_targets()
        assert len(targets) >= 12, targets
        for title, expr in targets:
            for device in sorted(ALL):
                promql = expr.replace("$__rate_interval", "1m").replace("$device", device)
                expected = EXPECTED.get(title, ALL)

                def answered(promql: str = promql) -> bool:
                    series = [r for r in query(promql) if math.isfinite(float(r["value"][1]))]
                    return bool(series)

                if device in expected:
                    wait_until(answered, 30, f"{title!r} for {device}: {promql}")
                    results[(title, device, promql)] = len(query(promql))
                else:
                    assert query(promql) == [], (title, device, promql)
                    results[(title, device, promql)] = 0
        # And with the variable's "All" (.*): every device at once.
        for title, expr in targets:
            promql = expr.replace("$__rate_interval", "1m").replace("$device", ".*")
            devices = {r["metric"].get("device") for r in query(promql)}
            assert devices == EXPECTED.get(title, ALL), (title, devices)
    finally:
        api.close()
        prom.terminate()
        try:
            prom.wait(30)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(10)
        prom_log.close()
    answered_count = sum(1 for n in results.values() if n)
    print(
        f"prometheus test: {len(targets)} panel queries x {len(ALL)} devices = {len(results)} checked, "
        f"{answered_count} with data as expected, {len(results) - answered_count} empty as expected; "
        f"{time.monotonic() - started:.1f} s"
    )


HISTOGRAM_NAMES = {
    "edged_ttft_seconds",
    "edged_decode_tokens_per_second",
    "edged_prefill_tokens_per_second",
    "edged_queue_wait_seconds",
}


# -- the exposition, offline -----------------------------------------------------------------------------


def shaped_report(device: str, **changes: Any) -> dict[str, Any]:
    """A telemetry document shaped like a real one (edged.telemetry.report), histograms included."""
    doc: dict[str, Any] = {
        "schema": 1,
        "device_id": device,
        "ts": 1_700_000_000.0,
        "interval_s": 10.0,
        "version": "0.1.0",
        "backend": "llamacpp",
        "model": "m",
        "state": "ready",
        "queue": {"depth": 1, "max_depth": 16},
        "slots": {"total": 4, "effective": 4, "active": 1},
        "jobs": {"done": 5, "failed": 1, "cancelled": 0, "rejected": 0},
        "totals": {"prompt_tokens": 100, "completion_tokens": 40, "cached_prompt_tokens": 10},
        "prefix_cache": {
            "lookups": 5,
            "hits": 2,
            "hit_tokens": 64,
            "saved_prefill_ms": 250.0,
            "disk_hits": 0,
        },
        "summary": {
            "window": "1m",
            "decode_tokens_per_s": 12.5,
            "tokens_per_s": 11.0,
            "s_per_1k_tokens": 80.0,
            "ttft_ms_p50": 300.0,
            "hottest_c": 55.5,
            "thermal_state": "normal",
            "throttled": False,
        },
        "thermals": {
            "zones": [{"zone": "thermal_zone0", "type": "soc-thermal", "temp_c": 55.5}],
            "cpufreq": [{"policy": "policy0", "cur_mhz": 1800.0, "max_mhz": 1800.0, "hw_max_mhz": 1800.0}],
            "npu": {"load_pct": {"core0": 12}},
            "throttling": {"now": {"under_voltage": False}, "since_boot": {"under_voltage": True}},
            "system": {"mem_available_mb": 1024.0, "load_1m": 0.5},
            "governor": {"state": "normal", "transitions": {"normal": 1}},
        },
        "histograms": {
            "edged_ttft_seconds": {"buckets": [["0.5", 3], ["1", 5], ["+Inf", 5]], "sum": 1.5, "count": 5},
        },
    }
    doc.update(changes)
    return doc


@pytest.mark.system
def test_exposition_of_a_fleet_offline(tmp_path: Path) -> None:
    agg = Aggregator()
    agg.handle("edged/good/status", json.dumps({"state": "online", "profile": "rk3588"}).encode())
    agg.handle("edged/good/telemetry", json.dumps(shaped_report("good")).encode())
    bad = shaped_report(
        'we"ird\\one',
        jobs={"done": "five", "failed": -1},
        histograms={
            "edged_ttft_seconds": {"buckets": [["1", 5], ["0.5", 6], ["+Inf", 6]], "sum": 1, "count": 6},
            "edged_decode_tokens_per_second": {"buckets": [["1", 2], ["2", 1], ["+Inf", 2]], "sum": 1},
            "edged_queue_depth": {"buckets": [["+Inf", 1]], "sum": 1, "count": 1},  # a foreign name: ignored
        },
    )
    bad["thermals"]["zones"] = [{"zone": "z", "type": "t", "temp_c": "hot"}]
    agg.handle('edged/we"ird\\one/telemetry', json.dumps(bad).encode())
    agg.handle("edged/gone/status", b'{"state": "offline"}')
    text = exposition(registry(FleetCollector(agg, connected=lambda: True))).decode()
    (tmp_path / "fleet.prom").write_text(text)
    lint = promtool_check_metrics(text)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def values(name: str, **labels: str) -> list[float]:
        return [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]

    assert values("edged_jobs_total", device="good", outcome="done") == [5]
    assert values("edged_ttft_seconds_bucket", device="good", le="1") == [5]
    assert values("edged_ttft_seconds_count", device="good") == [5]
    assert values("edged_thermal_zone_celsius", device="good", type="soc-thermal") == [55.5]
    assert values("edged_throttled", device="good", flag="under_voltage", when="since_boot") == [1]
    assert values("edged_thermal_state", device="good", state="normal") == [1]
    assert values("edged_thermal_state", device="good", state="paused") == [0]
    assert values("edged_info", device="good", profile="rk3588") == [1]
    assert values("edged_npu_load_ratio", device="good", core="core0") == [0.12]
    assert values("edged_memory_available_bytes", device="good") == [1024 * 1024 * 1024]
    assert values("edged_prefix_cache_saved_prefill_seconds_total", device="good") == [0.25]
    # The odd device: its bad fields left out and counted, the rest exported, its id escaped.
    odd = 'we"ird\\one'
    assert values("edged_jobs_total", device=odd) == []
    assert values("edged_ttft_seconds_count", device=odd) == []
    assert values("edged_decode_tokens_per_second_count", device=odd) == []
    assert values("edged_queue_depth", device=odd) == [1]
    assert values("edged_fleet_report_problems", device=odd) == [5]
    assert values("edged_fleet_report_problems", device="good") == []
    # The offline device: only the fleet's own series.
    assert values("edged_fleet_device_up", device="gone") == [0]
    assert values("edged_fleet_device_state", device="gone", state="offline") == [1]
    assert [
        s for s in samples if s.labels.get("device") == "gone" and not s.name.startswith("edged_fleet_")
    ] == []
    assert values("edged_fleet_devices", state="online") == [2]
    assert values("edged_fleet_messages_total", kind="telemetry") == [2]
    assert values("edged_fleet_broker_connected") == [1]


def test_jobs_per_minute_and_the_summary() -> None:
    rate = JobRate(window_s=60)
    rate.add("a", 1000, 10)
    rate.add("a", 1030, 14)
    rate.add("a", 1050, 2)  # restarted: 2 jobs since
    rate.add("b", 1040, 7)
    rate.add("b", 1055, 9)
    assert rate.jobs(1060) == 4 + 2 + 2
    assert rate.jobs(1095) == 2 + 2, "the window slid past the first two samples of a"
    rate.remove("b")
    assert rate.jobs(1100) == 2
    agg = Aggregator()
    agg.handle("edged/hot/telemetry", json.dumps(shaped_report("hot")).encode())
    cool = shaped_report("cool")
    cool["thermals"]["zones"][0]["temp_c"] = 40.0
    cool["summary"]["throttled"] = True
    agg.handle("edged/cool/telemetry", json.dumps(cool).encode())
    agg.handle("edged/down/status", b'{"state": "offline"}')
    s = summary(agg.snapshot(), 12, 1.0)
    assert (s["devices"], s["online"], s["offline"], s["throttled"]) == (3, 2, 1, 1)
    assert s["tokens_per_s"] == 22.0 and s["jobs_per_min"] == 12
    assert s["hottest"] == {"device_id": "hot", "hottest_c": 55.5, "zone": "soc-thermal"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8088", ("127.0.0.1", 8088)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9100", ("::1", 9100)),
        (":8088", ("127.0.0.1", 8088)),
        ("8088", ("127.0.0.1", 8088)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "host", "host:x", "::1:80", "[::1]", "[::1]x", "host:70000"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ListenError):
        parse_listen(text)


@pytest.mark.system
@pytest.mark.timeout(120)
def test_serve_exit_codes_and_a_clean_stop_with_a_page_connected(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*fleet_command(), *args], env=clean_env(), capture_output=True, text=True, timeout=60
        )

    dead = f"127.0.0.1:{free_port()}"
    r = run("--mqtt", dead, "serve", "--listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 3 and "cannot connect" in r.stderr, r.stderr
    r = run("--mqtt", dead, "serve", "--listen", "nowhere")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr, r.stderr
    r = run("--mqtt", dead, "serve", "--resolution", "0.1", "--history", "60")
    assert r.returncode == 2 and "points" in r.stderr, r.stderr
    r = run("--mqtt", dead, "serve", "--help")
    assert r.returncode == 0 and "--listen" in r.stdout and "/metrics" in r.stdout, r.stderr
    broker = Broker(tmp_path / "broker").start()
    try:
        probe = Probe(broker.port)
        try:
            probe.publish("edged/solo/status", {"state": "online", "board": "b"}, retain=True)
        finally:
            probe.close()
        server = FleetServer(broker, tmp_path)
        try:
            server.wait_ready()
            taken = run("--mqtt", f"127.0.0.1:{broker.port}", "serve", "--listen", f"127.0.0.1:{server.port}")
            assert taken.returncode == 2 and "cannot listen" in taken.stderr, taken.stderr
            wait_until(lambda: "solo" in server.devices(), 10, "the retained status")  # type: ignore[operator]
            # A page connected: SIGTERM still stops the server at once, with exit code 0.
            with (
                httpx.Client(base_url=server.url, timeout=10) as client,
                client.stream("GET", "/events") as s,
            ):
                lines = s.iter_lines()
                assert next(line for line in lines if line.startswith("event: ")) == "event: snapshot"
                t0 = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                assert server.proc.wait(10) == 0, server.log()
                stopped_s = time.monotonic() - t0
                for _ in lines:  # the stream ends
                    pass
            assert stopped_s < 3, stopped_s
        finally:
            server.stop()
    finally:
        broker.stop()


@pytest.mark.system
@pytest.mark.timeout(180)
def test_the_page_ships_in_the_wheel(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=170,
    )
    names = zipfile.ZipFile(next(tmp_path.glob("edged-*.whl"))).namelist()
    for name in ("index.html", "app.js", "style.css", "favicon.svg"):
        assert f"edged/fleet/static/{name}" in names, name
    for module in ("web", "metrics"):
        assert f"edged/fleet/{module}.py" in names


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN: the page's HTML, JS and CSS name no other origin."""
    static = ROOT / "edged" / "fleet" / "static"
    for path in static.iterdir():
        text = path.read_text()
        for needle in ("http://", "https://", "//cdn", "@import"):
            if needle == "http://" and path.suffix == ".svg":
                text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
            if needle == "http://" and path.suffix == ".js":
                text = text.replace('"http://www.w3.org/2000/svg"', "")
            assert needle not in text, (path.name, needle)
