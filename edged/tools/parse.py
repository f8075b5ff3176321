"""Calls out of the model's text: all at once (`parse_output`) or as it streams (`StreamParser`).

The input is the answer after reasoning (the caller splits ``<think>`` off first). The output is the
content, free of any call markup, and the calls. Both work the same way, as llama.cpp's
``common_chat_msg_diff``: the text so far is parsed whole (`_parse`, a few microseconds per kilobyte;
answers are at most a context long), and the stream emits what grew since the last piece. Parsing
a prefix gives a prefix of the final content and of each call's arguments, because the parser holds
back what may still change: text that may be the start of a call marker, whitespace before a marker
(removed with it), an unfinished JSON escape, a call whose name is not complete yet.

Content is the text outside call blocks, stripped of the whitespace that touches a block. A block
that is not well formed (cut by ``max_tokens``, or written without a grammar) is left out of the
content and reported in `ParsedOutput.malformed`, never returned as text. Arguments are returned as
the JSON text the model wrote (the stream's pieces join into exactly that text) and parsed into an
object; a call whose arguments are not a JSON object is malformed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edged.engine.text import partial_suffix
from edged.tools.family import Family
from edged.tools.jsonscan import WS, Bad, escape_controls, scan_string, scan_value, skip_ws, string_prefix
from edged.tools.markup import (
    HERMES_CLOSE,
    HERMES_OPEN,
    R1_CALL_BEGIN,
    R1_CALL_END,
    R1_CALLS_BEGIN_VARIANTS,
    R1_CALLS_END,
    R1_SEP,
)
from edged.tools.spec import ToolCall, random_call_id

# ruff: noqa: RUF001 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.


@dataclass
class _Call:
    """A call as parsed so far."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    """Where the arguments' JSON is in the text; `args_end` None while it is not complete."""
    complete: bool = False
    raw_start: int = 0


@dataclass
class _Parsed:
    content: str
    calls: list[_Call]
    text: str
    malformed: list[str] = field(default_factory=list)
    calling: bool = False
    """The text has begun the call part of the answer (a block's opening marker, the generic envelope's
    ``tool_calls`` key), even if no call in it has begun yet."""

    def arguments_text(self, call: _Call) -> str:
        """The arguments' JSON text so far (a string literal, as some models write them, only once
        complete, decoded)."""
        if call.args_start is None:
            return "{}" if call.complete else ""
        end = call.args_end if call.args_end is not None else len(self.text)
        raw = self.text[call.args_start : end].rstrip(WS)
        if raw.startswith('"'):
            if call.args_end is None:
                return ""
            decoded = json.loads(raw, strict=False)
            raw = decoded.strip() if isinstance(decoded, str) else raw
        return escape_controls(raw)


@dataclass(frozen=True)
class ParsedOutput:
    """A finished answer: its content, its calls, and the call blocks that were not well formed."""

    content: str
    tool_calls: list[ToolCall]
    malformed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CallDelta:
    """A piece of one call, OpenAI's ``delta.tool_calls[]``: the first piece of a call carries its
    ``id`` and ``name``, the following ones only ``arguments`` text."""

    index: int
    id: str | None
    name: str | None
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        function["arguments"] = self.arguments
        out["function"] = function
        return out


@dataclass(frozen=True)
class StreamDelta:
    """What one piece of text added: content, or a piece of a call."""

    content: str = ""
    call: CallDelta | None = None


# -- JSON, scanned -------------------------------------------------------------------------------------


