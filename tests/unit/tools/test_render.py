"""Conversations with tools rendered through real chat templates (`edged.tools.render`): the model
reads the tools, its earlier calls and their results in its own format. The templates run in
llama-cpp-python's Jinja2 formatter, as the backends render them; no model is loaded."""

# ruff: noqa: RUF001 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.

from __future__ import annotations

from typing import Any

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edged.bench.vocab import CHAT_TEMPLATE as R1_SHAPED_TEMPLATE
from edged.errors import InvalidRequest
from edged.tools.family import Family
from edged.tools.parse import parse_output
from edged.tools.render import RenderedChat, compact_tools_in, finish_prompt, normalize, render_chat
from edged.tools.signature import signatures
from edged.tools.spec import ToolChoice, ToolSpec, compact_json

from .conftest import QWEN25_TEMPLATE, SMOLLM2_TEMPLATE

TEMPLATES: dict[Family, str] = {
    "hermes": QWEN25_TEMPLATE,
    "deepseek_r1": R1_SHAPED_TEMPLATE,
    "generic": SMOLLM2_TEMPLATE,
}
BOS = {"hermes": "", "deepseek_r1": "<｜begin▁of▁sentence｜>", "generic": ""}


def prompt(family: Family, rendered: RenderedChat) -> str:
    formatter = Jinja2ChatFormatter(TEMPLATES[family], eos_token="</s>", bos_token=BOS[family])
    compact_tools_in(formatter)  # as edged's tokenizer does (edged.backends.gguf_prompt)
    return finish_prompt(family, str(formatter(messages=rendered.messages, tools=rendered.tools).prompt))


AGENT_LOOP: list[dict[str, Any]] = [  # OpenAI's shapes: results name their calls by id, out of order
    {"role": "system", "content": "You run the house."},
    {"role": "user", "content": "Weather in Paris, and turn on the kitchen light."},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_w",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"location":"Paris","unit":"celsius"}'},
            },
            {
                "id": "call_l",
                "type": "function",
                "function": {"name": "HassTurnOn", "arguments": '{"name":"kitchen"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_l", "content": "LIGHT-ON"},
    {"role": "tool", "tool_call_id": "call_w", "content": "RAIN-12C"},
]
OLLAMA_LOOP: list[dict[str, Any]] = [  # Ollama's: arguments as objects, results named by tool_name
    AGENT_LOOP[1],
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}},
            {"function": {"name": "HassTurnOn", "arguments": {"name": "kitchen"}}},
        ],
    },
    {"role": "tool", "tool_name": "HassTurnOn", "content": "LIGHT-ON"},
    {"role": "tool", "tool_name": "get_weather", "content": "RAIN-12C"},
]


@pytest.mark.parametrize("family", ["hermes", "deepseek_r1", "generic"])
@pytest.mark.parametrize("loop", [AGENT_LOOP, OLLAMA_LOOP], ids=["openai", "ollama"])
def test_results_follow_their_calls_in_the_families_format(
    tools: list[ToolSpec], family: Family, loop: list[dict[str, Any]]
) -> None:
    text = prompt(family, render_chat(family, loop, tools, ToolChoice("auto")))
    asked = text.index("Weather in Paris")
    weather_call, light_call = text.find("get_weather", asked), text.find('kitchen"', asked)
    assert asked < weather_call < light_call < text.find("RAIN-12C") < text.find("LIGHT-ON")  # call order
    if family == "hermes":  # the template's own rendering of calls and results
        assert (
            '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}'
            in text
        )
        assert "<tool_response>\nRAIN-12C\n</tool_response>\n<tool_response>\nLIGHT-ON" in text
        assert text.endswith("<|im_start|>assistant\n")
    elif family == "deepseek_r1":
        assert (
            "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            '{"location":"Paris","unit":"celsius"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>' in text
        )
        assert "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RAIN-12C<｜tool▁output▁end｜>" in text
        assert text.endswith("<｜tool▁outputs▁end｜><｜end▁of▁sentence｜><｜Assistant｜><think>\n")
    else:
        ids = loop is AGENT_LOOP
        expected = [
            {
                "tool_response": {
                    **({"id": "call_w"} if ids else {}),
                    "name": "get_weather",
                    "content": "RAIN-12C",
                }
            },
            {
                "tool_response": {
                    **({"id": "call_l"} if ids else {}),
                    "name": "HassTurnOn",
                    "content": "LIGHT-ON",
                }
            },
        ]
        assert "<|im_start|>user\n" + "\n".join(compact_json(e) for e in expected) + "<|im_end|>" in text
        # the earlier call reads exactly as the model's own answer would
        start = text.index('{"tool_calls"', asked)
        earlier = parse_output("generic", text[start : text.index("<|im_end|>", start)])
        assert [(c.name, c.arguments) for c in earlier.tool_calls] == [
            ("get_weather", {"location": "Paris", "unit": "celsius"}),
            ("HassTurnOn", {"name": "kitchen"}),
        ]


