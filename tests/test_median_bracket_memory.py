"""The forensics' medians bracket their ranks a chunk at a time: the same order statistics, no masks the size of the array.

:func:`onnxlady._audit._select.order_statistics` counts the values below and within a bracket
found from a sample, then partitions only those within. Counted a chunk at a time, the masks
stay in the cache instead of taking a byte per element each (two of them: a quarter of a
float64 array's bytes, on every one of the two medians per weight tensor). The values within
are gathered in the same order, so every statistic is what ``np.partition`` gives.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from onnxlady._audit import _select
from onnxlady._audit._select import median, order_statistics


def _arrays(size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(size)
    ties = np.round(rng.standard_normal(size), 2)
    ties[::7] = -0.0  # signed zeros among the ties
    return [rng.standard_normal(size) * 1e-3, ties, np.abs(rng.standard_normal(size)) ** 3, rng.random(size)]


@pytest.mark.parametrize("size", [1 << 15, (1 << 17) - 1, 1 << 17, (1 << 17) + 1, 3 * (1 << 17) + 5, 1_000_003])
def test_order_statistics_are_the_partitions(size: int) -> None:
    for values in _arrays(size):
        for ranks in ([size // 2 - 1, size // 2], [size // 3], [size // 4, 3 * size // 4], [0], [size - 1]):
            found = order_statistics(values, ranks)
            expected = np.partition(values, ranks)[ranks]
            assert [np.float64(v).tobytes() for v in found] == [v.tobytes() for v in expected]
        assert np.float64(median(values)).tobytes() == np.float64(np.median(values)).tobytes()


def test_bracket_counts_and_keeps_the_values_in_order() -> None:
    rng = np.random.default_rng(4)
    values = rng.standard_normal(3 * _select._CHUNK + 11)
    low, high = np.float64(-0.1), np.float64(0.2)
    below, up_to, inside = _select._bracketed(values, low, high)
    assert below == np.count_nonzero(values < low) and up_to == np.count_nonzero(values <= high)
    assert np.array_equal(inside, values[(values >= low) & (values <= high)])


def test_a_median_allocates_no_mask_the_size_of_the_array() -> None:
    """Two masks of the whole array are a quarter of its bytes; the chunked ones, a few hundred KiB."""
    values = np.random.default_rng(0).standard_normal(1 << 22)  # 32 MiB
    tracemalloc.start()
    try:
        median(values)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # What stays: the values within the bracket (about 5 % of them) and their joined copy.
    assert peak < 0.15 * values.nbytes, peak
