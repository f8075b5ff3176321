"""The backend the scheduler's thread drives: its lifecycle, and its replacement when it fails.

The profile lists backends in order (`choose_backend`); the available ones after the chosen one are
its fallbacks. A backend that fails to load, or fails during a job, is replaced by the next one
without a restart: the jobs it was running fail, the queued ones run on the next backend. Every
method runs on the scheduler's one thread (load and close included, see `edged.engine.scheduler`);
`backend` and `state` are read from the event loop for snapshots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from edged.backends import Backend, BackendChoice, Capabilities
from edged.errors import EdgedError

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

log = structlog.get_logger(__name__)


@dataclass
class BackendState:
    """What the facade reads for snapshots (written by the scheduler thread)."""

    backend_name: str
    fallback_reasons: list[str] = field(default_factory=list)
    capabilities: Capabilities | None = None
    load_error: str | None = None


class BackendHost:
    """Holds the current backend and the fallbacks still unused."""

    def __init__(
        self,
        settings: Settings,
        board: BoardInfo,
        choice: BackendChoice,
        on_backend: Callable[[bool], None],
    ) -> None:
        self.settings = settings
        self.board = board
        self.backend: Backend = choice.cls(board, settings)
        self.state = BackendState(backend_name=choice.name)
        self._fallbacks = list(choice.fallbacks)
        self._on_backend = on_backend
        """Told False while a failed backend is being replaced, True once the next one is loaded."""

    def load_first(self) -> Capabilities:
        """Load the chosen backend, else the first fallback that loads; raises the last one's error."""
        slots = self.settings.engine.slots(self.board)
        while True:
            try:
                caps = self.backend.load(slots)
                self.state.capabilities = caps
                return caps
            except EdgedError as exc:
                if not self._fallbacks:
                    self.state.load_error = exc.message
                    raise
                self._fall_back(f"{self.state.backend_name} failed to load: {exc.message}")

    def replace_after_failure(self, error: EdgedError) -> None:
        """A backend that failed mid-job is replaced before the next job runs, without a restart."""
        if not self._fallbacks:
            return
        self._on_backend(False)
        try:
            self.backend.close()
        except Exception:
            log.exception("closing the failed backend failed")
        while True:
            self._fall_back(f"{self.state.backend_name} failed during a job: {error.message}")
            try:
                self.state.capabilities = self.backend.load(self.settings.engine.slots(self.board))
                break
            except EdgedError as exc:
                error = exc
                if not self._fallbacks:
                    self.state.load_error = exc.message
                    log.error("no backend left", error=exc.message)
                    break
        self._on_backend(True)

    def close(self) -> None:
        try:
            self.backend.close()
        except Exception:
            log.exception("closing the backend failed")

    def _fall_back(self, reason: str) -> None:
        """Replace the backend by the next available one of the profile (not loaded yet)."""
        name, cls = self._fallbacks.pop(0)
        log.warning("switching backend", failed=self.state.backend_name, to=name, reason=reason)
        self.state.fallback_reasons.append(reason)
        self.backend = cls(self.board, self.settings)
        self.state.backend_name = name
