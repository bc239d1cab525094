"""The audit's faster computations give the values of the ones they replace, bit for bit.

ARPACK and gammaincinv loaded without their scipy packages (``_audit/_scipy.py``), medians
selected from a bracket (``_audit/_select.py``), the standard deviation into a scratch array,
per-neuron figures of blocks of rows (``_audit/_rowwise.py``): each is compared with the
plain computation on arrays chosen to reach its fallbacks too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from scipy.sparse.linalg import eigsh

from onnxlady._audit import _scipy
from onnxlady._audit._forensics import _std, find_scaled_under_noise
from onnxlady._audit._rowwise import cos_ratio_of, least_squares_rows, row_dots
from onnxlady._audit._select import median, order_statistics


def _bits(value: float | None) -> bytes:
    """The float64's bytes: equal bytes are the same value bit for bit (what these tests ask)."""
    assert value is not None
    return np.float64(value).tobytes()


def _grams() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for rows, columns in [(65, 100), (100, 3000), (300, 77), (200, 400), (128, 128), (90, 30)]:
        matrix = rng.standard_normal((rows, columns))
        matrix[:, :3] += 2.0  # a dominant direction, as a gradient step leaves
        out.append(matrix @ matrix.T if rows <= columns else matrix.T @ matrix)
    return out


@pytest.mark.parametrize("gram", _grams(), ids=lambda g: str(g.shape[0]))
def test_top_eigenvalue_is_scipys_eigsh(gram: np.ndarray) -> None:
    expected = float(eigsh(gram, k=1, which="LA", v0=np.ones(gram.shape[0]), tol=1e-12, return_eigenvectors=False)[0])
    arpack = _scipy._compiled("sparse.linalg._eigen.arpack", "_arpacklib")
    assert arpack is not None
    # The loop of our own, not the fallback to scipy's eigsh: it must not give up on these.
    assert _bits(_scipy._arpack(gram, 1e-12, arpack.dsaupd_wrap, arpack.dseupd_wrap)) == _bits(expected)
    assert _bits(_scipy.top_eigenvalue(gram, 1e-12)) == _bits(expected)
    # And it is the top eigenvalue (the full decomposition's, to ARPACK's tolerance).
    assert abs(float(np.linalg.eigvalsh(gram)[-1]) - expected) <= 1e-9 * expected


def test_the_compiled_modules_are_loaded_alone() -> None:
    assert _scipy._compiled("sparse.linalg._eigen.arpack", "_arpacklib") is not None
    module = _scipy._compiled("special", "_special_ufuncs")
    assert module is not None and module.gammaincinv is scipy.special.gammaincinv


def test_top_eigenvalue_falls_back_to_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    gram = _grams()[0]
    expected = _scipy.top_eigenvalue(gram, 1e-12)
    monkeypatch.setitem(_scipy._LOADED, "sparse.linalg._eigen.arpack._arpacklib", None)
    assert _scipy.top_eigenvalue(gram, 1e-12) == expected


