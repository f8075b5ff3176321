"""The playbook applied over real SSH to a fresh Debian bookworm root (debootstrap, cached), booted with
systemd-nspawn so that a real systemd starts edged; the second run must change nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nspawn_helpers import Board, booted, debootstrap_root

from edged.config import embedded_model_path

# debootstrap (first time) + wheels + two playbook runs take minutes, not the default 5-minute cap
pytestmark = [pytest.mark.system, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    base, _ = debootstrap_root("bookworm-minbase")  # CI builds it in about a minute
    with booted(base, tmp_path_factory.mktemp("board")) as b:
        yield b


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """This edged as a wheel and every dependency as a wheel (llama-cpp-python from pip's cache), so the
    board installs offline, as an air-gapped fleet would (edged_pip_index: false)."""
    out = tmp_path_factory.mktemp("wheels")
    own = tmp_path_factory.mktemp("own")
    pip = [sys.executable, "-m", "pip", "wheel"]
    subprocess.run(
        [*pip, "--no-deps", "--no-build-isolation", "-w", str(own), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(own.glob("edged-*.whl"))
    r = subprocess.run([*pip, "-w", str(out), str(wheel)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    (out / wheel.name).unlink()
    return wheel, out


def run_playbook(
    board: Board, wheel: Path, wheels: Path, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    model = embedded_model_path()
    assert model is not None
    extra = {
        "edged_wheel": str(wheel),
        "edged_wheelhouse": str(wheels),
        "edged_build_packages": [],
        "edged_model_src": str(model),
        "edged_pip_index": False,
        "edged_profile": "auto",
    }
    return board.playbook("rpi5", extra, tmp_path, timeout=1800)


def test_playbook_provisions_a_fresh_debian_host_over_ssh(board: Board, wheelhouse, tmp_path: Path) -> None:
    wheel, wheels = wheelhouse
    first, first_s = run_playbook(board, wheel, wheels, tmp_path)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-2000:]
    counts = board.recap(first.stdout)
    assert counts["failed"] == 0 and counts["changed"] > 5
    second, second_s = run_playbook(board, wheel, wheels, tmp_path)
    assert second.returncode == 0, second.stdout[-5000:]
    assert board.recap(second.stdout)["changed"] == 0, second.stdout[-5000:]
    print(f"playbook: first run {first_s:.1f} s, second run {second_s:.1f} s (changed=0)")

    root = board.root
    assert re.search(r"^edged:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.MULTILINE)
    groups = (root / "etc/group").read_text()
    assert re.search(r"^render:.*edged", groups, re.MULTILINE) and re.search(
        r"^video:.*edged", groups, re.MULTILINE
    )
    config = (root / "etc/edged/edged.toml").read_text()
    assert 'device_id = "board1"' in config
    assert (root / "var/lib/edged/models/SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size > 90_000_000
    assert (root / "etc/systemd/system/edged.service").read_text() == (
        ROOT / "systemd/edged.service"
    ).read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/edged.service").is_symlink()
    assert (root / "etc/systemd/system/sockets.target.wants/edged.socket").is_symlink()
    assert (root / "opt/edged/venv/bin/edged").exists()


def test_systemd_in_the_container_runs_edged(board: Board) -> None:
    state, journal = board.wait_active("edged.service", within_s=60, poll_s=1)
    assert state == "active", journal
    asked = board.ssh("/opt/edged/venv/bin/edged ask --socket /run/edged/edged.sock --max-tokens 8 'Say hi.'")
    assert asked.returncode == 0, asked.stderr + journal
    assert "generated tokens" in asked.stderr
