"""Ollama's ``/api/chat`` and ``/api/generate`` bodies translated into the one `JobRequest`: options,
format, think, model tags, and what is refused naming the field as the client sent it."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from edged.engine.job import JobRequest
from edged.errors import InvalidRequest, ModelNotFound, NotSupported
from edged.transports.http.ollama import (
    ChatRequest,
    GenerateRequest,
    _format,
    _options,
    chat_job,
    generate_job,
)

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


def test_chat_messages_tool_results_and_images() -> None:
    job = chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "How warm?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "temp"}}]},
            {"role": "tool", "content": "21 C", "tool_name": "temp"},
        ],
        stream=False,
    )
    assert job.messages is not None and job.stream is False
    assert [(m.role, m.content) for m in job.messages] == [
        ("system", "Be brief."),
        ("user", "How warm?"),
        ("assistant", ""),
        ("user", "[result of the tool temp]\n21 C"),
    ]
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
