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

This module loads the model and runs the steps, as llama.cpp server's slots do. The streams double
as a prefix cache (`edged.backends.kv_streams`: which stream a job gets, what a finished one
leaves), and each sequence's token is picked by `edged.backends.llamacpp_sampling`. The
``llama_cpp`` import happens inside the methods: without it only this backend is unavailable.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from edged.backends import register_backend
from edged.backends.base import (
    CacheStats,
    Capabilities,
    ModelFacts,
    Prompt,
    SamplingParams,
    SeqOutput,
    SettingsModel,
)
from edged.backends.cpu_features import check_llama_cpu
from edged.backends.gguf_prompt import GgufTokenizer, load_model, model_fingerprint
from edged.backends.kv_streams import KvStreams
from edged.backends.llamacpp_sampling import Sampling, SeqSampler
from edged.backends.model_check import KV_BYTES_PER_VALUE, ModelFault, check_model, first_native_error
from edged.board import plan_cpus
from edged.errors import BackendError, BackendUnavailable

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

log = structlog.get_logger(__name__)

_GGML_TYPES = {
    "f16": lambda lib: lib.GGML_TYPE_F16,
    "q8_0": lambda lib: lib.GGML_TYPE_Q8_0,
    "q4_0": lambda lib: lib.GGML_TYPE_Q4_0,
}
"""``llamacpp.kv_type`` to ggml's type of the K and V caches (read from the loaded library)."""

# ggml_log_level in the llama.cpp this wheel builds: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
# Its INFO is load-time chatter, so it goes to debug with the rest.
NATIVE_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
NATIVE_ERROR = 4


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


@dataclass
class _Seq:
    """One active sequence: its stream (KV sequence id), samplers and how far its prompt has been
    read (a `kv_streams.StreamSeq`)."""

    slot: int
    seq_id: int
    prompt: list[int]
    reuse: bool
    sampler: SeqSampler
    started: bool = False
    """The prefix lookup ran and prefill began."""
    n_past: int = 0
    """Tokens of this sequence in the KV cache."""
    kv_tokens: list[int] = field(default_factory=list)
    next_token: int | None = None
    """Sampled and not yet decoded (the input of the next step)."""
    cache_n: int = 0
    reported: bool = False

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


def facts_of(description: str, *, parameters: int, file_bytes: int, chat_template: bool) -> ModelFacts:
    """`ModelFacts` from llama.cpp's description of a model: ``"qwen2 1.5B Q4_K - Medium"`` is the
    architecture, the parameter size and the quantization."""
    family, size, quant = [*description.split(" ", 2), "", "", ""][:3] if description else ("", "", "")
    return ModelFacts(
        format="gguf",
        family=family,
        parameter_size=size,
        quantization=quant,
        parameters=parameters,
        file_bytes=file_bytes,
        description=description,
        chat_template=chat_template,
    )


