"""Bounds on what a job's ``response_format`` or ``grammar`` may make llama.cpp build.

llama-cpp-python's JSON-schema converter spells every bound out: ``maxLength: n`` becomes n nested
optional groups, ``minItems: n`` n copies of the item, ``{m,n}`` in a ``pattern`` the same. A 40-byte
schema (``maxLength: 100000``) gave a 100,000-deep grammar that overflowed the stack of llama.cpp's
recursive parser: SIGSEGV of the daemon. jsonschema and the converter recurse once per level of the
schema (a schema 150 ``not``s deep: RecursionError). `check_schema` walks a schema iteratively before
either sees it; `check_grammar` measures a GBNF grammar (a raw ``grammar``, or the converter's output)
before llama.cpp parses it (`edged.engine.gbnf`). Neither needs a model: the MQTT transport refuses a
bad constraint before it journals the job.

A bound above what edged spells out is handled one of two ways, and the answer is always validated
against the schema as the client sent it (`edged.engine.constraints.check_answer`):

- a *maximum* whose optional part (``maxLength - minLength``, ``maxItems - minItems``, ``n - m`` of
  ``{m,n}``) is above `MAX_OPTIONAL_REPEAT` is left out of the grammar (clamped to "no maximum").
  That loses no valid answer: the grammar admits every string or array the schema does, and more.
  Above ~2,000 units it is what a 2048-token context holds anyway; between `MAX_OPTIONAL_REPEAT` and
  that, an answer that runs past the maximum is answered ``invalid_output`` instead of being stopped
  by the grammar. llama.cpp's own GBNF does the same above 2,000 (``x{0,5000}`` is ``x*``);
- a *minimum* above `MAX_REQUIRED_REPEAT` is refused (``invalid_request`` naming the field and the
  limit): an answer must fit a 2048-token context with its prompt, and llama.cpp's own GBNF refuses
  ``x{2001,}``.

``minimum``/``maximum`` (and the other numeric keywords) are not expanded by the pinned converter
(llama-cpp-python 0.3.36 writes any integer as ``integer``), so they are not bounded here.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from edged.config import CTX_CAP
from edged.engine.gbnf import GbnfError, Limits, measure
from edged.errors import InvalidRequest

# -- the schema -------------------------------------------------------------------------------------

MAX_SCHEMA_DEPTH = 32
"""Levels of JSON nesting (objects and arrays) in a schema: 16 levels of nested ``properties`` (each
costs two: the map and the property's schema). jsonschema's ``check_schema`` raised RecursionError at
124 levels on a fresh thread; OpenAI's structured outputs allow 10 levels of object nesting."""

MAX_SCHEMA_NODES = 4096
"""Values (objects, arrays, scalars) in a schema document."""

MAX_EXPANDED_NODES = 16384
"""Subschemas with every ``$ref`` followed, as often as it is used: the converter follows ``allOf``
references without memoising, so 8 references to 8 references to ... (1.5 KB) made it, and
jsonschema's validation of the answer, visit 2 million subschemas (50 s on the scheduler thread)."""

MAX_PROPERTIES = 256
"""``properties`` of one object: the converter's optional-property rules cost it the square of their
number (900: 3 s) and one Python frame each (about 990: RecursionError)."""

MAX_REQUIRED_REPEAT = CTX_CAP
"""The largest minimum (``minLength``, ``minItems``, ``minProperties``, ``minContains``, ``m`` of
``{m}``/``{m,}``/``{m,n}`` in a ``pattern``) a job may ask for: one unit per token of the largest
context, prompt not even counted. Spelled out flat by the converter (no nesting), so only its size
matters (`MAX_CONVERSION_BYTES`)."""

MAX_OPTIONAL_REPEAT = 1000
"""The largest optional part of a repetition the grammar spells out; above, the maximum is left out
of the grammar. The converter nests one group per optional unit, so this is the grammar's nesting."""

MAX_SAME_RULE_NAME = 8
"""Properties whose rule names collide: the converter names a property's rules after its path with
every run of characters other than letters, digits and ``-`` made one ``-``, and numbers colliding
names by trying each suffix in turn, for every optional-property rule: 256 names differing only in
punctuation took it 2 s."""

MAX_PATTERN_NESTING = 32
"""Parenthesised groups nested in one ``pattern`` (the converter recurses once per group, and each
adds a level to the grammar's nesting on top of `MAX_OPTIONAL_REPEAT`)."""

MAX_PATTERN_STATES = 4096
"""A ``pattern``'s positions times its fanout. Positions: each quantifier's copies, a repeated
group's times those inside it (``^(a{0,1000}){0,1000}$``: a million). Fanout: how many stacks one
step can spread to through atoms that can match nothing (``^(a?){0,1000}$``: a thousand). As the
converter writes such a pattern, llama.cpp's grammar keeps a stack for every way to split the text
between the copies, and one step costs the stacks times the fanout times the stacks again (its
de-duplication): neither of those two finished three steps in 8 minutes, ``^(a{0,60}){0,60}$``
(216,000) took 0.3 s a step. ``^[A-Z]{2}-[0-9]{3,5}$`` costs 21."""

MAX_CONVERSION_BYTES = 2 << 20
"""The most grammar text the converter may build for a schema, estimated before it runs: each
subschema as often as it may be visited, each spelled-out unit with its rule name."""

# -- the grammar ------------------------------------------------------------------------------------

MAX_GBNF_BYTES = 256 << 10
"""A grammar's size in bytes (a raw ``grammar`` is also limited to 64 KiB by the job schema). 32
strings of ``maxLength: 1000`` come to 256 KiB, more than a 2048-token answer can fill; measuring a
grammar of that size takes `edged.engine.gbnf` about 0.6 s (x86_64)."""

MAX_GBNF_NESTING = 1100
"""Nesting of parentheses in a grammar: llama.cpp's parser recurses once per level. Measured on
x86_64 (2 cores), llama-cpp-python 0.3.36, in a child process: it crashed at 18,700 levels on an
8 MiB stack (the main thread's, and a Python thread's by default) and at 4,700 on a 2 MiB one
(glibc's thread stack when ``ulimit -s`` is unlimited). `MAX_OPTIONAL_REPEAT` +
`MAX_PATTERN_NESTING` + the converter's own groups fit under it."""

MAX_RULE_CHAIN = 4096
"""Rules that start rules, chained (``r0 ::= r1 "a"``, ``r1 ::= r2 "a"``, ...): llama.cpp's
left-recursion check recurses along them (it crashed between 16,000 and 24,000 on a 2 MiB stack) and
its first stacks copy the chain at every step (8,000: 0.7 s)."""

MAX_GBNF_ELEMENTS = 1 << 20
"""llama.cpp grammar elements (8 bytes each, copied twice at sampler creation) after it synthesises
rules for groups and repetitions."""

MAX_GRAMMAR_STACKS = 4096
"""Distinct pushdown stacks llama.cpp may make from one grammar position. Its de-duplication compares
each new stack with all the others, so the time per accepted character grows with their square:
4,000 (an ``enum`` of 4,000 strings) took 23 ms, 16,384 (the doubling pattern) 0.6 s, 65,536 7 s
(x86_64). ``pattern: ^(a?){0,1000}$`` needs 1,001; OpenAI allows 1,000 enum values."""

MAX_GRAMMAR_FANOUT = 48
"""Stacks one pushdown stack may become after accepting one character (`edged.engine.gbnf._fanout`):
llama.cpp's vocabulary filter advances each candidate token character by character on all of them,
so its work grows with this number to the power of the token's length. Measured in a child process
(x86_64, SmolLM2's 49,152 tokens, three whole-vocabulary filters): 33 took 0.3 s, 65 2 s, 129
40 s; ``("a"?){0,40}`` (41) 0.6 s, ``("a"?){0,200}`` did not finish in a minute. The converter's
grammars for ordinary schemas stay well under it (JSON's optional spaces are 2 or 3)."""

MAX_GRAMMAR_WORK = 1 << 18
"""Stack frames llama.cpp may copy from one position, and calls of its left-recursion check from one
rule (it does not memoise): a chain of 3,000 rules that can be empty copied 4.5 million frames
(0.55 s)."""

MAX_GRAMMAR_CHECKS = 1 << 22
"""Calls of llama.cpp's left-recursion check in all (once from every rule no earlier call reached:
linear in the grammar, unless many rules share an expensive one)."""

GRAMMAR_LIMITS = Limits(
    nesting=MAX_GBNF_NESTING,
    chain=MAX_RULE_CHAIN,
    elements=MAX_GBNF_ELEMENTS,
    stacks=MAX_GRAMMAR_STACKS,
    fanout=MAX_GRAMMAR_FANOUT,
    work=MAX_GRAMMAR_WORK,
    checks=MAX_GRAMMAR_CHECKS,
)


@dataclass(frozen=True)
class Checked:
    """A schema that passed `check_schema`: what to hand the converter."""

    schema: dict[str, Any]
    """The schema the converter gets: the client's, or a copy with the maxima above
    `MAX_OPTIONAL_REPEAT` left out (`clamped` says which)."""
    clamped: tuple[str, ...]
    """Paths of the maxima left out of the grammar (for the log)."""


_MIN_MAX = (
    ("minLength", "maxLength", True),
    ("minItems", "maxItems", True),
    ("minProperties", "maxProperties", False),
    ("minContains", "maxContains", False),
)
"""Minimum, maximum, and whether the converter spells them out (the others only jsonschema reads)."""
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_SCHEMA_VALUES = frozenset(
    {
        *("additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames"),
        *("unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema"),
    }
)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_$-]{1,64}")
_RULE_CHARS = re.compile(r"[^a-zA-Z0-9-]+")
"""The converter's ``INVALID_RULE_CHARS_RE``."""


