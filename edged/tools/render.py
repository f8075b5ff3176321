"""A conversation with tools, turned into the messages the model's own chat template renders.

Input: messages as OpenAI and Ollama send them: ``content`` a string, null or text parts; assistant
``tool_calls`` (``function.arguments`` a JSON string from OpenAI clients, an object from Ollama's);
``role: tool`` results naming their call by ``tool_call_id`` (OpenAI), ``tool_name`` (Ollama) or
``name``, or by nothing (then in order); the legacy ``role: function``. Output: plain ``{role,
content}`` messages (plus ``tool_calls`` for a template that renders them) and the tools to hand the
template, so the model reads the tools, its earlier calls and their results in its own format:

- ``hermes`` with a template that renders ``tools``: the tools go to the template as they are, earlier
  calls stay ``tool_calls`` (arguments as objects, which its ``tojson`` expects) and results stay
  ``role: tool`` (rendered as ``<tool_response>`` blocks), each turn's results in the order of its calls
  (the format pairs them by position);
- ``deepseek_r1``: the tools are described in the system prompt, earlier calls are written into the
  assistant's content in R1's markup, results stay ``role: tool`` in the order of the calls (the
  template renders ``<｜tool▁outputs▁begin｜>``); `finish_prompt` closes a prompt that ends after tool
  outputs, as llama.cpp does for R1's template;
- ``generic``: the tools are described in the system prompt, earlier calls become the assistant's
  answer in the JSON the model writes (``{"tool_calls": [...]}``, with their ids), and results become
  a user message of ``{"tool_response": {"id", "name", "content"}}`` lines.

Tool definitions edged writes itself are signature lines (`edged.tools.signature`); in templates that
render tools themselves they are minified (`compact_tools_in`). The description edged adds is short.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

from edged.errors import InvalidRequest
from edged.tools.family import Family
from edged.tools.markup import (
    R1_ASSISTANT,
    R1_CALL_BEGIN,
    R1_CALL_END,
    R1_CALLS_BEGIN,
    R1_CALLS_END,
    R1_END_OF_SENTENCE,
    R1_OUTPUTS_END,
    R1_SEP,
)
from edged.tools.signature import signatures
from edged.tools.spec import ToolChoice, ToolSpec, compact_json

# ruff: noqa: RUF002 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.


@dataclass(frozen=True)
class HistoryCall:
    """A call an earlier assistant turn made."""

    id: str | None
    name: str
    arguments: dict[str, Any]


@dataclass
class Turn:
    """One message, normalized."""

    role: str
    content: str
    calls: list[HistoryCall] = field(default_factory=list)
    call_id: str | None = None
    tool_name: str | None = None
    """For ``role: tool``: the call it answers, by id or name, as the client named it."""


@dataclass(frozen=True)
class RenderedChat:
    """What to hand the model's chat template."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    """For a template that renders ``tools`` (hermes); None otherwise."""


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise InvalidRequest(f"{where}.content[{i}]: only text parts are supported", param=where)
        return "\n".join(parts)
    if isinstance(content, (dict, int, float, bool)):  # a tool result given as JSON
        return compact_json(content)
    raise InvalidRequest(f"{where}.content must be a string or text parts", param=where)


def _calls(raw: Any, where: str) -> list[HistoryCall]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where}.tool_calls must be an array", param=f"{where}.tool_calls")
    out = []
    for i, item in enumerate(raw):
        at = f"{where}.tool_calls[{i}]"
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{at} must be {{function: {{name, arguments}}}}", param=at)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise InvalidRequest(f"{at}.function.arguments is not JSON", param=at) from None
        if not isinstance(arguments, dict):
            raise InvalidRequest(f"{at}.function.arguments must be a JSON object", param=at)
        call_id = item.get("id")
        out.append(HistoryCall(call_id if isinstance(call_id, str) else None, function["name"], arguments))
    return out


def normalize(messages: list[dict[str, Any]], param: str = "messages") -> list[Turn]:
    """The messages of a request as `Turn` s (OpenAI and Ollama shapes, the legacy function role)."""
    turns = []
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role == "function":  # OpenAI's legacy function result, named by `name`
            role = "tool"
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(
                f"{where}.role {str(role)[:40]!r} is not system, user, assistant or tool", param=where
            )
        turn = Turn(role, _text(message.get("content"), where))
        if role == "assistant":
            turn.calls = _calls(message.get("tool_calls"), where)
            legacy = message.get("function_call")
            if isinstance(legacy, dict) and not turn.calls:
                turn.calls = _calls([{"function": legacy}], where)
        if role == "tool":
            call_id = message.get("tool_call_id")
            name = message.get("tool_name", message.get("name"))
            turn.call_id = call_id if isinstance(call_id, str) else None
            turn.tool_name = name if isinstance(name, str) else None
        turns.append(turn)
    return turns


