"""ONNX's own RMSNormalization (opset 23) carries the hidden permutation like ONNX Runtime's RMSNorm.

torch's dynamo exporter writes ``nn.RMSNorm`` as ``RMSNormalization`` at opset 23 (held-out round
11, F3: the hidden group was frozen, "no rule", 48.5 % permutable). Its scale follows the
normalised axis; the mean of squares does not depend on the order.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from onnxlady import analyze, audit, resync, verify_models
from onnxlady._rules._registry import rule_for
from onnxlady._rules.contrib import SimplifiedLayerNormRule
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only

HIDDEN = 16


def rms_normalization_model() -> onnx.ModelProto:
    """MatMul -> RMSNormalization -> MatMul -> Relu -> MatMul, at opset 23."""
    b = GraphBuilder("rms_normalization", 0, opset=23)
    x = b.matmul(b.input("input", (2, 5, 8)), HIDDEN, name="up", gain=1.0)
    scale = b.param("norm.scale", b.uniform((HIDDEN,), 0.5, 1.5))
    x = b.custom("RMSNormalization", "", [x, scale], (2, 5, HIDDEN), name="norm", epsilon=1e-5, axis=-1)
    x = b.relu(b.matmul(x, 12, name="mid", gain=1.0), name="act")
    return b.build(b.matmul(x, 4, name="output", gain=1.0))


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def test_the_hidden_group_passes_through_rms_normalization(tmp_path: Path) -> None:
    assert isinstance(rule_for("", "RMSNormalization"), SimplifiedLayerNormRule)
    source = rms_normalization_model()
    analysis = analyze(source)
    sizes = sorted(group.size for group in analysis.groups if group.permutable)
    assert HIDDEN in sizes, sizes
    permuted, _, perms, key = permute_copy(source, 3)
    assert perms
    report = verify_models(source, permuted)
    assert report.equivalent, report
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))  # the scale left in place: not equivalent
    assert not verify_models(source, wrong).equivalent
    reference = _saved(source, tmp_path / "reference.onnx")
    suspect = _saved(permuted, tmp_path / "suspect.onnx")
    (tmp_path / "key.json").write_text(json.dumps(key.to_json()))
    result = resync(reference, suspect, output=tmp_path / "out.onnx", true_key=tmp_path / "key.json")
    assert result.psi == pytest.approx(100.0), result.to_text()
    assert audit(reference, suspect).verdict == "permuted"