def _count(value: Any) -> int | None:
    """A JSON count (2 and 2.0; not true, 2.5 or "2": jsonschema refuses those itself)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _where(param: str, path: tuple[Any, ...]) -> str:
    out = param
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part[:40] + ('...' if len(part) > 40 else ''))}]"
    return out if len(out) <= 300 else out[:297] + "..."


@dataclass
class _Node:
    """A container of the schema document, for the expansion estimate."""

    children: list[int]
    ref: int | None = None
    units_bytes: int = 0


def check_schema(schema: dict[str, Any], param: str) -> Checked:
    """Walk a JSON schema (iteratively) and refuse what is too deep, too large, or bounded beyond the
    caps, with `InvalidRequest` naming the field and the limit; return what to convert."""
    nodes: list[_Node] = []
    positions: dict[tuple[Any, ...], int] = {}  # schema objects by path (dict keys only), for $ref
    refs: list[tuple[int, str, tuple[Any, ...]]] = []
    clamped: list[tuple[tuple[Any, ...], str | None, str]] = []  # (path, key to drop, new pattern)
    count = 0
    rule_names: dict[str, int] = {}
    todo: list[tuple[Any, tuple[Any, ...], int, bool, str, int | None]] = [(schema, (), 1, True, "", None)]
    while todo:
        value, path, depth, is_schema, rule_name, parent = todo.pop()
        count += 1
        if count > MAX_SCHEMA_NODES:
            raise InvalidRequest(
                f"{param} has more than {MAX_SCHEMA_NODES} values (the most edged converts)", param=param
            )
        if not isinstance(value, (dict, list)):
            if parent is not None and isinstance(value, str):
                nodes[parent].units_bytes += 16 + 2 * len(value)  # enum/const literals, names
            continue
        if depth > MAX_SCHEMA_DEPTH:
            where = _where(param, path)
            raise InvalidRequest(
                f"{where} is nested deeper than {MAX_SCHEMA_DEPTH} levels (objects and arrays), the "
                "most edged converts",
                param=where,
            )
        index = len(nodes)
        nodes.append(_Node([]))
        if parent is not None:
            nodes[parent].children.append(index)
        if isinstance(value, list):
            for i, item in enumerate(value):
                todo.append((item, (*path, i), depth + 1, is_schema, f"{rule_name}-{i}", index))
            continue
        if all(not isinstance(p, int) for p in path):  # the converter's $ref walks dicts only
            positions[path] = index if is_schema else -1
        ref = value.get("$ref")
        if isinstance(ref, str):  # the converter resolves a "$ref" wherever it is
            if not ref.startswith("#/"):
                where = _where(param, (*path, "$ref"))
                raise InvalidRequest(
                    f"{where}: only references inside the schema ('#/...') are supported, not {ref[:80]!r}",
                    param=where,
                )
            refs.append((index, ref, path))
        if is_schema:
            spelled = _check_keywords(value, path, param, len(rule_name) + 16, clamped)
            nodes[index].units_bytes += 64 + spelled
        for key, item in value.items():
            child_schema = is_schema and (key in _SCHEMA_VALUES or key in _SCHEMA_LISTS)
            if is_schema and key in _SCHEMA_MAPS and isinstance(item, dict):
                if key == "properties" and len(item) > MAX_PROPERTIES:
                    where = _where(param, (*path, key))
                    raise InvalidRequest(
                        f"{where} has {len(item)} properties, more than {MAX_PROPERTIES} (the most "
                        "edged converts in one object)",
                        param=where,
                    )
                count += 1
                map_index = len(nodes)
                nodes.append(_Node([]))
                nodes[index].children.append(map_index)
                map_path = (*path, key)
                positions[map_path] = -1
                for name, sub in item.items():
                    if key == "patternProperties":
                        _pattern_nesting(name, (*path, key, name), param)
                    sub_name = f"{rule_name}-{_RULE_CHARS.sub('-', name)}"
                    if key == "properties":
                        rule_names[sub_name] = rule_names.get(sub_name, 0) + 1
                        if rule_names[sub_name] > MAX_SAME_RULE_NAME:
                            where = _where(param, (*path, key, name))
                            raise InvalidRequest(
                                f"{where}: more than {MAX_SAME_RULE_NAME} properties whose names differ "
                                "only in characters other than letters, digits and '-' (llama.cpp's "
                                "converter names its grammar rules after them)",
                                param=where,
                            )
                    todo.append((sub, (*path, key, name), depth + 2, True, sub_name, map_index))
                continue
            todo.append((item, (*path, key), depth + 1, child_schema, f"{rule_name}-{key[:16]}", index))
    expanded_nodes, expanded_bytes = _expansion(nodes, positions, refs, param)
    if expanded_nodes > MAX_EXPANDED_NODES:
        raise InvalidRequest(
            f"{param} has more than {MAX_EXPANDED_NODES} subschemas once its $refs are followed "
            f"(about {expanded_nodes}), the most edged converts",
            param=param,
        )
    if expanded_bytes > MAX_CONVERSION_BYTES:
        raise InvalidRequest(
            f"{param}: its bounds would make a grammar of about {expanded_bytes >> 20} MiB, above the "
            f"{MAX_CONVERSION_BYTES >> 20} MiB edged builds; lower minLength/minItems/maxLength/maxItems "
            "or the repetitions of its patterns",
            param=param,
        )
    if not clamped:
        return Checked(schema, ())
    converted = copy.deepcopy(schema)  # depth is bounded above
    for path, drop, pattern in clamped:
        target: Any = converted
        for part in path:
            target = target[part]
        if drop is not None:
            target.pop(drop, None)
        else:
            target["pattern"] = pattern
    return Checked(converted, tuple(_where(param, (*p, d or "pattern")) for p, d, _ in clamped))


def _check_keywords(
    schema: dict[str, Any],
    path: tuple[Any, ...],
    param: str,
    name_len: int,
    clamped: list[tuple[tuple[Any, ...], str | None, str]],
) -> int:
    """Refuse a minimum above the cap, note a maximum to leave out; the estimated bytes of what the
    converter spells out for this subschema (a unit of an array or a pattern is a rule's name, about
    ``name_len`` long)."""
    spelled = 0
    for low_key, high_key, expanded in _MIN_MAX:
        low, high = _count(schema.get(low_key)), _count(schema.get(high_key))
        if low is not None and low > MAX_REQUIRED_REPEAT:
            where = _where(param, (*path, low_key))
            raise InvalidRequest(
                f"{where} is {low}, above {MAX_REQUIRED_REPEAT}, the largest minimum edged's grammar "
                "requires (an answer must fit a 2048-token context)",
                param=where,
            )
        if not expanded:
            continue
        units = low = max(low or 0, 0)
        if high is not None and high - low > MAX_OPTIONAL_REPEAT:
            clamped.append((path, high_key, ""))
        elif high is not None and high > low:
            units += high - low
        spelled += units * (8 if low_key == "minLength" else name_len)
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        new, units = _check_pattern(pattern, (*path, "pattern"), param)
        spelled += units * name_len
        if new != pattern:
            clamped.append((path, None, new))
    return spelled


def _pattern_nesting(pattern: str, path: tuple[Any, ...], param: str) -> None:
    depth = most = 0
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            i = _class_end(pattern, i)
            continue
        if c == "(":
            depth += 1
            most = max(most, depth)
        elif c == ")":
            depth -= 1
        i += 1
    if most > MAX_PATTERN_NESTING:
        where = _where(param, path)
        raise InvalidRequest(
            f"{where} nests groups {most} deep, more than {MAX_PATTERN_NESTING}", param=where
        )


def _class_end(pattern: str, i: int) -> int:
    """Past the ``]`` of the class opening at ``i``, as the converter reads it (``\\`` escapes)."""
    i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


@dataclass
class _Group:
    """A group of a pattern being read: what it holds so far (`_check_pattern`)."""

    states: int = 0
    """Positions of its quantified atoms, a quantified group's times those inside it."""
    fanout: int = 0
    """Its alternatives' fanouts: the most stacks one step can spread to, through atoms that can
    match nothing (``(a?){0,1000}``: a thousand)."""
    run: int = 0
    most: int = 0
    """The fanout of the run of atoms that can match nothing so far, and the most of any run."""
    alternative_empty: bool = True
    empty: bool = False
    last_states: int = 0
    last_fanout: int = 0
    last_empty: bool = True
    """The last atom (a quantifier applies to it); none yet is an atom that matches nothing."""

    def fold(self) -> None:
        """The last atom is complete: add it to the alternative."""
        self.states += self.last_states
        self.run = self.run + self.last_fanout if self.last_empty else self.last_fanout
        self.most = max(self.most, self.run)
        self.alternative_empty = self.alternative_empty and self.last_empty
        self.last_states, self.last_fanout, self.last_empty = 0, 0, True

    def atom(self, states: int = 0, fanout: int = 1, empty: bool = False) -> None:
        self.fold()
        self.last_states, self.last_fanout, self.last_empty = states, fanout, empty

    def alternative(self) -> None:
        self.fold()
        self.fanout += self.most
        self.empty = self.empty or self.alternative_empty
        self.run = self.most = 0
        self.alternative_empty = True

    def repeat(self, low: int, factor: int) -> None:
        self.last_states = factor * max(self.last_states, 1)
        if self.last_empty:  # every copy can be skipped: one step reaches each of them
            self.last_fanout = factor * max(self.last_fanout, 1)
        self.last_empty = self.last_empty or low == 0


