"""The two test tiers of tests/conftest.py: which tests are ``system``, and the guard that keeps the
fast tier (`make check`) free of processes, listeners and network connections."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest
from _pytest.outcomes import Failed
from conftest import _in_process_only, pytest_collection_modifyitems, system_fixture


class FakeItem:
    """What the hooks read of a collected test."""

    def __init__(self, fixturenames: tuple[str, ...] = (), marked: bool = False) -> None:
        self.nodeid = "tests/test_x.py::test_y"
        self.fixturenames = fixturenames
        self.markers: list[str] = ["system"] if marked else []

    def get_closest_marker(self, name: str) -> Any:
        return name if name in self.markers else None

    def add_marker(self, marker: Any) -> None:
        self.markers.append(marker.name)


@pytest.mark.parametrize(
    ("fixtures", "system"),
    [
        (("tmp_path", "monkeypatch"), None),
        (("tmp_path", "http", "daemon"), "http"),  # the closure: `http` brings `daemon`
        (("model_path",), "model_path"),
        (("fuzz_daemon",), "fuzz_daemon"),
        (("tls_broker",), "tls_broker"),
        (("secured",), "secured"),
    ],
)
def test_the_fixtures_that_make_a_test_a_system_test(fixtures: tuple[str, ...], system: str | None) -> None:
    assert system_fixture(fixtures) == system


def test_collection_marks_a_test_using_a_system_fixture_once() -> None:
    plain, daemon, marked = FakeItem(("tmp_path",)), FakeItem(("start_daemon",)), FakeItem(("daemon",), True)
    pytest_collection_modifyitems([plain, daemon, marked])  # type: ignore[list-item]
    assert (plain.markers, daemon.markers, marked.markers) == ([], ["system"], ["system"])


def test_the_fast_tier_starts_no_process_and_opens_no_listener() -> None:
    with _in_process_only(FakeItem()):  # type: ignore[arg-type]
        with pytest.raises(Failed, match=r"starts a process: mark it @pytest\.mark\.system"):
            subprocess.run([sys.executable, "-c", "pass"], check=False)
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
            pytest.raises(Failed, match="listener"),
        ):
            unix.listen()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            with pytest.raises(Failed, match="binds a network port"):
                tcp.bind(("127.0.0.1", 0))
            with pytest.raises(Failed, match="connects over the network"):
                tcp.connect(("127.0.0.1", 9))
        left, right = socket.socketpair()  # in-process plumbing (asyncio's self-pipe) still works
        left.close()
        right.close()


def guards() -> tuple[object, ...]:
    return (subprocess.Popen._execute_child, socket.socket.listen, socket.socket.bind, socket.socket.connect)  # type: ignore[attr-defined]


def test_a_system_test_is_not_guarded_and_the_guard_is_undone() -> None:
    before = guards()  # this test's own guard (it is a fast one) is in place already
    with _in_process_only(FakeItem(marked=True)):  # type: ignore[arg-type]
        assert guards() == before
    with _in_process_only(FakeItem()):  # type: ignore[arg-type]
        assert all(now is not then for now, then in zip(guards(), before, strict=True))
    assert guards() == before
