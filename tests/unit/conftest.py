"""The unit tier: edged's pure code in-process, each test well under a second. No daemon, no model,
no subprocess, no network (tests/conftest.py fails a test here that starts a process or a listener).
The layout mirrors ``edged/``: ``unit/engine/test_queue.py`` tests ``edged/engine/queue.py``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edged.config import Settings, load_settings


@pytest.fixture
def settings_of(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., Settings]:
    """`load_settings` as the daemon calls it, from an empty config file and no EDGED_* variables
    (a developer's own settings must not leak in); keyword arguments are the command-line overrides."""
    for name in list(os.environ):
        if name.upper().startswith("EDGED_"):
            monkeypatch.delenv(name)
    empty = tmp_path / "edged.toml"
    empty.write_text("")

    def make(**overrides: Any) -> Settings:
        return load_settings(empty, overrides)

    return make
