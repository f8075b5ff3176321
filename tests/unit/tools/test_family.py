"""A model's tool-call format, recognised from its template and vocabulary (`edged.tools.family`)."""

from __future__ import annotations

import pytest

from edged.bench.vocab import CHAT_TEMPLATE as R1_SHAPED_TEMPLATE
from edged.bench.vocab import SPECIAL_TOKENS as R1_TOKENS
from edged.tools.family import detect_family, template_renders_tools

from .conftest import QWEN25_TEMPLATE, SMOLLM2_TEMPLATE

R1_DISTILL_TEMPLATE = (  # DeepSeek-R1-Distill-Qwen's own, which spells R1's call markup
    "{%- for tool in message['tool_calls']-%}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'"  # noqa: RUF001
    " + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']}}{%- endfor -%}"  # noqa: RUF001
)


def no_tokens(_text: str) -> bool:
    return False


def r1_vocab(text: str) -> bool:
    return text in R1_TOKENS.values()


def test_a_template_that_renders_tools_and_spells_tool_call_is_hermes() -> None:
    assert template_renders_tools(QWEN25_TEMPLATE)
    assert detect_family(QWEN25_TEMPLATE, no_tokens) == "hermes"


def test_r1_markup_in_the_template_or_r1_markers_in_the_vocabulary_is_deepseek_r1() -> None:
    assert detect_family(R1_DISTILL_TEMPLATE, no_tokens) == "deepseek_r1"
    # the R1-shaped model's template renders no tool at all: its vocabulary says what it is
    assert not template_renders_tools(R1_SHAPED_TEMPLATE)
    assert detect_family(R1_SHAPED_TEMPLATE, no_tokens) == "generic"
    assert detect_family(R1_SHAPED_TEMPLATE, r1_vocab) == "deepseek_r1"
    # R1's vocabulary also holds Qwen's <tool_call>: R1 wins, as in llama.cpp
    assert detect_family(QWEN25_TEMPLATE, r1_vocab) == "deepseek_r1"


@pytest.mark.parametrize(
    "template",
    [
        SMOLLM2_TEMPLATE,
        None,
        "",
        # mentions <tool_call> without rendering the tools: nothing tells the model about them
        "{% for m in messages %}{{ m['content'] }}{% endfor %}<tool_call>",
        # renders tools in another format
        "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    ],
)
def test_anything_else_is_generic(template: str | None) -> None:
    assert detect_family(template, no_tokens) == "generic"
