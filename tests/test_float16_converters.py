"""Float16 as ONNX Runtime's own converter writes it: tiny weights clamped, not rounded to zero.

``onnxruntime.transformers.float16.convert_float_to_float16`` (the converter deployment
pipelines call; onnxconverter-common does the same) raises every nonzero magnitude below the
smallest float16 subnormal (2^-24) to that subnormal instead of rounding it to zero, so a stored
value may be a whole subnormal step from the number it stands for. Audit and resync must still
read such a suspect as the reference permuted and converted, and still see a real change.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxlady
from fixtures import FIXTURES
from onnxlady.testing import copy_model, permute_copy

float16 = pytest.importorskip("onnxruntime.transformers.float16", reason="onnxruntime.transformers not installed")


def _with_tiny_weights(name: str) -> onnx.ModelProto:
    """The fixture's weights scaled to at most 1e-3 (as in PP-OCR's detector), a tenth set below 2^-25.

    Small weights make the audit's relative tolerance smaller than a subnormal step, so only
    the storage bound decides whether a clamped value is a conversion or a change.
    """
    model = copy_model(FIXTURES[name]())
    rng = np.random.default_rng(3)
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.ndim < 2 or values.dtype != np.float32:
            continue
        values = values * (1e-3 / max(float(np.abs(values).max()), 1e-30))
        tiny = rng.random(values.shape) < 0.1
        values = np.where(tiny, np.sign(values) * rng.uniform(1e-10, 2.5e-8, values.shape), values)
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
    return model


@pytest.mark.parametrize("name", ["resnet", "matmul_mlp"])
def test_clamped_subnormals_read_as_a_conversion(name: str) -> None:
    reference = _with_tiny_weights(name)
    permuted, _, _, key = permute_copy(reference, seed=5)
    suspect = float16.convert_float_to_float16(copy_model(permuted), keep_io_types=True)
    stored = [numpy_helper.to_array(t) for t in suspect.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert any(np.any(v == np.float16(2.0**-24)) for v in stored)  # the converter clamped, not rounded

    report = onnxlady.audit(reference, suspect)
    assert report.to_json()["verdict"] == "permuted", report.to_text()
    assert "float16" in {c["kind"] for c in report.to_json()["conversions"]}
    assert onnxlady.resync(reference, suspect, true_key=key).to_json()["psi"] == 100.0

    # A real change of one weight (far above float16's rounding) is still seen.
    changed = copy_model(suspect)
    for tensor in changed.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if tensor.data_type == onnx.TensorProto.FLOAT16 and values.ndim >= 2:
            values = values.copy()
            values.flat[0] += np.float16(2e-4)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
            break
    assert onnxlady.audit(reference, changed).to_json()["verdict"] != "permuted"


# -- verify on models that compute in float16 ----------------------------------------------------
def _float16_model(keep_io_types: bool) -> onnx.ModelProto:
    return float16.convert_float_to_float16(copy_model(FIXTURES["resnet"]()), keep_io_types=keep_io_types)


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_verify_judges_float16_arithmetic_with_float16_tolerances(keep_io_types: bool) -> None:
    """A correct permutation of a float16 model passes with the defaults; a wrong one still fails."""
    from onnxlady._verify._compare import REDUCED_PRECISION_TOLERANCES, arithmetic_precision
    from onnxlady.testing import permute_producer_only

    model = _float16_model(keep_io_types)
    assert arithmetic_precision(model) == "float16"
    permuted, analysis, _, _ = permute_copy(model, seed=3)
    report = onnxlady.verify(model, permuted, iterations=3)
    document = report.to_json()
    assert document["verdict"] == "equivalent", report.to_text()
    assert (document["atol"], document["rtol"]) == REDUCED_PRECISION_TOLERANCES["float16"]
    assert any("compute in float16" in note for note in document["notes"])
    wrong = copy_model(model)
    permute_producer_only(wrong, onnxlady.analyze(wrong))
    assert onnxlady.verify(model, wrong).to_json()["verdict"] == "not-equivalent"


def test_weights_stored_in_float16_behind_casts_keep_float32_tolerances() -> None:
    """Weight-only compression (float16 storage, a Cast to float32 before use) computes in float32."""
    from onnx import helper

    from onnxlady._verify._compare import VERIFY_ATOL, VERIFY_RTOL, arithmetic_precision

    stored = copy_model(FIXTURES["resnet"]())
    casts = []
    for tensor in stored.graph.initializer:
        if tensor.name.endswith("conv.weight"):
            values = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name + ".fp16"))
            name = tensor.name[: -len(".fp16")]
            casts.append(helper.make_node("Cast", [tensor.name], [name], to=onnx.TensorProto.FLOAT))
    nodes = casts + list(stored.graph.node)
    del stored.graph.node[:]
    stored.graph.node.extend(nodes)
    assert casts and arithmetic_precision(stored) == "float32"
    document = onnxlady.verify(stored, stored).to_json()
    assert (document["atol"], document["rtol"]) == (VERIFY_ATOL, VERIFY_RTOL)
    assert arithmetic_precision(_float16_model(True)) == "float16"
