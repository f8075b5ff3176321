"""`pip install .` ships the board profiles; CI runs the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.system
def test_wheel_contains_the_board_profiles(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("edged-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for profile in ("rk3588", "rpi5", "rpi4", "generic"):
        assert f"edged/board_profiles/{profile}.toml" in names
    assert "edged/cli.py" in names


def test_installed_package_finds_its_profiles() -> None:
    from edged.board import shipped_profiles_dir

    assert (shipped_profiles_dir() / "rk3588.toml").is_file()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^make \w+", readme, flags=re.MULTILINE)
    assert "make demo" in commands and "make test" in commands
    assert "make test" in (ROOT / ".ci" / "run").read_text()
