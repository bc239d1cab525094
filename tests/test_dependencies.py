"""Every runtime dependency earns its place, and nothing undeclared is imported.

``[project].dependencies`` of pyproject.toml against the imports of ``onnxlady/`` (every
``import`` statement, lazy ones inside functions included, read with ``ast``): each declared
distribution must be imported somewhere, and each imported module that is neither the standard
library nor onnxlady must come from a declared distribution.
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


def declared_distributions(pyproject: Path) -> set[str]:
    """The distribution names (lower case) of ``[project].dependencies``, markers dropped."""
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    names = set()
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        assert match, f"unreadable requirement {requirement!r}"
        names.add(re.sub(r"[-_.]+", "-", match[1]).lower())
    return names


def import_name(distribution: str) -> str:
    """The module a distribution installs (``onnxruntime-gpu`` -> ``onnxruntime``)."""
    return IMPORT_NAMES.get(distribution, distribution.replace("-", "_"))


def imported_modules(files: Iterable[Path]) -> dict[str, set[Path]]:
    """Absolute module names imported by ``files``, each with the files importing it."""
    found: dict[str, set[Path]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name, set()).add(path)
    return found


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
def package_imports() -> dict[str, set[Path]]:
    return imported_modules(sorted((REPO / "onnxlady").rglob("*.py")))


def test_every_declared_dependency_is_imported(package_imports: dict[str, set[Path]]) -> None:
    missing = unused(declared_distributions(REPO / "pyproject.toml"), package_imports)
    assert not missing, f"declared in pyproject.toml but imported nowhere in onnxlady/: {sorted(missing)}"


def test_every_third_party_import_is_declared(package_imports: dict[str, set[Path]]) -> None:
    missing = undeclared(declared_distributions(REPO / "pyproject.toml"), package_imports)
    where = {module: sorted(str(p.relative_to(REPO)) for p in package_imports[module]) for module in sorted(missing)}
    assert not missing, f"imported by onnxlady/ but not declared in pyproject.toml: {where}"


def test_the_checks_see_a_planted_dependency(tmp_path: Path) -> None:
    """A lazy import of an undeclared module, and a declared distribution nobody imports, are found."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["numpy>=1.24", "onnxruntime-gpu>=1.17; platform_system == \'Linux\'",'
        ' "protobuf>=4.22", "Onnx_GraphSurgeon>=0.5"]\n'
    )
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    source.write_text(
        "import json\nimport numpy as np\nfrom google.protobuf.message import DecodeError\nfrom . import sibling\n\n"
        "def later():\n    import onnxruntime\n    from yaml import safe_load\n"
    )
    declared = declared_distributions(pyproject)
    assert declared == {"numpy", "onnxruntime-gpu", "protobuf", "onnx-graphsurgeon"}
    modules = imported_modules([source])
    assert unused(declared, modules) == {"onnx-graphsurgeon"}
    assert undeclared(declared, modules) == {"yaml"}
