"""Operators that swap the weights they read are a graph edit (held-out round 11, finding F2).

Two layers of one weight shape made to read each other's weight: every constant still
bit-identical under its own name, audited ``identical`` ("every constant is bit-identical",
exit 0) while verify said NOT EQUIVALENT. Reading a *different* constant of the reference under
its name is now a graph edit; reading a renamed or deduplicated one (equal bytes) is not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from onnxlady import audit, verify_models
from onnxlady.testing import copy_model, permute_copy


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def _swap_weights(model: onnx.ModelProto) -> None:
    """layer1's two 16x16x3x3 convolutions read each other's weight."""
    first, second = _node(model, "layer1.conv1.conv"), _node(model, "layer1.conv2.conv")
    first.input[1], second.input[1] = second.input[1], first.input[1]


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("permuted", [False, True], ids=["as-is", "permuted"])
def test_operators_reading_each_others_weights_are_modified(tmp_path: Path, permuted: bool) -> None:
    source = FIXTURES["resnet"](0)
    suspect = permute_copy(source, 3)[0] if permuted else copy_model(source)
    _swap_weights(suspect)
    onnx.checker.check_model(suspect)
    assert not verify_models(source, suspect).equivalent  # the swap changes what it computes
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    if not permuted:  # a permuted copy's swapped weights already read as changed by resync
        assert "graph edited with the weights kept" in result.summary
        assert any("reads another of the reference's constants" in edit for edit in result.report.graph_edits)


def test_reading_a_constant_of_equal_bytes_is_no_edit(tmp_path: Path) -> None:
    """A simplifier that keeps one of two equal constants rewires a reader to the other: no edit."""
    source = FIXTURES["resnet"](0)
    weights = {tensor.name: tensor for tensor in source.graph.initializer}
    # Make layer1's two weights equal in the reference, then let the suspect read one of them twice.
    kept = numpy_helper.to_array(weights["layer1.conv1.conv.weight"])
    weights["layer1.conv2.conv.weight"].CopyFrom(numpy_helper.from_array(kept.copy(), "layer1.conv2.conv.weight"))
    suspect = copy_model(source)
    _node(suspect, "layer1.conv2.conv").input[1] = "layer1.conv1.conv.weight"
    assert verify_models(source, suspect).equivalent
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict in ("identical", "converted"), result.summary
    assert not result.report.graph_edits
    assert np.array_equal(kept, numpy_helper.to_array(weights["layer1.conv2.conv.weight"]))
