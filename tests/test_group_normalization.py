"""ONNX's own GroupNormalization (opset 18: scale and bias per group; opset 21: per channel).

The rule (:mod:`onnxlady._rules.normalization_groups`) lets only whole groups move, with the
channel order inside a group one shared permutation: the C channels split into a group-level
factor (G) and a within-group factor (C / G), as for the legacy export's decomposition. Each
equivalence check also shows a permutation that ignores the normalisation is caught.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxlady import analyze, audit, resync, verify_models
from onnxlady._rules._registry import rule_for
from onnxlady._rules.normalization_groups import GroupNormalizationRule
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only

CHANNELS, SIDE = 32, 8


def group_normalization_model(groups: int, opset: int) -> onnx.ModelProto:
    """Conv -> GroupNormalization(groups) -> Relu -> Conv -> global pool, at ``opset`` (18 or 21)."""
    b = GraphBuilder(f"group_normalization_{groups}_{opset}", 0, opset=opset)
    x = b.conv(b.input("input", (1, 3, SIDE, SIDE)), CHANNELS, 3, name="conv_in", gain=1.0)
    width = groups if opset < 21 else CHANNELS
    scale = b.param("norm.scale", b.uniform((width,), 0.5, 1.5))
    bias = b.param("norm.bias", b.small_normal((width,), 0.2))
    t = b.custom("GroupNormalization", "", [x, scale, bias], (1, CHANNELS, SIDE, SIDE), name="norm",
                 epsilon=1e-5, num_groups=groups)  # fmt: skip
    x = b.relu(t, name="act")
    return b.build(b.global_avg_pool(b.conv(x, 6, 3, name="conv_out", gain=1.0), name="pool"))


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def test_group_normalization_has_a_rule_and_no_longer_blocks() -> None:
    assert isinstance(rule_for("", "GroupNormalization"), GroupNormalizationRule)
    analysis = analyze(group_normalization_model(8, 21))
    reasons = [reason.message for group in analysis.groups for reason in group.reasons]
    assert not any("GroupNormalization" in message for message in reasons), reasons


@pytest.mark.parametrize(("groups", "opset"), [(8, 21), (4, 21), (8, 18), (1, 21), (32, 21)])
def test_whole_groups_move_and_the_copy_stays_equivalent(groups: int, opset: int) -> None:
    source = group_normalization_model(groups, opset)
    analysis = analyze(source)
    sizes = sorted(g.size for g in analysis.groups if g.permutable)
    if 1 < groups < CHANNELS:
        assert groups in sizes and CHANNELS // groups in sizes, sizes  # the group and within-group factors
    else:
        assert CHANNELS in sizes, sizes  # one group, or one channel per group: any channel order
    permuted, _, perms, _ = permute_copy(source, 7)
    assert perms
    report = verify_models(source, permuted)
    assert report.equivalent, report
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent


def test_a_channel_permutation_across_groups_is_not_equivalent() -> None:
    """What the rule forbids really changes the outputs: swap two channels of different groups."""
    source = group_normalization_model(8, 21)
    swapped = copy_model(source)
    weights = {init.name: init for init in swapped.graph.initializer}
    order = np.arange(CHANNELS)
    order[[0, CHANNELS - 1]] = order[[CHANNELS - 1, 0]]  # channel 0 (group 0) <-> channel 31 (group 7)
    for name, axis in (("conv_in.weight", 0), ("conv_in.bias", 0), ("norm.scale", 0), ("norm.bias", 0),
                       ("conv_out.weight", 1)):  # fmt: skip
        array = onnx.numpy_helper.to_array(weights[name])
        weights[name].CopyFrom(onnx.numpy_helper.from_array(np.take(array, order, axis=axis), name))
    assert not verify_models(source, swapped).equivalent


@pytest.mark.parametrize("opset", [21, 18])
def test_a_permuted_copy_resyncs_with_psi_100_and_audits_permuted(tmp_path: Path, opset: int) -> None:
    source = group_normalization_model(8, opset)
    permuted, _, _, key = permute_copy(source, 11)
    reference = _saved(source, tmp_path / "reference.onnx")
    suspect = _saved(permuted, tmp_path / "suspect.onnx")
    key_path = tmp_path / "true.key.json"
    key_path.write_text(json.dumps(key.to_json()))
    assert resync(reference, suspect, output=tmp_path / "resynced.onnx", true_key=key_path).psi == pytest.approx(100.0)
    assert audit(reference, suspect).verdict == "permuted"


def test_scale_of_the_wrong_length_freezes_with_a_reason() -> None:
    """Opset 21 wants one scale per channel: a per-group one there is no layout the rule knows."""
    b = GraphBuilder("group_normalization_bad_scale", 0, opset=21)
    x = b.conv(b.input("input", (1, 3, SIDE, SIDE)), CHANNELS, 3, name="conv_in", gain=1.0)
    scale = b.param("norm.scale", np.ones(8, np.float32))
    bias = b.param("norm.bias", np.zeros(8, np.float32))
    t = b.custom("GroupNormalization", "", [x, scale, bias], (1, CHANNELS, SIDE, SIDE), name="norm",
                 epsilon=1e-5, num_groups=8)  # fmt: skip
    model = b.build(b.global_avg_pool(b.conv(b.relu(t), 6, 3, name="conv_out"), name="pool"))
    analysis = analyze(model)
    reasons = [reason.message for group in analysis.groups for reason in group.reasons]
    assert any("not one value per channel" in message for message in reasons), reasons
    assert not any(g.permutable and g.size in (8, 4, CHANNELS) for g in analysis.groups)
