"""`Preparer`: a job request turned into what a backend runs - the chat template and system prompt,
the think switch, the context cap and max_tokens clamp, sampling layered profile < config < job -
through a stand-in tokenizer (one token per character)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import BOARDS

from edged.backends import Grammar
from edged.board import detect_board
from edged.config import Settings
from edged.engine.job import JobRequest
from edged.engine.prepare import SKIP_THINKING, Preparer
from edged.errors import ContextLengthExceeded, InvalidRequest
from edged.tools.markup import R1_CALLS_BEGIN


class CharTokenizer:
    """One token per character; a chat is ``role: content`` lines, then the template's own opening
    ``<think>`` if ``opens_think`` (as DeepSeek-R1's template does)."""

    n_vocab = 0x110000
    """Every Unicode code point."""
    template = None

    def __init__(self, *, opens_think: bool = False, problem: str | None = None) -> None:
        self.opens_think = opens_think
        self.problem = problem
        self.chat_flags: list[bool] = []

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("<think>\n" if self.opens_think else "")

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        self.chat_flags.append(chat)
        return [ord(c) for c in text]

    def grammar_problem(self, grammar: Grammar) -> str | None:
        return self.problem


class WithVocab(CharTokenizer):
    n_vocab = 128


@pytest.fixture
def preparer(settings_of: Callable[..., Settings]) -> Callable[..., Preparer]:
    def make(**overrides: Any) -> Preparer:
        return Preparer(settings_of(**overrides), detect_board(BOARDS / "x86", user_dir=None))

    return make


def job(**fields: Any) -> JobRequest:
    return JobRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_the_chat_template_renders_the_messages_with_the_configured_system_prompt(preparer) -> None:
    tokenizer = CharTokenizer()
    p = preparer(model={"system_prompt": "Be brief."})
    prepared = p.prepare(job(), tokenizer, n_ctx=1000)
    assert prepared.prompt.text == "system: Be brief.\nuser: hi\n"
    assert prepared.prompt.tokens == [ord(c) for c in prepared.prompt.text]
    assert tokenizer.chat_flags == [True]
    own = job(messages=[{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}])
    assert p.prepare(own, tokenizer, 1000).prompt.text == "system: Mine.\nuser: hi\n", "the job's own wins"
    single = JobRequest(prompt="hey")
    assert p.prepare(single, tokenizer, 1000).prompt.text == "system: Be brief.\nuser: hey\n"


def test_a_raw_prompt_is_fed_verbatim_without_the_template(preparer) -> None:
    tokenizer = CharTokenizer(opens_think=True)
    prepared = preparer(model={"system_prompt": "Be brief."}).prepare(
        JobRequest(prompt="Once upon a", raw=True), tokenizer, 1000
    )
    assert prepared.prompt.text == "Once upon a"
    assert tokenizer.chat_flags == [False]
    assert not prepared.in_think


def test_a_prompt_that_fills_the_context_is_refused_with_its_counts(preparer) -> None:
    p = preparer()
    text_len = len("user: hi\n")
    with pytest.raises(ContextLengthExceeded) as info:
        p.prepare(job(), CharTokenizer(), n_ctx=text_len)
    body = info.value.to_dict()["error"]
    assert (body["n_prompt_tokens"], body["n_ctx"], body["param"]) == (text_len, text_len, "messages")
    with pytest.raises(ContextLengthExceeded) as info:
        p.prepare(JobRequest(prompt="x" * 50, raw=True), CharTokenizer(), n_ctx=50)
    assert info.value.param == "prompt"
    assert p.prepare(job(), CharTokenizer(), n_ctx=text_len + 1).params.max_tokens == 1


def test_max_tokens_is_clamped_to_the_room_left_and_says_so(preparer) -> None:
    p = preparer(jobs={"default_max_tokens": 20})
    prompt_len = len("user: hi\n")
    fits = p.prepare(job(max_tokens=5), CharTokenizer(), n_ctx=100)
    assert (fits.params.max_tokens, fits.clamped) == (5, False)
    cut = p.prepare(job(max_tokens=500), CharTokenizer(), n_ctx=prompt_len + 10)
    assert (cut.params.max_tokens, cut.clamped) == (10, True)
    default = p.prepare(job(), CharTokenizer(), n_ctx=100)
    assert (default.params.max_tokens, default.clamped) == (20, False), "jobs.default_max_tokens"


def test_sampling_is_the_profile_then_the_config_then_the_job(preparer) -> None:
    p = preparer(model={"sampling": {"temperature": 0.2, "top_k": 7}})
    base = p.prepare(job(), CharTokenizer(), 100).params
    # x86 is the generic profile: temperature 0.6 and top_p 0.9; the config overrides temperature
    assert (base.temperature, base.top_p, base.top_k) == (0.2, 0.9, 7)
    assert (base.frequency_penalty, base.presence_penalty, base.logit_bias, base.seed) == (0.0, 0.0, (), None)
    own = p.prepare(
        job(temperature=1.1, top_p=0.5, seed=3, presence_penalty=0.5, logit_bias={"9": 2, "4": -1}),
        CharTokenizer(),
        100,
    ).params
    assert (own.temperature, own.top_p, own.top_k, own.seed) == (1.1, 0.5, 7, 3)
    assert own.presence_penalty == 0.5 and own.logit_bias == ((4, -1.0), (9, 2.0))


def test_a_template_that_opens_think_starts_inside_the_reasoning(preparer) -> None:
    p = preparer()
    thinking = p.prepare(job(reasoning_budget=5), CharTokenizer(opens_think=True), 1000)
    assert thinking.in_think and thinking.params.in_think and thinking.params.reasoning_budget == 5
    assert thinking.prompt.text.endswith("<think>\n")
    for skip in ({"think": False}, {"reasoning_budget": 0}):
        direct = p.prepare(job(**skip), CharTokenizer(opens_think=True), 1000)
        assert direct.prompt.text.endswith("<think>\n" + SKIP_THINKING), skip
        assert not direct.in_think and direct.params.reasoning_budget is None
    plain = p.prepare(job(reasoning_budget=5), CharTokenizer(), 1000)
    assert not plain.in_think and plain.params.reasoning_budget is None, "no <think>: no budget to keep"


def test_logit_bias_outside_the_vocabulary_is_refused(preparer) -> None:
    p = preparer()
    with pytest.raises(InvalidRequest) as info:
        p.prepare(job(logit_bias={"5": 1, "128": 1, "4000": -1}), WithVocab(), 1000)
    assert info.value.param == "logit_bias"
    assert "[128, 4000]" in info.value.message and "(0..127)" in info.value.message
    assert p.prepare(job(logit_bias={"127": 1}), WithVocab(), 1000).params.logit_bias == ((127, 1.0),)


def test_a_grammar_the_sampler_cannot_take_is_refused_naming_the_field(preparer) -> None:
    p = preparer()
    refusing = CharTokenizer(problem="rule 'x' is not defined")
    with pytest.raises(InvalidRequest) as info:
        p.prepare(job(grammar='root ::= "a"'), refusing, 1000)
    assert (info.value.param, info.value.message) == ("grammar", "grammar: rule 'x' is not defined")
    with pytest.raises(InvalidRequest) as info:
        p.prepare(job(response_format={"type": "json_object"}), refusing, 1000)
    assert info.value.param == "response_format"
    kept = p.prepare(job(grammar='root ::= "a"'), CharTokenizer(opens_think=True), 1000)
    assert kept.params.grammar is not None and kept.params.grammar.after_think, "reasoning stays free"
    assert kept.constraint is not None and kept.constraint.kind == "grammar"


def test_cache_prompt_false_asks_for_the_whole_prompt(preparer) -> None:
    p = preparer()
    assert p.prepare(job(), CharTokenizer(), 100).prompt.reuse
    assert not p.prepare(job(cache_prompt=False), CharTokenizer(), 100).prompt.reuse


# -- tools -------------------------------------------------------------------------------------------

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now at a place.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
HERMES_TEMPLATE = "{% if tools %}{{ tools | tojson }}{% endif %}<tool_call>"
"""Enough of a Hermes template for `edged.tools.family`: it renders ``tools`` and spells <tool_call>."""
R1_TEMPLATE = "<｜tool▁calls▁begin｜>"  # noqa: RUF001 - R1's own spelling


class TemplateTokenizer(CharTokenizer):
    """A `CharTokenizer` with a chat template's source, recording the tools it is handed."""

    def __init__(self, template: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.template = template  # type: ignore[assignment]
        self.tools: list[Any] = []

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        self.tools.append(tools)
        return super().render_chat(messages)


def test_a_generic_model_is_told_the_tools_and_always_constrained_to_the_calls_or_a_response(
    preparer,
) -> None:
    p = preparer()
    tokenizer = CharTokenizer()
    for choice in ("auto", "required", NAMED):
        prepared = p.prepare(job(tools=[WEATHER], tool_choice=choice), tokenizer, 10_000)
        assert prepared.tools is not None and prepared.tools.family == "generic"
        assert prepared.prompt.text.startswith("system: You can call these tools")
        assert "\nget_weather(" in prepared.prompt.text  # its signature line
        constraint = prepared.constraint
        assert constraint is not None and constraint.kind == "tools" and constraint.schema is None
        assert prepared.params.grammar == constraint.grammar and "tc-call" in constraint.grammar.text
        assert ("rs-root" in constraint.grammar.text) == (choice == "auto"), "only auto may answer in text"
    assert p.family(tokenizer) == "generic"


def test_tool_choice_none_tells_the_model_nothing_and_constrains_nothing(preparer) -> None:
    prepared = preparer().prepare(job(tools=[WEATHER], tool_choice="none"), CharTokenizer(), 10_000)
    assert (prepared.tools, prepared.constraint, prepared.prompt.text) == (None, None, "user: hi\n")


def test_a_hermes_template_renders_the_tools_itself_and_auto_gets_a_lazy_grammar(preparer) -> None:
    p = preparer()
    tokenizer = TemplateTokenizer(HERMES_TEMPLATE)
    auto = p.prepare(job(tools=[WEATHER]), tokenizer, 10_000)
    assert auto.tools is not None and auto.tools.family == "hermes"
    assert tokenizer.tools[-1] == [WEATHER], "the template gets the tools, in OpenAI's shape"
    assert "You can call" not in auto.prompt.text, "not described a second time"
    assert auto.constraint is not None and auto.constraint.kind == "tools"
    assert auto.constraint.grammar.trigger == "<tool_call>", "auto: free text until the trigger"
    assert auto.params.grammar == auto.constraint.grammar
    forced = p.prepare(job(tools=[WEATHER], tool_choice="required"), tokenizer, 10_000)
    assert forced.constraint is not None and forced.constraint.kind == "tools"
    assert forced.constraint.grammar.text.startswith('root ::= tc-block ( "\\n" tc-block )*')
    assert not forced.constraint.grammar.after_think and forced.constraint.grammar.trigger is None


def test_a_thinking_r1_model_reasons_freely_before_its_forced_call(preparer) -> None:
    p = preparer()
    tokenizer = TemplateTokenizer(R1_TEMPLATE, opens_think=True)
    named = p.prepare(job(tools=[WEATHER], tool_choice=NAMED, parallel_tool_calls=False), tokenizer, 10_000)
    assert named.tools is not None and named.tools.family == "deepseek_r1" and not named.tools.parallel
    assert tokenizer.tools[-1] is None, "R1's template does not render tools: the system prompt has them"
    assert named.prompt.text.startswith("system: You can call these tools")
    assert named.in_think and named.constraint is not None and named.constraint.grammar.after_think
    assert "get_weather" in named.constraint.grammar.text
    assert named.constraint.grammar.trigger is None
    auto = p.prepare(job(tools=[WEATHER]), tokenizer, 10_000)
    assert auto.tools is not None and auto.constraint is not None
    grammar = auto.constraint.grammar
    assert grammar.trigger == R1_CALLS_BEGIN and grammar.after_think, "lazy, after the reasoning"


def test_earlier_calls_and_results_are_rendered_in_the_model_s_format_even_without_tools(preparer) -> None:
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
            ],
        },
        {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"},
    ]
    prepared = preparer().prepare(job(messages=history), CharTokenizer(), 10_000)
    assert prepared.tools is None and prepared.constraint is None
    assert prepared.prompt.text == (
        "user: Weather in Oslo?\n"
        'assistant: {"tool_calls":[{"id":"call_1","name":"get_weather","arguments":{"city":"Oslo"}}]}\n'
        'user: {"tool_response":{"id":"call_1","name":"get_weather","content":"-3 C"}}\n'
    )


