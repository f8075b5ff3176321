"""How `LlamaCppBackend` picks each sequence's next token: its sampler chain, its grammar, and the
reasoning budget that closes a ``<think>`` block.

Every sequence has its own ``llama_sampler`` chain, drawn straight from the context's logits at the
sequence's batch position. A job's grammar is kept beside the chain, as llama.cpp's common sampler
does: the chain picks, the grammar checks only that token, and only a refused token makes the
grammar filter the whole vocabulary. A grammar that comes after the reasoning is built when
``</think>`` comes out; at the reasoning budget the block is closed by forced tokens. A lazy grammar
(`Grammar.trigger`, llama.cpp's ``grammar_lazy``) lets every token through until the model writes its
trigger word; built after ``</think>`` as any other, a trigger inside the reasoning never engages it.
"""

from __future__ import annotations

import ctypes
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edged.backends.base import THINK_CLOSE, THINK_END, SamplingParams
from edged.backends.gguf_prompt import GgufTokenizer

PENALTY_LAST_N = 64
THINK_CLOSE_BYTES = THINK_CLOSE.encode()
_REGEX_SPECIAL = re.compile(r"[.^$|()*+?\[\]{}\\]")


def trigger_pattern(word: str) -> str:
    """The lazy grammar's trigger pattern for ``word``: the word itself, escaped as llama.cpp's
    ``regex_escape`` does (ECMAScript), in one group. Unanchored, so llama.cpp searches the text for
    it (``std::regex_search``; no ``[\\s\\S]*`` around it, which recurses once per character in
    libstdc++'s regex) and the grammar takes the text from the group's start."""
    return "(" + _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), word) + ")"


@dataclass
class SeqSampler:
    """One sequence's samplers and where it stands in its reasoning."""

    params: SamplingParams
    chain: Any
    grammar: Any = None
    """The job's grammar sampler, checked against the chain's choice (see `Sampling.sample`)."""
    grammar_pending: bool = False
    """The job's grammar waits for ``</think>`` (then it is built)."""
    thinking: bool = False
    """Inside the ``<think>`` block (the output so far has not closed it)."""
    think_tokens: int = 0
    forced: list[int] = field(default_factory=list)
    """Tokens the backend emits instead of sampling (closing the think block at the budget)."""
    tail: bytes = b""
    error: str | None = None
    """Why the sequence cannot run (its grammar could not be built): it fails without decoding."""


