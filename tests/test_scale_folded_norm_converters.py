"""MobileBERT's NoNorm through ONNX Runtime's static QDQ quantizer and onnxslim (held-out F11, open cells).

NoNorm computes ``(x @ W + b) * w + c`` with ``w`` and ``c`` per output channel. Two real
converters write it in forms the site reader missed:

- ``quant_pre_process`` + ``quantize_static`` (QDQ, per channel) keep the Mul, but behind
  ORT's ``Reshape, Gemm, Reshape`` *and* the activation's QuantizeLinear -> DequantizeLinear
  rounding, its constant quantized too. The Mul was not read as the layer's step in the
  quantized copy, so the reference's NoNorm scale was "folded" into its weights and compared
  with the suspect's unscaled ones: MobileBERT was ``modified`` ("4/24 weight tensors
  changed"), this fixture refused as different models.
- onnxslim folds the Mul into the weight and the Add into the bias; the per-channel Add was no
  step of the layer in the reference, so it had no counterpart: refused as different models.

Both now read ``converted`` (a permuted copy ``permuted``, its key recovered), and a neuron
scaled or a bias changed before the same converter is still caught. (onnxslim 0.1.98 loses the
first NoNorm's ``b`` of MobileBERT itself: that layer's fused bias is ``b1 * w`` alone, the
zero vector its query, key and value Gemms share. That copy computes something else, and now
reads ``modified``; it read ``converted``, the Add having no counterpart to be compared with.)
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from fixtures.contrib import ort_optimized
from fixtures.deployment import calibration_inputs
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy
from tests.test_deployment import check_resync_across
from tests.test_scale_folded_norm import _DIM, _TOKENS, _nonorm_model

quantization = pytest.importorskip("onnxruntime.quantization")
onnxslim = pytest.importorskip("onnxslim")


def _qdq(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """The model through ``quant_pre_process`` and per-channel int8 ``quantize_static`` (QDQ), as round 13 made it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, prepared, quantized = folder / "source.onnx", folder / "prepared.onnx", folder / "quantized.onnx"
    onnx.save(model, source)
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantization.quantize_static(
        str(prepared), str(quantized), calibration_inputs("x", (1, _TOKENS, _DIM), 8), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        weight_type=quantization.QuantType.QInt8, activation_type=quantization.QuantType.QUInt8,
    )  # fmt: skip
    return onnx.load(quantized)


def _slim(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    return onnxslim.slim(copy_model(model))


def _ort_extended(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    return ort_optimized(model)  # keeps NoNorm's Mul and Add: the shift compared as stored on both sides


_CONVERTERS = {"qdq": _qdq, "onnxslim": _slim}
#: A change is looked for through the form that keeps NoNorm as well.
_ALL_FORMS = {**_CONVERTERS, "ort-extended": _ort_extended}


def _changed(model: onnx.ModelProto, name: str, change: str) -> onnx.ModelProto:
    """Block 0's first layer with neuron 3 scaled by 1.3 (``row``), or one bias element moved (``bias``)."""
    changed = copy_model(model)
    for index, tensor in enumerate(changed.graph.initializer):
        if tensor.name == name:
            value = numpy_helper.to_array(tensor).copy()
            if change == "row":
                value[:, 3] *= 1.3
            else:
                value[5] += 0.3
            changed.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, name))
    return changed


def test_the_converters_write_the_finding_forms(tmp_path: Path) -> None:
    """The test of the test: each converter's own output has the form of the finding."""
    reference = _nonorm_model()
    quantized = _qdq(reference, tmp_path)
    producers = {out: node for node in quantized.graph.node for out in node.output}
    muls = [node for node in quantized.graph.node if node.op_type == "Mul"]
    assert len(muls) == 2 and "Gemm" in {node.op_type for node in quantized.graph.node}
    for mul in muls:  # Reshape -> Q -> DQ -> Mul, the NoNorm weight behind a DequantizeLinear
        rounded = producers[mul.input[0]]
        assert rounded.op_type == "DequantizeLinear"
        assert producers[producers[rounded.input[0]].input[0]].op_type == "Reshape"
        assert producers[mul.input[1]].op_type == "DequantizeLinear"
    slimmed = _slim(reference, tmp_path)
    ops = [node.op_type for node in slimmed.graph.node]
    assert "Mul" not in ops  # NoNorm's Mul and Add folded into the Gemm's weight and bias
    assert not {"block0_nn_w", "block0_nn_b"} & {tensor.name for tensor in slimmed.graph.initializer}
    assert verify_models(reference, slimmed, provider="cpu").equivalent  # folded right: the same function


@pytest.mark.parametrize("converter", sorted(_CONVERTERS))
def test_converted_copy_reads_converted(converter: str, tmp_path: Path) -> None:
    reference = _nonorm_model()
    report = audit_models(reference, _CONVERTERS[converter](reference, tmp_path))
    assert report.verdict == "converted" and report.exit_code == 0


@pytest.mark.parametrize("converter", sorted(_CONVERTERS))
def test_converted_permuted_copy_resyncs_and_reads_permuted(converter: str, tmp_path: Path) -> None:
    reference = _nonorm_model()
    permuted, _, _, key = permute_copy(reference, 7)
    suspect = _CONVERTERS[converter](permuted, tmp_path)
    check_resync_across(reference, suspect, key)
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0


@pytest.mark.parametrize("converter", sorted(_ALL_FORMS))
@pytest.mark.parametrize(
    ("tensor", "change", "verdict"),
    [("block0_w1", "row", "scaled"), ("block0_b1", "bias", "modified"), ("block0_nn_b", "bias", "modified")],
)
def test_a_change_through_the_same_converter_is_still_caught(
    converter: str, tensor: str, change: str, verdict: str, tmp_path: Path
) -> None:
    reference = _nonorm_model()
    suspect = _ALL_FORMS[converter](_changed(reference, tensor, change), tmp_path)
    report = audit_models(reference, suspect)
    assert report.verdict == verdict and report.exit_code == 1
