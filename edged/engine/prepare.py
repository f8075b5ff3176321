"""From a job request to what a backend runs: chat template, tokens, the context cap, sampling.

Runs on a worker thread (tokenizing a long prompt takes milliseconds) through the backend's
thread-safe tokenizer, never on the backend's own thread.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edged.backends import Grammar, Prompt, SamplingParams, Tokenizer
from edged.backends.base import THINK_END, THINK_OPEN
from edged.config import FALLBACK_SAMPLING, sampling_defaults
from edged.engine.constraints import Constraint, constraint_of
from edged.engine.job import JobRequest, Prepared, ToolPlan
from edged.errors import ContextLengthExceeded, InvalidRequest

# ruff: noqa: RUF002 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.
from edged.tools.family import Family, detect_family, template_renders_tools
from edged.tools.grammar import build_grammar
from edged.tools.history import trim_history, turn_starts
from edged.tools.render import finish_prompt, render_chat

SKIP_THINKING = THINK_END
"""Appended after the template's ``<think>\n`` for ``think: false`` (DeepSeek-R1's empty reasoning)."""

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import ContextOverflow, Settings


@dataclass(frozen=True)
class Fitted:
    """A job's prompt as the model reads it, fitted into the context (`Preparer.fit`)."""

    text: str
    tokens: list[int]
    in_think: bool
    """The template opened a ``<think>`` block the answer starts in."""
    trimmed_messages: int
    """The oldest messages dropped to fit (``context_overflow: trim_history``)."""


