"""Convolutions whose weights are standardized in the graph (timm's NF-ResNets, StdConv2d, BiT).

The export computes each weight: ``V[1, M, F] -> BatchNormalization(training_mode=1) -> Reshape ->
Conv``, with the normalization's unused running statistics computed by ``ReduceMean`` over a
transposed copy ``[1, F, M]`` of ``V``. The convolutions' neurons are permuted through the stored
``V`` (axis 1 for outputs, axis 2 by ``p (x) I_K`` for inputs) and the gain; the fan-in axis of the
statistics-only copy, which no computed activation carries, is frozen as ``constant-only`` instead
of being counted as permuted neurons (finding F3: a permute that claimed 26,899 neurons moved while
no weight of nf_resnet26 did).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures import FIXTURES
from onnxlady import analyze, unpermute_model, verify_models
from onnxlady.testing import GraphBuilder, constant_bytes, copy_model, permute_copy, permute_producer_only

#: The fixture's standardized convolutions and their output channels.
CONVS = {"stem": 16, "block.conv1": 16, "block.conv2": 16, "grouped": 24}
LOGITS = 10


def _source() -> onnx.ModelProto:
    return FIXTURES["std_conv"](0)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_the_statistics_copy_follows_and_no_constant_is_copied() -> None:
    analysis = analyze(_source())
    assert analysis.untied == []  # no statistics copy shuffled for nothing
    assert analysis.summary()["untied_constants"] == []
    for conv in CONVS:
        carrying = [g for g in analysis.groups if any(m.tensor == f"{conv}.weight_t" for m in g.members)]
        assert carrying and all(g.permutable for g in carrying), conv
    assert "constant-only" not in analysis.summary()["freeze_reasons_by_kind"]


def test_statistics_only_axes_are_frozen_as_constant_only() -> None:
    """In inference mode the copy's statistics are read by nobody: its fan-in axis moves no neuron."""
    analysis = analyze(_inference_mode(_source()))
    for conv in CONVS:
        carrying = [g for g in analysis.groups if any(m.tensor == f"{conv}.centred" for m in g.members)]
        assert len(carrying) == 1, conv
        group = carrying[0]
        assert group.frozen and not group.permutable
        assert [r.kind for r in group.reasons] == ["constant-only"]
        assert f"'{conv}.centred'" in group.reasons[0].message
    assert analysis.untied == []


def test_every_permutable_group_moves_an_activation_or_a_conv_weight() -> None:
    analysis = analyze(_source())
    graph = analysis.graph
    assert analysis.permutable_groups
    for group in analysis.permutable_groups:
        activations = [m for m in group.members if not m.is_weight and not graph.constant_derived(m.tensor)]
        assert activations, f"{group.id} moves no computed tensor: {group.members}"


def test_the_convolutions_are_producers_and_permutable() -> None:
    summary = analyze(_source()).summary()
    assert summary["producer_neurons"] == sum(CONVS.values()) + LOGITS
    assert summary["permutable_producer_neurons"] == sum(CONVS.values())
    assert summary["producer_neurons_pinned_by_outputs"] == LOGITS


def test_permute_moves_the_stored_weights_and_keeps_the_function() -> None:
    source = _source()
    model, _, perms, _ = permute_copy(source, 1)
    assert perms
    report = verify_models(source, model, provider="cpu", iterations=2)
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs
    for conv in CONVS:
        before, after = _initializer(source, f"{conv}.weight"), _initializer(model, f"{conv}.weight")
        assert not np.array_equal(before, after), conv
        # Output channels (axis 1) and fan-in (axis 2) move; the numbers stay the same.
        assert np.array_equal(np.sort(before, axis=None), np.sort(after, axis=None))
        assert not np.array_equal(_initializer(source, f"{conv}.gain"), _initializer(model, f"{conv}.gain"))
        # The statistics copy (read only for the unread running statistics) moves the same way.
        copy = _initializer(model, f"{conv}.weight_t")
        assert np.array_equal(copy, after.transpose(0, 2, 1))
        assert not np.array_equal(copy, _initializer(source, f"{conv}.weight_t"))
    assert not [t.name for t in model.graph.initializer if "onnxlady_copy" in t.name]


