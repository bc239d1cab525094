"""The forensics' figures computed in fewer passes are the plain computations' values, bit for bit.

Session 17 cut passes over each weight's change: the column matrix of a conv weight is copied a
kernel at a time (a transpose of records), the median absolute deviation is selected while the
deviations are computed (never written whole), and the reference's std shares its centred
values with the correlation's dot products (the change is no longer computed a third time).
Each is compared here with plain numpy on fresh arrays; the audit's ``--json`` on the bench
models and the held-out pairs is byte-identical to session 16's (see the session's report).
Also: ARPACK's refusal of a start vector the Gram matrix sends to zero falls back to the full
decomposition (it was an internal error of ``audit``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxlady._audit import _select
from onnxlady._audit._forensics import (
    WeightInfo,
    _column_dispersion,
    _correlation,
    _dispersion,
    _matrix,
    _measure,
    _moved_copy,
    _std_mean,
    _std_mean_dots,
    _top_eigenvalue,
)
from onnxlady._audit._scipy import top_eigenvalue
from onnxlady._audit._select import median, median_deviation

SHAPES = [(5, 7, 3, 3), (64, 32, 3, 3), (4, 6), (3, 4, 5), (2, 3, 4, 5, 6), (1, 5, 2), (5, 1, 1, 1), (3, 1), (7,)]


@pytest.mark.parametrize("shape", SHAPES)
def test_moved_copy_is_numpys_moveaxis(shape: tuple[int, ...]) -> None:
    """Every axis moved to the front, copied record by record: the C-order copy numpy makes."""
    array = np.random.default_rng(len(shape)).standard_normal(shape)
    for axis in range(len(shape)):
        expected = np.ascontiguousarray(np.moveaxis(array, axis, 0))
        into = np.full(array.size, np.nan)
        got = _moved_copy(array, axis, into)
        assert got.shape == expected.shape and got.tobytes() == expected.tobytes()
        matrix = _matrix(array, axis, np.full(array.size, np.nan))
        assert matrix.tobytes() == expected.reshape(array.shape[axis], -1).tobytes()


@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2])
def test_column_dispersion_is_that_of_numpys_column_copy(shape: tuple[int, ...]) -> None:
    """The columns (input channels) of a change, squared in the work array: numpy's copy's figure."""
    change = np.random.default_rng(7).standard_normal(shape) * np.linspace(0.5, 2.0, shape[1]).reshape(
        (1, shape[1]) + (1,) * (len(shape) - 2)
    )
    columns = np.ascontiguousarray(np.moveaxis(change, 1, 0)).reshape(shape[1], -1)
    expected = _dispersion(columns, columns * columns)
    work = np.full(change.size, np.nan)
    assert repr(_column_dispersion(change, 0, work)) == repr(expected)
    if shape[1] >= 8:  # enough columns for a figure: a wrong layout would change it
        assert expected is not None
        assert repr(_dispersion(change.reshape(shape[1], -1))) != repr(expected)


@pytest.mark.parametrize("size", [1, 2, 1001, (1 << 15) + 3, 300_001])
def test_median_deviation_is_the_median_of_the_deviations(size: int) -> None:
    """Selected as the deviations are computed: median(|values - center|), bit for bit."""
    rng = np.random.default_rng(size)
    values = rng.standard_t(3, size) * 0.01
    center = median(values)
    expected = median(np.abs(values - center))
    assert median_deviation(values, center).tobytes() == expected.tobytes()
    assert median_deviation(values, center + 0.001).tobytes() == median(np.abs(values - (center + 0.001))).tobytes()


def test_median_deviation_where_the_bracket_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bracket too narrow to hold the median: the full partition of the deviations answers."""
    values = np.random.default_rng(3).standard_normal(200_000)
    center = median(values)
    expected = median(np.abs(values - center))
    monkeypatch.setattr(_select, "_MARGIN", -50.0)  # a bracket that cannot hold the wanted ranks
    assert median_deviation(values, center).tobytes() == expected.tobytes()


def test_std_and_dots_in_one_pass_are_std_mean_and_correlation() -> None:
    """The reference's std and mean and the correlation's figures, from arrays centred in place."""
    rng = np.random.default_rng(5)
    ref = rng.standard_normal(100_003) + 0.3
    change = 0.1 * rng.standard_normal(ref.size) + 0.02 * ref
    mean_d = _std_mean(change.copy(), np.empty(ref.size))[1]
    std_r, mean_r = _std_mean(ref.copy(), np.empty(ref.size))
    rho = _correlation(ref.copy(), change.copy(), np.empty(ref.size), means=(mean_r, mean_d))
    got_std, got_mean, (xy, xx, yy) = _std_mean_dots(ref.copy(), change.copy(), mean_d)
    assert (got_std, got_mean) == (std_r, mean_r) == (float(ref.std()), float(ref.mean()))
    assert max(-1.0, min(1.0, xy / math.sqrt(xx * yy))) == rho
    assert abs(rho - np.corrcoef(ref, change)[0, 1]) < 1e-12 and rho > 0.1  # a correlation that is there


@pytest.mark.parametrize(
    ("shape", "axis", "dtype"),
    [
        ((64, 32, 3, 3), 0, np.float32),
        ((32, 64, 3, 3), 1, np.float32),
        ((200, 300), 0, np.float16),
        ((300, 200), 1, np.float64),
    ],
)
def test_measured_figures_are_plain_numpys(shape: tuple[int, ...], axis: int, dtype: type) -> None:
    """A noisy, correlated change: every figure the passes were cut from, as plain numpy computes it."""
    rng = np.random.default_rng(9)
    ref = rng.standard_normal(shape).astype(dtype)
    sus = (ref.astype(np.float64) * 1.05 + 0.1 * rng.standard_normal(shape)).astype(dtype)
    entry = _measure("w", WeightInfo("w", "Conv", axis), ref, sus)
    r, s = ref.astype(np.float64), sus.astype(np.float64)
    d = s - r
    assert repr(entry["relative_change"]) == repr(float(d.std()) / float(r.std()))
    mad = float(np.median(np.abs(d - np.median(d))))
    assert repr(entry["robust_relative_change"]) == repr(1.4826 * mad / float(r.std()))
    rho = entry["correlation"]
    assert abs(rho - np.corrcoef(r.reshape(-1), d.reshape(-1))[0, 1]) < 1e-12 and rho > 0.1
    columns = np.ascontiguousarray(np.moveaxis(d, 1 if axis == 0 else 0, 0)).reshape(d.shape[1 if axis == 0 else 0], -1)
    assert entry["column_dispersion"] == _dispersion(columns, columns * columns)


def _gram_with_rows_summing_to_zero() -> np.ndarray:
    """An exact Gram matrix (integer entries) that sends the all-ones vector to exactly zero."""
    rows = np.random.default_rng(0).integers(-3, 4, (100, 50)).astype(np.float64)
    rows[-1] = -rows[:-1].sum(axis=0)  # every column sums to zero: gram @ ones == 0 exactly
    gram = rows @ rows.T
    assert not np.any(gram @ np.ones(100))
    return gram


def test_arpack_that_cannot_start_leaves_it_to_the_full_decomposition() -> None:
    """ARPACK error -9 (start vector sent to zero): None, then the full decomposition's top eigenvalue."""
    gram = _gram_with_rows_summing_to_zero()
    assert top_eigenvalue(gram, 1e-12) is None
    assert repr(_top_eigenvalue(gram)) == repr(float(np.linalg.eigvalsh(gram)[-1]))
    assert _top_eigenvalue(gram) > 1000.0  # not a vanishing matrix
