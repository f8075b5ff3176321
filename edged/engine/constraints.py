"""Answers a machine can use: a job's ``response_format`` or ``grammar`` turned into a llama.cpp
grammar (GBNF), and the answer checked against it when the job ends.

The JSON-schema-to-GBNF conversion is llama.cpp's own, as llama-cpp-python ships it
(``llama_cpp.llama_grammar.json_schema_to_gbnf``); conversions are cached by the schema's hash, so a
fleet that sends the same schema pays for it once. The answer of a JSON job is parsed and validated
with ``jsonschema`` (the grammar makes it well formed; the validator also checks what a grammar
cannot express, and a half object is never presented as valid).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from edged.backends import Grammar
from edged.errors import InvalidOutput, InvalidRequest

CACHE_SIZE = 256
"""Schemas (and grammars) whose conversion and validation are remembered."""

ANY_OBJECT: dict[str, Any] = {"type": "object"}
"""``response_format: {"type": "json_object"}``: any JSON object."""


@dataclass(frozen=True)
class Constraint:
    """What a job's answer must be: the grammar its sampler obeys and, for JSON, the schema its
    parsed answer is validated against."""

    kind: Literal["json_object", "json_schema", "grammar"]
    grammar: Grammar
    schema: dict[str, Any] | None
    """The JSON schema (json_object: any object); None for a raw grammar."""
    name: str | None = None


class _Lru:
    def __init__(self, size: int) -> None:
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_schemas = _Lru(CACHE_SIZE)


def schema_cache_stats() -> dict[str, int]:
    return {"hits": _schemas.hits, "misses": _schemas.misses}


def _canonical(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def schema_to_grammar(schema: dict[str, Any], param: str) -> str:
    """GBNF for a JSON schema (llama.cpp's converter), cached by the schema's hash; raises
    `InvalidRequest` with the reason for a schema that is not one or that the converter cannot take."""
    from jsonschema import exceptions as js_exceptions
    from jsonschema import validators

    key = hashlib.sha256(_canonical(schema).encode()).hexdigest()
    cached = _schemas.get(key)
    if isinstance(cached, str):
        return cached
    if isinstance(cached, InvalidRequest):
        raise cached
    try:
        validators.validator_for(schema).check_schema(schema)
    except js_exceptions.SchemaError as exc:
        error = InvalidRequest(f"{param} is not a valid JSON schema: {exc.message}", param=param)
        _schemas.put(key, error)
        raise error from None
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises plain exceptions for what it does not support
        error = InvalidRequest(
            f"{param}: llama.cpp's JSON-schema converter cannot take this schema: {exc}", param=param
        )
        _schemas.put(key, error)
        raise error from None
    _schemas.put(key, gbnf)
    return gbnf


def constraint_of(response_format: Any, grammar: str | None, after_think: bool) -> Constraint | None:
    """The job's constraint, or None. ``after_think``: the output starts inside a ``<think>`` block,
    so the grammar applies only once the block is closed."""
    if grammar is not None:
        return Constraint("grammar", Grammar(grammar, after_think=after_think), None)
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        gbnf = schema_to_grammar(ANY_OBJECT, "response_format")
        return Constraint("json_object", Grammar(gbnf, after_think=after_think), ANY_OBJECT)
    spec = response_format.json_schema
    gbnf = schema_to_grammar(spec.schema_, "response_format.json_schema.schema")
    return Constraint("json_schema", Grammar(gbnf, after_think=after_think), spec.schema_, spec.name)


def check_answer(constraint: Constraint, content: str) -> Any:
    """The parsed answer of a JSON job (None for a raw grammar); raises `InvalidOutput` when it does
    not parse or does not validate."""
    if constraint.schema is None:
        return None
    try:
        value = json.loads(content, strict=False)  # the grammar's strings admit control characters
    except json.JSONDecodeError as exc:
        raise InvalidOutput(
            f"the answer is not complete JSON ({exc.msg} at character {exc.pos})", content=content
        ) from None
    from jsonschema import validators

    validator = validators.validator_for(constraint.schema)(constraint.schema)
    error = next(iter(validator.iter_errors(value)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(the whole answer)"
        raise InvalidOutput(
            f"the answer does not match the schema at {where}: {error.message}", content=content
        )
    return value