def test_a_wrong_permutation_of_a_standardized_weight_is_caught() -> None:
    source = _source()
    model = copy_model(source)
    changed = permute_producer_only(model, analyze(model))
    assert changed in {f"{conv}.weight" for conv in CONVS}
    assert not verify_models(source, model, provider="cpu").equivalent


def test_unpermute_restores_the_source_bit_for_bit() -> None:
    source = _source()
    model, _, _, key = permute_copy(source, 2)
    # The permuted model holds the source's tensors (no copies), the stored weights moved.
    assert [t.name for t in model.graph.initializer] == [t.name for t in source.graph.initializer]
    assert constant_bytes(model)["stem.weight"] != constant_bytes(source)["stem.weight"]
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()


def _inference_mode(source: onnx.ModelProto) -> onnx.ModelProto:
    """The fixture with every standardization in inference mode: mean and variance stored.

    Same function (the stored statistics are the ones training mode computes), but now the
    statistics normalize and must follow the output channels.
    """
    model = copy_model(source)
    for conv in CONVS:
        node = _node(model, f"{conv}.standardize")
        values = _initializer(model, f"{conv}.weight")[0]
        stats = {"mean": values.mean(axis=1), "var": values.var(axis=1)}
        for slot, kind in ((3, "mean"), (4, "var")):
            name = f"{conv}.stored_{kind}"
            model.graph.initializer.append(numpy_helper.from_array(stats[kind].astype(np.float32), name))
            node.input[slot] = name
        del node.output[1:]
        for attribute in node.attribute:
            if attribute.name == "training_mode":
                attribute.i = 0
    return model


def test_inference_mode_statistics_follow_the_output_channels() -> None:
    source = _inference_mode(_source())
    analysis = analyze(source)
    assert analysis.summary()["permutable_producer_neurons"] == sum(CONVS.values())
    model, _, _, key = permute_copy(source, 5)
    assert verify_models(source, model, provider="cpu").equivalent
    for conv in CONVS:
        assert not np.array_equal(
            _initializer(source, f"{conv}.stored_mean"), _initializer(model, f"{conv}.stored_mean")
        )
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong, provider="cpu").equivalent
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()


def _with_output(source: onnx.ModelProto, tensor: str, shape: list[int]) -> onnx.ModelProto:
    model = copy_model(source)
    model.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, shape))
    return model


def _conv_groups(analysis, conv: str):  # type: ignore[no-untyped-def]
    return [g for g in analysis.groups if any(m.tensor == f"{conv}.conv" and m.role == "activation" for m in g.members)]


@pytest.mark.parametrize(
    ("tensor", "shape"),
    [
        ("block.conv1.standardize.running_mean", [16]),  # the running statistics are read
        ("block.conv1.standardize", [1, 16, 144]),  # the standardized weight is read elsewhere too
    ],
)
def test_a_standardization_read_elsewhere_freezes_its_conv_with_a_reason(tensor: str, shape: list[int]) -> None:
    analysis = analyze(_with_output(_source(), tensor, shape))
    groups = _conv_groups(analysis, "block.conv1")
    assert len(groups) == 1 and groups[0].frozen
    assert any(r.kind == "not-constant" and "block.conv1.weight_shape" in r.message for r in groups[0].reasons)
    summary = analysis.summary()
    assert summary["producer_neurons"] == sum(CONVS.values()) + LOGITS  # still counted, as frozen
    assert summary["permutable_producer_neurons"] < sum(CONVS.values())


def _conv2_weight_computed(op_type: str, extra: list[onnx.TensorProto], attributes: dict | None = None) -> onnx.ModelProto:
    """The fixture with ``block.conv2``'s weight computed by ``op_type`` from random constants."""
    model = copy_model(_source())
    conv = _node(model, "block.conv2.conv")
    rng = np.random.default_rng(5)
    weight = numpy_helper.from_array(rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32), "block.conv2.w_a")
    model.graph.initializer.extend([weight, *extra])
    inputs = ["block.conv2.w_a", *(t.name for t in extra)]
    model.graph.node.insert(
        list(model.graph.node).index(conv),
        helper.make_node(op_type, inputs, ["block.conv2.w_sum"], name="block.conv2.w_op", **(attributes or {})),
    )
    conv.input[1] = "block.conv2.w_sum"
    return model


