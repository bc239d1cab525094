"""An attention scale computed at run time from a shape, folded by a converter (held-out round 15, F3).

torch's MultiheadAttention computes its q/k scale from the head size at run time
(``Shape -> Slice -> Cast -> Sqrt -> Div -> Sqrt``) and applies it to q and k; onnxslim, which
knows the shapes, folds that chain into one stored scalar read by both ``Mul`` nodes, and folds
a half-step ``x + 0.5 * ff(x)`` into the FFN's second Gemm. The audit compared arithmetic
constants by value: the folded scale (0.5946) was read by no ``Mul`` of the reference (which
stores none) while the reference's 0.5 was gone (in the Gemm), and an untouched copy read
``modified``. Now the reference's shape-computed scalar is evaluated as the converter folds it:
the copy reads ``converted`` (its permuted form ``permuted``), and a changed scale is caught.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.deployment import CONVERTERS
from onnxlady._audit._verdicts import audit_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._graph._shape_scalars import shape_values
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

pytest.importorskip("onnxslim")

_TOKENS, _DIM, _HIDDEN = 6, 8, 16


def _constant(name: str, value: object, dtype: type = np.float32) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype)))


def _model(batch: int | str = 1, picked: int = -1) -> onnx.ModelProto:
    """A half-step FFN and a one-head attention with a packed input projection, its scale computed from q's shape.

    ``batch``: the input's first dim (a name: dynamic); ``picked``: the dim of q the scale reads.
    """
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((_DIM, _HIDDEN)) / 3, "b1": rng.standard_normal(_HIDDEN) / 4,
        "w2": rng.standard_normal((_HIDDEN, _DIM)) / 4, "b2": rng.standard_normal(_DIM) / 4,
        "w_in": rng.standard_normal((_DIM, 3 * _DIM)) / 3,
        "w_out": rng.standard_normal((_DIM, _DIM)) / 3, "b_out": rng.standard_normal(_DIM) / 4,
    }  # fmt: skip
    node = helper.make_node
    nodes = [
        _constant("half", 0.5), _constant("one", 1.0), _constant("start", [picked], np.int64),
        _constant("end", [picked + 1 or 2**62], np.int64), _constant("split", [0, _TOKENS, 3, _DIM], np.int64),
        _constant("i0", 0, np.int64), _constant("i1", 1, np.int64), _constant("i2", 2, np.int64),
        node("MatMul", ["x", "w1"], ["f0"]), node("Add", ["f0", "b1"], ["f1"]), node("Relu", ["f1"], ["f2"]),
        node("MatMul", ["f2", "w2"], ["f3"]), node("Add", ["f3", "b2"], ["f4"]), node("Mul", ["f4", "half"], ["f5"]),
        node("Add", ["x", "f5"], ["h"]),
        node("MatMul", ["h", "w_in"], ["p0"]), node("Reshape", ["p0", "split"], ["p"]),
        node("Gather", ["p", "i0"], ["q"], axis=2), node("Gather", ["p", "i1"], ["k"], axis=2),
        node("Gather", ["p", "i2"], ["v"], axis=2),
        # the scale, computed at run time: (1 / sqrt(head size)) ** 0.5 on q and on k
        node("Shape", ["q"], ["q_shape"]), node("Slice", ["q_shape", "start", "end"], ["size"]),
        node("Cast", ["size"], ["size_f"], to=TensorProto.FLOAT), node("Sqrt", ["size_f"], ["root"]),
        node("Div", ["one", "root"], ["inverse"]), node("Sqrt", ["inverse"], ["scale"]),
        node("Mul", ["q", "scale"], ["qs"]), node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("Mul", ["kt", "scale"], ["ks"]), node("MatMul", ["qs", "ks"], ["a0"]),
        node("Softmax", ["a0"], ["a"], axis=-1), node("MatMul", ["a", "v"], ["o0"]),
        node("MatMul", ["o0", "w_out"], ["o1"]), node("Add", ["o1", "b_out"], ["o2"]), node("Add", ["h", "o2"], ["y"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "runtime_scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, _TOKENS, _DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, _TOKENS, _DIM])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


_slim = CONVERTERS["onnxslim"]  # the real onnxslim, on a copy


def _folded_scale(model: onnx.ModelProto) -> str:
    """The name of the stored scalar the converter folded the run-time scale into (read by two Muls)."""
    readers: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Mul":
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    (name,) = [name for name, count in readers.items() if count == 2 and name in stored and stored[name].size == 1]
    assert abs(float(stored[name].ravel()[0]) - _DIM**-0.25) < 1e-6  # the folded run-time value
    return name


def test_a_folded_runtime_scale_reads_converted() -> None:
    reference = _model()
    slim = _slim(reference)
    _folded_scale(slim)  # the converter folded the scale and the half step (below)
    assert not any(node.op_type == "Sqrt" for node in slim.graph.node)
    assert verify_models(reference, slim, provider="cpu").equivalent
    report = audit_models(reference, slim)
    assert report.verdict == "converted", report.summary
    assert audit_models(slim, reference).verdict == "converted"
    permuted, analysis = permute_copy(reference, seed=3)[:2]
    assert verify_models(reference, permuted, provider="cpu").equivalent
    assert audit_models(reference, _slim(permuted)).verdict == "permuted"
    # A wrong permutation (one producer's rows swapped, nothing else) is caught through the same fold.
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)
    assert not verify_models(reference, wrong, provider="cpu").equivalent
    assert audit_models(reference, _slim(wrong)).verdict == "modified"


@pytest.mark.parametrize("factor", [1.1, 0.5])
def test_a_changed_folded_scale_is_caught(factor: float) -> None:
    reference = _model()
    changed = _slim(reference)
    name = _folded_scale(changed)
    for index, tensor in enumerate(changed.graph.initializer):
        if tensor.name == name:
            value = numpy_helper.to_array(tensor) * np.float32(factor)
            changed.graph.initializer[index].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    assert not verify_models(reference, changed, provider="cpu").equivalent
    report = audit_models(reference, changed)
    assert report.verdict == "modified", report.summary
    assert "a constant outside the weights changed" in report.summary


def test_a_scale_read_from_a_dynamic_shape_is_evaluated_where_its_dim_is_known() -> None:
    """A dynamic batch leaves the head size known: the scale is evaluated; one read from the batch is not."""
    scale = shape_values(ModelGraph(_model("batch"))).scalar("scale")
    assert scale is not None and float(scale.ravel()[0]) == pytest.approx(_DIM**-0.25)
    assert shape_values(ModelGraph(_model("batch", picked=0))).scalar("scale") is None
    batch = shape_values(ModelGraph(_model(1, picked=0))).scalar("scale")  # static: 1 ** -0.25
    assert batch is not None and float(batch.ravel()[0]) == pytest.approx(1.0)
