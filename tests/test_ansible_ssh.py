"""The playbook applied over real SSH to a fresh Debian bookworm root (debootstrap, cached), booted with
systemd-nspawn so that a real systemd starts edged; the second run must change nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import clean_env
from mqtt_helpers import free_port

from edged.config import embedded_model_path

# debootstrap (first time) + wheels + two playbook runs take minutes, not the default 5-minute cap
pytestmark = pytest.mark.timeout(1500)

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "deploy" / "ansible"
BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("EDGED_TEST_CACHE", Path.home() / ".cache" / "edged-tests"))
NO_HOST_KEYS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
PACKAGES = "python3,python3-venv,python3-pip,openssh-server,sudo,systemd,systemd-sysv,dbus,ca-certificates"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is missing; make test installs it (scripts/system-deps.sh)")
    return path


def base_root() -> Path:
    """debootstrap bookworm once; later runs reuse it (CI builds it in about a minute)."""
    base = CACHE / "bookworm-minbase"
    if (base / ".edged-complete").exists():
        return base
    if os.geteuid() != 0:
        pytest.fail("building the Debian root with debootstrap needs root")
    shutil.rmtree(base, ignore_errors=True)
    base.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [
            tool("debootstrap"),
            "--variant=minbase",
            f"--include={PACKAGES}",
            "bookworm",
            str(base),
            "http://deb.debian.org/debian",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if r.returncode != 0:
        pytest.fail(f"debootstrap failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    (base / ".edged-complete").write_text("ok\n")
    return base


class Board:
    def __init__(self, root: Path, port: int, key: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.root, self.port, self.key, self.proc, self.log = root, port, key, proc, log

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                tool("ssh"),
                "-i",
                str(self.key),
                "-p",
                str(self.port),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "root@127.0.0.1",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    work = tmp_path_factory.mktemp("board")
    root = work / "root"
    subprocess.run(["cp", "-a", str(base_root()), str(root)], check=True)
    key = work / "id_ed25519"
    subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    shutil.copy(f"{key}.pub", root / "root/.ssh/authorized_keys")
    port = free_port()
    (root / "etc/ssh/sshd_config.d/edged-test.conf").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n"
    )
    (root / "etc/hostname").write_text("board1\n")
    log = work / "nspawn.log"
    log_file = log.open("wb")
    proc = subprocess.Popen(
        [
            tool("systemd-nspawn"),
            "-D",
            str(root),
            "--register=no",
            "--keep-unit",
            "-b",
            f"--machine=edged-{port}",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"systemd-nspawn exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"  # noqa: E501
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"sshd in the container did not listen:\n{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
    except BaseException:
        proc.kill()
        proc.wait()
        log_file.close()
        raise
    b = Board(root, port, key, proc, log)
    yield b
    proc.send_signal(signal.SIGTERM)  # nspawn powers the container off
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log_file.close()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """This edged as a wheel and every dependency as a wheel (llama-cpp-python from pip's cache), so the
    board installs offline, as an air-gapped fleet would (edged_pip_index: false)."""
    out = tmp_path_factory.mktemp("wheels")
    own = tmp_path_factory.mktemp("own")
    pip = [sys.executable, "-m", "pip", "wheel"]
    subprocess.run(
        [*pip, "--no-deps", "--no-build-isolation", "-w", str(own), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(own.glob("edged-*.whl"))
    r = subprocess.run([*pip, "-w", str(out), str(wheel)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    (out / wheel.name).unlink()
    return wheel, out


def run_playbook(
    board: Board, wheel: Path, wheels: Path, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    model = embedded_model_path()
    assert model is not None
    inventory = {
        "edged": {
            "children": {
                "rpi5": {
                    "hosts": {
                        "board1": {
                            "ansible_host": "127.0.0.1",
                            "ansible_port": board.port,
                            "ansible_user": "root",
                            "ansible_ssh_private_key_file": str(board.key),
                            "ansible_ssh_common_args": NO_HOST_KEYS,
                            "ansible_python_interpreter": "/usr/bin/python3",
                        }
                    }
                }
            }
        }
    }
    inv = tmp_path / "inventory.json"
    inv.write_text(json.dumps(inventory))
    extra = {
        "edged_wheel": str(wheel),
        "edged_wheelhouse": str(wheels),
        "edged_build_packages": [],
        "edged_model_src": str(model),
        "edged_pip_index": False,
        "edged_profile": "auto",
    }
    env = clean_env(
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_HOST_KEY_CHECKING="False",
        PATH=f"{BIN}:{os.environ['PATH']}",
    )
    start = time.monotonic()
    r = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inv), str(ANSIBLE / "site.yml"), "-e", json.dumps(extra)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return r, time.monotonic() - start


def recap(output: str) -> dict[str, int]:
    match = re.search(r"board1\s+:\s+(.*)", output)
    assert match, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def test_playbook_provisions_a_fresh_debian_host_over_ssh(board: Board, wheelhouse, tmp_path: Path) -> None:
    wheel, wheels = wheelhouse
    first, first_s = run_playbook(board, wheel, wheels, tmp_path)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-2000:]
    counts = recap(first.stdout)
    assert counts["failed"] == 0 and counts["changed"] > 5
    second, second_s = run_playbook(board, wheel, wheels, tmp_path)
    assert second.returncode == 0, second.stdout[-5000:]
    assert recap(second.stdout)["changed"] == 0, second.stdout[-5000:]
    print(f"playbook: first run {first_s:.1f} s, second run {second_s:.1f} s (changed=0)")

    root = board.root
    assert re.search(r"^edged:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.MULTILINE)
    groups = (root / "etc/group").read_text()
    assert re.search(r"^render:.*edged", groups, re.MULTILINE) and re.search(
        r"^video:.*edged", groups, re.MULTILINE
    )
    config = (root / "etc/edged/edged.toml").read_text()
    assert 'device_id = "board1"' in config
    assert (root / "var/lib/edged/models/SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size > 90_000_000
    assert (root / "etc/systemd/system/edged.service").read_text() == (
        ROOT / "systemd/edged.service"
    ).read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/edged.service").is_symlink()
    assert (root / "etc/systemd/system/sockets.target.wants/edged.socket").is_symlink()
    assert (root / "opt/edged/venv/bin/edged").exists()


def test_systemd_in_the_container_runs_edged(board: Board) -> None:
    deadline = time.monotonic() + 60
    while True:
        state = board.ssh("systemctl is-active edged.service").stdout.strip()
        if state == "active" or time.monotonic() > deadline:
            break
        time.sleep(1)
    journal = board.ssh("journalctl -u edged --no-pager -n 40").stdout
    assert state == "active", journal
    asked = board.ssh("/opt/edged/venv/bin/edged ask --socket /run/edged/edged.sock --max-tokens 8 'Say hi.'")
    assert asked.returncode == 0, asked.stderr + journal
    assert "generated tokens" in asked.stderr
