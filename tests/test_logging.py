"""One JSON log line per finished job with its metrics; prompts and outputs only with log.content."""

from __future__ import annotations

import json

import pytest
from conftest import Daemon, chat

pytestmark = pytest.mark.system

SECRET = "the-launch-code-is-4711"


def job_lines(d: Daemon, job_id: str) -> list[dict]:
    lines = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == "job finished" and e.get("job_id") == job_id]


def test_one_line_per_job_without_content(daemon: Daemon, http) -> None:
    r = http.post("/v1/chat/completions", json=chat(f"Repeat: {SECRET}", id="log-1", max_tokens=8))
    assert r.status_code == 200
    [line] = job_lines(daemon, "log-1")
    assert line["state"] == "done"
    assert line["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    for key in ("prompt_tokens", "ttft_ms", "prompt_per_second", "predicted_per_second", "s_per_1k_tokens"):
        assert key in line
    assert SECRET not in daemon.log()


def test_content_is_logged_only_when_asked(start_daemon) -> None:
    d = start_daemon(EDGED_LOG__CONTENT="true")
    with d.client() as c:
        assert c.post(
            "/v1/chat/completions", json=chat(f"Repeat: {SECRET}", id="log-2", max_tokens=4)
        ).is_success
    [line] = job_lines(d, "log-2")
    assert SECRET in line["prompt"]
    assert "content" in line