@dataclass(frozen=True)
class Result:
    """A tool result, matched to the call it answers."""

    call: HistoryCall | None
    content: str


def _grouped(turns: list[Turn]) -> list[Turn | tuple[Turn, list[Result]]]:
    """The turns with each assistant turn that made calls joined to the results that follow it, put
    in the order of its calls (matched by id, else by name, else in order)."""
    out: list[Turn | tuple[Turn, list[Result]]] = []
    i = 0
    while i < len(turns):
        turn = turns[i]
        i += 1
        if turn.role != "assistant" or not turn.calls:
            if turn.role == "tool":  # a result without a call before it: keep it, in order
                out.append((Turn("assistant", ""), [Result(None, turn.content)]))
            else:
                out.append(turn)
            continue
        results: list[Turn] = []
        while i < len(turns) and turns[i].role == "tool":
            results.append(turns[i])
            i += 1
        open_calls = list(turn.calls)
        matched: list[tuple[int, Result]] = []
        leftovers: list[Turn] = []
        for result in results:
            call = next((c for c in open_calls if result.call_id and c.id == result.call_id), None)
            if call is None and result.tool_name:
                call = next((c for c in open_calls if c.name == result.tool_name), None)
            if call is None:
                leftovers.append(result)
                continue
            open_calls.remove(call)
            matched.append((turn.calls.index(call), Result(call, result.content)))
        for result in leftovers:
            call = open_calls.pop(0) if open_calls else None
            position = turn.calls.index(call) if call is not None else len(turn.calls)
            matched.append((position, Result(call, result.content)))
        matched.sort(key=lambda pair: pair[0])
        out.append((turn, [r for _, r in matched]))
    return out


# -- the system prompt ---------------------------------------------------------------------------------


def describe_tools(family: Family, tools: list[ToolSpec], choice: ToolChoice, parallel: bool) -> str:
    """What edged tells a model whose template does not render tools: each tool as a signature line
    (`edged.tools.signature`: half the tokens of the schemas' JSON), and the form of an answer."""
    allowed = choice.allowed(tools)
    lines = ["You can call these tools (their arguments; `?` marks an optional one):", signatures(allowed)]
    # The example names a real tool: SmolLM2 copied a placeholder (TOOL_NAME) into its arguments, and
    # "several calls are allowed" made it repeat one call until max_tokens (greedy, 3 of 4 questions).
    name = choice.name if choice.mode == "named" else (allowed[0].name if allowed else "TOOL_NAME")
    many = " (one entry per call)" if parallel else " (exactly one call)"
    if family == "generic":
        calls = f'{{"tool_calls":[{{"name":"{name}","arguments":{{...}}}}]}}'
        if choice.mode == "auto":
            lines.append(
                f"Answer with one JSON object: {calls} to call tools{many}, or "
                '{"response":"..."} to answer in text.'
            )
        else:
            lines.append(f"Answer with one JSON object that calls {_whom(choice)}: {calls}{many}.")
    else:
        if family == "hermes":
            form = f'<tool_call>\n{{"name": "{name}", "arguments": {{...}}}}\n</tool_call>'
        else:
            call = f"{R1_CALL_BEGIN}function{R1_SEP}{name}\n```json\n{{...}}\n```{R1_CALL_END}"
            form = f"{R1_CALLS_BEGIN}{call}{R1_CALLS_END}"
        many = " (one call block per call, separated by newlines)" if parallel else " (exactly one call)"
        if choice.mode == "auto":
            lines.append(f"To call tools, answer with{many}:\n{form}")
        else:
            lines.append(f"Answer by calling {_whom(choice)}{many}:\n{form}")
    return "\n".join(lines)


def _whom(choice: ToolChoice) -> str:
    return f"the tool {choice.name}" if choice.mode == "named" else "one or more of them"


# -- rendering -----------------------------------------------------------------------------------------


def _r1_calls(calls: list[HistoryCall]) -> str:
    blocks = "\n".join(
        f"{R1_CALL_BEGIN}function{R1_SEP}{c.name}\n```json\n{compact_json(c.arguments)}\n```{R1_CALL_END}"
        for c in calls
    )
    return f"{R1_CALLS_BEGIN}{blocks}{R1_CALLS_END}"


def _generic_calls(calls: list[HistoryCall]) -> str:
    return compact_json(
        {
            "tool_calls": [
                {**({"id": c.id} if c.id else {}), "name": c.name, "arguments": c.arguments} for c in calls
            ]
        }
    )


def _generic_results(results: list[Result]) -> str:
    lines = []
    for result in results:
        body: dict[str, Any] = {}
        if result.call is not None and result.call.id:
            body["id"] = result.call.id
        if result.call is not None:
            body["name"] = result.call.name
        body["content"] = result.content
        lines.append(compact_json({"tool_response": body}))
    return "\n".join(lines)


