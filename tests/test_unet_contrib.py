"""ONNX Runtime's diffusion operators: NhwcConv, GroupNorm, SkipGroupNorm, BiasAdd, BiasSplitGelu.

``onnxruntime.transformers.optimizer.optimize_model(..., model_type="unet")`` writes them (held-out
round 10, finding F8: its output was "different models" to the torch export). ONNX Runtime runs
them on CUDA only, so equivalence is checked on their standard-operator lowering
(:func:`fixtures.unet_contrib.lower_unet_contrib`, itself checked against numpy here); each
equivalence check also shows a permutation that ignores the rules is caught.
"""

from __future__ import annotations

import json
from math import erf
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fixtures.unet_contrib import (
    CHANNELS,
    GROUPS,
    MICROSOFT,
    contrib_unet,
    legacy_unet,
    lower_unet_contrib,
    optimize_unet,
)
from onnxlady import analyze, audit, resync, verify_models
from onnxlady._rules._registry import rule_for
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only

OPERATORS = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasAdd", "BiasSplitGelu")


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _reasons(model: onnx.ModelProto) -> list[str]:
    return [reason.message for group in analyze(model).groups for reason in group.reasons]


def _assert_equivalent_and_wrong_caught(source: onnx.ModelProto, permuted: onnx.ModelProto) -> None:
    reference = lower_unet_contrib(source)
    report = verify_models(reference, lower_unet_contrib(permuted))
    assert report.equivalent, report
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(reference, lower_unet_contrib(wrong)).equivalent


@pytest.fixture(scope="module")
def optimized() -> onnx.ModelProto:
    """ORT's UNet optimizer run on the torch-free legacy-export block."""
    return optimize_unet(legacy_unet(0))


def test_every_operator_has_a_rule() -> None:
    for op in OPERATORS:
        assert rule_for(MICROSOFT, op) is not None, op


def test_the_lowering_computes_what_the_contrib_operators_specify() -> None:
    """The stand-in for CUDA: GroupNorm (SiLU), SkipGroupNorm and BiasSplitGelu lowered, against numpy."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 4, 8)).astype(np.float32)
    skip = rng.standard_normal((1, 4, 4, 8)).astype(np.float32)
    gamma, beta, bias = (rng.standard_normal(8).astype(np.float32) for _ in range(3))
    tokens = rng.standard_normal((1, 5, 8)).astype(np.float32)
    gelu_bias = rng.standard_normal(8).astype(np.float32)
    b = GraphBuilder("lowering_check", 0)
    inputs = [b.input("x", x.shape), b.input("skip", skip.shape), b.input("tokens", tokens.shape)]
    g, s, c = (b.param(name, value) for name, value in (("gamma", gamma), ("beta", beta), ("bias", bias)))
    norm = b.custom("GroupNorm", MICROSOFT, [inputs[0], g, s], x.shape, name="norm", groups=2, activation=1, epsilon=1e-5)
    skipped = b.custom("SkipGroupNorm", MICROSOFT, [inputs[0], g, s, inputs[1], c], x.shape, name="skipped", groups=4,
                       activation=0, epsilon=1e-5)  # fmt: skip
    gated = b.custom("BiasSplitGelu", MICROSOFT, [inputs[2], b.param("gelu_bias", gelu_bias)], (1, 5, 4), name="gated")
    session = ort.InferenceSession(lower_unet_contrib(b.build([norm, skipped, gated])).SerializeToString(),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    got = session.run(None, {"x": x, "skip": skip, "tokens": tokens})

    def group_norm(values: np.ndarray, groups: int) -> np.ndarray:
        grouped = values.reshape(1, 4, 4, groups, -1).astype(np.float64)
        mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
        var = grouped.var(axis=(1, 2, 4), keepdims=True)
        return ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(values.shape) * gamma + beta

    normed = group_norm(x, 2)
    np.testing.assert_allclose(got[0], normed / (1 + np.exp(-normed)), atol=1e-5)
    np.testing.assert_allclose(got[1], group_norm(x + skip + bias, 4), atol=1e-5)
    biased = tokens + gelu_bias
    left, right = biased[..., :4], biased[..., 4:]
    gelu = 0.5 * right * (1 + np.vectorize(erf)(right / np.sqrt(2)))
    np.testing.assert_allclose(got[2], left * gelu, atol=1e-5)


def test_hand_built_diffusion_operators_carry_permutations() -> None:
    source = contrib_unet(0)
    analysis = analyze(source)
    reasons = _reasons(source)
    assert not any("no rule" in message for message in reasons), reasons
    permutable = sorted(group.size for group in analysis.groups if group.permutable)
    assert CHANNELS in permutable  # BiasSplitGelu's half: q (+) q on the 2 * CHANNELS hidden axis
    assert CHANNELS // GROUPS in permutable  # inside a GroupNorm group
    permuted, _, perms, _ = permute_copy(source, 7)
    assert perms
    _assert_equivalent_and_wrong_caught(source, permuted)


def test_the_optimizer_fuses_the_legacy_block(optimized: onnx.ModelProto) -> None:
    fused = {node.op_type for node in optimized.graph.node if node.domain == MICROSOFT}
    assert {"NhwcConv", "GroupNorm", "SkipGroupNorm"} <= fused, fused
    holds_bias = [n for n in optimized.graph.node if n.op_type == "SkipGroupNorm" and len(n.input) > 4 and n.input[4]]
    assert holds_bias  # the projection's bias, moved into the SkipGroupNorm
    assert not any("no rule" in message or "blocking" in message for message in _reasons(optimized))
    # The lowering undoes the fusions: it computes what the optimizer's input computed.
    assert verify_models(legacy_unet(0), lower_unet_contrib(optimized)).equivalent


def test_the_optimizer_output_permuted_stays_equivalent(optimized: onnx.ModelProto) -> None:
    permuted, _, perms, _ = permute_copy(optimized, 5)
    assert perms
    _assert_equivalent_and_wrong_caught(optimized, permuted)


def test_untouched_optimizer_output_audits_converted(tmp_path: Path, optimized: onnx.ModelProto) -> None:
    reference = _saved(legacy_unet(0), tmp_path / "reference.onnx")
    suspect = _saved(optimized, tmp_path / "suspect.onnx")
    result = audit(reference, suspect)
    assert result.verdict == "converted", result.to_text()


def test_a_permuted_copy_through_the_optimizer_resyncs_and_audits_permuted(tmp_path: Path) -> None:
    source = legacy_unet(0)
    permuted, _, _, key = permute_copy(source, 9)
    reference = _saved(source, tmp_path / "reference.onnx")
    suspect = _saved(optimize_unet(permuted), tmp_path / "suspect.onnx")
    key_path = tmp_path / "true.key.json"
    key_path.write_text(json.dumps(key.to_json()))
    assert resync(reference, suspect, output=tmp_path / "resynced.onnx", true_key=key_path).psi == pytest.approx(100.0)
    assert audit(reference, suspect).verdict == "permuted"


def test_the_optimizer_output_permuted_resyncs_against_itself(tmp_path: Path, optimized: onnx.ModelProto) -> None:
    """NHWC weights on both sides: the NhwcConv weight's layout maps to the canonical conv one."""
    permuted, _, _, key = permute_copy(optimized, 3)
    reference = _saved(optimized, tmp_path / "reference.onnx")
    suspect = _saved(permuted, tmp_path / "suspect.onnx")
    key_path = tmp_path / "true.key.json"
    key_path.write_text(json.dumps(key.to_json()))
    assert resync(reference, suspect, output=tmp_path / "resynced.onnx", true_key=key_path).psi == pytest.approx(100.0)
    assert audit(reference, suspect).verdict == "permuted"


