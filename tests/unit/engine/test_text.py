"""`edged.engine.text`: stop strings and <think> splitting must not depend on how the text was cut
into tokens."""

from __future__ import annotations

import itertools

import pytest

from edged.engine.text import SeqText, StopMatcher, ThinkSplitter


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def run_split(text: str, size: int, in_think: bool = False) -> tuple[str, str]:
    splitter = ThinkSplitter(in_think)
    out = list(itertools.chain.from_iterable(splitter.feed(p) for p in pieces(text, size)))
    out += splitter.flush()
    reasoning = "".join(t for k, t in out if k == "reasoning")
    content = "".join(t for k, t in out if k == "content")
    return reasoning, content


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_think_split_any_chunking(size: int) -> None:
    text = "<think>\nLet me add 2 and 2.\n</think>\n\nThe answer is 4."
    assert run_split(text, size) == ("Let me add 2 and 2.\n", "The answer is 4.")


@pytest.mark.parametrize("size", [1, 4, 50])
def test_r1_template_starts_inside_think(size: int) -> None:
    assert run_split("Hmm, 2+2.\n</think>\n\n4", size, in_think=True) == ("Hmm, 2+2.\n", "4")


def test_reasoning_before_content_order_and_partial_tag_at_end() -> None:
    splitter = ThinkSplitter()
    kinds = [k for p in pieces("<think>a</think>b", 1) for k, _ in splitter.feed(p)]
    assert kinds == ["reasoning", "content"]
    s = ThinkSplitter()
    assert s.feed("x <thi") == [("content", "x ")]
    assert s.flush() == [("content", "<thi")]


def test_text_without_tags_is_content() -> None:
    assert run_split("plain < and > text", 1) == ("", "plain < and > text")


@pytest.mark.parametrize("size", [1, 2, 3, 10])
def test_stop_strings_any_chunking(size: int) -> None:
    m = StopMatcher(["STOP", "\n\n"])
    out = "".join(m.feed(p) for p in pieces("abc ST def STOP ghi", size)) + m.flush()
    assert out == "abc ST def "
    assert m.stopped


def test_earliest_stop_wins_and_no_stop_passes_through() -> None:
    m = StopMatcher(["world", "lo"])
    assert m.feed("hello world") == "hel"
    m = StopMatcher([])
    assert m.feed("anything") == "anything"
    m = StopMatcher(["xyz"])
    assert m.feed("abcx") == "abc"
    assert m.flush() == "x"


def test_seq_text_joins_split_characters_stops_and_splits_the_reasoning() -> None:
    """`SeqText` as the scheduler feeds it: token bytes that may cut a UTF-8 character."""
    data = "<think>ö?</think>\n\nGrüße, fertig. STOP und mehr".encode()
    text = SeqText(["STOP"], in_think=False)
    out = [part for i in range(len(data)) for part in text.feed(data[i : i + 1])]
    assert text.stopped
    out += text.flush()
    assert "".join(t for k, t in out if k == "reasoning") == "ö?"
    assert "".join(t for k, t in out if k == "content") == "Grüße, fertig. "
    assert ("".join(text.parts["reasoning"]), "".join(text.parts["content"])) == ("ö?", "Grüße, fertig. ")