class Sampling:
    """The loaded model's samplers: builds each sequence's, and draws its tokens from the logits."""

    def __init__(self, llama_cpp: Any, ctx: Any, tokenizer: GgufTokenizer) -> None:
        self._llama_cpp = llama_cpp
        self._ctx = ctx
        self._tokenizer = tokenizer
        n_vocab = tokenizer.n_vocab
        self._n_vocab = n_vocab
        self._cand = np.empty(n_vocab, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
        self._ids = np.arange(n_vocab, dtype=np.int32)
        close = tokenizer.tokenize(THINK_CLOSE, chat=True)
        self._think_close_token = close[0] if len(close) == 1 else -1

    def start(self, params: SamplingParams, history: list[int]) -> SeqSampler:
        """A new sequence's samplers; a grammar that applies after the reasoning waits for it."""
        pending = params.grammar is not None and params.grammar.after_think and params.in_think
        chain = self._chain(params, history)
        grammar, problem = (None, None) if pending else self._grammar(params)
        return SeqSampler(
            params=params,
            chain=chain,
            grammar=grammar,
            thinking=params.in_think,
            grammar_pending=pending,
            error=problem,
        )

    def free(self, s: SeqSampler) -> None:
        self._llama_cpp.llama_sampler_free(s.chain)
        if s.grammar is not None:
            self._llama_cpp.llama_sampler_free(s.grammar)
            s.grammar = None

    def sample(self, s: SeqSampler, index: int) -> int | None:
        """The next token from the logits of batch position ``index`` (or the next forced one);
        None: the job's grammar allows no token here."""
        if s.forced:
            return s.forced.pop(0)
        if s.grammar is None:
            return int(self._llama_cpp.llama_sampler_sample(s.chain, self._ctx, index))
        return self._sample_with_grammar(s, index)

    def follow_thinking(self, s: SeqSampler, token: int, piece: bytes, forced: bool) -> None:
        """Watch a sequence's reasoning: when ``</think>`` comes out (sampled or forced), the job's
        grammar takes over; at the reasoning budget the block is closed by forced tokens."""
        s.tail = (s.tail + piece)[-16:]
        if token == self._think_close_token or THINK_CLOSE_BYTES in s.tail:
            s.thinking = False
            s.forced.clear()
            if s.grammar_pending:
                s.grammar_pending = False
                s.grammar, s.error = self._grammar(s.params)
            return
        if not forced:
            s.think_tokens += 1
        budget = s.params.reasoning_budget
        if budget is not None and s.think_tokens >= budget and not s.forced:
            s.forced = self._tokenizer.tokenize(THINK_END, chat=True)

    def _grammar(self, params: SamplingParams) -> tuple[Any, str | None]:
        """The job's grammar sampler (kept beside its chain, as llama.cpp's common sampler does), or
        None and why it could not be built."""
        grammar = params.grammar
        if grammar is None:
            return None, None
        lc = self._llama_cpp
        if grammar.trigger is None:
            sampler = lc.llama_sampler_init_grammar(
                self._tokenizer.vocab, grammar.text.encode(), grammar.root.encode()
            )
        else:
            patterns = (ctypes.c_char_p * 1)(trigger_pattern(grammar.trigger).encode())
            sampler = lc.llama_sampler_init_grammar_lazy_patterns(
                self._tokenizer.vocab, grammar.text.encode(), grammar.root.encode(), patterns, 1, None, 0
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
            lc.llama_sampler_chain_add(
                chain,
                lc.llama_sampler_init_penalties(  # this llama.cpp's signature leads with n_vocab
                    self._n_vocab,
                    PENALTY_LAST_N,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
            for token in history[-PENALTY_LAST_N:]:  # the penalty looks back over the prompt too
                lc.llama_sampler_accept(chain, token)
        if params.logit_bias:
            biases = (lc.llama_logit_bias * len(params.logit_bias))()
            for i, (token, bias) in enumerate(params.logit_bias):
                biases[i].token, biases[i].bias = token, bias
            lc.llama_sampler_chain_add(
                chain,
                lc.llama_sampler_init_logit_bias(self._n_vocab, len(params.logit_bias), biases),
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

    def _sample_with_grammar(self, s: SeqSampler, index: int) -> int | None:
        """llama.cpp's common sampler: the chain picks a token over the whole vocabulary, the grammar
        checks only that one; only if it is refused does the grammar filter the whole vocabulary and
        the chain pick again. Both accept the token. None: the grammar allows nothing here."""
        lc = self._llama_cpp
        cur = self._candidates(index)
        lc.llama_sampler_apply(s.chain, ctypes.byref(cur))
        token = int(cur.data[cur.selected].id)
        single = lc.llama_token_data(id=token, logit=1.0, p=0.0)
        check = lc.llama_token_data_array(data=ctypes.pointer(single), size=1, selected=-1, sorted=False)
        lc.llama_sampler_apply(s.grammar, ctypes.byref(check))
        if math.isinf(single.logit) and single.logit < 0:  # refused: filter everything, pick again
            cur = self._candidates(index)
            lc.llama_sampler_apply(s.grammar, ctypes.byref(cur))
            lc.llama_sampler_apply(s.chain, ctypes.byref(cur))
            chosen = cur.data[cur.selected]
            if cur.selected < 0 or (math.isinf(chosen.logit) and chosen.logit < 0):
                return None
            token = int(chosen.id)
        lc.llama_sampler_accept(s.grammar, token)
        lc.llama_sampler_accept(s.chain, token)
        return token
