"""A compensated rescale of a neuron whose bias is an ``Add`` after its MatMul (session 16).

Exporters write a MatMul's bias as an ``Add``. The audit's scale analysis knew a Conv's or
Gemm's bias input only: a neuron's row and ``Add`` bias scaled by c and the next layer's column
by 1/c (function-preserving through the Relu) read ``modified``, the bias left "changed"; and a
rescale that left the bias as it was (the bias then added before the scale: *not*
function-preserving) read ``permuted-rescaled``, a false claim of equivalence. The ``Add``'s
constant is now read as the producer's bias.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from fixtures.models import build_matmul_mlp
from onnxlady._audit._verdicts import audit_models, canonicalize
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

_NEURON, _FACTOR = 5, 3.0


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(tensor for tensor in model.graph.initializer if tensor.name == name)).copy()


def _put(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    tensor = next(tensor for tensor in model.graph.initializer if tensor.name == name)
    tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _rescaled(model: onnx.ModelProto, *, bias: bool) -> onnx.ModelProto:
    """fc1's neuron 5 (its weight column and, if ``bias``, its ``Add`` bias) x3, fc2's input row /3."""
    changed = copy_model(model)
    weight = _array(changed, "fc1.weight")
    weight[:, _NEURON] *= _FACTOR
    _put(changed, "fc1.weight", weight)
    if bias:
        values = _array(changed, "fc1.bias")
        values[_NEURON] *= _FACTOR
        _put(changed, "fc1.bias", values)
    consumer = _array(changed, "fc2.weight")
    consumer[_NEURON, :] /= _FACTOR
    _put(changed, "fc2.weight", consumer)
    return changed


def test_a_compensated_rescale_with_an_add_bias_is_permuted_rescaled() -> None:
    reference = build_matmul_mlp()
    assert any(node.op_type == "Add" and "fc1.bias" in node.input for node in reference.graph.node)
    rescaled = _rescaled(reference, bias=True)
    assert verify_models(reference, rescaled, provider="cpu").equivalent
    report = audit_models(reference, rescaled)
    assert report.verdict == "permuted-rescaled", report.summary
    assert report.scales == {"fc1.weight": {_NEURON: report.scales["fc1.weight"][_NEURON]}}
    assert abs(report.scales["fc1.weight"][_NEURON] - _FACTOR) < 1e-4
    # Undone, the bias too: the reference's constants back.
    undone = canonicalize(rescaled, report, reference)
    assert np.allclose(_array(undone, "fc1.bias"), _array(reference, "fc1.bias"), rtol=1e-6, atol=0)
    permuted, analysis = permute_copy(reference, 1)[:2]
    assert audit_models(reference, _rescaled(permuted, bias=True)).verdict == "permuted-rescaled"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)  # a wrong permutation under the same rescale
    assert audit_models(reference, _rescaled(wrong, bias=True)).exit_code == 1


def test_a_rescale_that_leaves_the_add_bias_is_no_equivalence() -> None:
    reference = build_matmul_mlp()
    attacked = _rescaled(reference, bias=False)
    assert not verify_models(reference, attacked, provider="cpu").equivalent
    report = audit_models(reference, attacked)
    assert report.exit_code == 1 and report.verdict != "permuted-rescaled", report.summary
