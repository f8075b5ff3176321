"""The ``tools`` workload's tools, questions and the check of a call: a forced tool call, timed to the
finished call, on edged and on llama-server.

The tools are a home assistant's, small and realistic. Every string is bounded printable ASCII and every
number has bounds: a model with random weights (the R1-shaped one) emits raw byte tokens that a grammar
takes as characters but UTF-8 does not, and a bound keeps a call within the token budget. Integer bounds
are not in a grammar (llama.cpp's nor edged's): a call may break them, and the check counts it invalid.
"""

# ruff: noqa: RUF001 - R1's template spells its markers with fullwidth bars, as its tokenizer does.

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema

NAME = {"type": "string", "pattern": "^[A-Za-z0-9 ._-]{1,24}$"}

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather at a place.",
            "parameters": {
                "type": "object",
                "properties": {"location": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["location", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_light",
            "description": "Switch a light on or off and set its brightness in percent.",
            "parameters": {
                "type": "object",
                "properties": {
                    "entity_id": {"type": "string", "pattern": "^light[.][a-z0-9_]{1,20}$"},
                    "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                    "on": {"type": "boolean"},
                },
                "required": ["entity_id", "brightness", "on"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "create_timer",
            "description": "Start a countdown timer.",
            "parameters": {
                "type": "object",
                "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 720}, "name": NAME},
                "required": ["minutes", "name"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_thermostat",
            "description": "Set a room's target temperature in degrees Celsius.",
            "parameters": {
                "type": "object",
                "properties": {
                    "room": NAME,
                    "celsius": {"type": "integer", "minimum": 5, "maximum": 30},
                    "mode": {"enum": ["heat", "cool", "auto"]},
                },
                "required": ["room", "celsius", "mode"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}

QUESTIONS = (
    "What is the weather like in Lyon right now, in celsius?",
    "Turn on the kitchen light at 40 percent.",
    "Set a timer called pasta for 9 minutes.",
    "Make the living room 21 degrees, heating.",
    "Dim the hall light to 10 percent.",
)

REASONING_SHARE = 4
"""A forced call's reasoning budget is its token budget over this: room for the call after ``</think>``."""


def reasoning_budget(max_tokens: int) -> int:
    return max(1, max_tokens // REASONING_SHARE)


@dataclass(frozen=True)
class CallCheck:
    valid: bool
    reason: str | None = None  # why not valid


def check_answer(status: int, body: dict[str, Any]) -> CallCheck:
    """Whether a chat completion answered with exactly one call, to a known tool, whose arguments are a
    JSON object valid against that tool's schema (checked here with ``jsonschema``, independently of the
    target's own check)."""
    if status != 200:
        error = body.get("error")
        detail = error.get("message") if isinstance(error, dict) else error
        return CallCheck(False, f"HTTP {status}: {str(detail or body)[:160]}")
    try:
        choice = body["choices"][0]
    except (KeyError, IndexError, TypeError):
        return CallCheck(False, "no choices in the answer")
    calls = (choice.get("message") or {}).get("tool_calls") or []
    if not calls:
        return CallCheck(False, f"no tool_calls in the answer (finish_reason {choice.get('finish_reason')})")
    if len(calls) != 1:
        return CallCheck(False, f"{len(calls)} calls, asked for one (parallel_tool_calls false)")
    function = calls[0].get("function") or {}
    name = function.get("name")
    if name not in SCHEMAS:
        return CallCheck(False, f"a call to an unknown tool {str(name)[:40]!r}")
    try:
        arguments = json.loads(function.get("arguments") or "")
    except (TypeError, ValueError):
        return CallCheck(False, f"{name}: arguments are not JSON")
    try:
        jsonschema.validate(arguments, SCHEMAS[name])
    except jsonschema.ValidationError as exc:
        return CallCheck(False, f"{name}: {exc.message[:120]}")
    return CallCheck(True)


R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}"
    "{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] | tojson + '\\n' + "
    "'```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}"
    "{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] | tojson + '\\n' + "
    "'```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}"
    "{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}"
    "{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
"""DeepSeek-R1-Distill-Qwen's chat template as its tokenizer_config.json has it. The R1-shaped model
carries a trimmed copy (no branch for an assistant's ``tool_calls``); llama.cpp recognises R1's call
markup by that branch (common/chat-diff-analyzer.cpp), so llama-server is given this one for the R1-shaped
model, as it would find it in the real model's GGUF. Both render a system and a user message alike."""
