"""Quantized and reduced-precision weights: QDQ, QLinear*/Integer operators, weight-only int8,
float16 and bfloat16 (issue: "Coverage: quantized and reduced-precision weights").

For every fixture of ``fixtures/quantized.py``: a seeded permutation keeps the function, a wrong
one (a producer's rows moved with their own scale, zero point and bias, but not its readers) is
caught, unpermuting restores every constant bit for bit (scales and zero points included), the
expected groups are permutable, and the per-channel scales and zero points are group members.
Then small inline models for the cases where following a weight would be wrong.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from fixtures import quantized
from onnxlady import (
    ChannelAnalysis,
    analyze,
    draw_permutations,
    permute_model,
    unpermute_model,
    verify_models,
)
from onnxlady._graph._expr import labels
from onnxlady._transforms._permute import _permute_tensor, _tensor_holders
from onnxlady.testing import PRODUCER_ROLES, GraphBuilder, constant_bytes, copy_model, permute_copy

NAMES = sorted(quantized.FIXTURES)
_SOURCES = {name: quantized.FIXTURES[name](0) for name in NAMES}

#: (atol, rtol) of the equivalence checks: float16 compute rounds every intermediate to 11 bits.
TOLERANCES = {"float16_convnet": (1e-2, 1e-2)}
DEFAULT_TOLERANCE = (1e-4, 1e-3)
#: Integer pipelines: accumulation order cannot matter, the outputs must be identical.
EXACT = ("qlinear_convnet", "dynamic_quantized")

#: Sizes of the permutable groups; the last layer's neurons are pinned by the graph output.
EXPECTED_GROUPS = {
    "qdq_convnet": [16, 16, 32],
    "qlinear_convnet": [16, 24, 24, 32],
    "dynamic_quantized": [16, 16, 24],
    "weight_only_int8": [16, 24, 24],
    "float16_convnet": [16, 16, 32],
    "bfloat16_weights": [16, 32, 32],
}

#: Scale / zero-point tensor -> the (tensor, axis) whose group it must belong to.
COMPANIONS = {
    "qdq_convnet": {
        "stem.conv.weight.scale": ("stem.conv.weight.quantized", 0),
        "stem.conv.weight.zero_point": ("stem.conv.weight.quantized", 0),
        "block.conv1.weight.scale": ("block.conv1.weight.quantized", 0),
        "block.conv1.weight.zero_point": ("block.conv1.weight.quantized", 0),
        "block.conv2.weight.scale": ("block.conv2.weight.quantized", 0),
        "block.conv2.weight.zero_point": ("block.conv2.weight.quantized", 0),
        "block.conv2.bias.scale": ("block.conv2.bias.quantized", 0),  # int32 bias, per channel
        "block.qdq.quantize.scale": ("block.conv2.weight.quantized", 0),  # per-axis activation QDQ
        "block.qdq.quantize.zero_point": ("block.conv2.weight.quantized", 0),
        "down.conv.weight.scale": ("down.conv.weight.quantized", 0),
        "down.conv.weight.zero_point": ("down.conv.weight.quantized", 0),
    },
    "qlinear_convnet": {
        **{f"{conv}.weight.{part}": (f"{conv}.weight.quantized", 0)
           for conv in ("conv1", "conv2", "depthwise", "pointwise") for part in ("scale", "zero_point")},
        "head.fc1.weight.scale": ("head.fc1.weight.quantized", 1),  # per column of b
        "head.fc1.weight.zero_point": ("head.fc1.weight.quantized", 1),
    },
    "dynamic_quantized": {
        "conv1.weight_scale.scale": ("conv1.weight.quantized", 0),
        "conv2.weight_scale.scale": ("conv2.weight.quantized", 0),
        "fc1.weight.scale": ("fc1.weight.quantized", 1),
        "fc1.weight.zero_point": ("fc1.weight.quantized", 1),
    },
    "weight_only_int8": {
        "conv1.weight.scale": ("conv1.weight.quantized", 0),
        "conv2.weight.scale": ("conv2.weight.quantized", 0),
    },
    "float16_convnet": {},
    "bfloat16_weights": {},
}


# -- helpers ------------------------------------------------------------------------------
def _permuted(name: str, seed: int):
    source = _SOURCES[name]
    return (source, *permute_copy(source, seed))


def _verify(name: str, source: onnx.ModelProto, model: onnx.ModelProto, **kwargs):
    atol, rtol = TOLERANCES.get(name, DEFAULT_TOLERANCE)
    return verify_models(source, model, provider="cpu", atol=atol, rtol=rtol, **kwargs)


def _group_of(analysis: ChannelAnalysis, tensor: str, axis: int) -> str | None:
    for group in analysis.groups:
        for member in group.members:
            if member.is_weight and member.tensor == tensor and member.axis == axis and member.index_map == "p":
                return group.id
    return None


def _producer_fractions(analysis: ChannelAnalysis) -> tuple[int, int, int]:
    """(producer neurons, permutable ones, ones pinned by graph outputs) over every producer a
    rule declared (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger included).
    """
    total = permutable = pinned = 0
    for _index, expr in analysis.state.producers:
        for root, lab in labels(analysis.solver, expr).items():
            group = analysis.group_of_root(root)
            if group is None:
                continue
            count = int((lab >= 0).sum())
            if group.permutable:
                permutable += count
            elif all(reason.kind == "graph-output" for reason in group.reasons):
                pinned += count
        total += expr.size
    return total, permutable, pinned


def _producer_only(model: onnx.ModelProto, analysis: ChannelAnalysis) -> list[str]:
    """Move one producer's output neurons alone: its weight rows with their own per-channel
    scale, zero point and bias (consistent among themselves), but none of its readers.

    Returns the tensors it changed. The producer is the first with a permutable output group.
    """
    graph = analysis.graph
    holders = _tensor_holders(model)
    for plan in analysis.tensors:
        for axis, expr in plan.axes:
            if not any(role in PRODUCER_ROLES for role in plan.roles):
                continue
            groups = [gid for gid in analysis.neuron_labels(expr) if analysis.group(gid).permutable]
            if not groups or _group_of(analysis, plan.tensor, axis) != groups[0]:
                continue
            (node, slot), *_ = plan.uses
            leaf = graph.constant_leaf(graph.nodes[node].input[slot])
            own_nodes = {node, *(leaf.chain if leaf else ())}
            size = holders[plan.tensor].dims[axis]
            swap = np.arange(size)
            swap[[0, size - 1]] = swap[[size - 1, 0]]
            changed = []
            for other in analysis.tensors:
                if not any(use[0] in own_nodes for use in other.uses):
                    continue
                for other_axis, _ in other.axes:
                    if _group_of(analysis, other.tensor, other_axis) == groups[0]:
                        _permute_tensor(holders[other.tensor], [(other_axis, swap)])
                        changed.append(other.tensor)
            return changed
    raise AssertionError("no permutable producer weight found")


# -- the fixtures ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_permuted_model_is_equivalent(name: str, seed: int) -> None:
    source, model, _, perms, _ = _permuted(name, seed)
    assert perms
    report = _verify(name, source, model, iterations=2)
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs
    if name in EXACT:
        assert all(o.max_abs_error == 0.0 for o in report.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_producer_permuted_with_its_scale_alone_is_caught(name: str) -> None:
    source = _SOURCES[name]
    model = copy_model(source)
    changed = _producer_only(model, analyze(model))
    if name in ("qdq_convnet", "qlinear_convnet", "weight_only_int8"):
        # The weight rows moved together with their own per-channel scale and zero point
        # (dynamic_quantized applies its scales in a later Mul, not at the producer).
        assert len(changed) >= 2 and set(COMPANIONS[name]) & set(changed), changed
    report = _verify(name, source, model)
    assert not report.equivalent, changed


@pytest.mark.parametrize(
    ("name", "companion"),
    [
        ("qdq_convnet", "stem.conv.weight.scale"),
        ("qdq_convnet", "block.conv2.bias.scale"),
        ("qlinear_convnet", "conv2.weight.scale"),
        ("qlinear_convnet", "head.fc1.weight.zero_point"),
        ("dynamic_quantized", "fc1.weight.zero_point"),
        ("weight_only_int8", "conv2.weight.scale"),
    ],
)
def test_a_forgotten_scale_or_zero_point_is_caught(name: str, companion: str) -> None:
    """Companions matter: the right permutation with one scale or zero point left in place fails.

    (Not for qdq_convnet's per-axis activation QDQ: its Q and DQ share the scale, so leaving it
    in place only moves the rounding grid, and the next per-tensor QDQ rounds that away; see
    :func:`test_per_axis_activation_qdq_follows_the_channels`.)
    """
    source, model, _, _, _ = _permuted(name, seed=1)
    original = _tensor_holders(source)[companion]
    permuted = _tensor_holders(model)[companion]
    assert permuted.SerializeToString() != original.SerializeToString()
    permuted.CopyFrom(original)
    assert not _verify(name, source, model).equivalent


@pytest.mark.parametrize("name", NAMES)
def test_unpermute_restores_every_constant_bit_for_bit(name: str) -> None:
    source, model, _, _, key = _permuted(name, seed=2)
    before, after = constant_bytes(source), constant_bytes(model)
    for companion in COMPANIONS[name]:
        assert after[companion] != before[companion], f"{companion} was not permuted"
    assert unpermute_model(model, key) is True
    assert constant_bytes(model) == before
    assert model.SerializeToString() == source.SerializeToString()


@pytest.mark.parametrize("name", NAMES)
def test_expected_groups_are_permutable(name: str) -> None:
    analysis = analyze(copy_model(_SOURCES[name]))
    assert sorted(g.size for g in analysis.permutable_groups) == EXPECTED_GROUPS[name]
    total, permutable, pinned = _producer_fractions(analysis)
    assert total > 0
    # Every producer neuron that no graph output pins is permutable: 100 %.
    assert permutable == total - pinned, (total, permutable, pinned)
    frozen = [g for g in analysis.groups if g.frozen]
    assert all(r.kind == "graph-output" for g in frozen for r in g.reasons), [g.reasons for g in frozen]


@pytest.mark.parametrize("name", [n for n in NAMES if COMPANIONS[n]])
def test_scales_and_zero_points_are_group_members(name: str) -> None:
    analysis = analyze(copy_model(_SOURCES[name]))
    for companion, (tensor, axis) in COMPANIONS[name].items():
        expected = _group_of(analysis, tensor, axis)
        assert expected is not None and analysis.group(expected).permutable, tensor
        companion_axis = next(
            m.axis for g in analysis.groups for m in g.members if m.tensor == companion and m.is_weight
        )
        assert _group_of(analysis, companion, companion_axis) == expected, companion


def test_per_tensor_scales_stay_in_place() -> None:
    """Per-tensor QDQ activations and per-tensor weight scales are not permuted."""
    source, model, analysis, _, _ = _permuted("qdq_convnet", seed=1)
    before, after = constant_bytes(source), constant_bytes(model)
    for name in ("input_qdq.quantize.scale", "stem.qdq.quantize.scale", "block.qdq1.quantize.zero_point"):
        assert after[name] == before[name]
        assert not any(m.tensor == name for g in analysis.groups for m in g.members)
    source, model, analysis, _, _ = _permuted("weight_only_int8", seed=1)
    assert constant_bytes(model)["conv3.weight.scale"] == constant_bytes(source)["conv3.weight.scale"]


@pytest.mark.parametrize("name", ["float16_convnet", "bfloat16_weights"])
def test_16_bit_weights_move_as_raw_elements(name: str) -> None:
    """float16 / bfloat16 tensors keep their type and storage field; elements move bit for bit."""
    source, model, analysis, perms, _ = _permuted(name, seed=1)
    before, after = _tensor_holders(source), _tensor_holders(model)
    checked = 0
    for plan in analysis.tensors:
        old, new = before[plan.source], after[plan.tensor]
        if old.data_type not in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            continue
        assert new.data_type == old.data_type and new.HasField("raw_data") == old.HasField("raw_data")
        assert len(new.int32_data) == len(old.int32_data)
        bits = numpy_helper.to_array(old).view(np.uint16)
        for axis, expr in plan.axes:
            bits = np.take(bits, analysis.index_array(expr, perms), axis=axis)
        assert np.array_equal(numpy_helper.to_array(new).view(np.uint16), bits), plan.tensor
        checked += 1
    assert checked >= 3
    if name == "bfloat16_weights":
        typed = [t for t in source.graph.initializer if t.int32_data]
        assert {t.data_type for t in typed} == {TensorProto.BFLOAT16, TensorProto.FLOAT16}


def test_float16_tolerance_still_catches_a_wrong_permutation() -> None:
    """At float16 tolerances (1e-2), a wrong permutation of any single group is still caught."""
    source = _SOURCES["float16_convnet"]
    analysis = analyze(copy_model(source))
    for group in analysis.permutable_groups:
        model = copy_model(source)
        holders = _tensor_holders(model)
        member = next(m for m in group.members if m.is_weight and m.index_map == "p")
        swap = np.arange(group.size)
        swap[[0, group.size - 1]] = swap[[group.size - 1, 0]]
        _permute_tensor(holders[member.tensor], [(member.axis, swap)])
        assert not _verify("float16_convnet", source, model).equivalent, member


# -- inline models: where following the weight would be wrong --------------------------------
def _image(name: str, opset: int = 17) -> tuple[GraphBuilder, str]:
    b = GraphBuilder(name, 0, opset=opset)
    return b, b.input("input", (1, 3, 8, 8))


def _round_trip(model: onnx.ModelProto, seed: int = 1) -> tuple[ChannelAnalysis, onnx.ModelProto]:
    permuted = copy_model(model)
    analysis = analyze(permuted)
    key = permute_model(analysis, draw_permutations(analysis, seed), seed=seed)
    check = copy_model(permuted)
    assert unpermute_model(check, key) and constant_bytes(check) == constant_bytes(model)
    return analysis, permuted


def _reasons(analysis: ChannelAnalysis) -> str:
    return " | ".join(str(r) for g in analysis.groups for r in g.reasons)


def test_per_axis_activation_qdq_follows_the_channels() -> None:
    """QuantizeLinear -> DequantizeLinear with axis=1 on a conv output: the shared scale and zero
    point are bound to the channels; left in place, coarse scales and clipping zero points land
    on the wrong channels.
    """
    b, x = _image("qdq_per_axis")
    x = b.relu(b.conv(x, 8, 3, name="conv1"), name="relu1")
    scale = np.geomspace(0.02, 0.2, 8).astype(np.float32)
    b.rng.shuffle(scale)
    zero = b.rng.integers(100, 250, size=8).astype(np.uint8)  # uint8: a high zero point clips
    q = b.quantize(x, scale, zero, axis=1, name="qdq.quantize")
    x = b.dequantize(q, f"{q}.scale", f"{q}.zero_point", axis=1, name="qdq.dequantize")
    model = b.build(b.conv(x, 4, 3, name="out", gain=1.0))
    analysis, permuted = _round_trip(model)
    group = _group_of(analysis, "conv1.weight", 0)
    assert group is not None and analysis.group(group).permutable
    for companion in ("qdq.quantize.scale", "qdq.quantize.zero_point"):
        assert _group_of(analysis, companion, 0) == group
    assert verify_models(model, permuted, provider="cpu").equivalent
    for companion in ("qdq.quantize.scale", "qdq.quantize.zero_point"):
        forgot = copy_model(permuted)
        _tensor_holders(forgot)[companion].CopyFrom(_tensor_holders(model)[companion])
        assert not verify_models(model, forgot, provider="cpu").equivalent, companion


def test_fake_quantized_float_weight() -> None:
    """Quantization-aware training exports: a float weight through QuantizeLinear ->
    DequantizeLinear (per channel, one scale and zero point shared by both) into the conv.
    """
    b, x = _image("qat_weight")
    weight = b.conv_weight(x, 8, 3)
    _, scale, zero = b.quantize_array(weight, 0)
    with b.scope("conv1.weight"):
        q = b.quantize(b.param("float", weight), scale, zero, axis=0, name="quantize")
        w = b.dequantize(q, f"{q}.scale", f"{q}.zero_point", axis=0, name="dequantize")
    x = b.relu(b.conv(x, 8, 3, weight=w, name="conv1"), name="relu1")
    model = b.build(b.conv(x, 4, 3, name="out", gain=1.0))
    analysis, permuted = _round_trip(model)
    group = _group_of(analysis, "conv1.weight.float", 0)
    assert group is not None and analysis.group(group).permutable
    for companion in ("conv1.weight.quantize.scale", "conv1.weight.quantize.zero_point"):
        assert _group_of(analysis, companion, 0) == group
    assert verify_models(model, permuted, provider="cpu").equivalent


def test_dequantize_axis_other_than_the_permuted_one() -> None:
    """DQ(axis=1) on a conv weight: the scale runs along the input channels, so it follows the
    previous conv's group, and the conv's own output rows move without it.
    """
    b, x = _image("dq_axis1")
    x = b.relu(b.conv(x, 8, 3, name="conv1"), name="relu1")
    w = b.dequantized_param("conv2.weight", b.conv_weight(x, 12, 3), axis=1)
    x = b.relu(b.conv(x, 12, 3, weight=w, name="conv2"), name="relu2")
    model = b.build(b.conv(x, 4, 3, name="conv3", gain=1.0))
    analysis, permuted = _round_trip(model)
    group = _group_of(analysis, "conv1.weight", 0)
    assert group is not None and _group_of(analysis, "conv2.weight.scale", 0) == group
    assert _group_of(analysis, "conv2.weight.quantized", 1) == group
    assert _group_of(analysis, "conv2.weight.quantized", 0) not in (None, group)
    assert verify_models(model, permuted, provider="cpu").equivalent


def test_per_tensor_weight_scale_is_not_a_member() -> None:
    b, x = _image("dq_per_tensor")
    w = b.dequantized_param("conv1.weight", b.conv_weight(x, 8, 3), axis=None)
    x = b.relu(b.conv(x, 8, 3, weight=w, name="conv1"), name="relu1")
    model = b.build(b.conv(x, 4, 3, name="conv2", gain=1.0))
    analysis, permuted = _round_trip(model)
    assert [g.size for g in analysis.permutable_groups] == [8]
    assert not any(m.tensor.startswith("conv1.weight.") and "quantized" not in m.tensor
                   for g in analysis.groups for m in g.members)
    assert verify_models(model, permuted, provider="cpu").equivalent


def test_dequantized_weight_read_by_two_convs_freezes() -> None:
    """One DQ output shared by two convs: a copy of the weight for one of them would still read
    the shared scale, so neither use may be permuted on its own.
    """
    b, x = _image("dq_shared")
    x = b.relu(b.conv(x, 8, 3, name="conv0"), name="relu0")
    w = b.dequantized_param("shared.weight", b.conv_weight(x, 8, 3), axis=0)
    y1 = b.conv(x, 8, 3, weight=w, name="conv1")
    y2 = b.conv(b.relu(x, name="relu_side"), 8, 3, weight=w, name="conv2")
    model = b.build(b.conv(b.relu(b.add(y1, y2, name="add"), name="relu"), 4, 3, name="out"))
    analysis, permuted = _round_trip(model)
    assert _group_of(analysis, "shared.weight.quantized", 0) is None
    assert "read by 2 operators" in _reasons(analysis)
    assert verify_models(model, permuted, provider="cpu").equivalent


def test_blocked_quantization_along_the_permuted_axis_freezes() -> None:
    """Blocked DQ (opset 21) along the output channels: only whole blocks could move, so the
    output group freezes; the input channels are not blocked and the full-rank scale follows
    them on its own axis 1.
    """
    b, x = _image("dq_blocked", opset=21)
    x = b.relu(b.conv(x, 8, 1, name="conv0"), name="relu0")
    weight = b.conv_weight(x, 8, 1)  # [8, 8, 1, 1], blocks of 4 output channels
    scale = (np.abs(weight).reshape(2, 4, 8, 1, 1).max(axis=1) / 120).astype(np.float32)
    q = np.clip(np.rint(weight / np.repeat(scale, 4, axis=0)), -127, 127).astype(np.int8)
    w = b.dequantize(b.param("conv1.weight.quantized", q), b.param("conv1.weight.scale", scale),
                     axis=0, block_size=4, name="conv1.weight.dequantize")
    x = b.relu(b.conv(x, 8, 1, weight=w, name="conv1"), name="relu1")
    model = b.build(b.conv(x, 4, 1, name="out"))
    analysis, permuted = _round_trip(model)
    assert _group_of(analysis, "conv1.weight.quantized", 0) is None
    assert "blocks of 4" in _reasons(analysis)
    group = _group_of(analysis, "conv0.weight", 0)
    assert group is not None and analysis.group(group).permutable
    assert _group_of(analysis, "conv1.weight.scale", 1) == group
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    (want,) = ReferenceEvaluator(model).run(None, feeds)
    (got,) = ReferenceEvaluator(permuted).run(None, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_packed_int4_weight_freezes() -> None:
    b, x = _image("dq_int4", opset=21)
    x = b.relu(b.conv(x, 8, 1, name="conv0"), name="relu0")
    q = b.rng.integers(-7, 8, size=(8, 8, 1, 1))
    w4 = b.param_proto(helper.make_tensor("conv1.weight.int4", TensorProto.INT4, [8, 8, 1, 1],
                                          q.reshape(-1).tolist()))
    w = b.dequantize(w4, b.uniform((8,), 0.02, 0.04), axis=0, name="conv1.weight.dequantize")
    x = b.relu(b.conv(x, 8, 1, weight=w, name="conv1"), name="relu1")
    analysis = analyze(b.build(b.conv(x, 4, 1, name="out")))
    assert _group_of(analysis, "conv1.weight.int4", 0) is None
    assert "packs two values per byte" in _reasons(analysis)


def test_conv_integer_per_channel_zero_point() -> None:
    """ConvInteger with a per-output-channel weight zero point (ONNX Runtime's CPU kernel has
    none, so the reference evaluator checks the function).
    """
    b, x = _image("conv_integer")
    xq, x_scale, x_zero = b.dynamic_quantize(x, name="quantize")
    q, _, zero = b.quantized_param("conv1.weight", b.conv_weight(x, 8, 3), axis=0, levels=60)
    y = b.cast(b.conv_integer(xq, q, x_zero, zero, name="conv1"), TensorProto.FLOAT, name="cast")
    y = b.relu(b.mul(y, x_scale, name="scale"), name="relu")
    model = b.build(b.conv(y, 4, 3, name="out", gain=0.001))
    analysis, permuted = _round_trip(model)
    group = _group_of(analysis, "conv1.weight.quantized", 0)
    assert group is not None and _group_of(analysis, "conv1.weight.zero_point", 0) == group
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    (want,) = ReferenceEvaluator(model).run(None, feeds)
    (got,) = ReferenceEvaluator(permuted).run(None, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_weight_times_a_full_size_mask_moves_both() -> None:
    """``W * mask`` (magnitude pruning exported as a Mul of two constants): both are permuted."""
    b, x = _image("masked_weight")
    weight = b.conv_weight(x, 8, 3)
    w = b.param("conv1.weight", weight)
    mask = b.param("conv1.mask", (b.rng.random(weight.shape) > 0.3).astype(np.float32))
    w = b.mul(w, mask, name="conv1.masked")
    x = b.relu(b.conv(x, 8, 3, weight=w, name="conv1"), name="relu1")
    model = b.build(b.conv(x, 4, 3, name="out", gain=1.0))
    analysis, permuted = _round_trip(model)
    group = _group_of(analysis, "conv1.weight", 0)
    assert group is not None and _group_of(analysis, "conv1.mask", 0) == group
    assert verify_models(model, permuted, provider="cpu").equivalent


def test_transposed_dequantized_matmul_weight_is_safe() -> None:
    """``MatMul(x, Transpose(DQ(W)))``: if the MatMul rule follows the weight through the
    Transpose, the per-channel scale must follow too; otherwise the group must freeze.
    """
    b = GraphBuilder("dq_transposed", 0)
    x = b.input("input", (1, 4, 16))
    x = b.relu(b.matmul(x, 24, name="fc1"), name="relu1")
    w = b.dequantized_param("fc2.weight", b.he_normal((32, 24), 24), axis=0)  # [N, K], per N
    wt = b.transpose(w, [1, 0], name="fc2.weight.t")
    x = b.relu(b.matmul_on(x, wt, name="fc2"), name="relu2")
    model = b.build(b.matmul(x, 8, name="out", gain=1.0))
    analysis, permuted = _round_trip(model)
    rows = _group_of(analysis, "fc2.weight.quantized", 0)
    if rows is not None:
        assert _group_of(analysis, "fc2.weight.scale", 0) == rows
        assert _group_of(analysis, "fc2.weight.zero_point", 0) == rows
    assert verify_models(model, permuted, provider="cpu").equivalent
