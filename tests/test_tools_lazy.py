"""The lazy tool grammar (llama.cpp's ``grammar_lazy``) of hermes and R1 models with ``tool_choice:
auto``: the answer is free text until the model writes its format's trigger, then the grammar makes
the call well formed. The sampler itself on the real llama.cpp (SmolLM2's vocabulary, the hermes
trigger): free until the trigger, held from it on. The R1-shaped model (random weights, R1's
vocabulary) on the real daemon: ``auto`` answers in free text under its lazy grammar, and a forced
call streams in pieces."""

# ruff: noqa: RUF002 - R1's markers are spelled with fullwidth bars and a lower block.

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import BOARDS, chat
from test_npu import build_stub, npu_env

from edged.backends.base import Grammar, SamplingParams
from edged.backends.gguf_prompt import GgufTokenizer, load_model
from edged.backends.llamacpp_sampling import Sampling, SeqSampler
from edged.tools.grammar import build_grammar
from edged.tools.markup import HERMES_OPEN, R1_CALLS_BEGIN
from edged.tools.spec import ToolChoice, call_ids_for, parse_tools

pytestmark = pytest.mark.system

CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")
TOOL: dict[str, Any] = {  # printable ASCII: random weights write raw bytes otherwise (test_structured.py)
    "type": "function",
    "function": {
        "name": "set_level",
        "parameters": {
            "type": "object",
            "properties": {
                "room": {"type": "string", "pattern": "^[A-Za-z0-9 ]{0,8}$"},
                "level": {"enum": ["low", "high"]},
            },
            "required": ["room", "level"],
            "additionalProperties": False,
        },
    },
}
SCHEMA = TOOL["function"]["parameters"]


def _params(grammar: Grammar) -> SamplingParams:
    return SamplingParams(
        max_tokens=64, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, grammar=grammar
    )


def _allows(s: SeqSampler, token: int) -> bool:
    import llama_cpp

    single = llama_cpp.llama_token_data(id=token, logit=1.0, p=0.0)
    array = llama_cpp.llama_token_data_array(data=ctypes.pointer(single), size=1, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(s.grammar, ctypes.byref(array))
    return not (math.isinf(single.logit) and single.logit < 0)


def test_the_lazy_sampler_lets_text_through_until_the_trigger_then_holds(model_path: Path) -> None:
    """`Sampling` builds llama.cpp's lazy sampler: before ``<tool_call>`` every token passes (a long
    text too: the trigger is searched for, not matched by a pattern that recurses per character);
    from the trigger on, only what the grammar allows."""
    import llama_cpp

    tokenizer = GgufTokenizer(load_model(model_path, vocab_only=True))
    built = build_grammar("hermes", parse_tools([TOOL]), ToolChoice("auto"))
    assert built is not None and built.trigger == HERMES_OPEN
    sampling = Sampling(llama_cpp, None, tokenizer)
    s = sampling.start(_params(Grammar(built.text, built.root, trigger=built.trigger)), [])
    assert s.grammar is not None and s.error is None
    word = tokenizer.tokenize(" level", chat=False)[-1]
    brace = tokenizer.tokenize("{", chat=False)[-1]
    newline = tokenizer.tokenize("\n", chat=False)[-1]
    assert _allows(s, word) and _allows(s, brace)
    for token in tokenizer.tokenize("Sure, I will set it. " * 400, chat=False):  # ~8 KB of free text
        assert _allows(s, token)
        llama_cpp.llama_sampler_accept(s.grammar, token)
    for token in tokenizer.tokenize(" Now <tool_call>", chat=False):  # the trigger, in several tokens
        llama_cpp.llama_sampler_accept(s.grammar, token)
    assert _allows(s, newline) and not _allows(s, word) and not _allows(s, brace), "the grammar holds"
    llama_cpp.llama_sampler_accept(s.grammar, newline)
    assert _allows(s, brace) and not _allows(s, word)
    sampling.free(s)
    plain = sampling.start(_params(Grammar(built.text, built.root)), [])  # not lazy: held from the start
    assert not _allows(plain, word) and _allows(plain, tokenizer.tokenize("<", chat=False)[-1])
    sampling.free(plain)


def test_r1_auto_answers_in_free_text_and_streams_a_forced_call_in_pieces(
    start_daemon: Any, r1_tiny: Path
) -> None:
    """``auto`` on the R1-shaped model carries the lazy grammar: random weights at temperature 1.0
    never write R1's 17-token trigger (``<｜tool▁calls▁begin｜>`` is not one token in this vocabulary),
    so the answer is free text, which a grammar held from the first token would refuse; such a job
    decodes in one batch with a plain one. A forced call
    streamed: R1's markup parsed into pieces as it is written (the first with the id that the job's
    id gives, then arguments), joined equal to the same answer without ``stream``."""
    d = start_daemon(EDGED_MODEL__PATH=str(r1_tiny), EDGED_ENGINE__PARALLEL="2")
    with d.client() as c:
        for seed in (1, 2):
            body = chat(
                "Set the hall to high.",
                tools=[TOOL],
                reasoning_budget=6,
                temperature=1.0,
                seed=seed,
                max_tokens=40,
            )
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] in ("stop", "length") and "tool_calls" not in choice["message"]
            assert choice["message"]["content"] and R1_CALLS_BEGIN not in choice["message"]["content"]
        lazy = chat("Set the hall to high.", tools=[TOOL], reasoning_budget=6, seed=5, max_tokens=60)
        plain = chat("Say hello.", seed=6, max_tokens=60)
        with ThreadPoolExecutor(2) as pool:  # a job under its lazy grammar batches with a plain one
            answers = list(pool.map(lambda b: c.post("/v1/chat/completions", json=b), (lazy, plain)))
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        batched = [a.json()["timings"]["batch_size_avg"] or 0 for a in answers]
        assert max(batched) > 1, "decoded together"
        forced = chat(
            "Set the hall to high.",
            tools=[TOOL],
            tool_choice="required",
            parallel_tool_calls=False,
            reasoning_budget=6,
            temperature=1.0,
            seed=4,
            max_tokens=200,
            cache_prompt=False,  # both prefill the whole prompt: the same batch shapes, the same logits
        )
        whole = c.post("/v1/chat/completions", json={**forced, "id": "r1-whole"})
        assert whole.status_code == 200, whole.text
        [expected] = whole.json()["choices"][0]["message"]["tool_calls"]
        jsonschema.validate(json.loads(expected["function"]["arguments"]), SCHEMA)
        streamed = {**forced, "id": "r1-pieces", "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=streamed) as r:
            lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    deltas = [json.loads(line)["choices"][0]["delta"] for line in lines[:-1]]
    assert not "".join(d.get("content") or "" for d in deltas), "no markup streamed as content"
    pieces = [t for d in deltas for t in d.get("tool_calls", [])]
    first, *rest = pieces
    assert expected["id"] == call_ids_for("r1-whole")(0)
    assert first["id"] == call_ids_for("r1-pieces")(0) and first["type"] == "function"
    assert first["function"]["name"] == "set_level" and rest, "arguments in pieces"
    assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest)
    joined = "".join(p["function"]["arguments"] for p in pieces)
    assert joined == expected["function"]["arguments"]


