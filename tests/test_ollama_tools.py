"""Ollama's tools on the real daemon with the embedded SmolLM2 (the generic form: the whole answer is
one JSON object, calls or text, and the grammar makes any call well formed), through the official
`ollama` client (on the Unix socket through its httpx transport, and over TCP with a key, as Home
Assistant calls) and raw HTTP for the exact shape: ``tools`` always ``auto``, the calls in
``message.tool_calls`` with their arguments as objects, ``content`` empty and ``done_reason`` ``stop``;
streamed, the calls in one chunk before the done one; the round trip with a ``tool_name`` result; bad
tools refused in Ollama's error shape; ``/api/show`` listing ``tools``.

Every call is checked with the `jsonschema` package against the schema the client sent."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from conftest import Daemon
from mqtt_helpers import free_port

pytestmark = pytest.mark.system

TOOLS: list[dict[str, Any]] = [  # in the shape the ollama client keeps (it drops maxLength and the like)
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather now in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "HassTurnOn",
            "description": "Turns on a device",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string", "description": "The device"}},
                "required": ["name"],
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAME = "SmolLM2-135M-Instruct.Q4_1:latest"
ASK = [{"role": "user", "content": "Turn on the kitchen light."}]
"""A question SmolLM2 answers with a call at temperature 0."""
GREEDY = {"temperature": 0, "num_predict": 200}
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")
MARKUP = ("tool_calls", '"response"', "<tool_call>", "tool▁call")
KEY = "sk-edged-test-0123456789abcdef"


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[Any]:
    """The official client on the daemon's Unix socket (its kwargs go to httpx)."""
    import ollama

    with ollama.Client(host="http://edged", transport=httpx.HTTPTransport(uds=str(daemon.socket))) as c:
        yield c


def check_calls(message: Any) -> list[Any]:
    """The ollama client's message: calls, each of a tool offered, its arguments an object valid
    against the tool's schema, and no text beside them."""
    calls = list(message.tool_calls or [])
    assert calls, message
    for call in calls:
        assert call.function.name in SCHEMAS
        assert isinstance(call.function.arguments, dict), call
        jsonschema.validate(call.function.arguments, SCHEMAS[call.function.name])
    assert message.content == "", "no text beside these calls, and never markup"
    return calls


def check_raw_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The same on the wire, exactly Ollama's shape: ``{"id", "function": {"index", "name",
    "arguments"}}`` (no OpenAI ``type``, arguments an object, not JSON text)."""
    assert set(message) == {"role", "content", "tool_calls"} and message["content"] == ""
    calls = message["tool_calls"]
    for index, call in enumerate(calls):
        assert set(call) == {"id", "function"} and CALL_ID.fullmatch(call["id"]), call
        function = call["function"]
        assert set(function) == {"index", "name", "arguments"} and function["index"] == index
        assert isinstance(function["arguments"], dict)
        jsonschema.validate(function["arguments"], SCHEMAS[function["name"]])
    assert len({c["id"] for c in calls}) == len(calls), "every call its own id"
    return calls


def test_show_lists_the_tools_capability(client: Any) -> None:
    assert client.show(NAME).capabilities == ["completion", "tools"]  # SmolLM2's template does not think


def test_an_auto_call_comes_as_ollama_writes_it(client: Any, daemon: Daemon) -> None:
    reply = client.chat(model=NAME, messages=ASK, tools=TOOLS, options=GREEDY, stream=False)
    calls = check_calls(reply.message)
    assert reply.done and reply.done_reason == "stop" and reply.eval_count
    with daemon.client() as http:
        r = http.post(
            "/api/chat",
            json={"model": NAME, "messages": ASK, "tools": TOOLS, "options": GREEDY, "stream": False},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    raw = check_raw_calls(body["message"])
    assert (body["done"], body["done_reason"]) == (True, "stop")
    # The same tools both ways; not always the same arguments: the second request's prompt comes from
    # the prefix cache, and a near-tie can flip between batch shapes (README, "Determinism").
    assert [c["function"]["name"] for c in raw] == [c.function.name for c in calls]


def test_streamed_calls_come_whole_in_one_chunk_before_the_done_one(client: Any, daemon: Daemon) -> None:
    parts = list(client.chat(model=NAME, messages=ASK, tools=TOOLS, options=GREEDY, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].done_reason == "stop" and not parts[-1].message.tool_calls
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1 and with_calls[0] is parts[-2], "the calls come last, before done"
    check_calls(with_calls[0].message)
    assert "".join(p.message.content or "" for p in parts) == "", "no markup streamed as content"
    body = {"model": NAME, "messages": ASK, "tools": TOOLS, "options": GREEDY}  # stream: Ollama's default
    with daemon.client() as http, http.stream("POST", "/api/chat", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    check_raw_calls(lines[-2]["message"])
    assert lines[-1]["message"] == {"role": "assistant", "content": ""} and lines[-1]["done"]


def test_the_round_trip_the_model_answers_from_the_tool_s_result(client: Any) -> None:
    first = client.chat(model=NAME, messages=ASK, tools=TOOLS, options=GREEDY, stream=False)
    calls = check_calls(first.message)
    history = [
        *ASK,
        first.message,  # as Ollama's examples and agents send it back
        *({"role": "tool", "tool_name": c.function.name, "content": "The light is on."} for c in calls),
    ]
    again = client.chat(model=NAME, messages=history, tools=TOOLS, options=GREEDY, stream=False)
    if again.message.tool_calls:  # auto may call again: then validly
        check_calls(again.message)
    else:
        assert again.message.content and not again.message.content.lstrip().startswith("{")
        assert not any(m in again.message.content for m in MARKUP), again.message.content
    answer = client.chat(model=NAME, messages=history, options={**GREEDY, "num_predict": 40}, stream=False)
    assert not answer.message.tool_calls, "no tools offered: no calls"
    assert answer.message.content and answer.done_reason in ("stop", "length")
    assert not any(m in answer.message.content for m in MARKUP), answer.message.content


def test_a_bad_tool_is_a_400_in_ollama_s_error_shape(client: Any, daemon: Daemon) -> None:
    import ollama

    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=NAME, messages=ASK, tools=[{"type": "function", "function": {"name": "turn on"}}])
    assert info.value.status_code == 400 and "tools[0].function.name" in info.value.error
    earlier = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}
    bomb = {"type": "object", "properties": {"a": {"type": "array", "items": {}, "minItems": 10**7}}}
    with daemon.client() as http:
        r = http.post("/api/chat", json={"model": NAME, "messages": [*ASK, earlier], "tools": TOOLS})
        assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
        assert "messages.1.tool_calls.0.function.arguments" in r.json()["error"]
        tool = {"type": "function", "function": {"name": "f", "parameters": bomb}}
        r = http.post("/api/chat", json={"model": NAME, "messages": ASK, "tools": [tool], "stream": True})
        assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
        assert "tools[0].function.parameters.properties.a.minItems" in r.json()["error"]


def test_home_assistant_s_way_the_keyed_client_over_tcp(start_daemon: Any) -> None:
    import ollama

    port = free_port()
    start_daemon(EDGED_HTTP__LISTEN=f"127.0.0.1:{port}", EDGED_HTTP__API_KEYS=json.dumps({"ha": KEY}))
    with ollama.Client(host=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}) as c:
        assert "tools" in (c.show(NAME).capabilities or [])
        reply = c.chat(model=NAME, messages=ASK, tools=TOOLS, options=GREEDY, stream=False)
        check_calls(reply.message)
        assert reply.done_reason == "stop"
