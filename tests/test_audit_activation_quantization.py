"""The audit of a QDQ suspect looks at its activation quantization (held-out round 10, F6).

The constants of an activation's QuantizeLinear -> DequantizeLinear pair are no weights: the
float reference has none, and the audit compared only weights, so one DequantizeLinear given a
scale 8 times its QuantizeLinear's (which changes the outputs) was audited ``converted``. A
static quantizer writes the same scale and zero point to both halves of a pair; one that
differs is evidence of a change no converter makes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from fixtures.conversions import quantize_qdq
from onnxlady import audit, verify_models
from onnxlady._audit._activation_quantization import mismatched_activation_quantization
from onnxlady.testing import permute_copy


def _activation_pair(model: onnx.ModelProto) -> onnx.NodeProto:
    """The first DequantizeLinear that reads a QuantizeLinear's output (an activation's pair)."""
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantized)


def _tampered(model: onnx.ModelProto, field: str) -> onnx.ModelProto:
    """The DequantizeLinear of one activation given its own scale x8 (or zero point + 3)."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    node = _activation_pair(changed)
    slot = 1 if field == "scale" else 2
    source = next(t for t in changed.graph.initializer if t.name == node.input[slot])
    value = numpy_helper.to_array(source)
    value = (value * 8).astype(value.dtype) if field == "scale" else (value.astype(np.int32) + 3).astype(value.dtype)
    name = f"{node.input[slot]}_tampered"
    changed.graph.initializer.append(numpy_helper.from_array(value, name))
    node.input[slot] = name
    return changed


@pytest.mark.parametrize("field", ["scale", "zero_point"])
def test_a_dequantize_that_does_not_undo_its_quantize_is_a_modification(tmp_path: Path, field: str) -> None:
    source = FIXTURES["resnet"](0)
    permuted, _, perms, _ = permute_copy(source, 3)
    assert perms
    quantized = quantize_qdq(permuted)
    tampered = _tampered(quantized, field)
    assert not verify_models(quantized, tampered).equivalent  # the change matters to the outputs
    paths = {name: tmp_path / f"{name}.onnx" for name in ("reference", "quantized", "tampered")}
    for name, model in (("reference", source), ("quantized", quantized), ("tampered", tampered)):
        onnx.save(model, paths[name])
    assert mismatched_activation_quantization(quantized) == []
    assert audit(paths["reference"], paths["quantized"]).verdict == "permuted"
    result = audit(paths["reference"], paths["tampered"])
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "activation quantization changed" in result.summary
    assert _activation_pair(tampered).output[0] in result.report.differing_tensors


def test_onnx_runtimes_own_static_quantizer_writes_matching_pairs(tmp_path: Path) -> None:
    """No false alarm on the real tool's output: quantize_static (QDQ) on a fixture."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    source = FIXTURES["resnet"](0)
    reference = tmp_path / "reference.onnx"
    onnx.save(source, reference)
    shape = [d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self._left = [{source.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self._left.pop() if self._left else None

    quantized = tmp_path / "quantized.onnx"
    quantize_static(str(reference), str(quantized), Batches(), quant_format=QuantFormat.QDQ, per_channel=True)
    model = onnx.load(quantized)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert mismatched_activation_quantization(model) == []
    assert audit(reference, quantized).exit_code == 0
