"""Grammars that make a tool call well formed by construction, one per family and choice.

Each tool's arguments schema goes through edged's bounded converter
(`edged.engine.constraints.schema_to_grammar`: the bounds, llama.cpp's converter, the cache); its
rules are renamed into a namespace of their own (``t3-root``, ``t3-space``, ...) and joined by rules
spelling the family's markup around them, as llama.cpp's ``common_chat_params_init_*`` do:

- ``generic``: the whole answer is one JSON object, ``{"tool_calls": [{"name": ..., "arguments":
  {...}}, ...]}``, or (``auto``) ``{"response": "..."}``. Not lazy: the grammar holds from the
  answer's first token (after ``</think>`` for a thinking model, the engine's ``after_think``).
- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, blocks separated by
  a newline. ``auto`` is lazy: free text until the model writes ``<tool_call>``.
- ``deepseek_r1``: ``<｜tool▁calls▁begin｜>`` then ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME``,
  a fenced JSON block and ``<｜tool▁call▁end｜>`` per call (newline-separated), then
  ``<｜tool▁calls▁end｜>``. ``auto`` is lazy, triggered by ``<｜tool▁calls▁begin｜>``.

``parallel_tool_calls``: one or more calls; otherwise exactly one. A lazy grammar is fed from its
trigger on (llama.cpp's trigger words), which is why each grammar starts with the trigger's text.
Every grammar built here is measured by `edged.engine.bounds.check_grammar` before it is returned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edged.backends import Grammar
from edged.engine import bounds
from edged.engine.constraints import LLAMA_SPACE, Constraint, check_answer, schema_to_grammar
from edged.errors import InvalidOutput
from edged.tools.family import Family
from edged.tools.markup import (
    HERMES_CLOSE,
    HERMES_OPEN,
    R1_CALL_BEGIN,
    R1_CALL_END,
    R1_CALLS_BEGIN,
    R1_CALLS_END,
    R1_SEP,
)
from edged.tools.spec import ToolCall, ToolChoice, ToolSpec

# ruff: noqa: RUF002 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.


@dataclass(frozen=True)
class ToolGrammar:
    """A grammar for a tool job, and when it applies."""

    text: str
    root: str = "root"
    trigger: str | None = None
    """None: the grammar holds from the answer's first token. A word: the grammar is lazy (text is
    free until the model writes this word; the grammar then takes the text from the word on). For a
    thinking model both count from ``</think>`` (the engine's ``Grammar.after_think``): the
    reasoning stays free, and a trigger word inside it does not engage the grammar."""


_TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"'  # a literal
    r"|\[(?:[^\]\\]|\\.)*\]"  # a character class
    r"|\{[0-9, ]*\}"  # a repetition count
    r"|#[^\n]*"  # a comment
    r"|([a-zA-Z0-9-]+)"  # a rule name (defined or referenced)
)


def namespaced(grammar: str, prefix: str) -> str:
    """``grammar`` with every rule name prefixed (``root`` becomes ``{prefix}-root``), so that the
    rules of several converted schemas can live in one grammar."""

    def rename(match: re.Match[str]) -> str:
        return f"{prefix}-{match.group(1)}" if match.group(1) else match.group(0)

    return _TOKEN.sub(rename, grammar)


def _literal(text: str) -> str:
    """A GBNF string literal (the names and markup here are printable; quote, backslash and newline
    are escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _arguments(tools: list[ToolSpec], allowed: list[ToolSpec]) -> list[tuple[ToolSpec, str, str]]:
    """(tool, the root rule of its arguments, its rules) for each allowed tool, converted and bounded;
    errors name the tool's place in the request (``tools[2].function.parameters``)."""
    out = []
    for tool in allowed:
        index = tools.index(tool)
        rules = schema_to_grammar(tool.parameters, f"tools[{index}].function.parameters")
        out.append((tool, f"t{index}-root", namespaced(rules, f"t{index}")))
    return out


def _call_rule(converted: list[tuple[ToolSpec, str, str]], tail: str) -> str:
    """``tc-call``: one ``{"name": ..., "arguments": ...}`` object per allowed tool, ``tail`` after it
    (the generic form lets space follow a call inside its array; Hermes closes the block at once)."""
    alternatives = []
    for tool, args, _ in converted:
        name = _literal(f'"{tool.name}"')
        alternatives.append(
            f'"{{" tc-sp "\\"name\\"" tc-sp ":" tc-sp {name} tc-sp "," tc-sp "\\"arguments\\"" tc-sp ":" '
            f'tc-sp {args} "}}"{tail}'
        )
    return "tc-call ::= " + " | ".join(f"( {a} )" for a in alternatives)


def build_grammar(
    family: Family, tools: list[ToolSpec], choice: ToolChoice, *, parallel: bool = True
) -> ToolGrammar | None:
    """The grammar for a tool job, or None when nothing constrains it (``tool_choice: none``)."""
    allowed = choice.allowed(tools)
    if not allowed:
        return None
    converted = _arguments(tools, allowed)
    forced = choice.mode in ("required", "named")
    lines: list[str] = []
    trigger: str | None = None
    if family == "generic":
        calls = 'tc-call ( "," tc-sp tc-call )*' if parallel else "tc-call"
        root = f'"{{" tc-sp "\\"tool_calls\\"" tc-sp ":" tc-sp "[" tc-sp {calls} "]" tc-sp "}}"'
        if not forced:
            root += ' | "{" tc-sp "\\"response\\"" tc-sp ":" tc-sp rs-root "}"'
            lines.append(namespaced(schema_to_grammar({"type": "string"}, "tools (the response)"), "rs"))
        lines.append(f"root ::= {root}")
        lines.append(_call_rule(converted, tail=" tc-sp"))
    elif family == "hermes":
        trigger = None if forced else HERMES_OPEN
        more = ' ( "\\n" tc-block )*' if parallel else ""
        lines.append(f"root ::= tc-block{more}")
        lines.append(
            f"tc-block ::= {_literal(HERMES_OPEN + chr(10))} tc-call {_literal(chr(10) + HERMES_CLOSE)}"
        )
        lines.append(_call_rule(converted, tail=""))
    else:
        trigger = None if forced else R1_CALLS_BEGIN
        more = ' ( "\\n" tc-call )*' if parallel else ""
        lines.append(f"root ::= {_literal(R1_CALLS_BEGIN)} tc-call{more} {_literal(R1_CALLS_END)}")
        alternatives = [
            f"( {_literal(tool.name + chr(10) + '```json' + chr(10))} {args} )" for tool, args, _ in converted
        ]
        lines.append(
            f"tc-call ::= {_literal(R1_CALL_BEGIN + 'function' + R1_SEP)} ( {' | '.join(alternatives)} ) "
            f"{_literal(chr(10) + '```' + R1_CALL_END)}"
        )
    lines.append(f"tc-sp ::= {LLAMA_SPACE}")
    lines.extend(rules.strip() for _, _, rules in converted)
    text = "\n".join(lines) + "\n"
    bounds.check_grammar(text, "tools (as a grammar)")
    return ToolGrammar(text, "root", trigger)


def check_call(call: ToolCall, tools: list[ToolSpec], choice: ToolChoice) -> None:
    """Raise `InvalidOutput` unless ``call`` names a tool the choice allows and its arguments validate
    against that tool's schema as the client sent it (the grammar makes them well formed; the schema
    may say more than a grammar can, or than the bounds let into it). Bounded as every answer is
    (`edged.engine.constraints.check_answer`)."""
    tool = next((t for t in choice.allowed(tools) if t.name == call.name), None)
    if tool is None:
        raise InvalidOutput(
            f"the model called {call.name[:80]!r}, which is not a tool it may call", content=call.name
        )
    constraint = Constraint("json_schema", Grammar(""), tool.parameters, tool.name)
    try:
        check_answer(constraint, call.arguments_json)
    except InvalidOutput as exc:
        raise InvalidOutput(
            f"the arguments of {tool.name}: {exc.message}", content=call.arguments_json
        ) from None
