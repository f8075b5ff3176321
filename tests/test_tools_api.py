"""Tool calls on the real daemon over its Unix socket, with the embedded SmolLM2 (the generic form: the
whole answer is one JSON object, the calls or a text response, forced by a grammar), through the
official `openai` client (strict `pydantic_function_tool` tools too) and raw HTTP: required, named,
none and auto; streamed (calls in pieces, as
llama-server streams them; a call invalid at the end fails the stream); the round trip with
a tool's result; bad tools refused naming the field; and a job with tools over MQTT (`mosquitto_pub`),
whose final message carries the calls. On the R1-shaped model: a forced call in R1's markup after free
reasoning.

Every call is checked with the `jsonschema` package against the schema the client sent, independently
of edged's own check."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from conftest import Daemon, chat, wait_until
from mqtt_helpers import Broker, Probe

from edged.tools.spec import call_ids_for

pytestmark = pytest.mark.system

TOOLS: list[dict[str, Any]] = [  # every string bounded: a call ends within max_tokens even at temperature 1
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather now at a place.",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "maxLength": 24},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "HassTurnOn",
            "description": "Turns on/opens/presses a device or entity",
            "parameters": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "area": {"type": "string", "maxLength": 16},
                    "brightness": {"type": "integer"},
                },
                "required": ["name"],
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MODEL = "SmolLM2-135M-Instruct.Q4_1"
QUESTION = "Turn on the kitchen light, and what is the weather in Paris?"
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")
MARKUP = ("tool_calls", '"response"', "<tool_call>", "tool▁call")


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[Any]:
    import httpx2
    import openai

    transport = httpx2.HTTPTransport(uds=str(daemon.socket))
    with openai.OpenAI(
        base_url="http://edged/v1",
        api_key="unused",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    ) as c:
        yield c


def check_calls(message: Any, allowed: set[str]) -> list[Any]:
    """The message's calls, each well formed and valid against its tool's schema."""
    calls = message.tool_calls or []
    assert calls, message
    for call in calls:
        assert CALL_ID.fullmatch(call.id), call.id
        assert call.type == "function" and call.function.name in allowed
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls), "every call its own id"
    assert not message.content, "no text beside the calls here, and never markup"
    return calls


def test_required_calls_are_valid_against_their_schemas_at_temperature_one(client: Any) -> None:
    for seed in range(4):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert len(check_calls(choice.message, set(SCHEMAS))) == 1, "parallel_tool_calls false: one call"


def test_a_named_tool_is_the_one_called(client: Any) -> None:
    for seed in (11, 12):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "HassTurnOn"}},
            temperature=1.0,
            seed=seed,
            max_tokens=300,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert {c.function.name for c in check_calls(choice.message, {"HassTurnOn"})} == {"HassTurnOn"}


def test_strict_pydantic_function_tools_parse_into_their_models(client: Any) -> None:
    """OpenAI's ``pydantic_function_tool`` (``strict: true``, ``additionalProperties: false``), read
    back by ``client.chat.completions.parse`` into ``parsed_arguments``: at temperature 1.0, each
    call is an instance of the model the client declared."""
    from typing import Literal

    import openai
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """The weather now at a place."""

        location: str = Field(max_length=40, description="A city")
        unit: Literal["celsius", "fahrenheit"]

    class TurnOn(BaseModel):
        """Turns a device on."""

        name: str = Field(max_length=40)

    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(TurnOn)]
    assert all(t["function"].get("strict") for t in tools)
    for seed in (1, 2):
        reply = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            tools=tools,
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            model = {"GetWeather": GetWeather, "TurnOn": TurnOn}[call.function.name]
            assert isinstance(call.function.parsed_arguments, model), call


def test_parallel_calls_each_validate(client: Any) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=400,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    check_calls(reply.choices[0].message, set(SCHEMAS))


def test_tool_choice_none_answers_in_text(client: Any) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=24,
    )
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert choice.message.content and not choice.message.content.lstrip().startswith("{")


def test_auto_answers_with_valid_calls_or_plain_text(daemon: Daemon) -> None:
    """Greedy, so each question has one answer: a call (validated) or text without the JSON envelope."""
    kinds = set()
    with daemon.client() as c:
        for question in (QUESTION, "Say hello to Ann.", "What is the weather in Oslo, in celsius?"):
            r = c.post(
                "/v1/chat/completions", json=chat(question, tools=TOOLS, temperature=0, max_tokens=300)
            )
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            message = choice["message"]
            if message.get("tool_calls"):
                kinds.add("calls")
                assert choice["finish_reason"] == "tool_calls" and message["content"] is None
                for call in message["tool_calls"]:
                    jsonschema.validate(
                        json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]]
                    )
            else:
                kinds.add("text")  # SmolLM2 may say one sentence over and over: cut at max_tokens
                assert choice["finish_reason"] in ("stop", "length") and "tool_calls" not in message
                assert isinstance(message["content"], str)
                assert not any(m in message["content"] for m in MARKUP), message["content"]
    assert kinds, "each answer was one of the two"


def test_a_text_answer_cut_at_max_tokens_is_text_not_an_invalid_call(daemon: Daemon) -> None:
    """`auto` and a short max_tokens: a text answer ends where it was cut (finish_reason "length"),
    as without tools; only a call cut in half is `invalid_output`."""
    with daemon.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json=chat("Say hello to Ann.", tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=10),
        )
    if r.status_code == 422:  # the model chose to call: then the call is what was cut
        error = r.json()["error"]
        assert error["code"] == "invalid_output" and "tool call" in error["message"]
        assert "tool_call" in error["content"], error["content"]
        return
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    content = choice["message"]["content"]
    assert content and not content.lstrip().startswith("{") and '"response"' not in content, content


def joined_calls(chunks: list[Any]) -> list[dict[str, Any]]:
    """Streamed call pieces put together as OpenAI's clients do: per ``index``, the first piece with
    the id, type and name, the next ones with arguments text only."""
    calls: list[dict[str, Any]] = []
    for piece in (t for c in chunks for t in (c.choices[0].delta.tool_calls or [])):
        if piece.index == len(calls):
            assert CALL_ID.fullmatch(piece.id or "") and piece.type == "function" and piece.function.name
            calls.append({"id": piece.id, "name": piece.function.name, "arguments": ""})
        else:
            assert piece.index == len(calls) - 1, "one call at a time, in order"
            assert piece.id is None and piece.type is None and piece.function.name is None
        calls[piece.index]["arguments"] += piece.function.arguments or ""
    return calls


@pytest.mark.parametrize("parallel", [False, True], ids=["one", "parallel"])
def test_streamed_calls_come_in_pieces_equal_to_the_whole_answer(client: Any, parallel: bool) -> None:
    """As llama-server streams them: a call's first piece carries its index, id and name, the next
    ones its arguments as they are written, before the last chunk. Greedy, the answer without
    ``stream`` is the same: the pieces join into its validated calls. Each job's ids are the ones its
    job id gives its calls (`call_ids_for`, as in a final message)."""
    ask = dict(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=parallel,
        temperature=0,
        max_tokens=400,
    )
    whole = client.chat.completions.create(**ask, extra_body={"id": f"whole-{parallel}"}).choices[0]
    ids = call_ids_for(f"whole-{parallel}")
    calls = check_calls(whole.message, set(SCHEMAS))
    assert [c.id for c in calls] == [ids(i) for i in range(len(calls))]
    expected = [{"name": c.function.name, "arguments": c.function.arguments} for c in calls]
    stream = client.chat.completions.create(**ask, stream=True, extra_body={"id": f"pieces-{parallel}"})
    chunks = [chunk for chunk in stream if chunk.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "", "no markup streamed as content"
    streamed = joined_calls(chunks)
    ids = call_ids_for(f"pieces-{parallel}")
    assert [c.pop("id") for c in streamed] == [ids(i) for i in range(len(streamed))]
    assert streamed == expected
    with_pieces = [i for i, c in enumerate(chunks) if c.choices[0].delta.tool_calls]
    assert len(with_pieces) > len(calls), "arguments streamed in pieces, not whole"
    assert with_pieces[-1] < len(chunks) - 1 and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_streamed_call_invalid_at_the_end_ends_the_stream_with_the_error(daemon: Daemon) -> None:
    """The grammar makes a call well formed, not valid: ``multipleOf`` is beyond it. Its pieces
    stream as they come; checked when the answer is complete, the call fails its schema and the
    stream ends with the error event (``invalid_output``), no last chunk, no ``[DONE]``."""
    tool = {
        "type": "function",
        "function": {
            "name": "set_level",
            "parameters": {
                "type": "object",
                "properties": {"level": {"type": "integer", "minimum": 1, "maximum": 9, "multipleOf": 10}},
                "required": ["level"],
                "additionalProperties": False,
            },
        },
    }
    body = chat(QUESTION, tools=[tool], tool_choice="required", temperature=0, max_tokens=100, stream=True)
    with daemon.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line) for line in lines]
    pieces = [t for e in events if "choices" in e for t in e["choices"][0]["delta"].get("tool_calls", [])]
    assert pieces and pieces[0]["function"]["name"] == "set_level", events
    assert "choices" not in events[-1] and events[-1]["error"]["code"] == "invalid_output", events[-1]
    assert "set_level" in events[-1]["error"]["message"]
    assert not any(e["choices"][0]["finish_reason"] for e in events if "choices" in e)


def test_a_streamed_text_answer_comes_without_the_envelope(daemon: Daemon) -> None:
    """The generic form's ``{"response": "..."}`` streams as the text alone, piece by piece."""
    body = chat(
        "Say hello to Ann.", tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=300, stream=True
    )
    plain = dict(body, stream=False)
    with daemon.client() as c:
        whole = c.post("/v1/chat/completions", json=plain).json()["choices"][0]
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    streamed = "".join(d.get("content") or "" for d in deltas)
    calls: list[dict[str, str]] = []  # the pieces joined per call
    for piece in (t for d in deltas for t in d.get("tool_calls", [])):
        if piece["index"] == len(calls):
            calls.append({"name": piece["function"]["name"], "arguments": ""})
        calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
    if whole["message"].get("tool_calls"):  # greedy: the same answer both ways
        assert calls == [c["function"] for c in whole["message"]["tool_calls"]]
    else:
        assert streamed == whole["message"]["content"] and not calls
        assert len([d for d in deltas if d.get("content")]) > 1, "streamed in pieces, not at the end"
    assert not any(m in streamed for m in MARKUP)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_the_round_trip_the_model_answers_from_the_tool_s_result(client: Any) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.chat.completions.create(
        model=MODEL,
        messages=[question],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=200,
    )
    call = check_calls(first.choices[0].message, {"get_weather"})[0]
    history = [
        question,
        first.choices[0].message.model_dump(exclude_none=True),  # as agents send it back
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    for choice in ("none", "auto"):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=history,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=300,
        )
        message = reply.choices[0].message
        if message.tool_calls:  # auto may call again: then validly
            check_calls(message, set(SCHEMAS))
        else:
            assert message.content and not any(m in message.content for m in MARKUP), message.content
    legacy = client.chat.completions.create(  # the deprecated functions and function role
        model=MODEL,
        messages=[
            question,
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": "{}"},
            },
            {"role": "function", "name": "get_weather", "content": "21 C"},
        ],
        functions=[t["function"] for t in TOOLS],
        function_call="none",
        temperature=0,
        max_tokens=16,
    )
    assert legacy.choices[0].message.content


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "turn on"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters",
        ),
        ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
    ],
)
def test_bad_tools_are_invalid_requests_naming_the_field(
    http: httpx.Client, fields: dict[str, Any], param: str
) -> None:
    r = http.post("/v1/chat/completions", json=chat("hi", max_tokens=4, **fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", param), error


def test_the_openai_client_sees_a_bad_tool_as_a_bad_request(client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "bad name!"}}],
        )
    assert info.value.status_code == 400 and "tools[0].function.name" in str(info.value)


