"""`BackendHost`: the chosen backend loaded, else the next of the profile; a backend that fails
during a job replaced before the next one, with the reason kept for /status (stand-in backends
that record what was asked of them; tests/test_npu.py covers the same with the real daemon)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import BOARDS

from edged.backends import BackendChoice, Capabilities
from edged.board import detect_board
from edged.config import Settings
from edged.engine.backend_host import BackendHost
from edged.errors import BackendError


def stand_in(name: str, calls: list[str], *, loads: bool = True) -> type:
    """A backend class that records ``name.load(slots)`` / ``name.close`` and fails to load unless
    ``loads``."""

    class StandIn:
        def __init__(self, board: Any, settings: Any) -> None:
            calls.append(f"{name}()")

        def load(self, slots: int) -> Capabilities:
            calls.append(f"{name}.load({slots})")
            if not loads:
                raise BackendError(f"{name} will not load")
            return Capabilities(max_sequences=slots, prefix_cache=False)

        def close(self) -> None:
            calls.append(f"{name}.close")

    return StandIn


@pytest.fixture
def host_of(settings_of: Callable[..., Settings]) -> Callable[..., tuple[BackendHost, list[bool]]]:
    board = detect_board(BOARDS / "x86", user_dir=None)

    def make(first: tuple[str, type], *fallbacks: tuple[str, type]) -> tuple[BackendHost, list[bool]]:
        told: list[bool] = []
        choice = BackendChoice(first[0], first[1], [], forced=False, fallbacks=fallbacks)  # type: ignore[arg-type]
        return BackendHost(settings_of(engine={"parallel": "3"}), board, choice, told.append), told

    return make


def test_the_chosen_backend_is_loaded_with_the_configured_slots(host_of) -> None:
    calls: list[str] = []
    host, told = host_of(("a", stand_in("a", calls)), ("b", stand_in("b", calls)))
    caps = host.load_first()
    assert (caps.max_sequences, host.state.capabilities) == (3, caps)
    assert calls == ["a()", "a.load(3)"], "a fallback is constructed only when it is needed"
    assert (host.state.backend_name, host.state.fallback_reasons, told) == ("a", [], [])


def test_a_backend_that_fails_to_load_gives_way_to_the_next_with_the_reason(host_of) -> None:
    calls: list[str] = []
    host, told = host_of(
        ("a", stand_in("a", calls, loads=False)),
        ("b", stand_in("b", calls, loads=False)),
        ("c", stand_in("c", calls)),
    )
    host.load_first()
    assert calls == ["a()", "a.load(3)", "b()", "b.load(3)", "c()", "c.load(3)"]
    assert host.state.backend_name == "c"
    assert host.state.fallback_reasons == [
        "a failed to load: a will not load",
        "b failed to load: b will not load",
    ]
    assert host.state.load_error is None and told == [], "loading at start is not a replacement"


def test_when_no_backend_loads_the_last_error_is_raised_and_kept(host_of) -> None:
    calls: list[str] = []
    host, _ = host_of(("a", stand_in("a", calls, loads=False)), ("b", stand_in("b", calls, loads=False)))
    with pytest.raises(BackendError, match="b will not load"):
        host.load_first()
    assert (host.state.backend_name, host.state.load_error) == ("b", "b will not load")


def test_a_backend_failing_during_a_job_is_closed_and_replaced(host_of) -> None:
    calls: list[str] = []
    host, told = host_of(("a", stand_in("a", calls)), ("b", stand_in("b", calls)))
    host.load_first()
    host.replace_after_failure(BackendError("a: decode failed"))
    assert calls == ["a()", "a.load(3)", "a.close", "b()", "b.load(3)"]
    assert host.state.fallback_reasons == ["a failed during a job: a: decode failed"]
    assert (host.state.backend_name, told) == ("b", [False, True]), "not ready while replaced, then ready"


def test_without_a_fallback_a_failed_backend_stays(host_of) -> None:
    calls: list[str] = []
    host, told = host_of(("a", stand_in("a", calls)))
    host.load_first()
    host.replace_after_failure(BackendError("a: decode failed"))
    assert calls == ["a()", "a.load(3)"] and told == [] and host.state.fallback_reasons == []


def test_when_every_replacement_fails_to_load_the_last_error_is_kept(host_of) -> None:
    calls: list[str] = []
    host, told = host_of(
        ("a", stand_in("a", calls)),
        ("b", stand_in("b", calls, loads=False)),
        ("c", stand_in("c", calls, loads=False)),
    )
    host.load_first()
    host.replace_after_failure(BackendError("a: decode failed"))
    assert host.state.fallback_reasons == [
        "a failed during a job: a: decode failed",
        "b failed during a job: b will not load",
    ]
    assert (host.state.backend_name, host.state.load_error, told) == ("c", "c will not load", [False, True])
