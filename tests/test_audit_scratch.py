"""The forensics' reused work arrays and numpy-free quartiles give the values they replace, bit for bit.

``classify_change`` measures every weight tensor into work arrays reused from one tensor to
the next (``_Scratch``: the reference widened, the change, a scratch array that also holds the
distinct-value pattern tables); the quartiles of the dispersion are computed without
``np.percentile`` (which imports ``numpy.ma``); the search for scaled neurons under noise reads
its rows one at a time. Each is compared with the plain computation.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from onnxlady._audit._forensics import (
    WeightInfo,
    _distinct_at_least,
    _measure,
    _measure_widened,
    _quartiles,
    _Scratch,
    _std_mean,
    find_scaled_under_noise,
)
from onnxlady._audit._verdicts import _Rows, _rows, _Use


def _tensors() -> list[tuple[WeightInfo, np.ndarray, np.ndarray]]:
    """Weight pairs of several shapes, row axes and dtypes, sizes up and down (the buffers grow and are sliced)."""
    rng = np.random.default_rng(11)
    out = []
    specs = [
        ((64, 32, 3, 3), 0, np.float32),
        ((8, 4, 3, 3), 0, np.float32),
        ((32, 64, 3, 3), 1, np.float32),
        ((200, 300), 1, np.float32),
        ((1, 64, 3, 3), 0, np.float32),
        ((128, 64), 0, np.float64),
        ((2, 64, 96), 2, np.float32),
        ((48, 48, 1, 1), 0, np.float16),
        ((16,), 0, np.float32),
        ((300, 200), 0, np.float32),
    ]
    for number, (shape, axis, dtype) in enumerate(specs):
        ref = rng.standard_normal(shape).astype(dtype)
        kind = number % 4
        if kind == 0:
            sus = (ref + 0.1 * rng.standard_normal(shape)).astype(dtype)
        elif kind == 1:
            sus = (np.round(ref.astype(np.float64) * 4) / 4).astype(dtype)  # a quantization grid
        elif kind == 2:
            sus = np.where(np.abs(ref) < 0.5, 0, ref).astype(dtype)  # pruned
        else:
            sus = ref.copy()  # unchanged
        out.append((WeightInfo(f"w{number}", "Conv", axis), ref, sus))
    return out


def test_reused_buffers_measure_what_fresh_ones_do() -> None:
    """One _Scratch through every tensor (twice, stale contents in between) gives each fresh measurement."""
    tensors = _tensors()
    fresh = [_measure(info.tensor, info, ref, sus) for info, ref, sus in tensors]
    buffers = _Scratch()
    for _ in range(2):
        shared = [_measure(info.tensor, info, ref, sus, None, buffers) for info, ref, sus in tensors]
        assert [repr(entry) for entry in shared] == [repr(entry) for entry in fresh]
        for role in ("reference", "change", "scratch"):
            buffers.get(role, 1 << 16)[:] = np.nan  # garbage left behind must not leak into the next figures
    # The figures do tell the tensors apart: a buffer mix-up would show.
    assert len({entry["relative_change"] for entry in fresh if entry["changed"]}) > 3


def test_pattern_table_in_dirty_scratch_counts_as_a_fresh_one() -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal(50_000).astype(np.float32)
    values[1::2] = values[::2]  # repeated values: fewer patterns than elements
    buffers = _Scratch()
    buffers.get("scratch", 1 << 16)[:] = 1.0  # every byte non-zero: read as True if not cleared
    for enough in (None, 1000.0):
        assert _distinct_at_least(values, enough=enough, buffers=buffers) == _distinct_at_least(values, enough=enough)
        assert _distinct_at_least(values, 4096, buffers=buffers) == _distinct_at_least(values, 4096)


def test_mean_on_the_way_is_numpys_mean() -> None:
    rng = np.random.default_rng(5)
    for size in (1, 7, 1000, 123_457):
        flat = rng.standard_normal(size) * 3 + 0.7
        std, mean = _std_mean(flat, np.empty(size))
        assert np.float64(std).tobytes() == np.float64(flat.std()).tobytes()
        assert np.float64(mean).tobytes() == np.float64(flat.mean()).tobytes()


@pytest.mark.parametrize("size", [*range(2, 40), 63, 64, 65, 640, 1001, 4096])
def test_quartiles_are_numpys_percentile(size: int) -> None:
    rng = np.random.default_rng(size)
    cases = [
        rng.standard_normal(size) ** 2,
        np.round(rng.standard_normal(size), 1) ** 2,  # ties
        np.concatenate([np.zeros(size // 2), rng.random(size - size // 2)]),
        np.full(size, 0.3),
        rng.random(size) * 1e-300,
    ]
    for values in cases:
        expected = np.percentile(values, [25, 75])
        found = _quartiles(values.copy())
        assert [np.float64(v).tobytes() for v in found] == [v.tobytes() for v in expected]


def test_quartiles_leave_non_finite_values_to_numpy() -> None:
    values = np.array([1.0, 2.0, np.inf, 4.0, 5.0, 6.0, 7.0, 8.0])
    with np.errstate(invalid="ignore"):
        expected = np.percentile(values, [25, 75])
        found = _quartiles(values)
    assert found[0] == expected[0] and np.isnan(found[1]) == np.isnan(expected[1])


def test_dispersion_does_not_import_numpy_ma() -> None:
    """np.percentile imports numpy.ma (tens of milliseconds of a small audit); the forensics' quartiles do not."""
    code = (
        "import sys, numpy as np\n"
        "from onnxlady._audit._forensics import _dispersion\n"
        "before = 'numpy.ma' in sys.modules\n"
        "value = _dispersion(np.random.default_rng(0).standard_normal((64, 50)))\n"
        "print(before, 'numpy.ma' in sys.modules, value is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False", "True"]