def test_gammaincinv_is_scipys() -> None:
    for width in [2, 3, 9, 64, 576, 5760, 12345]:
        for q in (0.25, 0.75):
            assert _bits(_scipy.gammaincinv(width / 2, q)) == _bits(scipy.special.gammaincinv(width / 2, q))


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    out = []
    for size in [1, 2, 7, 1000, 32767, 32768, 40001, 400000]:
        out.append(rng.standard_normal(size))
        out.append(np.round(rng.standard_normal(size) * 2))  # many ties
        mostly_zero = rng.standard_normal(size)
        mostly_zero[: size * 3 // 4] = 0.0
        out.append(rng.permutation(mostly_zero))
        out.append(np.sort(rng.standard_normal(size))[::-1].copy())  # a strided sample of sorted values
        halves = rng.standard_normal(size)
        halves[: size // 2] *= 1e4  # a sample that may miss the bracket
        out.append(halves)
        infinite = rng.standard_normal(size)
        infinite[::5] = np.inf
        out.append(infinite)
        nan = rng.standard_normal(size)
        nan[size // 2] = np.nan
        out.append(nan)
    return out


@pytest.mark.parametrize("values", _arrays(), ids=lambda a: f"{a.size}")
def test_median_is_numpys(values: np.ndarray) -> None:
    before = values.copy()
    got, expected = median(values), np.median(values)
    assert type(got) is type(expected)
    assert np.array_equal(got, expected, equal_nan=True) and np.signbit(got) == np.signbit(expected)
    assert np.array_equal(values, before, equal_nan=True)  # not partitioned in place


def test_order_statistics_are_a_full_partitions() -> None:
    rng = np.random.default_rng(5)
    values = rng.standard_normal(300000) ** 3
    ranks = [0, 12345, 150000, 299999]
    assert order_statistics(values, ranks) == [np.partition(values, ranks)[r] for r in ranks]


@pytest.mark.parametrize("values", _arrays()[:21], ids=lambda a: f"{a.size}")
def test_std_is_numpys(values: np.ndarray) -> None:
    finite = np.where(np.isfinite(values), values, 0.0)
    for flat in (finite, finite[::3]):
        assert _bits(_std(flat, np.empty(flat.size))) == _bits(flat.std())


def test_row_figures_are_the_per_row_ones() -> None:
    rng = np.random.default_rng(11)
    for width in [1, 2, 3, 8, 31, 64, 577]:
        r = rng.standard_normal((40, width)) * rng.uniform(0.01, 10, (40, 1))
        s = 1.3 * r + 0.01 * rng.standard_normal((40, width))
        r[5] = 0.0  # a zero row: no scale
        s[6] = 0.0
        dots = row_dots(r, s)
        ks, norms, resid, usable = least_squares_rows(r, s)
        for j in range(40):
            a, b = r[j].copy(), s[j].copy()
            assert _bits(dots[j]) == _bits(a @ b)
            if width >= 2:  # np.dot of one-element vectors multiplies: -0.0 stays (the audit reads those per row)
                assert _bits(dots[j]) == _bits(np.dot(a, b))
            nr, ns = float(np.linalg.norm(a)), float(np.linalg.norm(b))
            expected = (1.0, 1.0, 1.0) if not nr and not ns else None
            got = cos_ratio_of(nr, ns, float(np.dot(a, b)))
            if expected is not None:
                assert got == expected
            elif nr and ns:
                assert got == (float(np.dot(a, b)) / (nr * ns), ns / nr, float(np.dot(a, b)) / (nr * nr))
            norm2 = float(a @ a)
            assert bool(usable[j]) == bool(norm2 and width >= 2)
            if usable[j]:
                k = float(a @ b) / norm2
                e = b - k * a
                assert (ks[j], norms[j], resid[j]) == (k, math.sqrt(norm2), math.sqrt(float(e @ e) / (width - 1)))


def test_scaled_under_noise_same_from_matrices_and_lists() -> None:
    rng = np.random.default_rng(2)
    tensors = []
    for name in ("a", "b"):
        r = rng.standard_normal((64, 50))
        s = r + 0.05 * rng.standard_normal(r.shape)
        tensors.append((name, r, s))
    tensors[0][2][3] *= 1.5  # the attack: one neuron scaled
    from_matrices = find_scaled_under_noise(iter(tensors))
    from_lists = find_scaled_under_noise((n, list(r), list(s)) for n, r, s in tensors)
    assert from_matrices == from_lists
    assert [(item.tensor, item.neuron) for item in from_matrices] == [("a", 3)]


def _unaligned(array: np.ndarray) -> np.ndarray:
    """``array``'s values in a buffer one byte off its item size (a tensor mapped from an inline ``.onnx`` file)."""
    data = np.frombuffer(b"\0" + array.tobytes(), dtype=array.dtype, offset=1).reshape(array.shape)
    assert not data.flags.aligned
    return data


#: Narrow rows (a matrix a block) and wide ones (1500 to 70000 values: a few rows a block, one
#: row a block past _BLOCK_VALUES), rows strided in the tensor (any axis), neurons of two slices.
_ROW_CASES = [
    ((257, 64), 1, 1), ((64, 257), 0, 1), ((32, 16, 3, 3), 0, 1), ((16, 32, 3, 3), 1, 1), ((3, 40, 7), 2, 1),
    ((40, 1500), 0, 1), ((24, 64, 5, 5), 0, 1), ((64, 24, 5, 5), 1, 1), ((3000, 40), 1, 1), ((4, 70000), 0, 1),
    ((48, 16, 5, 5), 0, 2), ((20, 2100), 1, 2),
]  # fmt: skip


@pytest.mark.parametrize(("shape", "axis", "slices"), _ROW_CASES)
@pytest.mark.parametrize("aligned", [True, False])
def test_scale_analysis_rows_are_the_per_row_ones(shape: tuple[int, ...], axis: int, slices: int, aligned: bool) -> None:
    """The blocks of rows (any axis: rows strided in the tensor; wide rows too) give the per-row figures, bit for bit."""
    from onnxlady._audit import _verdicts as verdicts

    rng = np.random.default_rng(4)
    ref = rng.standard_normal(shape).astype(np.float32)
    sus = (ref + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    ref[tuple(slice(0, 1) if d == axis else slice(None) for d in range(ref.ndim))] = 0  # a dead neuron
    if not aligned:
        ref, sus = _unaligned(ref), _unaligned(sus)
    size = shape[axis] // slices
    use = verdicts._Use(0, "w", "w", 0, 1, axis, verdicts._positions(rng.permutation(np.arange(shape[axis]) % size), size))
    assert verdicts._block_width(use, ref) == slices  # the block path is the one compared
    per_row = [verdicts._cos_ratio(verdicts._row64(ref, axis, p), verdicts._row64(sus, axis, p)) for p in use.positions]
    rows_read = verdicts._rows
    try:
        verdicts._rows = None  # type: ignore[assignment]  # the block path reads no row alone
        cos, ratio, ks = verdicts._cos_ratios(ref, sus, use)
        blocks = verdicts._row_scales(ref, sus, use, size)
        fitted = verdicts._Fits().fit(use, ref, sus)
    finally:
        verdicts._rows = rows_read
    assert [_bits(v) for v in cos] == [_bits(t[0]) for t in per_row]
    assert [_bits(v) for v in ratio] == [_bits(t[1]) for t in per_row]
    assert [_bits(v) for v in ks] == [_bits(t[2]) for t in per_row]
    original = verdicts._block_width
    try:
        verdicts._block_width = lambda use, array: None  # type: ignore[assignment]
        rows = verdicts._row_scales(ref, sus, use, size)
    finally:
        verdicts._block_width = original
    assert all(a.tobytes() == b.tobytes() for a, b in zip(blocks, rows))
    # The search for scaled neurons: the fitted rows find what the rows read one at a time find.
    sus_scaled = np.array(sus)
    sus_scaled[tuple(use.positions[3] if d == axis else slice(None) for d in range(sus.ndim))] *= 1.6
    fitted = verdicts._Fits().fit(use, ref, sus_scaled)
    found = find_scaled_under_noise([("t", fitted, fitted)])
    expected = find_scaled_under_noise([("t", verdicts._Rows(ref, use), verdicts._Rows(sus_scaled, use))])
    assert [(f.neuron, _bits(f.k), _bits(f.z)) for f in found] == [(f.neuron, _bits(f.k), _bits(f.z)) for f in expected]
    if size >= 16:  # enough neurons for the bulk to read as unscaled
        assert [f.neuron for f in found] == [3]


def test_fits_are_shared_while_the_arrays_are_the_same() -> None:
    """The rescale search's fits serve the scaled-neuron search; an array replaced (a scale undone) is fitted anew."""
    from onnxlady._audit import _verdicts as verdicts

    rng = np.random.default_rng(5)
    ref = rng.standard_normal((32, 1200)).astype(np.float32)
    sus = ref + np.float32(0.05) * rng.standard_normal(ref.shape).astype(np.float32)
    use = verdicts._Use(0, "w", "w", 0, 1, 0, verdicts._positions(rng.permutation(32), 32))
    fits = verdicts._Fits()
    first = fits.fit(use, ref, sus)
    assert fits.fit(use, ref, sus) is first
    copy = np.array(sus, dtype=np.float64)
    again = fits.fit(use, ref, copy)
    assert again is not first and all(a.tobytes() == b.tobytes() for a, b in zip(vars(again).values(), vars(first).values()))
    other = verdicts._Use(0, "w", "w", 0, 1, 0, use.positions)
    assert fits.fit(other, ref, copy) is not again


def test_heatmap_png_is_the_per_pixel_one() -> None:
    """The report's heatmaps: the same PNG bytes as colouring pixel by pixel (edge values included)."""
    from onnxlady._audit import _render

    rng = np.random.default_rng(9)
    edges = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 0.5, -0.5, 1e-17, -1e-17, 0.99999, 2.0]
    matrices = [np.round(rng.uniform(-1.2, 1.2, (17, 23)), 4).tolist(), [edges], [[0.25] * 4, [-0.75] * 4]]
    for matrix in matrices:
        expected = _render._png([[_render._rgb(v) for v in row] for row in matrix])
        assert _render._heatmap_png(matrix) == expected


def test_unscaled_rows_of_a_converted_model_are_not_read_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Across a conversion the scale analysis tests a row's exactness only where its k could be a scale."""
    import onnxlady
    from fixtures.conversions import CONVERSIONS
    from fixtures.models import build_vgg
    from onnxlady._audit import _verdicts as verdicts

    reference = build_vgg()
    suspect = CONVERSIONS["float16"](onnxlady.permute(reference, seed=1).model)
    calls: list[float] = []
    exact_multiple = verdicts._exact_multiple

    def counted(r: np.ndarray, s: np.ndarray, k: float, bound: np.ndarray | None) -> tuple[bool, float]:
        calls.append(k)
        return exact_multiple(r, s, k, bound)

    monkeypatch.setattr(verdicts, "_exact_multiple", counted)
    report = verdicts.audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.conversions
    rows = sum(len(a.cosine) for a in report.tensors)
    assert rows > 100 and all(k > 0 and abs(k - 1) > verdicts.SCALE_TOL for k in calls)
    assert len(calls) < rows / 4  # float16 rounding leaves k within SCALE_TOL of 1 in most rows
