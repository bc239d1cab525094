"""A BatchNormalization no Conv absorbs, as ONNX Runtime's NCHWc layout writes it: a depthwise 1x1 Conv.

ConvMixer puts its BatchNorm after the activation, so no Conv folds it; ``ORT_ENABLE_ALL`` on an
x86 CPU writes each such BatchNorm as a ``com.microsoft.nchwc`` Conv of weight ``gamma /
sqrt(var + eps)`` ``[C', 1, 1, 1]`` and bias ``beta - mean * that`` (channels padded to a whole
block; a residual Add after it fused as its fourth input). Held-out round 13, F2: every such
suspect was refused as "different models: 0.0 %". Every suspect here is the real optimizer's
output; the tests skip where this CPU makes it write no NCHWc node (no AVX2).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from fixtures.contrib import ort_optimized
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._resync._entry import resync_model
from onnxlady._resync._match import check_same_model, match_models
from onnxlady._resync._nchwc_forms import NCHWC
from onnxlady._verify._compare import verify_models
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def _gelu(b: GraphBuilder, x: str, name: str) -> str:
    """GELU as torch exports it (Div, Erf, Add, Mul, Mul): ONNX Runtime fuses it into one Gelu."""
    with b.scope(name):
        y = b.erf(b.div(x, np.array(np.sqrt(2.0), np.float32), name="div"), name="erf")
        y = b.add(y, np.array(1.0, np.float32), name="add")
        return b.mul(b.mul(x, y, name="mul"), np.array(0.5, np.float32), name="half")


def convmixer(seed: int = 0, width: int = 24) -> onnx.ModelProto:
    """A small ConvMixer: patch Conv, Relu, BatchNorm; blocks of depthwise Conv, GELU, BatchNorm, residual Add, 1x1 Conv, GELU, BatchNorm.

    24 channels: no whole block of 8 or 16, so the optimizer pads every weight it writes.
    """
    b = GraphBuilder("convmixer", seed)
    x = b.input("input", (1, 3, 32, 32))
    with b.scope("stem"):
        x = b.batchnorm(b.relu(b.conv(x, width, 4, 4, pad=0, name="conv"), name="relu"), name="bn")
    for i in range(2):
        with b.scope(f"block{i}"):
            y = b.batchnorm(_gelu(b, b.conv(x, width, 5, group=width, name="dw"), "dw_gelu"), name="dw_bn")
            x = b.add(x, y, name="residual")
            x = b.batchnorm(_gelu(b, b.conv(x, width, 1, name="pw"), "pw_gelu"), name="pw_bn")
    with b.scope("head"):
        x = b.flatten(b.global_avg_pool(x, name="pool"), name="flatten")
    return b.build(b.gemm(x, 10, name="logits"))


def _all(model: onnx.ModelProto) -> onnx.ModelProto:
    optimized = ort_optimized(model, "all")
    if not any(node.domain == NCHWC for node in optimized.graph.node):
        pytest.skip("this CPU makes ONNX Runtime write no NCHWc nodes (no AVX2)")
    return optimized


def _scale_one_channel(model: onnx.ModelProto, name: str, channel: int, factor: float) -> onnx.ModelProto:
    changed = copy_model(model)
    tensor = next(t for t in changed.graph.initializer if t.name == name)
    value = numpy_helper.to_array(tensor).copy()
    value[channel] *= factor
    tensor.CopyFrom(numpy_helper.from_array(value, name))
    return changed


def test_the_optimizer_writes_every_batchnorm_as_an_nchwc_depthwise_conv() -> None:
    """What the pairing below has to read (this can fail): no BatchNorm left, one 1x1 NCHWc Conv per BatchNorm."""
    suspect = _all(convmixer())
    assert not [node for node in suspect.graph.node if node.op_type == "BatchNormalization"]
    shapes = {t.name: tuple(t.dims) for t in suspect.graph.initializer}
    as_conv = [node for node in suspect.graph.node if node.domain == NCHWC and node.op_type == "Conv"
               and shapes.get(node.input[1], ())[1:] == (1, 1, 1)]  # fmt: skip
    assert len(as_conv) == 5
    assert any(len(node.input) == 4 for node in as_conv)  # a residual Add fused as its fourth input
    assert all(shapes[node.input[1]][0] > 24 for node in as_conv)  # padded to a whole block


def test_resync_across_a_batchnorm_written_as_an_nchwc_conv() -> None:
    """REF vs ORT_ENABLE_ALL(permuted REF): Psi 100, exactly the key's permutations; a wrong one is caught."""
    reference = convmixer()
    model, _, _, key = permute_copy(reference, 7)
    suspect = _all(model)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    for gid, perm in key.permutations().items():
        assert np.array_equal(np.argsort(result.across.matches[gid]), perm), gid
    assert verify_models(suspect, result.model, provider="cpu").equivalent
    findings = {finding.detail for finding in result.across.match.conversions}
    assert "5 BatchNormalization written as a per-channel 1x1 convolution" in findings
    # A wrong permutation (producers only) computes something else; through the optimizer, audit
    # does not call it a permutation.
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent
    report = audit_models(reference, _all(wrong))
    assert report.verdict == "modified" and report.exit_code == 1


