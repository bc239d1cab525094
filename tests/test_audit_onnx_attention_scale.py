"""ONNX's own ``Attention`` (opset 23): its ``scale`` changed in a converted copy (session 16).

torch's dynamo exporter writes ``Attention`` at opset 23 (held-out rounds 13 and 14). Its
``scale`` multiplies the scores as ONNX Runtime's attentions' does (absent: 1/sqrt(head size)),
but only the ``com.microsoft`` attentions' was compared with the reference's factors: a scale
changed in a float16 or simplified copy read ``converted``. The head size behind the default
comes from the query, ``[B, S, heads * size]`` with ``q_num_heads`` or ``[B, heads, S, size]``:
the default written out must read as the reference's, in both layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures.conversions import simplify, to_float16
from fixtures.onnx_attention import HEAD, build_onnx_attention
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

CONVERTERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {"float16": to_float16, "simplified": simplify}


def _reference(layout: str = "3d") -> onnx.ModelProto:
    """The block with its LayerNorm's scale x10: the fixture's scores are near uniform, where a scale changes little."""
    model = build_onnx_attention(0, layout=layout)
    tensor = next(tensor for tensor in model.graph.initializer if tensor.name == "ln.scale")
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 10, tensor.name))
    return model


def _with_scale(model: onnx.ModelProto, value: float) -> onnx.ModelProto:
    """``model`` with its ``Attention``'s ``scale`` set to ``value``."""
    changed = copy_model(model)
    node = next(node for node in changed.graph.node if node.op_type == "Attention")
    kept = [attribute for attribute in node.attribute if attribute.name != "scale"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("scale", float(value))])
    return changed


@pytest.mark.parametrize("layout", ["3d", "4d"])
@pytest.mark.parametrize("converter", sorted(CONVERTERS))
def test_a_changed_scale_in_a_converted_copy_is_modified(layout: str, converter: str) -> None:
    reference = _reference(layout)
    converted = CONVERTERS[converter](copy_model(reference))
    assert audit_models(reference, converted).verdict == "converted"
    # The default written out is the reference's scale: the head size read right in either layout.
    explicit = _with_scale(converted, 1.0 / math.sqrt(HEAD))
    assert verify_models(reference, explicit, provider="cpu").equivalent
    assert audit_models(reference, explicit).verdict == "converted"
    value = 1.5 / math.sqrt(HEAD)
    changed = _with_scale(converted, value)
    assert not verify_models(reference, changed, provider="cpu").equivalent  # it computes something else
    report = audit_models(reference, changed)
    assert report.verdict == "modified", report.summary
    assert "Attention" in report.summary and f"scale {value:.6g}" in report.summary


def test_a_permuted_copy_is_permuted_and_a_wrong_one_modified() -> None:
    reference = _reference()
    permuted, analysis = permute_copy(reference, 4)[:2]
    assert audit_models(reference, to_float16(copy_model(permuted))).verdict == "permuted"
    changed = _with_scale(to_float16(copy_model(permuted)), 0.5 / math.sqrt(HEAD))
    assert audit_models(reference, changed).verdict == "modified"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)  # a wrong permutation, through the same conversion
    assert audit_models(reference, to_float16(wrong)).verdict == "modified"