class Preparer:
    def __init__(self, settings: Settings, board: BoardInfo) -> None:
        self.settings = settings
        self.board = board
        self.base_sampling = sampling_defaults(board.profile.sampling, settings.model.sampling)
        """Profile < config layering, computed once; a job's own values go on top."""
        self._families: weakref.WeakKeyDictionary[Any, Family] = weakref.WeakKeyDictionary()
        """The tool-call format of each tokenizer's model, recognised once (`family`)."""

    def family(self, tokenizer: Tokenizer) -> Family:
        """The tool-call format the tokenizer's model writes (`edged.tools.family`), from its chat
        template and vocabulary; remembered per tokenizer (a backend replaced by another has its own)."""
        family = self._families.get(tokenizer)
        if family is None:

            def has_token(text: str) -> bool:
                tokens = tokenizer.tokenize(text, chat=True)  # special tokens parsed, no BOS
                token_text = getattr(tokenizer, "token_text", None)
                return len(tokens) == 1 and (token_text is None or token_text(tokens[0]) == text)

            family = detect_family(tokenizer.template, has_token)
            self._families[tokenizer] = family
        return family

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

    def chat_messages(self, request: JobRequest) -> list[dict[str, Any]]:
        """The conversation the chat template renders: the job's messages (or its prompt as one user
        message) after the configured system prompt, unless the job has its own."""
        tool_history = request.messages is not None and any(m.has_tools for m in request.messages)
        if request.messages is not None and (tool_history or request.uses_tools):
            messages: list[dict[str, Any]] = [m.model_dump(exclude_none=True) for m in request.messages]
        elif request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            messages = [{"role": "user", "content": request.prompt or ""}]
        system = self.settings.model.system_prompt
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def prompt_text(
        self, request: JobRequest, tokenizer: Tokenizer, messages: list[dict[str, Any]] | None = None
    ) -> str:
        """The prompt the model reads: the job's messages (or ``messages``, some of them: see `fit`)
        through the model's own chat template (with the tools and earlier calls in the model's tool
        format, `edged.tools.render`)."""
        if request.raw:
            return request.prompt or ""
        if messages is None:
            messages = self.chat_messages(request)
        tool_history = request.messages is not None and any(m.has_tools for m in request.messages)
        if not (tool_history or request.uses_tools):
            return tokenizer.render_chat(messages)
        family = self.family(tokenizer)
        native = template_renders_tools(tokenizer.template)
        rendered = render_chat(
            family,
            messages,
            request.tool_specs,
            request.choice,
            parallel=request.parallel,
            template_renders_tools=native,
        )
        return finish_prompt(family, tokenizer.render_chat(rendered.messages, tools=rendered.tools))

    def answer_reserve(self, request: JobRequest, n_ctx: int) -> int:
        """The room ``context_overflow: trim_history`` keeps for the answer: the job's max_tokens (at
        most half the context), else ``jobs.default_max_tokens`` (at most a quarter of it)."""
        if request.max_tokens:
            return max(1, min(request.max_tokens, n_ctx // 2))
        return max(1, min(self.settings.jobs.default_max_tokens, n_ctx // 4))

    def fit(
        self, request: JobRequest, tokenizer: Tokenizer, n_ctx: int, overflow: ContextOverflow = "error"
    ) -> Fitted:
        """The prompt's text and tokens, with its oldest turns dropped (`edged.tools.history`) when
        ``overflow`` is ``trim_history`` and a chat's prompt leaves less than `answer_reserve` for
        the answer: as few as make that room; if no number does, every turn but the last, and the
        answer gets what room is left. Raises `ContextLengthExceeded` when no room is left at all
        (with ``error``: when the whole prompt leaves none).

        Each candidate is rendered and tokenized once (O(log turns) of them, by binary search)."""
        messages = self.chat_messages(request)
        counted: dict[int, Fitted] = {}

        def render(kept: list[dict[str, Any]]) -> Fitted:
            known = counted.get(len(kept))  # a kept list is told apart by its length (turns dropped)
            if known is None:
                text = self.prompt_text(request, tokenizer, kept)
                in_think = text.rstrip().endswith(THINK_OPEN) and not request.raw
                if in_think and (request.think is False or request.reasoning_budget == 0):
                    text += SKIP_THINKING
                    in_think = False
                tokens = tokenizer.tokenize(text, chat=not request.raw)
                known = counted[len(kept)] = Fitted(text, tokens, in_think, len(messages) - len(kept))
            return known

        whole = render(messages)
        reserve = self.answer_reserve(request, n_ctx)
        trim = overflow == "trim_history" and request.messages is not None and not request.raw
        if trim and len(whole.tokens) + reserve > n_ctx:
            try:
                kept, _ = trim_history(messages, lambda kept: len(render(kept).tokens), n_ctx, reserve)
            except ContextLengthExceeded:  # not with the whole reserve: every older turn goes
                head, starts = turn_starts(messages)
                kept = messages[:head] + messages[starts[-1] :] if starts else messages
            fitted = render(kept)
            if len(fitted.tokens) >= n_ctx:
                raise ContextLengthExceeded(
                    f"the prompt has {len(fitted.tokens)} tokens with only the system messages and the "
                    f"last user turn kept ({fitted.trimmed_messages} older messages dropped), which "
                    f"leaves no room to generate in the {n_ctx}-token context window",
                    param="messages",
                    n_prompt_tokens=len(fitted.tokens),
                    n_ctx=n_ctx,
                )
            return fitted
        if len(whole.tokens) >= n_ctx:
            raise ContextLengthExceeded(
                f"the prompt has {len(whole.tokens)} tokens, which leaves no room to generate in the "
                f"{n_ctx}-token context window",
                param="messages" if request.messages is not None else "prompt",
                n_prompt_tokens=len(whole.tokens),
                n_ctx=n_ctx,
            )
        return whole

    def tool_constraint(self, request: JobRequest, family: Family, in_think: bool) -> Constraint | None:
        """The grammar that makes a tool job's calls well formed, or None where nothing constrains
        the answer (``tool_choice: none``): the generic form always (the whole answer is the
        calls-or-response JSON object); hermes and R1 from the answer's first token after
        ``</think>`` when a call is forced (``required`` or a named tool), and with ``auto`` as a lazy
        grammar (llama.cpp's ``grammar_lazy``): the answer is free text until the model writes the
        format's trigger (``<tool_call>``, ``<｜tool▁calls▁begin｜>``), then the call obeys. A trigger
        inside the reasoning does not count (``after_think``). Every call is still parsed and
        validated when the job ends (`edged.tools.grammar.check_call`)."""
        built = build_grammar(family, request.tool_specs, request.choice, parallel=request.parallel)
        if built is None:
            return None
        grammar = Grammar(built.text, root=built.root, after_think=in_think, trigger=built.trigger)
        return Constraint("tools", grammar, None)

    def prepare(
        self, request: JobRequest, tokenizer: Tokenizer, n_ctx: int, overflow: ContextOverflow = "error"
    ) -> Prepared:
        """Raises `ContextLengthExceeded` when the prompt leaves no room to generate (after dropping
        its oldest turns, with ``overflow`` ``trim_history``: `fit`), and `InvalidRequest` for a
        schema or grammar the model's sampler cannot take."""
        fitted = self.fit(request, tokenizer, n_ctx, overflow)
        text, tokens, in_think = fitted.text, fitted.tokens, fitted.in_think
        plan: ToolPlan | None = None
        if request.uses_tools:
            family = self.family(tokenizer)
            plan = ToolPlan(family, request.tool_specs, request.choice, request.parallel)
            constraint = self.tool_constraint(request, family, in_think)
        else:
            constraint = constraint_of(request.response_format, request.grammar, after_think=in_think)
        if constraint is not None:
            problem = tokenizer.grammar_problem(constraint.grammar)
            if problem is not None:
                param = constraint.param
                raise InvalidRequest(f"{param}: {problem}", param=param)
        if request.logit_bias:
            n_vocab = tokenizer.n_vocab
            wrong = [t for t in request.logit_bias if not 0 <= t < n_vocab]
            if wrong:
                raise InvalidRequest(
                    f"logit_bias: token ids {wrong[:5]} are not in the model's vocabulary (0..{n_vocab - 1})",
                    param="logit_bias",
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
            tools=plan,
            trimmed_messages=fitted.trimmed_messages,
        )
