"""Edits inside the operators that compute a weight from constants (held-out round 17, F4).

A weight-norm export computes ``w = g * v / ReduceL2(v)`` in the graph; an NFNet standardises
its Conv weights with a training-mode BatchNormalization. Every constant stays bit-identical
when one of those operators is changed (``ReduceL2`` made ``ReduceL1``, ``Mul`` made ``Div``,
other axes), and their values are too large, or computed by operators the audit's evaluator
lacks, to be compared as values: the audit said ``identical``. Node-for-node copies now compare
how such a weight is computed (operators, attributes, constant shapes).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only


def _weight_normed() -> onnx.ModelProto:
    """A Conv whose weight is ``g * v / ||v||`` computed in the graph, then two plain Convs."""
    rng = np.random.default_rng(5)

    def conv_weight(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp, 3, 3)) * np.sqrt(2.0 / (inp * 9))).astype(np.float32)

    initializers = [
        numpy_helper.from_array(conv_weight(8, 3), "v"),
        numpy_helper.from_array((1.0 + 0.2 * rng.standard_normal((8, 1, 1, 1))).astype(np.float32), "g"),
        numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(np.float32), "b1"),
        numpy_helper.from_array(conv_weight(12, 8), "W2"),
        numpy_helper.from_array((0.1 * rng.standard_normal(12)).astype(np.float32), "b2"),
        numpy_helper.from_array(conv_weight(4, 12), "W3"),
        numpy_helper.from_array((0.1 * rng.standard_normal(4)).astype(np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("ReduceL2", ["v"], ["norm"], name="wn_norm", axes=[1, 2, 3], keepdims=1),
        helper.make_node("Div", ["v", "norm"], ["direction"], name="wn_div"),
        helper.make_node("Mul", ["g", "direction"], ["w1"], name="wn_mul"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "W3", "b3"], ["y"], name="conv3", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "weight_normed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 12, 12])], initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _edited(model: onnx.ModelProto, node_name: str, *, op_type: str | None = None, axes: list[int] | None = None) -> onnx.ModelProto:
    changed = copy_model(model)
    node = next(item for item in changed.graph.node if item.name == node_name)
    if op_type is not None:
        node.op_type = op_type
    if axes is not None:
        next(a for a in node.attribute if a.name == "axes").ints[:] = axes
    return changed


def _equivalent(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> bool:
    return verify_models(reference, suspect, provider="cpu").equivalent


@pytest.mark.parametrize(
    ("node_name", "op_type", "axes"),
    [("wn_norm", "ReduceL1", None), ("wn_mul", "Div", None), ("wn_norm", None, [2, 3])],
    ids=["norm-L1", "mul-made-div", "other-axes"],
)
def test_an_edit_inside_a_computed_weight_is_modified(node_name: str, op_type: str | None, axes: list[int] | None) -> None:
    reference = _weight_normed()
    suspect = _edited(reference, node_name, op_type=op_type, axes=axes)
    assert not _equivalent(reference, suspect)
    report = audit_models(reference, suspect)
    assert report.verdict == "modified", report.summary
    assert "Conv 'conv1' reads other values computed from constants" in report.summary
    assert "computed by other operators or attributes" in report.summary


def test_untouched_and_permuted_copies_keep_their_verdicts() -> None:
    reference = _weight_normed()
    assert audit_models(reference, copy_model(reference)).verdict == "identical"
    permuted, analysis = permute_copy(reference, 4)[:2]
    assert _equivalent(reference, permuted)
    assert audit_models(reference, permuted).verdict == "permuted"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)  # a wrong permutation: caught
    assert not _equivalent(reference, wrong)
    assert audit_models(reference, wrong).exit_code == 1
    edited = _edited(permuted, "wn_mul", op_type="Div")
    assert audit_models(reference, edited).verdict == "modified"
