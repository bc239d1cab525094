"""A per-channel layer scale folded into the layer before it (issue 12, timm's EdgeNeXt).

timm's layer scale computes ``gamma * (x @ W + b)`` with a constant ``gamma`` per output
channel; onnxslim folds it into the layer (a Gemm with weight ``W * gamma`` and bias
``b * gamma``), as it folds a BatchNorm. A matched unit absorbs that Mul, so audit reads the
slimmed reference as ``converted`` and a slimmed permuted copy as ``permuted``, naming the
fold ``scale-folded``; resync puts every neuron back; a real weight change is still a change.
The fixture goes through the real onnxslim (skipped with the reason where it does not import
or does not fold the scale).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures.residual import Constant, residual_mlp
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._resync._entry import resync_model
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

_DIM, _HIDDEN, _TOKENS = 16, 32, 8


def _layer_scale_block(
    x: str, p: str, constant: Constant, rng: np.random.Generator
) -> tuple[list[onnx.NodeProto], str]:
    """``g2 * (relu(g1 * (x W1 + b1)) W2 + b2)``."""
    w1 = constant(p + "w1", rng.normal(0.0, 0.3, (_DIM, _HIDDEN)))
    b1 = constant(p + "b1", rng.normal(0.0, 0.1, _HIDDEN))
    g1 = constant(p + "gamma1", rng.uniform(0.5, 1.5, _HIDDEN))
    w2 = constant(p + "w2", rng.normal(0.0, 0.3, (_HIDDEN, _DIM)))
    b2 = constant(p + "b2", rng.normal(0.0, 0.1, _DIM))
    g2 = constant(p + "gamma2", rng.uniform(0.5, 1.5, _DIM))
    nodes = [
        helper.make_node("MatMul", [x, w1], [p + "mm1"]),
        helper.make_node("Add", [p + "mm1", b1], [p + "add1"]),
        helper.make_node("Mul", [p + "add1", g1], [p + "scaled1"]),
        helper.make_node("Relu", [p + "scaled1"], [p + "relu"]),
        helper.make_node("MatMul", [p + "relu", w2], [p + "mm2"]),
        helper.make_node("Add", [p + "mm2", b2], [p + "add2"]),
        helper.make_node("Mul", [g2, p + "add2"], [p + "scaled2"]),  # the constant first, too
    ]
    return nodes, p + "scaled2"


def _layer_scale_model(seed: int = 0) -> onnx.ModelProto:
    """Two residual blocks ``x + g2 * (relu(g1 * (x W1 + b1)) W2 + b2)``, then a head."""
    return residual_mlp("layer_scale", _layer_scale_block, dim=_DIM, tokens=_TOKENS, seed=seed)


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model through the real onnxslim, which must fold the layer scales away."""
    try:
        import onnxslim  # an optional converter, imported where the test needs it
    except ImportError as error:  # pragma: no cover - depends on the environment
        pytest.skip(f"onnxslim does not import here: {error}")
    slimmed = onnxslim.slim(copy_model(model))
    muls = sum(node.op_type == "Mul" for node in slimmed.graph.node)
    if muls:
        pytest.skip(f"this onnxslim does not fold the layer scale ({muls} Mul left)")
    return slimmed


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    raise KeyError(name)


def _get(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_fixture_output_is_sane() -> None:
    import onnxruntime as ort

    model = _layer_scale_model()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = np.random.default_rng(1).normal(size=(1, _TOKENS, _DIM)).astype(np.float32)
    output = session.run(None, {"x": feed})[0]
    assert 0.1 < float(np.std(output)) < 100.0  # neither vanishing nor exploding


def test_slimmed_reference_reads_converted() -> None:
    reference = _layer_scale_model()
    suspect = _slim(reference)
    report = audit_models(reference, suspect)
    assert report.verdict == "converted" and report.exit_code == 0
    folded = [finding for finding in report.conversions if finding.kind == "scale-folded"]
    assert [finding.model for finding in folded] == ["suspect"]
    assert folded[0].detail.startswith("4 per-channel scales")
    # The other way round: the reference is the folded one.
    report = audit_models(suspect, reference)
    assert report.verdict == "converted" and report.exit_code == 0
    assert [f.model for f in report.conversions if f.kind == "scale-folded"] == ["reference"]


def test_slimmed_permuted_copy_resyncs_and_reads_permuted() -> None:
    reference = _layer_scale_model()
    permuted, _, _, key = permute_copy(reference, 7)
    suspect = _slim(permuted)
    before = suspect.SerializeToString()
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert suspect.SerializeToString() == before  # the suspect was not modified
    assert verify_models(suspect, result.model, provider="cpu").equivalent
    # ...which a wrong permutation would not be (the check above can fail).
    wrong = copy_model(result.model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(suspect, wrong, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0
    assert "scale-folded" in {finding.kind for finding in report.conversions}


def test_same_form_permuted_copy_is_unchanged() -> None:
    reference = _layer_scale_model()
    permuted, _, _, _ = permute_copy(reference, 7)
    report = audit_models(reference, permuted)
    assert report.verdict == "permuted" and report.exit_code == 0
    assert "scale-folded" not in {finding.kind for finding in report.conversions}


@pytest.mark.parametrize(
    ("tensor", "verdict"),
    [
        ("block0_w1", "modified"),
        ("block1_w2", "modified"),
        ("block1_b1", "modified"),
        # onnxslim folds the layer scale into a Gemm's weight and bias: five neurons scaled, weight
        # and bias alike, which the audit names (the reference's MatMul + bias Add read as one producer)
        ("block0_gamma1", "scaled"),
        ("block1_b2", "modified"),  # on the frozen residual stream: compared through its paired site
        ("block1_gamma2", "modified"),  # on the frozen residual stream, but folded into a compared weight
    ],
)
def test_a_real_change_before_slimming_is_still_a_change(tensor: str, verdict: str) -> None:
    reference = _layer_scale_model()
    changed = copy_model(reference)
    value = _get(changed, tensor).copy()
    value.reshape(-1)[:5] *= 1.2  # a few weights, well above float32 rounding
    _set(changed, tensor, value)
    report = audit_models(reference, _slim(changed))
    assert report.verdict == verdict and report.exit_code == 1


def test_a_changed_scale_in_the_same_form_is_a_change() -> None:
    reference = _layer_scale_model()
    changed = copy_model(reference)
    value = _get(changed, "block1_gamma2").copy()
    value[3] *= 1.2
    _set(changed, "block1_gamma2", value)
    report = audit_models(reference, changed)
    assert report.verdict == "modified" and report.exit_code == 1
