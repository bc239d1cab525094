"""The quantiles of a weight's signature are selected, not sorted, and still the same to the bit.

``onnxlady._resync._invariants._resampled`` once sorted every weight whole (most of resync's
time across a conversion); it now selects the order statistics around each rank. These tests
hold it to the old definition: ``np.interp`` over the fully sorted values.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxlady._resync._invariants import QUANTILES, _resampled, signature


def _by_full_sort(values: np.ndarray) -> np.ndarray:
    ordered = np.sort(values.ravel())
    if ordered.size <= QUANTILES:
        return ordered
    grid = np.linspace(0.0, ordered.size - 1.0, QUANTILES)
    return np.interp(grid, np.arange(ordered.size), ordered)


@pytest.mark.parametrize("size", [1, 2, 32, 33, 34, 35, 64, 65, 97, 1000, 4099, 65537])
@pytest.mark.parametrize("kind", ["normal", "ties", "float32"])
def test_resampled_equals_interpolating_the_full_sort(size: int, kind: str) -> None:
    rng = np.random.default_rng(size)
    if kind == "ties":  # quantized weights: many equal values
        values = rng.integers(-3, 4, size).astype(np.float64)
    else:
        values = rng.standard_normal(size)
        if kind == "float32":
            values = values.astype(np.float32)
    assert np.array_equal(_resampled(values), _by_full_sort(values))


def test_resampled_reads_a_matrix_flat_and_leaves_it_unchanged() -> None:
    matrix = np.random.default_rng(0).standard_normal((40, 30))
    before = matrix.copy()
    assert np.array_equal(_resampled(matrix), _by_full_sort(matrix))
    assert np.array_equal(matrix, before)


def test_a_wrong_quantile_is_caught() -> None:
    """The comparison can fail: the unsorted values at the same ranks differ."""
    values = np.random.default_rng(1).standard_normal(500)
    grid = np.linspace(0.0, 499.0, QUANTILES)
    assert not np.array_equal(np.interp(grid, np.arange(500), values), _resampled(values))


def test_signature_is_unchanged_by_permuting_neurons() -> None:
    weight = np.random.default_rng(2).standard_normal((24, 16, 3, 3))
    moved = weight[np.random.default_rng(3).permutation(24)]
    first, second = signature(weight), signature(moved)
    assert np.array_equal(first[0], second[0])  # the quantiles: the same values, selected
    for a, b in zip(first[1:], second[1:]):  # norms summed in another order: rounding only
        np.testing.assert_allclose(a, b, rtol=1e-12)