def test_an_mqtt_job_with_tools_gets_its_calls_in_the_done_message(start_daemon: Any, tmp_path: Path) -> None:
    """The job schema is every transport's: ``mosquitto_pub`` a job with tools, the final message
    carries ``tool_calls`` (and ``finish_reason: tool_calls``) beside an empty ``content``."""
    broker = Broker(tmp_path / "broker").start()
    try:
        d = start_daemon(
            EDGED_MQTT__HOST="127.0.0.1", EDGED_MQTT__PORT=str(broker.port), EDGED_DEVICE_ID="house"
        )
        with d.client() as c:
            wait_until(lambda: (c.get("/status").json()["mqtt"] or {}).get("connected"), 20, "connected")
        probe = Probe(broker.port)
        try:
            probe.subscribe("house/answers")
            job = {
                "id": "t-1",
                "messages": [{"role": "user", "content": QUESTION}],
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "HassTurnOn"}},
                "parallel_tool_calls": False,
                "temperature": 1.0,
                "seed": 5,
                "max_tokens": 200,
            }
            subprocess.run(
                [
                    *["mosquitto_pub", "-V", "mqttv5", "-p", str(broker.port), "-t", "edged/house/jobs"],
                    *["-m", json.dumps(job), "-D", "publish", "response-topic", "house/answers"],
                ],
                check=True,
                timeout=10,
            )
            _, answer, _ = probe.next(90)
        finally:
            probe.close()
    finally:
        broker.stop()
    assert answer["status"] == "done", answer
    assert (answer["finish_reason"], answer["content"]) == ("tool_calls", "")
    [call] = answer["tool_calls"]
    assert CALL_ID.fullmatch(call["id"]) and call["type"] == "function"
    assert call["function"]["name"] == "HassTurnOn"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["HassTurnOn"])


