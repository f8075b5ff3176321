"""edged: a small, observable LLM inference daemon for single-board computers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edged")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
