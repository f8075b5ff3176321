"""The socket API against the real daemon and the real embedded model."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import Daemon, chat, wait_until

pytestmark = pytest.mark.system

LONG = "Write a very long story about a robot who learns to paint, with many chapters."


def sse_chunks(response: httpx.Response) -> list[dict]:
    chunks = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            chunks.append({"done": True})
            break
        chunks.append(json.loads(data))
    return chunks


def test_chat_completion_has_usage_and_consistent_timings(http: httpx.Client) -> None:
    # ignore_eos: always 24 tokens, so every timing below is computed and checked (none is optional)
    r = http.post(
        "/v1/chat/completions",
        json=chat("What is the capital of France?", max_tokens=24, seed=1, ignore_eos=True),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert r.headers["x-edged-job-id"] == body["id"]
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] == "length"
    usage, t = body["usage"], body["timings"]
    assert usage["completion_tokens"] == 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert t["prompt_n"] + t["cache_n"] == usage["prompt_tokens"] > 5
    assert t["prompt_n"] >= 1, "the last prompt token is always evaluated"
    assert t["predicted_n"] == usage["completion_tokens"]
    assert t["prompt_ms"] > 0 and t["prompt_per_second"] > 0
    assert t["ttft_ms"] >= t["prompt_ms"]
    assert t["total_ms"] >= t["ttft_ms"] + t["predicted_ms"] - 1
    # decode speed: the 23 tokens after the first, over the time from the first to the last
    assert t["predicted_ms"] > 0
    assert t["predicted_per_second"] == pytest.approx(23 / (t["predicted_ms"] / 1000), rel=0.01)
    assert t["predicted_per_token_ms"] == pytest.approx(t["predicted_ms"] / 23, rel=0.01)
    assert t["s_per_1k_tokens"] == pytest.approx(1000 / t["predicted_per_second"], rel=0.01)


def test_stream_matches_non_stream_with_greedy_sampling(http: httpx.Client) -> None:
    body = chat("List three colours.", max_tokens=20, temperature=0)
    plain = http.post("/v1/chat/completions", json=body).json()
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(r)
    assert chunks[-1] == {"done": True}
    final = chunks[-2]
    assert final["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert final["usage"] == plain["usage"]
    assert set(final["timings"]) == set(plain["timings"])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    assert text == plain["choices"][0]["message"]["content"]
    assert len(chunks) > 5, "tokens must arrive as separate chunks"
    assert {c["id"] for c in chunks[:-1]} == {final["id"]}


def test_raw_completion_endpoint(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] <= 5, "a raw prompt gets no chat template"


def test_stop_string_ends_generation(http: httpx.Client) -> None:
    body = chat("Count from 1 to 20, separated by commas.", max_tokens=80, temperature=0)
    full = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert "5" in full
    cut = http.post("/v1/chat/completions", json={**body, "stop": ["5"]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == full[: full.index("5")]


def test_prompt_over_the_cap_is_rejected_with_token_counts(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat("hello world " * 1500, max_tokens=10))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert err["n_ctx"] == 2048
    assert err["n_prompt_tokens"] > 2048
    assert str(err["n_prompt_tokens"]) in err["message"]


def test_max_tokens_is_clamped_to_what_the_cap_leaves(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        json=chat("hello world " * 1000, max_tokens=500, ignore_eos=True, temperature=0),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 2048
    assert body["usage"]["completion_tokens"] == 2048 - body["usage"]["prompt_tokens"] < 500


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
        (b"not json at all", "malformed JSON"),
        (b'{"messages": "hi"}', "messages"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "lots"}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}', "frobnicate"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}', "exactly one"),
        (b"{}", "exactly one"),
        (b"[1, 2]", "body"),
    ],
)
def test_bad_input_gets_a_clear_400_and_the_daemon_keeps_serving(
    http: httpx.Client, payload: bytes, needle: str
) -> None:
    r = http.post("/v1/chat/completions", content=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert needle in err["message"]
    assert http.get("/health").status_code == 200


def test_curl_style_form_content_type_is_read_as_json(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        content=json.dumps(chat("hi", max_tokens=2)),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text


def test_oversized_body_is_413(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", content=json.dumps(chat("a" * 1_100_000)))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert http.get("/health").status_code == 200


def test_unknown_model_and_unknown_route(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat("hi", model="gpt-4"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    name = http.get("/v1/models").json()["data"][0]["id"]
    assert http.post("/v1/chat/completions", json=chat("hi", model=name, max_tokens=2)).status_code == 200
    r = http.get("/v2/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = http.post("/v1/jobs/no-such-job/cancel")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_models_health_status_and_openapi(http: httpx.Client, daemon: Daemon) -> None:
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    assert models["data"][0]["meta"]["n_ctx"] == 2048
    assert http.get("/health").json() == {"status": "ok"}
    status = http.get("/status").json()
    assert status["device_id"] == "test-device"
    assert status["board"]["profile"] == "generic"
    assert status["board"]["source"] == "none"
    assert status["backend"]["name"] == "llamacpp"
    assert status["backend"]["considered"][0]["available"] is True
    assert status["model"]["ctx"] == 2048
    assert status["engine"]["state"] == "ready"
    assert status["engine"]["queue"]["max_depth"] == 4
    assert "decode_tokens_per_s_p50" in status["engine"]["throughput"]["1m"]
    spec = http.get("/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    ref = body["schema"]["$ref"].rsplit("/", 1)[-1]
    assert "messages" in spec["components"]["schemas"][ref]["properties"]


def test_cancel_mid_stream_stops_within_a_token(http: httpx.Client) -> None:
    body = chat(LONG, max_tokens=400, ignore_eos=True, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        job_id = r.headers["x-edged-job-id"]
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
            if seen == 5:
                break
        cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200
        tokens_at_cancel = cancelled.json()["completion_tokens"]
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(rest[-1][6:])["error"]["code"] == "cancelled"
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "cancelled"
    assert job["completion_tokens"] - tokens_at_cancel <= 1, "generation must stop within one token"
    assert job["completion_tokens"] < 400


def left_running(http: httpx.Client, job_id: str, timeout: float = 10) -> dict:
    """The job once it is no longer queued or running; fails the test after ``timeout`` s."""
    job: dict = {}

    def settled() -> bool:
        job.update(http.get(f"/v1/jobs/{job_id}", timeout=5).json())
        return job["state"] not in ("queued", "running")

    wait_until(settled, timeout=timeout, what=f"job {job_id} leaving the running state")
    return job


def test_client_disconnect_cancels_the_job(http: httpx.Client, daemon: Daemon) -> None:
    with (
        daemon.client() as other,
        other.stream(
            "POST", "/v1/chat/completions", json=chat(LONG, max_tokens=400, ignore_eos=True, stream=True)
        ) as r,
    ):
        job_id = r.headers["x-edged-job-id"]
        next(r.iter_lines())
    job = left_running(http, job_id)
    assert job["state"] == "cancelled"
    assert job["completion_tokens"] < 400


def test_non_streaming_client_disconnect_cancels_too(http: httpx.Client, daemon: Daemon) -> None:
    with daemon.client(timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post(
            "/v1/chat/completions", json=chat(LONG, id="impatient-1", max_tokens=400, ignore_eos=True)
        )
    job = left_running(http, "impatient-1")
    assert job["state"] == "cancelled"
    assert job["completion_tokens"] < 400


def test_deadline_while_running_is_504(http: httpx.Client) -> None:
    started = time.monotonic()
    r = http.post("/v1/chat/completions", json=chat(LONG, max_tokens=1500, ignore_eos=True, timeout_s=0.5))
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 5


def test_queue_full_is_503_with_retry_after_and_deadline_in_queue(start_daemon) -> None:
    d = start_daemon(EDGED_QUEUE__MAX_DEPTH="1", EDGED_ENGINE__PARALLEL="1")
    results: dict[str, httpx.Response] = {}

    def post(name: str, body: dict) -> None:
        with d.client() as c:
            results[name] = c.post("/v1/chat/completions", json=body)

    with d.client(timeout=10) as c:
        running = threading.Thread(
            target=post, args=("running", chat(LONG, id="long-1", max_tokens=1500, ignore_eos=True))
        )
        running.start()
        # (or the request has already ended: then its answer is the failure to show)
        wait_until(
            lambda: c.get("/status").json()["engine"]["running"] or not running.is_alive(),
            what="a running job",
        )
        assert running.is_alive(), results["running"].text
        queued = threading.Thread(target=post, args=("queued", chat("hi", id="queued-1", timeout_s=1.0)))
        queued.start()
        wait_until(
            lambda: c.get("/status").json()["engine"]["queue"]["depth"] >= 1 or not queued.is_alive(),
            what="a queued job",
        )
        assert queued.is_alive(), results["queued"].text
        full = c.post("/v1/chat/completions", json=chat("hi"))
        assert full.status_code == 503
        assert full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        queued.join(10)
        assert not queued.is_alive(), "the queued job's 1 s deadline did not end it within 10 s"
        assert results["queued"].status_code == 504, "a queued job's deadline counts while it waits"
        assert results["queued"].json()["error"]["code"] == "deadline_exceeded"
        assert c.get("/v1/jobs/queued-1").json()["state"] == "failed"
        assert c.post("/v1/jobs/long-1/cancel").json()["state"] in ("running", "cancelled")
        running.join(10)
        assert not running.is_alive(), "the cancelled job did not end within 10 s"
        assert results["running"].status_code == 499
        assert results["running"].json()["error"]["code"] == "cancelled"
        assert c.get("/status").json()["engine"]["jobs"]["rejected"] == 1


def test_health_is_503_and_jobs_not_ready_while_the_model_loads(model_path) -> None:
    """The real app and engine before `Engine.start` has loaded the model (the state lasts ~0.2 s
    in a daemon on this model, too short to catch reliably over the socket)."""
    import asyncio
    from pathlib import Path

    from conftest import BOARDS

    from edged.backends import choose_backend
    from edged.board import detect_board
    from edged.config import load_settings
    from edged.engine import Engine
    from edged.transports.http.app import create_app

    settings = load_settings(
        None, {"model": {"path": str(model_path)}, "board": {"root": str(BOARDS / "x86")}}
    )
    board = detect_board(Path(BOARDS / "x86"))
    engine = Engine(settings, board, choose_backend(board, settings))

    async def probe() -> tuple[httpx.Response, httpx.Response]:
        app = create_app(settings, engine, lambda: {})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edged") as c:
            # A job sent while loading waits for the model within its own timeout, then not_ready.
            return await c.get("/health"), await c.post("/v1/chat/completions", json=chat("hi", timeout_s=1))

    try:
        health, job = asyncio.run(asyncio.wait_for(probe(), 30))
    except asyncio.TimeoutError:
        pytest.fail("no answer to /health and a job within 30 s while the model loads")
    assert health.status_code == 503
    assert health.json() == {"status": "loading"}
    assert job.status_code == 503
    assert job.json()["error"]["code"] == "not_ready"
    assert "still loading when the job's timeout (1 s) passed" in job.json()["error"]["message"]
    assert "retry-after" in job.headers


def test_openai_client_over_the_socket(daemon: Daemon) -> None:
    import httpx2
    import openai

    http_client = httpx2.Client(transport=httpx2.HTTPTransport(uds=str(daemon.socket)))
    client = openai.OpenAI(api_key="unused", base_url="http://edged/v1", http_client=http_client)
    with client:
        check_openai_client(client, openai)


def check_openai_client(client, openai) -> None:
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens <= 8
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": "x " * 3000}]
        )
    assert "context" in str(info.value)
