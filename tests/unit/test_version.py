"""`edged.__version__` is a constant (start-up does not import importlib.metadata for it): it must be
the version pyproject.toml gives the package."""

from __future__ import annotations

from pathlib import Path

import edged
from edged.config import tomllib

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"


def test_the_version_is_pyprojects() -> None:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    assert edged.__version__ == project["version"]