def _call_object(text: str, i: int, call: _Call) -> int | None:
    """Scan ``{"name": ..., "arguments": ...}`` (in any order; ``parameters`` is read as arguments)
    at ``i`` into ``call``; the end of the object, or None if the text ends first."""
    if text[i] != "{":
        raise Bad("a call is a JSON object")
    j, n = i + 1, len(text)
    while True:
        j = skip_ws(text, j)
        if j >= n:
            return None
        if text[j] == "}":
            return j + 1
        if text[j] == ",":
            j += 1
            continue
        if text[j] != '"':
            raise Bad("expected a key")
        key_end = scan_string(text, j)
        if key_end is None:
            return None
        key = json.loads(text[j:key_end], strict=False)
        j = skip_ws(text, key_end)
        if j >= n:
            return None
        if text[j] != ":":
            raise Bad("expected ':'")
        j = skip_ws(text, j + 1)
        if j >= n:
            return None
        end = scan_value(text, j)
        if key in ("arguments", "parameters"):
            call.args_start, call.args_end = j, end
        if end is None:
            return None
        if key == "name":
            name = json.loads(text[j:end], strict=False)
            if not isinstance(name, str):
                raise Bad("the name is not a string")
            call.name = name
        j = end


def _find_first(text: str, markers: tuple[str, ...], start: int) -> tuple[int, str] | None:
    found: tuple[int, str] | None = None
    for marker in markers:
        k = text.find(marker, start)
        if k >= 0 and (found is None or k < found[0]):
            found = (k, marker)
    return found


def _expect(text: str, j: int, literal: str) -> int | None:
    """Past ``literal`` at ``j``; None if the text ends inside it; `Bad` if something else is there."""
    part = text[j : j + len(literal)]
    if part == literal:
        return j + len(literal)
    if literal.startswith(part) and j + len(part) == len(text):
        return None
    raise Bad(f"expected {literal!r}")


# -- per family ----------------------------------------------------------------------------------------


class _Segments:
    """Content between call blocks: whitespace touching a block is dropped; the open segment of a
    partial text holds back its trailing whitespace (a block may follow)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.after_block = False

    def add(self, text: str, *, before_block: bool) -> None:
        if self.after_block:
            text = text.lstrip(WS)
        if before_block:
            text = text.rstrip(WS)
        self.parts.append(text)
        self.after_block = before_block

    def close(self, text: str, final: bool) -> None:
        if self.after_block:
            text = text.lstrip(WS)
        if not final:
            text = text.rstrip(WS)
        self.parts.append(text)

    def content(self) -> str:
        return "".join(self.parts)


def _parse_blocks(
    text: str,
    final: bool,
    openers: tuple[str, ...],
    block: Callable[[str, int, list[_Call]], int | None],
) -> _Parsed:
    """Content around the blocks each opener starts; ``block(text, past_opener, calls)`` scans one
    block's calls and returns its end (None: the text ends inside it)."""
    segments = _Segments()
    calls: list[_Call] = []
    malformed: list[str] = []
    pos = 0
    calling = False
    while True:
        found = _find_first(text, openers, pos)
        if found is None:
            tail = text[pos:]
            if not final:
                tail = tail[: len(tail) - partial_suffix(tail, openers)]
            segments.close(tail, final)
            break
        start, opener = found
        calling = True
        segments.add(text[pos:start], before_block=True)
        done = len(calls)
        try:
            end = block(text, start + len(opener), calls)
        except Bad:
            end = -1
        if end is None or end < 0:
            if final or end == -1:
                del calls[done:]
                if final:
                    malformed.append(text[start:])
            break
        pos = end
    return _Parsed(segments.content(), calls, text, malformed, calling=calling)


def _hermes_block(text: str, j: int, calls: list[_Call]) -> int | None:
    j = skip_ws(text, j)
    if j >= len(text):
        return None
    call = _Call(raw_start=j)
    calls.append(call)
    end = _call_object(text, j, call)
    if end is None:
        return None
    if call.name is None:
        raise Bad("a call without a name")
    j = skip_ws(text, end)
    after = _expect(text, j, HERMES_CLOSE)
    if after is None:
        return None
    call.complete = True
    return after


