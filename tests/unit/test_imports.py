"""The shape of the house, read from the source with `ast`: data flows transport -> engine -> backend,
so no module of ``edged/transports/`` or ``edged/telemetry/`` imports a backend or reads
``engine.backend`` (they read the engine's snapshot), and edged's modules import each other without a
cycle. Module-level imports only: those under ``if TYPE_CHECKING:`` and inside functions (deferred
on purpose) are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import edged

ROOT = Path(edged.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run on import: the body, and the branches of ``if``/``try`` in it (but
    not ``if TYPE_CHECKING:``); never a function's or a class's body."""
    found: list[ast.stmt] = []
    for node in body:
        found.append(node)
        if isinstance(node, ast.If):
            found += (
                module_level(node.orelse)
                if _type_checking(node.test)
                else module_level(node.body + node.orelse)
            )
        elif isinstance(node, ast.Try):
            found += module_level(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                found += module_level(handler.body)
    return found


def imports_of(name: str) -> set[str]:
    """The edged modules ``name`` imports when it is imported."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in module_level(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in MODULES else base)
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_graph_is_read() -> None:
    """The walk sees real edges (a test of the test: an empty graph would pass everything below)."""
    assert "edged.wire" in GRAPH["edged.engine.answer"]
    assert "edged.engine.snapshot" in GRAPH["edged.engine.engine"]
    assert "edged.engine.engine" not in GRAPH["edged.telemetry.report"], "a TYPE_CHECKING import"


def test_transports_and_telemetry_never_import_a_backend() -> None:
    offenders = {
        (name, target)
        for name, targets in GRAPH.items()
        if name.startswith(("edged.transports", "edged.telemetry"))
        for target in targets
        if target == "edged.backends" or target.startswith("edged.backends.")
    }
    assert not offenders


def test_transports_and_telemetry_never_read_the_engines_backend() -> None:
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith(("edged.transports", "edged.telemetry")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("backend", "scheduler", "stats", "board"):
                owner = node.value
                if (isinstance(owner, ast.Name) and owner.id == "engine") or (
                    isinstance(owner, ast.Attribute) and owner.attr == "engine"
                ):
                    offenders.append(f"{name}:{node.lineno} engine.{node.attr}")
    assert not offenders


def test_no_import_cycle() -> None:
    """Depth-first search over the module-level import graph; a back edge is a cycle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
