"""Issue 15, small models' fixed cost: a command imports nothing while it runs.

numpy loads ``numpy.random`` lazily, on first use: permute, perturb and resync drew from it
inside their run, whose first call then paid the import (15 ms, a fifth of permuting an 11 MB
model). The modules that draw import it with themselves, so once the package's modules are
loaded (they load on first use; ``tools.bench`` loads them all before its clock) numpy's are
too. Checked in a fresh interpreter (this one has imported everything already).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from fixtures import FIXTURES

_SCRIPT = """
import io, contextlib, json, os, sys
import onnxlady
from onnxlady.cli import main
for name in onnxlady.__all__:
    getattr(onnxlady, name)
commands = json.loads(sys.argv[1])
for arguments in commands:  # each in a forked copy of this interpreter, as it stands after the import
    reader, writer = os.pipe()
    if os.fork() == 0:
        before = set(sys.modules)
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(arguments)
        imported = sorted(name for name in set(sys.modules) - before if name.startswith("numpy"))
        os.write(writer, json.dumps([code, imported]).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        print(pipe.read())
    os.wait()
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("imports") / "model.onnx"
    onnx.save(FIXTURES["vgg"](0), str(path))
    return path


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one interpreter per command")
def test_permute_perturb_and_resync_import_no_numpy_module_while_running(model: Path, tmp_path: Path) -> None:
    permuted, perturbed, resynced = tmp_path / "permuted.onnx", tmp_path / "perturbed.onnx", tmp_path / "resynced.onnx"
    commands = [  # run one after the other: resync reads what permute wrote
        ["permute", str(model), "-o", str(permuted), "--seed", "1", "--quiet"],
        ["perturb", str(model), "--noise", "0.1", "-o", str(perturbed), "--quiet"],
        ["resync", str(model), str(permuted), "-o", str(resynced), "--quiet"],
    ]
    result = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(commands)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [code for code, _ in reports] == [0, 0, 0], result.stderr
    assert [imported for _, imported in reports] == [[], [], []]
