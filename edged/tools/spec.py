"""What a client asks for: the tools it offers, how it wants them used, and the calls made.

One normalized shape for the three request shapes edged accepts: OpenAI ``tools``
(``{"type": "function", "function": {name, description, parameters, strict}}``), OpenAI's legacy
``functions`` (the inner ``{name, description, parameters}``) and Ollama ``tools`` (OpenAI's shape).
``tool_choice`` (``"none"``, ``"auto"``, ``"required"``, ``{"type": "function", "function": {"name":
...}}``) and the legacy ``function_call`` (``"none"``, ``"auto"``, ``{"name": ...}``) become one
`ToolChoice`. Every parameters schema is bounded (`edged.engine.bounds.check_schema`) here, before a
grammar is built from it or it is rendered into a prompt.
"""

# ruff: noqa: RUF001 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from edged.engine import bounds
from edged.errors import InvalidRequest

MAX_TOOLS = 128
"""Tools one request may offer (OpenAI's own limit)."""

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""OpenAI's rule for a function name; it also keeps names safe inside the formats' markup (no
newline for R1's ``function<｜tool▁sep｜>NAME\\n``, no quote for JSON)."""

MAX_DESCRIPTION = 8192
"""Characters of one tool's description (rendered into the prompt)."""

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
"""A tool without ``parameters`` takes none (OpenAI: an omitted schema is an empty parameter list)."""


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]
    """The JSON schema of the arguments object, as the client sent it (validated against it)."""
    strict: bool = False
    """OpenAI's ``strict``: kept for the client's sake; edged constrains every call with a grammar."""

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI shape, as chat templates that render ``tools`` expect it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    def to_compact(self) -> dict[str, Any]:
        """What edged's own prompt text shows the model (minified by the caller)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = self.parameters
        return out


ChoiceMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolChoice:
    """How the tools are to be used: ``none`` (no call), ``auto`` (the model decides), ``required``
    (at least one call) or ``named`` (a call of `name`)."""

    mode: ChoiceMode = "auto"
    name: str | None = None

    def allowed(self, tools: list[ToolSpec]) -> list[ToolSpec]:
        """The tools a call may name under this choice."""
        if self.mode == "none":
            return []
        if self.mode == "named":
            return [t for t in tools if t.name == self.name]
        return list(tools)


@dataclass(frozen=True)
class ToolCall:
    """One call the model made."""

    id: str
    name: str
    arguments: dict[str, Any] = field(hash=False)
    arguments_json: str
    """The arguments as the JSON text OpenAI's ``function.arguments`` carries (minified)."""

    @classmethod
    def of(cls, call_id: str, name: str, arguments: dict[str, Any]) -> ToolCall:
        return cls(call_id, name, arguments, compact_json(arguments))

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json},
        }

    def to_ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": self.arguments}}


def compact_json(value: Any) -> str:
    """Minified JSON, non-ASCII kept as is (what edged renders into prompts and returns)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# -- call ids ----------------------------------------------------------------------------------------

_ID_CHARS = string.ascii_letters + string.digits


def random_call_id(_index: int = 0) -> str:
    """``call_`` and 24 random letters and digits, the shape OpenAI's ids have."""
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


def call_ids_for(job_id: str) -> Callable[[int], str]:
    """Ids derived from the job id and the call's index: a journaled job that runs again after a
    restart, and its stream and final message, name each call the same. The default for jobs."""

    def make(index: int) -> str:
        digest = hashlib.sha256(f"{job_id}\0{index}".encode()).digest()
        number = int.from_bytes(digest, "big")
        chars = []
        for _ in range(24):
            number, rest = divmod(number, len(_ID_CHARS))
            chars.append(_ID_CHARS[rest])
        return "call_" + "".join(chars)

    return make


# -- tools ---------------------------------------------------------------------------------------------


