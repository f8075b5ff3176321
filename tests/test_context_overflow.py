"""``context_overflow`` on the real daemon with the embedded SmolLM2: a long
conversation, as Home Assistant's chat sends one (its system prompt with the exposed entities, then
the earlier turns), is refused with ``context_length_exceeded`` under ``error`` and answered from its
newest turns under ``trim_history`` - the default of Ollama's routes, as Ollama itself behaves -
saying how many messages went (``timings.trimmed_messages`` and the ``X-Edged-Trimmed-Messages``
header, streamed or not). How many is checked through the daemon's own counts: the answer's prompt
is exactly the system prompt and the messages after the dropped ones, it leaves the room asked for,
and keeping one turn more would not have. MQTT jobs carry the option in the job schema and the count
in the done message's timings; the per-API defaults are configuration.

The daemons here run with a 1024-token context (``model.ctx``): the same behaviour as at edged's cap
of 2048, at half the prefill of every prompt that fills it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, wait_until
from mqtt_helpers import Broker, Probe

pytestmark = pytest.mark.system

CTX = "1024"
HEADER = "x-edged-trimmed-messages"
ANSWER = 8
"""max_tokens of every request here: the room the answer asks for."""


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[httpx.Client]:
    """A daemon on the embedded model with a 1024-token context and the default configuration."""
    d = Daemon(tmp_path_factory.mktemp("overflow"), EDGED_MODEL__CTX=CTX).start()
    d.wait_ready()
    try:
        with d.client(timeout=300) as c:
            assert n_ctx(c) == int(CTX)
            yield c
    finally:
        assert d.stop() == 0, d.log()


def system_prompt(entities: int = 12) -> str:
    """Home Assistant's Assist prompt, shortened: instructions, then the exposed entities."""
    lines = [
        "You are a voice assistant for Home Assistant. Answer questions about the world truthfully. "
        "Answer in plain text. Keep it simple and to the point.",
        "An overview of the areas and the devices in this smart home:",
    ]
    for i in range(entities):
        lines.append(f"- names: Lamp {i}\n  domain: light\n  state: 'off'\n  areas: Room {i % 7}")
    return "\n".join(lines)


