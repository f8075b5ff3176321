"""The unit files and the daemon's systemd protocol: verify, security score, socket activation,
sd_notify READY / STATUS / WATCHDOG / STOPPING on a datagram socket the test owns."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import BOARDS, accepts, clean_env, edged_exe

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SECURITY_LIMIT = 3.0  # "OK" in systemd-analyze's scale; the score is printed by the test


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing (Debian package systemd); make test installs it")
    return path


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The shipped units with ExecStart pointing at this venv's edged (Ansible templates the path)."""
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/edged/venv/bin/edged", edged_exe()))
    return tmp_path


@pytest.mark.system
def test_units_pass_systemd_analyze_verify(units: Path) -> None:
    r = subprocess.run(
        [tool("systemd-analyze"), "verify", str(units / "edged.socket"), str(units / "edged.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


@pytest.mark.system
def test_security_exposure_score(units: Path) -> None:
    r = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(units / "edged.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for edged\.service: ([\d.]+) (\w+)", r.stdout)
    assert match, r.stdout + r.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security: {score} {match.group(2)}")
    assert score <= SECURITY_LIMIT, r.stdout


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}`` of a unit file (keys may repeat, e.g. DeviceAllow)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key)
    assert values and len(values) == 1, f"{key}: {values}"
    return values[0]


def size_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def test_limits_and_the_secrets_stay_the_services() -> None:
    """The unit's resource limits and file modes (the values are argued in the unit's comments)."""
    from edged.config import JournalConfig

    unit = unit_settings(UNITS / "edged.service")
    service, head = unit["Service"], unit["Unit"]
    # File descriptors: room for the TCP listener's connection cap and the socket, journal and MQTT.
    assert int(one(service, "LimitNOFILE")) >= 8192
    # Memory: a 4 GB board with a 1.1 GB model (about 1.6 GB in use) keeps 1.5 GB for the system.
    high, cap = size_bytes(one(service, "MemoryHigh")), size_bytes(one(service, "MemoryMax"))
    assert 1.8 * (1 << 30) <= high < cap <= 2.75 * (1 << 30), (high, cap)
    # The journal (every MQTT prompt and answer), the prefix cache and the files edged creates are
    # the service's alone; the socket's client group is not the service's group.
    assert one(service, "StateDirectoryMode") == "0700" and one(service, "UMask") == "0077"
    socket_unit = unit_settings(UNITS / "edged.socket")["Socket"]
    assert one(socket_unit, "SocketGroup") == "edged-clients" != one(service, "Group")
    assert one(socket_unit, "SocketMode") == "0660"
    # The start limit trips on a crash loop with RestartSec between starts and a model load of up to
    # 15 s, and leaves room for the journal's breaker (a poison job: max_attempts crashes, then one
    # start that answers it failed).
    interval = int(one(head, "StartLimitIntervalSec"))
    burst = int(one(head, "StartLimitBurst"))
    restart = int(one(service, "RestartSec"))
    cycle_s = restart + 15
    assert interval / cycle_s > burst, f"a loop of one start every {cycle_s} s never trips"
    max_attempts = JournalConfig.model_fields["max_attempts"].default
    assert burst >= max_attempts + 1, "the start limit would stop the poison-job breaker's last start"


def short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="edged-sd-", dir="/tmp"))


