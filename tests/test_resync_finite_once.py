"""Resync across a conversion tests each weight for NaN and infinity once: as it signs it.

A signature's sorted values start with the weight's smallest value and end with its largest
(:func:`onnxlady._resync._signatures.proving_finite`): a weight so proved finite is not scanned
again before the solver (that pass read both models' weights once more, and the reference's file
pages with them). A weight holding a NaN or an infinity is still refused, by name, on either side.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from fixtures.conversions import CONVERSIONS
from onnxlady._errors import OnnxladyError
from onnxlady._resync import _across
from onnxlady._resync._entry import resync_model
from onnxlady._resync._signatures import FiniteArrays
from onnxlady.testing import permute_copy


def _pair(conversion: str) -> tuple[onnx.ModelProto, onnx.ModelProto, object]:
    reference = FIXTURES["mobilenet"](0)
    permuted, _, _, key = permute_copy(reference, 7)
    return reference, CONVERSIONS[conversion](permuted), key


@pytest.mark.parametrize("conversion", ["float16", "qdq"])
def test_signed_weights_are_not_scanned_again(monkeypatch: pytest.MonkeyPatch, conversion: str) -> None:
    reference, suspect, key = _pair(conversion)
    scanned: list[tuple[int, ...]] = []
    original = _across.all_finite

    def counting(values: np.ndarray) -> bool:
        scanned.append(values.shape)
        return original(values)

    monkeypatch.setattr(_across, "all_finite", counting)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)  # the same resync
    assert scanned  # the BatchNorm statistics, which no signature reads, are still scanned
    kernels = [shape for shape in scanned if len(shape) >= 2]
    assert kernels == []  # every kernel was signed, and found finite there


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (the signature of a NaN)
@pytest.mark.parametrize(
    ("conversion", "side", "where", "bad"),
    [
        ("float16", "suspect", "block1.depthwise.weight", np.nan),  # float16, folded with its BatchNorm when signed
        ("float16", "reference", "block2.project.weight", np.inf),
        ("qdq", "suspect", "block1.expand.weight_scale", np.nan),  # a NaN scale: every value it dequantizes is NaN
        ("qdq", "suspect", "block2.depthwise.weight_scale", -np.inf),
        ("qdq", "reference", "stem.conv.weight", -np.inf),
    ],
)
def test_a_weight_holding_nan_or_inf_is_still_refused(conversion: str, side: str, where: str, bad: float) -> None:
    reference, suspect, key = _pair(conversion)
    model = suspect if side == "suspect" else reference
    tensor = next(t for t in model.graph.initializer if t.name == where)
    values = numpy_helper.to_array(tensor).copy()
    values.reshape(-1)[values.size // 2] = bad
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    named = re.escape(where.removesuffix("_scale"))  # (named as the reference's tensor)
    with pytest.raises(OnnxladyError, match=rf"^tensor '{named}' of the {side} holds NaN or Inf values$"):
        resync_model(reference, suspect, true_key=key)


def test_finite_arrays_cover_views_of_what_was_proved_and_nothing_else() -> None:
    proved = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    other = proved.copy()
    arrays = FiniteArrays()
    arrays.add(proved)
    assert arrays.covers(proved)
    assert arrays.covers(proved.reshape(6, 4)) and arrays.covers(proved[1]) and arrays.covers(proved[:, ::2])
    assert arrays.covers(proved.transpose(2, 0, 1))
    assert not arrays.covers(other)  # equal values, other memory
    assert not arrays.covers(proved.view(np.int32))  # other type
    assert not arrays.covers(proved.reshape(-1).view(np.uint8)[2:6].view(np.float32))  # across two elements
    transposed = np.asfortranarray(other)  # a weight read transposed: F-contiguous
    arrays.add(transposed)
    assert arrays.covers(transposed.T) and arrays.covers(transposed[:, 1:])
    strided = np.arange(10.0)[::2]  # not contiguous: its gaps were never read
    arrays.add(strided)
    assert not arrays.covers(strided)