def test_a_thinking_r1_model_reasons_then_makes_the_forced_call_in_r1_markup(
    start_daemon: Any, r1_tiny: Path
) -> None:
    """The R1-shaped model (random weights, R1's vocabulary): recognised as deepseek_r1, it reasons
    freely (a budget of 8 tokens closes </think>), then the grammar forces R1's call markup, which is
    parsed back into tool_calls. Printable-ASCII patterns: random weights emit raw bytes otherwise
    (see tests/test_structured.py)."""
    d = start_daemon(EDGED_MODEL__PATH=str(r1_tiny))
    tool = {
        "type": "function",
        "function": {
            "name": "set_level",
            "parameters": {
                "type": "object",
                "properties": {
                    "room": {"type": "string", "pattern": "^[A-Za-z0-9 ]{0,8}$"},
                    "level": {"enum": ["low", "high"]},
                },
                "required": ["room", "level"],
                "additionalProperties": False,
            },
        },
    }
    body = chat(
        "Set the hall to high.",
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "set_level"}},
        parallel_tool_calls=False,
        reasoning_budget=8,
        temperature=1.0,
        seed=1,
        max_tokens=300,
    )
    with d.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and message["content"] is None
    assert message["reasoning_content"] is not None
    [call] = message["tool_calls"]
    assert call["function"]["name"] == "set_level" and CALL_ID.fullmatch(call["id"])
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
