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

from fixtures.contrib import HEAD_DIM, NUM_OUTPUTS, build_bert_like, ort_optimized, ort_transformer_optimized
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

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


def test_a_factor_moved_into_an_attentions_scale_is_converted() -> None:
    """Session 15 left it ``modified``: the attention's ``scale`` changed on a kept operator counted as an edit.

    Where the factor dropped before it accounts exactly for the change, the attention computes
    what the reference's ``Mul`` and attention did; a scale off by more (x1.1) is still an edit.
    """
    reference = _scaled_attention()
    default = 1.0 / math.sqrt(_WIDTH // _HEADS)
    moved = _unscaled(reference, 0.5 * default)
    assert verify_models(reference, moved, provider="cpu").equivalent
    report = audit_models(reference, moved)
    assert report.verdict == "converted", report.summary
    off = _unscaled(reference, 0.55 * default)
    assert not verify_models(reference, off, provider="cpu").equivalent
    report = audit_models(reference, off)
    assert report.verdict == "modified", report.summary
    assert "MultiHeadAttention 'mha' has other attributes" in report.summary
    # The scale changed on its own (no factor dropped before it) is an edit too.
    assert audit_models(reference, _with_attribute(reference, "MultiHeadAttention", "scale", 0.5 * default)).verdict == "modified"
    permuted, analysis = permute_copy(reference, seed=3)[:2]
    assert audit_models(reference, _unscaled(permuted, 0.5 * default)).verdict == "permuted"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)  # a wrong permutation under the same move
    assert audit_models(reference, _unscaled(wrong, 0.5 * default)).verdict == "modified"


def _dynamic_bert_like() -> onnx.ModelProto:
    """``build_bert_like`` with a dynamic batch and each sequence's last token pooled, as HF's heads index it.

    The pooled row of sequence ``i`` is ``i * seq + seq - 1`` of the flattened logits: an integer
    ``Mul`` of a ``Range`` over the batch by a dim read from ``Shape`` (ALBERT, MobileBERT,
    SqueezeBERT and CLIP compute such indices).
    """
    model = build_bert_like(layers=2)
    graph = model.graph
    for value in graph.input:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    logits = graph.output[0].name
    del graph.output[:]
    del graph.value_info[:]
    graph.initializer.extend([numpy_helper.from_array(np.array(value, np.int64), name) for name, value in
                              (("pool.zero", 0), ("pool.one", 1), ("pool.flat", [-1, NUM_OUTPUTS]))])  # fmt: skip
    graph.node.extend([
        helper.make_node("Shape", ["input_ids"], ["pool.shape"], name="pool.shape"),
        helper.make_node("Gather", ["pool.shape", "pool.zero"], ["pool.batch"], name="pool.batch", axis=0),
        helper.make_node("Gather", ["pool.shape", "pool.one"], ["pool.seq"], name="pool.seq", axis=0),
        helper.make_node("Range", ["pool.zero", "pool.batch", "pool.one"], ["pool.rows"], name="pool.rows"),
        helper.make_node("Mul", ["pool.rows", "pool.seq"], ["pool.starts"], name="pool.starts"),
        helper.make_node("Sub", ["pool.seq", "pool.one"], ["pool.last"], name="pool.last"),
        helper.make_node("Add", ["pool.starts", "pool.last"], ["pool.index"], name="pool.index"),
        helper.make_node("Reshape", [logits, "pool.flat"], ["pool.flat_logits"], name="pool.reshape"),
        helper.make_node("Gather", ["pool.flat_logits", "pool.index"], ["pooled"], name="pool.gather", axis=0),
    ])  # fmt: skip
    graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", NUM_OUTPUTS]))
    onnx.checker.check_model(model)
    return model


def test_a_changed_alpha_is_caught_where_the_reference_computes_integers_from_a_dynamic_shape() -> None:
    """Session 16: an integer ``Mul`` computed from a shape (an index, no factor) turned the alpha check off.

    Any ``Mul`` operand the reference computes from shapes without a known value read as a scale
    a converter may fold into an attribute, so no attribute was compared: ALBERT, MobileBERT,
    SqueezeBERT and CLIP's ORT copies with an alpha changed x1.5 read ``converted``.
    """
    reference = _dynamic_bert_like()
    extended = ort_optimized(reference)
    assert sum(node.op_type == "FusedMatMul" for node in extended.graph.node) == 2
    assert any(node.op_type == "Range" for node in extended.graph.node)  # the index is still computed at run time
    assert audit_models(reference, extended).verdict == "converted"
    value = _alpha(extended) * 1.5
    changed = _with_attribute(extended, "FusedMatMul", "alpha", value)
    assert not verify_models(extended, changed, provider="cpu").equivalent
    report = audit_models(reference, changed)
    assert report.verdict == "modified", report.summary
    assert f"alpha {value:.6g}" in report.summary
    # A permuted copy through the same optimizer is still recognized, and a wrong permutation is caught.
    permuted = ort_optimized(permute_copy(reference, seed=3)[0])
    assert audit_models(reference, permuted).verdict == "permuted"
    wrong = copy_model(extended)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(extended, wrong, provider="cpu").equivalent
    assert audit_models(reference, wrong).verdict not in ("converted", "permuted", "identical")
