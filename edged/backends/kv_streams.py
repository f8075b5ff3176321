"""`LlamaCppBackend`'s KV streams as a prefix cache: which stream a job gets, what a finished job
leaves there, and the disk tier behind them (llama.cpp server's prompt cache, beside its slots).

A finished sequence stays in its stream ("parked") until the stream is given to another job. A
radix trie over the tokens held in the streams finds the longest prefix of a new prompt: the job
gets the stream already holding it (reused in place, no copy), or the holder's stream is copied
into the job's stream (``llama_memory_seq_cp`` across streams copies the buffer, one memcpy) and
trimmed to the shared part. Prefixes that several jobs shared are also written to disk
(`edged.backends.prefix_disk`) and found there after a restart.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from edged.backends.base import CacheStats
from edged.backends.prefix_disk import DiskEntry, PrefixDisk
from edged.backends.prefix_index import PrefixIndex

log = structlog.get_logger(__name__)

DISK_MIN_GAIN = 16
"""A disk entry is loaded only when it covers this many more prompt tokens than the KV cache does."""


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class StreamSeq(Protocol):
    """What the streams read and write of an active sequence."""

    seq_id: int
    """Its stream."""
    prompt: list[int]
    reuse: bool
    """Whether cached prefixes may stand in for reading the prompt."""
    started: bool
    """The prefix lookup ran and prefill began."""
    n_past: int
    """Tokens of this sequence in the KV cache."""
    kv_tokens: list[int]
    cache_n: int


class KvStreams:
    """The context's streams (one per sequence id), what each holds, and the disk tier."""

    def __init__(
        self, llama_cpp: Any, ctx: Any, mem: Any, streams: int, *, prefix_cache: bool, min_tokens: int
    ) -> None:
        self._llama_cpp = llama_cpp
        self._ctx = ctx
        self._mem = mem
        self.count = streams
        self._prefix_cache = prefix_cache
        self._min_tokens = min_tokens
        """Prefixes shared by at least this many tokens are saved to disk (engine.prefix_min_tokens)."""
        self._parked: OrderedDict[int, int] = OrderedDict()
        """Free streams (sequence ids) holding a finished job's tokens -> how many; least recent first."""
        self._index = PrefixIndex()
        """Holders ("kv", seq_id): active prompts once read, and parked streams."""
        self._pending_sources: set[int] = set()
        """Streams being copied from in the step being built (the copy happens in llama_decode)."""
        self._pending_dests: set[int] = set()
        """Streams being copied into in the step being built: not a source until the copy is done."""
        self._disk_index = PrefixIndex()
        self.disk: PrefixDisk | None = None
        self._disk_pending: set[str] = set()
        self._disk_lock = threading.Lock()
        self._stats = CacheStats()
        self._prefill_s_per_token = 0.0

    # -- load ----------------------------------------------------------------------------------

    def open_disk(self, directory: Path, key: str, budget_bytes: int) -> None:
        """Use the disk tier under ``directory`` for this model (``key``) and index what it holds."""
        self.disk = PrefixDisk(directory, key, budget_bytes)
        for entry in self.disk.scan():
            self._disk_index.insert(("disk", entry.path.stem), entry.tokens)

    @property
    def disk_prefixes(self) -> int:
        return len(self._disk_index)

    def warm_from_disk(self) -> int:
        """Put the most recently used disk prefixes into the empty streams at load (parked, as if just
        released), so the first jobs after a restart find them in KV; returns how many."""
        if self.disk is None or not self.disk.entries:
            return 0

        def mtime(entry: DiskEntry) -> float:
            try:
                return entry.path.stat().st_mtime
            except OSError:
                return 0.0

        newest = sorted(self.disk.entries.values(), key=mtime, reverse=True)[: self.count]
        warmed = 0
        for stream, entry in enumerate(newest):
            if not self._load_disk_entry(entry, ("disk", entry.path.stem), stream):
                continue
            self._index.insert(("kv", stream), list(entry.tokens))
            self._parked[stream] = len(entry.tokens)
            warmed += 1
        self._stats.disk_warmed += warmed
        return warmed

    # -- admit and release ---------------------------------------------------------------------

    def free(self, owned: set[int]) -> list[int]:
        """The streams no active sequence owns."""
        return [i for i in range(self.count) if i not in owned]

    def choose(self, free: list[int], prompt: list[int]) -> int:
        """The free stream that already holds most of ``prompt``, else the least recently used one
        (an empty stream first)."""

        def value(stream: int) -> tuple[int, int]:
            held = ("kv", stream)
            shared = common_prefix(self._index.tokens(held), prompt) if held in self._index else 0
            recency = list(self._parked).index(stream) if stream in self._parked else -1
            return shared, -recency

        return max(free, key=value)

    def release(self, seq: StreamSeq) -> None:
        """A sequence ended: park what its stream holds for the prefix cache (and save a prefix that
        several jobs shared to disk), or empty the stream."""
        self._index.remove(("kv", seq.seq_id))
        lc, mem = self._llama_cpp, self._mem
        if not self._prefix_cache or not seq.started or seq.n_past == 0:
            lc.llama_memory_seq_rm(mem, seq.seq_id, -1, -1)
            self._parked.pop(seq.seq_id, None)
            return
        tokens = seq.kv_tokens[: seq.n_past]
        if self.disk is not None and seq.cache_n >= self._min_tokens:
            # Several jobs shared this prefix: keep exactly it, here and on disk.
            tokens = tokens[: seq.cache_n]
            lc.llama_memory_seq_rm(mem, seq.seq_id, len(tokens), -1)
            self._save_to_disk(seq.seq_id, tuple(tokens))
        self._parked[seq.seq_id] = len(tokens)
        self._parked.move_to_end(seq.seq_id)
        self._index.insert(("kv", seq.seq_id), tokens)

    # -- the step ------------------------------------------------------------------------------

    def new_step(self) -> None:
        """The copies queued for the last step happened in its ``llama_decode``."""
        self._pending_sources.clear()
        self._pending_dests.clear()

    def prompt_read(self, seq: StreamSeq) -> None:
        """The sequence's whole prompt is in its stream: later prompts may share it."""
        self._index.insert(("kv", seq.seq_id), seq.prompt)

    def note_prefill(self, elapsed_s: float, tokens: int) -> None:
        """Prefill speed for "saved_prefill_ms": a moving average of pure-prefill steps."""
        per_token = elapsed_s / tokens
        self._prefill_s_per_token = (
            per_token
            if not self._prefill_s_per_token
            else (0.8 * self._prefill_s_per_token + 0.2 * per_token)
        )

    def start(self, seq: StreamSeq, in_flight: Sequence[StreamSeq]) -> bool:
        """Find the longest cached prefix of the prompt and put it in the job's stream; False = wait
        a step, because a prompt being read right now shares more with this one than the cache."""
        lc, mem, dst = self._llama_cpp, self._mem, seq.seq_id
        limit = len(seq.prompt) - 1  # the last prompt token is always decoded (it yields the logits)
        own = ("kv", dst)
        in_place = 0
        if own in self._index and seq.reuse:
            in_place = min(common_prefix(self._index.tokens(own), seq.prompt), limit)
        holder: Hashable | None = None
        n = 0
        if self._prefix_cache and seq.reuse:
            holder, n = self._index.longest(seq.prompt)
            n = min(n, limit)
            for other in in_flight:
                common = min(common_prefix(other.prompt, seq.prompt), limit)
                if common > max(n, in_place):
                    if other.n_past < common or other.seq_id in self._pending_dests:
                        return False  # computed once, by the other sequence, then shared
                    holder, n = ("kv", other.seq_id), common
            self._stats.lookups += 1
        self._index.remove(own)
        self._parked.pop(dst, None)
        disk_n = self._from_disk(seq, max(n, in_place), limit)
        if disk_n:
            n = disk_n
        elif holder is not None and holder != own and n > in_place:
            source = int(holder[1])  # type: ignore[index]
            lc.llama_memory_seq_cp(mem, source, dst, -1, -1)  # across streams: the whole buffer
            lc.llama_memory_seq_rm(mem, dst, n, -1)
            self._pending_sources.add(source)
            self._pending_dests.add(dst)
            if source in self._parked:
                self._parked.move_to_end(source)
        else:
            n = in_place
            lc.llama_memory_seq_rm(mem, dst, n, -1)
        seq.n_past = n
        seq.kv_tokens = list(seq.prompt[:n])
        seq.cache_n = n
        if n:
            self._stats.hits += 1
            self._stats.hit_tokens += n
            self._stats.saved_prefill_ms += n * self._prefill_s_per_token * 1000
        seq.started = True
        return True

    def stats(self) -> CacheStats:
        stats = self._stats
        stats.parked = len(self._parked)
        stats.parked_tokens = sum(self._parked.values())
        if self.disk is not None:
            stats.disk_entries = len(self.disk.entries)
            stats.disk_bytes = self.disk.bytes_used()
            stats.disk_saves = self.disk.saves
            stats.disk_rejected = self.disk.rejected
            stats.notes = list(self.disk.errors)
        return stats

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    # -- the disk tier -------------------------------------------------------------------------

    def _from_disk(self, seq: StreamSeq, in_kv: int, limit: int) -> int:
        """Load into the job's stream the disk entry that covers more of its prompt than the KV
        cache does; returns the tokens now in the stream, or 0."""
        if self.disk is None or not seq.reuse or seq.seq_id in self._pending_sources:
            return 0
        with self._disk_lock:  # the writer thread adds entries
            holder, n = self._disk_index.longest(seq.prompt)
        n = min(n, limit)
        if holder is None or n < in_kv + DISK_MIN_GAIN:
            return 0
        entry = self.disk.entries.get(str(holder[1]))  # type: ignore[index]
        if entry is None or not self._load_disk_entry(entry, holder, seq.seq_id):
            if entry is None:
                with self._disk_lock:
                    self._disk_index.remove(holder)
            return 0
        self._llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, n, -1)
        self._stats.disk_hits += 1
        log.info("prefix cache: loaded from disk", tokens=n, path=str(entry.path))
        return n

    def _load_disk_entry(self, entry: DiskEntry, holder: Hashable, stream: int) -> bool:
        """Put a disk entry's state into ``stream``. An unreadable entry leaves the disk index; one
        llama.cpp refuses (or that holds other tokens) is also deleted from disk."""
        assert self.disk is not None
        state = self.disk.load(entry)
        if state is None:
            with self._disk_lock:
                self._disk_index.remove(holder)
            return False
        lc, mem = self._llama_cpp, self._mem
        lc.llama_memory_seq_rm(mem, stream, -1, -1)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        loaded = lc.llama_state_seq_set_data(self._ctx, buf, len(state), stream)
        if loaded == 0 or lc.llama_memory_seq_pos_max(mem, stream) != len(entry.tokens) - 1:
            lc.llama_memory_seq_rm(mem, stream, -1, -1)
            self.disk.reject(entry.path, "llama.cpp refused the state, or it holds other tokens")
            with self._disk_lock:
                self._disk_index.remove(holder)
            return False
        return True

    def _save_to_disk(self, stream: int, tokens: tuple[int, ...]) -> None:
        """Write a shared prefix (all the stream holds) to the disk tier once, in the background."""
        assert self.disk is not None
        name = PrefixDisk.name_of(tokens)
        with self._disk_lock:
            _holder, on_disk = self._disk_index.longest(tokens)
            if on_disk >= len(tokens) or name in self._disk_pending:
                return
            self._disk_pending.add(name)
        lc = self._llama_cpp
        size = lc.llama_state_seq_get_size(self._ctx, stream)
        buf = (ctypes.c_uint8 * size)()
        written = lc.llama_state_seq_get_data(self._ctx, buf, size, stream)
        if written != size:
            log.warning("prefix cache: could not read sequence state", expected=size, got=written)
            with self._disk_lock:
                self._disk_pending.discard(name)
            return

        def saved(entry: DiskEntry) -> None:
            with self._disk_lock:
                self._disk_pending.discard(name)
                self._disk_index.insert(("disk", entry.path.stem), entry.tokens)

        self.disk.save(tokens, bytes(buf), saved)
