"""Conversations fitted into the context by dropping their oldest turns (`edged.tools.history`).
The system tier repeats the main case with the embedded model's real token count."""

from __future__ import annotations

from typing import Any

import pytest

from edged.errors import ContextLengthExceeded
from edged.tools.history import trim_history, turn_starts


def conversation(turns: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": "S" * 100}]
    for i in range(turns):
        out.append({"role": "user", "content": f"question {i} " + "q" * 40})
        if i % 2:
            out.append({"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}"}]})
            out.append({"role": "tool", "tool_call_id": f"c{i}", "content": "r" * 30})
        out.append({"role": "assistant", "content": "a" * 40})
    return out


def chars(messages: list[dict[str, Any]]) -> int:
    return sum(len(m.get("content") or "") + 10 for m in messages)


def test_a_conversation_that_fits_is_kept_whole() -> None:
    messages = conversation(3)
    kept, dropped = trim_history(messages, chars, budget=chars(messages) + 100, reserve=100)
    assert kept is messages and dropped == 0


def test_the_oldest_turns_go_first_and_no_more_than_needed() -> None:
    messages = conversation(10)
    budget, reserve = chars(messages) // 2, 50
    kept, dropped = trim_history(messages, chars, budget, reserve)
    assert chars(kept) + reserve <= budget
    assert kept[0] == messages[0] and kept[-2:] == messages[-2:]
    assert kept == messages[:1] + messages[1 + dropped :]
    assert kept[1]["role"] == "user"  # a whole turn: never a call without its result
    _, starts = turn_starts(messages)
    earlier = max(s for s in starts if s < 1 + dropped)  # keeping one turn more does not fit
    assert chars(messages[:1] + messages[earlier:]) + reserve > budget


def test_calls_and_their_results_stay_together_at_every_budget() -> None:
    messages = conversation(8)
    _, starts = turn_starts(messages)
    smallest = chars(messages[:1] + messages[starts[-1] :]) + 10
    for budget in range(smallest, chars(messages), 37):
        kept, _ = trim_history(messages, chars, budget, 10)
        for i, message in enumerate(kept):
            if message["role"] == "tool":
                assert kept[i - 1]["role"] in ("assistant", "tool")
            if message.get("tool_calls"):
                assert kept[i + 1]["role"] == "tool"


def test_the_last_user_turn_with_its_agent_loop_is_never_dropped() -> None:
    messages = [
        *conversation(4),
        {"role": "user", "content": "now"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]},
        {"role": "tool", "tool_call_id": "x", "content": "done"},
    ]
    kept, dropped = trim_history(messages, chars, budget=chars(messages[:1] + messages[-3:]) + 5, reserve=5)
    assert kept == messages[:1] + messages[-3:]
    assert dropped == len(messages) - 4


def test_when_even_the_system_prompt_and_last_turn_do_not_fit_it_is_context_length_exceeded() -> None:
    messages = conversation(4)
    with pytest.raises(ContextLengthExceeded) as caught:
        trim_history(messages, chars, budget=chars(messages[:1] + messages[-2:]) + 10, reserve=20)
    assert caught.value.code == "context_length_exceeded"
    assert "reserved for the answer" in caught.value.message
    with pytest.raises(ContextLengthExceeded):  # nothing to drop at all
        trim_history(messages[:3], chars, budget=10, reserve=1)


def test_the_token_count_is_asked_a_logarithmic_number_of_times() -> None:
    messages = conversation(64)
    calls = 0

    def counted(ms: list[dict[str, Any]]) -> int:
        nonlocal calls
        calls += 1
        return chars(ms)

    trim_history(messages, counted, budget=chars(messages) // 3, reserve=10)
    assert calls <= 2 + 7  # the whole, the most droppable, then a binary search over 63 turns
