"""Shared tools for the tests of `edged.tools`: a few tool definitions shaped like real clients'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edged.tools.spec import ToolSpec, parse_tools

HERE = Path(__file__).parent
QWEN25_TEMPLATE = (HERE / "qwen2.5-instruct.jinja").read_text()
"""Qwen2.5-Instruct's chat template (its tokenizer_config.json), the Hermes-style reference."""

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
"""The embedded SmolLM2-135M-Instruct's chat template, as its GGUF holds it (a system test reads the
real one and compares)."""

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now at a place.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "unit"],
        },
    },
}
TURN_ON: dict[str, Any] = {  # Home Assistant's Assist tool, as its llm helper declares it
    "type": "function",
    "function": {
        "name": "HassTurnOn",
        "description": "Turns on/opens/presses a device or entity",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "area": {"type": "string"},
                "domain": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            },
            "required": ["name"],
        },
    },
}
TIMER: dict[str, Any] = {  # $defs and a reference, as pydantic's model_json_schema writes them
    "type": "function",
    "function": {
        "name": "start_timer",
        "parameters": {
            "type": "object",
            "$defs": {
                "Duration": {
                    "type": "object",
                    "properties": {"minutes": {"type": "integer"}},
                    "required": ["minutes"],
                }
            },
            "properties": {
                "duration": {"$ref": "#/$defs/Duration"},
                "label": {"type": "string", "maxLength": 20},
            },
            "required": ["duration"],
        },
        "strict": True,
    },
}


@pytest.fixture
def tools() -> list[ToolSpec]:
    return parse_tools([WEATHER, TURN_ON, TIMER])