def _r1_block(text: str, j: int, calls: list[_Call]) -> int | None:
    n = len(text)
    while True:
        j = skip_ws(text, j)
        if j >= n:
            return None
        if text.startswith(R1_CALLS_END, j):
            return j + len(R1_CALLS_END)
        if R1_CALLS_END.startswith(text[j:]):
            return None
        if text.startswith(R1_CALL_BEGIN, j):
            j += len(R1_CALL_BEGIN)
        elif R1_CALL_BEGIN.startswith(text[j:]):
            return None
        sep = text.find(R1_SEP, j)
        if sep < 0:
            if "\n" in text[j:] or len(text) - j > 32:
                raise Bad("expected function<｜tool▁sep｜>")
            return None
        line_end = text.find("\n", sep)
        if line_end < 0:
            return None
        call = _Call(raw_start=j)
        calls.append(call)
        name = text[sep + len(R1_SEP) : line_end].strip()
        if not name:
            raise Bad("a call without a name")
        fence = _expect(text, line_end + 1, "```json")
        if fence is None:
            return None
        call.name = name
        j = skip_ws(text, fence)
        if j >= n:
            return None
        call.args_start = j
        end = scan_value(text, j)
        call.args_end = end
        if end is None:
            return None
        closing = _expect(text, skip_ws(text, end), "```")
        if closing is None:
            return None
        after = _expect(text, skip_ws(text, closing), R1_CALL_END)
        if after is None:
            return None
        call.complete = True
        j = after


def _parse_generic(text: str, final: bool) -> _Parsed:
    i = skip_ws(text, 0)
    if i >= len(text):
        return _Parsed(text if final else "", [], text)
    if text[i] != "{":
        return _Parsed(text, [], text)
    calls: list[_Call] = []
    try:
        j = skip_ws(text, i + 1)
        if j >= len(text):
            return _Parsed("" if not final else text, [], text)
        if text[j] != '"':
            raise Bad("not the envelope")
        key_end = scan_string(text, j)
        if key_end is None:
            return _Parsed("" if not final else text, [], text)
        key = json.loads(text[j:key_end], strict=False)
        if key not in ("response", "tool_calls", "tool_call"):
            raise Bad("not the envelope")
        j = skip_ws(text, key_end)
        if j >= len(text):
            return _Parsed("", [], text)
        if text[j] != ":":
            raise Bad("expected ':'")
        j = skip_ws(text, j + 1)
        if j >= len(text):
            return _Parsed("", [], text)
    except Bad:
        return _Parsed(text, [], text)  # some other JSON (or none): the answer is text
    malformed: list[str] = []
    if key == "response":
        if text[j] != '"':
            value_end = scan_value(text, j) if final else None
            return _Parsed(text[j:value_end].strip() if final else "", [], text)
        return _Parsed(string_prefix(text, j), [], text)
    try:
        if key == "tool_call":
            call = _Call(raw_start=j)
            calls.append(call)
            if _call_object(text, j, call) is not None:
                call.complete = call.name is not None
        else:
            if text[j] != "[":
                raise Bad("tool_calls is an array")
            j += 1
            while True:
                j = skip_ws(text, j)
                if j >= len(text) or text[j] == "]":
                    break
                if text[j] == ",":
                    j += 1
                    continue
                call = _Call(raw_start=j)
                calls.append(call)
                end = _call_object(text, j, call)
                if end is None:
                    break
                if call.name is None:
                    raise Bad("a call without a name")
                call.complete = True
                j = end
    except Bad:
        if calls and not calls[-1].complete:
            calls.pop()
        if final:
            malformed.append(text[calls[-1].raw_start if calls else i :])
        return _Parsed("", calls, text, malformed, calling=True)
    if final and calls and not calls[-1].complete:
        malformed.append(text[calls[-1].raw_start :])
    return _Parsed("", calls, text, malformed, calling=True)


def _parse(family: Family, text: str, final: bool) -> _Parsed:
    if family == "generic":
        return _parse_generic(text, final)
    if family == "hermes":
        return _parse_blocks(text, final, (HERMES_OPEN,), _hermes_block)
    return _parse_blocks(text, final, R1_CALLS_BEGIN_VARIANTS, _r1_block)


