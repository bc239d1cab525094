"""ONNX Runtime's gelu approximation in a converted copy (held-out round 15, F2).

``onnxruntime.transformers.optimizer`` with ``enable_gelu_approximation`` (what Optimum's O3 and
O4 levels run) writes each Gelu (the erf form, its bias fused in) as a ``FastGelu``, the tanh
approximation. The audit counted the ``FastGelu`` operators as nonlinear operators added and said
``modified`` with "no converter adds them", which is false. Now a ``FastGelu`` that adds the bias
of a reference Gelu the suspect no longer computes exactly is the converter's approximation:
``converted``, named in the conversion details; a ``FastGelu`` that adds no reference Gelu's bias
(one appended where a Gelu was dropped) is still an edit, and so is a wrong permutation under the same conversion.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from fixtures.contrib import build_bert_like, ort_transformer_optimized
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

pytest.importorskip("onnxruntime.transformers.optimizer")


def _approximated(model: onnx.ModelProto) -> onnx.ModelProto:
    approximated = ort_transformer_optimized(copy_model(model), gelu_approximation=True)
    fast = [node for node in approximated.graph.node if node.op_type == "FastGelu"]
    assert len(fast) == 2 and all(len(node.input) > 1 and node.input[1] for node in fast)  # each layer's, bias fused
    assert not any(node.op_type in ("Erf", "Gelu", "BiasGelu") for node in approximated.graph.node)
    return approximated


def test_an_approximated_gelu_reads_converted() -> None:
    reference = build_bert_like(layers=2)
    report = audit_models(reference, _approximated(reference))
    assert report.verdict == "converted", report.summary
    assert [c.detail for c in report.conversions if c.kind == "gelu-approximated"] == [
        "gelu approximated (tanh form, FastGelu) at 2 operators"]
    assert "gelu approximated (tanh form, FastGelu)" in report.summary
    # Without the approximation no such detail is claimed.
    exact = audit_models(reference, ort_transformer_optimized(copy_model(reference)))
    assert exact.verdict == "converted" and not any(c.kind == "gelu-approximated" for c in exact.conversions)
    permuted, analysis = permute_copy(reference, seed=3)[:2]
    assert audit_models(reference, _approximated(permuted)).verdict == "permuted"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)  # a wrong permutation, through the same conversion
    assert audit_models(reference, _approximated(wrong)).verdict == "modified"


def test_a_fast_gelu_where_no_gelu_was_is_an_edit() -> None:
    reference = build_bert_like(layers=2)
    moved = _approximated(reference)
    second = [node for node in moved.graph.node if node.op_type == "FastGelu"][1]
    # The second layer's Gelu dropped (its bias still added), a FastGelu appended behind the logits
    # instead: as many FastGelu as Gelus gone, but one adds no reference Gelu's bias.
    second.op_type, second.domain = "Add", ""
    output = moved.graph.output[0].name
    for node in moved.graph.node:
        node.output[:] = [f"{output}_exact" if name == output else name for name in node.output]
    moved.graph.node.append(helper.make_node("FastGelu", [f"{output}_exact"], [output], domain="com.microsoft"))
    assert not verify_models(reference, moved, provider="cpu").equivalent
    report = audit_models(reference, moved)
    assert report.verdict == "modified", report.summary
    assert "1 more fastgelu operator" in report.summary


def test_the_approximated_copy_given_as_the_reference_reads_converted() -> None:
    """Roles swapped (session 15 left it ``modified``: "2 more gelu operators"): the same two models."""
    original = build_bert_like(layers=2)
    reference = _approximated(original)
    report = audit_models(reference, original)
    assert report.verdict == "converted", report.summary
    assert [(c.model, c.detail) for c in report.conversions if c.kind == "gelu-approximated"] == [
        ("reference", "gelu approximated (tanh form, FastGelu) at 2 operators")]
    assert "the reference's gelu approximated (tanh form, FastGelu)" in report.summary
    permuted, analysis = permute_copy(original, seed=3)[:2]
    assert audit_models(reference, permuted).verdict == "permuted"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)
    assert audit_models(reference, wrong).verdict == "modified"


def test_an_exact_gelu_added_next_to_the_swapped_approximation_is_an_edit() -> None:
    """The original as the suspect with a Gelu appended behind the logits: one more exact Gelu than FastGelus."""
    original = build_bert_like(layers=2)
    reference = _approximated(original)
    appended = copy_model(original)
    output = appended.graph.output[0].name
    for node in appended.graph.node:
        node.output[:] = [f"{output}_exact" if name == output else name for name in node.output]
    appended.graph.node.append(helper.make_node("Gelu", [f"{output}_exact"], [output], domain="com.microsoft"))
    if not any(opset.domain == "com.microsoft" for opset in appended.opset_import):
        appended.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert not verify_models(original, appended, provider="cpu").equivalent
    report = audit_models(reference, appended)
    assert report.verdict == "modified", report.summary
    assert "1 more gelu operator" in report.summary
