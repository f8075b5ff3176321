"""The tools workload's check of an answer: one call, to a known tool, arguments valid against its schema
(jsonschema, at the client); anything else is an invalid call with its reason, never an exception."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from edged.bench.tools import QUESTIONS, SCHEMAS, TOOLS, check_answer, reasoning_budget

TIMER = {"minutes": 4, "name": "b"}


def answer(*calls: tuple[str, Any], finish: str = "tool_calls") -> dict[str, Any]:
    tool_calls = [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)},
        }
        for i, (name, args) in enumerate(calls)
    ]
    message = {"role": "assistant", "content": None, "tool_calls": tool_calls or None}
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def test_a_valid_call_is_valid() -> None:
    call = ("set_light", {"entity_id": "light.hall", "brightness": 40, "on": True})
    check = check_answer(200, answer(call))
    assert check.valid and check.reason is None


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, answer(finish="length"), "no tool_calls in the answer (finish_reason length)"),
        (200, answer(("open_door", {})), "a call to an unknown tool 'open_door'"),
        (200, answer(("get_weather", "{not json")), "get_weather: arguments are not JSON"),
        (
            200,
            answer(("set_light", {"entity_id": "light.hall", "brightness": 928, "on": True})),
            "set_light: 928 is greater than the maximum of 100",
        ),
        (
            200,
            answer(("get_weather", {"location": "Lyon", "unit": "kelvin"})),
            "get_weather: 'kelvin' is not one of ['celsius', 'fahrenheit']",
        ),
        (
            200,
            answer(("create_timer", {"minutes": 3, "name": "a"}), ("create_timer", TIMER)),
            "2 calls, asked for one (parallel_tool_calls false)",
        ),
        (
            422,
            {"error": {"message": "the answer was cut at max_tokens", "code": "invalid_output"}},
            "HTTP 422: the answer was cut at max_tokens",
        ),
        (500, {"error": "boom"}, "HTTP 500: boom"),
        (200, {"object": "chat.completion"}, "no choices in the answer"),
    ],
)
def test_an_invalid_answer_is_counted_with_its_reason(status: int, body: dict[str, Any], reason: str) -> None:
    check = check_answer(status, body)
    assert not check.valid
    assert check.reason == reason


def test_the_tools_are_valid_schemas_with_bounded_strings() -> None:
    assert [t["function"]["name"] for t in TOOLS] == list(SCHEMAS)
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
        for prop in schema["properties"].values():
            if prop.get("type") == "string":
                assert prop["pattern"].startswith("^") and prop["pattern"].endswith("}$"), prop
    assert len(set(QUESTIONS)) == len(QUESTIONS)
    assert reasoning_budget(256) == 64 and reasoning_budget(2) == 1
