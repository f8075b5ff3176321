"""What a backend is to the engine: a step-based sequence runner with a thread-safe tokenizer.

The engine's scheduler owns jobs and calls a backend from one thread only (llama.cpp keeps per-thread
state, its OpenMP team): it admits sequences into free slots, calls `Backend.step` which advances
every active sequence by one forward pass, and releases a sequence when its job ends. The tokenizer
is the exception: transports prepare prompts on other threads, so it must be safe from any thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from edged.backends.gguf_prompt import GgufTokenizer
    from edged.board import BoardInfo
    from edged.config import Settings


THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINK_END = "\n" + THINK_CLOSE + "\n\n"
"""How edged itself ends a reasoning block, in DeepSeek-R1's layout: right after the template's
``<think>\n`` for ``think: false``, and by forced tokens at a job's reasoning budget."""


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for a backend: the exact text and its tokens under the model's tokenizer."""

    text: str
    tokens: list[int]
    reuse: bool = True
    """Whether cached prefixes may stand in for computing the prompt (the job's ``cache_prompt``)."""


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar the sampled tokens must obey (llama.cpp's grammar sampler)."""

    text: str
    root: str = "root"
    after_think: bool = False
    """The output starts inside a ``<think>`` block: the grammar applies only after ``</think>``, so
    the reasoning stays free and the answer obeys."""
    trigger: str | None = None
    """A lazy grammar (llama.cpp's ``grammar_lazy``): the text is free until the model writes this
    word, then the grammar constrains the text from the word on (the grammar starts with it). With
    ``after_think`` the word counts only after ``</think>``. A backend without constrained output
    may run such a job freely (its answer is checked when it ends)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    seed: int | None = None
    ignore_eos: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: Grammar | None = None
    in_think: bool = False
    """The output starts inside a ``<think>`` block (the chat template opened it)."""
    reasoning_budget: int | None = None
    """Most tokens inside the ``<think>`` block; then the backend closes it (`THINK_END`)."""


@dataclass(frozen=True)
class ModelFacts:
    """What a backend says of its model, typed (the Ollama routes' ``details`` and ``model_info``), so
    no transport parses a backend's own keys or compares backend names."""

    format: str
    """The model file's format: ``gguf``, ``rkllm``."""
    family: str = ""
    """The architecture (``qwen2``, ``llama``); empty when the backend cannot tell."""
    parameter_size: str = ""
    """As llama.cpp writes it: ``1.5B``, ``135M``."""
    quantization: str = ""
    """As llama.cpp writes it: ``Q4_K - Medium``."""
    parameters: int = 0
    """Parameter count; 0 when unknown."""
    file_bytes: int = 0
    """Size of the weights; 0 when unknown."""
    description: str = ""
    """The runtime's one-line description (llama.cpp's ``llama_model_desc``)."""
    chat_template: bool = False
    """The model file carries a chat template."""


@dataclass(frozen=True)
class Capabilities:
    """What the scheduler may ask of a loaded backend."""

    max_sequences: int
    """Sequences that can be active (admitted and not released) at the same time."""
    prefix_cache: bool
    """Whether `SeqOutput.cache_n` can be non-zero (prompt tokens reused from earlier sequences)."""
    kv_cells: int | None = None
    """KV cache cells shared by all sequences (None: the runtime manages its own memory)."""
    kv_bytes_per_cell: int | None = None
    constrained_output: bool = False
    """Sampling can obey a `Grammar` (JSON schemas, GBNF) and a reasoning budget."""
    model: ModelFacts | None = None
    """What the backend knows of the loaded model."""


@dataclass(frozen=True)
class SeqOutput:
    """One sequence's result of a step: a new token, or the end of its generation."""

    slot: int
    piece: bytes = b""
    """The token's bytes (possibly part of a UTF-8 character); empty when ``end``."""
    end: bool = False
    """The model ended the sequence (end-of-generation token, not counted as output)."""
    cache_n: int | None = None
    """On a sequence's first output: prompt tokens it took from the prefix cache instead of computing."""
    perf: dict[str, float] | None = None
    """Runtime counters of the whole sequence (prefill_ms, generate_ms, generate_tokens), if any."""
    error: str | None = None
    """With ``end``: the sequence could not run (its job fails with this reason)."""
    job_fault: bool = False
    """With ``error``: the job's own constraint is at fault (a grammar that allows no token here),
    not the backend: the job fails ``invalid_output`` (422) instead of ``backend_failed``."""


@dataclass
class CacheStats:
    """Prefix-cache counters for /status, telemetry and /metrics (cumulative since start)."""

    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    saved_prefill_ms: float = 0.0
    parked: int = 0
    parked_tokens: int = 0
    evictions: int = 0
    disk_hits: int = 0
    disk_warmed: int = 0
    """Disk prefixes put into KV at load (the newest ones, into the empty streams)."""
    disk_entries: int = 0
    disk_bytes: int = 0
    disk_saves: int = 0
    disk_rejected: int = 0
    notes: list[str] = field(default_factory=list)


class Tokenizer(Protocol):
    """The model's chat template and tokenizer; every method is safe from any thread."""

    @property
    def n_vocab(self) -> int:
        """Tokens in the vocabulary: valid ids are ``0 .. n_vocab - 1`` (``logit_bias`` is checked)."""
        ...

    @property
    def template(self) -> str | None:
        """The model's chat template (Jinja source) as it ships it, or None when it has none."""
        ...

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The model's own chat template applied to ``messages``, ending with the assistant's turn;
        ``tools`` (OpenAI's shape) go to a template that renders them (`edged.tools.render`)."""
        ...

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        """Tokens of ``text``; ``chat`` says the text came from `render_chat` (special tokens inside)."""
        ...

    def grammar_problem(self, grammar: Grammar) -> str | None:
        """Why the model's grammar sampler cannot take ``grammar`` (None: it can)."""
        ...


class SettingsModel:
    """The properties of a backend that runs the model of edged's settings with a GGUF tokenizer
    (llama.cpp, RKLLM): a mixin, so the two cannot drift apart."""

    _settings: Settings
    _tokenizer: GgufTokenizer | None

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


class Backend(Protocol):
    """What the engine needs from a backend.

    `available` may be called anywhere; `tokenizer` (once loaded) from any thread; `interrupt` from
    any thread; everything else from the engine's one backend thread.
    """

    name: ClassVar[str]
    file_format: ClassVar[str]
    """The model file's format (``gguf``, ``rkllm``): known before the model loads."""

    def __init__(self, board: BoardInfo, settings: Settings) -> None:
        """Nothing heavy: `load` does the work, on the engine's backend thread."""
        ...

    @classmethod
    def available(cls, board: BoardInfo, settings: Settings) -> tuple[bool, str]:
        """Whether this backend can run here, and why (or why not), without loading anything heavy."""
        ...

    def load(self, slots: int) -> Capabilities:
        """Load the model for up to ``slots`` concurrent sequences; blocking. Raises `BackendError`."""
        ...

    @property
    def model_name(self) -> str: ...

    @property
    def n_ctx(self) -> int:
        """Most tokens (prompt + output) one sequence may hold."""
        ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def describe(self) -> dict[str, object]:
        """Facts for /status: threads, affinity, library version, KV size, ..."""
        ...

    def admit(self, slot: int, prompt: Prompt, params: SamplingParams) -> bool:
        """Start a sequence in the free ``slot``; False when its KV cells cannot be reserved yet.

        A backend reserves the cells a sequence may need (prompt plus ``params.max_tokens``) here, so
        a running sequence never fails for lack of memory; the engine retries after a release.
        """
        ...

    def step(self) -> list[SeqOutput]:
        """One forward pass over the active sequences. Each decoding sequence yields one output; a
        sequence still taking in its prompt yields none. Raises `BackendError` when the pass fails."""
        ...

    def release(self, slot: int) -> dict[str, float] | None:
        """End the sequence in ``slot`` (finished, stopped or cancelled) and free its cells at once
        (or park them for the prefix cache). Returns the runtime's own counters of the sequence
        (prefill_ms, generate_ms, generate_tokens) where it keeps them, else None."""
        ...

    def job_notes(self, params: SamplingParams) -> list[str]:
        """The job's settings this backend did not apply, each with what it used instead (the answer
        carries them: never silently). Empty when it applies them all."""
        ...

    def cache_stats(self) -> CacheStats | None:
        """Prefix-cache counters, or None for a backend without a prefix cache."""
        ...

    def interrupt(self) -> None:
        """Make a running `step` return as soon as it can (shutdown); safe from any thread."""
        ...

    def close(self) -> None: ...
