"""Graph edits that keep every weight are modifications (held-out round 10, finding F9).

One ``Relu`` made an ``Abs``, a residual ``Add`` a ``Sub``, a ``Neg`` inserted, a ``Gemm``'s
``alpha`` doubled: every weight the reference's, and each was audited ``identical`` or
``permuted`` ("functionally equivalent", exit 0) while verify said NOT EQUIVALENT. The audit now
compares a node-for-node copy's operators with the reference's; what permute, unpermute and
resync write (constants changed only) stays ``identical`` / ``permuted``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import helper

from fixtures import FIXTURES
from onnxlady import audit, resync, unpermute, verify_models
from onnxlady.testing import copy_model, permute_copy


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def _relu_to_abs(model: onnx.ModelProto) -> None:
    _node(model, "layer1.conv1.relu").op_type = "Abs"


def _add_to_sub(model: onnx.ModelProto) -> None:
    _node(model, "layer2.add").op_type = "Sub"


def _gemm_alpha(model: onnx.ModelProto) -> None:
    _node(model, "logits").attribute.append(helper.make_attribute("alpha", 2.0))


def _insert_neg(model: onnx.ModelProto) -> None:
    nodes = list(model.graph.node)
    at = next(i for i, node in enumerate(nodes) if node.name == "layer1.conv1.relu")
    relu = nodes[at]
    original = relu.output[0]
    relu.output[0] = f"{original}.before_neg"
    nodes.insert(at + 1, helper.make_node("Neg", [relu.output[0]], [original], name="inserted.neg"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


EDITS: dict[str, Callable[[onnx.ModelProto], None]] = {
    "relu-to-abs": _relu_to_abs, "add-to-sub": _add_to_sub, "gemm-alpha": _gemm_alpha, "insert-neg": _insert_neg,
}  # fmt: skip


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("permuted", [False, True], ids=["as-is", "permuted"])
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_graph_with_the_weights_kept_is_modified(tmp_path: Path, edit: str, permuted: bool) -> None:
    source = FIXTURES["resnet"](0)
    suspect = permute_copy(source, 3)[0] if permuted else copy_model(source)
    EDITS[edit](suspect)
    onnx.checker.check_model(suspect)
    assert not verify_models(source, suspect).equivalent  # the edit changes what it computes
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "graph edited with the weights kept" in result.summary
    assert result.report.graph_edits


def test_what_onnxlady_itself_writes_is_no_graph_edit(tmp_path: Path) -> None:
    """permute (shared constants untied), resync and unpermute change constants only."""
    source = FIXTURES["shared_initializer"](0)
    permuted, _, perms, key = permute_copy(source, 5)
    assert perms and verify_models(source, permuted).equivalent
    reference = _saved(source, tmp_path / "reference.onnx")
    suspect = _saved(permuted, tmp_path / "suspect.onnx")
    result = audit(reference, suspect)
    assert result.verdict == "permuted" and result.report.graph_edits == [], result.summary
    resynced = resync(reference, suspect, output=tmp_path / "resynced.onnx")
    assert audit(reference, tmp_path / "resynced.onnx").exit_code == 0
    restored = unpermute(suspect, key=resynced.key, output=tmp_path / "restored.onnx")
    assert restored is not None
    assert audit(reference, tmp_path / "restored.onnx").verdict in ("identical", "permuted")
