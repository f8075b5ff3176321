"""Integer bounds in the grammar (`edged.engine.intrange`): each range's GBNF, read back by an
independent translation to a regular expression, admits exactly the integers in the range; a bounded
integer inside a schema becomes its range in the converted grammar."""

from __future__ import annotations

import json
import random
import re

import pytest

from edged.engine import bounds
from edged.engine.constraints import schema_to_grammar
from edged.engine.intrange import MAX_DIGITS, integer_range

_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\[[^\]]*\]|\{\d+(?:,\d*)?\}|[()|]|space)')


def regex_of(gbnf: str) -> re.Pattern[str]:
    """The GBNF of a range (literals, classes, groups, alternatives, ``{m,n}``) as a Python regex."""
    out, pos = [], 0
    while pos < len(gbnf.rstrip()):
        m = _TOKEN.match(gbnf, pos)
        assert m is not None, f"unexpected GBNF at {gbnf[pos:]!r}"
        token = m.group(1)
        if token.startswith('"'):
            out.append("(?:" + re.escape(json.loads(token)) + ")")
        elif token == "(":
            out.append("(?:")
        else:
            out.append(token)
        pos = m.end()
    return re.compile("".join(out))


def admitted(gbnf: str, n: int) -> bool:
    return regex_of(gbnf).fullmatch(str(n)) is not None


RANGES = [
    (0, 0), (0, 9), (1, 1440), (0, 100), (-5, 5), (-20, -3), (10, 99), (15, 2000), (7, 7), (-1, 0),
    (99, 101), (1, None), (0, None), (37, None), (None, 10), (None, -4), (None, 0), (-123, None),
    (100, 1000), (555, 5555),
]  # fmt: skip


@pytest.mark.parametrize(("lo", "hi"), RANGES)
def test_a_range_admits_exactly_its_integers(lo: int | None, hi: int | None) -> None:
    gbnf = integer_range(lo, hi)
    low = lo if lo is not None else -3000
    high = hi if hi is not None else 12000
    pattern = regex_of(gbnf)
    for n in range(low - 150, high + 150):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert (pattern.fullmatch(str(n)) is not None) == inside, (n, gbnf)
    for text in ("01", "-0", "00", "+1", "1.0", ""):
        assert pattern.fullmatch(text) is None, (text, gbnf)  # JSON's integers only


def test_random_ranges_and_unbounded_sides_up_to_sixteen_digits() -> None:
    rng = random.Random(7)
    for _ in range(200):
        lo, hi = sorted(rng.randrange(-(10**6), 10**6) for _ in range(2))
        pattern = regex_of(integer_range(lo, hi))
        for n in [lo, hi, lo - 1, hi + 1, *(rng.randrange(lo - 50, hi + 50) for _ in range(40))]:
            assert (pattern.fullmatch(str(n)) is not None) == (lo <= n <= hi), (lo, hi, n)
    top = regex_of(integer_range(1, None))
    assert top.fullmatch("9" * MAX_DIGITS) and not top.fullmatch("1" + "0" * MAX_DIGITS)


def test_a_bounded_integer_in_a_schema_becomes_its_range() -> None:
    schema = {
        "type": "object",
        "properties": {
            "minutes": {"type": "integer", "minimum": 1, "maximum": 1440, "description": "How long"},
            "level": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 11},
            "any": {"type": "integer"},
            "odd": {"type": "integer", "minimum": 1, "multipleOf": 2},
            "list": {"type": "array", "items": {"type": "integer", "minimum": -3, "maximum": 3}},
        },
        "required": ["minutes"],
    }
    gbnf = schema_to_grammar(schema, "x")
    assert "edged-integer" not in gbnf
    assert integer_range(1, 1440) in gbnf and integer_range(1, 10) in gbnf and integer_range(-3, 3) in gbnf
    assert gbnf.count("integral-part") >= 2, "the unbounded and the multipleOf integer stay the converter's"
    bounds.check_grammar(gbnf, "x")  # edged's GBNF reader takes it (llama.cpp's: test_structured)
