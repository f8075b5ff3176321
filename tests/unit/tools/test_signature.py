"""Tools as signature lines (`edged.tools.signature`): what the model must know, in far fewer tokens
than the schemas' JSON, with the types several tools repeat named once."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from edged.tools.signature import signatures
from edged.tools.spec import compact_json, parse_tools


def tool(name: str, parameters: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "parameters": parameters}
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


CLASSES = {"type": "string", "enum": ["tv", "speaker", "receiver", "door", "window"]}
TARGET = {"name": {"type": "string"}, "device_class": {"type": "array", "items": CLASSES}}


def test_each_tool_is_one_line_after_its_description() -> None:
    specs = parse_tools(
        [
            tool(
                "set_light",
                {
                    "type": "object",
                    "properties": {
                        "entity_id": {"type": "string", "description": "The light"},
                        "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                        "on": {"type": "boolean", "default": True},
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                        "at": {"type": "string", "format": "date-time"},
                    },
                    "required": ["entity_id"],
                },
                "Sets a light.\nOnly lights.",
            ),
            tool("now", {"type": "object", "properties": {}}),
        ]
    )
    assert signatures(specs).splitlines() == [
        "// Sets a light.",
        "// Only lights.",
        "set_light(entity_id: string /* The light */, brightness?: integer 0..100, on?: boolean = true, "
        'unit?: "celsius" | "fahrenheit", at?: string /* date-time */)',
        "now()",
    ]


def test_a_type_several_tools_repeat_is_named_once() -> None:
    specs = parse_tools(
        [
            tool("turn_on", {"type": "object", "properties": TARGET}),
            tool("turn_off", {"type": "object", "properties": TARGET}),
            tool("one_class", {"type": "object", "properties": {"c": {"enum": ["a", "b", "c", "d"]}}}),
        ]
    )
    lines = signatures(specs).splitlines()
    assert lines[:2] == [
        "turn_on(name?: string, device_class?: DeviceClass[])",
        "turn_off(name?: string, device_class?: DeviceClass[])",
    ]
    assert lines[2] == 'one_class(c?: "a" | "b" | "c" | "d")'  # used once: written in place
    assert lines[3:] == ['type DeviceClass = "tv" | "speaker" | "receiver" | "door" | "window"']


def test_nested_objects_unions_and_refs_from_a_pydantic_model() -> None:
    class Address(BaseModel):
        street: str
        city: str

    class Order(BaseModel):
        items: list[str] = Field(description="What to buy")
        ship_to: Address
        bill_to: Address | None = None
        quantity: int | float = 1

    specs = parse_tools([tool("order", Order.model_json_schema())])
    text = signatures(specs)
    assert text.startswith("order(items: string[] /* What to buy */, ship_to: ")
    assert "ship_to: Address" in text and "bill_to?: Address | null = null" in text, text
    assert "quantity?: integer | number = 1" in text, text
    assert text.endswith("type Address = {street: string, city: string}"), text


def test_far_fewer_tokens_than_the_schemas_json() -> None:
    """Characters as a proxy for tokens (the real-model count is in the README): less than half."""
    specs = parse_tools(
        [tool(f"intent_{i}", {"type": "object", "properties": TARGET}, "Does a thing.") for i in range(10)]
    )
    as_json = "\n".join(compact_json(s.to_compact()) for s in specs)
    assert len(signatures(specs)) < len(as_json) / 2


def test_anything_else_still_renders() -> None:
    odd = {
        "type": "object",
        "properties": {
            "free": {},
            "map": {"type": "object", "additionalProperties": {"type": "number"}},
            "either": {"type": ["string", "null"]},
            "const": {"const": "x"},
            "missing_ref": {"$ref": "#/$defs/Nope"},
            "tuple": {"type": "array"},
        },
    }
    text = signatures(parse_tools([tool("odd", odd)]))
    assert text == (
        'odd(free?: any, map?: {[key: string]: number}, either?: string | null, const?: "x", '
        "missing_ref?: object, tuple?: any[])"
    ), text
    json.dumps(text)


def test_a_recursive_type_ends() -> None:
    tree = {
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/Node"}},
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
            }
        },
    }
    text = signatures(parse_tools([tool("walk", tree)]))
    assert text.startswith("walk(root?: {label?: string, children?: ") and len(text) < 2000, text
