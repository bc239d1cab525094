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
