"""edged's start-up check that the installed llama.cpp build fits the CPU (`edged.backends.cpu_features`).

The arm64 test (tests/test_arm64.py) runs the real thing under qemu emulating a Cortex-A72; here the
pure parts, and the daemon against a llama_cpp package whose import fails loudly: the check must
refuse *before* importing it (a real build for the wrong CPU dies of SIGILL at that point)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env, run_edged

from edged.backends.cpu_features import (
    HWCAP_AARCH64,
    LlamaBuild,
    _bits,
    build_problem,
    cpu_features,
    installed_build,
)

FIXTURES = Path(__file__).parent / "fixtures" / "boards"
DOTPROD = LlamaBuild(
    arch="aarch64",
    flavour="dotprod",
    march="armv8.2-a+dotprod",
    needs=("fp", "asimd", "crc32", "atomics", "asimdrdm", "asimddp"),
    boards="RK3588, Raspberry Pi 5",
    path=Path("/x/llama_cpp/edged_build.json"),
)


def features_of(board: str) -> set[str]:
    """A board's CPU features as its /proc/cpuinfo lists them (the fixture trees are the boards')."""
    return cpu_features("armv7l", FIXTURES / board / "proc" / "cpuinfo")


def test_a_dotprod_build_runs_on_rk3588_and_pi5_and_is_refused_on_pi4() -> None:
    assert build_problem(DOTPROD, "aarch64", features_of("orangepi5")) is None
    assert build_problem(DOTPROD, "aarch64", features_of("rpi5")) is None
    problem = build_problem(DOTPROD, "aarch64", features_of("rpi4"))
    assert problem is not None
    assert "lacks: atomics, asimdrdm, asimddp" in problem and "illegal instruction" in problem, problem
    assert "dotprod" in problem and "armv8.2-a+dotprod" in problem
    armv8 = LlamaBuild("aarch64", "armv8", "armv8-a", ("fp", "asimd"), "Raspberry Pi 4", DOTPROD.path)
    assert build_problem(armv8, "aarch64", features_of("rpi4")) is None


def test_a_build_for_another_architecture_is_named() -> None:
    problem = build_problem(DOTPROD, "x86_64", {"avx2"})
    assert problem is not None and "built for aarch64" in problem and "make wheelhouse ARCH=x86_64" in problem


def test_no_build_file_means_nothing_to_check() -> None:
    assert build_problem(None, "aarch64", set()) is None


def test_hwcap_bits_use_linux_names() -> None:
    # arch/arm64/include/uapi/asm/hwcap.h: HWCAP_ATOMICS (1 << 8), HWCAP_ASIMDDP (1 << 20)
    assert _bits(1 << 8 | 1 << 20 | 1, HWCAP_AARCH64) == {"fp", "atomics", "asimddp"}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads an x86 /proc/cpuinfo")
def test_this_x86_cpu_reports_its_flags() -> None:
    flags = cpu_features()
    text = Path("/proc/cpuinfo").read_text()
    assert flags and all(flag in text for flag in flags)
    assert "sse2" in flags  # every x86_64 has it


def stand_in_llama(tmp_path: Path, needs: list[str]) -> Path:
    """A llama_cpp package carrying a make-wheelhouse build file for this machine, whose import
    raises: any import before the check shows up as that error instead of the check's."""
    package = tmp_path / "site" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('stand-in: the library was loaded')\n")
    build = {"arch": platform.machine(), "flavour": "future", "march": "x86-64-v9", "needs": needs}
    (package / "edged_build.json").write_text(json.dumps({**build, "boards": "none yet"}))
    return package.parent


@pytest.mark.system
def test_installed_build_is_read_without_importing_llama_cpp(tmp_path: Path) -> None:
    site = stand_in_llama(tmp_path, ["fp"])
    code = (
        "import sys; from edged.backends.cpu_features import installed_build; b = installed_build(); "
        "print(b.flavour, b.needs, 'llama_cpp' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=clean_env(PYTHONPATH=str(site)), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["future", "('fp',)", "False"]
    assert installed_build() is None  # this process's llama-cpp-python was built by pip, not make wheelhouse


@pytest.mark.system
def test_edged_refuses_the_build_before_loading_it(tmp_path: Path) -> None:
    site = stand_in_llama(tmp_path, ["sse2", "no_such_feature"])
    env = clean_env(PYTHONPATH=str(site), EDGED_JOURNAL__PATH=str(tmp_path / "journal.sqlite3"))
    board = run_edged("board", "--root", str(FIXTURES / "x86"), "--json", env=env)
    assert board.returncode == 78, board.stdout + board.stderr
    reason = json.loads(board.stdout)["backend"]["error"]
    assert "needs CPU features this CPU lacks: no_such_feature" in reason, reason
    assert "stand-in" not in reason  # refused before the import

    serve = run_edged(
        "serve", "--socket", str(tmp_path / "s.sock"), env={**env, "EDGED_BOARD__ROOT": str(FIXTURES / "x86")}
    )
    assert serve.returncode == 78, serve.stderr
    assert "no_such_feature" in serve.stderr and "illegal instruction" in serve.stderr, serve.stderr

    # llamacpp.cpu_check = false: edged goes on and imports it (here: the stand-in's error)
    unchecked = run_edged(
        "board", "--root", str(FIXTURES / "x86"), "--json", env={**env, "EDGED_LLAMACPP__CPU_CHECK": "false"}
    )
    assert "stand-in: the library was loaded" in json.loads(unchecked.stdout)["backend"]["error"]
