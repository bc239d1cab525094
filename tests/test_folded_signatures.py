"""Resync across a conversion signs folded kernels in pieces and centres on a second core; it reports the same.

Resync across a conversion signs each weight with its BatchNorm (and scalar steps after the
layer) folded in (:func:`onnxlady._resync._signatures._folded_for_signature`). A kernel is no
longer written whole as a float64 copy for that: it is kept as the weight and its factors
(:class:`onnxlady._resync._invariants.RowScaled`), folded piece by piece by each pass of its
signature. What is reported must not move: the signature of every such kernel is the folded
array's to the bit (distances and margins are printed to the last digit), and a resync across
float16 and QDQ conversions gives the same model, key and matching either way.

The solver centres a sketched block's two sides side by side (the reference's here, the
suspect's in a second thread): the same function on the same values, so the same model, key and
report.
"""

from __future__ import annotations

import contextlib
import itertools
import threading

import numpy as np
import onnx
import pytest

from fixtures import build_large_model
from fixtures.conversions import CONVERSIONS
from onnxlady import perturb, resync
from onnxlady._resync import _signatures, _solver
from onnxlady._resync._invariants import RowScaled, sharing_scratch, signature
from onnxlady.testing import permute_copy


def _folded(base: np.ndarray, factors: list[np.ndarray], plus_zero: bool) -> np.ndarray:
    """The whole folded array, as ``_folded_for_signature`` wrote it before."""
    spread = (-1,) + (1,) * (base.ndim - 1)
    value = base * factors[0].reshape(spread)
    for factor in factors[1:]:
        np.multiply(value, factor.reshape(spread), out=value)
    return value + 0.0 if plus_zero else value


def _scaled(base: np.ndarray, factors: list[np.ndarray], plus_zero: bool) -> RowScaled:
    spread = (-1,) + (1,) * (base.ndim - 1)
    value = RowScaled(base, ())
    for factor in factors:
        value = value.times(factor.reshape(spread))
    return value.plus_zeros() if plus_zero else value


def _weight(shape: tuple[int, ...], dtype: type, kind: str, rng: np.random.Generator) -> np.ndarray:
    base = rng.standard_normal(shape)
    if kind == "sparse":  # zeros of both signs crowd a bucket: partitioned
        base[rng.random(shape) < 0.7] = 0.0
        base[rng.random(shape) < 0.05] = -0.0
    elif kind == "not finite":
        base.flat[5], base.flat[7] = np.nan, np.inf
    elif kind == "tiny":
        base *= 1e-30
    return base.astype(dtype)


_SHAPES = [(640, 64, 3, 3), (64, 300, 3, 3), (37, 41, 3, 3), (300, 64, 7, 7), (2, 9000, 2), (16, 1100, 1, 3), (1024, 512, 3, 3)]


@pytest.mark.parametrize(
    ("shape", "dtype", "kind", "plus_zero"),
    [
        *itertools.product(_SHAPES[:1], (np.float32, np.float16, np.float64), ("normal",), (False, True)),
        *((shape, np.float32, "normal", True) for shape in _SHAPES[1:]),  # (the last: quantiles selected, not resampled)
        (_SHAPES[2], np.float16, "normal", False),
        *itertools.product(_SHAPES[:1], (np.float32, np.float16), ("sparse", "not finite", "tiny"), (True,)),
    ],
)
def test_a_folded_kernel_signs_as_its_folded_array_bit_for_bit(
    shape: tuple[int, ...], dtype: type, kind: str, plus_zero: bool
) -> None:
    rng = np.random.default_rng(sum(shape))
    base = _weight(shape, dtype, kind, rng)
    kept = base.copy()
    factors = [rng.uniform(-2.0, 2.0, shape[0]), np.array([rng.uniform(0.5, 2.0)])]
    factors[0][::7] = 0.0  # a zero factor: a row of zeros (negative zeros from negative values)
    with sharing_scratch():
        expected = signature(_folded(base, factors, plus_zero))
        found = signature(_scaled(base, factors, plus_zero))
    assert [part.shape for part in found] == [part.shape for part in expected]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(found, expected, strict=True))
    assert base.tobytes() == kept.tobytes()  # the weight is read, never written


