"""Integer bounds (``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``) in the grammar.

llama-cpp-python's converter writes every ``{"type": "integer"}`` as any integer, so a bounded one was
only checked on the answer (a tool call with ``"minutes": -7`` for ``minimum: 1`` was `invalid_output`).
llama.cpp's own converter spells the range out digit by digit; edged does the same here:
`with_integer_ranges` swaps each bounded integer of a schema for a marker the converter writes as a
literal, and `put_ranges` puts the range's GBNF where the marker's literal is. The range is written
as alternatives of digit classes that share no first digit within one length (``[1-9] [0-9] |
"100"`` for 10..100), so the grammar stays small and each character leaves few ways on (edged's
grammar bounds still check the result). The answer is still validated against the client's schema.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

MAX_DIGITS = 16
"""Digits of an integer with no upper (or lower) bound, as llama.cpp's converter allows: past int64's
precision no client means a larger one."""

_SCHEMA_WORDS = frozenset(
    {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "description", "title", "default",
     "examples", "$comment"}
)  # fmt: skip
"""The keywords a bounded integer may have for edged to write it as a range (anything else, such as
``multipleOf``, ``enum`` or ``const``, leaves it to the converter and the check on the answer)."""


def _same_length(a: str, b: str) -> str:
    """Digit strings ``a``..``b`` of the same length, leading zeros allowed (a number's tail)."""
    if a == b:
        return f'"{a}"'
    if len(a) == 1:
        return _class(a, b)
    rest = len(a) - 1
    tail_any = f"[0-9]{{{rest}}}" if rest > 1 else "[0-9]"
    if a[0] == b[0]:
        return f'"{a[0]}" ({_same_length(a[1:], b[1:])})'
    if a[1:] == "0" * rest and b[1:] == "9" * rest:
        return f"{_class(a[0], b[0])} {tail_any}"
    out = [f'"{a[0]}" ({_same_length(a[1:], "9" * rest)})']
    if int(a[0]) + 1 <= int(b[0]) - 1:
        out.append(f"{_class(str(int(a[0]) + 1), str(int(b[0]) - 1))} {tail_any}")
    out.append(f'"{b[0]}" ({_same_length("0" * rest, b[1:])})')
    return " | ".join(out)


def _class(a: str, b: str) -> str:
    return f"[{a}]" if a == b else f"[{a}-{b}]"


def _natural(lo: int, hi: int | None) -> list[str]:
    """Alternatives for ``lo``..``hi`` (None: no upper bound), ``lo`` >= 0, canonical (no leading 0)."""
    out: list[str] = []
    top = hi if hi is not None else 10**MAX_DIGITS - 1
    length = len(str(lo))
    while lo <= top:
        end = min(top, 10**length - 1)
        if hi is None and lo == 10 ** (length - 1) and length > 1:  # every longer number, at once
            out.append(f"[1-9] [0-9]{{{length - 1},{MAX_DIGITS - 1}}}")
            break
        out.append(_same_length(str(lo), str(end)) if length > 1 else _class(str(lo), str(end)))
        lo, length = end + 1, length + 1
    return out


def integer_range(lo: int | None, hi: int | None) -> str:
    """GBNF for the JSON integers from ``lo`` to ``hi`` (None: unbounded on that side)."""
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"an empty range: {lo}..{hi}")
    parts: list[str] = []
    if lo is None or lo < 0:  # the negative part: "-" then 1..-lo (or any)
        upper = None if lo is None else -lo
        lower = 1 if hi is None or hi >= 0 else -hi
        parts.append(f'"-" ({" | ".join(_natural(lower, upper))})')
    if hi is None or hi >= 0:
        parts.extend(_natural(max(lo, 0) if lo is not None else 0, hi))
    return " | ".join(parts)


def _bounds(schema: dict[str, Any]) -> tuple[int | None, int | None] | None:
    """The integer range a schema allows, or None when it is not a bounded integer edged can write."""
    if schema.get("type") != "integer" or not set(schema) <= _SCHEMA_WORDS:
        return None
    lo: int | None = None
    hi: int | None = None
    for word, exclusive in (("minimum", False), ("exclusiveMinimum", True)):
        value = schema.get(word)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        bound = math.floor(value) + 1 if exclusive else math.ceil(value)
        lo = bound if lo is None else max(lo, bound)
    for word, exclusive in (("maximum", False), ("exclusiveMaximum", True)):
        value = schema.get(word)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        bound = math.ceil(value) - 1 if exclusive else math.floor(value)
        hi = bound if hi is None else min(hi, bound)
    if lo is None and hi is None:
        return None
    limit = 10**MAX_DIGITS - 1
    if (lo is not None and abs(lo) > limit) or (hi is not None and abs(hi) > limit):
        return None
    if lo is not None and hi is not None and lo > hi:
        return None  # no integer: the converter's any-integer, and the answer's check says so
    return lo, hi


def with_integer_ranges(schema: Any) -> tuple[Any, dict[str, str]]:
    """``schema`` with each bounded integer swapped for a ``const`` marker, and each marker's GBNF
    literal (as the converter writes a string const) with the range to put in its place."""
    tag = secrets.token_hex(6)
    ranges: dict[str, str] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        bounds = _bounds(node)
        if bounds is not None:
            marker = f"edged-integer-{tag}-{len(ranges)}"
            ranges[f'"\\"{marker}\\""'] = f"({integer_range(*bounds)}) space"
            return {"const": marker}
        return {key: (value if key in ("enum", "const", "default", "examples") else walk(value))
                for key, value in node.items()}  # fmt: skip

    return walk(schema), ranges


def put_ranges(gbnf: str, ranges: dict[str, str]) -> str:
    """The converter's grammar with each marker's literal replaced by its range."""
    for literal, rule in ranges.items():
        gbnf = gbnf.replace(literal, rule)
    return gbnf
