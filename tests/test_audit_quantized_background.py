"""Audit wording when the converter itself quantizes the suspect (held-out finding F10 of session 9).

Noise 0.1 then ``quantize_dynamic`` (int8): the suspect's weights hold an integer grid because
the *converter* writes them so; the change beyond its rounding is the noise. The verdict
``perturbed`` (exit 1) is right, but the summary said "likely quantization", naming the
converter's grid as the change. It now says the grid is the conversion's and names no kind for
what lies underneath. Quantization done *before* a float conversion is still called quantization.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import onnx
import pytest

from fixtures import FIXTURES
from onnxlady._audit._verdicts import audit_models
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import copy_model, permute_copy

quantization = pytest.importorskip("onnxruntime.quantization", reason="onnxruntime.quantization is not installed")


@functools.cache
def _int8(source: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        path.write_bytes(source)
        quantization.quantize_dynamic(path, target, weight_type=quantization.QuantType.QInt8)
        return target.read_bytes()


def _noisy(reference: onnx.ModelProto) -> onnx.ModelProto:
    suspect = permute_copy(reference, 3)[0]
    perturb_model(suspect, noise=0.1, seed=3)
    return suspect


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_noise_then_int8_is_perturbed_without_naming_the_converters_grid(name: str) -> None:
    reference = FIXTURES[name](0)
    suspect = onnx.load_from_string(_int8(_noisy(reference).SerializeToString()))
    report = audit_models(reference, suspect)
    assert report.verdict == "perturbed" and report.exit_code == 1, report.summary
    assert any(c.kind == "quantized" and c.model == "suspect" for c in report.conversions)
    assert "likely quantization" not in report.summary
    assert "the converter's own" in report.summary
    assert report.perturbation is not None and report.perturbation["evidence"]["grid_of_the_conversion"] is True


def test_quantization_without_a_quantizing_conversion_is_still_named() -> None:
    reference = FIXTURES["vgg"](0)
    suspect = permute_copy(reference, 3)[0]
    perturb_model(suspect, quantize_bits=6, seed=3)
    report = audit_models(reference, copy_model(suspect))
    assert report.verdict == "perturbed" and report.perturbation is not None
    assert report.perturbation["kind"] == "quantization" and "likely quantization" in report.summary
    assert "grid_of_the_conversion" not in report.perturbation["evidence"]