def test_a_tool_grammar_the_sampler_cannot_take_is_refused_naming_tools(preparer) -> None:
    with pytest.raises(InvalidRequest) as info:
        preparer().prepare(job(tools=[WEATHER], tool_choice="required"), CharTokenizer(problem="no"), 10_000)
    assert info.value.param == "tools" and info.value.message == "tools: no"


def chat(turns: int, *, system: str = "S" * 50, calls: bool = False) -> list[dict[str, Any]]:
    """A system prompt and ``turns`` turns of 2 messages (4 with ``calls``: a call and its result)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for i in range(turns):
        out.append({"role": "user", "content": f"question {i:02} " + "q" * 30})
        if calls:
            call = {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            out.append({"role": "tool", "tool_call_id": f"c{i}", "content": "r" * 20})
        out.append({"role": "assistant", "content": "a" * 30})
    out.append({"role": "user", "content": "the last question"})
    return out


def test_trim_history_drops_the_oldest_turns_until_the_answer_has_its_room(preparer) -> None:
    p = preparer(jobs={"default_max_tokens": 100})
    request = job(messages=chat(20))
    tokenizer = CharTokenizer()
    whole = len(p.prepare(request, tokenizer, 10_000).prompt.tokens)
    n_ctx = whole // 2
    with pytest.raises(ContextLengthExceeded):
        p.prepare(request, tokenizer, n_ctx)  # overflow "error", the default
    tokenizer = CharTokenizer()
    fitted = p.prepare(request, tokenizer, n_ctx, "trim_history")
    reserve = p.answer_reserve(request, n_ctx)
    assert reserve == min(100, n_ctx // 4)
    dropped = fitted.trimmed_messages
    assert dropped > 0 and dropped % 2 == 0, "whole turns"
    assert len(fitted.prompt.tokens) + reserve <= n_ctx
    assert fitted.params.max_tokens == 100 and not fitted.clamped
    text = fitted.prompt.text
    assert text.startswith("system: " + "S" * 50) and text.endswith("user: the last question\n")
    assert f"question {dropped // 2:02}" in text and f"question {dropped // 2 - 1:02}" not in text
    one_more = p.prompt_text(request, tokenizer, [request.messages[0].model_dump(), *chat(20)[dropped - 1 :]])
    assert len(one_more) + reserve > n_ctx, "keeping one turn more would not fit"
    assert len(tokenizer.chat_flags) <= 2 + 5, "O(log turns) counts: the whole, the fewest, a binary search"


def test_calls_and_results_are_dropped_with_their_turn(preparer) -> None:
    p = preparer(jobs={"default_max_tokens": 50})
    messages = chat(10, calls=True)
    request = job(messages=messages)
    whole = len(p.prepare(request, CharTokenizer(), 10_000).prompt.tokens)
    for n_ctx in range(whole // 3, whole, 41):
        fitted = p.prepare(request, CharTokenizer(), n_ctx, "trim_history")
        assert fitted.trimmed_messages % 4 == 0, n_ctx
        assert messages[1 + fitted.trimmed_messages]["role"] == "user"


def test_without_room_for_the_whole_reserve_every_older_turn_goes(preparer) -> None:
    """The system prompt and the last turn leave less than the reserve: the answer gets all the room
    there is (as error would give the whole prompt), not an error."""
    p = preparer(jobs={"default_max_tokens": 500})
    request = job(messages=chat(3, system="S" * 300))
    last = len("system: " + "S" * 300 + "\nuser: the last question\n")
    n_ctx = last + 40  # room for 40 tokens of answer, under the reserve of min(500, n_ctx // 4)
    fitted = p.prepare(request, CharTokenizer(), n_ctx, "trim_history")
    assert fitted.trimmed_messages == 6 and len(fitted.prompt.tokens) == last
    assert (fitted.params.max_tokens, fitted.clamped) == (40, True)


def test_a_system_prompt_and_last_turn_over_the_context_are_refused_even_with_trim(preparer) -> None:
    p = preparer()
    request = job(messages=chat(4, system="S" * 300))
    with pytest.raises(ContextLengthExceeded) as info:
        p.prepare(request, CharTokenizer(), 200, "trim_history")
    body = info.value.to_dict()["error"]
    assert body["param"] == "messages" and body["n_ctx"] == 200 and body["n_prompt_tokens"] > 300
    assert "8 older messages dropped" in body["message"]


def test_trim_history_leaves_prompts_and_fitting_chats_alone(preparer) -> None:
    p = preparer()
    with pytest.raises(ContextLengthExceeded):
        p.prepare(JobRequest(prompt="x" * 300, raw=True), CharTokenizer(), 100, "trim_history")
    with pytest.raises(ContextLengthExceeded):  # one user message: nothing to drop
        p.prepare(JobRequest(prompt="x" * 300), CharTokenizer(), 100, "trim_history")
    tokenizer = CharTokenizer()
    fits = p.prepare(job(messages=chat(3)), tokenizer, 10_000, "trim_history")
    assert fits.trimmed_messages == 0 and tokenizer.chat_flags == [True], "counted once"


def test_the_reserve_is_max_tokens_or_the_default_within_the_context(preparer) -> None:
    p = preparer(jobs={"default_max_tokens": 512})
    assert p.answer_reserve(job(), 2048) == 512
    assert p.answer_reserve(job(), 1000) == 250, "at most a quarter of the context by default"
    assert p.answer_reserve(job(max_tokens=64), 2048) == 64
    assert p.answer_reserve(job(max_tokens=5000), 2048) == 1024, "at most half with max_tokens"
