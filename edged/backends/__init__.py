"""Backend registry and interface.

A backend only turns a prompt into tokens. Each lives in its own module, registers itself under a
name with `register_backend`, and imports its native library lazily so that a missing library only
makes that backend unavailable (with a reason) instead of breaking the daemon.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

from edged.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for a backend: the exact text and its tokens under the model's tokenizer."""

    text: str
    tokens: list[int]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    seed: int | None = None
    ignore_eos: bool = False


class Backend(Protocol):
    """What the engine needs from a backend. Methods other than `abort` are called from one thread."""

    name: ClassVar[str]

    @classmethod
    def available(cls, board: BoardInfo, settings: Settings) -> tuple[bool, str]:
        """Whether this backend can run here, and why (or why not), without loading anything heavy."""
        ...

    def load(self) -> None:
        """Load the model; blocking, may take seconds. Raises `BackendError`."""
        ...

    @property
    def model_name(self) -> str: ...

    @property
    def n_ctx(self) -> int: ...

    def describe(self) -> dict[str, object]:
        """Facts for /status: threads, affinity, library version, ..."""
        ...

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template applied to ``messages``, ending with the assistant's turn."""
        ...

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        """Tokens of ``text``; ``chat`` says the text came from `render_chat` (special tokens inside)."""
        ...

    def generate(self, prompt: Prompt, params: SamplingParams, cancel: threading.Event) -> Iterator[str]:
        """Yield the text of each generated token (may be ``""`` for an incomplete UTF-8 sequence).

        Stops at end of generation, after ``params.max_tokens`` tokens, or within one token of
        ``cancel`` being set. Raises `BackendError` when generation fails.
        """
        ...

    def abort(self) -> None:
        """Ask a running `generate` to stop as soon as it can; safe from any thread."""
        ...

    def close(self) -> None: ...


B = TypeVar("B", bound=type)

BACKENDS: dict[str, type[Backend]] = {}
"""Registered backends by name, filled when `edged.backends` imports its modules below."""

BACKEND_MODULES = ("edged.backends.llamacpp", "edged.backends.rkllm")


def register_backend(name: str) -> Callable[[B], B]:
    """Class decorator: make a backend selectable as ``backend = "<name>"`` and in profile orders."""

    def decorate(cls: B) -> B:
        if name in BACKENDS:
            raise RuntimeError(f"backend {name!r} registered twice")
        cls.name = name  # type: ignore[attr-defined]
        BACKENDS[name] = cls
        return cls

    return decorate


for _module in BACKEND_MODULES:
    importlib.import_module(_module)


@dataclass(frozen=True)
class BackendChoice:
    """The chosen backend and, for every backend considered, why it was taken or skipped."""

    name: str
    cls: type[Backend]
    considered: list[tuple[str, bool, str]]
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
        considered = [(name, ok, reason)]
        if not ok:
            raise BackendUnavailable(f"backend {name!r} (forced by config) is unavailable: {reason}")
        return BackendChoice(name, BACKENDS[name], considered, forced=True)

    considered = []
    usable: list[tuple[str, type[Backend]]] = []
    for name in board.profile.backends.order:
        cls = BACKENDS.get(name)
        if cls is None:
            considered.append((name, False, "not built into this edged version"))
            continue
        ok, reason = cls.available(board, settings)
        considered.append((name, ok, reason))
        if ok:
            usable.append((name, cls))
    if usable:
        (name, cls), *rest = usable
        return BackendChoice(name, cls, considered, forced=False, fallbacks=tuple(rest))
    summary = "; ".join(f"{n}: {why}" for n, _, why in considered)
    raise BackendUnavailable(f"no backend of profile {board.profile.name!r} can run here ({summary})")
