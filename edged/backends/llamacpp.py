"""llama.cpp on the CPU, through llama-cpp-python's low-level API: continuous batching and a prefix cache.

One llama.cpp context holds every slot's sequence, each in its own KV stream (``n_seq_max`` streams
of 2048 cells, ``kv_unified = false``). Each `step` builds one batch: the next token of every
decoding sequence plus a chunk of the oldest prompt still being read, so a long new prompt does not
stall running streams, and one weight pass serves them all (decode on a small board is
memory-bound: more sequences per pass is nearly free). Each sequence samples with its own
``llama_sampler`` chain straight from the context's logits.

Why separate streams rather than one unified cache: in a unified cache a sequence's cells land
wherever cells are free, interleaved with other sequences', and attention then sums the same terms
in a different order, so greedy output changes with whoever else is running (measured: 3 of 6 jobs
changed text at temperature 0). In its own stream a sequence's cells sit at the same places whether
it runs alone or beside three others: a job's text does not depend on its neighbours or on a cache
hit. Attention is also cheaper (each sequence attends over its own cells only).

Prefix cache: a finished sequence stays in its stream ("parked") until the stream is given to
another job. A radix trie over the tokens held in the streams finds the longest prefix of a new
prompt: the job gets the stream already holding it (reused in place, no copy), or the holder's
stream is copied into the job's stream (``llama_memory_seq_cp`` across streams copies the buffer,
one memcpy) and trimmed to the shared part. Prefixes that several jobs shared are also written to
disk (`edged.backends.prefix_disk`) and found there after a restart. The ``llama_cpp`` import
happens inside the methods: without it only this backend is unavailable.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import structlog

from edged.backends import register_backend
from edged.backends.base import CacheStats, Capabilities, Prompt, SamplingParams, SeqOutput
from edged.backends.cpu_features import check_llama_cpu
from edged.backends.gguf_prompt import GgufTokenizer, load_model, model_fingerprint
from edged.backends.model_check import ModelFault, check_model, first_native_error, requested_slots
from edged.backends.prefix_disk import DiskEntry, PrefixDisk
from edged.backends.prefix_index import PrefixIndex
from edged.board import plan_cpus
from edged.errors import BackendError, BackendUnavailable

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

log = structlog.get_logger(__name__)

# ggml_log_level in the llama.cpp this wheel builds: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
# Its INFO is load-time chatter, so it goes to debug with the rest.
NATIVE_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
NATIVE_ERROR = 4
PENALTY_LAST_N = 64
CLOSE_THINKING = "\n</think>\n\n"
"""What closes a reasoning block at the job's reasoning budget (DeepSeek-R1's own layout)."""
THINK_CLOSE_BYTES = b"</think>"
DISK_MIN_GAIN = 16
"""A disk entry is loaded only when it covers this many more prompt tokens than the KV cache does."""


def _native_log_callback(llama_cpp: Any, errors: deque[str] | None = None) -> Any:
    """llama.cpp's log callback, routed to the ``llama.cpp`` logger (INFO chatter at debug level);
    its ERROR lines are also kept in ``errors``, to say why a load returned NULL."""
    native = logging.getLogger("llama.cpp")

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace").rstrip()
        if message:
            native.log(NATIVE_LEVELS.get(level, logging.DEBUG), message)
            if level == NATIVE_ERROR and errors is not None:
                errors.append(message)

    return callback


def _common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Seq:
    """One active sequence: its KV sequence id, sampler chain and how far its prompt has been read."""

    slot: int
    seq_id: int
    prompt: list[int]
    reuse: bool
    params: SamplingParams
    chain: Any
    started: bool = False
    """The prefix lookup ran and prefill began."""
    n_past: int = 0
    """Tokens of this sequence in the KV cache."""
    kv_tokens: list[int] = field(default_factory=list)
    next_token: int | None = None
    """Sampled and not yet decoded (the input of the next step)."""
    cache_n: int = 0
    reported: bool = False
    thinking: bool = False
    """Inside the ``<think>`` block (the output so far has not closed it)."""
    think_tokens: int = 0
    grammar: Any = None
    """The job's grammar sampler, checked against the chain's choice (see `_sample`)."""
    grammar_pending: bool = False
    """The job's grammar waits for ``</think>`` (then it is built)."""
    forced: list[int] = field(default_factory=list)
    """Tokens the backend emits instead of sampling (closing the think block at the budget)."""
    tail: bytes = b""
    error: str | None = None

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


