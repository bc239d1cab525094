"""The architectures that used to freeze (issue: "Coverage: the architectures that still freeze").

For each fixture of ``fixtures/coverage.py``: every producer neuron is permutable or pinned by a
graph output, the permuted model is equivalent (two seeds), a wrong permutation is caught, and
unpermuting gives the source back bit for bit. Then what each structure needed:

- grouped 1x1 convolutions around a channel shuffle (ShuffleNet v1): the group before the
  shuffle takes the transposed image of the grouped conv's ``I_g (x) q``;
- multi-scale linear attention (EfficientViT's LiteMLA): heads x (q, k, v) digits regrouped
  across axes, a grouped conv per head part, V padded with ones;
- a position table interpolated in the graph (ViT): the stored table is permuted with the
  residual stream, and only along an exclusive path of equivariant operators;
- a dynamically quantized encoder with symbolic axes: reshape targets read from Shape resolve
  (``-1`` next to symbolic dims), a quantizer's value_info does not hide them;
- a classifier behind a reshape of unknown size: pinned by the graph output, not unknown-shape.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

from fixtures import coverage
from onnxlady import ChannelAnalysis, analyze, draw_permutations, permute_model, unpermute_model, verify_models
from onnxlady._graph import _fold
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._transforms._permute import _permute_tensor
from onnxlady.testing import GraphBuilder, constant_bytes, copy_model, permute_producer_only, tensor_holders

NAMES = sorted(coverage.FIXTURES)


@functools.cache
def _bytes(name: str) -> bytes:
    return coverage.FIXTURES[name](0).SerializeToString()


def _fixture(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_bytes(name))


def _maps(analysis: ChannelAnalysis, tensor: str, axis: int) -> dict[str, str]:
    return {
        group.id: member.index_map
        for group in analysis.groups
        for member in group.members
        if member.tensor == tensor and member.axis == axis
    }


# -- every fixture -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_producer_neuron_is_permutable_or_pinned_by_an_output(name: str) -> None:
    analysis = analyze(_fixture(name))
    summary = analysis.summary()
    pinned, permutable = summary["producer_neurons_pinned_by_outputs"], summary["permutable_producer_neurons"]
    assert isinstance(pinned, int) and isinstance(permutable, int)
    assert permutable + pinned == summary["producer_neurons"], summary
    for group in analysis.groups:
        if group.frozen and group.size > 1:
            assert {reason.kind for reason in group.reasons} == {"graph-output"}, (group.id, group.reasons)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [1, 2])
def test_permute_verify_unpermute(name: str, seed: int) -> None:
    source = _fixture(name)
    model = copy_model(source)
    analysis = analyze(model)
    perms = draw_permutations(analysis, seed)
    key = permute_model(analysis, perms, seed=seed)
    assert perms and constant_bytes(model) != constant_bytes(source)
    report = verify_models(source, model, provider="cpu", iterations=2, seed=seed)
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()


@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_permutation_is_caught(name: str) -> None:
    source = _fixture(name)
    model = copy_model(source)
    permute_producer_only(model, analyze(model))
    assert not verify_models(source, model, provider="cpu", iterations=1).equivalent


def test_fixtures_are_deterministic() -> None:
    for name in NAMES:
        assert coverage.FIXTURES[name](0).SerializeToString() == _bytes(name), name


# -- ShuffleNet v1 -----------------------------------------------------------------------------
def test_a_plain_conv_before_a_shuffle_takes_the_grouped_convs_permutation_transposed() -> None:
    """stage2.0: gconv1 (group 1, 60 outputs) -> shuffle [3, 20] -> depthwise -> gconv2 (3 groups).

    gconv2 reads I_3 (x) q (one q of 20 inside each group); gconv1's rows take q read back
    through the shuffle, with all 20! choices of q (it used to freeze: the shuffle had restricted
    the group to digits that do not divide by 20).
    """
    analysis = analyze(_fixture("shufflenet_v1"))
    rows = _maps(analysis, "stage2.0.gconv1.weight", 0)
    cols = _maps(analysis, "stage2.0.gconv2.weight", 1)
    ((group_id, index_map),) = rows.items()
    group = analysis.group(group_id)
    assert group.permutable and group.size == 20
    assert index_map == "transposed [20, 3] -> [3, 20] of (I_3 (x) p)"
    assert cols == {group_id: "p"}  # the weight's input axis holds one group's 20 channels


def test_grouped_convs_around_a_shuffle_keep_the_residues_the_shuffle_deals() -> None:
    """stage2.1: every gconv1 row is governed by a permutable group.

    gconv1 (3 groups of 20) -> shuffle -> gconv2 (3 groups): 20 = 6 * 3 + 2, so the shuffle
    deals each input group's channels over residues 0, 1, 2 of 3 within gconv2's groups:
    gconv2's q keeps residues (groups of 7, 7 and 6), and every gconv1 row is governed by one.
    """
    analysis = analyze(_fixture("shufflenet_v1"))
    cols = _maps(analysis, "stage2.1.gconv2.weight", 1)
    sizes = sorted(analysis.group(group_id).size for group_id in cols)
    assert sizes == [6, 7, 7] and all(analysis.group(group_id).permutable for group_id in cols)
    labels = analysis.neuron_labels(next(p.axes[0][1] for p in analysis.tensors if p.tensor == "stage2.1.gconv1.weight"))
    governed = np.zeros(60, dtype=bool)
    for lab in labels.values():
        governed |= lab >= 0
    assert governed.all()


def test_the_shuffle_read_as_plain_pass_through_is_caught() -> None:
    """gconv1's rows permuted by I_3 (x) q as gconv2 reads it (the shuffle ignored) are caught.

    The same q read back through the shuffle is right.
    """
    source = _fixture("shufflenet_v1")
    model = copy_model(source)
    analysis = analyze(model)
    perms = draw_permutations(analysis, 3)
    permute_model(analysis, perms, seed=3)
    ((group_id, _),) = _maps(analysis, "stage2.0.gconv1.weight", 0).items()
    q = perms[group_id]
    (plan,) = [p for p in analysis.tensors if p.tensor == "stage2.0.gconv1.weight"]
    right = analysis.index_array(plan.axes[0][1], perms)
    wrong = np.concatenate([q + 20 * k for k in range(3)])
    assert not np.array_equal(right, wrong)
    # The conv's input axis (the stem's channels) keeps its permutation; its rows get ``index``.
    columns = analysis.index_array(plan.axes[1][1], perms)
    rows = [f"stage2.0.gconv1_bn.{p}" for p in ("scale", "bias", "mean", "var")]
    for index, expected in ((wrong, False), (right, True)):
        holders, originals = tensor_holders(model), tensor_holders(source)
        holders["stage2.0.gconv1.weight"].CopyFrom(originals["stage2.0.gconv1.weight"])
        _permute_tensor(holders["stage2.0.gconv1.weight"], [(0, index), (1, columns)])
        for name in rows:
            holders[name].CopyFrom(originals[name])
            _permute_tensor(holders[name], [(0, index)])
        assert verify_models(source, model, provider="cpu", iterations=1).equivalent is expected


# -- LiteMLA -----------------------------------------------------------------------------------
def test_lite_mla_heads_and_qkv_digits_meet() -> None:
    """LiteMLA's qkv conv and its aggregated scale share one permutation of the 8 head dims.

    The 48 outputs are 2 heads x (q, k, v) x 8; the grouped aggregation reads I_6 (x) p, and the
    heads stay in place.
    """
    analysis = analyze(_fixture("lite_mla"))
    qkv = _maps(analysis, "block0.attention.qkv.weight", 0)
    assert list(qkv.values()) == ["I_6 (x) p"]
    group = analysis.group(next(iter(qkv)))
    assert group.permutable and group.size == 8
    aggregated = _maps(analysis, "block0.attention.aggreg_pw.weight", 0)
    assert set(aggregated) == set(qkv)
    # V padded with ones: the pad value stays last, the 8 dims before it move.
    padded = _maps(analysis, "block0.attention.v_pad", 3)
    assert padded == {group.id: "[0:8] of 9: p"}


def test_pad_with_a_constant_on_a_permuted_axis_keeps_the_padding_in_place() -> None:
    b = GraphBuilder("pad_channels", 0)
    x = b.input("input", (1, 3, 8, 8))
    y = b.relu(b.conv(x, 6, 3, name="conv1"), name="relu1")
    pads = b.param("pad.pads", np.array([0, 1, 0, 0, 0, 2, 0, 0], dtype=np.int64))
    value = b.param("pad.value", np.array(0.5, dtype=np.float32))
    y = b.custom("Pad", "", [y, pads, value], (1, 9, 8, 8), name="pad", mode="constant")
    y = b.flatten(b.global_avg_pool(b.conv(y, 4, 3, name="conv2"), name="pool"), name="flat")
    source = b.build(b.gemm(y, 3, name="logits", gain=1.0))
    analysis = analyze(source)
    assert list(_maps(analysis, "pad", 1).values()) == ["[1:7] of 9: p"]
    model = copy_model(source)
    analysis = analyze(model)
    permute_model(analysis, draw_permutations(analysis, 1), seed=1)
    assert verify_models(source, model, provider="cpu").equivalent
    reflect = onnx.load_from_string(source.SerializeToString())
    next(n for n in reflect.graph.node if n.name == "pad").attribute[0].s = b"reflect"
    frozen = analyze(reflect)
    assert not any(g.permutable for g in frozen.groups if g.size == 6)


# -- ViT with an interpolated position table ---------------------------------------------------
def test_the_stored_position_table_moves_with_the_residual_stream() -> None:
    analysis = analyze(_fixture("vit_interpolated_pos"))
    (plan,) = [p for p in analysis.tensors if p.tensor == "embed.pos_table"]
    assert [axis for axis, _ in plan.axes] == [2] and len(plan.uses) == 2  # read by both Slices
    stream = _maps(analysis, "embed.patch.weight", 0)
    assert set(_maps(analysis, "embed.pos_table", 2)) == set(stream)
    assert analysis.group(next(iter(stream))).permutable


def _table_model(*, second_reader: bool) -> onnx.ModelProto:
    """Tokens + a table resized in the graph; optionally the resized table is also a graph output."""
    b = GraphBuilder("table", 0)
    x = b.input("input", (1, 3, 8, 8))
    tokens = b.transpose(b.reshape(b.conv(x, 8, 4, 4, pad=0, name="patch", gain=1.0), [1, 8, 4], name="flat"),
                         [0, 2, 1], name="tokens")                                       # [1, 4, 8]
    table = b.param("table", b.small_normal((1, 8, 1, 1), std=0.5))
    scales = b.param("scales", np.array([1, 1, 2, 2], dtype=np.float32))
    grid = b.custom("Resize", "", [table, "", scales], (1, 8, 2, 2), name="resize", mode="linear")
    pos = b.transpose(b.reshape(grid, [1, 8, 4], name="grid_flat"), [0, 2, 1], name="pos")  # [1, 4, 8]
    y = b.add(tokens, pos, name="add")
    y = b.matmul(b.relu(b.matmul(y, 8, name="fc1"), name="relu"), 3, name="logits", gain=1.0)
    return b.build([y, grid] if second_reader else y)


def test_a_computed_table_moves_only_along_an_exclusive_path() -> None:
    alone = analyze(_table_model(second_reader=False))
    assert alone.group(next(iter(_maps(alone, "tokens", 2)))).permutable
    assert any(p.tensor == "table" for p in alone.tensors)
    # The resized table is also a graph output: permuting the stored table would change it.
    shared = analyze(_table_model(second_reader=True))
    assert not shared.group(next(iter(_maps(shared, "tokens", 2)))).permutable
    assert not any(p.tensor == "table" for p in shared.tensors)
    source = _table_model(second_reader=False)
    model = copy_model(source)
    analysis = analyze(model)
    permute_model(analysis, draw_permutations(analysis, 1), seed=1)
    assert verify_models(source, model, provider="cpu").equivalent


# -- dynamic shapes and quantization -----------------------------------------------------------
def test_symbolic_reshape_targets_resolve() -> None:
    assert _fold.symbolic_reshape(("b", "s", 4, 8), (0, 0, -1), False) == ("b", "s", 32)
    assert _fold.symbolic_reshape(("b", "s", 4, 8), ("b", "s", -1), False) == ("b", "s", 32)
    assert _fold.symbolic_reshape(("b", "s", 32), ("b", -1, 4, 8), False) == ("b", "s", 4, 8)
    assert _fold.symbolic_reshape(("b", "s", 32), ("t", -1), False) == ("t", None)  # "t" is not b or s
    assert _fold.symbolic_reshape(("b", None, 32), (0, -1), False) == ("b", None)


@pytest.mark.parametrize("build", [coverage.build_encoder_dynamic, coverage.build_encoder_dynamic_quantized])
def test_attention_reshapes_of_a_dynamic_export_have_known_shapes(build) -> None:
    model = build(0)
    graph = ModelGraph(model)
    merged = [n.output[0] for n in model.graph.node if n.name.endswith("merge_heads")]
    assert merged and all(graph.shape(name) == ("batch", "sequence", 32) for name in merged)
    if build is coverage.build_encoder_dynamic_quantized:
        assert {n.op_type for n in model.graph.node} >= {"MatMulInteger", "DynamicQuantizeLinear"}
        assert len(model.graph.value_info) > 0  # the quantizer's own, with names of its own


def test_a_classifier_behind_a_reshape_of_unknown_size_is_pinned_by_the_output() -> None:
    model = _fixture("crnn_dynamic_head")
    graph = ModelGraph(model)
    view = next(n for n in model.graph.node if n.name == "view")
    shape = graph.shape(view.output[0])
    assert shape is None or not all(isinstance(d, int) for d in shape)  # the view's size stays unknown
    analysis = analyze(model)
    (group_id,) = _maps(analysis, "classifier", 1)
    group = analysis.group(group_id)
    assert group.frozen and [r.kind for r in group.reasons] == ["graph-output"]
    assert "log_probabilities" in group.reasons[0].message
    assert analysis.summary()["producer_neurons_pinned_by_outputs"] == 37


def test_a_transposed_index_map_survives_the_key_file(tmp_path) -> None:
    """ShuffleNet v1's key names a transposed map; written to JSON, read back, it undoes the permutation."""
    import json

    import onnxlady

    source = tmp_path / "shufflenet_v1.onnx"
    onnx.save(_fixture("shufflenet_v1"), source)
    permuted, key, restored = tmp_path / "permuted.onnx", tmp_path / "key.json", tmp_path / "restored.onnx"
    onnxlady.permute(source, output=permuted, key_out=key, seed=4)
    assert '"transposed"' in key.read_text() and json.loads(key.read_text())
    onnxlady.unpermute(permuted, key, output=restored)
    assert constant_bytes(onnx.load(restored)) == constant_bytes(onnx.load(source))
