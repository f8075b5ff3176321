"""Fit a conversation into the context: drop its oldest turns (issue 23, ``context_overflow:
trim_history``), as Ollama does, which chat clients such as Home Assistant rely on.

A turn starts at a user message and runs to the next one (the assistant's answer, its calls, their
results): dropping whole turns never separates a call from its result and keeps the conversation
starting with a user message after the system prompt, as strict templates require. Never dropped:
the system messages at the start (where the tool definitions are rendered) and the last user turn
(the question being answered, with the calls and results of the agent loop in progress).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from edged.errors import ContextLengthExceeded

M = TypeVar("M")


def _role(message: Any) -> str | None:
    role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
    return role if isinstance(role, str) else None


def turn_starts(messages: list[Any]) -> tuple[int, list[int]]:
    """Where the leading system messages end, and where each turn after them starts (a leading run
    of non-user messages after the system prompt is a turn of its own)."""
    head = 0
    while head < len(messages) and _role(messages[head]) in ("system", "developer"):
        head += 1
    starts = [head] if head < len(messages) else []
    for i in range(head + 1, len(messages)):
        if _role(messages[i]) == "user":
            starts.append(i)
    return head, starts


def trim_history(
    messages: list[M],
    count_tokens: Callable[[list[M]], int],
    budget: int,
    reserve: int,
) -> tuple[list[M], int]:
    """``messages`` without their oldest turns, as few dropped as make ``count_tokens(messages) +
    reserve <= budget``; returns the messages kept and how many messages were dropped. Raises
    `ContextLengthExceeded` when even the system prompt and the last user turn do not fit.

    ``count_tokens`` counts the whole prompt the messages render to (tools included); it is called
    O(log turns) times (a binary search on the number of turns dropped)."""
    limit = budget - reserve
    if count_tokens(messages) <= limit:
        return messages, 0
    head, starts = turn_starts(messages)
    droppable = max(len(starts) - 1, 0)  # the last turn stays

    def without(turns: int) -> list[M]:
        return messages[:head] + messages[starts[turns] :] if turns else messages

    low, high = 1, droppable  # the fewest turns to drop lies in [low, high], if it fits at all
    if droppable == 0 or count_tokens(without(droppable)) > limit:
        kept = without(droppable)
        raise ContextLengthExceeded(
            f"the prompt needs {count_tokens(kept)} tokens with only the system prompt and the last user "
            f"turn kept, and {reserve} are reserved for the answer: more than the context of {budget}",
            param="messages",
        )
    while low < high:
        middle = (low + high) // 2
        if count_tokens(without(middle)) <= limit:
            high = middle
        else:
            low = middle + 1
    kept = without(low)
    return kept, len(messages) - len(kept)
