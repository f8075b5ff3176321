"""Answers a machine can use: a job's ``response_format`` or ``grammar`` turned into a llama.cpp
grammar (GBNF), and the answer checked against it when the job ends.

The JSON-schema-to-GBNF conversion is llama.cpp's own, as llama-cpp-python ships it
(``llama_cpp.llama_grammar.json_schema_to_gbnf``); conversions are cached by the schema's hash, so a
fleet that sends the same schema pays for it once. Every schema and grammar is bounded first
(`edged.engine.bounds`): nothing here needs a model, and any thread may call `constraint_of`. The
answer of a JSON job is parsed and validated with ``jsonschema`` against the schema as the client
sent it (the grammar makes it well formed; the validator also checks what a grammar cannot express,
or what the bounds left out of it, and a half object is never presented as valid).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from edged.backends import Grammar
from edged.engine import bounds
from edged.engine.intrange import put_ranges, with_integer_ranges
from edged.errors import InvalidOutput, InvalidRequest

log = structlog.get_logger(__name__)

CACHE_SIZE = 256
"""Schemas (and grammars) whose conversion and validation are remembered."""

CACHE_BYTES = 16 << 20
"""...and at most this much grammar text among them (16 of the largest, `bounds.MAX_GBNF_BYTES`)."""

VALIDATION_STEPS = 200_000
"""Most keyword evaluations when an answer is validated (on the scheduler thread, where every job
waits): a schema whose ``$ref``s jsonschema resolves differently from the converter (``$id``,
``$dynamicRef``) is not bounded by `bounds.MAX_EXPANDED_NODES`. A 20-property answer takes a few
hundred."""

ANY_OBJECT: dict[str, Any] = {"type": "object"}
"""``response_format: {"type": "json_object"}``: any JSON object."""


@dataclass(frozen=True)
class Constraint:
    """What a job's answer must be: the grammar its sampler obeys and, for JSON, the schema its
    parsed answer is validated against."""

    kind: Literal["json_object", "json_schema", "grammar", "tools"]
    grammar: Grammar
    schema: dict[str, Any] | None
    """The JSON schema (json_object: any object); None for a raw grammar and for tool calls (each
    call is checked against its tool's schema: `edged.tools.grammar.check_call`)."""
    name: str | None = None

    @property
    def param(self) -> str:
        """The request field that asked for this constraint (named in errors about it)."""
        return {"grammar": "grammar", "tools": "tools"}.get(self.kind, "response_format")


class _Lru:
    """Least recently used entries, at most ``size`` of them and ``max_bytes`` of grammar text."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._size = size
        self._max_bytes = max_bytes
        self.bytes = 0
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
            if key in self._items:
                self.bytes -= _size(self._items[key])
            self._items[key] = value
            self._items.move_to_end(key)
            self.bytes += _size(value)
            while len(self._items) > self._size or self.bytes > self._max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= _size(old)

    def __len__(self) -> int:
        return len(self._items)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str) else 256


_schemas = _Lru(CACHE_SIZE, CACHE_BYTES)


def schema_cache_stats() -> dict[str, int]:
    return {"hits": _schemas.hits, "misses": _schemas.misses}


def _canonical(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def schema_to_grammar(schema: dict[str, Any], param: str) -> str:
    """GBNF for a JSON schema (llama.cpp's converter), cached by the schema's hash; raises
    `InvalidRequest` with the reason for a schema that is not one, that is beyond edged's bounds, or
    that the converter cannot take."""
    from jsonschema import exceptions as js_exceptions
    from jsonschema import validators

    checked = bounds.check_schema(schema, param)  # first: it bounds the depth _canonical recurses
    key = hashlib.sha256(_canonical(schema).encode()).hexdigest()
    cached = _schemas.get(key)
    if isinstance(cached, str):
        return cached
    if isinstance(cached, InvalidRequest):
        raise cached
    try:
        validators.validator_for(schema).check_schema(schema)
    except js_exceptions.SchemaError as exc:
        raise _remember(key, f"{param} is not a valid JSON schema: {exc.message}", param) from None
    except Exception as exc:  # RecursionError, referencing errors: never a 500
        raise _remember(key, f"{param} is not a valid JSON schema: {_reason(exc)}", param) from None
    from llama_cpp import llama_grammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    # llama-cpp-python's port of the converter forgets three of the characters llama.cpp's own
    # (ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS in common/json-schema-to-grammar.cpp) unescapes in a
    # pattern's literal text: ``^light\.[a-z]+$`` became the literal "light\." that llama.cpp's grammar
    # parser refuses. The set is read at each conversion; this makes it upstream's.
    llama_grammar.ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS.update("^$.")
    converted, ranges = with_integer_ranges(checked.schema)
    try:
        gbnf = put_ranges(json_schema_to_gbnf(json.dumps(converted)), ranges)
    except Exception as exc:  # the converter raises plain exceptions for what it does not support
        raise _remember(
            key, f"{param}: llama.cpp's JSON-schema converter cannot take this schema: {_reason(exc)}", param
        ) from None
    gbnf = with_llama_spaces(gbnf)
    try:
        bounds.check_grammar(gbnf, f"{param} (as a grammar)")
    except InvalidRequest as exc:
        raise _remember(key, exc.message, param) from None
    if checked.clamped:
        log.info("maxima left out of the grammar, checked on the answer", fields=checked.clamped)
    _schemas.put(key, gbnf)
    return gbnf


PYTHON_SPACE_RULE = 'space ::= " "?'
"""The whitespace llama-cpp-python's converter allows between JSON tokens: one space, or none."""
LLAMA_SPACE = '| " " | "\\n"{1,2} [ \\t]{0,20}'
"""The whitespace llama.cpp's own converter allows (``SPACE_RULE`` in common/json-schema-to-grammar.cpp):
none, a space, or one or two newlines and up to 20 spaces or tabs of indentation. A model lays JSON
out the way it learned to (pretty-printed, as most training data is) instead of being pushed off its
path by a compact-only grammar, and it still cannot pad forever: each gap is at most 22 characters."""


def with_llama_spaces(gbnf: str) -> str:
    """The converter's grammar with llama.cpp's whitespace rule in place of its one optional space."""
    lines = gbnf.split("\n")
    return "\n".join(f"space ::= {LLAMA_SPACE}" if line == PYTHON_SPACE_RULE else line for line in lines)


def _remember(key: str, message: str, param: str) -> InvalidRequest:
    error = InvalidRequest(message, param=param)
    _schemas.put(key, error)
    return error


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def grammar_checked(text: str) -> None:
    """Raise `InvalidRequest` for a raw ``grammar`` beyond edged's bounds (cached by its hash)."""
    key = "grammar:" + hashlib.sha256(text.encode(errors="surrogatepass")).hexdigest()
    cached = _schemas.get(key)
    if isinstance(cached, InvalidRequest):
        raise cached
    if cached is None:
        try:
            bounds.check_grammar(text, "grammar")
        except InvalidRequest as exc:
            raise _remember(key, exc.message, "grammar") from None
        _schemas.put(key, "")


def constraint_of(response_format: Any, grammar: str | None, after_think: bool) -> Constraint | None:
    """The job's constraint, or None; raises `InvalidRequest` for one that is invalid or beyond
    edged's bounds. Needs no model and is safe from any thread. ``after_think``: the output starts
    inside a ``<think>`` block, so the grammar applies only once the block is closed."""
    if grammar is not None:
        grammar_checked(grammar)
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
    except RecursionError:  # "[[[[..." a thousand deep fits in the context
        raise InvalidOutput("the answer nests deeper than edged parses", content=content) from None
    from jsonschema import validators

    validator = _counted(validators.validator_for(constraint.schema))(constraint.schema)
    _steps.left = VALIDATION_STEPS
    try:
        error = next(iter(validator.iter_errors(value)), None)
    except (_OverBudget, RecursionError):
        raise InvalidOutput(
            f"the answer could not be validated within {VALIDATION_STEPS} steps of the schema",
            content=content,
        ) from None
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(the whole answer)"
        raise InvalidOutput(
            f"the answer does not match the schema at {where}: {error.message}", content=content
        )
    return value


class _OverBudget(Exception):
    pass


class _Steps(threading.local):
    left = 0


_steps = _Steps()


@functools.lru_cache(maxsize=8)
def _counted(cls: Any) -> Any:
    """``cls`` with every keyword counted against `_steps` (per thread)."""
    from jsonschema import validators

    def counted(keyword: Any) -> Any:
        def run(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
            _steps.left -= 1
            if _steps.left < 0:
                raise _OverBudget
            return keyword(validator, value, instance, schema)

        return run

    return validators.extend(cls, {name: counted(fn) for name, fn in cls.VALIDATORS.items()})
