"""Throwaway Debian boards for the Ansible tests: a bookworm root made by debootstrap (cached in
~/.cache/edged-tests), copied, booted with systemd-nspawn so that a real systemd runs in it, and
reached over real SSH. A foreign (arm64) root boots through qemu-user and binfmt_misc (`Binfmt`)."""

from __future__ import annotations

import contextlib
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
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import clean_env
from mqtt_helpers import free_port

# $XDG_CACHE_HOME/edged-tests (not an EDGED_* variable: edged refuses unknown EDGED_* settings, and
# tests load settings in-process)
ANSIBLE = Path(__file__).resolve().parent.parent / "deploy" / "ansible"
BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", "") or Path.home() / ".cache") / "edged-tests"
NO_HOST_KEYS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
PACKAGES = "python3,python3-venv,python3-pip,openssh-server,sudo,systemd,systemd-sysv,dbus,ca-certificates"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# qemu's own registration for aarch64 ELF executables (qemu's scripts/qemu-binfmt-conf.sh), with F:
# the kernel opens the interpreter now, so it works inside a container root that does not have it.
AARCH64_MAGIC = r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is missing; make test installs it (scripts/system-deps.sh)")
    return path


def debootstrap_root(name: str, arch: str | None = None, timeout: float = 1800) -> tuple[Path, float | None]:
    """A minimal bookworm root with Python, sshd and systemd, built once under CACHE/name; later runs
    reuse it. Returns the root and the seconds debootstrap took (None when cached)."""
    base = CACHE / name
    if (base / ".edged-complete").exists():
        return base, None
    if os.geteuid() != 0:
        pytest.fail("building the Debian root with debootstrap needs root")
    shutil.rmtree(base, ignore_errors=True)
    base.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    r = subprocess.run(
        [
            tool("debootstrap"),
            *([f"--arch={arch}"] if arch else []),
            "--variant=minbase",
            f"--include={PACKAGES}",
            "bookworm",
            str(base),
            "http://deb.debian.org/debian",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        pytest.fail(f"debootstrap failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    (base / ".edged-complete").write_text("ok\n")
    return base, time.monotonic() - start


class Binfmt:
    """qemu-aarch64 registered in binfmt_misc with the F flag for the test's duration, and undone
    after: a registration the test found is left as it was (it is the host's); one without F (which a
    container cannot use) is switched off for the test and back on after."""

    def __init__(self) -> None:
        self.qemu = tool("qemu-aarch64-static")
        self.mounted = False
        self.registered: str | None = None
        self.disabled: list[Path] = []

    def __enter__(self) -> Binfmt:
        if os.geteuid() != 0:
            pytest.fail("registering qemu in binfmt_misc needs root")
        if not (BINFMT / "register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
            self.mounted = True
        for entry in BINFMT.iterdir():
            if entry.name in ("register", "status"):
                continue
            text = entry.read_text()
            if "magic 7f454c460201010000000000000000000200b700" not in text or "enabled" not in text:
                continue
            flags = next(
                (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags")), ""
            )
            if "F" in flags:
                return self  # the host's, usable as it is
            entry.write_text("0")  # the host's, without F: off while the test runs
            self.disabled.append(entry)
        name = "edged-test-aarch64"
        rule = f":{name}:M::{AARCH64_MAGIC}:{AARCH64_MASK}:{self.qemu}:FP"
        (BINFMT / "register").write_text(rule)
        self.registered = name
        return self

    def __exit__(self, *exc: object) -> None:
        if self.registered is not None:
            (BINFMT / self.registered).write_text("-1")
        for entry in self.disabled:
            entry.write_text("1")
        if self.mounted:
            subprocess.run(["umount", str(BINFMT)], check=False)


class Board:
    def __init__(
        self, root: Path, port: int, key: Path, proc: subprocess.Popen[bytes], log: Path, hostname: str
    ) -> None:
        self.root, self.port, self.key, self.proc, self.log = root, port, key, proc, log
        self.hostname = hostname

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

    def inventory_host(self) -> dict[str, object]:
        return {
            "ansible_host": "127.0.0.1",
            "ansible_port": self.port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": NO_HOST_KEYS,
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def playbook(
        self, group: str, extra: dict[str, object], tmp_path: Path, timeout: float, **ansible_env: str
    ) -> tuple[subprocess.CompletedProcess[str], float]:
        """deploy/ansible/site.yml applied over SSH to this board as the one host of ``group``, with
        ``extra`` as extra vars; returns the run and its seconds."""
        inventory = {"edged": {"children": {group: {"hosts": {self.hostname: self.inventory_host()}}}}}
        inv = tmp_path / "inventory.json"
        inv.write_text(json.dumps(inventory))
        env = clean_env(
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_HOME=str(tmp_path / "ansible-home"),
            ANSIBLE_HOST_KEY_CHECKING="False",
            PATH=f"{BIN}:{os.environ['PATH']}",
            **ansible_env,
        )
        start = time.monotonic()
        r = subprocess.run(
            [
                str(BIN / "ansible-playbook"),
                "-i",
                str(inv),
                str(ANSIBLE / "site.yml"),
                "-e",
                json.dumps(extra),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return r, time.monotonic() - start

    def recap(self, output: str) -> dict[str, int]:
        """This host's counts in the PLAY RECAP of ``output`` (ok, changed, failed, ...)."""
        match = re.search(rf"{re.escape(self.hostname)}\s+:\s+(.*)", output)
        assert match, output[-3000:]
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}

    def wait_active(self, unit: str, within_s: float, poll_s: float) -> tuple[str, str]:
        """Poll ``systemctl is-active`` until the unit is active or ``within_s`` passed; returns its
        last state and the end of its journal (for the failure message)."""
        deadline = time.monotonic() + within_s
        while True:
            state = self.ssh(f"systemctl is-active {unit}").stdout.strip()
            if state == "active" or time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        return state, self.ssh(f"journalctl -u {unit} --no-pager -n 60").stdout


@contextmanager
def booted(base: Path, work: Path, hostname: str = "board1", boot_s: float = 90) -> Iterator[Board]:
    """A copy of ``base`` booted with systemd-nspawn, its sshd on a free port of 127.0.0.1 with a new
    key; powered off after."""
    root = work / "root"
    subprocess.run(["cp", "-a", str(base), str(root)], check=True)
    key = work / "id_ed25519"
    subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    shutil.copy(f"{key}.pub", root / "root/.ssh/authorized_keys")
    port = free_port()
    (root / "etc/ssh/sshd_config.d/edged-test.conf").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n"
    )
    (root / "etc/hostname").write_text(f"{hostname}\n")
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
        deadline = time.monotonic() + boot_s
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"systemd-nspawn exited with {proc.returncode}:\n{tail}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"sshd in the container did not listen:\n{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
        yield Board(root, port, key, proc, log, hostname)
    finally:
        if proc.poll() is None:
            # Power off from inside: nspawn's own SIGTERM becomes SIGRTMIN+3 for the container's
            # systemd, which qemu-user does not deliver to an emulated systemd.
            with contextlib.suppress(subprocess.TimeoutExpired):
                Board(root, port, key, proc, log, hostname).ssh("systemctl poweroff", timeout=30)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log_file.close()
        reap(root)


def reap(root: Path) -> None:
    """Kill whatever still runs inside ``root`` (a container whose nspawn was killed leaves its init
    behind, in its own PID namespace)."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(pid_dir / "root") == str(root):
                os.kill(int(pid_dir.name), signal.SIGKILL)
