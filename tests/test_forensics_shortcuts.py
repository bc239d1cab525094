"""Shortcuts of the forensics that must give the figures and answers of the full computation.

- :func:`onnxlady._audit._forensics._distinct_at_least` with ``enough`` stops counting bit
  patterns once past it: every comparison with a threshold up to ``enough`` answers as the full
  count does, and :func:`_distinct_counts` (what the report shows) is unchanged;
- :func:`onnxlady._audit._select.median` of lists and small arrays is ``np.median``'s value,
  bit for bit (without importing ``numpy.ma``, as ``np.median`` does).
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxlady._audit._forensics import DISTINCT_CAP, QUANT_RATIO, _distinct_at_least, _distinct_counts
from onnxlady._audit._select import median


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    noise = rng.standard_normal(600_000).astype(np.float32)
    return [
        noise,  # noise-like: passes every threshold early
        np.round(noise * 8) / 8,  # a few distinct values: counted to the end
        rng.integers(0, 90_000, 400_000).astype(np.float32),  # just above the cap
        rng.integers(0, 60_000, 300_000).astype(np.float64),  # below the cap, float64
        rng.integers(0, 200_000, 700_000).astype(np.float32),  # near a quarter of the size
        np.concatenate([np.zeros(500_000, np.float32), noise[:200_000]]),  # distinct values come late
        noise[:5000],
    ]


@pytest.mark.parametrize("index", range(7))
def test_distinct_bound_answers_every_threshold_as_the_full_pass(index: int) -> None:
    values = _arrays()[index]
    full = _distinct_at_least(values)
    enough = max(DISTINCT_CAP, QUANT_RATIO * values.size)
    early = _distinct_at_least(values, enough=enough)
    assert early <= full  # a bound still
    for threshold in (DISTINCT_CAP, QUANT_RATIO * values.size, enough, enough / 3):
        assert (early <= threshold) == (full <= threshold)
    if full > 4 * enough:
        assert early < full  # it did stop early (else the test shows nothing)
    prefix = 4 * DISTINCT_CAP
    assert (_distinct_at_least(values, prefix, DISTINCT_CAP) <= DISTINCT_CAP) == (
        _distinct_at_least(values, prefix) <= DISTINCT_CAP
    )


def test_distinct_bound_stops_early_on_noise() -> None:
    noise = _arrays()[0]
    assert _distinct_at_least(noise, enough=DISTINCT_CAP) < _distinct_at_least(noise) // 2


@pytest.mark.parametrize("index", range(7))
def test_distinct_counts_are_unchanged(index: int) -> None:
    values = _arrays()[index]
    other = (values * values.dtype.type(1.0001)).astype(values.dtype)
    for sus, ref in ((values, other), (other, values), (values, values)):
        sus_count, ref_count, few = _distinct_counts(ref, sus, sus is ref)
        exact_sus, exact_ref = np.unique(sus).size, np.unique(ref).size
        assert sus_count == (exact_sus if exact_sus <= DISTINCT_CAP else None) or (
            sus_count is not None and sus_count == exact_sus  # counted past the cap: the vote needed it
        )
        assert ref_count in (None, exact_ref)
        assert few == (exact_sus <= QUANT_RATIO * exact_ref)


@pytest.mark.parametrize(
    "values",
    [
        [0.3, 0.1, 0.2],
        [0.3, 0.1, 0.2, 0.7],
        [1.0, float("inf"), 2.0, 3.0],
        [1e-300, 1e300, 3.0, 7.0],
        list(np.random.default_rng(1).standard_normal(101)),
        np.random.default_rng(2).standard_normal(1000),
        np.random.default_rng(3).standard_normal(100_000),
    ],
)
def test_median_of_lists_and_arrays_is_numpys(values: list[float] | np.ndarray) -> None:
    ours, numpys = median(values), np.median(values)
    assert type(ours) is np.float64
    assert ours.tobytes() == np.float64(numpys).tobytes()
