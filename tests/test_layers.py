"""The package's layers import one way: each module imports only its own layer and those below.

I/O -> graph -> rules -> analysis -> transforms and verify -> matching and resync -> audit ->
provenance (fingerprints, index, find) -> testing -> public API -> CLI. Lazy imports inside functions count too: a cycle hidden in a
function body is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnxlady"

#: Rank of each layer, by the module path's first component below ``onnxlady``.
LAYERS: dict[str, int] = {
    "_errors": 0,
    "_assignment": 0,
    "_io": 0,
    "_graph": 10,
    "_rules": 20,
    "_analysis": 30,
    "_transforms": 40,
    "_verify": 40,
    "_resync": 50,
    "_audit": 60,
    "_provenance": 65,
    "testing": 70,
    "_api": 80,
    "__init__": 90,
    "cli": 100,
    "__main__": 110,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """Every onnxlady module ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("onnxlady"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnxlady"):
            for alias in node.names:  # ``from onnxlady._x import _y`` may name a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    return found


def _import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        source = _module_name(path)
        graph.add_node(source)
        for target in _imports(path):
            own_package = source.startswith(target + ".") and target != "onnxlady"  # a layer's own __init__
            if target != source and not own_package:
                graph.add_edge(source, target)
    return graph


def test_every_module_belongs_to_a_layer() -> None:
    unknown = sorted(m for m in _import_graph() if _layer(m) not in LAYERS)
    assert not unknown, f"modules outside every layer (add them to LAYERS): {unknown}"


def test_no_import_runs_back_up() -> None:
    upward = [
        f"{source} ({_layer(source)}) imports {target} ({_layer(target)})"
        for source, target in _import_graph().edges
        if LAYERS[_layer(target)] > LAYERS[_layer(source)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = _import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_exists(layer: str) -> None:
    assert (PACKAGE / layer).exists() or (PACKAGE / f"{layer}.py").exists()