def render_chat(
    family: Family,
    messages: list[dict[str, Any]] | list[Turn],
    tools: list[ToolSpec],
    choice: ToolChoice,
    *,
    parallel: bool = True,
    template_renders_tools: bool = True,
) -> RenderedChat:
    """The messages (and tools) to hand the model's chat template for this conversation.

    ``template_renders_tools``: the hermes template renders ``tools`` itself
    (`edged.tools.family.template_renders_tools`); when False the tools are described in the system
    prompt as for the other families."""
    if all(isinstance(m, Turn) for m in messages):
        turns = cast("list[Turn]", list(messages))
    else:
        turns = normalize(cast("list[dict[str, Any]]", messages))
    native = family == "hermes" and template_renders_tools
    out: list[dict[str, Any]] = []
    for item in _grouped(turns):
        if isinstance(item, Turn):
            out.append({"role": item.role, "content": item.content})
            continue
        turn, results = item
        if native:
            if turn.calls:
                out.append(
                    {
                        "role": "assistant",
                        "content": turn.content,
                        "tool_calls": [
                            {
                                **({"id": c.id} if c.id else {}),
                                "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments},
                            }
                            for c in turn.calls
                        ],
                    }
                )
            out.extend({"role": "tool", "content": r.content} for r in results)
        elif family == "generic":
            if turn.calls:
                text = _generic_calls(turn.calls)
                out.append(
                    {"role": "assistant", "content": f"{turn.content}\n{text}" if turn.content else text}
                )
            if results:
                out.append({"role": "user", "content": _generic_results(results)})
        else:  # deepseek_r1, or a hermes template that does not render tools
            markup = _r1_calls(turn.calls) if family == "deepseek_r1" else _hermes_calls(turn.calls)
            if turn.calls:
                out.append({"role": "assistant", "content": turn.content + markup})
            out.extend({"role": "tool", "content": r.content} for r in results)
    template_tools = None
    if choice.mode != "none" and choice.allowed(tools):
        if native:
            template_tools = [t.to_openai() for t in choice.allowed(tools)]
        else:
            _add_system(out, describe_tools(family, tools, choice, parallel))
    return RenderedChat(out, template_tools)


def _hermes_calls(calls: list[HistoryCall]) -> str:
    blocks = (json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False) for c in calls)
    return "".join(f"\n<tool_call>\n{block}\n</tool_call>" for block in blocks)


def _add_system(messages: list[dict[str, Any]], text: str) -> None:
    if messages and messages[0]["role"] == "system":
        first = messages[0]["content"]
        messages[0] = {"role": "system", "content": f"{first}\n\n{text}" if first else text}
    else:
        messages.insert(0, {"role": "system", "content": text})


TOOL_KEYS = frozenset({"name", "description", "parameters", "strict"})


def is_tool_definition(value: Any) -> bool:
    """A tool as templates get it (`ToolSpec.to_openai`, ``{"type": "function", "function": {name,
    description, parameters}}``) or its ``function``: not a call's arguments or anything else."""
    if not isinstance(value, dict):
        return False
    if value.get("type") == "function" and set(value) == {"type", "function"}:
        value = value["function"]
    return (
        isinstance(value, dict)
        and isinstance(value.get("name"), str)
        and isinstance(value.get("parameters"), dict)
        and set(value) <= TOOL_KEYS
    )


def compact_tools_in(formatter: Any) -> None:
    """Make a chat template that renders ``tools`` itself (Qwen's ``tool | tojson``, Llama 3.1's
    ``tojson(indent=4)``, ``tools | tojson``) write the tool definitions minified, as Ollama does
    and as edged's own descriptions are: the spaces and indentation of ``json.dumps`` are tokens the
    context pays for on every request. Everything else the template dumps (a call's arguments)
    stays as it asks.

    ``formatter``: llama-cpp-python's ``Jinja2ChatFormatter``, whose compiled template looks its
    filters up in its environment at each render."""
    environment = formatter._environment.environment
    dump = environment.filters["tojson"]

    def tojson(value: Any, *args: Any, **kwargs: Any) -> str:
        tools = value if isinstance(value, list) and value else [value]  # a tool, or all of them
        if all(is_tool_definition(tool) for tool in tools):
            return compact_json(value)
        return str(dump(value, *args, **kwargs))

    environment.filters["tojson"] = tojson


def finish_prompt(family: Family, prompt: str, *, add_generation_prompt: bool = True) -> str:
    """The rendered prompt, fixed where the family's template leaves it open: R1's templates end
    after tool outputs without opening the assistant's turn (llama.cpp appends the same)."""
    if family == "deepseek_r1" and add_generation_prompt and prompt.endswith(R1_OUTPUTS_END):
        return prompt + R1_END_OF_SENTENCE + R1_ASSISTANT + "<think>\n"
    return prompt
