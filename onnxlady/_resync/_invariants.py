"""Signatures of a weight that no permutation of its neurons changes, and how far two are apart.

Where the structure of two graphs does not say which weight is which (a converter reordered
three projections of the same shape, fused one of them, or moved a layer), their *content*
does: a permuted copy of a weight has the same sorted row norms, the same sorted column norms
and the same sorted values, up to its storage error. :func:`signature` computes those (on the
weight in a layout both models share, see :mod:`onnxlady._resync._sites`) and
:func:`distance` compares two: 0 for a permuted copy, up to 2 for unrelated weights; a
float16 or int8 conversion moves it by about its relative rounding (1e-3, 1e-2).

Pure numpy on arrays: any layer may use it (the provenance fingerprints compute richer
statistics of the same kind on their own).
"""

from __future__ import annotations

import contextvars
from collections.abc import Generator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["QUANTILES", "distance", "signature", "sharing_scratch"]

#: Points of the quantile function kept per tensor (the sorted values, resampled).
QUANTILES = 33

#: Below this many values, ``np.partition`` selects the ranks faster than bucketing them.
_BUCKETED_FROM = 1 << 14

#: Buckets of :func:`_order_statistics`: the sign, exponent and this many leading mantissa bits
#: of each value, fewer below :data:`_FINER_FROM` values (the table of counts spans every
#: exponent: for a mid-sized weight, it cost more than its values), more from there on (fewer
#: values to sort per bucket). Float16 is bucketed on all its bits (a bucket per value).
_MANTISSA_BITS = (7, 9)
_FINER_FROM = 1 << 20


#: Within :func:`sharing_scratch`: the int64 array :func:`_order_statistics` computes its buckets in.
_SCRATCH: contextvars.ContextVar[list[np.ndarray] | None] = contextvars.ContextVar("onnxlady_scratch", default=None)
#: Within :func:`sharing_scratch`: the thread a large weight's norms are computed in (see :func:`signature`).
_WORKER: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("onnxlady_signature_worker", default=None)
#: From this many values, a matrix's norms are computed in that thread beside its quantiles.
_NORMS_BESIDE_FROM = 1 << 20


@contextmanager
def sharing_scratch() -> Generator[None, None, None]:
    """Within it, the signatures of many weights compute their buckets in one reused array.

    A fresh array per weight costs its page faults (half the time of a signature of a large
    weight); the shared one, as large as the largest weight signed, is let go when the block ends.
    A large weight's norms are computed meanwhile in a worker thread (started at the first such
    weight, ended with the block): numpy's passes release the GIL, so on a second core the
    norms (a third of a signature) cost no time beside the quantiles (a kernel's in pieces of
    2 MB; a matrix's squares whole, as before).
    """
    token = _SCRATCH.set([])
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="onnxlady-signature") as worker:
            worker_token = _WORKER.set(worker)
            try:
                yield
            finally:
                _WORKER.reset(worker_token)
    finally:
        _SCRATCH.reset(token)


def _scratch(size: int) -> np.ndarray:
    """An int64 array of ``size`` elements: a view of the shared one within :func:`sharing_scratch`."""
    shared = _SCRATCH.get()
    if shared is None:
        return np.empty(size, dtype=np.int64)
    if not shared or shared[0].size < size:
        shared[:] = [np.empty(size, dtype=np.int64)]
    return shared[0][:size]


#: Per float type signed natively: the signed integer of its width and its exponent bits.
#: Widening to float64 keeps every value and its order, so the order statistics of the stored
#: values, widened, are those of the widened values (half or a quarter of the bytes to scan).
_NATIVE: dict[np.dtype[Any], tuple[np.dtype[Any], int]] = {
    np.dtype(np.float64): (np.dtype(np.int64), 11),
    np.dtype(np.float32): (np.dtype(np.int32), 8),
    np.dtype(np.float16): (np.dtype(np.int16), 5),
}


