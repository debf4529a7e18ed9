"""The house: no import circle among decaf_ray's and analysis' modules (imports inside functions
and the task registry's ``module:Class`` strings count), and no module too long to read in one
sitting. A circle here is what made ``experiment`` both the data layer and the entry point."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("decaf_ray", "analysis")
MAX_LINES = 420  # "about 400": a reader holds it in one sitting


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The module file ``name`` resolves to: itself, else its nearest enclosing package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> nx.DiGraph:
    """Module -> module for every import in the source, at any depth, plus the registry's
    ``"pkg.module:Class"`` strings (what ``importlib`` loads)."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                # ``from pkg import sub`` names a submodule when one exists, else a name in pkg
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in node.names]
            for imported in found:
                target = _target(imported, modules)
                if target is not None and target != name:
                    graph.add_edge(name, target)
        for ref in re.findall(r'"((?:decaf_ray|analysis)(?:\.\w+)+):\w+"', text):
            target = _target(ref, modules)
            if target is not None and target != name:
                graph.add_edge(name, target)
    return graph


def test_the_graph_sees_lazy_and_registry_imports():
    graph = import_graph()
    assert graph.has_edge("decaf_ray.experiment", "decaf_ray.runtime.ray_runtime")  # in a function
    assert graph.has_edge("decaf_ray.tasks", "decaf_ray.tasks.synthetic")  # a TASKS string


def test_no_import_circle():
    cycles = sorted(sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1)
    assert not cycles, f"import circles: {cycles}"


def test_no_module_too_long_to_read_in_one_sitting():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_library_never_imports_the_analysis_package():
    """analysis reads what runs wrote and may import decaf_ray; only the CLI (``decaf-ray plot``),
    the top of the house, imports analysis."""
    graph = import_graph()
    up = sorted((a, b) for a, b in graph.edges
                if a.startswith("decaf_ray") and b.startswith("analysis") and a != "decaf_ray.cli")
    assert not up, up
