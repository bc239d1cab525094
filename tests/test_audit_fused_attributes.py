"""Scalars a converter moves into a fused operator's attribute, changed in the converted copy (session 15).

ONNX Runtime's extended optimizer moves an attention's score scale (the ``Div`` by sqrt(head
size)) into FusedMatMul's ``alpha``; its transformer optimizer's Attention holds it in ``scale``
(0: the default 1/sqrt(head size)). No site reads such an attribute and the arithmetic constants
compared by value (:mod:`onnxlady._audit._operator_constants`) were operands only, so an ``alpha``
changed in the ORT copy audited ``converted`` while the copy computes something else. Now each
attribute's factor must be one of the reference's, one squared (a scale split between q and k)
or one times an attention's default scale, compared per operator: a value changed in one of
several attentions that share it is found. And a factor deleted before an attention counts as
held by it only where its ``scale`` took it.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.contrib import HEAD_DIM, build_bert_like, ort_optimized, ort_transformer_optimized
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy

pytest.importorskip("onnxruntime")


def _with_attribute(model: onnx.ModelProto, op_type: str, name: str, value: float) -> onnx.ModelProto:
    """``model`` with the first ``op_type``'s float attribute ``name`` set to ``value`` (added when absent)."""
    changed = copy_model(model)
    node = next(node for node in changed.graph.node if node.op_type == op_type)
    kept = [attribute for attribute in node.attribute if attribute.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, float(value))])
    return changed


def _alpha(model: onnx.ModelProto) -> float:
    node = next(node for node in model.graph.node if node.op_type == "FusedMatMul")
    return next(attribute.f for attribute in node.attribute if attribute.name == "alpha")


def test_untouched_ort_copies_read_converted() -> None:
    reference = build_bert_like(layers=2)
    extended = ort_optimized(reference)
    alphas = [node for node in extended.graph.node if node.op_type == "FusedMatMul"]
    assert len(alphas) == 2 and _alpha(extended) == pytest.approx(1.0 / math.sqrt(HEAD_DIM))  # both attentions fused
    assert audit_models(reference, extended).verdict == "converted"
    fused = ort_transformer_optimized(copy_model(reference))
    assert any(node.op_type == "Attention" for node in fused.graph.node)
    assert audit_models(reference, fused).verdict == "converted"
    # The default scale written out (what another fusion writes) is the reference's factor too.
    explicit = _with_attribute(fused, "Attention", "scale", 1.0 / math.sqrt(HEAD_DIM))
    assert audit_models(reference, explicit).verdict == "converted"
    permuted = permute_copy(reference, seed=3)[0]
    assert audit_models(reference, ort_optimized(permuted)).verdict == "permuted"


def test_a_changed_fused_matmul_alpha_is_caught() -> None:
    reference = build_bert_like(layers=2)
    extended = ort_optimized(reference)
    # One attention's alpha changed; the other still holds the reference's scale.
    value = _alpha(extended) * 1.5
    changed = _with_attribute(extended, "FusedMatMul", "alpha", value)
    assert not verify_models(extended, changed, provider="cpu").equivalent  # it computes something else
    report = audit_models(reference, changed)
    assert report.verdict == "modified", report.summary
    assert "FusedMatMul" in report.summary and f"alpha {value:.6g}" in report.summary
    permuted = permute_copy(reference, seed=3)[0]
    tampered = ort_optimized(permuted)
    tampered = _with_attribute(tampered, "FusedMatMul", "alpha", _alpha(tampered) * 1.5)
    assert audit_models(reference, tampered).verdict == "modified"


def test_a_changed_attention_scale_is_caught() -> None:
    reference = build_bert_like(layers=2)
    fused = ort_transformer_optimized(copy_model(reference))
    changed = _with_attribute(fused, "Attention", "scale", 1.5 / math.sqrt(HEAD_DIM))
    assert not verify_models(fused, changed, provider="cpu").equivalent
    report = audit_models(reference, changed)
    assert report.verdict == "modified", report.summary
    assert "Attention" in report.summary and f"scale {1.5 / math.sqrt(HEAD_DIM):.6g}" in report.summary


_SEQ, _WIDTH, _HEADS = 6, 16, 2


def _scaled_attention() -> onnx.ModelProto:
    """q, k, v projections, ``q * 0.5``, a MultiHeadAttention (default scale), an output projection."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((_WIDTH, _WIDTH)) / 3).astype(np.float32), f"{part}.w")
             for part in ("q", "k", "v", "o", "p")]  # fmt: skip
    inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    inits.append(numpy_helper.from_array((rng.standard_normal(_WIDTH) / 4).astype(np.float32), "q.b"))
    nodes = [helper.make_node("MatMul", ["x", f"{part}.w"], [f"{part}.mm" if part == "q" else part], name=f"{part}.mm")
             for part in "qkv"]  # fmt: skip
    nodes += [
        helper.make_node("Add", ["q.mm", "q.b"], ["q"], name="q.add"),
        helper.make_node("Relu", ["q"], ["q.r"], name="q.relu"),  # no site folds the factor through it
        helper.make_node("Mul", ["q.r", "half"], ["q.scaled"], name="q.scale"),
        helper.make_node("MultiHeadAttention", ["q.scaled", "k", "v"], ["ctx"], name="mha", domain="com.microsoft",
                         num_heads=_HEADS),
        helper.make_node("MatMul", ["ctx", "o.w"], ["o"], name="o.mm"),
        helper.make_node("Relu", ["o"], ["o.r"], name="relu"),
        # More operators: the audit compares the graphs only where 90 % of them keep their names.
        helper.make_node("MatMul", ["o.r", "p.w"], ["p"], name="p.mm"),
        helper.make_node("Relu", ["p"], ["y"], name="p.relu"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "mha", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _SEQ, _WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, _SEQ, _WIDTH])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def _unscaled(model: onnx.ModelProto, scale: float | None) -> onnx.ModelProto:
    """``model`` with its ``q * 0.5`` deleted (the attention reading q) and, if given, the attention's ``scale`` set."""
    changed = copy_model(model)
    node = next(node for node in changed.graph.node if node.name == "q.scale")
    changed.graph.node.remove(node)
    attention = next(node for node in changed.graph.node if node.name == "mha")
    attention.input[0] = "q.r"
    if scale is not None:
        attention.attribute.append(helper.make_attribute("scale", scale))
    return changed


def test_a_factor_deleted_before_an_attention_that_kept_its_scale_is_modified() -> None:
    """h2's ``_holds`` counted any attention as holding a factor deleted before it: ``converted``.

    It holds one only where its ``scale`` took it; here the scale is the default, as before.
    """
    reference = _scaled_attention()
    deleted = _unscaled(reference, None)
    assert not verify_models(reference, deleted, provider="cpu").equivalent
    report = audit_models(reference, deleted)
    assert report.verdict == "modified", report.summary
    assert "Mul 'q.scale' removed: its readers read its input in the suspect" in report.summary
    moved = _unscaled(reference, 0.5 / math.sqrt(_WIDTH // _HEADS))  # the factor taken into the scale
    assert verify_models(reference, moved, provider="cpu").equivalent
    assert "q.scale" not in audit_models(reference, moved).summary  # held: not named as deleted
