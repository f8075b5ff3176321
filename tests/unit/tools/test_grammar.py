"""Grammars for tool calls (`edged.tools.grammar`), measured as llama.cpp would parse them. The
system tier (test_real_model.py) compiles each with llama.cpp and samples the embedded model under it."""

from __future__ import annotations

import re
from typing import Any

import pytest

from edged.engine import bounds
from edged.engine.gbnf import measure
from edged.errors import InvalidOutput, InvalidRequest
from edged.tools.family import FAMILIES, Family
from edged.tools.grammar import build_grammar, check_call, namespaced
from edged.tools.spec import ToolCall, ToolChoice, ToolSpec, parse_tools

from .conftest import WEATHER

CHOICES = [ToolChoice("auto"), ToolChoice("required"), ToolChoice("named", "HassTurnOn")]


def rule_names(grammar: str) -> set[str]:
    return set(re.findall(r"^([a-zA-Z0-9-]+) ::=", grammar, re.MULTILINE))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: c.mode)
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "single"])
def test_every_grammar_parses_within_the_bounds(
    tools: list[ToolSpec], family: Family, choice: ToolChoice, parallel: bool
) -> None:
    grammar = build_grammar(family, tools, choice, parallel=parallel)
    assert grammar is not None
    cost = measure(grammar.text, bounds.GRAMMAR_LIMITS)
    assert cost.rules > 0
    names = rule_names(grammar.text)
    assert "root" in names
    for tool in choice.allowed(tools):
        index = tools.index(tool)
        assert f"t{index}-root" in names
        assert tool.name in grammar.text
    for tool in tools:
        if tool not in choice.allowed(tools):
            assert f'"{tool.name}' not in grammar.text and f"t{tools.index(tool)}-root" not in names
    lazy = family != "generic" and choice.mode == "auto"
    assert (grammar.trigger is not None) == lazy
    if grammar.trigger is not None:  # a lazy grammar is fed from its trigger on: it spells it
        assert f'"{grammar.trigger}' in grammar.text


def test_generic_auto_admits_a_text_response_and_required_does_not(tools: list[ToolSpec]) -> None:
    auto = build_grammar("generic", tools, ToolChoice("auto"))
    required = build_grammar("generic", tools, ToolChoice("required"))
    assert auto is not None and required is not None
    assert '\\"response\\"' in auto.text and '\\"response\\"' not in required.text


def test_parallel_calls_repeat_and_a_single_call_does_not(tools: list[ToolSpec]) -> None:
    for family in FAMILIES:
        many = build_grammar(family, tools, ToolChoice("required"), parallel=True)
        one = build_grammar(family, tools, ToolChoice("required"), parallel=False)
        assert many is not None and one is not None
        root_many = next(line for line in many.text.splitlines() if line.startswith("root ::="))
        root_one = next(line for line in one.text.splitlines() if line.startswith("root ::="))
        assert ")*" in root_many
        assert ")*" not in root_one


def test_none_builds_no_grammar(tools: list[ToolSpec]) -> None:
    assert build_grammar("hermes", tools, ToolChoice("none")) is None


def test_namespacing_renames_rules_not_literals_classes_or_counts() -> None:
    grammar = 'root ::= "root" [a-z-] x{2,3} # root\nx ::= "\\"x\\"" space\nspace ::= " "?\n'
    assert namespaced(grammar, "t1") == (
        't1-root ::= "root" [a-z-] t1-x{2,3} # root\nt1-x ::= "\\"x\\"" t1-space\nt1-space ::= " "?\n'
    )


def test_a_schema_the_converter_refuses_is_an_invalid_request_naming_the_tool() -> None:
    odd: dict[str, Any] = {
        "type": "function",
        "function": {
            "name": "odd",
            "parameters": {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}},
        },
    }
    tools = parse_tools(tools=[WEATHER, odd])
    with pytest.raises(InvalidRequest) as caught:
        build_grammar("generic", tools, ToolChoice("required"))
    assert caught.value.param is not None and caught.value.param.startswith("tools[1].function.parameters")
    # a named choice of another tool never converts it
    assert build_grammar("generic", tools, ToolChoice("named", "get_weather")) is not None


def test_a_call_is_checked_against_the_schema_and_the_choice(tools: list[ToolSpec]) -> None:
    good = ToolCall.of("c", "get_weather", {"location": "Paris", "unit": "celsius"})
    check_call(good, tools, ToolChoice("auto"))
    with pytest.raises(InvalidOutput, match="get_weather: the answer does not match the schema at unit"):
        check_call(
            ToolCall.of("c", "get_weather", {"location": "Paris", "unit": "kelvin"}),
            tools,
            ToolChoice("auto"),
        )
    with pytest.raises(InvalidOutput, match=r"at location: .* is too long"):
        check_call(
            ToolCall.of("c", "get_weather", {"location": "P" * 41, "unit": "celsius"}),
            tools,
            ToolChoice("auto"),
        )
    with pytest.raises(InvalidOutput, match="not a tool it may call"):
        check_call(good, tools, ToolChoice("named", "HassTurnOn"))
    with pytest.raises(InvalidOutput, match="not a tool it may call"):
        check_call(ToolCall.of("c", "rm_rf", {}), tools, ToolChoice("auto"))
