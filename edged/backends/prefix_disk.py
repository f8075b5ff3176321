"""The disk tier of the prefix cache: KV state of shared prompt prefixes, kept across restarts.

One file per prefix under ``<dir>/<model key>/``, where the key names the model file (fingerprint),
its chat template and the llama.cpp build that wrote the state, so a new model or library never reads
another's bytes. A file is a fixed header, the prefix's tokens and llama.cpp's sequence state, with a
SHA-256 over tokens and state: a stale, truncated or corrupt file is detected, deleted and counted,
never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

MAGIC = b"EDGEDPFX"
VERSION = 1
HEADER = struct.Struct("<8sIIQ32s")  # magic, version, n_tokens, state bytes, sha256(tokens + state)


@dataclass(frozen=True)
class DiskEntry:
    path: Path
    tokens: tuple[int, ...]
    state_bytes: int


def _token_bytes(tokens: tuple[int, ...] | list[int]) -> bytes:
    return array("i", tokens).tobytes()


class PrefixDisk:
    """Reads and writes prefix files; writes happen on a background thread (the decode loop never
    waits for the disk). Failures (full disk, read-only) are logged and counted, never raised."""

    def __init__(self, directory: Path, key: str, budget_bytes: int) -> None:
        self.dir = directory / key
        self.budget = budget_bytes
        self.entries: dict[str, DiskEntry] = {}
        self.rejected = 0
        self.saves = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edged-prefix-disk")

    @staticmethod
    def name_of(tokens: tuple[int, ...] | list[int]) -> str:
        return hashlib.sha256(_token_bytes(tokens)).hexdigest()[:32]

    def scan(self) -> list[DiskEntry]:
        """Index the files of this model key (headers and tokens only); drop unreadable ones."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.errors.append(f"cannot create {self.dir}: {exc.strerror or exc}")
            log.warning("prefix cache disk tier unavailable", dir=str(self.dir), error=str(exc))
            return []
        for path in sorted(self.dir.glob("*.pfx")):
            entry = self._read_header(path)
            if entry is None:
                self.reject(path, "unreadable or stale header")
                continue
            self.entries[path.stem] = entry
        return list(self.entries.values())

    def _read_header(self, path: Path) -> DiskEntry | None:
        try:
            with path.open("rb") as handle:
                head = handle.read(HEADER.size)
                if len(head) != HEADER.size:
                    return None
                magic, version, n_tokens, state_bytes, _digest = HEADER.unpack(head)
                if magic != MAGIC or version != VERSION or n_tokens == 0:
                    return None
                raw = handle.read(4 * n_tokens)
                if len(raw) != 4 * n_tokens:
                    return None
            if path.stat().st_size != HEADER.size + 4 * n_tokens + state_bytes:
                return None
        except OSError:
            return None
        tokens = array("i")
        tokens.frombytes(raw)
        return DiskEntry(path=path, tokens=tuple(tokens), state_bytes=state_bytes)

    def load(self, entry: DiskEntry) -> bytes | None:
        """The state bytes of ``entry`` if the file is intact; otherwise it is deleted and None."""
        try:
            data = entry.path.read_bytes()
        except FileNotFoundError:  # trimmed for space meanwhile: a miss, not a bad entry
            with self._lock:
                self.entries.pop(entry.path.stem, None)
            return None
        except OSError as exc:
            self.reject(entry.path, f"cannot read: {exc.strerror or exc}")
            return None
        expected = HEADER.size + 4 * len(entry.tokens) + entry.state_bytes
        if len(data) != expected:
            self.reject(entry.path, f"truncated ({len(data)} of {expected} bytes)")
            return None
        _magic, _version, _n, _size, digest = HEADER.unpack_from(data)
        body = data[HEADER.size :]
        if hashlib.sha256(body).digest() != digest:
            self.reject(entry.path, "checksum mismatch")
            return None
        with contextlib.suppress(OSError):
            os.utime(entry.path)  # least recently used goes first when the tier is over budget
        return body[4 * len(entry.tokens) :]

    def reject(self, path: Path, why: str) -> None:
        self.rejected += 1
        self.entries.pop(path.stem, None)
        log.warning("prefix cache: discarding a bad disk entry", path=str(path), reason=why)
        with contextlib.suppress(OSError):
            path.unlink()

    def save(self, tokens: tuple[int, ...], state: bytes, done: Callable[[DiskEntry], None]) -> None:
        """Write in the background; ``done`` is called (on the writer thread) once the file is in place."""
        self._writer.submit(self._write, tokens, state, done)

    def _write(self, tokens: tuple[int, ...], state: bytes, done: Callable[[DiskEntry], None]) -> None:
        name = self.name_of(tokens)
        path = self.dir / f"{name}.pfx"
        body = _token_bytes(tokens) + state
        header = HEADER.pack(MAGIC, VERSION, len(tokens), len(state), hashlib.sha256(body).digest())
        tmp = path.with_suffix(".tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as handle:
                handle.write(header)
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)  # readers see the old file or the whole new one, never a torn one
        except OSError as exc:
            with self._lock:
                self.errors.append(f"cannot write {path}: {exc.strerror or exc}")
                del self.errors[:-5]
            log.warning("prefix cache: cannot save to disk", path=str(path), error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        entry = DiskEntry(path=path, tokens=tokens, state_bytes=len(state))
        with self._lock:
            self.entries[name] = entry
            self.saves += 1
        self._trim()
        done(entry)

    def _trim(self) -> None:
        """Delete least recently used files until the tier fits its budget."""
        try:
            files = sorted(self.dir.glob("*.pfx"), key=lambda p: p.stat().st_mtime)
            total = sum(p.stat().st_size for p in files)
        except OSError:
            return
        while files and total > self.budget:
            oldest = files.pop(0)
            try:
                size = oldest.stat().st_size
                oldest.unlink()
            except OSError:
                continue
            total -= size
            with self._lock:
                self.entries.pop(oldest.stem, None)

    def bytes_used(self) -> int:
        with self._lock:
            return sum(HEADER.size + 4 * len(e.tokens) + e.state_bytes for e in self.entries.values())

    def close(self) -> None:
        self._writer.shutdown(wait=True)