def test_rows_read_as_iterated_find_what_listed_rows_find() -> None:
    """_noisy_scales' rows computed one at a time give find_scaled_under_noise the listed rows' answer."""
    rng = np.random.default_rng(9)
    ref = rng.standard_normal((40, 24, 3, 3)).astype(np.float32)
    sus = (ref + 0.05 * rng.standard_normal(ref.shape)).astype(np.float32)
    sus[[3, 17]] *= 1.8  # two scaled neurons under the noise
    for axis in (0, 1):
        size = ref.shape[axis]
        use = _Use(0, "w", "w", 0, 1, axis, [np.array([j]) for j in rng.permutation(size)])
        listed = [[_rows(a, axis, pos).astype(np.float64) for pos in use.positions] for a in (ref, sus)]
        lazy = (_Rows(ref, use), _Rows(sus, use))
        assert len(lazy[0]) == size
        assert all(np.array_equal(a, b) for a, b in zip(lazy[0], listed[0]))
        found = find_scaled_under_noise([("t", lazy[0], lazy[1])])
        expected = find_scaled_under_noise([("t", listed[0], listed[1])])
        assert [(f.neuron, f.k, f.z) for f in found] == [(f.neuron, f.k, f.z) for f in expected]
        if axis == 0:
            assert sorted(int(use.positions[f.neuron][0]) for f in found) == [3, 17]


def test_two_work_arrays_measure_what_three_do() -> None:
    """_measure's two work arrays (the reference's copy in the scratch array, the change computed again) give the three-array figures."""
    buffers = _Scratch()
    for info, ref, sus in _tensors():
        expected = _measure_widened(info.tensor, info, ref, sus)
        assert repr(_measure(info.tensor, info, ref, sus, None, buffers)) == repr(expected)
        assert repr(_measure(info.tensor, info, ref, sus, np.dtype(np.float16), buffers)) == repr(
            _measure_widened(info.tensor, info, ref, sus, np.dtype(np.float16))
        )
