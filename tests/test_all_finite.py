"""``all_finite`` on float16, float32 and float64: every NaN and infinity found, wherever it lies.

Float32 and float16 arrays are tested a piece at a time (float16 on its bits), not through a
float64 sum of every value; these tests put the bad value at the start, at a piece boundary and
at the end, next to the largest finite values of each type (which a wrong mask of the bits, or
a test of the first piece alone, would get wrong).
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxlady._io import _tensors
from onnxlady._io._tensors import all_finite

_PIECE = _tensors._FINITE_PIECE


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 7, _PIECE, _PIECE + 1, 3 * _PIECE + 5])
def test_every_bad_value_is_found_wherever_it_lies(dtype: type, size: int) -> None:
    rng = np.random.default_rng(size)
    values = rng.standard_normal(size).astype(dtype)
    values[:: max(1, size // 5)] = np.finfo(dtype).max  # the largest finite values stay finite
    values[1::9] = -np.finfo(dtype).max
    values[2::13] = -0.0
    assert all_finite(values)
    assert all_finite(values.reshape(1, -1))
    for bad in (np.inf, -np.inf, np.nan):
        for where in {0, min(_PIECE, size - 1), size - 1}:
            broken = values.copy()
            broken[where] = bad
            assert not all_finite(broken), (bad, where)
            assert not all_finite(broken[::-1]), (bad, where)  # not contiguous: the sum, then the test
            if size > 1:
                assert not all_finite(broken.reshape(-1, 1) if size % 2 else broken.reshape(2, -1))


def test_empty_and_integer_arrays_are_finite() -> None:
    assert all_finite(np.zeros(0, dtype=np.float16))
    assert all_finite(np.zeros(0, dtype=np.float32))
    assert all_finite(np.arange(10))
    assert all_finite(np.float32(3.0).reshape(()))
    assert not all_finite(np.array(np.nan, dtype=np.float16))


def test_float16_is_tested_on_its_bits_not_value_by_value(monkeypatch) -> None:
    """NumPy tests half floats in software, ten times slower than their bits are compared."""
    values = np.random.default_rng(0).standard_normal(3 * _PIECE).astype(np.float16)
    isfinite = np.isfinite

    def refuse_half(array: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        assert np.asarray(array).dtype != np.float16, "a float16 array tested value by value"
        return isfinite(array, *args, **kwargs)

    monkeypatch.setattr(_tensors.np, "isfinite", refuse_half)
    assert all_finite(values)
    values[-1] = np.inf
    assert not all_finite(values)