@pytest.mark.parametrize(
    ("op", "attrs", "reason"),
    [
        ("SkipGroupNorm", {"groups": 4, "channels_last": 0}, "channels_last=0"),
        ("GroupNorm", {"groups": 3}, "do not split into 3 groups"),
    ],
)
def test_what_the_rules_cannot_state_freezes_with_a_reason(op: str, attrs: dict[str, int], reason: str) -> None:
    b = GraphBuilder(f"refused_{op}", 0)
    x = b.transpose(b.input("sample", (1, 3, 4, 4)), [0, 2, 3, 1], name="to_nhwc")
    x = b.custom("NhwcConv", MICROSOFT, [x, b.param("conv.weight", b.small_normal((CHANNELS, 3, 3, 3))),
                 b.param("conv.bias", b.small_normal((CHANNELS,)))], (1, 4, 4, CHANNELS), name="conv",
                 kernel_shape=[3, 3], pads=[1, 1, 1, 1])  # fmt: skip
    gamma, beta = b.param("gamma", np.ones(CHANNELS, np.float32)), b.param("beta", np.zeros(CHANNELS, np.float32))
    inputs = [x, gamma, beta, x] if op == "SkipGroupNorm" else [x, gamma, beta]
    y = b.custom(op, MICROSOFT, inputs, (1, 4, 4, CHANNELS), name="norm", epsilon=1e-5, **attrs)
    model = b.build(b.matmul(b.reshape(y, [1, 16, CHANNELS], name="tokens"), 4, name="head"))
    analysis = analyze(model)
    reasons = [r.message for group in analysis.groups for r in group.reasons]
    assert any(reason in message for message in reasons), reasons
    assert not any(group.permutable and group.size == CHANNELS for group in analysis.groups)


def test_a_changed_bias_held_by_skip_group_norm_is_seen(tmp_path: Path, optimized: onnx.ModelProto) -> None:
    """The projection bias ORT moves into SkipGroupNorm is compared like the layer's own bias."""
    tampered = copy_model(optimized)
    holder = next(n for n in tampered.graph.node if n.op_type == "SkipGroupNorm" and len(n.input) > 4 and n.input[4])
    bias = next(init for init in tampered.graph.initializer if init.name == holder.input[4])
    value = onnx.numpy_helper.to_array(bias).copy()
    value[0] += 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(value, bias.name))
    reference = _saved(legacy_unet(0), tmp_path / "reference.onnx")
    result = audit(reference, _saved(tampered, tmp_path / "suspect.onnx"))
    assert result.verdict not in ("identical", "converted", "permuted"), result.to_text()
    assert holder.input[4] in result.to_text().replace("\\_", "_")  # (markdown escapes underscores)
