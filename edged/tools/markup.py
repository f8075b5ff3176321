"""The markup each family writes around a call, in one place (prompts, grammars and parsers use it)."""

# ruff: noqa: RUF001 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.

from __future__ import annotations

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"

R1_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
R1_CALLS_END = "<｜tool▁calls▁end｜>"
R1_CALL_BEGIN = "<｜tool▁call▁begin｜>"
R1_CALL_END = "<｜tool▁call▁end｜>"
R1_SEP = "<｜tool▁sep｜>"
R1_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
R1_ASSISTANT = "<｜Assistant｜>"
R1_END_OF_SENTENCE = "<｜end▁of▁sentence｜>"

R1_CALLS_BEGIN_VARIANTS = (
    R1_CALLS_BEGIN,
    "<｜tool_calls_begin｜>",
    "<｜tool calls begin｜>",
    "<｜tool\\_calls\\_begin｜>",
    "<｜tool▁calls｜>",
)
"""What R1 distills write to open their calls (llama.cpp accepts the same variants: the 7B and 32B
distills confuse the spelling); edged's grammar writes only the first."""