def test_a_template_that_renders_tools_gets_them_as_they_are(tools: list[ToolSpec]) -> None:
    rendered = render_chat("hermes", AGENT_LOOP[:2], tools, ToolChoice("auto"))
    assert rendered.tools == [t.to_openai() for t in tools]
    assert rendered.messages == AGENT_LOOP[:2]  # no description of edged's own
    text = prompt("hermes", rendered)
    assert "<tools>\n" + compact_json(tools[0].to_openai()) + "\n" in text, "minified"
    assert text.startswith("<|im_start|>system\nYou run the house.\n\n# Tools")


def test_a_template_dumps_tool_definitions_minified_and_everything_else_as_it_asks(
    tools: list[ToolSpec],
) -> None:
    """Qwen's ``tool | tojson`` and Llama 3.1's ``tojson(indent=4)`` of a tool: minified; an earlier
    call's arguments (``tool_call.arguments | tojson``) as the template writes them, the form the model
    itself writes its calls in."""
    rendered = render_chat("hermes", AGENT_LOOP, tools, ToolChoice("auto"))
    text = prompt("hermes", rendered)
    assert '{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}' in text
    for tool in tools:
        assert "\n" + compact_json(tool.to_openai()) + "\n" in text
    indented = (
        "{% for t in tools %}{{ t | tojson(indent=4) }}\n{{ t.function | tojson(indent=4) }}\n{% endfor %}"
        "{{ tools | tojson(indent=1) }}\n{{ {'a': 1} | tojson(indent=2) }}"
    )
    formatter = Jinja2ChatFormatter(indented, eos_token="", bos_token="")
    compact_tools_in(formatter)
    lines = str(formatter(messages=[], tools=rendered.tools).prompt).split("\n", 2 * len(tools) + 1)
    for i, tool in enumerate(tools):
        assert lines[2 * i : 2 * i + 2] == [compact_json(tool.to_openai()), compact_json(tool.to_compact())]
    assert lines[-2] == compact_json(rendered.tools), "the list of them"
    assert lines[-1] == '{\n  "a": 1\n}', "not a tool: as the template asks"


@pytest.mark.parametrize("family", ["deepseek_r1", "generic"])
def test_other_templates_get_the_tools_described_compactly_in_the_system_prompt(
    tools: list[ToolSpec], family: Family
) -> None:
    rendered = render_chat(family, AGENT_LOOP[:2], tools, ToolChoice("auto"))
    assert rendered.tools is None
    system = rendered.messages[0]
    assert system["role"] == "system" and system["content"].startswith("You run the house.\n\n")
    assert "\n" + signatures(tools) + "\n" in system["content"]  # a signature line each
    for tool in tools:
        assert f"\n{tool.name}(" in system["content"]
        assert compact_json(tool.parameters) not in system["content"]
    form = '{"tool_calls":[' if family == "generic" else "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
    assert form in system["content"]
    assert ('{"response":' in system["content"]) == (family == "generic")
    # without a system message, the description is one
    alone = render_chat(family, AGENT_LOOP[1:2], tools, ToolChoice("auto")).messages
    assert alone[0]["role"] == "system" and alone[0]["content"].startswith("You can call these tools")


def test_a_named_choice_describes_only_that_tool_and_none_describes_none(tools: list[ToolSpec]) -> None:
    named = render_chat("generic", AGENT_LOOP[1:2], tools, ToolChoice("named", "HassTurnOn"), parallel=False)
    system = named.messages[0]["content"]
    assert '"name":"HassTurnOn"' in system and "get_weather" not in system
    assert "the tool HassTurnOn" in system and "exactly one call" in system
    none = render_chat("generic", AGENT_LOOP[1:2], tools, ToolChoice("none"))
    assert none.messages == AGENT_LOOP[1:2] and none.tools is None
    hermes_none = render_chat("hermes", AGENT_LOOP[1:2], tools, ToolChoice("none"))
    assert hermes_none.tools is None


def test_content_parts_developer_and_legacy_function_roles_normalize() -> None:
    turns = normalize(
        [
            {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"x":1}'}},
            {"role": "function", "name": "f", "content": {"ok": True}},
        ]
    )
    assert [(t.role, t.content) for t in turns] == [
        ("system", "a\nb"),
        ("assistant", ""),
        ("tool", '{"ok":true}'),
    ]
    assert turns[1].calls[0].arguments == {"x": 1} and turns[2].tool_name == "f"


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ({"role": "wizard", "content": "x"}, "role"),
        ({"role": "user", "content": [{"type": "image_url"}]}, "only text parts"),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
            "not JSON",
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
            "JSON object",
        ),
        ({"role": "assistant", "tool_calls": [{"id": "x"}]}, "function"),
    ],
)
def test_a_malformed_message_is_refused_naming_it(message: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        normalize([{"role": "user", "content": "hi"}, message])
    assert caught.value.param is not None and caught.value.param.startswith("messages[1]")
    assert says in caught.value.message


def test_finish_prompt_leaves_other_prompts_alone() -> None:
    assert (
        finish_prompt("deepseek_r1", "<｜User｜>hi<｜Assistant｜><think>\n")
        == "<｜User｜>hi<｜Assistant｜><think>\n"
    )
    assert finish_prompt("generic", "x<｜tool▁outputs▁end｜>") == "x<｜tool▁outputs▁end｜>"
