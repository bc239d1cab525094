"""The order statistics behind a weight's signature: exact, and counted over the buckets in use only.

``onnxlady._resync._invariants._order_statistics`` counts a weight's values in buckets (sign,
exponent and leading mantissa bits) and sorts only the buckets holding an asked rank. It used to
reorder and sum its whole table of 2**20 counts on every call, which cost more than the values
of a mid-sized weight (30 % of a resync across float16 of a YOLOv8n); now only the buckets that
hold values are ordered and summed. These tests hold it to the sorted values at the ranks, and
to its cost: no array as long as the table is summed.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxlady._resync import _invariants
from onnxlady._resync._invariants import QUANTILES, _order_statistics, sharing_scratch


def _ranks(size: int) -> np.ndarray:
    """The ranks :func:`_invariants._resampled` asks for: either side of each quantile."""
    grid = np.linspace(0.0, size - 1.0, QUANTILES)
    low = grid.astype(np.int64)
    return np.union1d(low, np.minimum(low + 1, size - 1))


def _values(kind: str, size: int, dtype: type) -> np.ndarray:
    rng = np.random.default_rng(size)
    if kind == "ties":  # quantized or pruned weights: few values, signed zeros among them
        values = rng.integers(-3, 4, size).astype(dtype)
        values[::11] = -0.0
        return values
    values = rng.standard_normal(size) * 0.05
    if kind == "positive":
        values = np.abs(values)
    elif kind == "negative":
        values = -np.abs(values)
    elif kind == "crowded":  # a narrow range: a few buckets hold most values
        values = 1.0 + values * 1e-3
    return values.astype(dtype)


_CASES = [
    *((size, kind) for size in (16_384, 70_001) for kind in ("normal", "ties", "positive", "negative", "crowded")),
    *((1_048_583, kind) for kind in ("normal", "ties")),  # finer buckets from 2**20 values on
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize(("size", "kind"), _CASES)
def test_the_statistics_are_the_sorted_values_at_the_ranks(dtype: type, size: int, kind: str) -> None:
    values = _values(kind, size, dtype)
    ranks = _ranks(size)
    expected = np.sort(values)[ranks]
    with sharing_scratch():
        found = _order_statistics(values, ranks)
    assert found.dtype == values.dtype
    assert np.array_equal(found, expected)  # (a zero's sign aside: the two compare equal)
    # The comparison can fail: the statistics one rank further on are other values.
    if np.unique(values).size > ranks.size:
        assert not np.array_equal(np.sort(values)[np.minimum(ranks + 1, size - 1)], found)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_values_that_are_not_finite_are_selected_as_a_sort_would(bad: float) -> None:
    values = _values("normal", 70_001, np.float32)
    values[123] = bad
    ranks = _ranks(values.size)
    found = _order_statistics(values, ranks)
    assert np.array_equal(found, np.sort(values)[ranks], equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_mid_sized_weight_sums_only_the_buckets_holding_values(dtype: type, monkeypatch) -> None:
    """Before, every call reordered and summed 2**20 counts, whatever the weight's size."""
    values = _values("normal", 70_001, dtype)
    summed: list[int] = []
    cumsum = np.cumsum

    def recording(array: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        summed.append(np.size(array))
        return cumsum(array, *args, **kwargs)

    monkeypatch.setattr(_invariants.np, "cumsum", recording)
    found = _order_statistics(values, _ranks(values.size))
    monkeypatch.undo()
    assert np.array_equal(found, np.sort(values)[_ranks(values.size)])
    assert summed, "the values were not bucketed"
    # A 0.05-scaled normal sample spans a few dozen exponents: some thousands of buckets.
    assert max(summed) < values.size // 4, summed
