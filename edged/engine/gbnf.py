"""What a GBNF grammar will cost llama.cpp, measured before llama.cpp sees it.

llama.cpp's grammar code trusts its input. Measured on the pinned build (llama-cpp-python 0.3.36,
x86_64), each of these takes the whole daemon down, from a few dozen bytes of grammar:

- the parser recurses once per ``(``: 18,700 nested groups overflow an 8 MiB thread stack (a Python
  thread's, as the main thread's), 4,700 a 2 MiB one (glibc's thread default when ``ulimit -s`` is
  unlimited): SIGSEGV;
- ``x{5,2}`` (max below min) underflows the count of optional copies and builds rules until the memory
  is gone: abort;
- left recursion through a rule that can be empty without an empty alternative (``a ::= b a "x"``,
  ``b ::= c``, ``c ::= "" | "z"``) is not caught by llama.cpp's check, and every new pushdown stack
  grows by one frame: ``std::bad_alloc``, abort;
- a rule used twice in a row that can match nothing (``r2 ::= (r1 r1)``, ``r1 ::= ("a"?)``, doubled
  15 times, as llama-cpp-python's converter writes the regex ``((a?){2}){2}...``) gives 2^15 distinct
  pushdown stacks: seconds per token on the backend thread, and every job waits;
- a long literal repeated (``"<60 KB>"{0,2000}``) is copied into every synthesised rule: gigabytes.

`measure` parses the text as llama.cpp's ``llama_grammar_parser`` does (the same tokens, the same
rule synthesis for groups and repetitions, iteratively, so a 100,000-deep grammar costs this module
nothing), stopping as soon as the nesting passes the cap, and computes the costs above on the rules.
The caps themselves are in `edged.engine.bounds`. What it cannot bound: an *ambiguous* raw grammar
(``s ::= "a" s "b" | "a" s "c" | ""``) doubles llama.cpp's stacks with every token it accepts; that is
a property of the text the model writes, not of the grammar alone (see the README's threat model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REPETITION_THRESHOLD = 2000
"""llama.cpp's ``MAX_REPETITION_THRESHOLD`` (src/llama-grammar.cpp): ``{m,n}`` with m above it is an
error, n above it means no maximum."""

_ESCAPE = r"\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[trn\\\"\[\]\-])"
_SYMBOL = (
    rf'"((?:[^"\\]|{_ESCAPE})*)"'  # a literal
    rf"|\[\^?((?:[^\]\\]|{_ESCAPE})*)\]"  # a character class
    r"|(!?<(?:\[[0-9]+\]|[^>]*)>)"  # a token
    r"|([a-zA-Z0-9-]+)"  # a rule reference
)
_SYMBOL_THEN_SPACE = {
    False: re.compile(rf"(?:{_SYMBOL})(?:[ \t]+|#[^\r\n]*)*"),
    True: re.compile(rf"(?:{_SYMBOL})(?:[ \t\r\n]+|#[^\r\n]*)*"),
}
_SPACE = {False: re.compile(r"(?:[ \t]+|#[^\r\n]*)*"), True: re.compile(r"(?:[ \t\r\n]+|#[^\r\n]*)*")}
_NAME = re.compile(r"[a-zA-Z0-9-]+")
_INT = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Limits:
    """What `measure` refuses beyond (`edged.engine.bounds` sets them)."""

    nesting: int
    """Nesting of ``(`` (llama.cpp's parser recurses once per level)."""
    chain: int
    """Depth of llama.cpp's left-recursion check (it recurses along the rules that start rules)."""
    elements: int
    """Grammar elements after llama.cpp's rule synthesis."""
    stacks: int
    """Distinct pushdown stacks from one position."""
    fanout: int
    """Stacks one stack may become after one character."""
    work: int
    """Stack frames copied from one position; calls of the left-recursion check from one rule."""
    checks: int
    """Calls of the left-recursion check in all."""


class GbnfError(ValueError):
    """The grammar is refused: llama.cpp's parser would refuse it too (``syntax``), or it would cost
    llama.cpp more than a limit."""

    def __init__(self, message: str, *, syntax: bool = False) -> None:
        super().__init__(message)
        self.syntax = syntax


@dataclass(frozen=True)
class GbnfCost:
    """What llama.cpp will do with a grammar (`measure`)."""

    nesting: int
    """Deepest ``(`` nesting: the recursion depth of llama.cpp's parser."""
    rules: int
    """Rules after llama.cpp's synthesis (one per group and per optional copy of a repetition)."""
    elements: int
    """``llama_grammar_element``s (8 bytes each) the rules hold, at most."""
    stacks: int
    """Most distinct pushdown stacks ``llama_grammar_advance_stack`` makes from one position."""
    stack_frames: int
    """Most stack frames it copies doing so."""
    fanout: int
    """Most stacks one stack becomes after one character (`_fanout`)."""
    left_recursion_calls: int
    """Calls of ``llama_grammar_detect_left_recursion`` at sampler creation (it does not memoise)."""
    left_recursion_depth: int
    """Its deepest recursion."""


def measure(text: str, limits: Limits) -> GbnfCost:
    """The cost of ``text`` to llama.cpp. Raises `GbnfError` for a grammar llama.cpp's parser refuses
    (``syntax``), for one beyond a limit (found as soon as it is passed: a 100,000-deep grammar is
    refused at level ``limits.nesting``), for ``{m,n}`` with n < m and for a left recursion llama.cpp
    would not catch."""
    parser = _Parser(text, limits)
    rules = parser.parse()
    stacks, frames, rule_stacks, empty = _stacks(rules, limits)
    fanout = _fanout(rules, parser.names.get("root", len(rules)), rule_stacks, empty, limits)
    calls, depth = _left_recursion_checks(rules, limits)
    return GbnfCost(
        nesting=parser.nesting,
        rules=len(rules),
        elements=parser.elements,
        stacks=stacks,
        stack_frames=frames,
        fanout=fanout,
        left_recursion_calls=calls,
        left_recursion_depth=depth,
    )


# -- the parser: llama.cpp's llama_grammar_parser, without the recursion -----------------------------
#
# A rule is a list of alternatives, an alternative a list of items: a rule id (>= 0), or a terminal
# (a literal, class, token or ".") as -1 - i, its element count in `weights[i]`.


@dataclass(slots=True)
class _Frame:
    """One ``parse_alternates`` in progress: a rule, or a parenthesised group."""

    rule: int
    nested: bool
    alternatives: list[list[int]]
    sequence: list[int]
    rules_before: int = 0
    last_start: int = 0
    prev_rules: int = 1


class _Parser:
    def __init__(self, text: str, limits: Limits) -> None:
        self.text = text.split("\0", 1)[0]  # llama.cpp reads a C string
        self.limits = limits
        self.names: dict[str, int] = {}
        self.rules: list[list[list[int]] | None] = []
        """By symbol id: llama.cpp numbers names on first sight, groups and repeats as made."""
        self.weights: list[int] = []
        self.elements = 0
        self.nesting = 0

    def symbol(self, name: str) -> int:
        rule = self.names.get(name)
        if rule is None:
            rule = self.names[name] = self.generate()
        return rule

    def generate(self) -> int:
        self.rules.append(None)
        return len(self.rules) - 1

    def fail(self, what: str, pos: int) -> GbnfError:
        line = self.text.count("\n", 0, pos) + 1
        return GbnfError(f"{what} at line {line}: {self.text[pos : pos + 20]!r}", syntax=True)

    def space(self, pos: int, newline_ok: bool) -> int:
        return _SPACE[newline_ok].match(self.text, pos).end()  # type: ignore[union-attr]

    def grow(self, elements: int) -> None:
        self.elements += elements
        if self.elements > self.limits.elements:
            raise GbnfError(
                f"the grammar expands to more than {self.limits.elements} llama.cpp grammar elements "
                "(a long literal or class under a repetition is copied into every repeat)"
            )

    def parse(self) -> list[list[list[int]]]:
        text = self.text
        pos = self.space(0, True)
        while pos < len(text):
            name = _NAME.match(text, pos)
            if name is None:
                raise self.fail("expecting name", pos)
            rule = self.symbol(name.group())
            pos = self.space(name.end(), False)
            if not text.startswith("::=", pos):
                raise self.fail("expecting ::=", pos)
            pos = self.alternates(self.space(pos + 3, True), rule)
            if text.startswith("\r\n", pos):
                pos += 2
            elif pos < len(text) and text[pos] in "\r\n":
                pos += 1
            elif pos < len(text):
                raise self.fail("expecting newline or end", pos)
            pos = self.space(pos, True)
        for symbol, rule in self.names.items():
            if self.rules[rule] is None:
                raise GbnfError(f"undefined rule identifier '{symbol}'", syntax=True)
        return self.rules  # type: ignore[return-value]  # every id is defined now

    def alternates(self, pos: int, rule: int) -> int:
        """``parse_alternates`` and ``parse_sequence``, with a stack of frames for the groups."""
        text = self.text
        frames = [_Frame(rule, False, [], [])]
        f = frames[0]
        symbol_then_space = _SYMBOL_THEN_SPACE[False]
        while True:
            m = symbol_then_space.match(text, pos)
            if m is not None:
                f.last_start = len(f.sequence)
                f.prev_rules = 1
                literal, chars, token, name = m.groups()
                if name is not None:
                    f.sequence.append(self.symbol(name))
                    self.elements += 1
                elif token is not None:
                    self.terminal(f, 1)
                else:  # "" and [] add nothing to the rule (and leave nothing to repeat)
                    self.terminal(f, len(literal if literal is not None else chars))
                pos = m.end()
                continue
            c = text[pos] if pos < len(text) else ""
            if c == "(":
                if len(frames) > self.limits.nesting:
                    raise GbnfError(
                        f"the grammar nests parentheses more than {self.limits.nesting} deep "
                        "(llama.cpp's parser recurses once per level)"
                    )
                pos = self.space(pos + 1, True)
                f = _Frame(-1, True, [], [], rules_before=len(self.rules))
                f.rule = self.generate()
                frames.append(f)
                symbol_then_space = _SYMBOL_THEN_SPACE[True]
                self.nesting = max(self.nesting, len(frames) - 1)
            elif c == ".":
                f.last_start = len(f.sequence)
                f.prev_rules = 1
                self.terminal(f, 1)
                pos = self.space(pos + 1, f.nested)
            elif c in ("*", "+", "?"):
                pos = self.space(pos + 1, f.nested)
                self.repeat(f, 1 if c == "+" else 0, 1 if c == "?" else None, pos)
            elif c == "{":
                pos = self.braces(f, self.space(pos + 1, f.nested))
            elif c == "|":
                f.alternatives.append(f.sequence)
                f.sequence, f.last_start, f.prev_rules = [], 0, 1
                pos = self.space(pos + 1, True)
            elif c in ('"', "["):
                raise self.fail("unterminated literal or class, or an unknown escape", pos)
            else:  # the end of this rule or group
                f.alternatives.append(f.sequence)
                self.rules[f.rule] = f.alternatives
                self.grow(len(f.alternatives))
                frames.pop()
                if not frames:
                    return pos
                if c != ")":
                    raise self.fail("expecting ')'", pos)
                inner, f = f, frames[-1]
                symbol_then_space = _SYMBOL_THEN_SPACE[f.nested]
                f.prev_rules = max(1, len(self.rules) - inner.rules_before)
                f.last_start = len(f.sequence)
                f.sequence.append(inner.rule)
                pos = self.space(pos + 1, f.nested)

    def terminal(self, f: _Frame, elements: int) -> None:
        if elements > 0:
            f.sequence.append(-1 - len(self.weights))
            self.weights.append(elements)
            self.elements += elements

    def braces(self, f: _Frame, pos: int) -> int:
        text = self.text
        low = _INT.match(text, pos)
        if low is None:
            raise self.fail("expecting an int", pos)
        min_times, max_times = int(low.group()), None
        pos = self.space(low.end(), f.nested)
        if text.startswith("}", pos):
            max_times = min_times
        elif text.startswith(",", pos):
            pos = self.space(pos + 1, f.nested)
            if (number := _INT.match(text, pos)) is not None:
                max_times = int(number.group())
                pos = self.space(number.end(), f.nested)
            if not text.startswith("}", pos):
                raise self.fail("expecting '}'", pos)
        else:
            raise self.fail("expecting ','", pos)
        pos = self.space(pos + 1, f.nested)
        if min_times > REPETITION_THRESHOLD:
            raise self.fail("number of repetitions exceeds sane defaults", pos)
        if max_times is not None and max_times > REPETITION_THRESHOLD:
            max_times = None
        if max_times is not None and max_times < min_times:
            raise GbnfError(
                f"the repetition {{{min_times},{max_times}}} has its maximum below its minimum "
                "(llama.cpp would build rules until the memory runs out)"
            )
        self.repeat(f, min_times, max_times, pos)
        return pos

    def repeat(self, f: _Frame, min_times: int, max_times: int | None, pos: int) -> None:
        """``handle_repetitions``: S{m,n} is S m times, then a chain of n-m rules
        ``S'(k) ::= S S'(k-1) |``; S{m,} is S m times and ``S' ::= S S' |``."""
        if f.last_start == len(f.sequence):
            raise self.fail("expecting preceding item to */+/?/{", pos)
        prev = f.sequence[f.last_start :]
        total = max_times if max_times else (min_times or 1)
        if f.prev_rules * total > REPETITION_THRESHOLD:
            raise self.fail("number of rules that are going to be repeated exceeds sane defaults", pos)
        optional = 1 if max_times is None else max_times - min_times
        size = sum(1 if item >= 0 else self.weights[-1 - item] for item in prev)
        self.grow(size * (min_times - 1) + optional * (size + 3))
        if min_times == 0:
            del f.sequence[f.last_start :]
        else:
            f.sequence.extend(prev * (min_times - 1))
        last = 0
        for i in range(optional):
            rule = self.generate()
            tail = [rule if max_times is None else last] if i > 0 or max_times is None else []
            self.rules[rule] = [prev + tail, []]
            last = rule
        if optional > 0:
            f.sequence.append(last)
        f.prev_rules *= total


# -- what llama.cpp does with the rules ---------------------------------------------------------------


def _nullable(rules: list[list[list[int]]]) -> list[bool]:
    """Rules that can match nothing (a worklist, linear in the grammar)."""
    nullable = [False] * len(rules)
    pending: list[int] = []
    owner: list[int] = []
    users: list[list[int]] = [[] for _ in rules]
    ready = []
    for rule, alternatives in enumerate(rules):
        for alternative in alternatives:
            if not alternative:
                ready.append(rule)
            elif min(alternative) >= 0:  # references only
                for item in alternative:
                    users[item].append(len(owner))
                pending.append(len(alternative))
                owner.append(rule)
    while ready:
        rule = ready.pop()
        if nullable[rule]:
            continue
        nullable[rule] = True
        for key in users[rule]:
            pending[key] -= 1
            if pending[key] == 0:
                ready.append(owner[key])
    return nullable


def _leading(rules: list[list[list[int]]], empty: list[bool]) -> list[list[tuple[int, bool]]]:
    """Per rule, the references a walk from its start reaches while every item before them can be
    empty, each with whether it ends its alternative (llama.cpp then pushes no frame for it)."""
    out = []
    for alternatives in rules:
        edges = []
        for alternative in alternatives:
            last = len(alternative) - 1
            for position, item in enumerate(alternative):
                if item < 0:
                    break
                edges.append((item, position == last))
                if not empty[item]:
                    break
        out.append(edges)
    return out


def _postorder(edges: list[list[tuple[int, bool]]], *, growing_cycles: bool) -> list[int]:
    """Rules ordered so that those reached from a rule come first (a cycle is cut where it closes).
    With ``growing_cycles``, a cycle through an edge that pushes a frame raises: each lap makes
    llama.cpp's stacks deeper, until the memory runs out."""
    state = bytearray(len(edges))  # 1: on the path, 2: done
    at = [0] * len(edges)
    order: list[int] = []
    for root in range(len(edges)):
        if state[root]:
            continue
        state[root] = 1
        path, next_edge, pushes = [root], [0], [0]
        while path:
            rule = path[-1]
            i = next_edge[-1]
            if i == len(edges[rule]):
                path.pop()
                next_edge.pop()
                pushes.pop()
                state[rule] = 2
                order.append(rule)
                continue
            next_edge[-1] = i + 1
            item, last = edges[rule][i]
            if state[item] == 1:
                if growing_cycles and (not last or pushes[-1] > pushes[at[item]]):
                    raise GbnfError(
                        "the grammar has a left recursion llama.cpp does not detect (a rule reaches "
                        "itself through rules that can match nothing, and its stacks would grow "
                        "until the memory runs out)"
                    )
            elif state[item] == 0:
                state[item] = 1
                at[item] = len(path)
                path.append(item)
                next_edge.append(0)
                pushes.append(pushes[-1] + (not last))
    return order


def _stacks(rules: list[list[list[int]]], limits: Limits) -> tuple[int, int, list[int], list[bool]]:
    """The most distinct stacks, and stack frames, ``llama_grammar_advance_stack`` makes from one
    position (from the root at sampler creation, then after every character).

    From a position, a terminal is one stack; a reference adds the stacks of its rule's start (each
    one frame deeper, unless the reference ends its alternative) and, when that rule can match
    nothing, those of the next position. Stacks that reached the same position different ways are
    different stacks to llama.cpp: that is what makes a grammar that doubles exponential."""
    empty = _nullable(rules)
    order = _postorder(_leading(rules, empty), growing_cycles=True)
    stacks = [0] * len(rules)  # from each rule's start; 0 while on the path: a lap of a cycle that
    frames = [0] * len(rules)  # pushes nothing makes the same stacks again
    for rule in order:
        n_stacks = n_frames = 0
        for alternative in rules[rule]:
            last = len(alternative) - 1
            for position, item in enumerate(alternative):
                if item < 0:
                    n_stacks += 1
                    n_frames += 1
                    break
                n_stacks += stacks[item]
                n_frames += frames[item] + (stacks[item] if position < last else 0)
                if not empty[item]:
                    break
        if n_stacks > limits.stacks or n_frames > limits.work:
            raise _too_many_stacks(limits)
        stacks[rule], frames[rule] = n_stacks, n_frames
    most_stacks = most_frames = 0
    for alternatives in rules:  # from every position, the alternative's end popping to the caller
        for alternative in alternatives:
            here_stacks = here_frames = 0
            last = len(alternative) - 1
            for position in range(last, -1, -1):
                item = alternative[position]
                if item < 0:
                    here_stacks = here_frames = 1
                    continue
                pushed = stacks[item] if position < last else 0
                if empty[item]:
                    here_stacks += stacks[item]
                    here_frames += frames[item] + pushed
                else:
                    here_stacks, here_frames = stacks[item], frames[item] + pushed
                if here_stacks > most_stacks:
                    most_stacks = here_stacks
                if here_frames > most_frames:
                    most_frames = here_frames
    if most_stacks > limits.stacks or most_frames > limits.work:
        raise _too_many_stacks(limits)
    return most_stacks, most_frames, stacks, empty


def _fanout(
    rules: list[list[list[int]]], root: int, stacks: list[int], empty: list[bool], limits: Limits
) -> int:
    """The most stacks one stack becomes when it accepts one character: what follows the terminal in
    its alternative and, as far as that can match nothing, in the rules that called it (the worst
    chain of callers). llama.cpp filters a candidate token by advancing every stack character by
    character, so the work per token grows with this number to the power of the token's length:
    ``(r1 r1)?`` doubled 7 times (129) took it 40 s for three whole-vocabulary filters, 6 times (65)
    2 s, 5 times (33) 0.3 s (x86_64, the 49,152 tokens of SmolLM2). An ``enum`` of 4,000 strings has
    4,000 stacks at its start but each becomes one."""
    rest: dict[tuple[int, int], list[tuple[int, bool]]] = {}
    sites: list[tuple[int, int, int, bool]] = []  # (callee, caller, stacks after the call, empty after)
    for rule, alternatives in enumerate(rules):
        for a, alternative in enumerate(alternatives):
            after = [(0, True)] * (len(alternative) + 1)
            for position in range(len(alternative) - 1, -1, -1):
                item = alternative[position]
                tail_stacks, tail_empty = after[position + 1]
                if item < 0:
                    after[position] = (1, False)
                else:
                    sites.append((item, rule, tail_stacks, tail_empty))
                    if empty[item]:
                        after[position] = (min(stacks[item] + tail_stacks, 1 << 40), tail_empty)
                    else:
                        after[position] = (stacks[item], False)
            rest[(rule, a)] = after
    if not rules:
        return 1  # an empty grammar: llama.cpp refuses it itself (`GgufTokenizer.grammar_problem`)
    popped = [0] * len(rules)  # stacks a rule's end pops to, for the worst chain of callers
    if root < len(rules):
        popped[root] = 1  # the empty stack: the end of the text
    else:  # no rule named root (refused later, by name): measure it from every rule
        popped = [1] * len(rules)
    for _ in range(len(rules) + 1):  # a longest-path relaxation; still growing after that: a cycle
        changed = False
        for callee, caller, tail_stacks, tail_empty in sites:
            value = tail_stacks + (popped[caller] if tail_empty else 0)
            if value > popped[callee]:
                if value > limits.fanout:
                    raise _too_wide(limits)
                popped[callee] = value
                changed = True
        if not changed:
            break
    else:
        raise _too_wide(limits)
    most = 1
    for (rule, a), after in rest.items():
        for position, item in enumerate(rules[rule][a]):
            if item < 0:
                tail_stacks, tail_empty = after[position + 1]
                most = max(most, tail_stacks + (popped[rule] if tail_empty else 0))
    if most > limits.fanout:
        raise _too_wide(limits)
    return most


def _too_wide(limits: Limits) -> GbnfError:
    return GbnfError(
        f"the grammar would make one llama.cpp pushdown stack become more than {limits.fanout} after "
        "a single character (optional rules in a row, repeated or nested, each a way to split the "
        "text): filtering the vocabulary would take seconds to hours per token"
    )


def _too_many_stacks(limits: Limits) -> GbnfError:
    return GbnfError(
        f"the grammar would make llama.cpp build more than {limits.stacks} pushdown stacks or copy "
        f"more than {limits.work} stack frames from one position (rules that can match nothing, used "
        "in a row or nested, multiply them)"
    )


def _left_recursion_checks(rules: list[list[list[int]]], limits: Limits) -> tuple[int, int]:
    """Calls and recursion depth of llama.cpp's ``llama_grammar_detect_left_recursion``: it recurses
    into a rule's leading references while they have an empty alternative, without memoising, from
    every rule no earlier call reached."""
    empty = [any(not alternative for alternative in alternatives) for alternatives in rules]
    edges = _leading(rules, empty)
    calls: list[int] = [0] * len(rules)
    depth: list[int] = [0] * len(rules)
    for rule in _postorder(edges, growing_cycles=False):
        n, d = 1, 1
        for item, _ in edges[rule]:
            n += calls[item] or 1  # 0: the rule is on the path, llama.cpp stops ("left recursion")
            d = max(d, depth[item] + 1)
        if n > limits.work or d > limits.chain:
            raise GbnfError(
                f"the grammar would make llama.cpp's left-recursion check call itself more than "
                f"{limits.work} times or {limits.chain} deep (rules that start with rules, chained; "
                "with an empty alternative, used in a row, they multiply)"
            )
        calls[rule], depth[rule] = n, d
    total = 0
    seen = bytearray(len(rules))
    for rule in range(len(rules)):
        if seen[rule]:
            continue
        total += calls[rule]
        todo = [rule]
        while todo:
            current = todo.pop()
            if not seen[current]:
                seen[current] = 1
                todo.extend(item for item, _ in edges[current])
    if total > limits.checks:
        raise GbnfError(
            f"the grammar would make llama.cpp's left-recursion check call itself {total} times, "
            f"more than {limits.checks}"
        )
    return total, max(depth, default=0)
