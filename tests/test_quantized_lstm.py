"""ONNX Runtime's dynamically quantized LSTM (issue 12: ``com.microsoft::DynamicQuantizeLSTM``).

The models are the float recurrent fixtures (``fixtures/recurrent.py``: a forward LSTM whose Y,
Y_h and Y_c all feed consumers, and a bidirectional one merged into the features; O(1)
outputs that depend on every unit) run through the REAL ``onnxruntime.quantization.quantize_dynamic``,
per tensor and per output channel. It writes W and R as int8 ``[dirs, input, 4*H]`` and
``[dirs, H, 4*H]`` (transposed against the LSTM) with their scales and zero points, and the
MatMul/Gemm around the LSTM as ``DynamicQuantizeLinear`` + ``MatMulInteger``.

- the hidden units are one permutable group: ``I_4 (x) p`` on W's and R's last axis and on
  per-channel scales and zero points, ``p`` on R's axis 1, B, P and the states as the float LSTM;
- permute -> ``verify_models`` equivalent -> unpermute bit for bit;
- wrong permutations are caught: one gate block of W left in place, R's hidden axis left in
  place, the per-channel scales left in place, the producer permuted alone;
- a quantization parameter of a layout the rule does not know freezes the units, saying why;
- resync of a permuted copy recovers every neuron.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import recurrent as recurrent_fixtures
from onnxlady import analyze, unpermute_model, verify_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._tensors import tensor_holders
from onnxlady._resync._entry import resync_model
from onnxlady.testing import constant_bytes, copy_model, group_at, index_maps, permute_copy, permute_producer_only

quantization = pytest.importorskip("onnxruntime.quantization", reason="onnxruntime.quantization is not installed")

#: (fixture, layer prefix, directions, hidden units, input features of the LSTM).
LAYERS = {"lstm": ("lstm", 1, 12, 16), "lstm_bidirectional": ("bilstm", 2, 8, 10)}
VARIANTS = [(name, per_channel) for name in LAYERS for per_channel in (False, True)]
IDS = [f"{name}-{'per_channel' if per_channel else 'per_tensor'}" for name, per_channel in VARIANTS]


# -- helpers ----------------------------------------------------------------------------------
@functools.cache
def _quantized_bytes(name: str, per_channel: bool) -> bytes:
    """The fixture through ``quantize_dynamic`` (int8 weights), as ONNX Runtime writes it."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "quantized.onnx"
        onnx.save(recurrent_fixtures.FIXTURES[name](0), source)
        quantization.quantize_dynamic(source, target, per_channel=per_channel, weight_type=quantization.QuantType.QInt8)
        return target.read_bytes()


def _quantized(name: str, per_channel: bool) -> onnx.ModelProto:
    model = onnx.load_from_string(_quantized_bytes(name, per_channel))
    if not any(node.op_type == "DynamicQuantizeLSTM" for node in model.graph.node):
        pytest.skip("this onnxruntime's quantize_dynamic does not write DynamicQuantizeLSTM for an LSTM")
    return model


def _lstm_node(model: onnx.ModelProto) -> onnx.NodeProto:
    (node,) = [node for node in model.graph.node if node.op_type == "DynamicQuantizeLSTM"]
    return node


_maps, _group = index_maps, group_at


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(tensor_holders(model)[name]).copy()