def parse_tools(tools: list[Any] | None = None, functions: list[Any] | None = None) -> list[ToolSpec]:
    """The tools of a request (OpenAI/Ollama ``tools`` or legacy ``functions``; not both), each
    parameters schema bounded; `InvalidRequest` naming the field for anything malformed."""
    if tools is not None and functions is not None:
        raise InvalidRequest("give either tools or functions (deprecated), not both", param="functions")
    if tools is not None:
        param, items = "tools", tools
    elif functions is not None:
        param, items = "functions", functions
    else:
        return []
    if not isinstance(items, list):
        raise InvalidRequest(f"{param} must be an array of tools", param=param)
    if len(items) > MAX_TOOLS:
        raise InvalidRequest(f"{param} has {len(items)} tools, more than {MAX_TOOLS}", param=param)
    out: list[ToolSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if param == "tools":
            kind = item.get("type", "function")
            if kind != "function":
                raise InvalidRequest(
                    f"{where}.type is {str(kind)[:40]!r}: edged offers only 'function' tools",
                    param=f"{where}.type",
                )
            function = item.get("function")
            where = f"{where}.function"
            if not isinstance(function, dict):
                raise InvalidRequest(f"{where} must be an object with name and parameters", param=where)
        else:
            function = item
        spec = _spec(function, where)
        if spec.name in seen:
            raise InvalidRequest(
                f"{where}.name {spec.name!r} is also the name of {param}[{seen[spec.name]}]: tool names must "
                "be unique",
                param=f"{where}.name",
            )
        seen[spec.name] = i
        out.append(spec)
    return out


def _spec(function: dict[str, Any], where: str) -> ToolSpec:
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequest(
            f"{where}.name must be 1-64 letters, digits, '_' or '-' (got {str(name)[:80]!r})",
            param=f"{where}.name",
        )
    description = function.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise InvalidRequest(f"{where}.description must be a string", param=f"{where}.description")
    if len(description) > MAX_DESCRIPTION:
        raise InvalidRequest(
            f"{where}.description has {len(description)} characters, more than {MAX_DESCRIPTION}",
            param=f"{where}.description",
        )
    parameters = function.get("parameters")
    if parameters is None:
        parameters = dict(EMPTY_PARAMETERS)
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"{where}.parameters must be a JSON schema object", param=f"{where}.parameters")
    if parameters.get("type", "object") != "object":
        raise InvalidRequest(
            f"{where}.parameters must describe an object (type 'object'), not "
            f"{str(parameters.get('type'))[:40]!r}",
            param=f"{where}.parameters",
        )
    bounds.check_schema(parameters, f"{where}.parameters")
    strict = function.get("strict", False)
    if not isinstance(strict, bool):
        raise InvalidRequest(f"{where}.strict must be true or false", param=f"{where}.strict")
    return ToolSpec(name, description, parameters, strict)


# -- the choice ----------------------------------------------------------------------------------------


def parse_choice(tools: list[ToolSpec], tool_choice: Any = None, function_call: Any = None) -> ToolChoice:
    """The choice of a request: ``tool_choice`` or the legacy ``function_call`` (not both); absent
    means ``auto`` with tools and ``none`` without (OpenAI's defaults)."""
    if tool_choice is not None and function_call is not None:
        raise InvalidRequest(
            "give either tool_choice or function_call (deprecated), not both", param="function_call"
        )
    param = "tool_choice" if tool_choice is not None else "function_call"
    value = tool_choice if tool_choice is not None else function_call
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        modes = ("none", "auto", "required") if param == "tool_choice" else ("none", "auto")
        if value not in modes:
            raise InvalidRequest(
                f"{param} must be one of {', '.join(modes)} or a named function, not {value[:40]!r}",
                param=param,
            )
        mode: ChoiceMode = value  # type: ignore[assignment]
        if mode == "required" and not tools:
            raise InvalidRequest(f"{param} is 'required' but the request offers no tools", param=param)
        return ToolChoice(mode)
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a string or an object naming a function", param=param)
    if param == "tool_choice":
        if value.get("type", "function") != "function" or not isinstance(value.get("function"), dict):
            raise InvalidRequest(
                'tool_choice must be {"type": "function", "function": {"name": ...}}', param=param
            )
        name = value["function"].get("name")
    else:
        name = value.get("name")
    if not isinstance(name, str):
        raise InvalidRequest(f"{param} names no function (a string 'name')", param=param)
    if name not in {t.name for t in tools}:
        raise InvalidRequest(
            f"{param} names {name[:80]!r}, which is not one of the tools offered", param=param
        )
    return ToolChoice("named", name)
