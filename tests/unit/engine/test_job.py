"""`JobRequest`, the one job schema of every transport: what it takes, what it refuses, and that the
JSON schema it publishes (``/openapi.json``) says the same as the code."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from edged.engine.job import JobRequest
from edged.errors import InvalidRequest, NotSupported

CHAT = [{"role": "user", "content": "hi"}]


def refused(doc: dict[str, Any]) -> str:
    """The validation message of a refused job (fails the test if it is taken)."""
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(doc)
    return str(info.value)


def test_exactly_one_of_messages_and_prompt() -> None:
    assert JobRequest.model_validate({"prompt": "hi"}).messages is None
    assert JobRequest.model_validate({"messages": CHAT}).prompt is None
    assert "exactly one of 'messages' or 'prompt'" in refused({})
    assert "exactly one of 'messages' or 'prompt'" in refused({"prompt": "hi", "messages": CHAT})
    assert "at least 1 item" in refused({"messages": []})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "5"),  # a string is not coerced
        ("max_tokens", True),  # nor a boolean
        ("max_tokens", 2.5),
        ("stream", 1),
        ("temperature", "0.5"),
        ("temperature", float("nan")),  # numbers are finite
        ("top_p", float("inf")),
        ("seed", -1),
        ("max_tokens", 0),
        ("repeat_penalty", 0),  # llama.cpp divides the logits by it
        ("temperature", 2.01),
        ("top_p", 0),
    ],
)
def test_types_are_strict_and_ranges_checked(field: str, value: Any) -> None:
    assert field in refused({"prompt": "hi", field: value})


def test_a_whole_float_is_the_integer_json_means() -> None:
    job = JobRequest.model_validate({"prompt": "hi", "max_tokens": 2.0, "seed": 7.0, "top_k": 0})
    assert (job.max_tokens, job.seed, job.top_k) == (2, 7, 0)
    assert type(job.max_tokens) is int


@pytest.mark.parametrize("job_id", ["job-1", "a.b:c_d-E", "x" * 128])
def test_client_ids_of_the_allowed_characters_are_kept(job_id: str) -> None:
    assert JobRequest.model_validate({"prompt": "hi", "id": job_id}).id == job_id


@pytest.mark.parametrize("job_id", ["", "x" * 129, "a b", "a/b", "a+b", "abc\n", "caf\u00e9"])
def test_ids_that_could_not_name_a_topic_or_a_row_are_refused(job_id: str) -> None:
    assert "id" in refused({"prompt": "hi", "id": job_id})


def test_unknown_fields_are_refused_not_ignored() -> None:
    assert "Extra inputs are not permitted" in refused({"prompt": "hi", "max_new_tokens": 5})
    assert "Extra inputs are not permitted" in refused({"messages": [{**CHAT[0], "tool_name": "f"}]})
    assert "role" in refused({"messages": [{"role": "function", "content": "x"}]})


def test_stop_takes_up_to_four_non_empty_strings() -> None:
    assert JobRequest.model_validate({"prompt": "hi", "stop": "END"}).stops == ["END"]
    assert JobRequest.model_validate({"prompt": "hi", "stop": list("abcd")}).stops == list("abcd")
    assert JobRequest.model_validate({"prompt": "hi"}).stops == []
    for stop in ("", ["a", ""], list("abcde")):
        assert "'stop' takes at most 4 non-empty strings" in refused({"prompt": "hi", "stop": stop})


def test_logit_bias_keys_are_decimal_token_ids_and_values_within_100() -> None:
    job = JobRequest.model_validate({"prompt": "hi", "logit_bias": {"42": -100, "7": 100, 3: 1.5}})
    assert job.logit_bias == {42: -100.0, 7: 100.0, 3: 1.5}
    for key in (" 1", "1.0", "+1", "0x1f", "one"):
        assert "token ids in decimal" in refused({"prompt": "hi", "logit_bias": {key: 1}})
    assert "logit_bias" in refused({"prompt": "hi", "logit_bias": {"1": 100.5}})
    most = {str(i): 1 for i in range(1024)}
    assert len(JobRequest.model_validate({"prompt": "hi", "logit_bias": most}).logit_bias or {}) == 1024
    assert "logit_bias" in refused({"prompt": "hi", "logit_bias": {**most, "1024": 1}})


def test_raw_needs_a_prompt_and_no_chat_template_options() -> None:
    assert JobRequest.model_validate({"prompt": "Once upon", "raw": True}).raw
    assert "'raw' needs a non-empty 'prompt'" in refused({"prompt": "", "raw": True})
    assert "'raw' needs a non-empty 'prompt'" in refused({"messages": CHAT, "raw": True})
    for extra in ({"think": False}, {"reasoning_budget": 0}):
        assert "need the chat template" in refused({"prompt": "x", "raw": True, **extra})


def test_a_grammar_goes_with_text_output_only() -> None:
    grammar = 'root ::= "yes" | "no"'
    assert JobRequest.model_validate({"prompt": "x", "grammar": grammar, "response_format": {"type": "text"}})
    for kind in ("json_object", "json_schema"):
        fmt: dict[str, Any] = {"type": kind}
        if kind == "json_schema":
            fmt["json_schema"] = {"name": "a", "schema": {"type": "object"}}
        assert "not both" in refused({"prompt": "x", "grammar": grammar, "response_format": fmt})


def test_response_format_pairs_its_type_with_json_schema() -> None:
    job = JobRequest.model_validate(
        {
            "prompt": "x",
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array"}}},
        }
    )
    assert job.response_format is not None and job.response_format.json_schema is not None
    assert job.response_format.json_schema.schema_ == {"type": "array"}  # OpenAI's "schema", by its alias
    assert job.response_format.json_schema.name == "response"
    assert "needs 'json_schema'" in refused({"prompt": "x", "response_format": {"type": "json_schema"}})
    assert "goes with type 'json_schema'" in refused(
        {"prompt": "x", "response_format": {"type": "json_object", "json_schema": {"name": "a"}}}
    )


# Documents whose verdict the published JSON schema must share with the code. (Not "abc\n" as an id:
# Python's jsonschema reads `$` as Python's re does, before a final newline; JSON Schema's `$` does not.)
SAME_VERDICT: list[tuple[str, dict[str, Any], bool]] = [
    ("prompt", {"prompt": "hi"}, True),
    ("messages", {"messages": CHAT}, True),
    ("neither", {}, False),
    ("both", {"prompt": "hi", "messages": CHAT}, False),
    ("raw empty", {"prompt": "", "raw": True}, False),
    ("raw think", {"prompt": "x", "raw": True, "think": False}, False),
    ("raw budget", {"prompt": "x", "raw": True, "reasoning_budget": 3}, False),
    ("five stops", {"prompt": "x", "stop": list("abcde")}, False),
    ("empty stop", {"prompt": "x", "stop": ""}, False),
    ("signed bias key", {"prompt": "x", "logit_bias": {"+1": 5}}, False),
    ("bias", {"prompt": "x", "logit_bias": {"1": 5, "22": -100}}, True),
    (
        "grammar and json",
        {"prompt": "x", "grammar": "root ::= [a]", "response_format": {"type": "json_object"}},
        False,
    ),
    (
        "grammar and text",
        {"prompt": "x", "grammar": "root ::= [a]", "response_format": {"type": "text"}},
        True,
    ),
    ("whole float", {"prompt": "x", "max_tokens": 2.0}, True),
    ("string int", {"prompt": "x", "max_tokens": "5"}, False),
    ("schema missing", {"prompt": "x", "response_format": {"type": "json_schema"}}, False),
    ("space in id", {"prompt": "x", "id": "a b"}, False),
    ("unknown field", {"prompt": "x", "n_predict": 3}, False),
]


@pytest.mark.parametrize(("doc", "valid"), [c[1:] for c in SAME_VERDICT], ids=[c[0] for c in SAME_VERDICT])
def test_the_published_schema_says_what_the_code_checks(doc: dict[str, Any], valid: bool) -> None:
    by_schema = jsonschema.Draft202012Validator(JobRequest.model_json_schema()).is_valid(doc)
    try:
        JobRequest.model_validate(doc)
        by_code = True
    except ValidationError:
        by_code = False
    assert (by_code, by_schema) == (valid, valid)


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


@pytest.mark.parametrize("field", SAMPLING_FIELDS)
def test_a_job_and_the_config_take_the_same_sampling_bounds(field: str) -> None:
    """Declared once (edged.config's Annotated types): the bounds in both JSON schemas are the same."""
    from edged.config import SamplingConfig

    bounds = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}

    def constraints(schema: dict[str, Any]) -> dict[str, Any]:
        (number,) = [s for s in schema["properties"][field]["anyOf"] if s["type"] != "null"]
        return {k: v for k, v in number.items() if k in bounds}

    job = constraints(JobRequest.model_json_schema())
    assert job and job == constraints(SamplingConfig.model_json_schema())


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_and_the_choice_are_validated_into_specs() -> None:
    job = JobRequest.model_validate({"messages": CHAT, "tools": [WEATHER]})
    assert [t.name for t in job.tool_specs] == ["get_weather"]
    assert (job.choice.mode, job.uses_tools, job.parallel) == ("auto", True, True), "auto by default"
    named = JobRequest.model_validate(
        {
            "messages": CHAT,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
        }
    )
    assert (named.choice.mode, named.choice.name, named.parallel) == ("named", "get_weather", False)
    none = JobRequest.model_validate({"messages": CHAT, "tools": [WEATHER], "tool_choice": "none"})
    assert not none.uses_tools
    plain = JobRequest.model_validate({"messages": CHAT})
    assert (plain.tool_specs, plain.choice.mode, plain.uses_tools) == ([], "none", False)
    copied = named.model_copy(update={"stream": True})
    assert copied.choice == named.choice and copied.tool_specs == named.tool_specs


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "letters"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "'function' tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "unique"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "one of none, auto, required"),
        ({"tool_choice": "required"}, "tool_choice", "offers no tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}},
            "tool_choice",
            "not one of the tools",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
            "describe an object",
        ),
    ],
)
def test_bad_tools_are_invalid_requests_naming_the_field(
    fields: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        JobRequest.model_validate({"messages": CHAT, **fields})
    assert info.value.param == param and info.value.code == "invalid_request"
    assert words in info.value.message


def test_tools_need_the_template_and_no_other_constraint() -> None:
    with pytest.raises(InvalidRequest) as info:
        JobRequest.model_validate({"prompt": "hi", "raw": True, "tools": [WEATHER]})
    assert info.value.param == "tools"
    with pytest.raises(NotSupported) as refused_format:
        JobRequest.model_validate({"messages": CHAT, "tools": [WEATHER], "grammar": 'root ::= "x"'})
    assert refused_format.value.param == "tools"
    assert (
        JobRequest.model_validate(
            {
                "messages": CHAT,
                "tools": [WEATHER],
                "tool_choice": "none",
                "response_format": {"type": "json_object"},
            }
        ).response_format
        is not None
    ), "with tool_choice none the tools do not constrain the answer"


def test_messages_carry_earlier_calls_and_their_results() -> None:
    job = JobRequest.model_validate(
        {
            "messages": [
                *CHAT,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a":1}'},
                        },
                        {"function": {"name": "g", "arguments": {"b": 2}}},
                    ],
                },
                {"role": "tool", "content": "42", "tool_call_id": "call_1"},
            ]
        }
    )
    assert job.messages is not None
    assert [m.has_tools for m in job.messages] == [False, True, True]
    assert "goes with role 'assistant'" in refused({"messages": [{**CHAT[0], "tool_calls": []}]})
    assert "goes with role 'tool'" in refused({"messages": [{**CHAT[0], "tool_call_id": "c"}]})
    assert "null only for an assistant turn" in refused({"messages": [{"role": "user", "content": None}]})
    assert "null only for an assistant turn" in refused(
        {"messages": [{"role": "assistant", "content": None}]}
    )
    assert "Extra inputs" in refused(
        {
            "messages": [
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}, "x": 1}]}
            ]
        }
    )
