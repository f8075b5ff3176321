"""`edged.tools` against the real llama.cpp: family detection from real GGUFs, every grammar compiled
by llama.cpp's own parser, and calls sampled from the embedded SmolLM2 at temperature 1.0 under each
grammar, parsed back and validated against their schemas. Loads models: the system tier."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from edged.backends.gguf_prompt import GgufTokenizer, load_model
from edged.backends.llamacpp_sampling import trigger_pattern
from edged.tools.family import FAMILIES, Family, family_of
from edged.tools.grammar import ToolGrammar, build_grammar
from edged.tools.history import trim_history
from edged.tools.parse import StreamParser, parse_output
from edged.tools.render import finish_prompt, render_chat
from edged.tools.spec import ToolChoice, ToolSpec, parse_tools

from .conftest import SMOLLM2_TEMPLATE

pytestmark = pytest.mark.system

BOUNDED_TOOLS: list[dict[str, Any]] = [  # every string and array bounded: a call ends within max_tokens
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather now at a place.",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "maxLength": 24},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "HassTurnOn",
            "description": "Turns on/opens/presses a device or entity",
            "parameters": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "area": {"type": "string", "maxLength": 16},
                    "brightness": {"type": "integer"},
                },
                "required": ["name"],
            },
        },
    },
]
MESSAGES = [{"role": "user", "content": "Turn on the kitchen light, and what is the weather in Paris?"}]


@pytest.fixture(scope="module")
def smollm2(model_path: Path) -> Iterator[Any]:
    import llama_cpp

    llm = llama_cpp.Llama(str(model_path), n_ctx=2048, n_threads=2, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def smollm2_tokenizer(model_path: Path) -> GgufTokenizer:
    return GgufTokenizer(load_model(model_path, vocab_only=True))


def test_the_embedded_smollm2_is_generic(smollm2_tokenizer: GgufTokenizer) -> None:
    assert smollm2_tokenizer.template == SMOLLM2_TEMPLATE
    assert family_of(smollm2_tokenizer) == "generic"


def test_the_r1_shaped_model_is_deepseek_r1(r1_tiny: Path) -> None:
    tokenizer = GgufTokenizer(load_model(r1_tiny, vocab_only=True))
    assert "tool▁calls▁begin" not in (tokenizer.template or "")  # its vocabulary tells
    assert family_of(tokenizer) == "deepseek_r1"


def compiles(tokenizer: GgufTokenizer, grammar: ToolGrammar) -> bool:
    import llama_cpp

    if grammar.trigger is None:
        sampler = llama_cpp.llama_sampler_init_grammar(tokenizer.vocab, grammar.text.encode(), b"root")
    else:  # lazy: llama.cpp's trigger patterns (a word, escaped), as the engine hands them
        patterns = (ctypes.c_char_p * 1)(trigger_pattern(grammar.trigger).encode())
        tokens = (llama_cpp.llama_token * 1)()
        sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            tokenizer.vocab, grammar.text.encode(), b"root", patterns, 1, tokens, 0
        )
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["auto", "required", "named"])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "single"])
def test_llama_cpp_compiles_every_grammar(
    smollm2_tokenizer: GgufTokenizer, family: Family, mode: str, parallel: bool
) -> None:
    tools = parse_tools(BOUNDED_TOOLS)
    choice = ToolChoice("named", "HassTurnOn") if mode == "named" else ToolChoice(mode)  # type: ignore[arg-type]
    grammar = build_grammar(family, tools, choice, parallel=parallel)
    assert grammar is not None
    assert compiles(smollm2_tokenizer, grammar)


def prompt_for(tokenizer: GgufTokenizer, family: Family, tools: list[ToolSpec], choice: ToolChoice) -> str:
    rendered = render_chat(family, MESSAGES, tools, choice)
    assert tokenizer.formatter is not None
    prompt = str(tokenizer.formatter(messages=rendered.messages, tools=rendered.tools).prompt)
    return finish_prompt(family, prompt)


def generate(
    llm: Any, prompt: str, grammar: ToolGrammar, seed: int, max_tokens: int = 400
) -> tuple[str, str]:
    from llama_cpp import LlamaGrammar

    out = llm.create_completion(
        prompt,
        grammar=LlamaGrammar.from_string(grammar.text, verbose=False),
        temperature=1.0,
        top_k=40,  # edged's default; the grammar alone at top_k 0 costs 0.7 s a token on 2 cores
        top_p=1.0,
        seed=seed,
        max_tokens=max_tokens,
    )
    choice = out["choices"][0]
    return choice["text"], choice["finish_reason"]


def check_calls(
    family: Family, text: str, tools: list[ToolSpec], allowed: set[str], cut: bool = False
) -> int:
    """Parse ``text`` whole and streamed in uneven pieces; both agree and every call validates. A
    text ``cut`` by max_tokens may end in one malformed (unfinished) call."""
    result = parse_output(family, text)
    assert len(result.malformed) <= (1 if cut else 0), text
    assert result.tool_calls, text
    schemas = {t.name: t.parameters for t in tools}
    for call in result.tool_calls:
        assert call.name in allowed
        jsonschema.validate(call.arguments, schemas[call.name])
        assert "<tool_call>" not in result.content and "tool▁call" not in result.content
    stream = StreamParser(family, lambda i: f"call_{i}")
    pieces: list[Any] = []
    for start in range(0, len(text), 3):
        pieces += stream.feed(text[start : start + 3])
    more, streamed = stream.finish()
    pieces += more
    assert [c.arguments for c in streamed.tool_calls] == [c.arguments for c in result.tool_calls]
    joined: dict[int, str] = {}
    for piece in pieces:
        if piece.call is not None:
            joined[piece.call.index] = joined.get(piece.call.index, "") + piece.call.arguments
    complete = {int(c.id.removeprefix("call_")) for c in streamed.tool_calls}
    assert [joined[i] for i in sorted(complete)] == [c.arguments_json for c in streamed.tool_calls]
    return len(result.tool_calls)


SEEDS: dict[Family, tuple[int, ...]] = {"generic": (1, 2), "hermes": (1, 2), "deepseek_r1": (1,)}
"""R1's markup is many bytes of SmolLM2's vocabulary (each fullwidth bar is several tokens): fewer runs."""


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["required", "named"])
def test_calls_sampled_at_temperature_one_under_the_grammar_parse_and_validate(
    smollm2: Any, smollm2_tokenizer: GgufTokenizer, family: Family, mode: str
) -> None:
    tools = parse_tools(BOUNDED_TOOLS)
    choice = ToolChoice("named", "HassTurnOn") if mode == "named" else ToolChoice("required")
    grammar = build_grammar(family, tools, choice, parallel=False)
    assert grammar is not None
    prompt = prompt_for(smollm2_tokenizer, "generic", tools, choice)  # SmolLM2 is told in its own form
    allowed = {t.name for t in choice.allowed(tools)}
    for seed in SEEDS[family]:
        text, finish = generate(smollm2, prompt, grammar, seed)
        assert finish == "stop", text
        assert check_calls(family, text, tools, allowed) == 1


@pytest.mark.parametrize("family", ["generic", "hermes"])
def test_parallel_calls_sampled_under_the_grammar_parse_and_validate(
    smollm2: Any, smollm2_tokenizer: GgufTokenizer, family: Family
) -> None:
    tools = parse_tools(BOUNDED_TOOLS)
    grammar = build_grammar(family, tools, ToolChoice("required"), parallel=True)
    assert grammar is not None
    prompt = prompt_for(smollm2_tokenizer, "generic", tools, ToolChoice("required"))
    text, finish = generate(smollm2, prompt, grammar, seed=4, max_tokens=160)
    # the grammar admits any number of calls: a run cut by max_tokens ends in one unfinished call
    assert check_calls(family, text, tools, {"get_weather", "HassTurnOn"}, cut=finish == "length") >= 1


def test_generic_auto_answers_in_text_or_calls_and_both_parse(
    smollm2: Any, smollm2_tokenizer: GgufTokenizer
) -> None:
    tools = parse_tools(BOUNDED_TOOLS)
    grammar = build_grammar("generic", tools, ToolChoice("auto"), parallel=False)
    assert grammar is not None
    prompt = prompt_for(smollm2_tokenizer, "generic", tools, ToolChoice("auto"))
    for seed in (7, 8):
        text, finish = generate(smollm2, prompt, grammar, seed, max_tokens=80)
        result = parse_output("generic", text)
        assert "tool_calls" not in result.content and '"response"' not in result.content
        if finish == "stop":
            assert result.malformed == []
            assert bool(result.tool_calls) != ("response" in json.loads(text)), text


def test_trim_history_with_the_embedded_models_token_count(smollm2_tokenizer: GgufTokenizer) -> None:
    tools = parse_tools(BOUNDED_TOOLS)
    system = {"role": "system", "content": "You control a house. " * 20}
    history: list[dict[str, Any]] = [system]
    for i in range(20):
        history.append(
            {"role": "user", "content": f"Turn on lamp {i}, please; it is rather dark in room {i}."}
        )
        history.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"c{i}",
                        "type": "function",
                        "function": {"name": "HassTurnOn", "arguments": f'{{"name":"lamp {i}"}}'},
                    }
                ],
            }
        )
        history.append({"role": "tool", "tool_call_id": f"c{i}", "content": '{"success":true}'})
        history.append({"role": "assistant", "content": f"Lamp {i} is on."})
    history.append({"role": "user", "content": "And the weather in Paris?"})

    def count(messages: list[dict[str, Any]]) -> int:
        rendered = render_chat("generic", messages, tools, ToolChoice("auto"))
        return len(smollm2_tokenizer.tokenize(smollm2_tokenizer.render_chat(rendered.messages), chat=True))

    full = count(history)
    kept, dropped = trim_history(history, count, budget=full - 1, reserve=200)
    assert dropped > 0 and dropped % 4 == 0  # whole turns: user, call, result, answer
    assert count(kept) + 200 <= full - 1
    assert count(history[:1] + history[1 + dropped - 4 :]) + 200 > full - 1  # one turn fewer would not fit
    assert kept[0] == system and kept[-1] == history[-1]
    assert kept[1]["role"] == "user"