@register_backend("llamacpp")
class LlamaCppBackend(SettingsModel):
    """Generation on CPU cores with the model's own chat template, several sequences per pass."""

    name: ClassVar[str]
    file_format: ClassVar[str] = "gguf"

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
        self._sampling: Sampling | None = None
        self._kv: KvStreams | None = None
        """The streams as a prefix cache (from load on)."""
        self._facts = ModelFacts(format=self.file_format)
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
            check_model(board, settings, settings.engine.slots(board), llama_cpp.__version__)
        except ModelFault as exc:
            return False, exc.message
        return True, f"llama-cpp-python {llama_cpp.__version__} on CPU"

    @property
    def _streams(self) -> KvStreams:
        assert self._kv is not None, "streams before load"
        return self._kv

    @property
    def _sampler(self) -> Sampling:
        assert self._sampling is not None, "sampling before load"
        return self._sampling

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
        kv_type = self._options.kv_type
        values_per_cell = n_layer * llama_cpp.llama_model_n_head_kv(self._model) * head_dim * 2  # K and V
        bytes_per_cell = int(values_per_cell * KV_BYTES_PER_VALUE[kv_type])
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
        params.type_k = params.type_v = _GGML_TYPES[kv_type](llama_cpp)
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
        self._facts = facts_of(
            desc.value.decode(errors="replace"),
            parameters=int(llama_cpp.llama_model_n_params(self._model)),
            file_bytes=int(llama_cpp.llama_model_size(self._model)),
            chat_template=self._tokenizer.formatter is not None,
        )
        self._sampling = Sampling(llama_cpp, self._ctx, self._tokenizer)
        kv_cells = llama_cpp.llama_n_ctx(self._ctx)
        self._kv = KvStreams(
            llama_cpp,
            self._ctx,
            self._mem,
            n_seq,
            prefix_cache=self._engine_options.prefix_cache,
            min_tokens=self._engine_options.prefix_min_tokens,
        )
        self._caps = Capabilities(
            max_sequences=slots,
            prefix_cache=self._engine_options.prefix_cache,
            kv_cells=kv_cells,
            kv_bytes_per_cell=bytes_per_cell,
            constrained_output=True,
            model=self._facts,
        )
        if self._engine_options.prefix_cache and self._engine_options.prefix_cache_dir is not None:
            key = "-".join(
                (
                    model_fingerprint(path),
                    self._tokenizer.template_hash,
                    f"llama-cpp-python{self._version}",
                    *([] if kv_type == "f16" else [kv_type]),  # a saved cache is only read by its own kind
                )
            )
            self._kv.open_disk(
                self._engine_options.prefix_cache_dir,
                key,
                int(self._engine_options.prefix_cache_disk_mb * 1e6),
            )
        self._warm_up()
        warmed = self._kv.warm_from_disk()
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
            disk_prefixes=self._kv.disk_prefixes,
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
            "kv_type": self._options.kv_type,
            "kv_streams": self._kv.count if self._kv else 0,
            "kv_unified": False,
            "prefix_cache_dir": str(self._kv.disk.dir) if self._kv and self._kv.disk else None,
            "model_desc": self._facts.description,
            "model_params": self._facts.parameters,
            "model_bytes": self._facts.file_bytes,
        }

    def close(self) -> None:
        llama_cpp = self._llama_cpp
        if self._kv is not None:
            self._kv.close()
        for seq in self._active.values():
            self._sampler.free(seq.sampler)
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

    def admit(self, slot: int, prompt: Prompt, params: SamplingParams) -> bool:
        """Give the job the free stream that already holds most of its prompt, else the least
        recently used one (an empty stream first)."""
        assert slot not in self._active, f"slot {slot} is busy"
        free = self._streams.free({seq.seq_id for seq in self._active.values()})
        if not free:
            return False
        self._active[slot] = _Seq(
            slot=slot,
            seq_id=self._streams.choose(free, prompt.tokens),
            prompt=list(prompt.tokens),
            reuse=prompt.reuse,
            sampler=self._sampler.start(params, prompt.tokens),
        )
        self._order.append(slot)
        return True

    def release(self, slot: int) -> None:
        seq = self._active.pop(slot, None)
        if seq is None:
            return None
        if slot in self._order:
            self._order.remove(slot)
        self._sampler.free(seq.sampler)
        self._streams.release(seq)
        return None

    def job_notes(self, params: SamplingParams) -> list[str]:
        return []  # every sampling field reaches llama.cpp's sampler chain

    def cache_stats(self) -> CacheStats:
        return self._kv.stats() if self._kv is not None else CacheStats()

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

        broken = [seq for seq in self._active.values() if seq.sampler.error]
        if broken:  # never decoded: the job fails with the reason
            return [SeqOutput(slot=seq.slot, end=True, error=seq.sampler.error) for seq in broken]
        streams, sampling = self._streams, self._sampler
        streams.new_step()
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
                if not streams.start(seq, in_flight):
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
            streams.note_prefill(elapsed, prefill_tokens)
        for seq, take in prefill:
            seq.kv_tokens.extend(seq.prompt[seq.n_past : seq.n_past + take])
            seq.n_past += take
            if not seq.prefilling:
                streams.prompt_read(seq)
        for seq in decoding:
            seq.kv_tokens.append(seq.next_token)  # type: ignore[arg-type]
            seq.n_past += 1
        outputs: list[SeqOutput] = []
        tok = self._tokenizer
        assert tok is not None
        for seq, index in logits_at:
            forced = bool(seq.sampler.forced)
            token = sampling.sample(seq.sampler, index)
            if token is None:
                seq.next_token = None
                error = "the job's grammar allows no token here (the answer cannot be completed)"
                outputs.append(SeqOutput(slot=seq.slot, end=True, error=error, job_fault=True))
                continue
            cache_n = None if seq.reported else seq.cache_n
            seq.reported = True
            if tok.is_eog(token) and not seq.sampler.params.ignore_eos:
                seq.next_token = None
                outputs.append(SeqOutput(slot=seq.slot, end=True, cache_n=cache_n))
                continue
            seq.next_token = token
            piece = tok.piece(token)
            if seq.sampler.thinking:
                sampling.follow_thinking(seq.sampler, token, piece, forced)
            outputs.append(SeqOutput(slot=seq.slot, piece=piece, cache_n=cache_n))
        return outputs

    def _recover_after_failed_decode(self) -> None:
        """After a failed or aborted decode, a sequence's cells may be partly written: drop the
        active sequences' cells past what the engine knows (the jobs fail; parked prefixes stay)."""
        for seq in self._active.values():
            self._llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, seq.n_past, -1)
