"""Tools as short signatures for the prompt of a model whose template does not render tools.

A tool's JSON schema is written for a validator, not for a 2048-token context: Home Assistant's
Assist tools are 2,100 tokens as minified JSON, mostly ``{"type":"string"}`` and one 20-value enum
repeated in nine tools. The model needs the names, the types, which arguments are optional, the
values an enum allows and the descriptions. So edged writes each tool as a TypeScript-like line, as
llama.cpp does for models trained on that form (functionary)::

    // Turns on a device.
    HassTurnOn(name?: string, domain?: string[], device_class?: DeviceClass[])

with an enum or object type that several tools repeat named once below the tools (``type DeviceClass
= "tv" | "speaker" | ...``), ``integer 0..100`` for bounds, ``= value`` for defaults. Nothing is lost
for the answer: the grammar is still built from the full schemas, and every call is validated
against them (`edged.tools.grammar`). Schemas this renderer does not know keywords of are still
rendered (the unknown keywords are left out of the text, not out of the grammar).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from edged.tools.spec import ToolSpec

_SIMPLE = {"string", "number", "integer", "boolean", "null"}
_NAMED_MIN = 4
"""An enum of at least this many values, or an object type, that occurs twice or more is named once."""


def _literal(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _key(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass
class _Names:
    """Types repeated across the tools, each given a name (its first-seen place decides it)."""

    counts: dict[str, int] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)
    defs: dict[str, Any] = field(default_factory=dict)
    """``$defs`` / ``definitions`` of the current tool, for ``$ref``."""

    def count(self, schema: Any, hint: str, seen: frozenset[str] = frozenset()) -> None:
        if not isinstance(schema, dict):
            return
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self.resolve(ref)
            if target is not None and ref not in seen:  # a recursive type is counted once
                self.count(target, ref.rsplit("/", 1)[-1], seen | {ref})
            return
        if self._nameable(schema):
            key = _key(schema)
            self.counts[key] = self.counts.get(key, 0) + 1
            self.hints.setdefault(key, hint)
        for name, sub in (schema.get("properties") or {}).items():
            self.count(sub, str(name), seen)
        for word in ("items", "additionalProperties"):
            self.count(schema.get(word), hint, seen)
        for word in ("anyOf", "oneOf", "allOf"):
            for sub in schema.get(word) or []:
                self.count(sub, hint, seen)

    def resolve(self, ref: str) -> Any:
        """The local definition a ``$ref`` points to (``#/$defs/Name``), or None."""
        match = re.fullmatch(r"#/(?:\$defs|definitions)/(.+)", ref)
        if match is None:
            return None
        return self.defs.get(match.group(1).replace("~1", "/").replace("~0", "~"))

    @staticmethod
    def _nameable(schema: dict[str, Any]) -> bool:
        enum = schema.get("enum")
        if isinstance(enum, list) and len(enum) >= _NAMED_MIN:
            return True
        return schema.get("type") == "object" and bool(schema.get("properties"))

    def name_of(self, schema: dict[str, Any]) -> str | None:
        key = _key(schema)
        if self.counts.get(key, 0) < 2:
            return None
        if key not in self.names:
            base = _type_name(self.hints.get(key, "Type"))
            taken = set(self.names.values())
            name, n = base, 2
            while name in taken or name in _SIMPLE:
                name, n = f"{base}{n}", n + 1
            self.names[key] = name
        return self.names[key]


def _type_name(hint: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", hint) or ["Type"]
    name = "".join(w[:1].upper() + w[1:] for w in words)
    return name if name[:1].isalpha() else f"T{name}"


class _Writer:
    def __init__(self, names: _Names) -> None:
        self.names = names
        self.aliases: dict[str, str] = {}
        """Name -> its definition, in the order first used."""
        self.depth = 0

    def type(self, schema: Any, *, top: bool = False) -> str:
        if schema is True or schema == {} or not isinstance(schema, dict):
            return "any"
        if "$ref" in schema and isinstance(schema["$ref"], str):
            target = self._ref(schema["$ref"])
            return self.type(target) if target is not None else "object"
        if not top:
            name = self.names.name_of(schema)
            if name is not None:
                if name not in self.aliases:
                    self.aliases[name] = ""  # reserve the place (and stop a recursion)
                    self.aliases[name] = self._plain(schema)
                return name
        return self._plain(schema)

    def _ref(self, ref: str) -> Any:
        return None if self.depth > 8 else self.names.resolve(ref)

    def _plain(self, schema: dict[str, Any]) -> str:
        self.depth += 1
        try:
            return self._written(schema)
        finally:
            self.depth -= 1

    def _written(self, schema: dict[str, Any]) -> str:
        if "const" in schema:
            return _literal(schema["const"])
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return " | ".join(_literal(v) for v in enum)
        for word in ("anyOf", "oneOf"):
            options = schema.get(word)
            if isinstance(options, list) and options:
                return " | ".join(self.type(o) for o in options)
        kind = schema.get("type")
        if isinstance(kind, list):
            return (
                " | ".join(self._written({**schema, "type": k}) for k in kind if isinstance(k, str)) or "any"
            )
        if kind == "array" or (kind is None and "items" in schema):
            items = schema.get("items")
            return f"{self._grouped(self.type(items))}[]" if items is not None else "any[]"
        if kind == "object" or (kind is None and "properties" in schema):
            return self._object(schema)
        if kind in ("integer", "number"):
            low, high = schema.get("minimum"), schema.get("maximum")
            if low is not None or high is not None:
                return f"{kind} {'' if low is None else low}..{'' if high is None else high}"
            return str(kind)
        if kind == "string" and isinstance(schema.get("format"), str):
            return f"string /* {schema['format']} */"
        return str(kind) if isinstance(kind, str) else "any"

    @staticmethod
    def _grouped(text: str) -> str:
        """An array's item type: a union in parentheses."""
        return f"({text})" if " | " in text else text

    def _object(self, schema: dict[str, Any]) -> str:
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            extra = schema.get("additionalProperties")
            return f"{{[key: string]: {self.type(extra)}}}" if isinstance(extra, dict) and extra else "object"
        return "{" + ", ".join(self.arguments(schema)) + "}"

    def arguments(self, schema: dict[str, Any]) -> list[str]:
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return []
        required = set(schema.get("required") or [])
        out = []
        for name, sub in properties.items():
            text = f"{name}{'' if name in required else '?'}: {self.type(sub)}"
            if isinstance(sub, dict):
                if "default" in sub:
                    text += f" = {_literal(sub['default'])}"
                if isinstance(sub.get("description"), str) and sub["description"].strip():
                    text += f" /* {sub['description'].strip()} */"
            out.append(text)
        return out


def signatures(tools: list[ToolSpec]) -> str:
    """The tools as signature lines (each after its description as a comment), then the named
    types they share."""
    names = _Names()
    for tool in tools:
        names.defs = _defs(tool.parameters)
        names.count(tool.parameters, tool.name)
    writer = _Writer(names)
    lines: list[str] = []
    for tool in tools:
        names.defs = _defs(tool.parameters)
        if tool.description:
            lines.extend(f"// {line}".rstrip() for line in tool.description.strip().splitlines())
        lines.append(f"{tool.name}({', '.join(writer.arguments(tool.parameters))})")
    lines.extend(f"type {name} = {text}" for name, text in writer.aliases.items())
    return "\n".join(lines)


def _defs(schema: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for word in ("definitions", "$defs"):
        found = schema.get(word)
        if isinstance(found, dict):
            out.update(found)
    return out
