"""From a job request to what a backend runs: chat template, tokens, the context cap, sampling.

Runs on a worker thread (tokenizing a long prompt takes milliseconds) through the backend's
thread-safe tokenizer, never on the backend's own thread.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from edged.backends import Prompt, SamplingParams, Tokenizer
from edged.backends.base import THINK_END, THINK_OPEN
from edged.config import FALLBACK_SAMPLING, sampling_defaults
from edged.engine.constraints import constraint_of
from edged.engine.job import JobRequest, Prepared
from edged.errors import ContextLengthExceeded, InvalidRequest

SKIP_THINKING = THINK_END
"""Appended after the template's ``<think>\n`` for ``think: false`` (DeepSeek-R1's empty reasoning)."""

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings


class Preparer:
    def __init__(self, settings: Settings, board: BoardInfo) -> None:
        self.settings = settings
        self.board = board
        self.base_sampling = sampling_defaults(board.profile.sampling, settings.model.sampling)
        """Profile < config layering, computed once; a job's own values go on top."""

    def sampling(self, request: JobRequest, max_tokens: int) -> SamplingParams:
        values = dict(self.base_sampling)
        for key in FALLBACK_SAMPLING:
            given = getattr(request, key)
            if given is not None:
                values[key] = given
        return SamplingParams(
            max_tokens=max_tokens,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            frequency_penalty=request.frequency_penalty or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            logit_bias=tuple(sorted((request.logit_bias or {}).items())),
            **values,
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
        """Raises `ContextLengthExceeded` when the prompt leaves no room to generate, and
        `InvalidRequest` for a schema or grammar the model's sampler cannot take."""
        text = self.prompt_text(request, tokenizer)
        in_think = text.rstrip().endswith(THINK_OPEN) and not request.raw
        if in_think and (request.think is False or request.reasoning_budget == 0):
            text += SKIP_THINKING
            in_think = False
        constraint = constraint_of(request.response_format, request.grammar, after_think=in_think)
        if constraint is not None:
            problem = tokenizer.grammar_problem(constraint.grammar)
            if problem is not None:
                param = "grammar" if constraint.kind == "grammar" else "response_format"
                raise InvalidRequest(f"{param}: {problem}", param=param)
        if request.logit_bias:
            n_vocab = tokenizer.n_vocab
            wrong = [t for t in request.logit_bias if not 0 <= t < n_vocab]
            if wrong:
                raise InvalidRequest(
                    f"logit_bias: token ids {wrong[:5]} are not in the model's vocabulary (0..{n_vocab - 1})",
                    param="logit_bias",
                )
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
        params = dataclasses.replace(
            self.sampling(request, max_tokens),
            grammar=constraint.grammar if constraint is not None else None,
            in_think=in_think,
            reasoning_budget=request.reasoning_budget if in_think else None,
        )
        return Prepared(
            prompt=Prompt(text=text, tokens=tokens, reuse=request.cache_prompt),
            params=params,
            clamped=wanted > room,
            in_think=in_think,
            constraint=constraint,
        )
