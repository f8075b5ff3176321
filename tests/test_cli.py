"""The `edged` CLI against the real daemon: ask, status, exit codes."""

from __future__ import annotations

import json
import re

import pytest
from conftest import Daemon, run_edged

pytestmark = pytest.mark.system


def test_ask_streams_and_prints_a_stats_line(daemon: Daemon) -> None:
    r = run_edged("ask", "--socket", str(daemon.socket), "--max-tokens", "16", "What is 2 + 2?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    stats = r.stderr.strip().splitlines()[-1]
    assert re.search(
        r"\d+ prompt \+ \d+ generated tokens · TTFT \d+ ms · prefill [\d.]+ tok/s · decode "
        r"[\d.-]+ ?tok/s · [\d.-]+ ?s per 1k tokens · finish (stop|length)",
        stats,
    ), stats


def test_ask_json_and_stdin(daemon: Daemon) -> None:
    r = run_edged("ask", "--socket", str(daemon.socket), "--json", "--max-tokens", "4", "-", input="Say hi.")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["usage"]["completion_tokens"] <= 4
    assert "timings" in body


def test_ask_error_from_the_daemon_exits_1(daemon: Daemon) -> None:
    r = run_edged("ask", "--socket", str(daemon.socket), "word " * 3000)
    assert r.returncode == 1
    assert "context_length_exceeded" in r.stderr


def test_no_daemon_exits_3(tmp_path) -> None:
    r = run_edged("ask", "--socket", str(tmp_path / "none.sock"), "hi")
    assert r.returncode == 3
    assert "is edged running? no socket at" in r.stderr
    assert run_edged("status", "--socket", str(tmp_path / "none.sock")).returncode == 3


def test_usage_errors_exit_2() -> None:
    assert run_edged("ask").returncode == 2
    assert run_edged("frobnicate").returncode == 2
    assert run_edged("ask", "--max-tokens", "0", "hi").returncode == 2


def test_status_table_and_json(daemon: Daemon) -> None:
    r = run_edged("status", "--socket", str(daemon.socket), "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["engine"]["state"] == "ready"
    r = run_edged("status", "--socket", str(daemon.socket))
    assert r.returncode == 0
    assert "llamacpp" in r.stdout and "generic" in r.stdout and "s per 1k tokens" in r.stdout


def test_help_teaches() -> None:
    r = run_edged("--help")
    assert r.returncode == 0
    for word in ("serve", "ask", "status", "board", "config", "EDGED_"):
        assert word in r.stdout
    assert "--max-tokens" in run_edged("ask", "--help").stdout
