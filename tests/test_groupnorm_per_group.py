"""GroupNorm's groups each keep their own channel order: the family ``p (x) {q_g}`` (round 16, F2).

GroupNorm normalises each group of channels over the group: any re-ordering inside one group,
chosen independently per group, keeps the function. For the fused GroupNormalization (opset 18
and 21; ONNX Runtime's GroupNorm shares the rule) and for the legacy export's ``Reshape ->
InstanceNormalization -> Reshape``, the analysis now gives one in-group order per group, a seeded
permute draws them independently, the key (version 2, a ``grouped`` map) undoes them bit for bit,
resync restores them and the audit calls a copy re-ordered inside one group ``permuted``. A
Reshape to ``[N, G, k * H * W]`` read by anything but an InstanceNormalization keeps the shared
in-group order ``p (x) q`` (see :mod:`onnxlady._rules.normalization_groups`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxlady import OnnxladyError, analyze, audit, resync, verify_models
from onnxlady._transforms._key import PermutationKey, read_key
from onnxlady._transforms._permute import unpermute_model
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only

CHANNELS, GROUPS, SIDE = 32, 4, 6
WIDTH = CHANNELS // GROUPS


def fused_model(opset: int) -> onnx.ModelProto:
    """Conv -> GroupNormalization(4 groups of 8) -> Relu -> Conv -> global pool."""
    b = GraphBuilder(f"per_group_{opset}", 3, opset=opset)
    x = b.conv(b.input("input", (1, 3, SIDE, SIDE)), CHANNELS, 3, name="conv_in", gain=1.0)
    width = GROUPS if opset < 21 else CHANNELS
    scale = b.param("norm.scale", b.uniform((width,), 0.5, 1.5))
    bias = b.param("norm.bias", b.small_normal((width,), 0.2))
    t = b.custom("GroupNormalization", "", [x, scale, bias], (1, CHANNELS, SIDE, SIDE), name="norm",
                 epsilon=1e-5, num_groups=GROUPS)  # fmt: skip
    return b.build(b.global_avg_pool(b.conv(b.relu(t, name="act"), 6, 3, name="conv_out", gain=1.0), name="pool"))


def decomposed_model() -> onnx.ModelProto:
    """The legacy export of the same GroupNorm: Reshape -> InstanceNormalization -> Reshape -> Mul -> Add."""
    b = GraphBuilder("per_group_decomposed", 3)
    x = b.conv(b.input("input", (1, 3, SIDE, SIDE)), CHANNELS, 3, name="conv_in", gain=1.0)
    t = b.reshape(x, [1, GROUPS, -1], name="group")
    scale = b.param("norm.ones", np.ones(GROUPS, np.float32))
    shift = b.param("norm.zeros", np.zeros(GROUPS, np.float32))
    t = b.custom("InstanceNormalization", "", [t, scale, shift], (1, GROUPS, WIDTH * SIDE * SIDE),
                 name="instance", epsilon=1e-5)  # fmt: skip
    t = b.reshape(t, [1, CHANNELS, SIDE, SIDE], name="ungroup")
    t = b.mul(t, b.uniform((CHANNELS, 1, 1), 0.5, 1.5), name="gamma", const_name="value")
    t = b.add(t, b.small_normal((CHANNELS, 1, 1), 0.2), name="beta", const_name="value")
    return b.build(b.global_avg_pool(b.conv(b.relu(t, name="act"), 6, 3, name="conv_out", gain=1.0), name="pool"))


def elsewhere_model() -> onnx.ModelProto:
    """The decomposition's Reshape read by a Mul with one weight per element: no per-group order there."""
    b = GraphBuilder("per_group_elsewhere", 3)
    x = b.conv(b.input("input", (1, 3, SIDE, SIDE)), CHANNELS, 3, name="conv_in", gain=1.0)
    t = b.reshape(x, [1, GROUPS, WIDTH * SIDE * SIDE], name="group")
    t = b.mul(t, b.uniform((1, GROUPS, WIDTH * SIDE * SIDE), 0.5, 1.5), name="weigh", const_name="value")
    t = b.reshape(t, [1, CHANNELS, SIDE, SIDE], name="ungroup")
    return b.build(b.global_avg_pool(b.conv(b.relu(t, name="act"), 6, 3, name="conv_out", gain=1.0), name="pool"))


