"""A true key written for another model is refused naming the model it was written for.

Held-out round 10: `resync moe.onnx p.onnx --true-key rwkv/p.onnx.key.json` said only "the true
key permutes group g2, which is frozen in the reference", which reads like a defect of the
reference rather than a key mixed up.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx

from fixtures import FIXTURES


def _run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxlady", *map(str, arguments)], capture_output=True, text=True, check=False)


def test_a_key_for_another_model_names_that_model(tmp_path: Path) -> None:
    for name in ("vgg", "resnet"):
        onnx.save(FIXTURES[name](0), tmp_path / f"{name}.onnx")
        assert _run("permute", tmp_path / f"{name}.onnx", "-o", tmp_path / f"{name}_p.onnx", "--seed", "3").returncode == 0
    done = _run("resync", tmp_path / "resnet.onnx", tmp_path / "resnet_p.onnx", "-o", tmp_path / "out.onnx",
                "--true-key", tmp_path / "vgg_p.onnx.key.json")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "written for 'vgg.onnx'" in done.stderr, done.stderr
    assert not (tmp_path / "out.onnx").exists()
    right = _run("resync", tmp_path / "resnet.onnx", tmp_path / "resnet_p.onnx", "-o", tmp_path / "out.onnx",
                 "--true-key", tmp_path / "resnet_p.onnx.key.json")  # fmt: skip
    assert right.returncode == 0 and "Psi over all permuted neurons: 100.00 %" in right.stdout
