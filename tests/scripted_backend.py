"""A deterministic in-process backend for fast scheduler tests (beside, never instead of, the
real-model tests): it implements the step interface exactly, generates the alphabet from a start
letter the prompt chooses, and records what the scheduler asked of it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edged.backends import (
    BackendChoice,
    CacheStats,
    Capabilities,
    Grammar,
    Prompt,
    SamplingParams,
    SeqOutput,
)
from edged.errors import BackendError

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


class ScriptTokenizer:
    """One token per character; a chat is rendered as its last message's text."""

    n_vocab = 0x110000
    """Every Unicode code point."""
    template = None

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        return str(messages[-1]["content"])

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        return [ord(c) for c in text]

    def grammar_problem(self, grammar: Grammar) -> str | None:
        return None


@dataclass
class Script:
    """What the backend does, set by a test before the engine starts."""

    kv_cells: int = 10_000
    step_s: float = 0.002
    fail_on_step: int | None = None
    """Raise `BackendError` on this step number (1-based)."""
    admit_raises_for: str | None = None
    """`admit` raises for a prompt starting with this text (a backend bug, or a job it cannot start)."""
    end_after: int | None = None
    """Emit end-of-generation after this many tokens."""
    admitted: list[str] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    refused: int = 0
    gate: threading.Event = field(default_factory=threading.Event)
    """Steps wait for this to be set (tests open it when they are ready to watch)."""

    def __post_init__(self) -> None:
        self.gate.set()


@dataclass
class _Seq:
    prompt: Prompt
    params: SamplingParams
    start: int
    produced: int = 0
    reserved: int = 0


class ScriptedBackend:
    name: ClassVar[str] = "scripted"
    file_format: ClassVar[str] = "script"
    script: ClassVar[Script] = Script()

    def __init__(self, board: Any, settings: Any) -> None:
        self._settings = settings
        self._seqs: dict[int, _Seq] = {}
        self._tokenizer = ScriptTokenizer()
        self._slots = 1
        self._steps = 0

    @classmethod
    def available(cls, board: Any, settings: Any) -> tuple[bool, str]:
        return True, "scripted test backend"

    def load(self, slots: int) -> Capabilities:
        self._slots = slots
        return Capabilities(max_sequences=slots, prefix_cache=False, kv_cells=self.script.kv_cells)

    @property
    def model_name(self) -> str:
        return "scripted"

    @property
    def n_ctx(self) -> int:
        return self._settings.model.ctx

    @property
    def tokenizer(self) -> ScriptTokenizer:
        return self._tokenizer

    def describe(self) -> dict[str, object]:
        return {"slots": self._slots}

    def admit(self, slot: int, prompt: Prompt, params: SamplingParams) -> bool:
        if self.script.admit_raises_for and prompt.text.startswith(self.script.admit_raises_for):
            raise TypeError("scripted admit bug")
        need = len(prompt.tokens) + params.max_tokens
        if sum(s.reserved for s in self._seqs.values()) + need > self.script.kv_cells:
            self.script.refused += 1
            return False
        # The prompt's first character picks where in the alphabet the output starts.
        start = ALPHABET.index(prompt.text[0]) if prompt.text[:1] in ALPHABET else 0
        self._seqs[slot] = _Seq(prompt=prompt, params=params, start=start, reserved=need)
        self.script.admitted.append(prompt.text)
        return True

    def step(self) -> list[SeqOutput]:
        self.script.gate.wait(10)
        self._steps += 1
        if self.script.fail_on_step == self._steps:
            raise BackendError("scripted failure")
        time.sleep(self.script.step_s)  # stands for the forward pass
        self.script.batch_sizes.append(len(self._seqs))
        outputs = []
        for slot, seq in self._seqs.items():
            if self.script.end_after is not None and seq.produced >= self.script.end_after:
                outputs.append(SeqOutput(slot=slot, end=True, cache_n=0 if seq.produced == 0 else None))
                continue
            letter = ALPHABET[(seq.start + seq.produced) % len(ALPHABET)]
            outputs.append(
                SeqOutput(slot=slot, piece=letter.encode(), cache_n=0 if seq.produced == 0 else None)
            )
            seq.produced += 1
        return outputs

    def release(self, slot: int) -> None:
        if self._seqs.pop(slot, None) is not None:
            self.script.released.append(slot)
        return None

    def job_notes(self, params: SamplingParams) -> list[str]:
        return []

    def cache_stats(self) -> CacheStats | None:
        return None

    def interrupt(self) -> None:
        self.script.gate.set()

    def close(self) -> None:
        self._seqs.clear()


def scripted_choice() -> BackendChoice:
    return BackendChoice(name="scripted", cls=ScriptedBackend, considered=[], forced=True)