@register_backend("llamacpp")
class LlamaCppBackend:
    """Generation on CPU cores with the model's own chat template, several sequences per pass."""

    name: ClassVar[str]

    def __init__(self, board: BoardInfo, settings: Settings) -> None:
        self._board = board
        self._settings = settings
        self._options = settings.llamacpp
        self._engine_options = settings.engine
        self._cpus = plan_cpus(board.profile, settings.model.threads)
        self._llama_cpp: Any = None
        self._model: Any = None
        self._ctx: Any = None
        self._mem: Any = None
        self._batch: Any = None
        self._tokenizer: GgufTokenizer | None = None
        self._think_close_token = -1
        self._cand: Any = None
        self._ids: Any = None
        self._model_facts: dict[str, object] = {}
        self._version = "?"
        self._log_callback: Any = None
        self._native_errors: deque[str] = deque(maxlen=32)
        """llama.cpp's last ERROR log lines (the reason of a NULL from a load)."""
        self._abort_callback: Any = None
        self._interrupt = threading.Event()
        self._caps = Capabilities(max_sequences=1, prefix_cache=False)
        self._n_batch = self._options.batch
        self._active: dict[int, _Seq] = {}
        self._order: list[int] = []
        """Slots in admission order: prompts are read in this order."""
        self._streams = 0
        self._parked: OrderedDict[int, int] = OrderedDict()
        """Free streams (sequence ids) holding a finished job's tokens -> how many; least recent first."""
        self._index = PrefixIndex()
        """Holders ("kv", seq_id): active prompts once read, and parked streams."""
        self._pending_sources: set[int] = set()
        """Streams being copied from in the step being built (the copy happens in llama_decode)."""
        self._pending_dests: set[int] = set()
        """Streams being copied into in the step being built: not a source until the copy is done."""
        self._disk_index = PrefixIndex()
        self._disk: PrefixDisk | None = None
        self._disk_pending: set[str] = set()
        self._disk_lock = threading.Lock()
        self._stats = CacheStats()
        self._prefill_s_per_token = 0.0

    @classmethod
    def available(cls, board: BoardInfo, settings: Settings) -> tuple[bool, str]:
        problem = check_llama_cpu() if settings.llamacpp.cpu_check else None
        if problem is not None:  # before the import: loading the library may already be fatal
            return False, problem
        try:
            import llama_cpp
        except (ImportError, OSError, RuntimeError) as exc:  # a broken native library too
            return False, f"llama-cpp-python cannot be imported: {exc}"
        try:  # the file, its architecture, and the memory it needs with the slots the engine will ask
            check_model(board, settings, requested_slots(board, settings), llama_cpp.__version__)
        except ModelFault as exc:
            return False, exc.message
        return True, f"llama-cpp-python {llama_cpp.__version__} on CPU"

    @property
    def model_name(self) -> str:
        return self._settings.model.display_name

    @property
    def n_ctx(self) -> int:
        return self._settings.model.ctx

    @property
    def tokenizer(self) -> GgufTokenizer:
        assert self._tokenizer is not None, "tokenizer before load"
        return self._tokenizer

    # -- lifecycle -----------------------------------------------------------------------------

    def load(self, slots: int) -> Capabilities:
        problem = check_llama_cpu() if self._settings.llamacpp.cpu_check else None
        if problem is not None:
            raise BackendUnavailable(problem)
        try:
            import llama_cpp
        except (ImportError, OSError, RuntimeError) as exc:  # a broken native library too
            raise BackendError(f"llama-cpp-python cannot be imported: {exc}") from exc
        self._llama_cpp = llama_cpp
        self._version = llama_cpp.__version__
        # Again with the real slot count (and the file may have changed since `available`).
        path = check_model(self._board, self._settings, slots, self._version).path
        if self._cpus.affinity:
            os.sched_setaffinity(0, self._cpus.affinity)
        # kept: llama.cpp holds only a C pointer
        self._log_callback = _native_log_callback(llama_cpp, self._native_errors)
        llama_cpp.llama_log_set(self._log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        self._native_errors.clear()
        try:
            self._model = load_model(path, use_mmap=self._options.mmap)
        except BackendError as exc:  # something the pre-load check does not look at: llama.cpp says what
            reason = first_native_error(list(self._native_errors)) or "it logged no reason"
            raise ModelFault(
                path,
                f"llama.cpp could not load it: {reason}",
                "check that it is a complete GGUF of a model llama.cpp supports (the llama.cpp log has more)",
            ) from exc
        n_layer = llama_cpp.llama_model_n_layer(self._model)
        n_head = max(1, llama_cpp.llama_model_n_head(self._model))
        head_dim = llama_cpp.llama_model_n_embd(self._model) // n_head
        bytes_per_cell = n_layer * llama_cpp.llama_model_n_head_kv(self._model) * head_dim * 2 * 2  # K+V f16
        # Extra streams only park prefixes (free slots park theirs anyway): engine.prefix_cache_mb.
        extra = 0
        if self._engine_options.prefix_cache:
            extra = int(self._engine_options.prefix_cache_mb * 1e6 // (self.n_ctx * bytes_per_cell))
        n_seq = slots + extra
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * self.n_ctx
        params.n_batch = self._n_batch
        params.n_ubatch = self._n_batch
        params.n_seq_max = n_seq
        params.n_threads = self._cpus.threads
        params.n_threads_batch = self._cpus.threads
        params.kv_unified = False  # one stream per sequence: see the module docstring
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if self._options.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self._interrupt.clear()

        @ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)
        def should_abort(_data: ctypes.c_void_p) -> bool:
            return self._interrupt.is_set()

        self._abort_callback = should_abort
        params.abort_callback = self._abort_callback
        self._native_errors.clear()
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:  # its KV cache or compute buffers could not be allocated, most likely
            llama_cpp.llama_model_free(self._model)
            self._model = None
            reason = first_native_error(list(self._native_errors)) or "it logged no reason"
            raise ModelFault(
                path,
                f"llama.cpp could not create a context of {n_seq} streams x {self.n_ctx} tokens "
                f"({slots} slots): {reason}",
                "use fewer slots (engine.parallel), a smaller model.ctx or engine.prefix_cache_mb, "
                "or a smaller model",
            )
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._tokenizer = GgufTokenizer(self._model)
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._model, desc, 256)
        self._model_facts = {
            "model_desc": desc.value.decode(errors="replace"),  # "qwen2 1.5B Q4_K - Medium"
            "model_params": int(llama_cpp.llama_model_n_params(self._model)),
            "model_bytes": int(llama_cpp.llama_model_size(self._model)),
        }
        n_vocab = self._tokenizer.n_vocab
        self._cand = np.empty(n_vocab, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
        self._ids = np.arange(n_vocab, dtype=np.int32)
        close = self._tokenizer.tokenize("</think>", chat=True)
        self._think_close_token = close[0] if len(close) == 1 else -1
        kv_cells = llama_cpp.llama_n_ctx(self._ctx)
        self._streams = n_seq
        self._caps = Capabilities(
            max_sequences=slots,
            prefix_cache=self._engine_options.prefix_cache,
            kv_cells=kv_cells,
            kv_bytes_per_cell=bytes_per_cell,
            constrained_output=True,
        )
        if self._engine_options.prefix_cache and self._engine_options.prefix_cache_dir is not None:
            key = "-".join(
                (model_fingerprint(path), self._tokenizer.template_hash, f"llama-cpp-python{self._version}")
            )
            self._disk = PrefixDisk(
                self._engine_options.prefix_cache_dir,
                key,
                int(self._engine_options.prefix_cache_disk_mb * 1e6),
            )
            for entry in self._disk.scan():
                self._disk_index.insert(("disk", entry.path.stem), entry.tokens)
        self._warm_up()
        warmed = self._warm_from_disk()
        log.info(
            "llama.cpp model loaded",
            model=str(path),
            threads=self._cpus.threads,
            cpus=self._cpus.note,
            slots=slots,
            kv_cells=kv_cells,
            kv_mb=round(kv_cells * bytes_per_cell / 1e6, 1),
            park_streams=extra,
            chat_template=self._tokenizer.formatter is not None,
            disk_prefixes=len(self._disk_index),
            disk_prefixes_in_kv=warmed,
        )
        return self._caps

    def _warm_up(self) -> None:
        """One single-token decode at load, as llama-server does, so the first job does not pay for
        first use (compute buffers, page faults in the weights)."""
        lc, tok = self._llama_cpp, self._tokenizer
        assert tok is not None
        bos = lc.llama_vocab_bos(tok.vocab)
        batch = self._batch
        batch.n_tokens = 1
        batch.token[0], batch.pos[0], batch.n_seq_id[0] = bos if bos >= 0 else 0, 0, 1
        batch.seq_id[0][0], batch.logits[0] = 0, True
        rc = lc.llama_decode(self._ctx, batch)
        lc.llama_memory_seq_rm(self._mem, 0, -1, -1)
        if rc != 0:
            log.warning("llama.cpp warm-up decode failed", rc=rc)

    def _warm_from_disk(self) -> int:
        """Put the most recently used disk prefixes into the empty streams at load (parked, as if just
        released), so the first jobs after a restart find them in KV; returns how many."""
        if self._disk is None or not self._disk.entries:
            return 0

        def mtime(entry: DiskEntry) -> float:
            try:
                return entry.path.stat().st_mtime
            except OSError:
                return 0.0

        newest = sorted(self._disk.entries.values(), key=mtime, reverse=True)[: self._streams]
        warmed = 0
        for stream, entry in enumerate(newest):
            if not self._load_disk_entry(entry, ("disk", entry.path.stem), stream):
                continue
            self._index.insert(("kv", stream), list(entry.tokens))
            self._parked[stream] = len(entry.tokens)
            warmed += 1
        self._stats.disk_warmed += warmed
        return warmed

    def describe(self) -> dict[str, object]:
        caps = self._caps
        return {
            "library": f"llama-cpp-python {self._version}",
            "threads": self._cpus.threads,
            "affinity": self._cpus.affinity,
            "cpus": self._cpus.note,
            "n_batch": self._n_batch,
            "mmap": self._options.mmap,
            "chat_template": self._tokenizer is not None and self._tokenizer.formatter is not None,
            "slots": caps.max_sequences,
            "kv_cells": caps.kv_cells,
            "kv_mb": round((caps.kv_cells or 0) * (caps.kv_bytes_per_cell or 0) / 1e6, 1),
            "kv_streams": self._streams,
            "kv_unified": False,
            "prefix_cache_dir": str(self._disk.dir) if self._disk else None,
            **self._model_facts,
        }

    def close(self) -> None:
        llama_cpp = self._llama_cpp
        if self._disk is not None:
            self._disk.close()
        for seq in self._active.values():
            self._free_samplers(seq)
        self._active.clear()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def interrupt(self) -> None:
        self._interrupt.set()

    # -- sequences -----------------------------------------------------------------------------

    def _grammar(self, params: SamplingParams) -> tuple[Any, str | None]:
        """The job's grammar sampler (kept beside its chain, as llama.cpp's common sampler does), or
        None and why it could not be built."""
        if params.grammar is None:
            return None, None
        assert self._tokenizer is not None
        sampler = self._llama_cpp.llama_sampler_init_grammar(
            self._tokenizer.vocab, params.grammar.text.encode(), params.grammar.root.encode()
        )
        if not sampler:
            return None, "llama.cpp could not build the job's grammar sampler"
        return sampler, None

    def _chain(self, params: SamplingParams, history: list[int]) -> Any:
        """The job's own sampler chain, in llama-cpp-python's order (penalties, logit bias, top-k,
        top-p, min-p, temperature, then a seeded draw; temperature 0 is greedy)."""
        lc = self._llama_cpp
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            assert self._tokenizer is not None
            lc.llama_sampler_chain_add(
                chain,
                lc.llama_sampler_init_penalties(  # this llama.cpp's signature leads with n_vocab
                    self._tokenizer.n_vocab,
                    PENALTY_LAST_N,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
            for token in history[-PENALTY_LAST_N:]:  # the penalty looks back over the prompt too
                lc.llama_sampler_accept(chain, token)
        if params.logit_bias:
            assert self._tokenizer is not None
            biases = (lc.llama_logit_bias * len(params.logit_bias))()
            for i, (token, bias) in enumerate(params.logit_bias):
                biases[i].token, biases[i].bias = token, bias
            lc.llama_sampler_chain_add(
                chain,
                lc.llama_sampler_init_logit_bias(self._tokenizer.n_vocab, len(params.logit_bias), biases),
            )
        if params.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else lc.LLAMA_DEFAULT_SEED
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def _free_streams(self) -> list[int]:
        owned = {seq.seq_id for seq in self._active.values()}
        return [i for i in range(self._streams) if i not in owned]

    def admit(self, slot: int, prompt: Prompt, params: SamplingParams) -> bool:
        """Give the job the free stream that already holds most of its prompt, else the least
        recently used one (an empty stream first)."""
        assert slot not in self._active, f"slot {slot} is busy"
        free = self._free_streams()
        if not free:
            return False

        def value(stream: int) -> tuple[int, int]:
            held = ("kv", stream)
            shared = _common_prefix(self._index.tokens(held), prompt.tokens) if held in self._index else 0
            recency = list(self._parked).index(stream) if stream in self._parked else -1
            return shared, -recency

        stream = max(free, key=value)
        pending = params.grammar is not None and params.grammar.after_think and params.in_think
        chain = self._chain(params, prompt.tokens)
        grammar, problem = (None, None) if pending else self._grammar(params)
        self._active[slot] = _Seq(
            slot=slot,
            seq_id=stream,
            prompt=list(prompt.tokens),
            reuse=prompt.reuse,
            params=params,
            chain=chain,
            grammar=grammar,
            thinking=params.in_think,
            grammar_pending=pending,
            error=problem,
        )
        self._order.append(slot)
        return True

    def release(self, slot: int) -> None:
        seq = self._active.pop(slot, None)
        if seq is None:
            return None
        if slot in self._order:
            self._order.remove(slot)
        self._free_samplers(seq)
        self._index.remove(("kv", seq.seq_id))
        lc, mem = self._llama_cpp, self._mem
        if not self._caps.prefix_cache or not seq.started or seq.n_past == 0:
            lc.llama_memory_seq_rm(mem, seq.seq_id, -1, -1)
            self._parked.pop(seq.seq_id, None)
            return None
        tokens = seq.kv_tokens[: seq.n_past]
        if self._disk is not None and seq.cache_n >= self._engine_options.prefix_min_tokens:
            # Several jobs shared this prefix: keep exactly it, here and on disk.
            tokens = tokens[: seq.cache_n]
            lc.llama_memory_seq_rm(mem, seq.seq_id, len(tokens), -1)
            self._save_to_disk(seq.seq_id, tuple(tokens))
        self._parked[seq.seq_id] = len(tokens)
        self._parked.move_to_end(seq.seq_id)
        self._index.insert(("kv", seq.seq_id), tokens)
        return None

    def job_notes(self, params: SamplingParams) -> list[str]:
        return []  # every sampling field reaches llama.cpp's sampler chain

    def cache_stats(self) -> CacheStats:
        stats = self._stats
        stats.parked = len(self._parked)
        stats.parked_tokens = sum(self._parked.values())
        if self._disk is not None:
            stats.disk_entries = len(self._disk.entries)
            stats.disk_bytes = self._disk.bytes_used()
            stats.disk_saves = self._disk.saves
            stats.disk_rejected = self._disk.rejected
            stats.notes = list(self._disk.errors)
        return stats

    # -- prefix reuse --------------------------------------------------------------------------

    def _start(self, seq: _Seq, in_flight: list[_Seq]) -> bool:
        """Find the longest cached prefix of the prompt and put it in the job's stream; False = wait
        a step, because a prompt being read right now shares more with this one than the cache."""
        lc, mem, dst = self._llama_cpp, self._mem, seq.seq_id
        limit = len(seq.prompt) - 1  # the last prompt token is always decoded (it yields the logits)
        own = ("kv", dst)
        in_place = 0
        if own in self._index and seq.reuse:
            in_place = min(_common_prefix(self._index.tokens(own), seq.prompt), limit)
        holder: Hashable | None = None
        n = 0
        if self._caps.prefix_cache and seq.reuse:
            holder, n = self._index.longest(seq.prompt)
            n = min(n, limit)
            for other in in_flight:
                common = min(_common_prefix(other.prompt, seq.prompt), limit)
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

    def _from_disk(self, seq: _Seq, in_kv: int, limit: int) -> int:
        """Load into the job's stream the disk entry that covers more of its prompt than the KV
        cache does; returns the tokens now in the stream, or 0."""
        if self._disk is None or not seq.reuse or seq.seq_id in self._pending_sources:
            return 0
        with self._disk_lock:  # the writer thread adds entries
            holder, n = self._disk_index.longest(seq.prompt)
        n = min(n, limit)
        if holder is None or n < in_kv + DISK_MIN_GAIN:
            return 0
        entry = self._disk.entries.get(str(holder[1]))  # type: ignore[index]
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
        assert self._disk is not None
        state = self._disk.load(entry)
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
            self._disk.reject(entry.path, "llama.cpp refused the state, or it holds other tokens")
            with self._disk_lock:
                self._disk_index.remove(holder)
            return False
        return True

    def _save_to_disk(self, stream: int, tokens: tuple[int, ...]) -> None:
        """Write a shared prefix (all the stream holds) to the disk tier once, in the background."""
        assert self._disk is not None
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

        self._disk.save(tokens, bytes(buf), saved)

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> list[SeqOutput]:
        lc = self._llama_cpp
        batch = self._batch
        n = 0
        logits_at: list[tuple[_Seq, int]] = []

        def add(token: int, pos: int, seq: _Seq, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq.seq_id
            batch.logits[n] = logits
            if logits:
                logits_at.append((seq, n))
            n += 1

        broken = [seq for seq in self._active.values() if seq.error]
        if broken:  # never decoded: the job fails with the reason
            return [SeqOutput(slot=seq.slot, end=True, error=seq.error) for seq in broken]
        self._pending_sources.clear()
        self._pending_dests.clear()
        decoding = [s for s in self._active.values() if s.next_token is not None]
        for seq in decoding:
            add(seq.next_token, seq.n_past, seq, True)  # type: ignore[arg-type]
        prefill: list[tuple[_Seq, int]] = []
        in_flight: list[_Seq] = [
            self._active[s] for s in self._order if self._active[s].started and self._active[s].prefilling
        ]
        prefill_tokens = 0
        for slot in self._order:
            if n >= self._n_batch:
                break
            seq = self._active[slot]
            if not seq.prefilling:
                continue
            if not seq.started:
                if not self._start(seq, in_flight):
                    break  # arrival order: later prompts wait too
                in_flight.append(seq)
                if not seq.prefilling:
                    continue
            take = min(self._n_batch - n, len(seq.prompt) - seq.n_past)
            for i in range(take):
                pos = seq.n_past + i
                add(seq.prompt[pos], pos, seq, pos == len(seq.prompt) - 1)
            prefill.append((seq, take))
            prefill_tokens += take
        if n == 0:
            return []
        batch.n_tokens = n
        started = time.perf_counter()
        rc = lc.llama_decode(self._ctx, batch)
        if rc != 0:
            self._recover_after_failed_decode()
            if rc == 2 and self._interrupt.is_set():
                raise BackendError("interrupted")
            raise BackendError(f"llama_decode failed with {rc} ({n} tokens in the batch)")
        elapsed = time.perf_counter() - started
        if prefill_tokens and not decoding:
            # Prefill speed for "saved_prefill_ms": a moving average of pure-prefill steps.
            per_token = elapsed / prefill_tokens
            self._prefill_s_per_token = (
                per_token
                if not self._prefill_s_per_token
                else (0.8 * self._prefill_s_per_token + 0.2 * per_token)
            )
        for seq, take in prefill:
            seq.kv_tokens.extend(seq.prompt[seq.n_past : seq.n_past + take])
            seq.n_past += take
            if not seq.prefilling:
                self._index.insert(("kv", seq.seq_id), seq.prompt)
        for seq in decoding:
            seq.kv_tokens.append(seq.next_token)  # type: ignore[arg-type]
            seq.n_past += 1
        outputs: list[SeqOutput] = []
        tok = self._tokenizer
        assert tok is not None
        for seq, index in logits_at:
            forced = bool(seq.forced)
            if forced:
                token = seq.forced.pop(0)
            elif seq.grammar is None:
                token = lc.llama_sampler_sample(seq.chain, self._ctx, index)
            else:
                sampled = self._sample_with_grammar(seq, index)
                if sampled is None:
                    seq.next_token = None
                    error = "the job's grammar allows no token here (the answer cannot be completed)"
                    outputs.append(SeqOutput(slot=seq.slot, end=True, error=error, job_fault=True))
                    continue
                token = sampled
            cache_n = None if seq.reported else seq.cache_n
            seq.reported = True
            if tok.is_eog(token) and not seq.params.ignore_eos:
                seq.next_token = None
                outputs.append(SeqOutput(slot=seq.slot, end=True, cache_n=cache_n))
                continue
            seq.next_token = token
            piece = tok.piece(token)
            if seq.thinking:
                self._follow_thinking(seq, token, piece, forced)
            outputs.append(SeqOutput(slot=seq.slot, piece=piece, cache_n=cache_n))
        return outputs

    def _free_samplers(self, seq: _Seq) -> None:
        self._llama_cpp.llama_sampler_free(seq.chain)
        if seq.grammar is not None:
            self._llama_cpp.llama_sampler_free(seq.grammar)
            seq.grammar = None

    def _candidates(self, index: int) -> Any:
        """All tokens with the logits of batch position ``index``, as llama.cpp's samplers take them
        (a numpy buffer reused every step; no Python loop over the vocabulary)."""
        lc = self._llama_cpp
        n_vocab = self._cand.shape[0]
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, index), shape=(n_vocab,))
        self._cand["id"] = self._ids
        self._cand["logit"] = logits
        self._cand["p"] = 0.0
        data = self._cand.ctypes.data_as(ctypes.POINTER(lc.llama_token_data))
        return lc.llama_token_data_array(data=data, size=n_vocab, selected=-1, sorted=False)

    def _sample_with_grammar(self, seq: _Seq, index: int) -> int | None:
        """llama.cpp's common sampler: the chain picks a token over the whole vocabulary, the grammar
        checks only that one; only if it is refused does the grammar filter the whole vocabulary and
        the chain pick again. Both accept the token. None: the grammar allows nothing here."""
        lc = self._llama_cpp
        cur = self._candidates(index)
        lc.llama_sampler_apply(seq.chain, ctypes.byref(cur))
        token = int(cur.data[cur.selected].id)
        single = lc.llama_token_data(id=token, logit=1.0, p=0.0)
        check = lc.llama_token_data_array(data=ctypes.pointer(single), size=1, selected=-1, sorted=False)
        lc.llama_sampler_apply(seq.grammar, ctypes.byref(check))
        if math.isinf(single.logit) and single.logit < 0:  # refused: filter everything, pick again
            cur = self._candidates(index)
            lc.llama_sampler_apply(seq.grammar, ctypes.byref(cur))
            lc.llama_sampler_apply(seq.chain, ctypes.byref(cur))
            chosen = cur.data[cur.selected]
            if cur.selected < 0 or (math.isinf(chosen.logit) and chosen.logit < 0):
                return None
            token = int(chosen.id)
        lc.llama_sampler_accept(seq.grammar, token)
        lc.llama_sampler_accept(seq.chain, token)
        return token

    def _follow_thinking(self, seq: _Seq, token: int, piece: bytes, forced: bool) -> None:
        """Watch a sequence's reasoning: when ``</think>`` comes out (sampled or forced), the job's
        grammar takes over; at the reasoning budget the block is closed by forced tokens."""
        seq.tail = (seq.tail + piece)[-16:]
        if token == self._think_close_token or THINK_CLOSE_BYTES in seq.tail:
            seq.thinking = False
            seq.forced.clear()
            if seq.grammar_pending:
                seq.grammar_pending = False
                seq.grammar, seq.error = self._grammar(seq.params)
            return
        if not forced:
            seq.think_tokens += 1
        budget = seq.params.reasoning_budget
        if budget is not None and seq.think_tokens >= budget and not seq.forced:
            assert self._tokenizer is not None
            seq.forced = self._tokenizer.tokenize(CLOSE_THINKING, chat=True)

    def _recover_after_failed_decode(self) -> None:
        """After a failed or aborted decode, a sequence's cells may be partly written: drop the
        active sequences' cells past what the engine knows (the jobs fail; parked prefixes stay)."""
        for seq in self._active.values():
            self._llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, seq.n_past, -1)
