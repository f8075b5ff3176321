"""From a job request to what a backend runs: chat template, tokens, the context cap, sampling.

Runs on a worker thread (tokenizing a long prompt takes milliseconds) through the backend's
thread-safe tokenizer, never on the backend's own thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edged.backends import Prompt, SamplingParams, Tokenizer
from edged.engine.job import JobRequest, Prepared
from edged.errors import ContextLengthExceeded
from edged.streamtext import THINK_OPEN

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

FALLBACK_SAMPLING = {"temperature": 0.6, "top_p": 0.9, "top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0}
"""Used only where neither the config nor the board profile sets a value (R1-distill advice)."""


class Preparer:
    def __init__(self, settings: Settings, board: BoardInfo) -> None:
        self.settings = settings
        self.board = board
        base: dict[str, Any] = dict(FALLBACK_SAMPLING)
        for layer in (board.profile.sampling, settings.model.sampling):
            base.update({k: v for k, v in layer.model_dump().items() if v is not None})
        self.base_sampling = base
        """Profile < config layering, computed once; a job's own values go on top."""

    def sampling(self, request: JobRequest, max_tokens: int) -> SamplingParams:
        values = dict(self.base_sampling)
        for key in FALLBACK_SAMPLING:
            given = getattr(request, key)
            if given is not None:
                values[key] = given
        return SamplingParams(
            max_tokens=max_tokens, seed=request.seed, ignore_eos=request.ignore_eos, **values
        )

    def prompt_text(self, request: JobRequest, tokenizer: Tokenizer) -> str:
        if request.raw:
            return request.prompt or ""
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            messages = [{"role": "user", "content": request.prompt or ""}]
        system = self.settings.model.system_prompt
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.render_chat(messages)

    def prepare(self, request: JobRequest, tokenizer: Tokenizer, n_ctx: int) -> Prepared:
        """Raises `ContextLengthExceeded` when the prompt leaves no room to generate."""
        text = self.prompt_text(request, tokenizer)
        tokens = tokenizer.tokenize(text, chat=not request.raw)
        if len(tokens) >= n_ctx:
            raise ContextLengthExceeded(
                f"the prompt has {len(tokens)} tokens, which leaves no room to generate in the "
                f"{n_ctx}-token context window",
                param="messages" if request.messages is not None else "prompt",
                n_prompt_tokens=len(tokens),
                n_ctx=n_ctx,
            )
        wanted = request.max_tokens or self.settings.jobs.default_max_tokens
        room = n_ctx - len(tokens)
        max_tokens = min(wanted, room)
        return Prepared(
            prompt=Prompt(text=text, tokens=tokens, reuse=request.cache_prompt),
            params=self.sampling(request, max_tokens),
            clamped=wanted > room,
            in_think=text.rstrip().endswith(THINK_OPEN) and not request.raw,
        )