def test_a_changed_factor_is_caught() -> None:
    rng = np.random.default_rng(3)
    base = _weight((64, 300, 3, 3), np.float32, "normal", rng)
    factor = rng.uniform(0.5, 2.0, 64)
    changed = factor.copy()
    changed[5] *= 1.25  # one neuron's BatchNorm scale
    with sharing_scratch():
        expected = signature(_folded(base, [factor], True))
        found = signature(_scaled(base, [changed], True))
    assert any(a.tobytes() != b.tobytes() for a, b in zip(found, expected, strict=True))


def test_a_small_one_tap_or_float16_weight_is_folded_whole_as_before() -> None:
    factor = np.ones((64, 1, 1, 1))
    assert RowScaled.fits(np.ones((64, 64, 3, 3), np.float32), factor)
    assert not RowScaled.fits(np.ones((64, 8, 3, 3), np.float32), factor)  # too few values to bucket
    assert not RowScaled.fits(np.ones((64, 512, 1, 1), np.float32), factor)  # one tap: summed strided
    assert not RowScaled.fits(np.ones((64, 64, 3, 3), np.float32).transpose(1, 0, 2, 3), factor)
    assert not RowScaled.fits(np.ones((64, 64, 3, 3), np.float32), factor.astype(np.float32))
    assert not RowScaled.fits(np.ones((64, 64, 3, 3), np.float16), factor)  # widened once, whole


def _pair(conversion: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    reference = build_large_model(1)
    permuted, _, _, _ = permute_copy(reference, 5)
    return reference, CONVERSIONS[conversion](perturb(permuted, noise=0.05, seed=2).model)


@pytest.mark.parametrize("conversion", ["float16", "qdq"])
def test_resync_across_a_conversion_reports_the_same_without_whole_folded_kernels(monkeypatch, conversion: str) -> None:
    reference, suspect = _pair(conversion)
    scratches: list[list[np.ndarray]] = []
    original = _signatures.Signatures.__init__

    def recorded(self, graph, sites, scratch=None):  # type: ignore[no-untyped-def]
        original(self, graph, sites, scratch)
        scratches.append(self._scratch)

    monkeypatch.setattr(_signatures.Signatures, "__init__", recorded)
    folded = []
    real_rows = RowScaled.rows

    def rows(self: RowScaled, start: int, stop: int) -> np.ndarray:
        folded.append(self.shape)
        return real_rows(self, start, stop)

    monkeypatch.setattr(RowScaled, "rows", rows)
    found = resync(reference, suspect)
    assert folded  # the reference's float32 kernels, folded in pieces
    if conversion == "qdq":  # and the suspect's dequantized ones: no kernel written whole (the stem's still is)
        assert all(not scratch or scratch[0].size < 64 * 64 * 9 for scratch in scratches)
    with monkeypatch.context() as patch:  # every kernel folded into a whole array, as before
        patch.setattr(RowScaled, "fits", staticmethod(lambda value, factor: False))
        scratches.clear()
        expected = resync(reference, suspect)
    assert any(scratch and scratch[0].size >= 64 * 64 * 9 for scratch in scratches)
    assert found.model.SerializeToString() == expected.model.SerializeToString()
    assert found.to_json() == expected.to_json()
    pairs = found.to_json()["matching"]["site_pairs"]
    assert sum(pair["distance"] is not None for pair in pairs) >= 8  # the signatures were compared


# -- side by side: a sketched block's two sides, centred in two threads --


def test_sketched_blocks_are_centred_side_by_side_and_solve_the_same(monkeypatch) -> None:
    reference, suspect = _pair("qdq")
    threads: list[str] = []
    original = _solver._centred_sketch

    def spied(stored, sign):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return original(stored, sign)

    monkeypatch.setattr(_solver, "_centred_sketch", spied)
    monkeypatch.setattr(_solver, "_EXACT_PRODUCT", 1 << 16)  # the small model's blocks sketched too
    monkeypatch.setattr(_solver, "_SKETCH_DIM", 128)
    found = resync(reference, suspect)
    assert any(name.startswith("onnxlady-centring") for name in threads)
    assert any(name == threading.current_thread().name for name in threads)
    threads.clear()

    @contextlib.contextmanager
    def no_thread(*arguments, **keywords):  # type: ignore[no-untyped-def]
        yield None

    with monkeypatch.context() as patch:
        patch.setattr(_solver, "ThreadPoolExecutor", no_thread)
        expected = resync(reference, suspect)
    assert threads and all(name == threading.current_thread().name for name in threads)
    assert found.model.SerializeToString() == expected.model.SerializeToString()
    assert found.to_json() == expected.to_json()
