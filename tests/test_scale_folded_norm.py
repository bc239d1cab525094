"""A per-channel scale after a layer read past ONNX Runtime's Gemm reshapes (held-out F11, MobileBERT's NoNorm).

MobileBERT's NoNorm computes ``(x @ W + b) * w + b2`` with ``w`` per output channel. ONNX
Runtime's extended optimizer writes the 3-D MatMul + Add as ``Reshape, Gemm, Reshape`` and keeps
the Mul after the last Reshape. A Reshape that keeps the channels last leaves each channel where
it was, so the Mul is still the layer's per-channel step on both sides: the optimized copy reads
``converted`` (it read ``scaled``, the NoNorm weights taken for an attack), its permuted copy
``permuted``; one neuron's weights scaled with no compensation is still ``scaled``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures.contrib import ort_optimized
from fixtures.residual import Constant, residual_mlp
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._resync._entry import resync_model
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

_DIM, _HIDDEN, _TOKENS = 16, 32, 8


def _nonorm_block(
    x: str, p: str, constant: Constant, rng: np.random.Generator
) -> tuple[list[onnx.NodeProto], str]:
    """``relu(nonorm(x W1 + b1)) W2 + b2`` with ``nonorm(y) = y * w + b``."""
    nodes = [
        helper.make_node("MatMul", [x, constant(p + "w1", rng.normal(0.0, 0.3, (_DIM, _HIDDEN)))], [p + "mm1"]),
        helper.make_node("Add", [constant(p + "b1", rng.normal(0.0, 0.1, _HIDDEN)), p + "mm1"], [p + "add1"]),
        helper.make_node("Mul", [p + "add1", constant(p + "nn_w", rng.uniform(0.5, 1.5, _HIDDEN))], [p + "mul"]),
        helper.make_node("Add", [p + "mul", constant(p + "nn_b", rng.normal(0.0, 0.1, _HIDDEN))], [p + "nn"]),
        helper.make_node("Relu", [p + "nn"], [p + "relu"]),
        helper.make_node("MatMul", [p + "relu", constant(p + "w2", rng.normal(0.0, 0.3, (_HIDDEN, _DIM)))], [p + "mm2"]),
        helper.make_node("Add", [p + "mm2", constant(p + "b2", rng.normal(0.0, 0.1, _DIM))], [p + "add2"]),
    ]
    return nodes, p + "add2"


def _nonorm_model(seed: int = 0) -> onnx.ModelProto:
    """Two residual blocks ``x + relu(nonorm(x W1 + b1)) W2 + b2``, ``nonorm(y) = y * w + b``, then a head."""
    return residual_mlp("nonorm", _nonorm_block, dim=_DIM, tokens=_TOKENS, seed=seed)


def _optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model through ONNX Runtime's extended optimizer, which must put a Reshape between layer and Mul."""
    optimized = ort_optimized(model)
    ops = [node.op_type for node in optimized.graph.node]
    if "Gemm" not in ops or "Mul" not in ops:
        pytest.skip(f"this ONNX Runtime does not write the MatMul + Add as a Gemm before the Mul: {ops}")
    return optimized


def _scale_neuron(model: onnx.ModelProto, neuron: int, factor: float) -> onnx.ModelProto:
    """One neuron of block 0's first layer with its weights scaled, nothing compensating."""
    changed = copy_model(model)
    for index, tensor in enumerate(changed.graph.initializer):
        value = numpy_helper.to_array(tensor).copy()
        if tensor.name != "block0_w1":
            continue
        value[:, neuron] *= factor
        changed.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, tensor.name))
    return changed


def test_fixture_output_is_sane() -> None:
    import onnxruntime as ort

    model = _nonorm_model()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = np.random.default_rng(1).normal(size=(1, _TOKENS, _DIM)).astype(np.float32)
    output = session.run(None, {"x": feed})[0]
    assert 0.1 < float(np.std(output)) < 100.0  # neither vanishing nor exploding


def test_optimized_copy_reads_converted() -> None:
    reference = _nonorm_model()
    report = audit_models(reference, _optimized(reference))
    assert report.verdict == "converted" and report.exit_code == 0
    # Nothing was folded: the Mul is kept, only read past the Reshape.
    assert "scale-folded" not in {finding.kind for finding in report.conversions}


def test_optimized_permuted_copy_resyncs_and_reads_permuted() -> None:
    reference = _nonorm_model()
    permuted, _, _, key = permute_copy(reference, 7)
    suspect = _optimized(permuted)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert verify_models(suspect, result.model, provider="cpu").equivalent
    wrong = copy_model(result.model)  # ...which a wrong permutation is not
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(suspect, wrong, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0


@pytest.mark.parametrize("converted", [False, True])
def test_one_scaled_neuron_is_still_scaled(converted: bool) -> None:
    reference = _nonorm_model()
    attacked = _scale_neuron(reference, 3, 1.3)
    suspect = _optimized(attacked) if converted else attacked
    assert not verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "scaled" and report.exit_code == 1
