"""Every runtime dependency earns its place, and nothing undeclared is imported.

pyproject.toml against the imports of ``onnxlady/`` (every ``import`` statement, lazy ones
inside functions included, read with ``ast``):

- each distribution of ``[project].dependencies`` must be imported somewhere;
- each imported module that is neither the standard library nor onnxlady must come from a
  declared distribution: a runtime dependency, or, for an *optional* import (one inside a
  ``try`` that catches ``ImportError``, so onnxlady works without it), an extra of
  ``[project.optional-dependencies]``.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]

#: Import names of the distributions whose import name is not their normalised project name.
IMPORT_NAMES: dict[str, str] = {
    "onnxruntime-gpu": "onnxruntime",
    "protobuf": "google.protobuf",
    "onnx-graphsurgeon": "onnx_graphsurgeon",
    "scikit-learn": "sklearn",
    "pyyaml": "yaml",
}
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}
#: Imported modules, each with the files importing it: (required imports, optional imports).
Imports = tuple[dict[str, set[Path]], dict[str, set[Path]]]


def _distribution(requirement: str) -> str:
    """The normalised distribution name of a requirement string (version and markers dropped)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unreadable requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", match[1]).lower()


def declared_distributions(pyproject: Path) -> tuple[set[str], set[str]]:
    """(runtime dependencies, distributions of every optional extra) of a pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    runtime = {_distribution(r) for r in project["dependencies"]}
    extras = {_distribution(r) for group in project.get("optional-dependencies", {}).values() for r in group}
    return runtime, extras


def import_name(distribution: str) -> str:
    """The module a distribution installs (``onnxruntime-gpu`` -> ``onnxruntime``)."""
    return IMPORT_NAMES.get(distribution, distribution.replace("-", "_"))


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type
    names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    return any(isinstance(name, ast.Name) and name.id in _IMPORT_ERRORS for name in names)


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def imported_modules(files: Iterable[Path]) -> Imports:
    """(required, optional) absolute module names imported by ``files``, each with its files.

    An import is optional when it sits in the body of a ``try`` with an ``except ImportError``
    (or ``ModuleNotFoundError``); a module imported both ways counts as required.
    """
    required: dict[str, set[Path]] = {}
    optional: dict[str, set[Path]] = {}
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        guarded = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers)
            for statement in node.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            for name in _imported(node):
                (optional if id(node) in guarded else required).setdefault(name, set()).add(path)
    for name in required:
        optional.pop(name, None)
    return required, optional


def provides(distribution: str, module: str) -> bool:
    """Whether ``module`` is (inside) the package ``distribution`` installs."""
    package = import_name(distribution)
    return module == package or module.startswith(package + ".")


def third_party(modules: Iterable[str], own: str = "onnxlady") -> set[str]:
    """The modules that are neither the standard library nor ``own``."""
    return {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != own}


def unused(declared: set[str], modules: Iterable[str]) -> set[str]:
    """Declared distributions that no module in ``modules`` comes from."""
    modules = list(modules)
    return {d for d in declared if not any(provides(d, m) for m in modules)}


def undeclared(declared: set[str], modules: Iterable[str]) -> set[str]:
    """Third-party modules that come from no declared distribution."""
    return {m for m in third_party(modules) if not any(provides(d, m) for d in declared)}


@pytest.fixture(scope="module")
def package_imports() -> Imports:
    return imported_modules(sorted((REPO / "onnxlady").rglob("*.py")))


def _where(missing: set[str], imports: dict[str, set[Path]]) -> dict[str, list[str]]:
    return {module: sorted(str(p.relative_to(REPO)) for p in imports[module]) for module in sorted(missing)}


def test_every_runtime_dependency_is_imported(package_imports: Imports) -> None:
    runtime, _ = declared_distributions(REPO / "pyproject.toml")
    missing = unused(runtime, package_imports[0])
    assert not missing, f"runtime dependencies in pyproject.toml that onnxlady/ never imports: {sorted(missing)}"


def test_every_required_import_is_a_runtime_dependency(package_imports: Imports) -> None:
    runtime, _ = declared_distributions(REPO / "pyproject.toml")
    required = package_imports[0]
    missing = undeclared(runtime, required)
    assert not missing, f"imported by onnxlady/ but not a runtime dependency: {_where(missing, required)}"


def test_every_optional_import_is_declared(package_imports: Imports) -> None:
    runtime, extras = declared_distributions(REPO / "pyproject.toml")
    optional = package_imports[1]
    missing = undeclared(runtime | extras, optional)
    assert not missing, f"optional imports of onnxlady/ in no extra of pyproject.toml: {_where(missing, optional)}"


def test_the_checks_see_planted_dependencies(tmp_path: Path) -> None:
    """An undeclared lazy import, an undeclared optional one and an unused dependency are found."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["numpy>=1.24", "onnxruntime-gpu>=1.17; platform_system == \'Linux\'",'
        ' "protobuf>=4.22", "Onnx_GraphSurgeon>=0.5"]\n'
        '[project.optional-dependencies]\nplots = ["matplotlib>=3"]\n'
    )
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    source.write_text(
        "import json\nimport numpy as np\nfrom google.protobuf.message import DecodeError\nfrom . import sibling\n\n"
        "def later():\n    import onnxruntime\n    from yaml import safe_load\n\n"
        "def optional():\n    try:\n        import matplotlib.pyplot\n        import polygraphy.json\n"
        "    except (OSError, ImportError):\n        pass\n    try:\n        import scipy\n    except ValueError:\n"
        "        pass\n"
    )
    runtime, extras = declared_distributions(pyproject)
    assert runtime == {"numpy", "onnxruntime-gpu", "protobuf", "onnx-graphsurgeon"}
    assert extras == {"matplotlib"}
    required, optional = imported_modules([source])
    assert set(optional) == {"matplotlib.pyplot", "polygraphy.json"}
    assert unused(runtime, required) == {"onnx-graphsurgeon"}
    assert undeclared(runtime, required) == {"yaml", "scipy"}  # scipy: its try catches no ImportError
    assert undeclared(runtime | extras, optional) == {"polygraphy.json"}