def test_a_weight_summed_from_two_constants_moves_both() -> None:
    """``Add`` of two constants commutes with a permutation: both move with the convolution's channels.

    onnxoptimizer's BatchNorm fold computes a Conv's weight as such arithmetic on constants
    (``W * Unsqueeze(scale / Sqrt(var + eps))``); it was frozen before.
    """
    rng = np.random.default_rng(6)
    delta = numpy_helper.from_array(rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32), "block.conv2.w_b")
    source = _conv2_weight_computed("Add", [delta])
    analysis = analyze(source)
    groups = _conv_groups(analysis, "block.conv2")
    assert len(groups) == 1 and groups[0].permutable
    assert {"block.conv2.w_a", "block.conv2.w_b"} <= {m.tensor for m in groups[0].members}
    assert analysis.summary()["permutable_producer_neurons"] == sum(CONVS.values())
    permuted, _, _, key = permute_copy(source, 3)
    assert verify_models(source, permuted, provider="cpu").equivalent
    wrong = copy_model(permuted)  # one of the two constants' output rows swapped back
    tensor = next(t for t in wrong.graph.initializer if t.name == "block.conv2.w_b")
    rows = numpy_helper.to_array(tensor).copy()
    assert not np.array_equal(rows, numpy_helper.to_array(delta))  # it was moved
    rows[[0, 1]] = rows[[1, 0]]
    tensor.CopyFrom(numpy_helper.from_array(rows, "block.conv2.w_b"))
    assert not verify_models(source, wrong, provider="cpu").equivalent
    assert unpermute_model(permuted, key) is True
    assert permuted.SerializeToString() == source.SerializeToString()


def test_a_weight_computed_by_mixing_its_channels_freezes_with_a_reason() -> None:
    """``CumSum`` along the output axis mixes the channels: no permutation of its constant follows."""
    axis = numpy_helper.from_array(np.array(0, dtype=np.int64), "block.conv2.w_axis")
    model = _conv2_weight_computed("CumSum", [axis])
    analysis = analyze(model)
    groups = _conv_groups(analysis, "block.conv2")
    assert len(groups) == 1 and groups[0].frozen
    assert any(r.kind == "not-constant" and "block.conv2.w_sum" in r.message for r in groups[0].reasons)
    assert analysis.summary()["producer_neurons"] == sum(CONVS.values()) + LOGITS
    permuted, _, _, _ = permute_copy(model, 3)
    assert verify_models(model, permuted, provider="cpu").equivalent


def _unfolded_standardization() -> onnx.ModelProto:
    """Two convs standardized by element-wise operators (an export without constant folding).

    ``W = (V - mean(V)) / sqrt(var(V) + eps) * gain``, the statistics per output channel
    (ReduceMean over axes 1, 2, 3): ``V`` is read by several operators, so no rule maps the
    weight back to it.
    """
    b = GraphBuilder("ws_unfolded", 0)
    x = b.input("input", (1, 3, 16, 16))

    def std_conv(x: str, channels: int, name: str) -> str:
        with b.scope(name):
            v = b.param("weight", b.rng.standard_normal((channels, b.channels(x), 3, 3), dtype=np.float32))
            centred = b.sub(v, b.reduce_mean(v, [1, 2, 3], name="mean"), name="centred")
            var = b.reduce_mean(b.mul(centred, centred, name="square"), [1, 2, 3], name="var")
            std = b.sqrt(b.add(var, np.array(1e-5, dtype=np.float32), name="eps"), name="std")
            w = b.mul(b.div(centred, std, name="norm"), b.uniform((channels, 1, 1, 1), 0.1, 0.2), name="scaled")
        return b.conv(x, channels, 3, weight=w, name=f"{name}.conv")

    y = b.relu(std_conv(x, 8, "c1"), name="r1")
    y = b.relu(std_conv(y, 8, "c2"), name="r2")
    return b.build(b.gemm(b.flatten(b.global_avg_pool(y, name="pool"), name="flat"), 4, name="logits"))