def _finished(parsed: _Parsed, make_id: Callable[[int], str]) -> ParsedOutput:
    calls: list[ToolCall] = []
    malformed = list(parsed.malformed)
    for index, call in enumerate(parsed.calls):
        if not call.complete or call.name is None:
            continue
        text = parsed.arguments_text(call)
        try:
            arguments = json.loads(text, strict=False)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            malformed.append(parsed.text[call.raw_start : call.args_end])
            continue
        calls.append(ToolCall(make_id(index), call.name, arguments, text))
    return ParsedOutput(parsed.content, calls, malformed)


def parse_output(family: Family, text: str, make_id: Callable[[int], str] = random_call_id) -> ParsedOutput:
    """The content and calls of a finished answer (``make_id(index)`` names each call: its index among
    the calls the text holds, malformed ones counted)."""
    return _finished(_parse(family, text, final=True), make_id)


class StreamParser:
    """Feed the answer's text as it comes; get content and call deltas (OpenAI's streaming shape).
    `finish` flushes what was held back and gives the `ParsedOutput`, the same as `parse_output` on
    the whole text, with the same ids."""

    def __init__(self, family: Family, make_id: Callable[[int], str] = random_call_id) -> None:
        self.family = family
        self._make_id = make_id
        self._text = ""
        self._content = ""
        self._calls: list[tuple[str, str, str]] = []  # (id, name, arguments emitted)

    def feed(self, piece: str) -> list[StreamDelta]:
        self._text += piece
        return self._diff(_parse(self.family, self._text, final=False))

    def finish(self) -> tuple[list[StreamDelta], ParsedOutput]:
        parsed = _parse(self.family, self._text, final=True)
        deltas = self._diff(parsed)
        streamed = [call_id for call_id, _, _ in self._calls]
        result = _finished(parsed, lambda i: streamed[i] if i < len(streamed) else self._make_id(i))
        return deltas, result

    def cut(self) -> tuple[list[StreamDelta], bool]:
        """The answer ends here, before its end (``max_tokens``): flush the content the parser held
        back and say whether a call had begun (then the answer is a call cut in half, not a text
        answer cut short). Text that may be the start of a marker or of the envelope stays out."""
        parsed = _parse(self.family, self._text, final=False)
        if parsed.calling or parsed.calls:
            return [], True
        return self._diff(parsed), False

    def complete_calls(self) -> ParsedOutput:
        """The calls completed so far in an answer cut short (the one being written, and any text
        held back, left out), with the ids the stream gave them."""
        parsed = _parse(self.family, self._text, final=False)
        streamed = [call_id for call_id, _, _ in self._calls]
        return _finished(parsed, lambda i: streamed[i] if i < len(streamed) else self._make_id(i))

    @property
    def calling(self) -> bool:
        """A call has begun in the text so far (its format's opener, or the generic envelope's
        calls)."""
        parsed = _parse(self.family, self._text, final=False)
        return parsed.calling or bool(parsed.calls)

    @property
    def content(self) -> str:
        """The content given out so far (by `feed`, `cut`)."""
        return self._content

    def _diff(self, parsed: _Parsed) -> list[StreamDelta]:
        out: list[StreamDelta] = []
        if parsed.content.startswith(self._content) and len(parsed.content) > len(self._content):
            out.append(StreamDelta(content=parsed.content[len(self._content) :]))
            self._content = parsed.content
        for index, call in enumerate(parsed.calls):
            if call.name is None:
                break
            arguments = parsed.arguments_text(call)
            if index == len(self._calls):
                call_id = self._make_id(index)
                self._calls.append((call_id, call.name, arguments))
                out.append(StreamDelta(call=CallDelta(index, call_id, call.name, arguments)))
                continue
            call_id, name, sent = self._calls[index]
            if arguments.startswith(sent) and len(arguments) > len(sent):
                self._calls[index] = (call_id, name, arguments)
                out.append(StreamDelta(call=CallDelta(index, None, None, arguments[len(sent) :])))
        return out