def test_on_the_npu_r1_auto_runs_free_and_a_forced_call_is_not_supported(
    start_daemon: Any, r1_tiny: Path, tmp_path: Path
) -> None:
    """The RKLLM runtime (the stand-in library) cannot constrain sampling: an R1 model's ``auto`` job
    runs there without its lazy grammar (the answer parsed and checked as it ends: plain text
    here), while a forced call, which needs its grammar from the first token, is ``not_supported``."""
    root = tmp_path / "opi5"
    shutil.copytree(BOARDS / "orangepi5", root, symlinks=True)
    (root / "dev").mkdir()
    (root / "dev" / "rknpu").write_text("")
    model = tmp_path / "DeepSeek-R1-Distill-Qwen-1.5B_W8A8_RK3588.rkllm"
    model.write_bytes(b"RKLLM stand-in model")
    (tmp_path / "stub").mkdir()
    lib = build_stub(tmp_path / "stub", "121", "1.2.1")
    d = start_daemon(**npu_env(root, lib, model), EDGED_MODEL__PATH=str(r1_tiny))
    with d.client() as c:
        assert c.get("/status").json()["backend"]["name"] == "rkllm"
        auto = chat("Set the hall to high.", tools=[TOOL], think=False, max_tokens=6)  # the answer: content
        r = c.post("/v1/chat/completions", json=auto)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "length"
        assert choice["message"]["content"].startswith("tok0 tok1"), choice
        forced = chat("Set the hall to high.", tools=[TOOL], tool_choice="required", max_tokens=6)
        r = c.post("/v1/chat/completions", json=forced)
        assert r.status_code == 501, r.text
        assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("not_supported", "tool_choice")


def test_after_the_trigger_smollm2_at_temperature_one_writes_a_valid_hermes_call(model_path: Path) -> None:
    """The lazy sampler on the embedded SmolLM2's real logits: free text, then the trigger (accepted
    as sampled tokens are: by the sampler and the model's context; SmolLM2 does not write hermes
    markup by itself), then every token drawn by `Sampling.sample` at temperature 1.0. Whatever the
    seed, the rest is a call that parses and validates against its schema: the grammar engaged."""
    import llama_cpp

    from edged.tools.parse import parse_output

    llm = llama_cpp.Llama(str(model_path), n_ctx=1024, n_threads=2, verbose=False)
    try:
        tokenizer = GgufTokenizer(load_model(model_path, vocab_only=True))
        built = build_grammar("hermes", parse_tools([TOOL]), ToolChoice("auto"), parallel=False)
        assert built is not None and built.trigger is not None
        grammar = Grammar(built.text, built.root, trigger=built.trigger)
        sampling = Sampling(llama_cpp, llm._ctx.ctx, tokenizer)
        turn = "<|im_start|>user\nSet the hall to high.<|im_end|>\n<|im_start|>assistant\n"
        prompt = tokenizer.tokenize(turn, chat=True)
        free = tokenizer.tokenize("I will set it. <tool_call>", chat=False)
        for seed in range(3):
            llm.reset()
            llm.eval(prompt + free)
            params = dataclasses.replace(_params(grammar), seed=seed, max_tokens=120)
            s = sampling.start(params, prompt)
            for token in free:
                llama_cpp.llama_sampler_accept(s.grammar, token)
                llama_cpp.llama_sampler_accept(s.chain, token)
            out = b""
            for _ in range(params.max_tokens):
                token = sampling.sample(s, -1)
                assert token is not None
                if tokenizer.is_eog(token):
                    break
                out += tokenizer.piece(token)
                llm.eval([token])
            else:
                pytest.fail(f"no end within max_tokens: {out!r}")
            sampling.free(s)
            text = "I will set it. <tool_call>" + out.decode()
            parsed = parse_output("hermes", text)
            assert not parsed.malformed and len(parsed.tool_calls) == 1, text
            [call] = parsed.tool_calls
            assert call.name == "set_level" and parsed.content == "I will set it.", text
            jsonschema.validate(call.arguments, SCHEMA)
    finally:
        llm.close()
