"""Just enough JSON scanning for text that is still being written.

`scan_value` and `scan_string` find where a JSON value or string ends, or say that the text ends
first (None) or cannot become JSON (`Bad`), without parsing it; `string_prefix` decodes as much of
an unfinished string as no later character can change. Each is fast enough to run on the whole text
at every streamed piece (`edged.tools.parse`).
"""

from __future__ import annotations

import json
import re

WS = " \t\r\n"


class Bad(ValueError):
    """The text cannot become what the format expects, whatever follows (from ``at``)."""

    def __init__(self, message: str, at: int = 0) -> None:
        super().__init__(message)
        self.at = at


_CONTROL_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def escape_controls(raw: str) -> str:
    """JSON text with the raw control characters inside its strings escaped: llama-cpp-python's
    converter lets a string hold them (``char ::= [^"\\\\] | ...``), strict JSON parsers (the
    OpenAI clients') refuse them. Character by character, so a prefix maps to a prefix."""
    if all(ord(c) >= 0x20 for c in raw):
        return raw
    out: list[str] = []
    in_string = escaped = False
    for c in raw:
        if in_string and not escaped and ord(c) < 0x20:
            out.append(_CONTROL_ESCAPES.get(c) or f"\\u{ord(c):04x}")
            continue
        out.append(c)
        if escaped:
            escaped = False
        elif c == "\\" and in_string:
            escaped = True
        elif c == '"':
            in_string = not in_string
    return "".join(out)


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WS:
        i += 1
    return i


_STRING_RUN = re.compile(r'(?:[^"\\]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
"""A JSON string's body up to its closing quote, or to an escape that is unfinished or wrong (a raw
control character too: the converter's grammar admits them, see `escape_controls`)."""
_PARTIAL_ESCAPE_AT_END = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?")


def scan_string(text: str, i: int) -> int | None:
    """The end (past the closing quote) of the JSON string opening at ``i``; None if the text ends
    first. One regular expression: a stream re-scans its text at every piece."""
    run = _STRING_RUN.match(text, i + 1)
    assert run is not None  # it matches the empty string
    j = run.end()
    if j >= len(text):
        return None
    if text[j] == '"':
        return j + 1
    if _PARTIAL_ESCAPE_AT_END.fullmatch(text, j):
        return None
    raise Bad("bad escape", j)


_ATOM = re.compile(r"[-+.0-9eEa-z]+")
_CLOSE = {"}": "{", "]": "["}


def scan_value(text: str, i: int) -> int | None:
    """The end of the JSON value starting at ``i`` (no leading space); None if the text ends first.
    Brackets, strings and atoms are checked as they come; `Bad` for what JSON cannot continue."""
    n = len(text)
    stack: list[str] = []
    j = i
    while j < n:
        c = text[j]
        if c in WS or (stack and c in ",:"):
            j += 1
            continue
        if c == '"':
            end = scan_string(text, j)
            if end is None:
                return None
            j = end
        elif c in "{[":
            stack.append(c)
            j += 1
            continue
        elif c in "}]":
            if not stack or stack.pop() != _CLOSE[c]:
                raise Bad("unbalanced brackets")
            j += 1
        else:
            match = _ATOM.match(text, j)
            if match is None:
                raise Bad(f"unexpected {c!r}")
            j = match.end()
            if not stack and j >= n:
                return None  # a bare number may go on
        if not stack:
            return j
    return None


_PARTIAL_ESCAPE = re.compile(r"\\u(?:[0-9a-fA-F]{0,3}|[dD][89abAB][0-9a-fA-F]{2})$")
"""The end of a string body that cannot be decoded yet: a ``\\u`` escape with fewer than four digits,
or a high surrogate whose pair is still to come."""


def _backslashes_before(body: str, end: int) -> int:
    return end - len(body[:end].rstrip("\\"))


def _decodable(body: str) -> str:
    """The longest prefix of an unfinished string body that decodes the same whatever follows."""
    while True:
        if _backslashes_before(body, len(body)) % 2:
            body = body[:-1]  # half an escape
            continue
        match = _PARTIAL_ESCAPE.search(body)
        if match is not None and _backslashes_before(body, match.start()) % 2 == 0:
            body = body[: match.start()]
            continue
        return body


def string_prefix(text: str, i: int) -> str:
    """The decoded JSON string opening at ``i``, as far as it can be decoded for sure: all of it once
    closed; while open, up to an unfinished escape; up to the fault in a string JSON cannot continue
    (a raw control character, a bad escape). A lone surrogate becomes U+FFFD."""
    try:
        end = scan_string(text, i)
        body = text[i + 1 : end - 1] if end is not None else _decodable(text[i + 1 :])
    except Bad as exc:
        body = _decodable(text[i + 1 : exc.at])
    return _SURROGATE.sub("\ufffd", json.loads('"' + body + '"', strict=False))


_SURROGATE = re.compile("[\ud800-\udfff]")
