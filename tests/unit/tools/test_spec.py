"""Requests' tools and choices, normalized and refused with the field named (`edged.tools.spec`)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from edged.errors import InvalidRequest
from edged.tools.spec import (
    ToolCall,
    ToolChoice,
    ToolSpec,
    call_ids_for,
    parse_choice,
    parse_tools,
    random_call_id,
)

from .conftest import TIMER, TURN_ON, WEATHER


def refused(**request: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_tools(**request)
    return caught.value


def test_openai_legacy_functions_and_ollama_tools_become_the_same_specs() -> None:
    openai = parse_tools(tools=[WEATHER, TIMER])
    legacy = parse_tools(functions=[WEATHER["function"], TIMER["function"]])
    ollama = parse_tools(
        tools=[{"function": WEATHER["function"]}, {"function": TIMER["function"]}]
    )  # no type
    assert openai == legacy == ollama
    weather, timer = openai
    assert weather == ToolSpec(
        "get_weather", "The weather now at a place.", WEATHER["function"]["parameters"], strict=False
    )
    assert timer.strict and timer.description == ""
    assert timer.to_openai() == {
        "type": "function",
        "function": {"name": "start_timer", "parameters": TIMER["function"]["parameters"]},
    }


def test_a_tool_without_parameters_takes_none() -> None:
    (spec,) = parse_tools(tools=[{"type": "function", "function": {"name": "ping"}}])
    assert spec.parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    ("request_", "param", "says"),
    [
        ({"tools": {"name": "x"}}, "tools", "array"),
        ({"tools": ["x"]}, "tools[0]", "object"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "only 'function'"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "name and parameters"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "letters"),
        ({"functions": [{"name": "x" * 65}]}, "functions[0].name", "1-64"),
        ({"functions": [{"name": "f", "description": 3}]}, "functions[0].description", "string"),
        ({"functions": [{"name": "f", "parameters": []}]}, "functions[0].parameters", "JSON schema object"),
        (
            {"functions": [{"name": "f", "parameters": {"type": "string"}}]},
            "functions[0].parameters",
            "object",
        ),
        ({"functions": [{"name": "f", "strict": "yes"}]}, "functions[0].strict", "true or false"),
        ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions", "not both"),
    ],
)
def test_a_malformed_tool_is_refused_naming_the_field(
    request_: dict[str, Any], param: str, says: str
) -> None:
    error = refused(**request_)
    assert error.param == param
    assert says in error.message


def test_two_tools_of_one_name_are_refused() -> None:
    error = refused(tools=[WEATHER, TURN_ON, copy.deepcopy(WEATHER)])
    assert error.param == "tools[2].function.name"
    assert "tools[0]" in error.message and "unique" in error.message


def test_every_parameters_schema_passes_the_bounded_checker() -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    too_long = {"type": "object", "properties": {"s": {"type": "string", "minLength": 100_000}}}
    error = refused(tools=[WEATHER, {"type": "function", "function": {"name": "deep", "parameters": deep}}])
    assert error.param is not None and error.param.startswith("tools[1].function.parameters")
    assert "deeper than" in error.message
    error = refused(functions=[{"name": "long", "parameters": too_long}])
    assert error.param == "functions[0].parameters.properties.s.minLength"


def test_choices_from_tool_choice_and_function_call() -> None:
    specs = parse_tools(tools=[WEATHER, TURN_ON])
    assert parse_choice(specs) == ToolChoice("auto")
    assert parse_choice([]) == ToolChoice("none")
    assert parse_choice(specs, "none") == ToolChoice("none")
    assert parse_choice(specs, "required") == ToolChoice("required")
    named = parse_choice(specs, {"type": "function", "function": {"name": "HassTurnOn"}})
    assert named == ToolChoice("named", "HassTurnOn")
    assert named.allowed(specs) == [specs[1]]
    assert parse_choice(specs, function_call={"name": "get_weather"}) == ToolChoice("named", "get_weather")
    assert parse_choice(specs, function_call="auto") == ToolChoice("auto")
    assert ToolChoice("none").allowed(specs) == []


@pytest.mark.parametrize(
    ("tool_choice", "function_call", "param", "says"),
    [
        ({"type": "function", "function": {"name": "nope"}}, None, "tool_choice", "not one of the tools"),
        (None, {"name": "nope"}, "function_call", "not one of the tools"),
        ("always", None, "tool_choice", "none, auto, required"),
        (None, "required", "function_call", "none, auto"),
        ({"type": "function"}, None, "tool_choice", '"function": {"name"'),
        ({"type": "function", "function": {}}, None, "tool_choice", "names no function"),
        (3, None, "tool_choice", "string or an object"),
        ("auto", "auto", "function_call", "not both"),
    ],
)
def test_a_bad_choice_is_refused_naming_the_field(
    tool_choice: Any, function_call: Any, param: str, says: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_choice(parse_tools(tools=[WEATHER]), tool_choice, function_call)
    assert caught.value.param == param
    assert says in caught.value.message


def test_required_without_tools_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="offers no tools"):
        parse_choice([], "required")


def test_call_ids_are_openai_shaped_random_or_derived_from_the_job() -> None:
    shape = re.compile(r"call_[A-Za-z0-9]{24}")
    assert shape.fullmatch(random_call_id())
    assert random_call_id() != random_call_id()
    ids = call_ids_for("job-1")
    assert shape.fullmatch(ids(0)) and shape.fullmatch(ids(1))
    assert ids(0) != ids(1)
    assert ids(0) == call_ids_for("job-1")(0) != call_ids_for("job-2")(0)


def test_a_call_in_each_wire_shape() -> None:
    call = ToolCall.of("call_1", "get_weather", {"location": "Zürich", "unit": "celsius"})
    assert call.arguments_json == '{"location":"Zürich","unit":"celsius"}'
    assert call.to_openai() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": call.arguments_json},
    }
    assert call.to_ollama() == {"function": {"name": "get_weather", "arguments": call.arguments}}