def _check_pattern(pattern: str, path: tuple[Any, ...], param: str) -> tuple[str, int]:
    """The pattern to convert (``{m,n}`` with n - m above the cap as ``{m,}``) and the units its
    quantifiers spell out; refuses a minimum above the cap, groups nested too deep and quantifiers
    that multiply (`MAX_PATTERN_STATES`). Quantifiers are read exactly as the converter reads them
    (``int()`` of the parts between ``{`` and ``}``)."""
    _pattern_nesting(pattern, path, param)
    out: list[str] = []
    units = 0
    groups = [_Group()]
    i = start = 0
    while i < len(pattern):
        c = pattern[i]
        group = groups[-1]
        if c == "\\":
            group.atom()
            i += 2
            continue
        if c == "[":
            group.atom()
            i = _class_end(pattern, i)
            continue
        if c == "(":
            group.fold()
            groups.append(_Group())
        elif c == ")" and len(groups) > 1:
            group.alternative()
            groups.pop()
            groups[-1].atom(group.states, group.fanout, group.empty)
        elif c == "|":
            group.alternative()
        elif c in "*+?":
            group.repeat(0 if c != "+" else 1, 2)
        elif c == "{":
            end = pattern.find("}", i)
            if end < 0:
                break  # the converter refuses it: "Unbalanced curly brackets"
            low, high = _quantifier(pattern[i + 1 : end])
            if low is not None:
                if low > MAX_REQUIRED_REPEAT:
                    where = _where(param, path)
                    raise InvalidRequest(
                        f"{where}: the quantifier {pattern[i : end + 1][:40]} repeats at least {low} "
                        f"times, above {MAX_REQUIRED_REPEAT}, the most edged's grammar requires",
                        param=where,
                    )
                low = max(low, 0)
                units += low
                if high is not None and high - low > MAX_OPTIONAL_REPEAT:
                    out.append(pattern[start:i] + f"{{{low},}}")
                    start = end + 1
                    high = None
                elif high is not None and high > low:
                    units += high - low
                group.repeat(low, max(high if high is not None else low + 1, 1))
            i = end
        elif c not in "^$":
            group.atom()
        i += 1
    out.append(pattern[start:])
    while len(groups) > 1:  # unbalanced: the converter refuses it, but count what is there
        inner = groups.pop()
        inner.alternative()
        groups[-1].atom(inner.states, inner.fanout, inner.empty)
    groups[0].alternative()
    cost = groups[0].states * max(groups[0].fanout, 1)
    if cost > MAX_PATTERN_STATES:
        where = _where(param, path)
        raise InvalidRequest(
            f"{where}: its quantifiers multiply to about {min(cost, 10**12)} states, above "
            f"{MAX_PATTERN_STATES} (a repeated group that holds a repetition, or one that can match "
            "nothing: llama.cpp's grammar would follow every way to split the text at once)",
            param=where,
        )
    return "".join(out), units


