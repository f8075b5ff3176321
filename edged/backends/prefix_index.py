"""A radix trie over token sequences: which holder (a KV sequence, a disk entry) has the longest
prefix of a new prompt.

Edges carry runs of tokens, so a 2,000-token prompt costs a handful of nodes, not 2,000 (a plain
per-token trie in Python would spend megabytes per cached prompt on a board with little RAM).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


@dataclass
class _Node:
    edge: tuple[int, ...] = ()
    children: dict[int, _Node] = field(default_factory=dict)
    holders: set[Hashable] = field(default_factory=set)
    """Holders whose token sequence passes through (or ends in) this node."""


def _common(a: Sequence[int], b: Sequence[int], start_b: int) -> int:
    """Length of the common prefix of ``a`` and ``b[start_b:]``."""
    n = min(len(a), len(b) - start_b)
    i = 0
    while i < n and a[i] == b[start_b + i]:
        i += 1
    return i


class PrefixIndex:
    """Maps holders to token sequences; finds the holder sharing the longest prefix with a query."""

    def __init__(self) -> None:
        self._root = _Node()
        self._tokens: dict[Hashable, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, holder: Hashable) -> bool:
        return holder in self._tokens

    def tokens(self, holder: Hashable) -> tuple[int, ...]:
        return self._tokens[holder]

    def holders(self) -> list[Hashable]:
        return list(self._tokens)

    def insert(self, holder: Hashable, tokens: Sequence[int]) -> None:
        """Index ``tokens`` under ``holder`` (replacing what the holder had)."""
        if holder in self._tokens:
            self.remove(holder)
        seq = tuple(tokens)
        self._tokens[holder] = seq
        node, at = self._root, 0
        node.holders.add(holder)
        while at < len(seq):
            child = node.children.get(seq[at])
            if child is None:
                node.children[seq[at]] = _Node(edge=seq[at:], holders={holder})
                return
            n = _common(child.edge, seq, at)
            if n < len(child.edge):  # split the edge where the new sequence leaves it
                lower = _Node(edge=child.edge[n:], children=child.children, holders=set(child.holders))
                child.edge, child.children = child.edge[:n], {lower.edge[0]: lower}
            child.holders.add(holder)
            node, at = child, at + n

    def remove(self, holder: Hashable) -> None:
        seq = self._tokens.pop(holder, None)
        if seq is None:
            return
        node, at = self._root, 0
        node.holders.discard(holder)
        while at < len(seq):
            child = node.children[seq[at]]
            child.holders.discard(holder)
            if not child.holders:
                del node.children[seq[at]]
                return
            node, at = child, at + len(child.edge)

    def longest(self, tokens: Sequence[int]) -> tuple[Hashable | None, int]:
        """The holder sharing the longest prefix with ``tokens`` and that length (None, 0 if none)."""
        node, at = self._root, 0
        best: Hashable | None = None
        while at < len(tokens):
            child = node.children.get(tokens[at])
            if child is None:
                break
            n = _common(child.edge, tokens, at)
            best = next(iter(child.holders))
            at += n
            if n < len(child.edge):
                break
            node = child
        return (best, at) if best is not None else (None, 0)
