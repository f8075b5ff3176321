"""edged: a small, observable LLM inference daemon for single-board computers."""

__version__ = "0.1.0"
"""The version of pyproject.toml, written here so that start-up does not pay for importlib.metadata
(~0.1 s on a board); tests/unit/test_startup_imports.py fails when the two differ."""
