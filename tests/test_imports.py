"""dfsmerge's import graph (every import statement at any depth of a module, functions included): no cycle, no
arrow running back up the data-flow order of the packages (docs/architecture.md), no domain module at the package
root, and every lazily exported name resolves."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "dfsmerge"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: dfsmerge modules it imports}``; ``from pkg import name`` counts ``pkg.name`` when that is a
    module, else ``pkg``."""
    paths = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in paths.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    edges.add(f"{target}.{a.name}" if f"{target}.{a.name}" in paths else target)
        graph[mod] = {e for e in edges if e in paths and e != mod}
    return graph


def cyclic_components(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of ``graph`` with more than one module (each holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_imports_inside_functions():
    g = import_graph()
    assert "dfsmerge.objectives.lm_eval_compat" in g["dfsmerge.objectives.tasks"]  # imported inside functions only
    assert cyclic_components({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert cyclic_components({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = [sorted(c) for c in cyclic_components(import_graph())]
    assert cycles == [], f"import cycles (a module imports, at any depth, one that imports it back): {cycles}"


# ------------------------------------------------------------------------------------------------ layers
ROOT_MODULES = {"__init__", "cli", "errors"}
"""Modules allowed at the package root besides private helpers (``_lazy.py``): the face, the command line and the
error types every layer raises."""

LAYERS = ("arch", "io", "zoo", "merge", "kernels", "recipe", "genome", "runtime", "objectives", "optim", "rundir",
          "report", "search", "analysis", "export", "tools")
"""The packages in data-flow order (docs/architecture.md): a module may import its own package and those listed
before it, never one listed after it. Below them all: ``errors`` and the private root helpers; above them all: the
command line (``dfsmerge.cli`` and a package's ``cli`` module, which parse and call)."""

BASE, TOP = -1, len(LAYERS)


def layer(module: str) -> int:
    """The rank of ``module`` (``dfsmerge.x.y``) in the data-flow order."""
    parts = module.split(".")[1:]
    if parts and parts[-1] == "cli":
        return TOP
    if not parts or parts[0] == "errors" or parts[0].startswith("_"):
        return BASE
    return LAYERS.index(parts[0])


def back_arrows(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for each import of a module ``b`` whose package comes after ``a``'s in :data:`LAYERS` (the face
    ``dfsmerge/__init__.py`` ranks with the base: it names its exports in strings, resolved on first use)."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def test_no_domain_module_at_the_package_root():
    extra = sorted(p.name for p in PKG.glob("*.py") if p.stem not in ROOT_MODULES and not p.stem.startswith("_"))
    assert extra == [], f"modules at the dfsmerge/ root (give each a package, see docs/architecture.md): {extra}"


def test_every_package_has_a_place_in_the_data_flow_order():
    packages = sorted(p.parent.name for p in PKG.glob("*/__init__.py"))
    assert sorted(LAYERS) == packages, "list each package of dfsmerge/ once in LAYERS (and in docs/architecture.md)"
    doc = (ROOT / "docs" / "architecture.md").read_text()
    positions = [doc.find(f"`{name}/`") for name in LAYERS]
    assert -1 not in positions and positions == sorted(positions), \
        "docs/architecture.md names the packages (as `name/`) in the order of LAYERS"


def test_no_import_runs_back_up_the_data_flow():
    g = import_graph()
    assert "dfsmerge.report" in g["dfsmerge.search.loop"] and "dfsmerge.analysis.ablation" in g["dfsmerge.search.cli"]
    assert back_arrows({"dfsmerge.runtime.x": {"dfsmerge.objectives.y", "dfsmerge.genome"}}) == \
        ["dfsmerge.runtime.x -> dfsmerge.objectives.y"]
    assert back_arrows({"dfsmerge.search.cli": {"dfsmerge.analysis"}, "dfsmerge.io.x": {"dfsmerge.errors"}}) == []
    arrows = back_arrows(g)
    assert arrows == [], f"imports against the data-flow order {LAYERS}: {arrows}"


def test_only_the_command_line_imports_a_cli_module():
    g = import_graph()
    users = sorted(f"{a} -> {b}" for a, targets in g.items() for b in targets if b.endswith(".cli") and layer(a) != TOP)
    assert users == []


def _lazy_tables() -> list[tuple[str, str, str]]:
    """``(package, name, submodule)`` of every ``_EXPORTS`` table (PEP 562 lazy names) in dfsmerge."""
    out = []
    for path in PKG.rglob("__init__.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
                table = ast.literal_eval(node.value)
                out += [(_module_name(path), name, sub) for name, sub in table.items()]
    return out


@pytest.mark.parametrize("package", sorted({p for p, _, _ in _lazy_tables()}))
def test_every_lazy_name_resolves(package):
    """A lazy table names its submodules in strings, which no import statement checks: each must resolve."""
    missing = []
    for pkg, name, sub in _lazy_tables():
        if pkg == package:
            module = importlib.import_module(f"{pkg}.{sub}")
            if not hasattr(module, name):
                missing.append(f"{pkg}.{name} -> {pkg}.{sub}")
    assert missing == []
