"""The package's import graph has no cycles, counting function-level (lazy) imports too.

Every ``import`` / ``from … import`` statement anywhere in ``src/calibrant/**/*.py`` (and every
``__import__`` / ``importlib.import_module`` of a literal name) is an edge from the module it is written
in to the module it names: ``from calibrant.x import y`` points at
``calibrant.x.y`` when that is a module, else at ``calibrant.x``; a package's ``__init__`` is the
package's module. Relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import calibrant

SRC = Path(calibrant.__file__).resolve().parent
PACKAGE = "calibrant"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _dynamic_import(call: ast.Call) -> bool:
    """``__import__("calibrant.x")`` or ``importlib.import_module("calibrant.x")`` with a literal name."""
    func = call.func
    named = (isinstance(func, ast.Name) and func.id in ("__import__", "import_module")) or \
        (isinstance(func, ast.Attribute) and func.attr == "import_module")
    return named and bool(call.args) and isinstance(call.args[0], ast.Constant) and \
        isinstance(call.args[0].value, str)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` (at ``path``) imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            targets = [node.args[0].value]
        else:
            continue
        for target in targets:
            # `import calibrant.a.b` names the deepest module that exists
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.split(".")[0] == PACKAGE and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(comp, graph) for comp in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component  # pragma: no cover - a strongly connected component always has a cycle


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "calibrant.cli" in graph and "calibrant.models" in graph
    # cli imports its subcommands inside functions: those edges must be counted
    assert "calibrant.api" in graph["calibrant.cli"]
    assert "calibrant.search.cli" in graph["calibrant.cli"]  # through __import__("calibrant.search.cli", …)


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    """``from calibrant.x import _name`` from outside ``calibrant.x``'s package reaches into its internals."""
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE) and node.level == 0:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private and node.module != name:
                    offenders.append(f"{name}: from {node.module} import {', '.join(private)}")
    assert not offenders, "\n".join(offenders)
