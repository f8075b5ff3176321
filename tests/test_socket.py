"""The Unix socket itself: permissions, a stale file, a live daemon, clean shutdown."""

from __future__ import annotations

import json
import os
import socket
import stat
import time

import pytest
from conftest import Daemon, wait_until

pytestmark = pytest.mark.system


def test_default_mode_is_0660_and_shutdown_removes_the_socket(daemon: Daemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    assert daemon.socket.is_socket()


def test_custom_mode(start_daemon) -> None:
    d = start_daemon(EDGED_SOCKET__MODE="0600")
    assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600
    assert d.stop() == 0
    assert not d.socket.exists(), "a clean stop removes the socket file"


def test_stale_socket_is_replaced(start_daemon, tmp_path) -> None:
    d = start_daemon(wait=False)
    d.stop()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(d.socket))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves behind
    assert d.socket.is_socket()
    again = Daemon(d.workdir, EDGED_QUEUE__MAX_DEPTH="1")
    again.socket = d.socket
    again.env["EDGED_SOCKET__PATH"] = str(d.socket)
    again.start()
    try:
        again.wait_ready()
        assert "replacing stale socket" in again.log()
    finally:
        assert again.stop() == 0


def test_live_socket_makes_a_second_daemon_fail(start_daemon) -> None:
    first = start_daemon()
    second = Daemon(first.workdir / "second", EDGED_QUEUE__MAX_DEPTH="1")
    second.workdir.mkdir()
    second.socket = first.socket
    second.env["EDGED_SOCKET__PATH"] = str(first.socket)
    second.start()
    assert second.proc is not None
    deadline = time.monotonic() + 30
    while second.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.proc.returncode == 1
    assert "already listening" in second.log()
    second.stop()
    with first.client() as c:
        assert c.get("/health").status_code == 200, "the first daemon is untouched"


def test_a_regular_file_in_the_way_is_not_deleted(start_daemon, tmp_path) -> None:
    d = start_daemon(wait=False)
    d.stop()
    d.socket.write_text("precious")
    again = Daemon(d.workdir, EDGED_QUEUE__MAX_DEPTH="1")
    again.socket = d.socket
    again.env["EDGED_SOCKET__PATH"] = str(d.socket)
    again.start()
    assert again.proc is not None
    assert again.proc.wait(30) == 1
    assert "is not a socket" in again.log()
    assert d.socket.read_text() == "precious"
    again.stop()


def test_each_job_logs_the_peer_process(daemon: Daemon) -> None:
    """SO_PEERCRED: the job's log line names the local process that sent it (this test's)."""
    with daemon.client() as c:
        r = c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        )
    assert r.status_code == 200
    job_id = r.headers["x-edged-job-id"]

    def finished() -> list[dict]:
        lines = [json.loads(line) for line in daemon.log().splitlines() if job_id in line]
        return [e for e in lines if e.get("event") == "job finished"]

    wait_until(lambda: finished(), 10, "the job's log line")
    assert finished()[0]["peer"] == f"pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}"
    assert finished()[0]["origin"] == "socket"
