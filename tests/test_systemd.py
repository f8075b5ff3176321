"""The unit files and the daemon's systemd protocol: verify, security score, socket activation,
sd_notify READY / STATUS / WATCHDOG / STOPPING on a datagram socket the test owns."""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def test_units_pass_systemd_analyze_verify(units: Path) -> None:
    r = subprocess.run(
        [tool("systemd-analyze"), "verify", str(units / "edged.socket"), str(units / "edged.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


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


def short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="edged-sd-", dir="/tmp"))


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


def test_sd_notify_ready_after_load_watchdog_and_stopping(tmp_path: Path, model_path: Path) -> None:
    where = short_dir()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(where / "notify"))
    notify.settimeout(30)
    api = where / "edged.sock"
    log_path = tmp_path / "edged.log"
    log = log_path.open("wb")
    env = clean_env(
        NOTIFY_SOCKET=str(where / "notify"),
        WATCHDOG_USEC="400000",
        EDGED_LOG__FORMAT="json",
        EDGED_SOCKET__PATH=str(api),
        EDGED_BOARD__ROOT=str(BOARDS / "x86"),
        EDGED_BOARD__PROFILES_DIR=str(tmp_path / "none"),
    )
    proc = subprocess.Popen([edged_exe(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    messages: list[tuple[float, str]] = []
    try:
        while not any("READY=1" in m for _, m in messages):
            messages.append((time.monotonic(), notify.recv(4096).decode()))
        ready_at = messages[-1][0]
        assert messages[0][1].startswith("STATUS=loading model SmolLM2"), messages
        assert "STATUS=serving" in messages[-1][1]
        assert '"model ready"' in log_path.read_text(), "READY=1 only after the model is loaded"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(api)), base_url="http://edged") as c:
            assert c.get("/health").status_code == 200
        pings = []
        while time.monotonic() - ready_at < 2.0:
            at, text = time.monotonic(), notify.recv(4096).decode()
            if text == "WATCHDOG=1":
                pings.append(at)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert 6 <= len(pings) <= 14, pings  # every WATCHDOG_USEC/2 = 0.2 s
        assert max(gaps) < 0.4, gaps
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in notify.recv(4096).decode():
            pass
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        notify.close()


def test_no_systemd_means_no_notify_and_a_bound_socket() -> None:
    from edged.systemd import Notifier, inherited_sockets, watchdog_interval

    assert sys.platform.startswith("linux")
    assert inherited_sockets() == []
    assert watchdog_interval() is None
    Notifier().ready("serving")  # a no-op without NOTIFY_SOCKET, not an error
