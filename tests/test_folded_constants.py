"""A channel vector one model computes from constants and the other stores folded (ConViT's gating).

ConViT mixes two attention maps with ``sigmoid(g)`` and ``1 - sigmoid(g)`` of a learned per-head
``g``; ONNX Runtime's offline optimizer folds both into stored vectors. The Mul by the folded
vector is then a scale site in the suspect; in the reference the same Mul reads a vector
computed from constants alone, which is the same site, counting neither for nor against the
match. The suspect here is written by the real optimizer (``ORT_ENABLE_EXTENDED``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from fixtures.contrib import ort_optimized
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._resync._entry import resync_model
from onnxlady._resync._match import check_same_model, match_models
from onnxlady.testing import permute_copy


def gated_convnet(seed: int = 0) -> onnx.ModelProto:
    """Two conv branches mixed by ``1 - sigmoid(g)`` and ``sigmoid(g)`` (``g`` per channel), after a Softmax each.

    As in ConViT, where the gate mixes two attention maps after their Softmax.

    The gated channels are frozen (the gate is computed); the 12 hidden neurons of the head move.
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "a.w"),
        numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32), "b.w"),
        numpy_helper.from_array(rng.standard_normal((1, 8, 1, 1)).astype(np.float32), "gating"),
        numpy_helper.from_array(np.ones((1,), np.float32), "one"),
        numpy_helper.from_array(rng.standard_normal((12, 8, 1, 1)).astype(np.float32), "head.w"),
        numpy_helper.from_array(rng.standard_normal((6, 12, 1, 1)).astype(np.float32), "out.w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "a.w"], ["a"], name="a", pads=[1] * 4),
        helper.make_node("Softmax", ["a"], ["ra"], name="ra", axis=-1),
        helper.make_node("Conv", ["x", "b.w"], ["b"], name="b"),
        helper.make_node("Softmax", ["b"], ["rb"], name="rb", axis=-1),
        helper.make_node("Sigmoid", ["gating"], ["gate"], name="gate"),
        helper.make_node("Sub", ["one", "gate"], ["rest"], name="rest"),
        helper.make_node("Mul", ["rest", "ra"], ["ma"], name="ma"),
        helper.make_node("Mul", ["gate", "rb"], ["mb"], name="mb"),
        helper.make_node("Add", ["ma", "mb"], ["mixed"], name="mixed"),
        helper.make_node("Conv", ["mixed", "head.w"], ["h"], name="head"),
        helper.make_node("Relu", ["h"], ["rh"], name="rh"),
        helper.make_node("Conv", ["rh", "out.w"], ["y"], name="out"),
    ]
    graph = helper.make_graph(nodes, "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _extended(model: onnx.ModelProto) -> onnx.ModelProto:
    optimized = ort_optimized(model, "extended")
    ops = [node.op_type for node in optimized.graph.node]
    assert "Sigmoid" not in ops and "Sub" not in ops  # the optimizer folded the gating (the case under test)
    return optimized


def test_a_folded_gating_vector_pairs_with_the_computed_one() -> None:
    reference = gated_convnet()
    match = match_models(reference, _extended(reference))
    check_same_model(match)
    assert match.confidence == pytest.approx(1.0)
    # What stays unmatched is a real difference of structure, not of weights: the folded gate is
    # a stored vector the suspect's gated channels can move with; the computed one freezes them.
    assert all(item.reason.startswith("frozen in the reference") for item in match.unmatched)
    forms = {(pair.reference, pair.suspect) for pair in match.site_pairs}
    assert any(a.startswith("Mul") and b.startswith("Mul") for a, b in forms)


def test_across_the_folded_gating_resync_and_audit_still_read_the_layers() -> None:
    reference = gated_convnet()
    model, _, _, key = permute_copy(reference, 2)
    suspect = _extended(model)
    assert resync_model(reference, suspect, true_key=key).psi == pytest.approx(100.0)
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0
    # A real change of a layer weight is still one (the check above can fail).
    changed = _extended(model)
    tensor = next(t for t in changed.graph.initializer if t.name == "head.w")
    value = numpy_helper.to_array(tensor).copy()
    value[0, 0, 0, 0] += 1.0
    tensor.CopyFrom(numpy_helper.from_array(value, "head.w"))
    assert audit_models(reference, changed).verdict == "modified"


def test_a_different_model_is_still_refused() -> None:
    with pytest.raises(OnnxladyError, match="different models"):
        check_same_model(match_models(FIXTURES["vgg"](0), _extended(gated_convnet())))
