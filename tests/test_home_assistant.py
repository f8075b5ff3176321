"""Home Assistant's Assist through its Ollama integration (issue 23): the request it sends (system
prompt with 30 exposed entities, the Assist tools, 20 earlier rounds, ``num_ctx`` 8192 — see
tests/home_assistant.py) is over edged's 2048-token cap; Ollama's routes trim the oldest rounds by
default, so it is answered, within the cap, and a call the model makes is a well-formed Assist call.
Real daemon, real model (the embedded SmolLM2: the generic form, whose grammar makes every call valid),
the official ``ollama`` client over TCP with a key, streaming, as the integration calls it."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import pytest
from conftest import Daemon
from home_assistant import SCHEMAS, TOOLS, chat_request, history, system_prompt
from mqtt_helpers import free_port

pytestmark = pytest.mark.system

KEY = "sk-home-assistant-0123456789abcdef"
CAP = 2048


def serve(start_daemon: Any, **env: str) -> tuple[Daemon, str]:
    port = free_port()
    d = start_daemon(EDGED_HTTP__LISTEN=f"127.0.0.1:{port}", EDGED_HTTP__API_KEYS=f'{{"ha": "{KEY}"}}', **env)
    return d, f"http://127.0.0.1:{port}"


@pytest.fixture
def lan(start_daemon: Any) -> tuple[Daemon, str]:
    return serve(start_daemon)


def keyed(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)


def model_of(c: httpx.Client) -> str:
    return str(c.get("/api/tags").json()["models"][0]["model"])


def test_the_assist_request_is_over_the_cap_as_sent(start_daemon: Any) -> None:
    """The fixture is what it claims: with Ollama's routes set to ``context_overflow = "error"`` the
    request does not fit."""
    _, base = serve(start_daemon, EDGED_JOBS__CONTEXT_OVERFLOW__OLLAMA="error")
    with keyed(base) as c:
        r = c.post("/api/chat", json=dict(chat_request(), model=model_of(c), stream=False))
    assert r.status_code == 400, r.text
    assert "context" in r.json()["error"], r.text


def test_assist_through_the_ollama_client_is_answered_within_the_cap(lan: tuple[Daemon, str]) -> None:
    import ollama

    _, base = lan
    client = ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    try:
        name = client.list().models[0].model
        body = chat_request()
        calls: list[Any] = []
        content = ""
        last: Any = None
        for part in client.chat(
            model=name,
            messages=body["messages"],
            tools=TOOLS,
            stream=True,
            keep_alive=-1,
            options={**body["options"], "temperature": 0},  # HA sends none; greedy: the same answer each run
        ):
            calls += part.message.tool_calls or []
            content += part.message.content or ""
            last = part
    finally:
        client._client.close()
    assert last is not None and last.done, "the stream ended with its done message"
    assert last.prompt_eval_count is not None and last.prompt_eval_count + (last.eval_count or 0) <= CAP
    assert calls or content.strip(), "an answer: a call or text"
    assert "tool_call" not in content and '"response"' not in content, content
    for call in calls:  # every call the model makes is an Assist call the integration can run
        assert call.function.name in SCHEMAS, call
        assert isinstance(call.function.arguments, dict)
        jsonschema.validate(dict(call.function.arguments), SCHEMAS[call.function.name])


def test_the_trimmed_request_keeps_the_system_prompt_tools_and_question(lan: tuple[Daemon, str]) -> None:
    """Trimming drops whole rounds, oldest first, and says how many messages went: the answer's
    header and timings agree, and fewer rounds than sent were kept."""
    _, base = lan
    body = dict(chat_request("Turn on the kitchen light."), stream=False)
    body["options"] = dict(body["options"], num_predict=300, temperature=0)
    with keyed(base) as c:
        r = c.post("/api/chat", json=dict(body, model=model_of(c)))
    assert r.status_code == 200, r.text
    dropped = int(r.headers["x-edged-trimmed-messages"])
    sent_history = len(history())
    assert 0 < dropped <= sent_history, dropped
    answer = r.json()
    assert answer["prompt_eval_count"] + answer["eval_count"] <= CAP
    assert system_prompt() and answer["message"]["role"] == "assistant"
    for call in answer["message"].get("tool_calls") or []:
        jsonschema.validate(call["function"]["arguments"], SCHEMAS[call["function"]["name"]])
