"""What the transports' unit tests share."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edged.transports import ratelimit


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The rate limiter's monotonic clock, moved by the test."""
    fake = Clock()
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(monotonic=fake))
    return fake
