"""What start-up imports: `edged serve` loads what it needs to load the model and serve, nothing that
only another command uses (the benchmark, the fleet's web app and live table, the CLI's tables), and
`import edged` does not pay for importlib.metadata. Each check runs a fresh interpreter and reads its
``sys.modules``; `edged bench` measures the whole start (its startup row)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BOARDS, clean_env

pytestmark = pytest.mark.system

NOT_FOR_SERVE = (
    "edged.bench",  # `edged bench`, and every module under it
    "edged.fleet.cli",
    "edged.fleet.web",
    "edged.fleet.aggregator",
    "edged.fleet.ask",
    "edged.client",  # the client of `edged ask`, `status`, `jobs`
    "rich.progress",
    "rich.live",
    "httpx",
    "gguf",
)
"""Modules `edged serve` must not import (a prefix stands for its submodules too)."""

NOT_FOR_THE_CLI = (
    *NOT_FOR_SERVE,
    "edged.fleet",
    "edged.daemon",
    "edged.backends",
    "fastapi",
    "uvicorn",
    "paho",
    "numpy",
    "llama_cpp",
    "importlib.metadata",
    "rich.table",  # `serve` loads it all the same: structlog's console renderer imports rich.traceback
)
"""Modules ``import edged.cli`` must not import: every command loads its own when it runs
(`edged --help` and `edged serve --help` stay quick, and `serve` imports the daemon only once its
settings are known)."""


def loaded(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> tuple[int, set[str], str]:
    """Run ``code`` in a new interpreter; its exit status, the modules it had loaded when it exited
    (however it exited) and its stderr."""
    out = tmp_path / "modules.json"
    prelude = (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: open({str(out)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + code],
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, set(json.loads(out.read_text())), done.stderr


def offending(modules: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_import_edged_is_a_constant_version(tmp_path: Path) -> None:
    code, modules, stderr = loaded("import edged; print(edged.__version__)", tmp_path)
    assert code == 0, stderr
    assert "edged" in modules
    assert "importlib.metadata" not in modules


def test_the_cli_imports_no_command_of_its_own(tmp_path: Path) -> None:
    code, modules, stderr = loaded("import edged.cli", tmp_path)
    assert code == 0, stderr
    assert "typer" in modules and "edged.cli" in modules
    assert offending(modules, NOT_FOR_THE_CLI) == []


def test_serve_imports_what_start_up_needs_and_nothing_else(tmp_path: Path) -> None:
    """`edged serve` through the real command, as far as it goes before the model is loaded: the
    daemon imported, settings loaded, the board detected, then a backend that does not exist (exit 78)."""
    (tmp_path / "profiles").mkdir()
    env = clean_env(
        EDGED_BACKEND="no_such_backend",
        EDGED_BOARD__ROOT=str(BOARDS / "x86"),
        EDGED_BOARD__PROFILES_DIR=str(tmp_path / "profiles"),
        EDGED_SOCKET__PATH=str(tmp_path / "edged.sock"),
        EDGED_JOURNAL__PATH=str(tmp_path / "journal"),
    )
    code, modules, stderr = loaded(
        "from edged.cli import main\nsys.argv = ['edged', 'serve']\nmain()", tmp_path, env
    )
    assert code == 78, stderr
    assert "no_such_backend" in stderr
    assert {"edged.daemon", "edged.config", "edged.board", "edged.backends"} <= modules  # got that far
    assert offending(modules, NOT_FOR_SERVE) == []


@pytest.mark.parametrize("module", ["edged.tools.spec", "edged.tools.parse", "edged.engine.bounds"])
def test_a_module_imports_first_without_a_cycle(module: str, tmp_path: Path) -> None:
    """edged.engine's package names load lazily: ``edged.tools`` imports ``edged.engine.bounds``, and
    an eager ``edged.engine`` imported ``edged.tools.spec`` back half-initialized (ImportError)."""
    code, modules, stderr = loaded(f"import {module}", tmp_path)
    assert code == 0, stderr
    assert module in modules
