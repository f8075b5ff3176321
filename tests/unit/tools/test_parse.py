"""Calls parsed out of finished and streamed text (`edged.tools.parse`): content never holds call
markup, and a stream's pieces join into exactly what the finished parse returns."""

# ruff: noqa: RUF001 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.

from __future__ import annotations

import json

import pytest

from edged.tools.family import Family
from edged.tools.parse import CallDelta, StreamDelta, StreamParser, parse_output

R1_CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>"


def r1(*calls: tuple[str, str]) -> str:
    body = "\n".join(R1_CALL.format(name=n, args=a) for n, a in calls)
    return f"<｜tool▁calls▁begin｜>{body}<｜tool▁calls▁end｜>"


def hermes(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


CASES: list[tuple[Family, str, str, list[tuple[str, str]]]] = [
    # (family, text, content, [(name, arguments JSON)])
    ("hermes", "The capital is Paris.", "The capital is Paris.", []),
    (
        "hermes",
        "Let me check.\n" + hermes("get_weather", '{"location": "Paris", "unit": "celsius"}'),
        "Let me check.",
        [("get_weather", '{"location": "Paris", "unit": "celsius"}')],
    ),
    (
        "hermes",
        hermes("a", "{}") + "\n" + hermes("b", '{"x": [1, {"y": "}"}]}') + "\nDone.",
        "Done.",
        [("a", "{}"), ("b", '{"x": [1, {"y": "}"}]}')],
    ),
    (  # arguments written as a JSON string, as some models do
        "hermes",
        '<tool_call>\n{"name": "a", "arguments": "{\\"k\\": 1}"}\n</tool_call>',
        "",
        [("a", '{"k": 1}')],
    ),
    ("hermes", "a < b, and <tool_call is not a call", "a < b, and <tool_call is not a call", []),
    ("deepseek_r1", "No tools needed: 4.", "No tools needed: 4.", []),
    (
        "deepseek_r1",
        "Calling.\n" + r1(("get_weather", '{"location": "Zürich"}'), ("HassTurnOn", '{"name": "kitchen"}')),
        "Calling.",
        [("get_weather", '{"location": "Zürich"}'), ("HassTurnOn", '{"name": "kitchen"}')],
    ),
    (  # a variant opening llama.cpp also accepts, and no call-begin marker
        "deepseek_r1",
        '<｜tool▁calls｜>function<｜tool▁sep｜>f\n```json\n{"a": 1}\n```'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "",
        [("f", '{"a": 1}')],
    ),
    ("generic", '{"response": "Hi \\"you\\"\\n\\u00e9 \\ud83d\\ude00"}', 'Hi "you"\né 😀', []),
    (
        "generic",
        '{"tool_calls": [{"name": "a", "arguments": {"s": "x,y]}"}}, {"arguments": {}, "name": "b"}]}',
        "",
        [("a", '{"s": "x,y]}"}'), ("b", "{}")],
    ),
    ("generic", '{"tool_call": {"name": "a", "arguments": {"n": 1}}}', "", [("a", '{"n": 1}')]),
    ("generic", "Plain text, no JSON.", "Plain text, no JSON.", []),
    ("generic", '{"answer": 42}', '{"answer": 42}', []),
    (  # a raw newline in a string (the converter's grammar admits it) comes out escaped
        "generic",
        '{"tool_calls": [{"name": "a", "arguments": {"s": "two\nlines"}}]}',
        "",
        [("a", '{"s": "two\\nlines"}')],
    ),
]


@pytest.mark.parametrize(("family", "text", "content", "calls"), CASES)
def test_finished_text_parses_into_content_and_calls(
    family: Family, text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    result = parse_output(family, text, lambda i: f"call_{i}")
    assert result.content == content
    assert [(c.name, c.arguments_json) for c in result.tool_calls] == calls
    assert [c.id for c in result.tool_calls] == [f"call_{i}" for i in range(len(calls))]
    for call in result.tool_calls:
        assert json.loads(call.arguments_json) == call.arguments  # strict JSON, as OpenAI clients parse
    assert result.malformed == []


def stream(family: Family, text: str, step: int) -> tuple[list[StreamDelta], str, dict[int, str]]:
    parser = StreamParser(family, lambda i: f"call_{i}")
    deltas: list[StreamDelta] = []
    for start in range(0, len(text), step):
        deltas += parser.feed(text[start : start + step])
    more, result = parser.finish()
    deltas += more
    content = "".join(d.content for d in deltas)
    arguments: dict[int, str] = {}
    for delta in deltas:
        if delta.call is not None:
            arguments[delta.call.index] = arguments.get(delta.call.index, "") + delta.call.arguments
    assert content == result.content
    complete = [int(c.id.removeprefix("call_")) for c in result.tool_calls]  # a cut call streamed a part
    assert [arguments[i] for i in complete] == [c.arguments_json for c in result.tool_calls]
    return deltas, content, arguments


@pytest.mark.parametrize(("family", "text", "content", "calls"), CASES)
@pytest.mark.parametrize("step", [1, 2, 5, 17])
def test_a_stream_in_any_pieces_joins_into_the_finished_parse(
    family: Family, text: str, content: str, calls: list[tuple[str, str]], step: int
) -> None:
    deltas, streamed, _ = stream(family, text, step)
    assert streamed == content
    headers = [d.call for d in deltas if d.call is not None and d.call.id is not None]
    assert [(h.index, h.id, h.name) for h in headers] == [
        (i, f"call_{i}", n) for i, (n, _) in enumerate(calls)
    ]
    for delta in deltas:  # markup never leaks, even in a piece
        for marker in ("<tool_call>", "</tool_call>", "tool▁call", '"tool_calls"', '"response"'):
            assert marker not in delta.content


def test_the_first_piece_of_a_call_carries_id_and_name_then_only_arguments() -> None:
    text = hermes("get_weather", '{"location": "Paris"}')
    deltas, _, _ = stream("hermes", text, 1)
    calls = [d.call for d in deltas if d.call is not None]
    assert calls[0] == CallDelta(0, "call_0", "get_weather", "")
    assert all(c.id is None and c.name is None for c in calls[1:])
    assert len(calls) > 5  # the arguments arrive in pieces, not at the end
    assert calls[1].to_openai() == {"index": 0, "function": {"arguments": calls[1].arguments}}
    assert calls[0].to_openai() == {
        "index": 0,
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }


def test_text_that_may_open_a_call_is_held_back_until_it_does_not() -> None:
    parser = StreamParser("hermes")
    assert [d.content for d in parser.feed("Sure <tool")] == ["Sure"]
    assert parser.feed("_cal") == []
    assert [d.content for d in parser.feed("m is a word")] == [" <tool_calm is a word"]
    parser = StreamParser("deepseek_r1")
    assert [d.content for d in parser.feed("ok <｜tool")] == ["ok"]
    assert parser.feed("▁calls▁begin｜>") == []


def test_a_generic_response_streams_as_decoded_text_without_half_escapes() -> None:
    parser = StreamParser("generic")
    pieces = ['{"resp', 'onse": "a\\', "n b \\u00", "e9 \\ud83d", "\\ude00", '"}']
    got = ["".join(d.content for d in parser.feed(p)) for p in pieces]
    assert got == ["", "a", "\n b ", "é ", "😀", ""]


@pytest.mark.parametrize(
    ("family", "pieces", "content", "began"),
    [
        ("generic", ['{"response": "Hello, I', "'m here \\u00"], "Hello, I'm here ", False),
        ("generic", ['{ "resp'], "", False),
        ("generic", ['{"tool_calls": ['], "", True),
        ("generic", ['{"tool_call": {"na'], "", True),
        ("hermes", ["Sure, ", "it is <tool_ca"], "Sure, it is", False),
        ("hermes", ["Sure.\n<tool_call>\n{"], "Sure.", True),
        ("deepseek_r1", ["ok <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>func"], "ok", True),
    ],
)
def test_a_cut_answer_is_a_text_cut_short_or_a_call_cut_in_half(
    family: Family, pieces: list[str], content: str, began: bool
) -> None:
    """At max_tokens: text so far is the content (no envelope, marker or half escape); a call that
    began is not flushed, so the scheduler can report it cut."""
    parser = StreamParser(family)
    streamed = "".join(d.content for p in pieces for d in parser.feed(p))
    deltas, began_a_call = parser.cut()
    assert began_a_call is began
    assert streamed + "".join(d.content for d in deltas) == parser.content == content
    assert all(d.call is None for d in deltas)


@pytest.mark.parametrize(
    ("family", "text", "content", "kept"),
    [
        ("hermes", 'Hi.\n<tool_call>\n{"name": "a", "arguments": {"x": 1', "Hi.", 0),  # cut by max_tokens
        ("hermes", "Hi.\n<tool_call>\nnot json at all\n</tool_call>", "Hi.", 0),
        ("hermes", hermes("a", "{}") + '\n<tool_call>\n{"name": 3}', "", 1),
        ("deepseek_r1", r1(("a", "{}"))[:-30], "", 0),
        ("deepseek_r1", "x <｜tool▁calls▁begin｜>garbage\nmore", "x", 0),
        ("generic", '{"tool_calls": [{"name": "a", "arguments": {}}, {"name": "b", "argu', "", 1),
        ("generic", '{"tool_calls": [{"name": "a", "arguments": []}]}', "", 0),  # not an object
    ],
)
def test_a_malformed_call_is_reported_never_returned_as_content(
    family: Family, text: str, content: str, kept: int
) -> None:
    result = parse_output(family, text)
    assert result.content == content
    assert len(result.tool_calls) == kept
    assert result.malformed and all(m.strip() for m in result.malformed)
    _, streamed, _ = stream(family, text, 3)
    assert streamed == content


@pytest.mark.parametrize(
    ("family", "text", "names"),
    [
        ("generic", '{"tool_calls": [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "argu', ["a"]),
        ("generic", '{"tool_calls": [{"name": "a", "argu', []),
        (
            "hermes",
            'Hi.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"na',
            ["a"],
        ),
    ],
)
def test_an_answer_cut_while_writing_a_call_keeps_the_complete_ones(
    family: Family, text: str, names: list[str]
) -> None:
    parser = StreamParser(family, lambda i: f"call_{i}")
    parser.feed(text)
    kept = parser.complete_calls()
    assert [c.name for c in kept.tool_calls] == names and kept.malformed == []
    assert [c.id for c in kept.tool_calls] == [f"call_{i}" for i in range(len(names))]
