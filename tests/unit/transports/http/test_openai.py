"""OpenAI's request bodies (``/v1/chat/completions``, ``/v1/completions``) translated into the one
`JobRequest`: what is applied, what is accepted and ignored, and what is refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from edged.engine.job import JobRequest
from edged.errors import InvalidRequest, NotSupported
from edged.transports.http.openai import ChatCompletionRequest, CompletionRequest

HI = [{"role": "user", "content": "hi"}]
THERMOMETER: dict[str, Any] = {"function": {"name": "thermometer", "arguments": '{"room":"hall"}'}}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def to_job(**body: Any) -> JobRequest:
    return ChatCompletionRequest.model_validate({"messages": HI, **body}).to_job()


def messages_of(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    job = ChatCompletionRequest.model_validate({"messages": list(messages)}).to_job()
    assert job.messages is not None
    return [m.model_dump(exclude_none=True) for m in job.messages]


def test_roles_and_content_parts_become_the_job_s_messages() -> None:
    assert messages_of(
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
            "name": "ann",
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", **THERMOMETER}],
        },
        {"role": "tool", "content": "21 C", "name": "thermometer", "tool_call_id": "c1"},
        {"role": "assistant", "content": None, "function_call": THERMOMETER["function"]},
        {"role": "function", "content": "ok", "name": "thermometer"},
    ) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one\ntwo", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", **THERMOMETER}]},
        {"role": "tool", "content": "21 C", "name": "thermometer", "tool_call_id": "c1"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", **THERMOMETER}]},
        {"role": "tool", "content": "ok", "name": "thermometer"},
    ]


def test_an_earlier_call_that_is_not_one_is_refused_naming_where() -> None:
    with pytest.raises(ValidationError) as body:
        messages_of(
            *HI, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}
        )
    assert body.value.errors()[0]["loc"] == ("messages", 1, "tool_calls", 0, "function")
    not_json = {"function": {"name": "f", "arguments": "{'a': 1}"}}
    with pytest.raises(InvalidRequest) as job:
        messages_of(*HI, {"role": "assistant", "content": None, "tool_calls": [not_json]})
    assert job.value.param == "messages.1.tool_calls.0.function.arguments"
    assert "not JSON text" in job.value.message


def test_a_part_that_is_not_text_is_not_supported_naming_where() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(NotSupported) as info:
        messages_of({"role": "user", "content": "look"}, {"role": "user", "content": [image]})
    assert info.value.param == "messages[1].content" and "'image_url' parts" in info.value.message
    assert info.value.http_status == 501


def test_max_completion_tokens_is_max_tokens_unless_both_are_given() -> None:
    assert to_job(max_completion_tokens=7).max_tokens == 7
    assert to_job(max_tokens=5, max_completion_tokens=7).max_tokens == 5
    assert to_job().max_tokens is None


def test_reasoning_effort_none_or_minimal_skips_the_thinking() -> None:
    assert to_job(reasoning_effort="none").think is False
    assert to_job(reasoning_effort="minimal").think is False
    assert to_job(reasoning_effort="high").think is None, "the model's template decides"
    assert to_job(reasoning_effort="none", think=True).think is True, "edged's own field wins"


def test_openai_fields_that_cannot_change_the_answer_are_accepted_and_dropped() -> None:
    job = to_job(
        user="u1",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        stream_options={"include_usage": True},
        prompt_cache_key="k",
        n=1,
        modalities=["text"],
        temperature=0.3,
        stream=True,
    )
    assert (job.temperature, job.stream) == (0.3, True)
    assert set(job.model_dump(exclude_unset=True)) == {"messages", "temperature", "stream"}


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("n", 2, "n"),
        ("logprobs", True, "logprobs"),
        ("top_logprobs", 3, "logprobs"),
        ("modalities", ["text", "audio"], "modalities"),
        ("audio", {"voice": "alloy", "format": "wav"}, "audio"),
        ("web_search_options", {}, "web_search_options"),
    ],
)
def test_what_edged_cannot_do_is_not_supported_naming_the_field(field: str, value: Any, param: str) -> None:
    with pytest.raises(NotSupported) as info:
        to_job(**{field: value})
    assert info.value.param == param and info.value.code == "not_supported"


def test_fields_openai_does_not_define_are_invalid() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ChatCompletionRequest.model_validate({"messages": HI, "max_new_tokens": 3})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": HI, "n": "2"})  # strict, as the job schema


def test_a_json_schema_response_format_reaches_the_job_whole() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    job = to_job(response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert job.response_format is not None and job.response_format.json_schema is not None
    assert (job.response_format.json_schema.name, job.response_format.json_schema.schema_) == (
        "answer",
        schema,
    )


def test_the_job_rules_hold_for_the_openai_body_itself() -> None:
    """The body is a `JobRequest` with OpenAI's fields added: its rules are checked as it is read."""
    for body in ({"stop": ["a", ""]}, {"prompt": "x"}, {"logit_bias": {"+1": 1}}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"messages": HI, **body})


def test_completions_feed_a_non_empty_prompt_raw() -> None:
    job = CompletionRequest.model_validate({"prompt": "Once upon a time", "max_tokens": 4}).to_job()
    assert (job.prompt, job.raw, job.max_tokens, job.messages) == ("Once upon a time", True, 4, None)
    for body in ({"prompt": ""}, {"messages": HI}):
        with pytest.raises(InvalidRequest) as info:
            CompletionRequest.model_validate(body).to_job()
        assert info.value.param == "prompt"


def test_tools_and_the_choice_reach_the_job() -> None:
    job = to_job(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert job.tools == [WEATHER] and job.tool_choice == "required" and job.parallel_tool_calls is False
    assert (job.choice.mode, job.parallel, [t.name for t in job.tool_specs]) == (
        "required",
        False,
        ["get_weather"],
    )


def test_the_deprecated_functions_and_function_call_become_tools_and_tool_choice() -> None:
    job = to_job(functions=[WEATHER["function"]], function_call={"name": "get_weather"})
    assert job.tools == [WEATHER]
    assert job.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert (job.choice.mode, job.choice.name) == ("named", "get_weather")
    assert to_job(functions=[WEATHER["function"]], function_call="none").choice.mode == "none"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions"),
        ({"functions": [{"name": "bad name"}]}, "functions[0].name"),
        ({"functions": [WEATHER["function"]], "function_call": {"name": "other"}}, "function_call"),
        ({"tools": [WEATHER], "tool_choice": "required", "function_call": "auto"}, "function_call"),
    ],
)
def test_bad_tools_are_invalid_requests_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        to_job(**body)
    assert info.value.param == param and info.value.code == "invalid_request"


def test_raw_completions_take_no_tools() -> None:
    with pytest.raises(InvalidRequest) as info:
        CompletionRequest.model_validate({"prompt": "once", "tools": [WEATHER]}).to_job()
    assert info.value.param == "tools"