@pytest.mark.system
def test_socket_activation_answers_a_job(tmp_path: Path, model_path: Path) -> None:
    sock = short_dir() / "edged.sock"
    log = (tmp_path / "edged.log").open("wb")
    env = clean_env()
    sets = [
        f"-E{k}={v}"
        for k, v in {
            "EDGED_LOG__FORMAT": "json",
            "EDGED_BOARD__ROOT": str(BOARDS / "x86"),
            "EDGED_BOARD__PROFILES_DIR": str(tmp_path / "none"),
            "EDGED_SOCKET__PATH": str(tmp_path / "not-this-one.sock"),
            "EDGED_JOURNAL__PATH": str(tmp_path / "journal.sqlite3"),
            "PATH": env["PATH"],
        }.items()
    ]
    proc = subprocess.Popen(
        [tool("systemd-socket-activate"), "-l", str(sock), *sets, edged_exe(), "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert accepts(sock), "systemd-socket-activate listens before edged runs"
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://edged", timeout=60
        ) as c:
            deadline = time.monotonic() + 60
            while c.get("/health").status_code != 200:
                assert time.monotonic() < deadline, (tmp_path / "edged.log").read_text()
                time.sleep(0.1)
            r = c.post("/v1/chat/completions", json={"prompt": "hi", "max_tokens": 4})
            assert r.status_code == 200, r.text
        text = (tmp_path / "edged.log").read_text()
        assert "using the socket systemd passed" in text
        assert not (tmp_path / "not-this-one.sock").exists(), "the inherited socket is used, none is bound"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()


def recv_until(notify: socket.socket, needle: str, timeout: float, log: Path) -> list[tuple[float, str]]:
    """sd_notify datagrams (arrival time, text) up to the first that contains ``needle``; fails the test
    when none has arrived within ``timeout`` seconds (whatever else keeps arriving)."""
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        notify.settimeout(left)
        try:
            text = notify.recv(4096).decode()
        except TimeoutError:
            break
        got.append((time.monotonic(), text))
        if needle in text:
            return got
    pytest.fail(f"no {needle!r} within {timeout} s; got {[t for _, t in got]}\n{log.read_text()}")


@pytest.mark.system
def test_sd_notify_ready_after_load_watchdog_and_stopping(tmp_path: Path, model_path: Path) -> None:
    where = short_dir()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(where / "notify"))
    api = where / "edged.sock"
    log_path = tmp_path / "edged.log"
    log = log_path.open("wb")
    env = clean_env(
        NOTIFY_SOCKET=str(where / "notify"),
        WATCHDOG_USEC="400000",
        EDGED_LOG__FORMAT="json",
        EDGED_SOCKET__PATH=str(api),
        EDGED_JOURNAL__PATH=str(tmp_path / "journal.sqlite3"),
        EDGED_BOARD__ROOT=str(BOARDS / "x86"),
        EDGED_BOARD__PROFILES_DIR=str(tmp_path / "none"),
    )
    proc = subprocess.Popen([edged_exe(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        messages = recv_until(notify, "READY=1", 60, log_path)
        ready_at = messages[-1][0]
        assert messages[0][1].startswith("STATUS=loading model SmolLM2"), messages
        assert "STATUS=serving" in messages[-1][1]
        assert '"model ready"' in log_path.read_text(), "READY=1 only after the model is loaded"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(api)), base_url="http://edged") as c:
            assert c.get("/health").status_code == 200
        # two seconds of pings, measured (the window is the scenario, not a wait for an event)
        pings = []
        while (left := ready_at + 2.0 - time.monotonic()) > 0:
            notify.settimeout(left)
            try:
                text = notify.recv(4096).decode()
            except TimeoutError:
                break
            if text == "WATCHDOG=1":
                pings.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert 6 <= len(pings) <= 14, pings  # every WATCHDOG_USEC/2 = 0.2 s
        assert max(gaps) < 0.4, gaps
        proc.send_signal(signal.SIGTERM)
        recv_until(notify, "STOPPING=1", 30, log_path)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        notify.close()


SYSTEMD_ENV = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


@pytest.fixture
def no_systemd(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This process as if started outside systemd (a CI job may itself run under a unit)."""
    for name in SYSTEMD_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_systemd_means_no_notify_and_a_bound_socket(no_systemd: pytest.MonkeyPatch) -> None:
    from edged.systemd import Notifier, inherited_sockets, watchdog_interval

    assert inherited_sockets() == [], "no LISTEN_FDS: the daemon binds its own socket"
    assert watchdog_interval() is None
    notifier = Notifier()
    assert notifier.enabled is False
    notifier.ready("serving")  # a no-op without NOTIFY_SOCKET, not an error
    notifier.watchdog()
    notifier.stopping()
    # the same functions do answer when systemd's variables are there
    no_systemd.setenv("WATCHDOG_USEC", "400000")
    assert watchdog_interval() == 0.2, "half of WATCHDOG_USEC, in seconds"
    no_systemd.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 0.2
    no_systemd.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None, "a watchdog meant for another process is not ours"


def notify_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_sends_ready_status_watchdog_and_stopping(
    no_systemd: pytest.MonkeyPatch, abstract: bool
) -> None:
    """Notifier against a datagram socket the test owns, as systemd's $NOTIFY_SOCKET ("@..." = abstract)."""
    from edged.systemd import Notifier

    if abstract:
        name = f"edged-test-{uuid.uuid4().hex}"
        sock, env = notify_socket("\0" + name), "@" + name
    else:
        path = short_dir() / "notify"
        sock, env = notify_socket(str(path)), str(path)
    no_systemd.setenv("NOTIFY_SOCKET", env)
    notifier = Notifier()
    try:
        assert notifier.enabled is True
        notifier.status("loading model")
        notifier.status("loading model")  # unchanged: not sent again
        notifier.ready("serving")
        notifier.status("serving")  # ready() set it
        notifier.watchdog()
        notifier.stopping()
        received = [sock.recv(4096).decode() for _ in range(4)]
        assert received == [
            "STATUS=loading model",
            "READY=1\nSTATUS=serving",
            "WATCHDOG=1",
            "STOPPING=1\nSTATUS=stopping",
        ]
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(4096)  # nothing more was sent
    finally:
        notifier.close()
        sock.close()
