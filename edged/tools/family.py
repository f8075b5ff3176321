"""Which tool-call format a model writes, recognised from its GGUF (never from the file's name).

- ``deepseek_r1``: the chat template spells R1's call markup (``<｜tool▁calls▁begin｜>``), or the
  vocabulary holds R1's chat markers (``<｜Assistant｜>``): the R1 distills' templates (and the
  R1-shaped test model's) do not render tools at all, yet the model was trained on R1's markup.
- ``hermes``: the template renders the ``tools`` variable and spells ``<tool_call>`` (Hermes 2/3 Pro,
  Qwen 2.5 Instruct, Qwen 3): the template itself tells the model about the tools.
- ``generic``: anything else (the embedded SmolLM2): the answer is one JSON object, either the calls or
  a text response, which a grammar can force on any model.

The checks follow llama.cpp's ``common_chat_templates_apply_jinja``, which picks its handler from the
template's source the same way (R1 before Hermes).
"""

# ruff: noqa: RUF002 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from edged.tools.markup import HERMES_OPEN, R1_ASSISTANT, R1_CALLS_BEGIN

if TYPE_CHECKING:
    from edged.backends.gguf_prompt import GgufTokenizer

Family = Literal["hermes", "deepseek_r1", "generic"]
FAMILIES: tuple[Family, ...] = ("hermes", "deepseek_r1", "generic")


_RENDERS_TOOLS = re.compile(r"\{[{%][^}]*\btools\b")
"""The template uses the ``tools`` variable inside a Jinja expression or statement."""


def template_renders_tools(template: str | None) -> bool:
    return bool(template) and _RENDERS_TOOLS.search(template or "") is not None


def detect_family(template: str | None, has_token: Callable[[str], bool]) -> Family:
    """The family of a model with this chat template and vocabulary (``has_token(text)``: the text is
    one token of the vocabulary)."""
    text = template or ""
    if R1_CALLS_BEGIN in text or has_token(R1_ASSISTANT):
        return "deepseek_r1"
    if HERMES_OPEN in text and template_renders_tools(text):
        return "hermes"
    return "generic"


def family_of(tokenizer: GgufTokenizer) -> Family:
    """`detect_family` for a loaded GGUF (its template and its vocabulary)."""

    def has_token(text: str) -> bool:
        tokens = tokenizer.tokenize(text, chat=True)  # special tokens parsed, no BOS added
        return len(tokens) == 1 and tokenizer.token_text(tokens[0]) == text

    return detect_family(tokenizer.template, has_token)
