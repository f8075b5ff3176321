"""`EngineConfig.slots`: the one answer to "how many slots does the engine ask for" (the backend's
pre-load check, its load, and MQTT's Receive Maximum before the load all read it)."""

from __future__ import annotations

from collections.abc import Callable

from conftest import BOARDS

from edged.board import detect_board
from edged.config import Settings


def test_auto_takes_the_board_profiles_parallel(settings_of: Callable[..., Settings]) -> None:
    rpi4 = detect_board(BOARDS / "rpi4", user_dir=None)
    x86 = detect_board(BOARDS / "x86", user_dir=None)
    assert (rpi4.profile.engine.parallel, x86.profile.engine.parallel) == (2, 4), "the profiles changed"
    engine = settings_of().engine
    assert engine.parallel == "auto"
    assert (engine.slots(rpi4), engine.slots(x86)) == (2, 4)


def test_a_configured_number_wins_over_the_profile(settings_of: Callable[..., Settings]) -> None:
    rpi4 = detect_board(BOARDS / "rpi4", user_dir=None)
    assert settings_of(engine={"parallel": "3"}).engine.slots(rpi4) == 3
