"""Scanning JSON that is still being written (`edged.tools.jsonscan`)."""

from __future__ import annotations

import json

import pytest

from edged.tools.jsonscan import Bad, escape_controls, scan_string, scan_value, string_prefix

VALUES = ['{"a": [1, {"b": "}]\\""}], "c": null}', '[true, false, -1.5e3, "x"]', '"\\u00e9\\n"', "{}"]


@pytest.mark.parametrize("value", VALUES)
def test_a_value_ends_where_json_says_and_every_prefix_is_unfinished(value: str) -> None:
    assert scan_value(value + ' , "next"', 0) == len(value)
    for cut in range(1, len(value)):
        assert scan_value(value[:cut], 0) is None


@pytest.mark.parametrize("text", ['{"a": 1]', '{"a": @}', '"\\x"', '"\\u12g4"'])
def test_what_json_cannot_continue_is_bad(text: str) -> None:
    with pytest.raises(Bad):
        scan_value(text, 0)


def test_a_bare_number_is_unfinished_until_something_follows_it() -> None:
    assert scan_value("12", 0) is None
    assert scan_value("12,", 0) == 2


def test_strings_end_at_their_quote_whatever_they_escape() -> None:
    assert scan_string('"a\\"b" x', 0) == 6
    assert scan_string('"a\\', 0) is None
    assert scan_string('"a\\u00', 0) is None
    assert scan_string('"raw\ncontrol"', 0) == 13  # the converter's grammar admits them


def test_an_unfinished_string_decodes_only_what_cannot_change() -> None:
    full = '"caf\\u00e9 \\ud83d\\ude00 \\\\u12 end"'
    decoded = json.loads(full)
    for cut in range(1, len(full)):
        assert decoded.startswith(string_prefix(full[:cut], 0))
    assert string_prefix(full, 0) == decoded
    assert string_prefix('"a\\q bad escape', 0) == "a"  # up to the fault
    assert string_prefix('"lone \\ud83d"', 0) == "lone \ufffd"


def test_control_characters_in_strings_are_escaped_prefix_by_prefix() -> None:
    raw = '{"s": "two\nlines\tand\x01", "t": 1}\n'
    escaped = escape_controls(raw)
    assert json.loads(escaped) == json.loads(raw, strict=False)
    assert escaped.endswith("}\n")  # whitespace between tokens stays
    for cut in range(len(raw)):
        assert escaped.startswith(escape_controls(raw[:cut]))
