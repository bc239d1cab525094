"""Arithmetic constants outside the weights, changed in a converted copy (held-out round 14, F1).

A CLIP-like block: ``logits = (x @ W1 + b1)``, QuickGELU (``h * sigmoid(1.702 * h)``), ``@ W2 + b2``,
a mask computed from constants added, an L2 normalization through ``Pow``, times ``exp(logit_scale)`` and
divided by an attention-like scale.
The scalars are ``Constant`` nodes in the export; onnxslim and ONNX Runtime's extended optimizer
fold, rename and deduplicate them (``Exp(logit_scale)`` stored as one value). One scalar changed in
the converted copy was read by no site, and the audit said ``converted`` while the copy computes
something else. Now the untouched converted copy (and its permuted form) still reads ``converted``
(``permuted``), and each scalar changed reads ``modified``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.contrib import ort_optimized
from fixtures.deployment import CONVERTERS
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy

pytest.importorskip("onnxslim")

_TOKENS, _DIM, _HIDDEN = 4, 16, 32


def _scalar_node(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32)))


def _model() -> onnx.ModelProto:
    """The block above, its scalars in ``Constant`` nodes as torch's exporter writes them."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((_DIM, _HIDDEN)) / 4, "b1": rng.standard_normal(_HIDDEN) / 4,
        "w2": rng.standard_normal((_HIDDEN, _DIM)) / 6, "b2": rng.standard_normal(_DIM) / 4,
    }  # fmt: skip
    nodes = [
        _scalar_node("alpha", 1.702),
        _scalar_node("root", 4.0),
        _scalar_node("log_scale", 1.5),
        _scalar_node("two", 2.0),
        _scalar_node("half", 0.5),
        _scalar_node("fill", -0.5),
        helper.make_node(
            "Constant",
            [],
            ["bits"],
            value=numpy_helper.from_array((rng.random((_TOKENS, _DIM)) < 0.5).astype(np.float32)),
        ),  # a mask, folded by both converters
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h"]),
        helper.make_node("Mul", ["h", "alpha"], ["ha"]),
        helper.make_node("Sigmoid", ["ha"], ["hs"]),
        helper.make_node("Mul", ["h", "hs"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["o0"]),
        helper.make_node("Add", ["o0", "b2"], ["o1"]),
        helper.make_node("Mul", ["bits", "fill"], ["mask"]),
        helper.make_node("Add", ["o1", "mask"], ["o"]),
        helper.make_node("Pow", ["o", "two"], ["sq"]),
        helper.make_node("ReduceSum", ["sq"], ["ss"], keepdims=1),
        helper.make_node("Pow", ["ss", "half"], ["norm"]),
        helper.make_node("Div", ["o", "norm"], ["unit"]),
        helper.make_node("Exp", ["log_scale"], ["scale"]),
        helper.make_node("Mul", ["unit", "scale"], ["us"]),
        helper.make_node("Div", ["us", "root"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "clip_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _TOKENS, _DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, _TOKENS, _DIM])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


_slim = CONVERTERS["onnxslim"]  # the real onnxslim, on a copy


_CONVERTERS = {"onnxslim": _slim, "ort-extended": ort_optimized}


def _scalars(model: onnx.ModelProto) -> list[str]:
    """The converted copy's stored float scalars and mask (of the input's size) that no MatMul or Gemm reads."""
    weighed = {name for node in model.graph.node if node.op_type in ("MatMul", "Gemm") for name in node.input}
    return [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and t.name not in weighed
            and numpy_helper.to_array(t).size in (1, _TOKENS * _DIM)]  # fmt: skip


def _changed(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` with the first element of its stored ``name`` taken to ``x * 1.5 + 0.5`` (as the held-out probe)."""
    changed = copy_model(model)
    for index, tensor in enumerate(changed.graph.initializer):
        if tensor.name == name:
            value = numpy_helper.to_array(tensor).astype(np.float64)
            value.flat[0] = value.flat[0] * 1.5 + 0.5
            changed.graph.initializer[index].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return changed


@pytest.mark.parametrize("converter", sorted(_CONVERTERS))
def test_untouched_converted_copies_read_converted(converter: str) -> None:
    reference = _model()
    converted = _CONVERTERS[converter](reference)
    assert len(converted.graph.node) < len(reference.graph.node)  # it converted
    assert verify_models(reference, converted, provider="cpu").equivalent
    assert audit_models(reference, converted).verdict == "converted"
    # Roles exchanged: the export's values the converter fused away (QuickGELU's 1.702 into an
    # attribute) are new to the converted reference, but replace none of its values.
    assert audit_models(converted, reference).verdict == "converted"
    permuted = permute_copy(reference, seed=3)[0]
    assert audit_models(reference, _CONVERTERS[converter](permuted)).verdict == "permuted"


@pytest.mark.parametrize("converter", sorted(_CONVERTERS))
def test_a_changed_scalar_in_a_converted_copy_is_caught(converter: str) -> None:
    reference = _model()
    converted = _CONVERTERS[converter](reference)
    names = _scalars(converted)
    assert len(names) >= 4  # 1.702, the Div's root (or its reciprocal), exp(1.5), the exponents, the mask
    for name in names:
        changed = _changed(converted, name)
        # The change is seen at the outputs (finite, not vanishing): a change, not storage rounding.
        assert not verify_models(reference, changed, provider="cpu").equivalent, name
        report = audit_models(reference, changed)
        assert report.verdict == "modified", (name, report.summary)
        # QuickGELU's 1.702 is also the alpha of the swish its Sigmoid computes: named as either.
        assert "a constant outside the weights changed" in report.summary or "computes swish (3.053)" in report.summary
        assert audit_models(changed, reference).verdict == "modified", name