def test_audit_reads_the_batchnorm_written_as_an_nchwc_conv() -> None:
    reference = convmixer()
    report = audit_models(reference, _all(reference))
    assert report.verdict == "converted" and report.exit_code == 0
    model, _, _, _ = permute_copy(reference, 5)
    report = audit_models(reference, _all(model))
    assert report.verdict == "permuted" and report.exit_code == 0
    assert {"nchwc", "batchnorm-folded", "ort-optimized"} <= {finding.kind for finding in report.conversions}


@pytest.mark.parametrize("tensor", ["block0.dw_bn.scale", "block1.pw_bn.var", "stem.bn.mean"])
def test_a_changed_batchnorm_is_a_modification(tensor: str) -> None:
    """One channel of one BatchNorm changed before optimizing (its scale, variance or mean): `modified`."""
    reference = convmixer()
    model, _, _, _ = permute_copy(reference, 5)
    changed = _scale_one_channel(model, tensor, 3, 1.3 if not tensor.endswith("mean") else -2.0)
    report = audit_models(reference, _all(changed))
    assert report.verdict == "modified" and report.exit_code == 1
    # Named by the reference's BatchNorm: a changed mean or variance moves the folded weight or bias.
    layer = tensor.rsplit(".", 1)[0]
    assert f"{layer}.scale" in report.summary or f"{layer}.bias" in report.summary, report.summary


def test_a_changed_nchwc_batchnorm_weight_is_a_modification() -> None:
    """One channel of the stored ``gamma / sqrt(var + eps)`` changed after optimizing: `modified`."""
    reference = convmixer()
    suspect = _all(reference)
    shapes = {t.name: tuple(t.dims) for t in suspect.graph.initializer}
    node = next(node for node in suspect.graph.node if node.domain == NCHWC and node.op_type == "Conv"
                and shapes[node.input[1]][1:] == (1, 1, 1))  # fmt: skip
    report = audit_models(reference, _scale_one_channel(suspect, node.input[1], 2, 1.2))
    assert report.verdict == "modified" and report.exit_code == 1


def test_match_pairs_each_batchnorm_with_its_nchwc_conv_both_ways() -> None:
    reference = convmixer()
    suspect = _all(reference)
    for mine, theirs, side in ((reference, suspect, "suspect"), (suspect, reference, "reference")):
        match = match_models(mine, theirs)
        check_same_model(match)
        assert match.confidence == pytest.approx(1.0)
        norms = [pair for pair in match.site_pairs if "BatchNormalization" in (pair.reference + pair.suspect)]
        assert len(norms) == 5 and all(pair.method == "structure" for pair in norms)
        assert any(f.kind == "batchnorm-folded" and f.model == side for f in match.conversions)


def test_another_model_through_ort_enable_all_is_still_refused() -> None:
    """Reading BatchNorms as convolutions does not make different models pair."""
    for other in (FIXTURES["resnet"](0), FIXTURES["mobilenet"](0)):
        match = match_models(other, _all(convmixer()))
        with pytest.raises(OnnxladyError, match="different models"):
            check_same_model(match)
