"""Recurrent layers through the converters deployments run (held-out finding F11 of session 9).

The model is an embedding tagger: ``tokens`` -> Gather of a table -> Transpose to
``[seq, batch, features]`` -> LSTM (hidden 12, bias, zero initial states, as exporters write
them) -> MatMul head. Two converters rewrite it without changing what it computes:

- onnx-simplifier drops the all-zero ``initial_h`` / ``initial_c`` inputs (an absent optional
  input means zeros); the suspect without them must still pair with the reference, a permuted
  copy resync at Psi 100 and audit ``permuted``, the untouched copy ``converted``; dropping
  states that are *not* zero changes the function and is no conversion;
- ``onnxruntime.quantization.quantize_dynamic`` writes the LSTM as ``com.microsoft``
  ``DynamicQuantizeLSTM`` (int8 W and R, transposed) and the table as int8 rows dequantized
  after the Transpose; both must read as the float layers they came from (within half a
  quantization step), a real change of one weight must still be seen.

Every equivalence claimed here is also shown to catch a wrong permutation.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady import OnnxladyError, analyze, verify_models
from onnxlady._audit._verdicts import audit_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._entry import resync_model
from onnxlady._resync._match import match_models
from onnxlady._resync._quantized_forms import read_quantized
from onnxlady.testing import constant_bytes, copy_model, permute_copy, permute_producer_only

SEQ, BATCH, VOCAB, FEATURES, HIDDEN, CLASSES = 6, 2, 30, 16, 12, 10


def _tagger(seed: int = 0, *, zero_states: bool = True) -> onnx.ModelProto:
    """Tagger: tokens [2, 6] -> Gather [30, 16] -> Transpose -> LSTM (hidden 12) -> Squeeze -> MatMul 12->10."""
    rng = np.random.default_rng(seed)

    def weight(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    state = (lambda name: numpy_helper.from_array(np.zeros((1, BATCH, HIDDEN), np.float32), name)) if zero_states else (
        lambda name: weight(name, (1, BATCH, HIDDEN), 0.5)
    )
    initializers = [
        weight("emb.weight", (VOCAB, FEATURES), 1.0),
        weight("lstm.W", (1, 4 * HIDDEN, FEATURES), 1.0 / np.sqrt(FEATURES)),
        weight("lstm.R", (1, 4 * HIDDEN, HIDDEN), 1.0 / np.sqrt(HIDDEN)),
        weight("lstm.B", (1, 8 * HIDDEN), 0.3),
        state("lstm.initial_h"),
        state("lstm.initial_c"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        weight("head.weight", (HIDDEN, CLASSES), 2.0 / np.sqrt(HIDDEN)),
    ]
    nodes = [
        helper.make_node("Gather", ["emb.weight", "tokens"], ["embedded"], name="emb"),
        helper.make_node("Transpose", ["embedded"], ["sequence"], perm=[1, 0, 2], name="to_sequence"),
        helper.make_node(
            "LSTM", ["sequence", "lstm.W", "lstm.R", "lstm.B", "", "lstm.initial_h", "lstm.initial_c"],
            ["lstm.Y"], hidden_size=HIDDEN, name="lstm",
        ),
        helper.make_node("Squeeze", ["lstm.Y", "axis1"], ["lstm.Y_squeezed"], name="squeeze"),
        helper.make_node("MatMul", ["lstm.Y_squeezed", "head.weight"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "tagger",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [BATCH, SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [SEQ, BATCH, CLASSES])],
        initializer=initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _states_dropped(model: onnx.ModelProto) -> onnx.ModelProto:
    """What onnx-simplifier writes: the LSTM's initial-state inputs left empty, their initializers gone."""
    dropped = copy_model(model)
    (lstm,) = [node for node in dropped.graph.node if node.op_type == "LSTM"]
    del lstm.input[4:]  # sequence_lens (already absent), initial_h, initial_c
    kept = [t for t in dropped.graph.initializer if t.name not in ("lstm.initial_h", "lstm.initial_c")]
    del dropped.graph.initializer[:]
    dropped.graph.initializer.extend(kept)
    return dropped


@functools.cache
def _quantized_bytes(source: bytes, per_channel: bool) -> bytes:
    quantization = pytest.importorskip("onnxruntime.quantization", reason="onnxruntime.quantization is not installed")
    with tempfile.TemporaryDirectory() as folder:
        path, target = Path(folder) / "float.onnx", Path(folder) / "quantized.onnx"
        path.write_bytes(source)
        quantization.quantize_dynamic(path, target, per_channel=per_channel, weight_type=quantization.QuantType.QInt8)
        return target.read_bytes()


def _quantized(model: onnx.ModelProto, per_channel: bool = False) -> onnx.ModelProto:
    quantized = onnx.load_from_string(_quantized_bytes(model.SerializeToString(), per_channel))
    ops = {node.op_type for node in quantized.graph.node}
    if "DynamicQuantizeLSTM" not in ops:
        pytest.skip("this onnxruntime's quantize_dynamic does not write DynamicQuantizeLSTM for an LSTM")
    return quantized


