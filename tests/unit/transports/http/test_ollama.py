"""Ollama's ``/api/chat`` and ``/api/generate`` bodies translated into the one `JobRequest`: options,
format, think, model tags, tools and the messages of a tool loop, and what is refused naming the field
as the client sent it; and a tool job's answer written as Ollama writes it."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from edged.engine import Delta, JobResult
from edged.engine.job import JobRequest
from edged.engine.timings import Timings
from edged.errors import InvalidRequest, ModelNotFound, NotSupported
from edged.tools.render import render_chat
from edged.transports.http.errors import describe_validation
from edged.transports.http.ollama import (
    ChatAnswer,
    ChatRequest,
    GenerateAnswer,
    GenerateRequest,
    _format,
    _options,
    chat_job,
    generate_job,
)
from edged.wire import Usage

MODEL = "smollm2"


def chat(**body: Any) -> JobRequest:
    return chat_job(
        ChatRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}),
        MODEL,
    )


def generate(**body: Any) -> JobRequest:
    return generate_job(GenerateRequest.model_validate({"model": MODEL, **body}), MODEL)


# -- options ---------------------------------------------------------------------------------------


def test_the_options_edged_applies_become_job_fields() -> None:
    options = {
        "temperature": 0.2,
        "top_p": 0.8,
        "top_k": 5,
        "min_p": 0.05,
        "seed": 9,
        "num_predict": 12,
        "repeat_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "stop": ["\n\n"],
    }
    fields = _options(options)
    assert fields == {**{k: v for k, v in options.items() if k != "num_predict"}, "max_tokens": 12}
    assert chat(options=options).max_tokens == 12


def test_runtime_options_and_nulls_are_dropped_without_a_word() -> None:
    with capture_logs() as logs:
        assert _options({"num_ctx": 8192, "num_thread": 4, "mirostat": 2, "temperature": None}) == {}
        assert _options(None) == {} and _options({}) == {}
    assert logs == []


@pytest.mark.parametrize("num_predict", [-1, -2])
def test_a_negative_num_predict_means_until_the_context_ends(num_predict: int) -> None:
    assert _options({"num_predict": num_predict, "seed": 1}) == {"seed": 1}
    assert chat(options={"num_predict": num_predict}).max_tokens is None


def test_an_option_the_job_schema_refuses_is_named_as_the_client_sent_it() -> None:
    with pytest.raises(InvalidRequest) as info:
        chat(options={"num_predict": 0, "temperature": 3})
    assert "options.num_predict" in info.value.message and "options.temperature" in info.value.message
    with pytest.raises(InvalidRequest, match=r"options\.seed"):
        generate(prompt="hi", options={"seed": "7"})


@pytest.mark.parametrize("num_predict", ["5", [5], {"n": 5}])
def test_a_num_predict_of_the_wrong_type_is_invalid_request(num_predict: object) -> None:
    with pytest.raises(InvalidRequest, match=r"options\.num_predict"):
        chat(options={"num_predict": num_predict})


# -- format, think, model --------------------------------------------------------------------------


def test_format_json_or_a_schema() -> None:
    assert _format(None) is None and _format("") is None
    assert _format("json") == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert _format(schema) == {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}
    job = chat(format=schema)
    assert job.response_format is not None and job.response_format.json_schema is not None
    assert job.response_format.json_schema.schema_ == schema
    with pytest.raises(InvalidRequest) as info:
        _format("yaml")
    assert info.value.param == "format"


def test_think_false_skips_the_reasoning_and_levels_leave_it_to_the_template() -> None:
    assert chat(think=False).think is False
    assert chat(think=True).think is None
    assert chat(think="high").think is None
    assert generate(prompt="hi", think=False).think is False


def test_the_model_is_ours_with_or_without_its_tag() -> None:
    assert chat(model=MODEL).model == MODEL
    assert chat(model=f"{MODEL}:latest").model == MODEL
    with pytest.raises(ModelNotFound) as info:
        chat(model="llama3:8b")
    assert "smollm2:latest" in info.value.message and info.value.http_status == 404


# -- chat and generate -----------------------------------------------------------------------------


def test_chat_messages_and_images() -> None:
    job = chat(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "User", "content": "How warm?"}],
        stream=False,
    )
    assert job.messages is not None and job.stream is False
    assert [(m.role, m.content) for m in job.messages] == [("system", "Be brief."), ("user", "How warm?")]
    assert chat().stream is True, "Ollama streams unless told not to"
    with pytest.raises(NotSupported) as info:
        chat(messages=[{"role": "user", "content": "look", "images": ["iVBORw0KGgo="]}])
    assert info.value.param == "messages"
    with pytest.raises(NotSupported, match="logprobs"):
        chat(logprobs=True)


def test_generate_is_a_chat_turn_unless_raw() -> None:
    job = generate(prompt="Why is the sky blue?", system="Answer in one line.")
    assert job.messages is not None and [(m.role, m.content) for m in job.messages] == [
        ("system", "Answer in one line."),
        ("user", "Why is the sky blue?"),
    ]
    raw = generate(prompt="Once upon a time", raw=True, think=False)
    assert (raw.prompt, raw.raw, raw.messages, raw.think) == ("Once upon a time", True, None, None)


@pytest.mark.parametrize(
    ("field", "value"),
    [("suffix", "}"), ("context", [1, 2, 3]), ("template", "{{ .Prompt }}"), ("images", ["iVBORw0KGgo="])],
)
def test_generate_refuses_what_edged_cannot_do_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(NotSupported) as info:
        generate(prompt="hi", **{field: value})
    assert info.value.param == field


# -- tools -----------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather at a place.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
LIGHT = {"type": "function", "function": {"name": "HassTurnOn", "parameters": {"type": "object"}}}


def test_tools_are_the_job_s_and_always_auto() -> None:
    job = chat(tools=[WEATHER, LIGHT])
    assert job.tools == [WEATHER, LIGHT] and job.tool_choice is None
    assert job.uses_tools and job.choice.mode == "auto" and job.parallel
    assert [t.name for t in job.tool_specs] == ["get_weather", "HassTurnOn"]
    empty = chat(tools=[])
    assert empty.tools is None and not empty.uses_tools, "an empty list is no tools, as in Ollama"


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([{"type": "function", "function": {"name": "turn on"}}], "tools[0].function.name"),
        ([WEATHER, {"type": "retrieval"}], "tools[1].type"),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        ([{"function": {"name": "f", "parameters": {"type": "array"}}}], "tools[0].function.parameters"),
    ],
)
def test_a_malformed_tool_is_invalid_request_naming_it(tools: list[Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat(tools=tools)
    assert info.value.param == param


QUESTION = {"role": "user", "content": "Weather in Paris, and the kitchen light on?"}
CALLS = {  # as the ollama client sends its answer back: arguments as objects, newer clients an index
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_light", "function": {"index": 1, "name": "HassTurnOn", "arguments": {}}},
    ],
}


def test_a_tool_loop_becomes_the_job_s_calls_and_results() -> None:
    job = chat(
        messages=[
            QUESTION,
            CALLS,
            {"role": "tool", "tool_call_id": "call_light", "content": "LIGHT-ON"},
            {"role": "tool", "tool_name": "get_weather", "content": "RAIN-12C"},
        ],
        tools=[WEATHER, LIGHT],
    )
    assert job.messages is not None
    dumped = [m.model_dump(exclude_none=True) for m in job.messages]
    assert dumped[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_light", "type": "function", "function": {"name": "HassTurnOn", "arguments": {}}},
        ],
    }
    assert dumped[2:] == [
        {"role": "tool", "content": "LIGHT-ON", "tool_call_id": "call_light"},
        {"role": "tool", "content": "RAIN-12C", "name": "get_weather"},
    ]
    rendered = render_chat("generic", dumped, job.tool_specs, job.choice).messages
    results = [json.loads(line)["tool_response"] for line in rendered[-1]["content"].splitlines()]
    assert results == [  # in the order of the calls, each matched to its own call (by id, by name)
        {"name": "get_weather", "content": "RAIN-12C"},
        {"id": "call_light", "name": "HassTurnOn", "content": "LIGHT-ON"},
    ]
    assert "[result of the tool" not in json.dumps(rendered)


def test_arguments_as_json_text_or_null_are_taken() -> None:
    calls = [
        {"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"function": {"name": "HassTurnOn", "arguments": None}},
    ]
    job = chat(messages=[QUESTION, {"role": "assistant", "tool_calls": calls}])
    assert job.messages is not None and job.messages[1].tool_calls is not None
    assert [c.function.arguments for c in job.messages[1].tool_calls] == ['{"city": "Oslo"}', {}]


def translated(body: dict[str, Any]) -> JobRequest:
    """As the route does it: the body parsed (`read_body`'s errors), then translated."""
    try:
        request = ChatRequest.model_validate_json(json.dumps(body))
    except ValidationError as exc:
        raise describe_validation(exc.errors()) from exc
    return chat_job(request, MODEL)


def earlier(call: dict[str, Any], role: str = "assistant") -> dict[str, Any]:
    return {"role": role, "content": "", "tool_calls": [{"function": call}]}


@pytest.mark.parametrize(
    ("message", "where"),
    [
        (earlier({"name": "f", "arguments": "{nope"}), "messages.1.tool_calls.0.function.arguments"),
        (earlier({"name": "f", "arguments": "[1]"}), "messages.1.tool_calls.0.function.arguments"),
        (earlier({"name": "f", "arguments": [1]}), "messages.1.tool_calls.0.function.arguments"),
        (earlier({"arguments": {}}), "messages.1.tool_calls.0.function.name"),
        (earlier({"name": "f"}, role="user"), "messages.1"),
    ],
)
def test_a_malformed_earlier_call_is_invalid_request(message: dict[str, Any], where: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        translated({"model": MODEL, "messages": [QUESTION, message]})
    assert where in info.value.message, info.value.message


TIMINGS = Timings(
    prompt_n=10,
    prompt_ms=12.5,
    prompt_per_token_ms=1.25,
    prompt_per_second=800.0,
    predicted_n=5,
    predicted_ms=40.0,
    predicted_per_token_ms=10.0,
    predicted_per_second=100.0,
    queue_ms=0.0,
    ttft_ms=13.1,
    total_ms=55.0,
    s_per_1k_tokens=10.0,
)
OPENAI_CALLS = [
    {
        "id": "call_" + "a" * 24,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    },
    {"id": "call_" + "b" * 24, "type": "function", "function": {"name": "HassTurnOn", "arguments": "{}"}},
]


def called(**changes: Any) -> JobResult:
    fields: dict[str, Any] = {
        "id": "job-1",
        "model": MODEL,
        "created": 1,
        "content": "",
        "reasoning_content": None,
        "finish_reason": "tool_calls",
        "usage": Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
        "timings": TIMINGS,
        "tool_calls": OPENAI_CALLS,
    }
    return JobResult(**{**fields, **changes})


OLLAMA_CALLS = [
    {
        "id": "call_" + "a" * 24,
        "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}},
    },
    {"id": "call_" + "b" * 24, "function": {"index": 1, "name": "HassTurnOn", "arguments": {}}},
]


def test_the_answer_carries_the_calls_as_ollama_writes_them() -> None:
    body = ChatAnswer(f"{MODEL}:latest").body(called())
    assert body["message"] == {"role": "assistant", "content": "", "tool_calls": OLLAMA_CALLS}
    assert (body["done"], body["done_reason"]) == (True, "stop"), "Ollama says stop after calls"
    assert body["eval_count"] == 5 and body["total_duration"] == 55_000_000
    text = ChatAnswer(MODEL).body(called(content="Hello.", tool_calls=None, finish_reason="length"))
    assert text["message"] == {"role": "assistant", "content": "Hello."} and text["done_reason"] == "length"


def test_a_stream_sends_the_calls_in_a_chunk_then_the_done_one() -> None:
    lines = [json.loads(line) for line in ChatAnswer(MODEL).finished(called())]
    assert [line["done"] for line in lines] == [False, True]
    assert lines[0]["message"] == {"role": "assistant", "content": "", "tool_calls": OLLAMA_CALLS}
    assert lines[1]["message"] == {"role": "assistant", "content": ""} and lines[1]["done_reason"] == "stop"
    plain = [json.loads(line) for line in ChatAnswer(MODEL).finished(called(tool_calls=None))]
    assert len(plain) == 1 and plain[0]["done"]


def test_a_delta_of_a_kind_the_route_does_not_know_is_not_sent() -> None:
    piece = cast("Any", Delta)(kind="tool_call", text='{"name": "get_')  # a kind a later scheduler may add
    for answer in (ChatAnswer(MODEL), GenerateAnswer(MODEL)):
        assert list(answer.delta(piece)) == []
    [content] = [json.loads(line) for line in ChatAnswer(MODEL).delta(Delta("content", "Hi"))]
    [thought] = [json.loads(line) for line in ChatAnswer(MODEL).delta(Delta("reasoning", "Hm"))]
    assert content["message"] == {"role": "assistant", "content": "Hi"} and not content["done"]
    assert thought["message"] == {"role": "assistant", "content": "", "thinking": "Hm"}
    [response] = [json.loads(line) for line in GenerateAnswer(MODEL).delta(Delta("content", "Hi"))]
    assert response["response"] == "Hi"
