"""The package layout's rules (docs/architecture.md): which layer may import which, no
import cycle, no function over 60 lines. Static: the source is parsed, nothing imported."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("encoder", "index", "retrieval", "ui")
MAX_FUNCTION_LINES = 60

# Each layer and the project layers it may import (itself always). Third-party imports
# are free. `retrieval.errors` and `retrieval.version` sit below every retrieval layer.
BASE = {"retrieval.errors", "retrieval.version"}
ALLOWED = {
    "encoder": set(),
    "index": set(),
    "ui": set(),
    "retrieval.errors": set(),
    "retrieval.version": set(),
    "retrieval": {"retrieval.data"} | BASE,
    "retrieval.data": {"encoder", "index"} | BASE,
    "retrieval.models": {"encoder", "index", "retrieval.data"} | BASE,
    "retrieval.search": {"encoder", "index", "retrieval.data", "retrieval.models"} | BASE,
    "retrieval.testing": {
        "encoder",
        "index",
        "retrieval.data",
        "retrieval.models",
        "retrieval.search",
    }
    | BASE,
    "retrieval.evaluation": {
        "encoder",
        "index",
        "retrieval.data",
        "retrieval.models",
        "retrieval.search",
    }
    | BASE,
    "retrieval.api": {"index", "retrieval.data", "retrieval.models", "retrieval.search"} | BASE,
    "retrieval.apps": {
        "encoder",
        "index",
        "ui",
        "retrieval",
        "retrieval.data",
        "retrieval.models",
        "retrieval.search",
        "retrieval.evaluation",
        "retrieval.api",
    }
    | BASE,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def layer(module: str) -> str:
    """`retrieval.<sub>` for the retrieval subpackages and modules, else the top package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "retrieval" and len(parts) > 1 else parts[0]


def imported(module: str, *, top_level_only: bool) -> set[str]:
    """The project modules `module` imports (all of them, or only at module level)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_every_module_has_a_layer():
    assert {layer(m) for m in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_import_only_what_they_may(module):
    here = layer(module)
    wrong = {m for m in imported(module, top_level_only=False) if layer(m) not in ALLOWED[here]}
    wrong = {m for m in wrong if layer(m) != here}
    assert not wrong, f"{module} ({here}) must not import {sorted(wrong)}"


def test_the_layer_rules_themselves_have_no_cycle():
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError(" -> ".join(path + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in ALLOWED[node] - {node}:
            visit(nxt, path + [node])
        state[node] = 2

    for node in ALLOWED:
        visit(node, [])


def test_no_import_cycle_between_modules():
    graph = defaultdict(set)
    for module in MODULES:
        for target in imported(module, top_level_only=True):
            # `from pkg import name` of a package imports its __init__ only
            if target in MODULES and target != module:
                graph[module].add(target)
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    # a package's __init__ re-exporting its own modules is not a cycle worth naming
    cycles = [c for c in cycles if not all(m.startswith(min(c, key=len)) for m in c)]
    assert not cycles, f"import cycles: {cycles}"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            connect(v)
    return out


def function_lengths() -> list[tuple[int, str]]:
    rows = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                rows.append((length, f"{module}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def test_no_function_over_60_lines():
    long = [f"{where} ({n} lines)" for n, where in function_lengths() if n > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_checks_can_fail(tmp_path):
    source = "def f():\n" + "    x = 1\n" * 70
    node = ast.parse(source).body[0]
    assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    assert layer("ui.client") == "ui" and "retrieval.search" not in ALLOWED["ui"]
    assert "ui" not in ALLOWED["retrieval.api"] and "retrieval" not in ALLOWED["encoder"]
    assert strongly_connected({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
