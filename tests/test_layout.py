"""The package's layout: no import circle, and modules one can read in one sitting.

The import graph is built from the AST of every module of ``dask_context``: every
``import`` and ``from ... import`` statement counts, at module level and inside
functions, and those under ``if TYPE_CHECKING:`` count too (none is excluded).
``from dask_context import name`` is an edge to the submodule ``name`` when there
is one, else to the package (``dask_context/__init__.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import dask_context

PACKAGE = Path(dask_context.__file__).parent

#: modules allowed above MAX_LINES, with the reason (none above 350 among the router's)
MAX_LINES = 300
LONG = {
    "cache": "the worker's cache: residency, tiers and eviction in one place",
    "policy": "pure decision functions, each short, kept together with their views",
    "resume": "resumable runs: ledger, plan and storage",
    "_compat": "every use of distributed internals, kept in one place",
    "worker": "the worker plugin and its extension",
    "staging": "peer copies of context files (edited elsewhere)",
    "preemption": "drain on preemption: signals, SLURM and the scheduler handlers",
    "devices": "device discovery (CUDA, MPS, CPU)",
    "state": "the router's records, plain data with their doctests",
    "dashboard": "the Contexts page (bokeh models)",
}
ROUTER = [
    "scheduler", "_router_base", "_router_intake", "_router_learning", "_router_loop",
    "_router_views", "_router_guard", "_router_handlers", "_router_report",
    "_observers", "_setup", "_protocol",
]


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``__init__`` is the package)."""
    names = modules()
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "dask_context":
                        edges.add(parts[1] if len(parts) > 1 else "__init__")
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: from . import x / from .x import y
                    module = "dask_context" + ("." + module if module else "")
                parts = module.split(".")
                if parts[0] != "dask_context":
                    continue
                if len(parts) > 1:
                    edges.add(parts[1])
                else:
                    for alias in node.names:
                        edges.add(alias.name if alias.name in names else "__init__")
        edges.discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "scheduler" in graph["__init__"]  # the graph is read at all
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_router_does_not_import_its_observers():
    graph = import_graph()
    observers = {"dashboard", "metrics", "adaptive"}
    for name in ROUTER:
        if name != "_setup":
            assert not graph[name] & observers, name
    for name in observers:
        assert not graph[name] & (set(ROUTER) - {"_observers", "_protocol"}), name


def test_modules_are_short():
    lines = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    long = {name for name, n in lines.items() if n > MAX_LINES}
    assert long <= set(LONG), {name: lines[name] for name in long - set(LONG)}
    assert all(lines[name] <= 350 for name in ROUTER if name in lines)


def test_every_module_says_what_it_owns():
    for name, path in modules().items():
        assert ast.get_docstring(ast.parse(path.read_text())), name