def test_an_unfolded_standardization_moves_through_its_statistics() -> None:
    """The per-channel statistics reduce over the axes a permutation moves: unchanged by it (held-out round 17, F1).

    Every use of ``V`` (the centring Sub and the ReduceMean of the mean) takes the same
    permutation, so none is left in its stored order (no untied copy); before, the convs froze
    as ``not-constant``.
    """
    model = _unfolded_standardization()
    analysis = analyze(model)
    summary = analysis.summary()
    assert summary["producer_neurons"] == 8 + 8 + 4
    assert summary["permutable_producer_neurons"] == 8 + 8
    # (the input's channels and the computed weights' kernel axes are groups of their own, frozen)
    assert set(summary["freeze_reasons_by_kind"]) == {"graph-output", "graph-input", "index-map"}
    assert analysis.untied == []
    permuted, _, _, _ = permute_copy(model, 3)
    assert verify_models(model, permuted, provider="cpu").equivalent
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent


def _reshaped_weight_standardization() -> onnx.ModelProto:
    """Weight standardization exported without folding: ``V = Reshape(W, [1, M, -1])`` of the stored W.

    As torch exports timm's ``StdConv2d`` with ``do_constant_folding=False``: the running
    statistics come from a second Reshape and a Transpose of the same W.
    """
    b = GraphBuilder("ws_reshaped", 0)
    x = b.input("input", (1, 3, 16, 16))

    def std_conv(x: str, channels: int, name: str) -> str:
        cin = b.channels(x)
        with b.scope(name):
            w = b.param("weight", b.rng.standard_normal((channels, cin, 3, 3), dtype=np.float32))
            values = b.reshape(w, [1, channels, -1], name="values")
            copy = b.transpose(b.reshape(w, [1, channels, -1], name="values_for_stats"), [0, 2, 1], name="copy")
            mean = b.reduce_mean(copy, [0, 1], keepdims=False, name="mean")
            centred = b.sub(copy, b.reduce_mean(copy, [0, 1], name="mean_keep"), name="centred")
            var = b.reduce_mean(b.mul(centred, centred, name="square"), [0, 1], keepdims=False, name="var")
            gain = b.param("gain", b.uniform((channels,), 0.8, 1.2) * np.float32(np.sqrt(2.0 / (cin * 9))))
            shift = b.param("shift", b.small_normal((channels,)))
            node = b._reserve("standardize", "BatchNormalization")
            outputs = [node, b._claim(f"{node}.running_mean"), b._claim(f"{node}.running_var")]
            b._register(node, (1, channels, cin * 9), onnx.TensorProto.FLOAT)
            for extra in outputs[1:]:
                b._register(extra, (channels,), onnx.TensorProto.FLOAT)
            b._nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [values, gain, shift, mean, var],
                    outputs,
                    name=node,
                    epsilon=1e-5,
                    momentum=1.0,
                    training_mode=1,
                )
            )
            weight = b.reshape(node, [channels, cin, 3, 3], name="weight_shape")
        return b.conv(x, channels, 3, weight=weight, name=f"{name}.conv")

    y = b.relu(std_conv(x, 8, "c1"), name="r1")
    y = b.relu(std_conv(y, 8, "c2"), name="r2")
    return b.build(b.gemm(b.flatten(b.global_avg_pool(y, name="pool"), name="flat"), 4, name="logits"))


def test_a_standardized_reshape_of_the_stored_weight_moves_that_weight() -> None:
    source = _reshaped_weight_standardization()
    analysis = analyze(source)
    assert analysis.summary()["permutable_producer_neurons"] == 8 + 8
    assert analysis.untied == []  # the statistics' reshape of W follows W: no copy kept in order
    model, _, perms, key = permute_copy(source, 4)
    assert perms
    assert verify_models(source, model, provider="cpu", iterations=2).equivalent
    moved = "c2.weight"  # read through the normalization (and the statistics): its rows moved
    assert not np.array_equal(_initializer(model, moved), _initializer(source, moved))
    wrong = copy_model(model)  # the permuted model with two output rows of that weight swapped back
    tensor = next(t for t in wrong.graph.initializer if t.name == moved)
    rows = numpy_helper.to_array(tensor).copy()
    rows[[0, 1]] = rows[[1, 0]]
    tensor.CopyFrom(numpy_helper.from_array(rows, moved))
    assert not verify_models(source, wrong, provider="cpu").equivalent
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()
