"""Backend registry.

A backend only turns tokens into tokens (the interface is in `edged.backends.base`). Each lives in
its own module, registers itself under a name with `register_backend`, and imports its native
library lazily so that a missing library only makes that backend unavailable (with a reason)
instead of breaking the daemon.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from edged.backends.base import (
    Backend,
    CacheStats,
    Capabilities,
    Grammar,
    Prompt,
    SamplingParams,
    SeqOutput,
    Tokenizer,
)
from edged.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendChoice",
    "CacheStats",
    "Capabilities",
    "Considered",
    "Grammar",
    "Prompt",
    "SamplingParams",
    "SeqOutput",
    "Tokenizer",
    "choose_backend",
    "register_backend",
]


B = TypeVar("B", bound="type[Backend]")
"""A backend class: the decorator makes mypy check it against the `Backend` Protocol."""

BACKENDS: dict[str, type[Backend]] = {}
"""Registered backends by name, filled when `edged.backends` imports its modules below."""

BACKEND_MODULES = ("edged.backends.llamacpp", "edged.backends.rkllm")


def register_backend(name: str) -> Callable[[B], B]:
    """Class decorator: make a backend selectable as ``backend = "<name>"`` and in profile orders."""

    def decorate(cls: B) -> B:
        if name in BACKENDS:
            raise RuntimeError(f"backend {name!r} registered twice")
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return decorate


for _module in BACKEND_MODULES:
    importlib.import_module(_module)


@dataclass(frozen=True)
class Considered:
    """One backend of the profile's order and why it was taken or skipped."""

    name: str
    available: bool
    reason: str


@dataclass(frozen=True)
class BackendChoice:
    """The chosen backend and, for every backend considered, why it was taken or skipped."""

    name: str
    cls: type[Backend]
    considered: list[Considered]
    forced: bool
    fallbacks: tuple[tuple[str, type[Backend]], ...] = ()
    """Available backends after the chosen one, in profile order: used if it fails at load or mid-job."""


def choose_backend(board: BoardInfo, settings: Settings) -> BackendChoice:
    """First available backend in the profile's order, or exactly the one the config names.

    A backend asked for by name that cannot run is an error with its reason, never a fallback.
    """
    if settings.backend != "auto":
        name = settings.backend
        if name not in BACKENDS:
            known = ", ".join(sorted(BACKENDS))
            raise ConfigError([f"backend = {name!r}: no such backend in this edged (known: {known})"])
        ok, reason = BACKENDS[name].available(board, settings)
        considered = [Considered(name, ok, reason)]
        if not ok:
            raise BackendUnavailable(f"backend {name!r} (forced by config) is unavailable: {reason}")
        return BackendChoice(name, BACKENDS[name], considered, forced=True)

    considered = []
    usable: list[tuple[str, type[Backend]]] = []
    for name in board.profile.backends.order:
        cls = BACKENDS.get(name)
        if cls is None:
            considered.append(Considered(name, False, "not built into this edged version"))
            continue
        ok, reason = cls.available(board, settings)
        considered.append(Considered(name, ok, reason))
        if ok:
            usable.append((name, cls))
    if usable:
        (name, cls), *rest = usable
        return BackendChoice(name, cls, considered, forced=False, fallbacks=tuple(rest))
    summary = "; ".join(f"{c.name}: {c.reason}" for c in considered)
    raise BackendUnavailable(f"no backend of profile {board.profile.name!r} can run here ({summary})")