def _order_keys(bits: np.ndarray) -> np.ndarray:
    """Integer keys ordered as the floats whose bits are ``bits`` (``-0.0`` just before ``0.0``).

    ``bits`` is a signed integer view of float64, float32 or float16 values; the map is its own
    inverse.
    """
    width = bits.dtype.itemsize * 8
    magnitude = bits.dtype.type((1 << (width - 1)) - 1)
    return bits ^ ((bits >> (width - 1)) & magnitude)


def _order_statistics(flat: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The values of the given ranks in ``flat`` sorted (what ``np.partition(flat, ranks)[ranks]`` gives).

    ``np.partition`` costs about a pass per rank asked for. Here one pass counts the values in
    buckets (the top bits of an order-preserving integer key); only the few buckets holding an
    asked rank are then sorted. The statistics are the same values (a zero may come back as
    ``-0.0`` where partition gave ``0.0``, or the reverse: they compare equal, and only norms and
    differences of them are used). Values with NaN or infinities, few values, or values crowded
    into a few buckets are partitioned as before.

    Args:
        flat: a 1-D array (float64, float32 or float16 are bucketed, any other is partitioned).
        ranks: ascending ranks in ``0..flat.size - 1``.

    Returns:
        The order statistics, in ``flat``'s dtype.
    """
    native = _NATIVE.get(flat.dtype)
    if flat.size < _BUCKETED_FROM or native is None:
        return np.partition(flat, ranks)[ranks]
    integer, exponent_bits = native
    width = integer.itemsize * 8
    mantissa = _MANTISSA_BITS[flat.size >= _FINER_FROM]
    bucket_bits = width if width == 16 else 1 + exponent_bits + mantissa
    # Buckets at either end holding only infinities and NaNs (sign and exponent bits all ones).
    not_finite = 1 << (bucket_bits - 1 - exponent_bits)
    bits = np.ascontiguousarray(flat).view(integer)
    unsigned = bits.view(np.dtype(f"u{integer.itemsize}"))
    # The raw top bits (sign, exponent, leading mantissa bits), made in place on one new array:
    # ``raw`` counts up with the value for positive values (0 .. half - 1) and down for negative
    # ones (half .. 2 * half - 1); the ordered bucket is ``half + r`` for a positive ``r`` and
    # ``2 * half - 1 - r`` for a negative one.
    # Shifted as unsigned (no sign bits shifted in, so no mask to apply: one pass less), into
    # the int64 scratch that bincount counts.
    # A narrower type is shifted into the int64 scratch as well (its bits widened with no sign).
    raw = _scratch(bits.size)
    np.right_shift(unsigned, unsigned.dtype.type(width - bucket_bits), out=raw.view(np.uint64), casting="unsafe")
    half = 1 << (bucket_bits - 1)
    raw_counts = np.bincount(raw, minlength=1 << bucket_bits)
    # Only the buckets holding values are put in order and summed up: a few thousand (the whole
    # table, 2**20 buckets reordered and summed per weight, cost more than a mid-sized weight's
    # values). Sorted raw buckets in the keys' order: the negative ones reversed, then the positive.
    occupied = np.flatnonzero(raw_counts != 0)  # (a boolean array's nonzero is several times faster)
    split = int(np.searchsorted(occupied, half))
    buckets = np.concatenate([occupied[split:][::-1], occupied[:split]])
    counts = raw_counts[buckets]
    first, last = _ordered_bucket(int(buckets[0]), half), _ordered_bucket(int(buckets[-1]), half)
    if first < not_finite or last >= 2 * half - not_finite:
        return np.partition(flat, ranks)[ranks]
    ends = np.cumsum(counts)
    holding = np.searchsorted(ends, ranks, side="right")  # the (occupied) bucket of each rank
    wanted = np.unique(holding)
    if counts[wanted].sum() > flat.size // 8:  # crowded (a narrow range): sorting them would not pay
        return np.partition(flat, ranks)[ranks]
    if bucket_bits == width:  # a bucket per value (float16): its raw bits are the statistic
        return buckets[holding].astype(unsigned.dtype).view(flat.dtype)
    raw_chosen = np.zeros(raw_counts.size, dtype=bool)
    raw_chosen[buckets[wanted]] = True
    inside = np.sort(_order_keys(bits[raw_chosen[raw]]))  # the wanted buckets' values, in order
    # Where each wanted bucket starts in ``inside``, and each rank's place in its bucket.
    starts = np.cumsum(counts[wanted]) - counts[wanted]
    place = starts[np.searchsorted(wanted, holding)] + (ranks - (ends[holding] - counts[holding]))
    return _order_keys(inside[place]).view(flat.dtype)


def _ordered_bucket(raw: int, half: int) -> int:
    """The place in value order of raw bucket ``raw`` (see :func:`_order_statistics`)."""
    return half + raw if raw < half else 2 * half - 1 - raw


def _resampled(values: np.ndarray, points: int = QUANTILES) -> np.ndarray:
    """The sorted values at ``points`` evenly spaced ranks (interpolated), whatever their count.

    Only the order statistics on either side of each rank are selected, not the whole array
    sorted; the interpolation is ``np.interp``'s over the ranks ``0..n-1``, term for term, so the
    result is the same to the bit.
    """
    flat = values.ravel()
    if flat.size <= points:
        return np.sort(flat).astype(np.float64)
    grid = np.linspace(0.0, flat.size - 1.0, points)
    low = grid.astype(np.int64)  # floor: the ranks are not negative (and, as size > points, increasing)
    high = np.minimum(low + 1, flat.size - 1)
    ranks = np.union1d(low, high)
    found = _order_statistics(flat, ranks)
    below = found[np.searchsorted(ranks, low)].astype(np.float64)  # as np.interp
    above = found[np.searchsorted(ranks, high)].astype(np.float64)
    resampled = (above - below) * (grid - low) + below
    resampled[-1] = found[-1]  # np.interp returns the last point itself (the largest value)
    return resampled


def signature(value: np.ndarray) -> list[np.ndarray]:
    """Permutation-invariant statistics of one weight in its canonical layout.

    Args:
        value: the weight, neurons on axis 0 (a matrix ``[out, in]``, a convolution kernel
            ``[out, in, k...]``) or a vector over neurons (a bias, a normalisation's scale).

    Returns:
        Components compared one by one by :func:`distance`: the sorted values (resampled to
        :data:`QUANTILES` points) and, for a matrix, the sorted norms of its rows (neurons)
        and of its input columns (summed over kernel positions). Each is unchanged by any
        permutation of the neurons and of the inputs.
    """
    flat = np.asarray(value)
    # float32 and float16 are signed as stored, each value widened only where a float64 result
    # is computed from it: the same numbers as a float64 copy would give, without the copy.
    if flat.dtype not in _NATIVE:
        flat = np.asarray(value, dtype=np.float64)
    if flat.size == 0:
        return []
    matrix = flat.ndim >= 2 and flat.shape[0] > 1
    worker = _WORKER.get() if matrix and flat.size >= _NORMS_BESIDE_FROM else None
    # The same function on the same array: the same norms, only computed in the other thread.
    beside: Future[tuple[np.ndarray, np.ndarray]] | None = worker.submit(_norms, flat) if worker is not None else None
    if flat.size > 1 << 22:  # quantiles of a huge tensor cost a full sort: a selection suffices
        ranks = np.linspace(0, flat.size - 1, QUANTILES).astype(np.int64)
        values = _order_statistics(flat.ravel(), ranks).astype(np.float64)
    else:
        values = _resampled(flat)
    parts = [values]
    if matrix:
        rows, columns = beside.result() if beside is not None else _norms(flat)
        parts += [np.sort(rows), np.sort(columns)]
    return parts


#: Elements per piece of :func:`_norms` (2 MB of float64): small arrays reused by the allocator.
_NORM_PIECE = 1 << 18


def _norms(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The norms of a weight's rows (axis 0) and of its input columns (axis 1, over the rest).

    The squares summed along each row of ``squares.reshape(rows, -1)`` and of the columns moved
    first (``np.moveaxis(squares, 1, 0).reshape(columns, -1)``, a C-contiguous copy for a kernel).
    A C-contiguous kernel (three axes or more) is done a few rows, then a few columns, at a time:
    each sum runs over the same numbers in the same order (numpy sums each contiguous row on its
    own), so the norms are the same to the bit, without two whole arrays of squares (whose page
    faults cost more than the sums). Nothing is written into ``flat``. A float32 or float16
    weight is squared in float64 (each value widened, then squared: what a float64 copy gives).
    """
    out, inputs = flat.shape[0], flat.shape[1]
    if not flat.flags.c_contiguous or flat.ndim < 3:  # a matrix's columns are summed strided, as before
        squares = np.multiply(flat, flat, dtype=np.float64)
        rows = np.sqrt(squares.reshape(out, -1).sum(axis=1))
        return rows, np.sqrt(np.moveaxis(squares, 1, 0).reshape(inputs, -1).sum(axis=1))
    row_sums = np.empty(out)
    step = max(1, _NORM_PIECE // max(flat[0].size, 1))
    for start in range(0, out, step):
        piece = flat[start : start + step]
        row_sums[start : start + step] = np.square(piece, dtype=np.float64).reshape(piece.shape[0], -1).sum(axis=1)
    column_sums = np.empty(inputs)
    step = max(1, _NORM_PIECE // max(flat.size // inputs, 1))
    tail = flat[0, 0].size  # the values of one (output, input) pair: a kernel's taps
    # Each (output, input) kernel as one opaque element: the moved piece is then copied a kernel
    # at a time, not a value at a time (twice as fast), into the same C-contiguous layout. A
    # kernel of one value is summed as before (its moved view needs no copy, and is summed strided).
    kernels = flat.reshape(out, inputs * tail).view(np.dtype((np.void, flat.itemsize * tail))) if tail > 1 else None
    for start in range(0, inputs, step):
        stop = min(start + step, inputs)
        if kernels is not None:
            # Always a copy (a single output or input would otherwise view the weight itself).
            moved = np.array(kernels[:, start:stop].T, order="C").view(flat.dtype).reshape(stop - start, -1)
            # The copy squared in place (a narrower one into a new float64 piece).
            squared = np.square(moved, out=moved) if moved.dtype == np.float64 else np.square(moved, dtype=np.float64)
            column_sums[start:stop] = squared.sum(axis=1)
            continue
        # Squared into a new C-contiguous piece (the moved view may be the weight itself).
        moved = np.square(np.moveaxis(flat[:, start:stop], 1, 0).reshape(stop - start, -1), dtype=np.float64)
        column_sums[start:stop] = moved.sum(axis=1)
    return np.sqrt(row_sums), np.sqrt(column_sums)


def distance(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    """How far two signatures are: the mean, over components, of ``2 |a - b| / (|a| + |b|)``.

    Args:
        first: a :func:`signature`.
        second: another, of a weight of the same shape.

    Returns:
        0 for permuted copies, about the relative storage error for converted ones, up to 2;
        ``inf`` when the signatures cannot be compared (different shapes).
    """
    if len(first) != len(second) or not first:
        return float("inf") if len(first) != len(second) else 0.0
    total = 0.0
    for a, b in zip(first, second):
        if a.shape != b.shape:
            return float("inf")
        scale = float(np.linalg.norm(a) + np.linalg.norm(b))
        total += 2.0 * float(np.linalg.norm(a - b)) / scale if scale > 0 else 0.0
    return total / len(first)
