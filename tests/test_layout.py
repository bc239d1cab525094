"""Layout, index maps and control flow (issue: "Coverage: layout and index maps; control flow").

- the fixtures of ``fixtures/layout.py``: permute -> verify -> unpermute with several seeds, a
  wrong permutation caught, and the expected groups with their index maps;
- DepthToSpace / SpaceToDepth: the index maps against ONNX Runtime, including the wrong form
  (DCR and CRD swapped) that verification must reject, and a permuted spatial axis;
- Reshape with several permuted axes (channel shuffle, GroupNorm decomposition), Flatten of
  two permuted axes, a dynamic batch;
- If / Loop reading outer-scope activations and initializers: their bodies are analysed (the
  groups they read stay permutable), a weight shared with the main graph takes one permutation
  for both (their groups joined, no copy), both branches run equivalent (see tests/test_recurrent.py for the rest).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from fixtures import layout as layout_fixtures
from onnxlady import (
    ChannelAnalysis,
    analyze,
    draw_permutations,
    permute_model,
    unpermute_model,
    verify_models,
)
from onnxlady._transforms._permute import _permute_tensor, _tensor_holders
from onnxlady._verify._compare import generate_inputs
from onnxlady.testing import (
    GraphBuilder,
    constant_bytes,
    copy_model,
    group_at,
    index_maps,
    permute_producer_only,
)

LAYOUT_FIXTURES = sorted(layout_fixtures.FIXTURES)


# -- helpers ------------------------------------------------------------------------------
@functools.cache
def _fixture_bytes(name: str) -> bytes:
    return FIXTURES[name](0).SerializeToString()


def _fixture(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_fixture_bytes(name))


_maps, _group = index_maps, group_at


def _map(analysis: ChannelAnalysis, tensor: str, axis: int) -> str:
    (index_map,) = _maps(analysis, tensor, axis).values()
    return index_map


def _permute(source: onnx.ModelProto, seed: int):
    model = copy_model(source)
    analysis = analyze(model)
    perms = draw_permutations(analysis, seed)
    key = permute_model(analysis, perms, seed=seed)
    return model, analysis, perms, key


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(_tensor_holders(model)[name])


def _roundtrip(source: onnx.ModelProto, seed: int, iterations: int = 2) -> ChannelAnalysis:
    """Permute with ``seed``: equivalent, weights changed, unpermuted bit for bit."""
    model, analysis, perms, key = _permute(source, seed)
    assert perms, "nothing was permuted"
    assert constant_bytes(model) != constant_bytes(source)
    report = verify_models(source, model, provider="cpu", iterations=iterations, seed=seed)
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()
    return analysis


def _set(model: onnx.ModelProto, name: str, axis: int, index: np.ndarray) -> None:
    """Permute a constant of ``model`` along ``axis`` by hand (``new = take(old, index)``)."""
    _permute_tensor(_tensor_holders(model)[name], [(axis, np.asarray(index))])


def _kron(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Index array of the mixed-radix permutation ``outer (x) inner``."""
    return (np.asarray(outer)[:, None] * len(inner) + np.asarray(inner)[None, :]).reshape(-1)


# -- every layout fixture -----------------------------------------------------------------
def test_layout_fixtures_are_registered_and_runnable() -> None:
    assert set(LAYOUT_FIXTURES) == {
        "nhwc_convnet", "channel_shuffle", "shufflenet_v2", "depth_to_space", "if_branch", "lstm_head",
        "reshape_maps", "axis_ops",
    }
    assert set(LAYOUT_FIXTURES) <= layout_fixtures.RUNNABLE


@pytest.mark.parametrize("name", LAYOUT_FIXTURES)
@pytest.mark.parametrize("seed", [5, 17])
def test_permute_verify_unpermute(name: str, seed: int) -> None:
    _roundtrip(_fixture(name), seed)


@pytest.mark.parametrize("name", LAYOUT_FIXTURES)
def test_wrong_permutation_is_caught(name: str) -> None:
    source = _fixture(name)
    model = copy_model(source)
    permute_producer_only(model, analyze(model))
    assert not verify_models(source, model, provider="cpu").equivalent