def _quantifier(body: str) -> tuple[int | None, int | None]:
    """``{m}``, ``{m,}``, ``{m,n}`` as the converter reads them; (None, None) when it refuses them."""
    nums = [s.strip() for s in body.split(",")]
    try:
        if len(nums) == 1:
            return int(nums[0]), int(nums[0])
        if len(nums) == 2:
            return int(nums[0]) if nums[0] else 0, int(nums[1]) if nums[1] else None
    except ValueError:  # "Invalid quantifier"
        pass
    return None, None


def _expansion(
    nodes: list[_Node],
    positions: dict[tuple[Any, ...], int],
    refs: list[tuple[int, str, tuple[Any, ...]]],
    param: str,
) -> tuple[int, int]:
    """Nodes and estimated grammar bytes of the document with every ``$ref`` followed each time it
    is used (resolved as the converter does: dict keys split on ``/``, no unescaping), a reference
    back into its own path counted once."""
    for index, ref, path in refs:
        target = positions.get(tuple(ref.split("#")[-1].split("/")[1:]))
        if target == -1:
            where = _where(param, (*path, "$ref"))
            raise InvalidRequest(f"{where}: {ref[:80]!r} does not point at a subschema", param=where)
        nodes[index].ref = target  # None: the converter refuses it ("Error resolving ref")
    total: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()
    stack: list[tuple[int, int]] = [(0, 0)]
    while stack:
        index, state = stack.pop()
        node = nodes[index]
        edges = [*node.children, *([node.ref] if node.ref is not None else [])]
        if state == 0:
            if index in total:
                continue
            on_path.add(index)
            stack.append((index, 1))
            stack.extend((e, 0) for e in edges if e not in total and e not in on_path)
            continue
        n, size = 1, node.units_bytes
        for e in edges:
            en, eb = total.get(e, (0, 0))
            n, size = min(n + en, 1 << 40), min(size + eb, 1 << 40)
        total[index] = (n, size)
        on_path.discard(index)
    return total[0]


def check_grammar(text: str, param: str) -> None:
    """Refuse a GBNF grammar llama.cpp could not take safely, with `InvalidRequest` naming ``param``
    and the limit; measured without llama.cpp (`edged.engine.gbnf`)."""
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"{param}: the grammar is not valid Unicode (a lone surrogate)", param=param
        ) from None
    if size > MAX_GBNF_BYTES:
        raise InvalidRequest(
            f"{param}: the grammar is {size} bytes, above {MAX_GBNF_BYTES}, the most edged hands llama.cpp",
            param=param,
        )
    try:
        measure(text, GRAMMAR_LIMITS)
    except GbnfError as exc:
        if exc.syntax:
            raise InvalidRequest(
                f"{param}: the GBNF parser rejected the grammar: {exc} (llama.cpp's syntax: see its "
                "grammars/README.md)",
                param=param,
            ) from None
        raise InvalidRequest(f"{param}: {exc}", param=param) from None