#: name -> (builder, per-channel tensors beside the convolutions': (name, axis))
MODELS = {
    "fused21": (lambda: fused_model(21), [("norm.scale", 0), ("norm.bias", 0)]),
    "fused18": (lambda: fused_model(18), []),
    "decomposed": (decomposed_model, [("gamma.value", 0), ("beta.value", 0)]),
}


def _channel_order(model: onnx.ModelProto, permuted: onnx.ModelProto) -> np.ndarray:
    """Which source channel each channel of the permuted copy holds (from conv_in's distinct bias)."""
    source = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}["conv_in.bias"]
    moved = {i.name: onnx.numpy_helper.to_array(i) for i in permuted.graph.initializer}["conv_in.bias"]
    return np.array([int(np.flatnonzero(source == value)[0]) for value in moved])


def _swapped_in_group(model: onnx.ModelProto, first: int, second: int, name: str) -> onnx.ModelProto:
    """A copy of MODELS[name] with channels ``first`` and ``second`` exchanged in every tensor that reads them."""
    order = np.arange(CHANNELS)
    order[[first, second]] = [second, first]
    return _reordered(model, order, name)


def _reordered(model: onnx.ModelProto, order: np.ndarray, name: str) -> onnx.ModelProto:
    """A copy of MODELS[name] whose channel ``c`` holds source channel ``order[c]`` in every tensor that reads them."""
    copy = copy_model(model)
    weights = {init.name: init for init in copy.graph.initializer}
    moved = [("conv_in.weight", 0), ("conv_in.bias", 0), ("conv_out.weight", 1), *MODELS[name][1]]
    for name, axis in moved:
        array = onnx.numpy_helper.to_array(weights[name])
        weights[name].CopyFrom(onnx.numpy_helper.from_array(np.take(array, order, axis=axis), name))
    return copy


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_seeded_permute_draws_a_different_order_inside_each_group(name: str) -> None:
    source = MODELS[name][0]()
    analysis = analyze(source)
    inner = [g for g in analysis.permutable_groups if g.size == WIDTH]
    assert len(inner) == GROUPS, [(g.id, g.size) for g in analysis.groups]  # one order per group
    permuted, _, _, _ = permute_copy(source, 1)
    order = _channel_order(source, permuted).reshape(GROUPS, WIDTH)
    # Whole groups move: each row of the new order is one source group ...
    assert sorted(set(order[:, 0] // WIDTH)) == list(range(GROUPS))
    assert all(len(set(row // WIDTH)) == 1 for row in order)
    # ... and the groups do not all take the same order inside.
    inside = {tuple(row % WIDTH) for row in order}
    assert len(inside) > 1, inside


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_copy_is_equivalent_and_a_permutation_across_groups_is_caught(name: str) -> None:
    source = MODELS[name][0]()
    permuted, _, _, _ = permute_copy(source, 1)
    assert verify_models(source, permuted).equivalent
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent
    across = _swapped_in_group(source, 0, CHANNELS - 1, name)  # group 0 <-> group 3
    assert not verify_models(source, across).equivalent


def test_the_key_undoes_the_per_group_orders_bit_for_bit(tmp_path: Path) -> None:
    source = fused_model(21)
    permuted, _, _, key = permute_copy(source, 1)
    document = key.to_json()
    assert document["version"] == 2 and '"grouped"' in json.dumps(document)
    restored = copy_model(permuted)
    assert unpermute_model(restored, PermutationKey.from_json(json.loads(json.dumps(document))))
    assert [i.raw_data for i in restored.graph.initializer] == [i.raw_data for i in source.graph.initializer]
    # A grouped map is refused in a version-1 key (older releases write none) ...
    with pytest.raises(OnnxladyError, match="malformed index map"):
        PermutationKey.from_json({**document, "version": 1})
    # ... and a newer version is refused: one line, exit 2.
    path = tmp_path / "v3.key.json"
    path.write_text(json.dumps({**document, "version": 3}))
    run = subprocess.run(
        [sys.executable, "-m", "onnxlady", "unpermute", str(_saved(permuted, tmp_path / "p.onnx")),
         "--key", str(path), "-o", str(tmp_path / "back.onnx")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_key_without_grouped_maps_stays_version_1() -> None:
    _, _, _, key = permute_copy(elsewhere_model(), 1)
    assert key.to_json()["version"] == 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_resync_restores_the_per_group_orders(tmp_path: Path, name: str) -> None:
    source = MODELS[name][0]()
    permuted, _, _, key = permute_copy(source, 1)
    key_path = tmp_path / "true.key.json"
    key_path.write_text(json.dumps(key.to_json()))
    reference, suspect = _saved(source, tmp_path / "r.onnx"), _saved(permuted, tmp_path / "s.onnx")
    report = resync(reference, suspect, output=tmp_path / "o.onnx", true_key=key_path, key_out=tmp_path / "o.key.json")
    assert report.psi == pytest.approx(100.0)
    out = onnx.load(tmp_path / "o.onnx")
    assert [i.raw_data for i in out.graph.initializer] == [i.raw_data for i in source.graph.initializer]
    back = copy_model(permuted)  # the key resync writes turns the suspect into the output
    assert unpermute_model(back, read_key(tmp_path / "o.key.json"))
    assert [i.raw_data for i in back.graph.initializer] == [i.raw_data for i in out.graph.initializer]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_swap_inside_one_group_audits_permuted(tmp_path: Path, name: str) -> None:
    source = MODELS[name][0]()
    inside = _swapped_in_group(source, 0, 1, name)  # channels 0 and 1: both in group 0
    assert verify_models(source, inside).equivalent
    reference = _saved(source, tmp_path / "r.onnx")
    assert audit(reference, _saved(inside, tmp_path / "in.onnx")).verdict == "permuted"
    across = _swapped_in_group(source, 0, CHANNELS - 1, name)
    assert audit(reference, _saved(across, tmp_path / "across.onnx")).verdict != "permuted"
    # resync puts the swapped copy back, bit for bit
    resync(reference, tmp_path / "in.onnx", output=tmp_path / "back.onnx")
    back = onnx.load(tmp_path / "back.onnx")
    assert [i.raw_data for i in back.graph.initializer] == [i.raw_data for i in source.graph.initializer]


def test_a_reshape_read_by_another_operator_keeps_one_shared_order_inside_the_groups() -> None:
    source = elsewhere_model()
    analysis = analyze(source)
    sizes = sorted(g.size for g in analysis.permutable_groups)
    assert sizes.count(WIDTH) == 1 and GROUPS in sizes, sizes  # p (x) q: one in-group order
    permuted, _, _, _ = permute_copy(source, 1)
    order = _channel_order(source, permuted).reshape(GROUPS, WIDTH)
    assert len({tuple(row % WIDTH) for row in order}) == 1
    assert verify_models(source, permuted).equivalent


def test_resync_across_float16_puts_groups_and_their_own_orders_back(tmp_path: Path) -> None:
    """Whole groups moved and each group re-ordered its own way, then converted: resync across restores it all."""
    from fixtures.conversions import to_float16

    source = decomposed_model()
    inside = [[1, 0, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 7, 6], [2, 3, 0, 1, 6, 7, 4, 5]]
    blocks = [2, 0, 3, 1]
    order = np.concatenate([block * WIDTH + np.asarray(inside[block]) for block in blocks])
    copy = _reordered(source, order, "decomposed")
    assert verify_models(source, copy).equivalent
    suspect = to_float16(copy)
    reference = _saved(source, tmp_path / "r.onnx")
    _saved(suspect, tmp_path / "s.onnx")
    resync(reference, tmp_path / "s.onnx", output=tmp_path / "o.onnx", key_out=tmp_path / "o.key.json")
    out = onnx.load(tmp_path / "o.onnx")
    assert {i.name: i.raw_data for i in out.graph.initializer} == {i.name: i.raw_data for i in to_float16(source).graph.initializer}
    # The key it writes turns the suspect into the output.
    back = copy_model(suspect)
    assert unpermute_model(back, read_key(tmp_path / "o.key.json"))
    assert [i.raw_data for i in back.graph.initializer] == [i.raw_data for i in out.graph.initializer]
    assert audit(reference, tmp_path / "s.onnx").verdict == "permuted"


def test_onnx_runtime_group_norm_takes_an_order_per_group() -> None:
    """ORT's GroupNorm (channels last; CUDA only, so checked on the key, not run) shares the rule."""
    b = GraphBuilder("ort_group_norm", 3)
    x = b.conv(b.input("input", (1, 3, SIDE, SIDE)), CHANNELS, 3, name="conv_in", gain=1.0)
    x = b.transpose(x, [0, 2, 3, 1], name="to_nhwc")
    gamma = b.param("norm.gamma", b.uniform((CHANNELS,), 0.5, 1.5))
    beta = b.param("norm.beta", b.small_normal((CHANNELS,), 0.2))
    t = b.custom("GroupNorm", "com.microsoft", [x, gamma, beta], (1, SIDE, SIDE, CHANNELS), name="norm",
                 groups=GROUPS, activation=0, epsilon=1e-5, channels_last=1)  # fmt: skip
    t = b.transpose(t, [0, 3, 1, 2], name="to_nchw")
    source = b.build(b.global_avg_pool(b.conv(t, 6, 3, name="conv_out", gain=1.0), name="pool"))
    analysis = analyze(source)
    assert sorted(g.size for g in analysis.permutable_groups).count(WIDTH) == GROUPS
    permuted, _, _, key = permute_copy(source, 1)
    order = _channel_order(source, permuted).reshape(GROUPS, WIDTH)
    assert all(len(set(row // WIDTH)) == 1 for row in order) and len({tuple(row % WIDTH) for row in order}) > 1
    gamma_order = {i.name: onnx.numpy_helper.to_array(i) for i in permuted.graph.initializer}["norm.gamma"]
    source_gamma = {i.name: onnx.numpy_helper.to_array(i) for i in source.graph.initializer}["norm.gamma"]
    assert np.array_equal(gamma_order, source_gamma[order.reshape(-1)])  # gamma follows the channels
    assert unpermute_model(permuted, key)
    assert [i.raw_data for i in permuted.graph.initializer] == [i.raw_data for i in source.graph.initializer]


def test_groups_that_meet_a_shared_order_elsewhere_are_tied_to_it() -> None:
    """A fused GroupNorm whose channels also pass a Reshape read by a Mul: every group takes one order, soundly."""
    b = GraphBuilder("per_group_tied", 3, opset=21)
    x = b.conv(b.input("input", (1, 3, SIDE, SIDE)), CHANNELS, 3, name="conv_in", gain=1.0)
    scale = b.param("norm.scale", b.uniform((CHANNELS,), 0.5, 1.5))
    bias = b.param("norm.bias", b.small_normal((CHANNELS,), 0.2))
    t = b.custom("GroupNormalization", "", [x, scale, bias], (1, CHANNELS, SIDE, SIDE), name="norm",
                 epsilon=1e-5, num_groups=GROUPS)  # fmt: skip
    side = b.reshape(x, [1, GROUPS, WIDTH * SIDE * SIDE], name="group")
    side = b.mul(side, b.uniform((1, GROUPS, WIDTH * SIDE * SIDE), 0.5, 1.5), name="weigh", const_name="value")
    t = b.add(t, b.reshape(side, [1, CHANNELS, SIDE, SIDE], name="ungroup"), name="join")
    source = b.build(b.global_avg_pool(b.conv(b.relu(t, name="act"), 6, 3, name="conv_out", gain=1.0), name="pool"))
    sizes = sorted(g.size for g in analyze(source).permutable_groups)
    assert sizes.count(WIDTH) == 1 and GROUPS in sizes, sizes
    permuted, _, _, key = permute_copy(source, 1)
    assert key.to_json()["version"] == 1
    assert verify_models(source, permuted).equivalent
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent
