"""The thermal governor: slow down when warm, stop starting jobs when hot, resume when cool.

Thresholds come from the board profile (overridable in ``[thermal]``). Leaving ``derate`` or
``paused`` needs the temperature to fall below ``resume_c``: hysteresis, so a board hovering at a
threshold does not flap.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from edged.board import HostFS, ThermalLimits
from edged.errors import ConfigError
from edged.telemetry.hardware import ThermalZone, thermal_zones

log = structlog.get_logger(__name__)


class ThermalState(str, enum.Enum):
    UNKNOWN = "unknown"  # no thermal zone to read: nothing to protect, nothing slowed
    NORMAL = "normal"
    WARM = "warm"
    DERATE = "derate"
    PAUSED = "paused"


@dataclass(frozen=True)
class Transition:
    previous: ThermalState
    state: ThermalState
    temp_c: float | None
    zone: str | None
    at: float


def next_state(current: ThermalState, temp: float | None, limits: ThermalLimits) -> ThermalState:
    """The state for ``temp`` given the current one (pure, so the hysteresis is easy to test)."""
    if temp is None:
        return ThermalState.UNKNOWN
    if temp >= limits.pause_c or (current is ThermalState.PAUSED and temp >= limits.resume_c):
        return ThermalState.PAUSED
    if temp >= limits.derate_c or (current is ThermalState.DERATE and temp >= limits.resume_c):
        return ThermalState.DERATE
    if temp >= limits.warn_c:
        return ThermalState.WARM
    return ThermalState.NORMAL


def effective_limits(profile_limits: ThermalLimits, overrides: dict[str, float | None]) -> ThermalLimits:
    """The profile's thresholds with the config's ``[thermal]`` overrides; raises `ConfigError`."""
    data = profile_limits.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ThermalLimits.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"thermal: {e['msg']}" for e in exc.errors()]) from exc


def watched(zones: list[ThermalZone], names: list[str]) -> list[ThermalZone]:
    """The profile's zones that exist here; all zones when the profile names none of them."""
    chosen = [z for z in zones if z.type in names and z.temp_c is not None]
    return chosen or [z for z in zones if z.temp_c is not None]


class ThermalGovernor:
    """Polls the watched zones and reports every state change to ``on_transition``."""

    def __init__(
        self,
        fs: HostFS,
        limits: ThermalLimits,
        zone_names: list[str],
        on_transition: Callable[[Transition], None],
    ) -> None:
        self.fs = fs
        self.limits = limits
        self.zone_names = zone_names
        self.on_transition = on_transition
        self.state = ThermalState.UNKNOWN
        self.hottest_c: float | None = None
        self.hottest_zone: str | None = None
        self.transitions: dict[str, int] = {s.value: 0 for s in ThermalState}
        self.last_change: Transition | None = None

    def poll(self) -> Transition | None:
        zones = watched(thermal_zones(self.fs), self.zone_names)
        hottest = max(zones, key=lambda z: z.temp_c or 0.0, default=None)
        self.hottest_c = hottest.temp_c if hottest else None
        self.hottest_zone = hottest.type if hottest else None
        new = next_state(self.state, self.hottest_c, self.limits)
        if new is self.state:
            return None
        change = Transition(self.state, new, self.hottest_c, self.hottest_zone, time.time())
        self.state = new
        self.transitions[new.value] += 1
        self.last_change = change
        level = log.warning if new in (ThermalState.DERATE, ThermalState.PAUSED) else log.info
        level(
            "thermal state changed",
            previous=change.previous.value,
            state=new.value,
            temp_c=self.hottest_c,
            zone=self.hottest_zone,
            limits=self.limits.model_dump(),
        )
        self.on_transition(change)
        return change

    def status(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "hottest_c": self.hottest_c,
            "hottest_zone": self.hottest_zone,
            "limits": self.limits.model_dump(),
            "transitions": dict(self.transitions),
            "last_change": None
            if self.last_change is None
            else {
                "from": self.last_change.previous.value,
                "to": self.last_change.state.value,
                "temp_c": self.last_change.temp_c,
                "zone": self.last_change.zone,
                "at": self.last_change.at,
            },
        }
