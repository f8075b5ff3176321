"""llama.cpp on the CPU, through llama-cpp-python.

The ``llama_cpp`` import happens inside the methods: without it only this backend is unavailable.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import io
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from pydantic import BaseModel, ConfigDict, Field

from edged.backends import Prompt, SamplingParams, register_backend
from edged.backends.gguf_prompt import GgufPrompt, gguf_problem
from edged.errors import BackendError

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

log = structlog.get_logger(__name__)


class LlamaCppConfig(BaseModel):
    """Options of the llamacpp backend (section ``[llamacpp]``)."""

    model_config = ConfigDict(extra="forbid")

    batch: int = Field(512, ge=8, le=2048, description="Prompt-processing batch size (llama.cpp n_batch).")
    mmap: bool = Field(True, description="Map the model file instead of reading it into memory.")
    flash_attn: bool = Field(False, description="Use flash attention (faster prefill on some CPUs).")


# ggml_log_level in the llama.cpp this wheel builds: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
# Its INFO is load-time chatter, so it goes to debug with the rest.
NATIVE_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


def _native_log_callback(llama_cpp: Any) -> Any:
    """llama.cpp's log callback, routed to the ``llama.cpp`` logger (INFO chatter at debug level)."""
    native = logging.getLogger("llama.cpp")

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace").rstrip()
        if message:
            native.log(NATIVE_LEVELS.get(level, logging.DEBUG), message)

    return callback


@register_backend("llamacpp")
class LlamaCppBackend:
    """Generation on CPU cores with the model's own chat template."""

    name: ClassVar[str]

    def __init__(self, board: BoardInfo, settings: Settings) -> None:
        self._board = board
        self._settings = settings
        from edged.board import plan_cpus  # deferred: edged.config imports this module

        self._options = settings.llamacpp
        self._cpus = plan_cpus(board.profile, settings.model.threads)
        self._llm: Any = None
        self._prompt: GgufPrompt | None = None
        self._vocab: Any = None
        self._abort = threading.Event()
        self._version = "?"
        self._log_callback: Any = None

    @classmethod
    def available(cls, board: BoardInfo, settings: Settings) -> tuple[bool, str]:
        try:
            import llama_cpp
        except (ImportError, OSError, RuntimeError) as exc:  # a broken native library too
            return False, f"llama-cpp-python cannot be imported: {exc}"
        problem = gguf_problem(settings.model.path)
        if problem:
            return False, problem
        return True, f"llama-cpp-python {llama_cpp.__version__} on CPU"

    @property
    def model_name(self) -> str:
        return self._settings.model.display_name

    @property
    def n_ctx(self) -> int:
        return self._settings.model.ctx

    def load(self) -> None:
        try:
            import llama_cpp
        except (ImportError, OSError, RuntimeError) as exc:  # a broken native library too
            raise BackendError(f"llama-cpp-python cannot be imported: {exc}") from exc
        self._version = llama_cpp.__version__
        path = self._settings.model.path
        problem = gguf_problem(path)
        if problem:
            raise BackendError(problem)
        if self._cpus.affinity:
            os.sched_setaffinity(0, self._cpus.affinity)
        # verbose=False would make llama-cpp-python point fds 1 and 2 at /dev/null while the model
        # loads, swallowing every other thread's log lines meanwhile; instead its native log goes to
        # logging and its Python prints are captured.
        self._log_callback = _native_log_callback(llama_cpp)  # kept: llama.cpp holds only a C pointer
        llama_cpp.llama_log_set(self._log_callback, ctypes.c_void_p(0))
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                self._llm = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=self.n_ctx,
                    n_batch=self._options.batch,
                    n_ubatch=self._options.batch,
                    n_threads=self._cpus.threads,
                    n_threads_batch=self._cpus.threads,
                    use_mmap=self._options.mmap,
                    flash_attn=self._options.flash_attn,
                    verbose=True,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(f"llama.cpp could not load {path}: {exc}") from exc
        finally:
            for line in captured.getvalue().splitlines():
                if line.strip():
                    log.debug("llama-cpp-python", line=line)
        self._llm.verbose = False  # no per-call prints from generate()
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._prompt = GgufPrompt(self._llm)
        log.info(
            "llama.cpp model loaded",
            model=str(path),
            threads=self._cpus.threads,
            cpus=self._cpus.note,
            chat_template=self._prompt.formatter is not None,
        )

    def describe(self) -> dict[str, object]:
        return {
            "library": f"llama-cpp-python {self._version}",
            "threads": self._cpus.threads,
            "affinity": self._cpus.affinity,
            "cpus": self._cpus.note,
            "n_batch": self._options.batch,
            "mmap": self._options.mmap,
            "chat_template": self._prompt is not None and self._prompt.formatter is not None,
        }

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        assert self._prompt is not None, "render_chat before load"
        return self._prompt.render_chat(messages)

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        assert self._prompt is not None, "tokenize before load"
        return self._prompt.tokenize(text, chat=chat)

    def generate(self, prompt: Prompt, params: SamplingParams, cancel: threading.Event) -> Iterator[str]:
        import llama_cpp

        llm = self._llm
        self._abort.clear()
        if params.seed is not None:
            llm.set_seed(params.seed)
        # A full prefill per job keeps prompt timings honest (no hidden prefix-cache hits).
        llm.reset()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced = 0
        tokens = llm.generate(
            prompt.tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            reset=True,
        )
        try:
            for token in tokens:
                if cancel.is_set() or self._abort.is_set():
                    return
                if not params.ignore_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    return
                produced += 1
                yield decoder.decode(bytes(llm.detokenize([token])))
                if produced >= params.max_tokens:
                    return
        except RuntimeError as exc:
            raise BackendError(f"llama.cpp failed while generating: {exc}") from exc
        finally:
            tokens.close()

    def abort(self) -> None:
        self._abort.set()

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
