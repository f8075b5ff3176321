"""Bounded constraints: a job's JSON schema or raw grammar can no longer make llama.cpp crash, hang or
eat the memory (issue 22, part 1).

Three layers, all real: the checker itself (`edged.engine.constraints.constraint_of`, no model), the
native llama.cpp grammar parser in a child process on the embedded model's vocabulary (every grammar
the checker lets through survives it on the main thread, a worker thread and a 2 MiB thread, while
the grammars it refuses really do crash or hang it), and the daemon over its Unix socket (each bomb
answered 400 through OpenAI's ``response_format``, Ollama's ``format`` and ``grammar``, by the same
process, which then still answers).
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, chat, clean_env
from llama_cpp.llama_grammar import json_schema_to_gbnf

from edged.engine import bounds
from edged.engine.constraints import (
    CACHE_BYTES,
    Constraint,
    _Lru,
    check_answer,
    constraint_of,
    with_llama_spaces,
)
from edged.engine.gbnf import GbnfError, measure
from edged.engine.job import ResponseFormat
from edged.errors import InvalidOutput, InvalidRequest

SCHEMA_PARAM = "response_format.json_schema.schema"
QUICK_S = 0.5
"""A refusal is a walk of the schema or grammar: well under this, whatever the bound."""


def nested(keyword: str, depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"not": schema} if keyword == "not" else {"type": "object", "properties": {"a": schema}}
    return schema


def doubling_pattern(levels: int) -> str:
    """``((((a?){2}){2})...){2}``: llama-cpp-python's converter makes a rule that uses the previous
    one twice, each able to match nothing: 2^levels pushdown stacks."""
    return "^" + "(" * levels + "a?" + "){2}" * levels + "$"


def ref_bomb(fan: int, depth: int) -> dict[str, Any]:
    """``allOf`` of ``fan`` references to ``allOf`` of ``fan`` references ...: fan^depth subschemas."""
    defs = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * fan} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "object"}
    return {"$defs": defs, "allOf": [{"$ref": "#/$defs/d0"}]}


REFUSED_SCHEMAS: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, schema, the field named, the limit named)
    ("minLength 1e5", {"type": "string", "minLength": 100000}, f"{SCHEMA_PARAM}.minLength", "2048"),
    ("minLength 1e7", {"type": "string", "minLength": 10**7}, f"{SCHEMA_PARAM}.minLength", "2048"),
    (
        "minItems 1e5",
        {"type": "array", "items": {"type": "integer"}, "minItems": 100000},
        f"{SCHEMA_PARAM}.minItems",
        "2048",
    ),
    (
        "minItems 1e7 in a property",
        {"type": "object", "properties": {"name": {"type": "array", "items": {}, "minItems": 10**7}}},
        f"{SCHEMA_PARAM}.properties.name.minItems",
        "2048",
    ),
    (
        "minLength 1e5 in a property",
        {"type": "object", "properties": {"name": {"type": "string", "minLength": 100000}}},
        f"{SCHEMA_PARAM}.properties.name.minLength",
        "2048",
    ),
    ("pattern {100000}", {"type": "string", "pattern": "^a{100000}$"}, f"{SCHEMA_PARAM}.pattern", "2048"),
    (
        "pattern {100000,}",
        {"type": "string", "pattern": "^(ab){100000,}$"},
        f"{SCHEMA_PARAM}.pattern",
        "2048",
    ),
    ("150 nots", nested("not", 150), f"{SCHEMA_PARAM}.not.not", "32 levels"),
    (
        "100 properties deep",
        nested("properties", 100),
        f"{SCHEMA_PARAM}.properties.a.properties.a",
        "32 levels",
    ),
    (
        "doubling pattern",
        {"type": "string", "pattern": doubling_pattern(18)},
        f"{SCHEMA_PARAM}.pattern",
        "4096",
    ),
    (
        "nested quantifiers",
        {"type": "string", "pattern": "^(a{0,1000}){0,1000}$"},
        f"{SCHEMA_PARAM}.pattern",
        "4096",
    ),
    ("(a?){0,1000}", {"type": "string", "pattern": "^(a?){0,1000}$"}, f"{SCHEMA_PARAM}.pattern", "4096"),
    (
        "doubling pattern, 12 levels",
        {"type": "string", "pattern": doubling_pattern(12)},
        SCHEMA_PARAM,
        "4096",
    ),
    ("allOf reference bomb", ref_bomb(8, 7), SCHEMA_PARAM, "16384"),
    (
        "pattern groups 100 deep",
        {"type": "string", "pattern": "^" + "(" * 100 + "a" + ")" * 100 + "$"},
        f"{SCHEMA_PARAM}.pattern",
        "32",
    ),
    (
        "257 properties",
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(257)}},
        f"{SCHEMA_PARAM}.properties",
        "256",
    ),
    (
        "property names that collide",
        {"type": "object", "properties": {"a" + "!@#$%^&*()"[i]: {"type": "integer"} for i in range(10)}},
        f"{SCHEMA_PARAM}.properties",
        "8",
    ),
    ("remote $ref", {"$ref": "https://example.com/schema.json"}, f"{SCHEMA_PARAM}.$ref", "'#/...'"),
    (
        "$ref into a const",
        {"const": {"type": "string", "maxLength": 100000}, "allOf": [{"$ref": "#/const"}]},
        f"{SCHEMA_PARAM}.allOf[0].$ref",
        "subschema",
    ),
]

CLAMPED_SCHEMAS: list[tuple[str, dict[str, Any], dict[str, Any], Any]] = [
    # (id, schema, what the converter is given instead: the same answers and more, one of the more)
    ("maxLength 1e5", {"type": "string", "maxLength": 100000}, {"type": "string"}, "x" * 100_001),
    ("maxLength 1e7", {"type": "string", "maxLength": 10**7}, {"type": "string"}, None),
    (
        "maxLength 1011 over minLength 10",
        {"type": "string", "minLength": 10, "maxLength": 1011},
        {"type": "string", "minLength": 10},
        "x" * 1012,
    ),
    (
        "maxItems 1e5",
        {"type": "array", "items": {"type": "integer"}, "maxItems": 100000},
        {"type": "array", "items": {"type": "integer"}},
        [0] * 100_001,
    ),
    (
        "maxItems 1e7",
        {"type": "array", "items": {"type": "integer"}, "maxItems": 10**7},
        {"type": "array", "items": {"type": "integer"}},
        None,
    ),
    (
        "pattern {0,100000}",
        {"type": "string", "pattern": "^a{0,100000}$"},
        {"type": "string", "pattern": "^a{0,}$"},
        "a" * 100_001,
    ),
    (
        "pattern {3,1004} after a class",
        {"type": "string", "pattern": "^[{}]x{3,1004}$"},
        {"type": "string", "pattern": "^[{}]x{3,}$"},
        "{" + "x" * 1005,
    ),
]

SPELLED_OUT_SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    # (id, schema) converted as the converter writes them: at the caps, and what is not expanded
    ("nested quantifiers", {"type": "string", "pattern": "^(a{0,16}){0,16}$"}),
    ("maxLength 1000", {"type": "string", "maxLength": 1000}),
    ("minItems 2048", {"type": "array", "items": {"type": "integer"}, "minItems": 2048}),
    (
        "32 groups around {0,1000}",
        {"type": "string", "pattern": "^" + "(" * 32 + "a{0,1000}" + ")" * 32 + "$"},
    ),
    ("(a?){0,40}", {"type": "string", "pattern": "^(a?){0,40}$"}),
    ("enum of 4000", {"enum": [f"value-{i}" for i in range(4000)]}),
    ("huge integer range", {"type": "integer", "minimum": -(10**300), "maximum": 10**300}),
    ("16 levels of properties", nested("properties", 15)),
    (
        "tree by $ref",
        {
            "type": "object",
            "properties": {"tree": {"$ref": "#/$defs/n"}},
            "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 3}},
        },
    ),
]

MODERATE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 50},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 5},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3,5}$"},
        "when": {"type": "string", "format": "date"},
        "level": {"enum": ["low", "high"]},
    },
    "required": ["name", "tags"],
}


def deep_grammar(depth: int) -> str:
    return "root ::= " + "(" * depth + '"a"' + ")" * depth


def doubling_grammar(levels: int) -> str:
    return (
        'root ::= r0 "x"\n'
        + "".join(f"r{i} ::= (r{i + 1} r{i + 1})?\n" for i in range(levels))
        + (f'r{levels} ::= "a"?\n')
    )


REFUSED_GRAMMARS: list[tuple[str, str, str]] = [
    # (id, grammar, the limit or reason named)
    ("100,000 nested groups", deep_grammar(100_000), "1100"),
    ("parentheses inside literals and classes do not count, these do", deep_grammar(1101), "1100"),
    ("{5,2}", 'root ::= "a"{5,2}', "maximum below its minimum"),
    ("hidden left recursion", 'root ::= a\na ::= b a "x" | "y"\nb ::= c\nc ::= "" | "z"', "left recursion"),
    ("doubling", doubling_grammar(16), "4096"),
    (
        "doubling 6: 64 stacks after one character",
        doubling_grammar(6),
        "more than 48 after a single character",
    ),
    ("(a?){0,200}", 'root ::= ("a"?){0,200} "b"', "more than 48 after a single character"),
    ("a long literal repeated", 'root ::= "' + "x" * 60_000 + '"{0,2000}', "elements"),
    (
        "a chain of empty-able rules",
        "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "a" | ""\n' for i in range(2000)) + 'r2000 ::= "a"\n',
        "262144",
    ),
    ("a lone surrogate", 'root ::= "\ud800"', "Unicode"),
]

ACCEPTED_GRAMMARS: list[tuple[str, str]] = [
    ("1100 nested groups", deep_grammar(1100)),
    (
        "parentheses in literals, classes and comments",
        'root ::= ( "((((((" [(((] # (((((((\n  | "\\"(((" ")))" )',
    ),
    ("2000 repetitions", 'root ::= "ab"{0,2000} [0-9]{2000}'),
    ("doubling 5", doubling_grammar(5)),
    ("the README's example", 'root ::= ("yes" | "no") " because " [a-z ]{1,30} "."'),
    ("a tail recursion through rules that can match nothing", 'root ::= ("a"?)* "b"'),
]


def paren_depth(gbnf: str) -> int:
    """The deepest ``(`` nesting outside literals, classes and comments (written independently of
    `edged.engine.gbnf`)."""
    depth = most = 0
    i = 0
    while i < len(gbnf):
        c = gbnf[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            i += 1
            while i < len(gbnf) and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "#":
            while i < len(gbnf) and gbnf[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            most = max(most, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return most


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def response_format(schema: dict[str, Any]) -> ResponseFormat:
    return ResponseFormat.model_validate(json_schema_format(schema))


def refused(call: Any) -> InvalidRequest:
    start = time.monotonic()
    with pytest.raises(InvalidRequest) as caught:
        call()
    assert time.monotonic() - start < QUICK_S
    return caught.value


# -- the checker -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "field", "limit"), [c[1:] for c in REFUSED_SCHEMAS], ids=[c[0] for c in REFUSED_SCHEMAS]
)
def test_a_schema_beyond_the_bounds_is_refused_quickly_naming_the_field(
    schema: dict[str, Any], field: str, limit: str
) -> None:
    error = refused(lambda: constraint_of(response_format(schema), None, after_think=False))
    assert error.code == "invalid_request"
    assert field in error.message and field in (error.param or ""), error.message
    assert limit in error.message, error.message


@pytest.mark.parametrize(
    ("schema", "instead", "too_long"), [c[1:] for c in CLAMPED_SCHEMAS], ids=[c[0] for c in CLAMPED_SCHEMAS]
)
def test_a_maximum_the_grammar_does_not_spell_out_is_checked_on_the_answer(
    schema: dict[str, Any], instead: dict[str, Any], too_long: Any
) -> None:
    start = time.monotonic()
    constraint = constraint_of(response_format(schema), None, after_think=False)
    assert time.monotonic() - start < QUICK_S
    assert constraint is not None
    assert constraint.grammar.text == with_llama_spaces(json_schema_to_gbnf(json.dumps(instead)))
    assert len(constraint.grammar.text.encode()) <= bounds.MAX_GBNF_BYTES
    assert paren_depth(constraint.grammar.text) <= bounds.MAX_GBNF_NESTING
    assert constraint.schema == schema  # the answer is checked against the bound as sent
    if too_long is not None:
        with pytest.raises(InvalidOutput, match="does not match the schema"):
            check_answer(constraint, json.dumps(too_long))


@pytest.mark.parametrize(
    "schema", [c[1] for c in SPELLED_OUT_SCHEMAS], ids=[c[0] for c in SPELLED_OUT_SCHEMAS]
)
def test_a_schema_within_the_bounds_converts_as_llama_cpp_writes_it(schema: dict[str, Any]) -> None:
    constraint = constraint_of(response_format(schema), None, after_think=False)
    assert constraint is not None
    assert constraint.grammar.text == with_llama_spaces(json_schema_to_gbnf(json.dumps(schema)))
    assert len(constraint.grammar.text.encode()) <= bounds.MAX_GBNF_BYTES
    assert paren_depth(constraint.grammar.text) <= bounds.MAX_GBNF_NESTING


def test_a_moderate_schema_converts_exactly_as_before() -> None:
    constraint = constraint_of(response_format(MODERATE), None, after_think=False)
    assert constraint is not None and constraint.kind == "json_schema"
    assert constraint.grammar.text == with_llama_spaces(json_schema_to_gbnf(json.dumps(MODERATE)))
    assert constraint.schema == MODERATE


def test_a_bound_that_is_a_property_name_or_a_constant_is_not_a_bound() -> None:
    schema = {
        "type": "object",
        "properties": {"minLength": {"type": "integer"}, "maxItems": {"const": {"minItems": 10**9}}},
    }
    constraint = constraint_of(response_format(schema), None, after_think=False)
    assert constraint is not None
    assert constraint.grammar.text == with_llama_spaces(json_schema_to_gbnf(json.dumps(schema)))


@pytest.mark.parametrize(
    ("grammar", "says"), [c[1:] for c in REFUSED_GRAMMARS], ids=[c[0] for c in REFUSED_GRAMMARS]
)
def test_a_raw_grammar_beyond_the_bounds_is_refused_quickly(grammar: str, says: str) -> None:
    error = refused(lambda: constraint_of(None, grammar, after_think=False))
    assert error.param == "grammar"
    assert error.message.startswith("grammar: ")
    assert says in error.message, error.message


@pytest.mark.parametrize("grammar", [c[1] for c in ACCEPTED_GRAMMARS], ids=[c[0] for c in ACCEPTED_GRAMMARS])
def test_a_raw_grammar_within_the_bounds_is_kept_as_written(grammar: str) -> None:
    constraint = constraint_of(None, grammar, after_think=True)
    assert constraint is not None
    assert constraint.grammar.text == grammar and constraint.grammar.after_think


def test_a_deep_schema_is_refused_on_a_worker_thread_too() -> None:
    """edged converts on asyncio.to_thread's workers and the MQTT transport on its own: the depth
    check is iterative, so no thread's recursion limit or stack matters."""
    errors: list[BaseException] = []

    def convert() -> None:
        for schema in (nested("not", 150), nested("properties", 100), nested("not", 5000)):
            try:
                constraint_of(response_format(schema), None, after_think=False)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert len(errors) == 12
    assert all(isinstance(e, InvalidRequest) and "32 levels" in e.message for e in errors), errors


def test_the_schema_cache_is_bounded_by_bytes() -> None:
    cache = _Lru(256, 1000)
    for i in range(20):
        cache.put(f"k{i}", "x" * 300)
    assert cache.bytes <= 1000 and len(cache) == 3
    assert cache.get("k19") is not None and cache.get("k0") is None
    cache.put("big", "y" * 5000)  # alone above the budget: not kept
    assert cache.bytes <= 1000 and cache.get("big") is None
    assert CACHE_BYTES >= 16 * bounds.MAX_GBNF_BYTES


def test_an_answer_nested_deeper_than_python_parses_is_invalid_output() -> None:
    constraint = Constraint(
        "json_object", constraint_of(None, 'root ::= "a"', False).grammar, {"type": "object"}
    )  # type: ignore[union-attr]
    with pytest.raises(InvalidOutput, match="nests deeper"):
        check_answer(constraint, "[" * 100_000 + "]" * 100_000)


def test_validating_an_answer_is_bounded_whatever_the_schema() -> None:
    """The scheduler thread validates every answer: 8^7 subschemas took jsonschema 50 s there."""
    constraint = Constraint("json_schema", constraint_of(None, 'root ::= "a"', False).grammar, ref_bomb(8, 7))  # type: ignore[union-attr]
    start = time.process_time()  # CPU seconds: a loaded machine stretches wall time, not these
    with pytest.raises(InvalidOutput, match="steps of the schema"):
        check_answer(constraint, "{}")
    assert time.process_time() - start < 5


@pytest.mark.parametrize("grammar", ["", "   \n# a comment only\n", 'start ::= ("a"?){0,20} "b"'])
def test_a_grammar_without_rules_or_root_is_left_to_llama_cpps_refusal(grammar: str) -> None:
    """Found by the schemathesis fuzzing: ``grammar: ""`` raised IndexError in the stack measure (a
    500); it is measured (nothing to measure) and refused by name before the sampler is made."""
    cost = measure(grammar, bounds.GRAMMAR_LIMITS)
    assert cost.fanout >= 1


def test_the_measure_of_a_grammar_stops_at_the_nesting_cap() -> None:
    """A million levels cost what the cap does: the parse stops there."""
    start = time.monotonic()
    with pytest.raises(GbnfError, match="nests parentheses"):
        measure(deep_grammar(1_000_000), bounds.GRAMMAR_LIMITS)
    assert time.monotonic() - start < QUICK_S
    cost = measure(deep_grammar(1100), bounds.GRAMMAR_LIMITS)
    assert cost.nesting == 1100


# -- llama.cpp's own parser, in a child process ------------------------------------------------------

CHILD = r"""
import ctypes, json, math, sys, threading
from pathlib import Path
import llama_cpp
from edged.backends.gguf_prompt import load_model

spec = json.loads(Path(sys.argv[1]).read_text())
vocab = llama_cpp.llama_model_get_vocab(load_model(Path(spec["model"]), vocab_only=True))
print("loaded", flush=True)
n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
pristine = (llama_cpp.llama_token_data * n_vocab)(*[(i, 0.0, 0.0) for i in range(n_vocab)])
STACK = {"main": None, "thread": 0, "thread-2m": 2 << 20}

def exercise(text):
    # create the grammar sampler, then three times: filter the whole vocabulary, accept a token it allows
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
    if not sampler:
        return "refused"
    data = (llama_cpp.llama_token_data * n_vocab)()
    for _ in range(3):
        ctypes.memmove(data, pristine, ctypes.sizeof(data))
        candidates = llama_cpp.llama_token_data_array(data=data, size=n_vocab, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        allowed = [data[i].id for i in range(candidates.size) if data[i].logit != -math.inf]
        allowed = [t for t in allowed if not llama_cpp.llama_vocab_is_eog(vocab, t)]
        if not allowed:
            break
        llama_cpp.llama_sampler_accept(sampler, allowed[0])
    llama_cpp.llama_sampler_free(sampler)
    return "ok"

def run(where, text):
    if STACK[where] is None:
        return exercise(text)
    out = []
    threading.stack_size(STACK[where])
    worker = threading.Thread(target=lambda: out.append(exercise(text)))
    worker.start()
    worker.join()
    threading.stack_size(0)
    return out[0] if out else "no result"

for i, text in enumerate(spec["grammars"]):
    for where in spec["where"]:
        print(json.dumps({"i": i, "where": where, "result": run(where, text)}), flush=True)
"""


def run_native(
    tmp_path: Path,
    model_path: Path,
    grammars: list[str],
    where: list[str],
    *,
    timeout: float,
    memory: int | None = None,
) -> subprocess.CompletedProcess[str]:
    spec = tmp_path / f"spec-{len(list(tmp_path.iterdir()))}.json"
    spec.write_text(json.dumps({"model": str(model_path), "grammars": grammars, "where": where}))

    def limit_memory() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(
        [sys.executable, "-c", CHILD, str(spec)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit_memory,
    )


def let_through() -> list[tuple[str, str]]:
    """Every grammar the checker hands llama.cpp for the bombs, and at each cap."""
    out = []
    for name, schema, *_ in CLAMPED_SCHEMAS:
        out.append((name, constraint_of(response_format(schema), None, False).grammar.text))  # type: ignore[union-attr]
    for name, schema in SPELLED_OUT_SCHEMAS:
        out.append((name, constraint_of(response_format(schema), None, False).grammar.text))  # type: ignore[union-attr]
    for name, grammar in ACCEPTED_GRAMMARS:
        out.append((name, constraint_of(None, grammar, False).grammar.text))  # type: ignore[union-attr]
    return out


@pytest.mark.timeout(300)
def test_llama_cpp_takes_every_grammar_the_checker_lets_through(tmp_path: Path, model_path: Path) -> None:
    grammars = let_through()
    where = ["main", "thread", "thread-2m"]
    done = run_native(tmp_path, model_path, [g for _, g in grammars], where, timeout=240)
    assert done.returncode == 0, f"the child died ({done.returncode}):\n{done.stderr[-3000:]}"
    results = [json.loads(line) for line in done.stdout.splitlines()[1:]]
    assert len(results) == len(grammars) * len(where)
    failed = [(grammars[r["i"]][0], r["where"], r["result"]) for r in results if r["result"] != "ok"]
    assert not failed, failed


@pytest.mark.timeout(120)
def test_the_grammars_the_checker_refuses_really_crash_llama_cpp(tmp_path: Path, model_path: Path) -> None:
    """Without the checker: SIGSEGV in the parser (100,000 groups, and 6,000 on a 2 MiB thread),
    all the memory there is (``{5,2}``, the hidden left recursion), and no end in sight for the
    doubling grammar. Each in its own child."""
    deep = run_native(tmp_path, model_path, [deep_grammar(100_000)], ["thread"], timeout=60)
    assert deep.returncode == -signal.SIGSEGV, (deep.returncode, deep.stdout, deep.stderr[-2000:])
    small_stack = run_native(tmp_path, model_path, [deep_grammar(6000)], ["thread-2m"], timeout=60)
    assert small_stack.returncode == -signal.SIGSEGV, (small_stack.returncode, small_stack.stderr[-2000:])
    for grammar in ('root ::= "a"{5,2}', 'root ::= a\na ::= b a "x" | "y"\nb ::= c\nc ::= "" | "z"'):
        out_of_memory = run_native(tmp_path, model_path, [grammar], ["thread"], timeout=60, memory=2 << 30)
        # llama.cpp builds until the 2 GiB allowed here are gone: it aborts, or (when the allocation
        # that fails is one its grammar parser catches) the sampler is refused - out of memory either way
        results = [json.loads(line) for line in out_of_memory.stdout.splitlines() if line.startswith('{"i"')]
        died = out_of_memory.returncode != 0 and not results  # (ggml's abort prints gdb's backtrace)
        refused = out_of_memory.returncode == 0 and [r["result"] for r in results] == ["refused"]
        lines = out_of_memory.stdout.splitlines()[:3]
        assert died or refused, (grammar, out_of_memory.returncode, lines)
        assert "alloc" in out_of_memory.stderr, (grammar, out_of_memory.stderr[-2000:])
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        run_native(tmp_path, model_path, [doubling_grammar(20)], ["thread"], timeout=10)
    assert b"loaded" in (hung.value.stdout or b"")


# -- the daemon, over its socket -----------------------------------------------------------------------

DAEMON_BOMBS: list[tuple[str, dict[str, Any], str]] = [
    ("maxLength 1e5", {"type": "string", "maxLength": 100000}, "clamped"),
    ("maxLength 1e7", {"type": "string", "maxLength": 10**7}, "clamped"),
    ("maxItems 1e5", {"type": "array", "items": {"type": "integer"}, "maxItems": 100000}, "clamped"),
    ("pattern {0,100000}", {"type": "string", "pattern": "^a{0,100000}$"}, "clamped"),
    ("nested quantifiers", {"type": "string", "pattern": "^(a{0,1000}){0,1000}$"}, f"{SCHEMA_PARAM}.pattern"),
    ("minLength 1e5", {"type": "string", "minLength": 100000}, f"{SCHEMA_PARAM}.minLength"),
    (
        "minItems 1e5",
        {"type": "array", "items": {"type": "integer"}, "minItems": 100000},
        f"{SCHEMA_PARAM}.minItems",
    ),
    ("pattern {100000}", {"type": "string", "pattern": "^a{100000}$"}, f"{SCHEMA_PARAM}.pattern"),
    ("150 nots", nested("not", 150), f"{SCHEMA_PARAM}.not.not.not"),
    # (deeper than this, the request's JSON is refused first: "malformed JSON: recursion limit")
    ("40 properties deep", nested("properties", 40), f"{SCHEMA_PARAM}.properties.a.properties.a"),
    ("doubling pattern", {"type": "string", "pattern": doubling_pattern(18)}, f"{SCHEMA_PARAM}.pattern"),
    ("allOf reference bomb", ref_bomb(8, 7), "16384"),
]


def pid(c: httpx.Client) -> int:
    return int(c.get("/status").json()["pid"])


def assert_refused(r: httpx.Response, says: str, *, ollama: bool) -> None:
    assert r.status_code == 400, r.text
    if ollama:
        assert says in r.json()["error"], r.text
    else:
        error = r.json()["error"]
        assert error["code"] == "invalid_request"
        assert says in error["message"], error


def test_every_bomb_is_answered_and_the_daemon_keeps_serving(daemon: Daemon) -> None:
    """Each bomb through OpenAI's response_format and Ollama's format: a refusal (400 naming the
    field) or, for a maximum no context holds, an answer; raw grammars: 400 naming ``grammar``.
    The same process answers a normal prompt afterwards."""
    with daemon.client(timeout=120) as c:
        before = pid(c)
        model = c.get("/v1/models").json()["data"][0]["id"]
        for name, schema, says in DAEMON_BOMBS:
            openai = c.post(
                "/v1/chat/completions",
                json=chat("Say hi.", max_tokens=4, response_format=json_schema_format(schema)),
            )
            ollama = c.post(
                "/api/chat",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "Say hi."}],
                    "format": schema,
                    "stream": False,
                    "options": {"num_predict": 4},
                },
            )
            if says == "clamped":  # answered (cut by max_tokens 4: invalid_output), not refused
                assert openai.status_code in (200, 422), (name, openai.text)
                assert ollama.status_code in (200, 422), (name, ollama.text)
            else:
                assert_refused(openai, says, ollama=False)
                assert_refused(ollama, says, ollama=True)
        for name, grammar, says in REFUSED_GRAMMARS:
            if len(grammar) > 65536:  # the job schema's own limit
                grammar = deep_grammar(30_000)
            r = c.post("/v1/chat/completions", content=json.dumps(chat("hi", max_tokens=2, grammar=grammar)))
            assert r.status_code == 400, (name, r.text)
            if says == "Unicode":  # the request's JSON parser refuses a lone surrogate escape first
                continue
            assert r.json()["error"]["param"] == "grammar", (name, r.text)
            assert says in r.json()["error"]["message"], (name, r.text)
        ok = c.post("/v1/chat/completions", json=chat("Say hi.", max_tokens=4))
        assert ok.status_code == 200, ok.text
        assert pid(c) == before, "the daemon restarted"
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_the_grammar_sampler_cache_is_bounded(model_path: Path) -> None:
    import llama_cpp

    from edged.backends import Grammar
    from edged.backends.gguf_prompt import GRAMMARS_REMEMBERED, GgufTokenizer, load_model

    model = load_model(model_path, vocab_only=True)
    try:
        tokenizer = GgufTokenizer(model)
        for i in range(GRAMMARS_REMEMBERED + 50):
            assert tokenizer.grammar_problem(Grammar(f'root ::= "{i}"')) is None
        assert len(tokenizer._grammars_ok) == GRAMMARS_REMEMBERED
    finally:
        llama_cpp.llama_model_free(model)