def conversation(turns: int, *, system: str | None = None, calls: bool = False) -> list[dict[str, Any]]:
    """The system prompt, ``turns`` earlier turns (with ``calls``, each also a call and its result),
    then the question being asked."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system or system_prompt()}]
    for i in range(turns):
        out.append({"role": "user", "content": f"Question {i}: is lamp {i} in room {i % 7} on right now?"})
        if calls:
            call = {"id": f"call_{i}", "type": "function", "function": {"name": "GetLiveContext"}}
            call["function"]["arguments"] = "{}"
            out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            out.append({"role": "tool", "tool_call_id": f"call_{i}", "content": f'{{"lamp {i}": "off"}}'})
        out.append(
            {
                "role": "assistant",
                "content": f"Lamp {i} in room {i % 7} is off at the moment; the other lamps there are "
                "off too, and nothing in that room has changed since this morning.",
            }
        )
    out.append({"role": "user", "content": "And which lamps are on in the kitchen?"})
    return out


def n_ctx(c: httpx.Client) -> int:
    return int(c.get("/v1/models").json()["data"][0]["meta"]["n_ctx"])


def openai(c: httpx.Client, messages: list[dict[str, Any]], **fields: Any) -> httpx.Response:
    body = {"messages": messages, "max_tokens": ANSWER, "temperature": 0, **fields}
    return c.post("/v1/chat/completions", json=body)


def prompt_tokens(c: httpx.Client, messages: list[dict[str, Any]]) -> int | None:
    """The daemon's count of these messages' prompt (None: it alone fills the context)."""
    r = openai(c, messages, max_tokens=1, context_overflow="error")
    if r.status_code == 400:
        assert r.json()["error"]["code"] == "context_length_exceeded", r.text
        return None
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens"])


def check_dropped(
    c: httpx.Client, messages: list[dict[str, Any]], dropped: int, used: int, *, fewest: bool = False
) -> None:
    """The answer read exactly the system prompt and the messages after the ``dropped`` oldest,
    leaving the room asked for; ``fewest``: one turn more would not have left it (a prompt the
    prefix cache does not hold: a whole prefill, slow on a loaded machine, so asked once)."""
    window = n_ctx(c)
    assert dropped > 0 and messages[1 + dropped]["role"] == "user", "whole turns only"
    assert prompt_tokens(c, messages[:1] + messages[1 + dropped :]) == used, "exactly these messages"
    assert used + ANSWER <= window
    if not fewest:
        return
    previous = max(i for i in range(1, 1 + dropped) if messages[i]["role"] == "user")
    more = prompt_tokens(c, messages[:1] + messages[previous:])
    assert more is None or more + ANSWER > window, (more, window)


def test_a_long_chat_is_refused_under_error_and_trimmed_under_trim_history(http: httpx.Client) -> None:
    messages = conversation(15)
    r = openai(http, messages)  # OpenAI's routes default to error
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert r.json()["error"]["param"] == "messages" and HEADER not in r.headers
    r = openai(http, messages, context_overflow="trim_history")
    assert r.status_code == 200, r.text
    body = r.json()
    dropped = body["timings"]["trimmed_messages"]
    assert r.headers[HEADER] == str(dropped)
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    check_dropped(http, messages, dropped, body["usage"]["prompt_tokens"], fewest=True)

    short = openai(http, conversation(2), context_overflow="trim_history")
    assert short.status_code == 200 and HEADER not in short.headers, "nothing to drop: no header"
    assert short.json()["timings"]["trimmed_messages"] == 0


def test_a_streamed_trimmed_answer_has_the_header_before_its_first_chunk(http: httpx.Client) -> None:
    messages = conversation(15)
    body = {"messages": messages, "max_tokens": ANSWER, "stream": True, "context_overflow": "trim_history"}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        header = r.headers[HEADER]
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["timings"]["trimmed_messages"] == int(header) > 0
    check_dropped(http, messages, int(header), chunks[-1]["usage"]["prompt_tokens"])


def test_a_call_and_its_result_go_with_their_turn(http: httpx.Client) -> None:
    messages = conversation(10, calls=True)
    r = openai(http, messages, context_overflow="trim_history")
    assert r.status_code == 200, r.text
    dropped = r.json()["timings"]["trimmed_messages"]
    assert dropped % 4 == 0, "user, call, result, answer: whole turns"
    check_dropped(http, messages, dropped, r.json()["usage"]["prompt_tokens"])


def test_ollamas_chat_trims_by_default_streamed_or_not(http: httpx.Client) -> None:
    """Home Assistant's Ollama integration: ``/api/chat`` over the cap answers from the newest turns
    (Ollama's answer has no timings: the header says how many went)."""
    messages = conversation(15)
    body = {"model": "smollm2", "messages": messages, "options": {"num_predict": ANSWER}, "stream": False}
    body["model"] = http.get("/api/tags").json()["models"][0]["name"]
    r = http.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    dropped = int(r.headers[HEADER])
    check_dropped(http, messages, dropped, r.json()["prompt_eval_count"])
    with http.stream("POST", "/api/chat", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers[HEADER] == str(dropped)
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] and lines[-1]["prompt_eval_count"] <= n_ctx(http) - ANSWER


def test_a_system_prompt_and_last_turn_over_the_context_are_refused_even_with_trim(
    http: httpx.Client,
) -> None:
    messages = conversation(3, system=system_prompt(entities=60))
    r = openai(http, messages, context_overflow="trim_history")
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "6 older messages dropped" in r.json()["error"]["message"]
    assert r.json()["error"]["n_prompt_tokens"] >= n_ctx(http)
    model = http.get("/api/tags").json()["models"][0]["name"]
    r = http.post("/api/chat", json={"model": model, "messages": messages, "stream": False})
    assert r.status_code == 400 and "context window" in r.json()["error"], r.text


def test_mqtt_jobs_take_the_option_and_the_defaults_are_configuration(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Over MQTT (default error) a job asks for trim_history in the job schema and its done message's
    timings say how many went; the per-API defaults come from jobs.context_overflow."""
    broker = Broker(tmp_path / "broker").start()
    try:
        d = start_daemon(
            EDGED_MODEL__CTX=CTX,
            EDGED_MQTT__HOST="127.0.0.1",
            EDGED_MQTT__PORT=str(broker.port),
            EDGED_DEVICE_ID="house",
            EDGED_JOBS__CONTEXT_OVERFLOW__OPENAI="trim_history",
            EDGED_JOBS__CONTEXT_OVERFLOW__OLLAMA="error",
        )
        messages = conversation(15)
        with d.client() as c:
            wait_until(lambda: (c.get("/status").json()["mqtt"] or {}).get("connected"), 20, "connected")
            r = openai(c, messages)
            assert r.status_code == 200 and int(r.headers[HEADER]) > 0, "openai: trim_history configured"
            openai_dropped = r.json()["timings"]["trimmed_messages"]
            model = c.get("/api/tags").json()["models"][0]["name"]
            r = c.post("/api/chat", json={"model": model, "messages": messages, "stream": False})
            assert r.status_code == 400 and "context window" in r.json()["error"], "ollama: error configured"
        probe = Probe(broker.port)
        try:
            probe.subscribe("house/answers")
            job = {"messages": messages, "max_tokens": ANSWER, "temperature": 0}
            probe.publish("edged/house/jobs", {**job, "id": "long-1"}, response_topic="house/answers")
            _, refused = probe.until_final(90)
            probe.publish(
                "edged/house/jobs",
                {**job, "id": "long-2", "context_overflow": "trim_history"},
                response_topic="house/answers",
            )
            _, done = probe.until_final(90)
        finally:
            probe.close()
    finally:
        broker.stop()
    assert refused["status"] == "error" and refused["error"]["code"] == "context_length_exceeded", refused
    assert done["status"] == "done", done
    assert done["timings"]["trimmed_messages"] == openai_dropped > 0, "the same messages go either way"
