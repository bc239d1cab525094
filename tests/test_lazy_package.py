"""A command imports what it runs: the package's names are imported on first use.

``import onnxlady`` (which ``python -m onnxlady`` and the ``onnxlady`` script do first) used to
import every command's modules: the audit, the provenance index, ONNX Runtime's comparisons,
the matching of converted copies. On an 11 MB model that was a fifth of ``permute``'s and a
quarter of ``unpermute``'s CPU time (more where Python compiles the sources on each run). Now
each name of the package is imported when first used (``onnxlady.__getattr__``), ``unpermute``
runs without the channel analysis and its rules, ``permute`` without the check it may run, and
a twin ``resync`` without the matching of converted copies. The outputs do not change (the
commands' own tests); these tests hold the imports, and the package's names, as they are.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import onnxlady
from fixtures import FIXTURES

REPO = Path(__file__).resolve().parents[1]

#: A child that runs the command line on its arguments and prints the onnxlady modules it imported.
_CHILD = """
import contextlib, io, json, sys
from onnxlady.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps([code, sorted(name for name in sys.modules if name.startswith("onnxlady"))]))
"""


def _imported(*argv: object) -> set[str]:
    """The onnxlady modules a fresh interpreter imports to run ``onnxlady ARGV`` (which must succeed)."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, argv)], cwd=REPO, capture_output=True, text=True, check=True
    )
    code, modules = json.loads(done.stdout.splitlines()[-1])
    assert code == 0, done.stderr
    return set(modules)


def _under(modules: set[str], *prefixes: str) -> list[str]:
    return sorted(name for name in modules if name.startswith(prefixes))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lazy")
    onnx.save_model(FIXTURES["vgg"](0), str(folder / "vgg.onnx"))
    return folder


def test_importing_the_package_imports_no_command() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import json, sys, onnxlady; print(json.dumps(sorted(sys.modules)))"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    modules = set(json.loads(done.stdout))
    assert _under(modules, "onnxlady.") == ["onnxlady._errors"]  # the package and its error type only


def test_each_command_imports_only_what_it_runs(models: Path) -> None:
    source, permuted = models / "vgg.onnx", models / "permuted.onnx"
    permute = _imported("permute", source, "-o", permuted, "--seed", "3", "--quiet")
    assert _under(permute, "onnxlady._audit", "onnxlady._provenance", "onnxlady._resync", "onnxlady._verify._compare") == []
    unpermute = _imported("unpermute", permuted, "--key", f"{permuted}.key.json", "-o", models / "back.onnx", "--quiet")
    assert _under(unpermute, "onnxlady._analysis", "onnxlady._rules", "onnxlady._verify", "onnxlady._resync") == []
    resync = _imported("resync", source, permuted, "-o", models / "resynced.onnx", "--quiet")
    assert "onnxlady._resync._twin" in resync  # a twin: solved directly...
    assert _under(resync, "onnxlady._resync._match", "onnxlady._resync._sites", "onnxlady._audit") == []  # ...not matched
    assert (models / "back.onnx").read_bytes() == source.read_bytes()  # the round trip still restores the bytes


def test_the_lazy_table_is_the_type_checkers_imports() -> None:
    """``_MODULES`` (what is imported on first use) names what the ``_TYPE_CHECKING`` imports say, no more, no less."""
    tree = ast.parse(Path(onnxlady.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "_TYPE_CHECKING")
    declared = {
        alias.asname or alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    table = {name: module for module, names in onnxlady._MODULES.items() for name in names.split()}
    assert declared == table
    assert set(onnxlady.__all__) <= set(table) | {"OnnxladyError"}


def test_every_name_resolves_where_it_lives() -> None:
    for name, module in onnxlady._WHERE.items():
        value = getattr(onnxlady, name)
        assert value is getattr(sys.modules[module], name), name
        if name in onnxlady.__all__:
            assert value.__module__ == "onnxlady", name
    assert set(onnxlady.__all__) <= set(dir(onnxlady))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = onnxlady.no_such_name