def _equivalent(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> bool:
    return verify_models(reference, candidate, provider="cpu").equivalent


# -- zero initial states dropped (onnx-simplifier) ---------------------------------------------------
def test_dropping_zero_initial_states_keeps_the_function_and_a_wrong_permutation_shows() -> None:
    reference = _tagger()
    dropped = _states_dropped(reference)
    assert _equivalent(reference, dropped)
    wrong = copy_model(dropped)
    permute_producer_only(wrong, analyze(wrong))
    assert not _equivalent(reference, wrong)


def test_untouched_model_without_its_zero_states_is_converted() -> None:
    reference = _tagger()
    match = match_models(reference, _states_dropped(reference))
    assert match.same_model and match.complete, match.divergences
    report = audit_models(reference, _states_dropped(reference))
    assert report.verdict == "converted" and report.exit_code == 0, report.summary


def test_permuted_copy_without_its_zero_states_resyncs_and_audits_permuted() -> None:
    reference = _tagger()
    permuted, _, _, key = permute_copy(reference, 3)
    suspect = _states_dropped(permuted)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert _equivalent(suspect, result.model)
    wrong = copy_model(result.model)
    permute_producer_only(wrong, analyze(wrong))
    assert not _equivalent(suspect, wrong)
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary


def test_dropping_states_that_are_not_zero_is_no_conversion() -> None:
    """Non-zero initial states removed change what the layer computes: not a conversion."""
    reference = _tagger(zero_states=False)
    suspect = _states_dropped(reference)
    assert not _equivalent(reference, suspect)
    try:
        report = audit_models(reference, suspect)
    except OnnxladyError as error:
        assert "different models" in str(error)
    else:
        assert report.verdict not in ("identical", "converted", "permuted") and report.exit_code == 1, report.summary


# -- quantize_dynamic: DynamicQuantizeLSTM and an int8 table moved before it is dequantized ------------
def test_quantize_dynamic_writes_the_forms_read_here() -> None:
    quantized = _quantized(_tagger())
    ops = [node.op_type for node in quantized.graph.node]
    gather = next(node for node in quantized.graph.node if node.op_type == "Gather")
    reader = next(node for node in quantized.graph.node if gather.output[0] in node.input)
    assert "DynamicQuantizeLSTM" in ops and reader.op_type == "Transpose"  # the int8 rows move first


@pytest.mark.parametrize("per_channel", [False, True])
def test_dequantized_lstm_weights_are_within_half_a_step_of_the_float_ones(per_channel: bool) -> None:
    reference = _tagger()
    quantized = _quantized(reference, per_channel)
    graph = ModelGraph(quantized)
    floats = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in reference.graph.initializer}
    index = next(i for i, node in enumerate(quantized.graph.node) if node.op_type == "DynamicQuantizeLSTM")
    for slot, name in ((1, "lstm.W"), (2, "lstm.R")):
        read = read_quantized(graph, index, slot)
        assert read is not None
        original = floats[name].transpose(0, 2, 1)  # stored [dirs, in, 4*H]
        assert read.value.shape == original.shape
        assert np.all(np.abs(read.value - original) <= read.full_error() + 1e-12)
        assert np.max(read.full_error()) < 0.01 * np.max(np.abs(original))


@pytest.mark.parametrize("per_channel", [False, True])
def test_untouched_quantized_model_is_converted(per_channel: bool) -> None:
    reference = _tagger()
    report = audit_models(reference, _quantized(reference, per_channel))
    assert report.verdict == "converted" and report.exit_code == 0, report.summary


@pytest.mark.parametrize("per_channel", [False, True])
def test_permuted_then_quantized_copy_resyncs_and_audits_permuted(per_channel: bool) -> None:
    reference = _tagger()
    permuted, _, _, key = permute_copy(reference, 5)
    suspect = _quantized(permuted, per_channel)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert _equivalent(suspect, result.model)
    wrong = copy_model(result.model)
    permute_producer_only(wrong, analyze(wrong))
    assert not _equivalent(suspect, wrong)
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary


def test_a_real_change_of_one_quantized_lstm_weight_is_seen() -> None:
    reference = _tagger()
    suspect = _quantized(reference)
    (lstm,) = [node for node in suspect.graph.node if node.op_type == "DynamicQuantizeLSTM"]
    tensor = next(t for t in suspect.graph.initializer if t.name == lstm.input[2])
    values = numpy_helper.to_array(tensor).copy()
    values[0, :, :HIDDEN] = np.clip(values[0, :, :HIDDEN].astype(np.int32) + 60, -127, 127).astype(np.int8)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    assert constant_bytes(suspect) != constant_bytes(_quantized(reference))
    report = audit_models(reference, suspect)
    assert report.verdict not in ("identical", "converted", "permuted") and report.exit_code == 1, report.summary
