"""A float16 model through ONNX Runtime's ``ORT_ENABLE_ALL`` on CPU: float16 numbers stored as float32.

The CPU provider has no float16 Conv: the optimizer runs the float16 convolutions between
inserted Casts, folds each BatchNorm into its Conv in float16 first, then folds the Casts into
the weights and lays them out in NCHWc blocks. The weights it writes are float32 tensors whose
every number is a float16 number, carrying float16's rounding of the folds. HEAD compared them
with float32's storage error and called the untouched copy (verify: EQUIVALENT) `modified`
(4 of 5 weights "changed"). The match now names the form (``float16-as-float32``) and the audit
allows those values float16's error; a weight changed beyond it, even to another float16 number,
and a producer-only permutation stay `modified`. Every suspect is the real optimizer's output;
the tests skip where this CPU makes it write no NCHWc node.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from fixtures.contrib import ort_optimized
from fixtures.quantized import build_float16_convnet
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._resync._conversions import FLOAT16_IN_FLOAT32
from onnxlady._resync._nchwc_forms import NCHWC
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def _all(model: onnx.ModelProto) -> onnx.ModelProto:
    optimized = ort_optimized(model, "all")
    if not any(node.domain == NCHWC for node in optimized.graph.node):
        pytest.skip("this CPU makes ONNX Runtime write no NCHWc nodes (no AVX2)")
    return optimized


def _nchwc_weight(model: onnx.ModelProto, number: int = 1) -> str:
    """The weight of the ``number``-th NCHWc Conv."""
    return [node.input[1] for node in model.graph.node if node.domain == NCHWC and node.op_type == "Conv"][number]


def _changed(model: onnx.ModelProto, name: str, change: object) -> onnx.ModelProto:
    changed = copy_model(model)
    tensor = next(t for t in changed.graph.initializer if t.name == name)
    value = numpy_helper.to_array(tensor).copy()
    flat = value.reshape(-1)
    flat[5] = change(flat[5])  # type: ignore[operator]
    tensor.CopyFrom(numpy_helper.from_array(value, name))
    return changed


def test_the_optimizer_stores_float16_numbers_as_float32() -> None:
    suspect = _all(build_float16_convnet(0))
    weight = next(t for t in suspect.graph.initializer if t.name == _nchwc_weight(suspect))
    value = numpy_helper.to_array(weight)
    assert value.dtype == np.float32
    assert np.array_equal(value.astype(np.float16).astype(np.float32), value)


def test_an_untouched_and_a_permuted_copy_are_converted_and_permuted() -> None:
    reference = build_float16_convnet(0)
    suspect = _all(reference)
    assert verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "converted" and report.exit_code == 0, report.summary
    kinds = {(finding.kind, finding.model) for finding in report.conversions}
    assert {(FLOAT16_IN_FLOAT32, "suspect"), ("float16", "reference"), ("nchwc", "suspect")} <= kinds
    permuted, _, _, _ = permute_copy(reference, 3)
    report = audit_models(reference, _all(permuted))
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary


@pytest.mark.parametrize("change", ["three float16 steps", "one percent"])
def test_a_weight_changed_beyond_float16_rounding_is_modified(change: str) -> None:
    reference = build_float16_convnet(0)
    suspect = _all(reference)

    def steps(value: np.float32) -> np.float32:
        number = np.float16(value)
        for _ in range(3):
            number = np.nextafter(number, np.float16(np.inf))
        return np.float32(number)  # still a float16 number

    modify = steps if change == "three float16 steps" else (lambda value: value * np.float32(1.01))
    changed = _changed(suspect, _nchwc_weight(suspect), modify)
    report = audit_models(reference, changed)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary


def test_a_producer_only_permutation_is_modified() -> None:
    reference = build_float16_convnet(0)
    model = copy_model(reference)
    permute_producer_only(model, analyze(model))
    assert not verify_models(reference, model, provider="cpu").equivalent
    report = audit_models(reference, _all(model))
    assert report.verdict == "modified" and report.exit_code == 1, report.summary


def test_the_float32_original_names_the_form_of_its_float16_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 model a float16 copy was made from, as the reference: the form is named where every weight shows it.

    (Its verdict is left out here: the BatchNorms this optimizer folds in float16 round their
    float32 inputs too, which float16's error of the folded weight alone does not cover.)
    """
    import fixtures.quantized as quantized

    with monkeypatch.context() as patch:
        patch.setattr(quantized, "to_float16", lambda model: model)
        original = build_float16_convnet(0)  # the same net before its float16 conversion
    assert {t.data_type for t in original.graph.initializer} == {onnx.TensorProto.FLOAT}
    report = audit_models(original, _all(build_float16_convnet(0)))
    assert (FLOAT16_IN_FLOAT32, "suspect") in {(finding.kind, finding.model) for finding in report.conversions}
    # One layer of float16 numbers in a float32 copy is no conversion: not named, and modified.
    conv = [node.input[1] for node in original.graph.node if node.op_type == "Conv"][1]
    one = _changed(original, conv, lambda value: value)
    tensor = next(t for t in one.graph.initializer if t.name == conv)
    rounded = (numpy_helper.to_array(tensor) * np.float32(1.002)).astype(np.float16).astype(np.float32)
    tensor.CopyFrom(numpy_helper.from_array(rounded, conv))
    report = audit_models(original, one)
    assert FLOAT16_IN_FLOAT32 not in {finding.kind for finding in report.conversions}
    assert report.verdict == "modified", report.summary


def test_a_float32_model_has_no_float16_numbers_to_name() -> None:
    reference = FIXTURES["resnet"](0)
    report = audit_models(reference, _all(reference))
    assert report.verdict == "converted", report.summary
    assert FLOAT16_IN_FLOAT32 not in {finding.kind for finding in report.conversions}