@pytest.mark.parametrize("name", ["channel_shuffle", "shufflenet_v2", "reshape_maps", "depth_to_space"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_restricted_index_maps_hold_for_any_seed(name: str, seed: int) -> None:
    _roundtrip(_fixture(name), seed, iterations=1)


# -- NHWC -----------------------------------------------------------------------------------
def test_nhwc_groups_bind_last_axis_constants() -> None:
    analysis = analyze(_fixture("nhwc_convnet"))
    first = _group(analysis, "block1.conv.weight", 0)
    assert first.permutable and first.size == 16
    for tensor, axis in [("block1.bias.value", 0), ("block1.scale.value", 0), ("block2.conv.weight", 1),
                         ("block1.to_nhwc", 3), ("block2.to_nchw", 1)]:
        assert _group(analysis, tensor, axis) is first, tensor
    second = _group(analysis, "block2.conv.weight", 0)
    assert second.permutable and second.size == 32
    # The depthwise conv, the [1, 1, 1, C] bias, the NHWC residual and the head all join it.
    for tensor, axis in [("block2.bias.value", 0), ("block3.depthwise.weight", 0), ("block3.bias.value", 3),
                         ("block3.residual", 3), ("head.pool", 1), ("logits.weight", 0)]:
        assert _group(analysis, tensor, axis) is second, tensor
    assert all(g.frozen for g in analysis.groups if g not in (first, second))


def test_nhwc_bias_on_the_last_axis_moves_with_the_conv_rows() -> None:
    source = _fixture("nhwc_convnet")
    model, analysis, perms, _ = _permute(source, seed=3)
    p = perms[_group(analysis, "block1.conv.weight", 0).id]
    q = perms[_group(analysis, "block2.conv.weight", 0).id]
    assert np.array_equal(_array(model, "block1.conv.weight"), _array(source, "block1.conv.weight")[p])
    assert np.array_equal(_array(model, "block1.bias.value"), _array(source, "block1.bias.value")[p])
    assert np.array_equal(_array(model, "block1.scale.value"), _array(source, "block1.scale.value")[p])
    assert np.array_equal(_array(model, "block3.bias.value"), _array(source, "block3.bias.value")[..., q])
    assert np.array_equal(_array(model, "block2.conv.weight"), _array(source, "block2.conv.weight")[q][:, p])


# -- channel shuffle ------------------------------------------------------------------------
def test_channel_shuffle_interleaves_the_concat_operands() -> None:
    analysis = analyze(_fixture("channel_shuffle"))
    # Unit 1 concatenates its passthrough half L (8) and its branch output D (8); the shuffle
    # deals them out (L on even channels, D on odd ones) with no restriction. Unit 2 splits the
    # shuffled output in halves: [0:8] holds L[0:4] and D[0:4], [8:16] L[4:8] and D[4:8], so L
    # and D are cut in halves of 4, each free. The stem's second half is free too.
    stem = _maps(analysis, "stem.conv.weight", 0)
    assert sorted(stem.values()) == ["[0:4] of 16: p", "[4:8] of 16: p", "[8:16] of 16: p"]
    by_map = {index_map: gid for gid, index_map in stem.items()}
    l1, l2, free = by_map["[0:4] of 16: p"], by_map["[4:8] of 16: p"], by_map["[8:16] of 16: p"]
    branch = _maps(analysis, "unit1.pw2.weight", 0)
    by_map = {index_map: gid for gid, index_map in branch.items()}
    d1, d2 = by_map["[0:4] of 8: p"], by_map["[4:8] of 8: p"]
    assert len({l1, l2, free, d1, d2}) == 5
    sizes = ((l1, 4), (l2, 4), (free, 8), (d1, 4), (d2, 4))
    assert all(analysis.group(g).permutable and analysis.group(g).size == s for g, s in sizes)
    assert _maps(analysis, "unit1.pw1.weight", 1) == {free: "p"}
    # Unit 2's branch reads the second half: L[4:8] on even channels, D[4:8] on odd ones.
    assert _maps(analysis, "unit2.pw1.weight", 1) == {l2: "[0::2] of 8: p", d2: "[1::2] of 8: p"}
    # After the second shuffle conv5 reads the first half (itself interleaved) on even channels
    # and unit 2's branch output on odd ones.
    unit2 = _group(analysis, "unit2.pw2.weight", 0)
    assert _maps(analysis, "conv5.conv.weight", 1) == {
        l1: "[0::2] of 16: [0::2] of 8: p", d1: "[0::2] of 16: [1::2] of 8: p", unit2.id: "[1::2] of 16: p",
    }
    frozen = [g for g in analysis.groups if g.frozen]
    assert [g.reasons[0].kind for g in frozen] == ["graph-output"]


def test_shufflenet_v2_moves_every_neuron_not_pinned_by_the_output() -> None:
    """Torchvision's export pattern: every producer neuron except the logits is permutable, the
    only frozen group is the output's, and the branch outputs are cut where the half splits of
    the following units cut them (odd places included), read interleaved after each shuffle.
    """
    analysis = analyze(_fixture("shufflenet_v2"))
    summary = analysis.summary()
    assert summary["producer_neurons_pinned_by_outputs"] == 10
    assert summary["permutable_producer_neurons"] == summary["producer_neurons"] - 10
    assert [g.reasons[0].kind for g in analysis.groups if g.frozen] == ["graph-output"]
    def rows(unit: int, branch: int, conv: int) -> dict[str, str]:
        """Index map -> group of a stage-2 conv's output rows."""
        tensor = f"stage2.stage2.{unit}.branch{branch}.branch{branch}.{conv}.weight"
        return {index_map: gid for gid, index_map in _maps(analysis, tensor, 0).items()}

    def reads(unit: int) -> dict[str, str]:
        return _maps(analysis, f"stage2.stage2.{unit}.branch2.branch2.0.weight", 1)

    # Stage 2's stride-2 unit: branch1 output A (10) and branch2 output B (10), concatenated and
    # shuffled (A on even channels, B on odd ones). The next unit's branch reads the second
    # half: A[5:10] and B[5:10].
    a, b, d = rows(0, 1, 2), rows(0, 2, 5), rows(1, 2, 5)
    assert reads(1) == {a["[5:10] of 10: p"]: "[0::2] of 10: p", b["[5:10] of 10: p"]: "[1::2] of 10: p"}
    # The unit after it cuts the first halves A[0:5] and B[0:5] at odd places: A[0:3] + A[3:5],
    # B[0:2] + B[2:5]; its second half starts on an odd channel, so B comes first there. The
    # odd channels hold the second half of the previous unit's branch output D.
    assert reads(2) == {
        b["[2:5] of 10: p"]: "[0::2] of 10: [0::2] of 5: p",
        a["[3:5] of 10: p"]: "[0::2] of 10: [1::2] of 5: p",
        d["[5:10] of 10: p"]: "[1::2] of 10: p",
    }


def _concat_shuffle_model(seed: int) -> onnx.ModelProto:
    """conv_a (6) and conv_b (6) -> Concat -> channel shuffle (g = 2) -> Slice [0:6] -> conv_c,
    Slice [6:12] -> conv_d; the two are added, pooled, and a Gemm makes ``logits``.
    """
    b = GraphBuilder("concat_shuffle", seed)
    x = b.input("input", (1, 3, 8, 8))
    a = b.relu(b.conv(x, 6, 3, name="conv_a"), name="relu_a")
    c = b.relu(b.conv(x, 6, 3, name="conv_b"), name="relu_b")
    y = b.concat([a, c], axis=1, name="concat")
    y = b.reshape(b.transpose(b.reshape(y, [1, 2, 6, 8, 8], name="split"), [0, 2, 1, 3, 4], name="swap"),
                  [1, 12, 8, 8], name="merge")
    first = b.relu(b.conv(b.slice(y, [0], [6], [1], name="first"), 8, 3, name="conv_c"), name="relu_c")
    second = b.relu(b.conv(b.slice(y, [6], [12], [1], name="second"), 8, 3, name="conv_d"), name="relu_d")
    y = b.flatten(b.global_avg_pool(b.add(first, second, name="add"), name="pool"), name="flat")
    return b.build(b.gemm(y, 4, name="logits", gain=1.0))


def _interleaved(*parts: np.ndarray) -> np.ndarray:
    """Index array of the interleave of ``parts``: position t*n + j takes part j's t-th entry."""
    stride = len(parts)
    result = np.empty(sum(len(p) for p in parts), dtype=np.int64)
    for j, part in enumerate(parts):
        result[j::stride] = np.asarray(part) * stride + j
    return result


def test_channel_shuffle_of_a_concat_is_read_interleaved() -> None:
    """The two concatenated convs keep permutations of their own (each cut in halves, 3 + 3, by
    the Slices after the shuffle); the convs after the shuffle read them interleaved. Reading
    them as contiguous blocks (the shuffle ignored) is caught.
    """
    source = _concat_shuffle_model(0)
    analysis = _roundtrip(source, seed=4)
    rows_a, rows_b = _maps(analysis, "conv_a.weight", 0), _maps(analysis, "conv_b.weight", 0)
    assert sorted(rows_a.values()) == sorted(rows_b.values()) == ["[0:3] of 6: p", "[3:6] of 6: p"]
    assert set(rows_a).isdisjoint(rows_b)
    a = {m: g for g, m in rows_a.items()}
    b = {m: g for g, m in rows_b.items()}
    assert _maps(analysis, "conv_c.weight", 1) == {a["[0:3] of 6: p"]: "[0::2] of 6: p", b["[0:3] of 6: p"]: "[1::2] of 6: p"}
    assert _maps(analysis, "conv_d.weight", 1) == {a["[3:6] of 6: p"]: "[0::2] of 6: p", b["[3:6] of 6: p"]: "[1::2] of 6: p"}
    # By hand: conv_a's rows by (p0 + p1), conv_b's by (q0 + q1), each half of 3.
    p0, p1, q0, q1 = np.array([2, 0, 1]), np.array([1, 2, 0]), np.array([1, 0, 2]), np.array([0, 2, 1])
    rows_a_idx, rows_b_idx = np.concatenate([p0, p1 + 3]), np.concatenate([q0, q1 + 3])
    for reading, expected in (("interleaved", True), ("blocks", False)):
        model = copy_model(source)
        for conv, index in (("conv_a", rows_a_idx), ("conv_b", rows_b_idx)):
            _set(model, f"{conv}.weight", 0, index)
            _set(model, f"{conv}.bias", 0, index)
        for conv, p, q in (("conv_c", p0, q0), ("conv_d", p1, q1)):
            cols = _interleaved(p, q) if reading == "interleaved" else np.concatenate([p, q + 3])
            _set(model, f"{conv}.weight", 1, cols)
        assert verify_models(source, model, provider="cpu").equivalent is expected, reading


def test_a_shuffle_read_half_way_falls_back_to_product_form() -> None:
    """Four convs concatenated and shuffled (g = 4) while a ReduceMean also reads the transposed
    5-D tensor: that reader sees each digit as an axis of its own, so the whole permutation is
    restricted to a product (the four convs share one permutation, the blocks stay in place).
    """
    b = GraphBuilder("shuffle4", 0)
    x = b.input("input", (1, 3, 8, 8))
    parts = [b.relu(b.conv(x, 3, 3, name=f"conv{k}"), name=f"relu{k}") for k in range(4)]
    t = b.reshape(b.concat(parts, axis=1, name="concat"), [1, 4, 3, 8, 8], name="split")
    t = b.transpose(t, [0, 2, 1, 3, 4], name="swap")                                # [1, 3, 4, 8, 8]
    side = b.flatten(b.reduce_mean(t, [3, 4], keepdims=False, name="side"), name="side_flat")
    y = b.relu(b.conv(b.reshape(t, [1, 12, 8, 8], name="merge"), 8, 3, name="after"), name="relu_after")
    y = b.flatten(b.global_avg_pool(y, name="pool"), name="flat")
    source = b.build([b.gemm(y, 4, name="logits", gain=1.0), b.gemm(side, 4, name="side_logits", gain=1.0)])
    analysis = _roundtrip(source, seed=1)
    (shared,) = {gid for k in range(4) for gid in _maps(analysis, f"conv{k}.weight", 0)}
    assert analysis.group(shared).permutable and analysis.group(shared).size == 3
    assert _maps(analysis, "after.weight", 1)[shared] == "p (x) I_4"
    _wrong_permutation_is_caught(source)


def test_split_digits_reaching_a_graph_output_freeze() -> None:
    """A Reshape splitting conv1's channels into (2, 4), transposed, is a graph output: the
    permutation kept over both axes freezes (graph-output); the other branch still moves.
    """
    b = GraphBuilder("split_output", 0)
    x = b.input("input", (1, 3, 8, 8))
    a = b.relu(b.conv(x, 8, 3, name="conv1"), name="relu1")
    t = b.transpose(b.reshape(a, [1, 2, 4, 8, 8], name="split"), [0, 2, 1, 3, 4], name="swap")
    y = b.relu(b.conv(x, 8, 3, name="conv2"), name="relu2")
    y = b.flatten(b.global_avg_pool(y, name="pool"), name="flat")
    source = b.build([t, b.gemm(y, 4, name="logits", gain=1.0)])
    analysis = _roundtrip(source, seed=2)
    frozen = _group(analysis, "conv1", 1)
    assert frozen.frozen and frozen.reasons[0].kind == "graph-output"
    assert _map(analysis, "swap", 2) == "axes [2, 1] together: p"
    assert _group(analysis, "conv2.weight", 0).permutable


def _shuffle_model(seed: int, groups: int, flatten: bool = False) -> onnx.ModelProto:
    """conv1 (8) -> Reshape [1, g, 8/g, 8, 8] -> Transpose (0, 2, 1, 3, 4) -> Reshape back ->
    conv2; or with ``flatten``, Flatten(axis=1) of the transposed 5-D tensor -> Gemm.
    """
    b = GraphBuilder("shuffle", seed)
    x = b.input("input", (1, 3, 8, 8))
    y = b.relu(b.conv(x, 8, 3, name="conv1"), name="relu1")
    y = b.reshape(y, [1, groups, 8 // groups, 8, 8], name="split")
    y = b.transpose(y, [0, 2, 1, 3, 4], name="transpose")
    if flatten:
        y = b.relu(b.gemm(b.flatten(y, 1, name="flatten"), 16, name="fc"), name="fc_relu")
        return b.build(b.gemm(y, 4, name="logits", gain=1.0))
    y = b.reshape(y, [1, 8, 8, 8], name="merge")
    y = b.relu(b.conv(y, 8, 3, name="conv2"), name="relu2")
    y = b.flatten(b.global_avg_pool(y, name="pool"), name="flat")
    return b.build(b.gemm(y, 4, name="logits", gain=1.0))


@pytest.mark.parametrize("groups", [2, 4])
def test_inline_channel_shuffle_index_maps(groups: int) -> None:
    source = _shuffle_model(0, groups)
    analysis = _roundtrip(source, seed=groups)
    rows = _maps(analysis, "conv1.weight", 0)
    cols = _maps(analysis, "conv2.weight", 1)
    inner = 8 // groups
    # The shuffle restricts nothing: conv1's 8 neurons stay one group, which conv2 reads in
    # the shuffled order (the [groups, inner] layout transposed).
    ((group_id, index_map),) = rows.items()
    assert index_map == "p" and analysis.group(group_id).size == 8
    assert cols == {group_id: f"transposed [{groups}, {inner}] -> [{inner}, {groups}] of (p)"}


def test_shuffle_read_as_plain_pass_through_is_caught() -> None:
    """A product-form permutation P of conv1's rows, given to conv2's input as is (ignoring the
    shuffle), is wrong; the shuffled form (digits swapped) is right.
    """
    source = _shuffle_model(0, 2)
    a, b = np.array([1, 0]), np.array([2, 0, 3, 1])
    rows = _kron(a, b)
    for cols, expected in ((rows, False), (_kron(b, a), True)):
        model = copy_model(source)
        _set(model, "conv1.weight", 0, rows)
        _set(model, "conv1.bias", 0, rows)
        _set(model, "conv2.weight", 1, cols)
        assert verify_models(source, model, provider="cpu").equivalent is expected


def test_flatten_of_two_permuted_axes_is_their_product() -> None:
    source = _shuffle_model(0, 2, flatten=True)
    analysis = _roundtrip(source, seed=1)
    cols = _maps(analysis, "fc.weight", 1)
    # Flatten of [1, 4, 2, 8, 8]: index (j * 2 + i) * 64 + s, j from conv1's low digit.
    assert sorted(cols.values()) == ["I_4 (x) p (x) I_64", "p (x) I_128"]


# -- DepthToSpace / SpaceToDepth -----------------------------------------------------------
def test_depth_to_space_index_maps() -> None:
    analysis = analyze(_fixture("depth_to_space"))
    dcr = _group(analysis, "conv2.weight", 1)
    assert dcr.permutable and dcr.size == 4
    assert _maps(analysis, "conv1.weight", 0) == {dcr.id: "I_4 (x) p"}
    assert _maps(analysis, "conv1.bias", 0) == {dcr.id: "I_4 (x) p"}
    s2d = _group(analysis, "conv2.weight", 0)
    assert s2d.size == 8 and _maps(analysis, "conv3.weight", 1) == {s2d.id: "I_4 (x) p"}
    crd = _group(analysis, "conv5.weight", 1)
    assert crd.size == 4 and _maps(analysis, "conv4.weight", 0) == {crd.id: "p (x) I_4"}
    assert _group(analysis, "conv3.weight", 0) is _group(analysis, "conv4.weight", 1)
    assert [g.reasons[0].kind for g in analysis.groups if g.frozen] == ["graph-output"]


@pytest.mark.parametrize("producer, consumer, right", [
    ("conv1", "conv2", "dcr"),   # DepthToSpace DCR: rows take I_4 (x) p
    ("conv4", "conv5", "crd"),   # DepthToSpace CRD: rows take p (x) I_4
])
def test_depth_to_space_modes_are_not_interchangeable(producer: str, consumer: str, right: str) -> None:
    source = _fixture("depth_to_space")
    p, blocks = np.array([2, 0, 3, 1]), np.arange(4)
    forms = {"dcr": _kron(blocks, p), "crd": _kron(p, blocks)}
    for form, rows in forms.items():
        model = copy_model(source)
        _set(model, f"{producer}.weight", 0, rows)
        _set(model, f"{producer}.bias", 0, rows)
        _set(model, f"{consumer}.weight", 1, p)
        assert verify_models(source, model, provider="cpu").equivalent is (form == right), form


def _spatial_d2s_model(seed: int, op: str) -> onnx.ModelProto:
    """conv1's channels moved to axis 2 by a Transpose, through DepthToSpace (DCR) or
    SpaceToDepth (where they are a spatial axis), and back to axis 1 for conv2.
    """
    b = GraphBuilder(f"spatial_{op.lower()}", seed)
    x = b.input("input", (1, 3, 8, 8))
    y = b.relu(b.conv(x, 8, 3, name="conv1"), name="relu1")                       # [1, 8, 8, 8]
    y = b.transpose(y, [0, 2, 1, 3], name="swap")                                  # [1, H, C, W]
    if op == "DepthToSpace":
        y = b.depth_to_space(y, 2, "DCR", name="moved")                            # [1, 2, 16, 16]
    else:
        y = b.space_to_depth(y, 2, name="moved")                                   # [1, 32, 4, 4]
    y = b.transpose(y, [0, 2, 1, 3], name="swap_back")
    y = b.relu(b.conv(y, 8, 3, name="conv2"), name="relu2")
    y = b.flatten(b.global_avg_pool(y, name="pool"), name="flat")
    return b.build(b.gemm(y, 4, name="logits", gain=1.0))


def test_depth_to_space_on_a_permuted_spatial_axis() -> None:
    analysis = _roundtrip(_spatial_d2s_model(0, "DepthToSpace"), seed=2)
    group = _group(analysis, "conv1.weight", 0)
    assert group.permutable and group.size == 8
    # Output H is h * 2 + b1: the permuted axis is the high digit.
    assert _maps(analysis, "conv2.weight", 1) == {group.id: "p (x) I_2"}


def test_space_to_depth_on_a_permuted_spatial_axis() -> None:
    analysis = _roundtrip(_spatial_d2s_model(0, "SpaceToDepth"), seed=2)
    # Input H is h' * 2 + b1: only permutations that keep the pixel pairs survive.
    group = _group(analysis, "conv2.weight", 1)
    assert group.permutable and group.size == 4
    assert _maps(analysis, "conv1.weight", 0) == {group.id: "p (x) I_2"}


# -- reshapes and other axis operators ------------------------------------------------------
def test_reshape_maps_groups() -> None:
    analysis = analyze(_fixture("reshape_maps"))
    rows = _maps(analysis, "conv1.weight", 0)
    assert sorted(rows.values()) == ["I_4 (x) p", "p (x) I_4"]
    groups_id = next(g for g, m in rows.items() if m == "p (x) I_4")        # which group of 4
    within_id = next(g for g, m in rows.items() if m == "I_4 (x) p")        # inside every group
    # [N, C, H, W] -> [N, C, H*W]: C kept.
    assert _maps(analysis, "center.flat", 1) == {groups_id: "p (x) I_4", within_id: "I_4 (x) p"}
    # GroupNorm decomposition [1, 16, 16, 16] -> [1, 4, 1024]: C split into (4, 4).
    assert _maps(analysis, "groupnorm.group", 1) == {groups_id: "p"}
    assert _maps(analysis, "groupnorm.group", 2) == {within_id: "p (x) I_256"}
    assert _maps(analysis, "groupnorm.gamma.value", 0) == {groups_id: "p (x) I_4", within_id: "I_4 (x) p"}
    # [N, C, H, W] -> [N, C*H, W]: C merged in front of H.
    assert _maps(analysis, "rows.conv1d.weight", 1) == {groups_id: "p (x) I_64", within_id: "I_4 (x) p (x) I_16"}
    # [N, C, L] -> [N, C, 4, 4] (after a Tile on L) keeps C; [N, C] -> [N, C, 1, 1] too.
    conv1d = _group(analysis, "rows.conv1d.weight", 0)
    assert conv1d.permutable and _map(analysis, "rows.split", 1) == "p"
    assert _group(analysis, "rows.conv.weight", 1) is conv1d
    se = _group(analysis, "rows.conv.weight", 0)
    for tensor, axis in [("se.expand.weight", 0), ("se.unflatten", 1), ("se.broadcast", 1), ("logits.weight", 1)]:
        assert _group(analysis, tensor, axis) is se, tensor
    assert _group(analysis, "se.reduce.weight", 0).permutable
    assert [g.reasons[0].kind for g in analysis.groups if g.frozen] == ["graph-output"]


def test_axis_ops_groups() -> None:
    analysis = analyze(_fixture("axis_ops"))
    # Concat on H couples the two convs' channels; Split on H and Slice on W pass them through.
    maps = _group(analysis, "conv_a.weight", 0)
    assert maps is _group(analysis, "conv_b.weight", 0) and maps.permutable and maps.size == 16
    assert _map(analysis, "concat_h", 1) == "p" and _map(analysis, "slice_w", 1) == "p"
    assert _maps(analysis, "conv_bottom.weight", 1) == {maps.id: "p"}
    # Tile on C: two copies, I_2 (x) p.
    assert _maps(analysis, "conv_tile.weight", 1) == {maps.id: "I_2 (x) p"}
    assert _maps(analysis, "tile_c", 1) == {maps.id: "I_2 (x) p"}
    # Squeeze / Unsqueeze / Expand move the gate's axis; Tile on W passes C.
    gate = _group(analysis, "conv_tile.weight", 0)
    for tensor, axis in [("conv_bottom.weight", 0), ("tile_w", 1), ("se.squeeze", 1), ("se.fc.weight", 0),
                         ("se.fc.weight", 1), ("se.unsqueeze", 1), ("se.expand", 1), ("logits.weight", 1)]:
        assert _group(analysis, tensor, axis) is gate, tensor
    assert gate.permutable and gate.size == 24


def test_reshape_with_a_dynamic_batch() -> None:
    """A symbolic batch on both sides of a Reshape (``-1`` target) pairs up as one block."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32)
    w2 = (rng.standard_normal((4, 128)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("Reshape", ["relu", "shape"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "w2"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "dynamic", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                     numpy_helper.from_array(np.array([-1, 128], dtype=np.int64), "shape")],
    )
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source.ir_version = 8
    analysis = _roundtrip(source, seed=1)
    group = _group(analysis, "w1", 0)
    assert group.permutable and _maps(analysis, "w2", 1) == {group.id: "p (x) I_16"}


# -- recurrent ops and control flow -----------------------------------------------------------
def test_lstm_reads_the_conv_channels_and_makes_hidden_units() -> None:
    """The conv channels reach the LSTM's input weight through the reshape (``p (x) I_8``); the
    hidden units are a group of their own (the recurrent rule, tests/test_recurrent.py).
    """
    analysis = analyze(_fixture("lstm_head"))
    channels = _group(analysis, "conv2.weight", 0)
    assert channels.permutable and _group(analysis, "time_major", 2) is channels
    assert _map(analysis, "to_sequence", 1) == "p (x) I_8" and _map(analysis, "lstm.W", 2) == "p (x) I_8"
    units = _group(analysis, "lstm.R", 2)
    assert units.permutable and units.size == 32 and _group(analysis, "fc1.weight", 0) is units
    assert _map(analysis, "lstm.W", 1) == "I_4 (x) p"
    assert _group(analysis, "conv1.weight", 0).permutable
    head = _group(analysis, "fc1.weight", 1)
    assert head.permutable and head.size == 24 and _group(analysis, "logits.weight", 0) is head


def test_if_and_loop_bodies_read_outer_scope_tensors_permuted() -> None:
    analysis = analyze(_fixture("if_branch"))
    graph = analysis.graph
    select = next(i for i, n in enumerate(graph.nodes) if n.name == "select")
    refine = next(i for i, n in enumerate(graph.nodes) if n.name == "refine")
    # The branches read B, shared.weight and branch.weight without naming them as inputs.
    assert list(graph.nodes[select].input) == ["cond.positive"]
    assert set(graph.implicit_inputs[select]) == {"relu2", "shared.weight", "branch.weight"}
    assert set(graph.implicit_inputs[refine]) == {"loop.weight"}
    # The bodies are analysed: their convs are the uses of the outer weights.
    then_conv = next(i for i, n in enumerate(graph.nodes) if n.name == "select.then.conv")
    uses = graph.constant_uses("shared.weight")
    assert (then_conv, 1) in uses and (select, -1) not in uses
    branch_read = _group(analysis, "conv2.weight", 0)
    assert branch_read.permutable and _maps(analysis, "shared.weight", 1) == {branch_read.id: "p"}
    assert _maps(analysis, "branch.weight", 1) == {branch_read.id: "p"}
    returned = _group(analysis, "branch.weight", 0)  # both branches' rows, through the If's output
    assert returned.permutable and _maps(analysis, "shared.weight", 0) == {returned.id: "p"}
    loop_read = _group(analysis, "conv3.weight", 0)  # loop-carried: the body's rows and columns
    assert loop_read.permutable
    assert _maps(analysis, "loop.weight", 0) == _maps(analysis, "loop.weight", 1) == {loop_read.id: "p"}
    first = _group(analysis, "conv1.weight", 0)
    assert first.permutable and _group(analysis, "conv2.weight", 1) is first
    # The shared weight is read alike by the main graph's Conv and the branch's: one permutation
    # for both uses (their groups joined), no copy (issue 12: untie only where uses cannot agree).
    assert analysis.untied == [] and branch_read is first
    assert _maps(analysis, "logits.weight", 1) == {returned.id: "[0:16] of 32: p; [16:32] of 32: p"}


def test_if_branch_and_loop_run_equivalent_after_permutation() -> None:
    source = _fixture("if_branch")
    model, _, _, key = _permute(source, seed=4)
    for name in ("shared.weight", "branch.weight", "loop.weight"):
        assert _tensor_holders(model)[name].SerializeToString() != _tensor_holders(source)[name].SerializeToString()
    shared_conv = next(n for n in model.graph.node if n.name == "shared_conv")
    assert shared_conv.input[1] == "shared.weight"  # joined with the branch's use: no copy
    assert not any("onnxlady_copy" in t.name for t in model.graph.initializer)
    select = next(n for n in model.graph.node if n.name == "select")
    then_branch = next(a.g for a in select.attribute if a.name == "then_branch")
    assert [n.input[1] for n in then_branch.node if n.op_type == "Conv"] == ["shared.weight"]
    # Run both branches: the condition is mean(input) > 0 on verify's seeded inputs.
    taken = {}
    for seed in range(12):
        feeds = generate_inputs(source, None, np.random.default_rng(seed))
        taken.setdefault(bool(feeds["input"].mean() > 0), seed)
    assert set(taken) == {True, False}
    for seed in taken.values():
        report = verify_models(source, model, provider="cpu", seed=seed)
        assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert unpermute_model(model, key) and model.SerializeToString() == source.SerializeToString()


def _outer_weight_model(kind: str, seed: int = 0) -> onnx.ModelProto:
    """A weight used by a main-graph Conv and read inside an If branch: through an Identity the
    branch reads, held in a Constant node, or read from a Loop nested in the branch.
    """
    b = GraphBuilder(f"outer_{kind}", seed)
    x = b.input("input", (1, 3, 16, 16))
    a = b.relu(b.conv(x, 8, 3, name="conv1"), name="relu1")
    with b.params_as("constant" if kind == "constant" else "initializer"):
        w = b.param("shared.weight", b.conv_weight(a, 8, 3))
    if kind == "identity":
        w = b.identity(w, name="shared.weight.id")
    s = b.relu(b.conv(a, 8, 3, weight=w, name="shared_conv"), name="shared_relu")
    inner = b.relu(b.conv(a, 8, 3, name="conv2"), name="relu2")
    mean = b.reduce_mean(x, [0, 1, 2, 3], keepdims=False, name="mean")
    cond = b.greater(mean, np.array(-10.0, dtype=np.float32), name="cond")   # always true

    def then_branch(body: GraphBuilder) -> str:
        if kind == "nested":
            def step(loop_body: GraphBuilder, z: str) -> str:
                return loop_body.relu(loop_body.conv(z, 8, 3, weight=w, bias=False, name="conv"), name="relu")
            return body.loop(1, inner, step, name="inner_loop")
        return body.relu(body.conv(inner, 8, 3, weight=w, name="conv"), name="relu")

    y = b.if_else(cond, then_branch, lambda body: body.identity(inner, name="copy"), name="select")
    y = b.flatten(b.global_avg_pool(b.concat([s, y], axis=1, name="concat"), name="pool"), name="flat")
    return b.build(b.gemm(y, 4, name="logits", gain=1.0))


@pytest.mark.parametrize("kind", ["identity", "constant", "nested"])
def test_outer_weight_read_by_a_branch_is_joined(kind: str) -> None:
    """The main Conv and the branch's read the weight alike: their groups are joined, no copy."""
    source = _outer_weight_model(kind)
    onnx.checker.check_model(source, full_check=True)
    analysis = _roundtrip(source, seed=1)
    assert analysis.untied == []
    read = _group(analysis, "conv2.weight", 0)  # the branch reads it through the shared weight
    assert read.permutable and _group(analysis, "conv1.weight", 0) is read  # and so does the main Conv
    assert _maps(analysis, "shared.weight", 1) == {read.id: "p"}
    model, _, _, _ = _permute(source, seed=1)
    assert _tensor_holders(model)["shared.weight"].SerializeToString() != \
        _tensor_holders(source)["shared.weight"].SerializeToString()


def _wrong_permutation_is_caught(source: onnx.ModelProto) -> None:
    model = copy_model(source)
    permute_producer_only(model, analyze(model))
    assert not verify_models(source, model, provider="cpu").equivalent


def test_concat_with_a_loop_output_keeps_the_other_operand_permutable() -> None:
    """ONNX leaves the shape of a loop-carried value unknown; the body maps [1, 8, 8, 8] to
    itself, so the Loop output has that shape; its loop-carried channels (conv1's, which the body
    maps to themselves) take their own block of the Concat next to conv2's.
    """
    b = GraphBuilder("loop_concat", 0)
    x = b.input("input", (1, 3, 8, 8))
    a = b.relu(b.conv(x, 8, 3, name="conv1"), name="relu1")
    s = b.relu(b.conv(a, 8, 3, name="conv2"), name="relu2")
    w = b.param("loop.weight", b.conv_weight(a, 8, 3, gain=1.0))
    z = b.loop(1, a, lambda body, t: body.relu(body.conv(t, 8, 3, weight=w, name="conv"), name="relu"),
               name="refine")
    y = b.flatten(b.global_avg_pool(b.concat([s, z], axis=1, name="concat"), name="pool"), name="flat")
    source = b.build(b.gemm(y, 4, name="logits", gain=1.0))
    inferred = onnx.shape_inference.infer_shapes(source).graph.value_info
    assert "refine" not in {v.name for v in inferred if v.type.tensor_type.HasField("shape")}
    analysis = _roundtrip(source, seed=3)
    conv2 = _group(analysis, "conv2.weight", 0)
    assert conv2.permutable
    conv1 = _group(analysis, "conv1.weight", 0)  # the Loop carries it, through the body's conv
    assert conv1.permutable and _maps(analysis, "loop.weight", 0) == {conv1.id: "p"}
    assert _maps(analysis, "logits.weight", 1) == {conv2.id: "[0:8] of 16: p", conv1.id: "[8:16] of 16: p"}
    _wrong_permutation_is_caught(source)


def _runtime_shaped_concat(seed: int, *, declare_output: bool, add: bool = False) -> onnx.ModelProto:
    """conv2's output concatenated (or, with ``add``, added) to a tensor whose shape only the
    runtime knows: conv3's output reshaped to a target computed from the input's values
    (``0 * max(input) + [1, 8, 8, 8]``), which shape inference cannot follow. With
    ``declare_output`` the graph states the Concat's output shape, as some exporters do.
    """
    b = GraphBuilder("runtime_shape", seed)
    x = b.input("input", (1, 3, 8, 8))
    a = b.relu(b.conv(x, 8, 3, name="conv1"), name="relu1")
    s = b.relu(b.conv(a, 8, 3, name="conv2"), name="relu2")
    t = b.relu(b.conv(a, 8, 3, name="conv3"), name="relu3")
    peak = b.custom("ReduceMax", "", [x], [], name="peak", keepdims=0)
    zero = b.cast(b.mul(peak, np.array(0.0), name="zero"), TensorProto.INT64, name="zero_int")
    target = b.add(zero, b.param("target_dims", np.array([1, 8, 8, 8], dtype=np.int64)), name="target")
    z = b.custom("Reshape", "", [t, target], [1, 8, 8, 8], name="reshape")
    y = b.add(s, z, name="sum") if add else b.concat([s, z], axis=1, name="concat")
    y = b.flatten(b.global_avg_pool(y, name="pool"), name="flat")
    model = b.build(b.gemm(y, 4, name="logits", gain=1.0))
    if declare_output:
        model.graph.value_info.append(helper.make_tensor_value_info("concat", TensorProto.FLOAT, [1, 16, 8, 8]))
    return model


def test_concat_operand_of_unknown_size_gets_a_frozen_block_of_its_own() -> None:
    source = _runtime_shaped_concat(0, declare_output=True)
    analysis = _roundtrip(source, seed=2)
    assert not any(isinstance(d, int) for d in analysis.graph.shape("reshape") or ())  # no dim is known
    assert _group(analysis, "conv2.weight", 0).permutable
    assert _map(analysis, "logits.weight", 1) == "[0:8] of 16: p"
    conv3 = _group(analysis, "conv3", 1)
    assert conv3.frozen and conv3.reasons[0].kind == "unknown-shape"  # the Reshape to a computed shape
    assert _group(analysis, "conv1.weight", 0).permutable
    _wrong_permutation_is_caught(source)


def test_concat_of_unknown_total_size_freezes_only_along_its_axis() -> None:
    """Without the output's size no operand's place is known: conv2 keeps the identity (with
    the reason), and nothing else is affected.
    """
    source = _runtime_shaped_concat(0, declare_output=False)
    analysis = _roundtrip(source, seed=2)
    conv2 = _group(analysis, "conv2", 1)
    assert conv2.frozen
    assert [r.kind for r in conv2.reasons] == ["unknown-shape"] and "'reshape'" in conv2.reasons[0].message
    assert _group(analysis, "conv1.weight", 0).permutable


def test_broadcast_with_an_operand_of_unknown_shape_freezes_only_that_axis() -> None:
    """Add(conv2, z) with z's dims unknown: z may or may not broadcast along the channels, so
    that axis keeps the identity, said so; conv1 before it is unaffected.
    """
    source = _runtime_shaped_concat(0, declare_output=False, add=True)
    analysis = _roundtrip(source, seed=4)
    conv2 = _group(analysis, "conv2", 1)
    assert conv2.frozen and "cannot tell whether 'reshape' broadcasts" in conv2.reasons[0].message
    assert _group(analysis, "conv1.weight", 0).permutable