def _put(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    tensor_holders(model)[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def _equivalent(source: onnx.ModelProto, model: onnx.ModelProto, seed: int = 0) -> bool:
    return verify_models(source, model, provider="cpu", seed=seed).equivalent


# -- the converter's output ----------------------------------------------------------------------
@pytest.mark.parametrize(("name", "per_channel"), VARIANTS, ids=IDS)
def test_quantize_dynamic_writes_the_transposed_int8_layout(name: str, per_channel: bool) -> None:
    """What the rule relies on, read from the real converter's output (not an imitation)."""
    model = _quantized(name, per_channel)
    layer, dirs, hidden, features = LAYERS[name]
    node = _lstm_node(model)
    assert node.domain == "com.microsoft" and len(node.input) == 12
    assert node.input[1] == f"{layer}.W_quantized" and node.input[2] == f"{layer}.R_quantized"
    assert _array(model, node.input[1]).shape == (dirs, features, 4 * hidden)
    assert _array(model, node.input[2]).shape == (dirs, hidden, 4 * hidden)
    assert _array(model, node.input[1]).dtype == np.int8
    params = (dirs, 4 * hidden) if per_channel else (dirs,)
    for slot in (8, 9, 10, 11):
        assert _array(model, node.input[slot]).shape == params


# -- analysis ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "per_channel"), VARIANTS, ids=IDS)
def test_hidden_units_are_one_group_on_the_transposed_gate_axis(name: str, per_channel: bool) -> None:
    model = _quantized(name, per_channel)
    layer, _, _, _ = LAYERS[name]
    node = _lstm_node(model)
    analysis = analyze(model)
    units = _group(analysis, f"{layer}.R_quantized", 1)
    assert units.permutable and units.reasons == ()
    assert _maps(analysis, f"{layer}.R_quantized", 1) == {units.id: "p"}
    assert _maps(analysis, f"{layer}.R_quantized", 2) == {units.id: "I_4 (x) p"}
    assert _maps(analysis, f"{layer}.W_quantized", 2) == {units.id: "I_4 (x) p"}
    assert _maps(analysis, f"{layer}.B", 1) == {units.id: "I_8 (x) p"}
    assert _maps(analysis, f"{layer}.P", 1) == {units.id: "I_3 (x) p"}
    assert _maps(analysis, f"{layer}.initial_h", 2) == {units.id: "p"}
    assert _maps(analysis, f"{layer}.initial_c", 2) == {units.id: "p"}
    for slot in (8, 9, 10, 11):
        # Per channel: one scale per gate column, moving with it; per direction: nothing moves.
        assert _maps(analysis, node.input[slot], 1) == ({units.id: "I_4 (x) p"} if per_channel else {})
    # W's input axis takes the producer's (the quantized embedding MatMul's) group.
    features = _group(analysis, f"{layer}.W_quantized", 1)
    assert features.permutable and features is not units
    assert _maps(analysis, "embed.weight_quantized", 1) == {features.id: "p"}
    # The consumers read the units through the shapes inferred for DynamicQuantizeLSTM's outputs.
    consumer = ("sequence.weight_quantized", 0) if name == "lstm" else ("logits.weight_quantized", 0)
    assert _maps(analysis, *consumer) == {units.id: "p" if name == "lstm" else "I_2 (x) p"}


def test_output_shapes_are_inferred() -> None:
    """ONNX's shape inference does not know the operator: onnxlady gives Y, Y_h and Y_c their shapes."""
    graph = ModelGraph(_quantized("lstm", False))
    assert graph.shapes["lstm.Y"] == (6, 1, 2, 12)
    assert graph.shapes["lstm.Y_h"] == graph.shapes["lstm.Y_c"] == (1, 2, 12)
    graph = ModelGraph(_quantized("lstm_bidirectional", True))
    assert graph.shapes["bilstm.Y"] == (5, 2, 2, 8)


def test_unknown_parameter_layout_freezes_the_units_saying_why() -> None:
    """A W_scale that is neither [dirs] nor [dirs, 4*H] is not guessed at: the node freezes."""
    model = _quantized("lstm", True)
    node = _lstm_node(model)
    _put(model, node.input[8], _array(model, node.input[8]).reshape(1, 4, 12))
    analysis = analyze(model)
    features = _group(analysis, "embed_tanh", 2)  # what the LSTM reads freezes, with the reason
    assert features.frozen and [reason.kind for reason in features.reasons] == ["index-map"]
    assert "neither per tensor" in features.reasons[0].message and node.input[8] in features.reasons[0].message
    assert not _maps(analysis, "lstm.R_quantized", 1)  # the layer makes no units to permute
    assert not _maps(analysis, "sequence.weight_quantized", 0)


# -- permutation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "per_channel"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("seed", [1, 2])
def test_permute_verify_unpermute(name: str, per_channel: bool, seed: int) -> None:
    source = _quantized(name, per_channel)
    layer, _, _, _ = LAYERS[name]
    model, analysis, perms, key = permute_copy(source, seed)
    units = _group(analysis, f"{layer}.R_quantized", 1)
    assert units.id in perms and not np.array_equal(perms[units.id], np.arange(units.size))
    for tensor in (f"{layer}.W_quantized", f"{layer}.R_quantized", f"{layer}.B", f"{layer}.P"):
        assert not np.array_equal(_array(model, tensor), _array(source, tensor)), tensor
    assert _equivalent(source, model, seed)
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()


def _undo(model: onnx.ModelProto, source: onnx.ModelProto, name: str, index: tuple[slice, ...]) -> None:
    """Put back the source's values of tensor ``name`` at ``index`` in ``model``."""
    array = _array(model, name)
    array[index] = _array(source, name)[index]
    _put(model, name, array)


@pytest.mark.parametrize(("name", "per_channel"), VARIANTS, ids=IDS)
def test_one_gate_block_of_w_left_in_place_is_caught(name: str, per_channel: bool) -> None:
    """W's columns of the cell gate (block c, the last) not permuted: everything else is."""
    source = _quantized(name, per_channel)
    layer, _, hidden, _ = LAYERS[name]
    model, _, _, _ = permute_copy(source, 3)
    block = slice(3 * hidden, 4 * hidden)
    _undo(model, source, f"{layer}.W_quantized", (slice(None), slice(None), block))
    if per_channel:  # the block's scales too, so only the weight's columns are wrong
        _undo(model, source, f"{layer}.W_scale", (slice(None), block))
    assert not _equivalent(source, model)


@pytest.mark.parametrize("name", list(LAYERS))
def test_recurrence_hidden_axis_left_in_place_is_caught(name: str) -> None:
    source = _quantized(name, False)
    layer, _, _, _ = LAYERS[name]
    model, analysis, perms, _ = permute_copy(source, 3)
    units = _group(analysis, f"{layer}.R_quantized", 1)
    inverse = np.argsort(perms[units.id])
    _put(model, f"{layer}.R_quantized", np.take(_array(model, f"{layer}.R_quantized"), inverse, axis=1))
    assert not _equivalent(source, model)


@pytest.mark.parametrize("name", list(LAYERS))
def test_per_channel_scales_left_in_place_are_caught(name: str) -> None:
    """The integers moved without their per-channel scales: dequantized with the wrong scale."""
    source = _quantized(name, True)
    layer, _, _, _ = LAYERS[name]
    scale = _array(source, f"{layer}.W_scale")
    assert len(np.unique(scale)) > 1  # otherwise leaving them in place would be harmless
    model, _, _, _ = permute_copy(source, 3)
    _put(model, f"{layer}.W_scale", scale)
    _put(model, f"{layer}.R_scale", _array(source, f"{layer}.R_scale"))
    assert not _equivalent(source, model)


@pytest.mark.parametrize(("name", "per_channel"), VARIANTS, ids=IDS)
def test_producer_permuted_alone_is_caught(name: str, per_channel: bool) -> None:
    source = _quantized(name, per_channel)
    model = copy_model(source)
    permute_producer_only(model, analyze(model))
    assert constant_bytes(model) != constant_bytes(source)
    assert not _equivalent(source, model)


@pytest.mark.parametrize(("name", "per_channel"), VARIANTS, ids=IDS)
def test_resync_of_a_permuted_copy_recovers_every_neuron(name: str, per_channel: bool) -> None:
    source = _quantized(name, per_channel)
    model, _, _, key = permute_copy(source, 5)
    assert constant_bytes(model) != constant_bytes(source)
    result = resync_model(source, model, true_key=key)
    assert result.psi == pytest.approx(100.0) and result.psi_distinguishable == pytest.approx(100.0)
    assert constant_bytes(result.model) == constant_bytes(source)
