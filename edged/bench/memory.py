"""Anonymous resident memory of a process, sampled while it works.

``RssAnon`` (``/proc/PID/status``) is the memory a process owns: KV cache, compute buffers, the
interpreter. The model's weights are a mapped file (``RssFile``), shared with the page cache and with
any other process mapping the same file, so they are not counted: what differs between edged and
llama-server on one model is exactly the anonymous part.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

SAMPLE_S = 0.05


def rss_anon_kb(pid: int) -> int | None:
    """``RssAnon`` of ``pid`` in KiB, or None when the process is gone (or the kernel has no such line)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return None


class PeakSampler:
    """The highest ``RssAnon`` of a process (``pid()`` is asked every sample: it may be restarted)."""

    def __init__(self, pid: Callable[[], int | None], interval_s: float = SAMPLE_S) -> None:
        self._pid = pid
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self.peak_kb: int | None = None

    def _sample(self) -> None:
        pid = self._pid()
        kb = rss_anon_kb(pid) if pid is not None else None
        if kb is not None and (self.peak_kb is None or kb > self.peak_kb):
            self.peak_kb = kb

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak_kb is None else self.peak_kb / 1024
