"""A sequence's output text, piece by piece: UTF-8, stop strings and ``<think>`` reasoning.

The scheduler feeds each sequence's token bytes to its `SeqText` right where tokens come out, so a
stop string ends its sequence in the same step that completed it. Each stage works on a stream of
small pieces and holds back only as much text as could still turn out to be the start of a stop
string, a tag or a character, so streamed output stays as fresh as the tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from edged.backends.base import THINK_CLOSE, THINK_OPEN


def partial_suffix(text: str, needles: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``needles``."""
    best = 0
    for needle in needles:
        for size in range(min(len(needle) - 1, len(text)), best, -1):
            if text.endswith(needle[:size]):
                best = size
                break
    return best


class StopMatcher:
    """Cuts the output at the first stop string; the stop string itself is not emitted."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text that is now safe to emit. After a stop, everything is swallowed."""
        if self.stopped:
            return ""
        if not self._stops:
            return piece
        text = self._pending + piece
        hits = [(text.find(s), s) for s in self._stops if s in text]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)[0]]
        keep = partial_suffix(text, self._stops)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return "" if self.stopped else out


class ThinkSplitter:
    """Routes text between ``<think>`` and ``</think>`` to reasoning, the rest to content.

    R1-distill chat templates end the prompt with ``<think>\\n``, so the model's output starts inside
    the reasoning block without an opening tag: ``in_think`` says where the output begins.
    """

    def __init__(self, in_think: bool = False) -> None:
        self.in_think = in_think
        self._pending = ""
        self._strip_next = in_think

    def feed(self, piece: str) -> list[tuple[str, str]]:
        """``[(kind, text)]`` with kind ``"reasoning"`` or ``"content"``, in output order."""
        text = self._pending + piece
        self._pending = ""
        out: list[tuple[str, str]] = []
        while text:
            tag = THINK_CLOSE if self.in_think else THINK_OPEN
            at = text.find(tag)
            if at >= 0:
                self._emit(out, text[:at])
                text = text[at + len(tag) :]
                self.in_think = not self.in_think
                self._strip_next = True
                continue
            keep = partial_suffix(text, [tag])
            self._emit(out, text[: len(text) - keep])
            self._pending = text[len(text) - keep :] if keep else ""
            break
        return out

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if self._strip_next:
            text = text.lstrip("\n")
            if not text:
                return
            self._strip_next = False
        if text:
            out.append(("reasoning" if self.in_think else "content", text))

    def flush(self) -> list[tuple[str, str]]:
        text, self._pending = self._pending, ""
        out: list[tuple[str, str]] = []
        self._emit(out, text)
        return out


class SeqText:
    """A sequence's output text: bytes -> UTF-8 -> stop strings -> reasoning/content."""

    def __init__(self, stops: list[str], in_think: bool) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stopper = StopMatcher(stops)
        self._splitter = ThinkSplitter(in_think=in_think)
        self.parts: dict[str, list[str]] = {"content": [], "reasoning": []}

    @property
    def stopped(self) -> bool:
        return self._stopper.stopped

    def feed(self, piece: bytes) -> list[tuple[str, str]]:
        return self._keep(self._splitter.feed(self._stopper.feed(self._decoder.decode(piece))))

    def flush(self) -> list[tuple[str, str]]:
        tail = self._stopper.feed(self._decoder.decode(b"", final=True))
        return self._keep(self._splitter.feed(tail + self._stopper.flush()) + self._splitter.flush())

    def _keep(self, pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for kind, text in pieces:
            self.parts[kind].append(text)
        return pieces
