"""The package's import graph (read with ``ast``, nothing executed) has no cycle and no upward edge.

Layers, bottom to top (docs/ARCHITECTURE.md): core -> model -> data | interop | analysis -> training -> tasks
-> run -> tools. A module may import its own layer and the layers below; library code never imports a
command-line module. Function-level imports count as much as module-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "tiny_decoder"
# sub-package -> layer rank; top-level modules (the command-line tools) rank above everything
LAYERS = {"core": 0, "model": 1, "data": 2, "interop": 2, "analysis": 2, "training": 3, "tasks": 4, "run": 5}
TOOLS = 6
LAYER_NAMES = {0: "core", 1: "model", 2: "data/interop/analysis", 3: "training", 4: "tasks", 5: "run", 6: "tools"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOOLS) if len(parts) > 1 else TOOLS


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {name: imported_modules(path, modules) - {name} for name, path in paths.items()}
    # a package's __init__ is not an edge from the modules inside it (Python runs it first, but it is not
    # what the module depends on), so ``import tiny_decoder.model.x`` adds no edge to ``tiny_decoder.model``
    return {name: {dep for dep in deps if not name.startswith(dep + ".")} for name, deps in graph.items()}


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{name} ({LAYER_NAMES[layer(name)]}) imports {dep} ({LAYER_NAMES[layer(dep)]})"
        for name, deps in graph.items()
        for dep in deps
        if layer(dep) > layer(name)
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_upward_import() -> None:
    edges = upward_edges(import_graph())
    assert not edges, "upward imports:\n" + "\n".join(edges)


def test_every_subpackage_has_a_layer() -> None:
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert packages <= set(LAYERS), f"sub-packages without a layer in this test: {packages - set(LAYERS)}"


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        ({"tiny_decoder.core.a": {"tiny_decoder.model.b"}, "tiny_decoder.model.b": set()}, "upward"),
        ({"tiny_decoder.model.a": {"tiny_decoder.model.b"}, "tiny_decoder.model.b": {"tiny_decoder.model.a"}}, "cycle"),
    ],
)
def test_the_checks_catch_what_they_are_for(graph: dict[str, set[str]], message: str) -> None:
    if message == "upward":
        assert upward_edges(graph) == ["tiny_decoder.core.a (core) imports tiny_decoder.model.b (model)"]
    else:
        assert find_cycle(graph) == ["tiny_decoder.model.a", "tiny_decoder.model.b", "tiny_decoder.model.a"]
