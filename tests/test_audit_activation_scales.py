"""The activation scales of a static-quantized copy: checked where a relation ties them, else said unchecked.

Held-out round 14, F3: an activation scale of ONNX Runtime's static QDQ copy (read by both the
QuantizeLinear and the DequantizeLinear of its pair, so the pair still agrees) changed x1.5+0.5
tripled the quantization error, and the audit said ``converted``. Calibration sets those scales
from data only the quantizer saw: the float reference has no counterpart. One relation of the
quantizer's own holds all the same: a Conv's or Gemm's int32 bias is scaled by its input's scale
times its weight's (``quantize_bias_static_impl``), so a changed scale feeding a biased layer
breaks it (``modified``); the others are not compared, and a verdict of equivalence says so, in
its text and in ``unchecked_activation_scales``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from fixtures.deployment import calibration_inputs
from onnxlady import audit
from onnxlady._audit._activation_quantization import activation_scales

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The resnet fixture and its QDQ copy by ``quantize_static`` (per channel, 4 calibration draws)."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    folder = tmp_path_factory.mktemp("scales")
    source = FIXTURES["resnet"](0)
    reference, quantized = folder / "reference.onnx", folder / "quantized.onnx"
    onnx.save(source, reference)
    entry = source.graph.input[0]
    shape = tuple(d.dim_value for d in entry.type.tensor_type.shape.dim)
    quantize_static(str(reference), str(quantized), calibration_inputs(entry.name, shape, 4),
                    quant_format=QuantFormat.QDQ, per_channel=True)
    return reference, quantized


def _with_scale_changed(quantized: Path, scale: str, path: Path) -> Path:
    model = onnx.load(quantized)
    tensor = next(t for t in model.graph.initializer if t.name == scale)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.5 + 0.5, scale))
    onnx.save(model, path)
    return path


def _outputs(path: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    entry = session.get_inputs()[0]
    x = np.random.default_rng(5).standard_normal([d if isinstance(d, int) else 1 for d in entry.shape]).astype(np.float32)
    return np.asarray(session.run(None, {entry.name: x})[0])


def test_the_quantizers_own_copy_is_converted_and_says_what_was_not_compared(copies: tuple[Path, Path]) -> None:
    reference, quantized = copies
    found = activation_scales(onnx.load(quantized))
    assert found.tied and found.unchecked and not found.broken  # the real tool's output holds the relation
    result = audit(reference, quantized)
    assert result.verdict == "converted" and result.exit_code == 0, result.summary
    assert f"{len(found.scales)} activation scales" in result.summary
    assert f"the other {len(found.unchecked)}, and the zero points, were not compared" in result.summary
    assert result.report.to_dict()["unchecked_activation_scales"] == found.unchecked


def test_a_changed_scale_feeding_a_biased_layer_is_modified(copies: tuple[Path, Path], tmp_path: Path) -> None:
    reference, quantized = copies
    scale = activation_scales(onnx.load(quantized)).tied[-1]
    suspect = _with_scale_changed(quantized, scale, tmp_path / "suspect.onnx")
    before, after = _outputs(quantized), _outputs(suspect)
    assert np.abs(after - before).max() > 10 * np.abs(before).max() * 2.0**-8  # beyond the quantizer's rounding
    result = audit(reference, suspect)
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "activation quantization changed" in result.summary and scale in result.summary
    assert scale in result.report.differing_tensors


def test_a_changed_scale_no_relation_ties_is_named_unchecked(copies: tuple[Path, Path], tmp_path: Path) -> None:
    reference, quantized = copies
    scale = activation_scales(onnx.load(quantized)).unchecked[0]
    result = audit(reference, _with_scale_changed(quantized, scale, tmp_path / "suspect.onnx"))
    # Out of reach (calibration has no reference): not claimed checked.
    assert scale in result.report.to_dict()["unchecked_activation_scales"]
    assert "were not compared" in result.summary


def test_a_float_copy_has_no_unchecked_scales(copies: tuple[Path, Path]) -> None:
    reference, _ = copies
    result = audit(reference, reference)
    assert "unchecked_activation_scales" not in result.report.to_dict()
    assert "activation scales" not in result.summary
