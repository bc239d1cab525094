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
from collections.abc import Callable, Generator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["QUANTILES", "RowScaled", "distance", "sharing_scratch", "signature"]

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


#: Rows per piece of a :class:`RowScaled` weight read whole: about this many values (2 MB of float64).
_ROW_PIECE = 1 << 18


class RowScaled:
    """A weight with per-neuron factors folded in, computed a few rows at a time where read.

    Stands for ``(float64(base) * factors[0]) * factors[1] ...`` (each factor spread over axis
    0, one value per row or one for all), then ``+ 0.0`` with ``plus_zero``: what a signature
    of a folded weight (a BatchNorm's scale, a scalar step after the layer) is taken of. Made
    whole, a kernel's folded copy is a float64 array as large as two float32 ones, held through
    the matching (a resync across QDQ peaked with it); made in pieces, each pass reads the weight
    as stored and computes the products it needs in cache, in about the same time. Every value
    is the same product of the same two numbers, so the signature is the same to the bit
    (:func:`signature`).
    Only C-contiguous float32 or float64 kernels (three axes or more, more than one tap, rows
    and values enough to bucket) are made so (:meth:`fits`); others are folded whole as before
    (a float16 weight among them: numpy widens half floats in software, once per pass here).
    """

    def __init__(self, base: np.ndarray, factors: tuple[np.ndarray, ...], plus_zero: bool = False) -> None:
        self.base = base
        self.factors = factors  # each 1-D float64, one value per row of ``base`` or one for all
        self.plus_zero = plus_zero
        self.shape: tuple[int, ...] = base.shape
        self.ndim = base.ndim
        self.size = base.size
        self.dtype = np.dtype(np.float64)

    @staticmethod
    def fits(value: np.ndarray, factor: np.ndarray) -> bool:
        """Whether ``value * factor`` may be kept as a :class:`RowScaled` (see the class docstring)."""
        return (
            value.ndim >= 3
            and value.flags.c_contiguous
            and value.shape[0] > 1
            and value.size >= _BUCKETED_FROM
            and int(np.prod(value.shape[2:])) > 1
            and value.dtype in (np.float64, np.float32)  # (float16 widens in software: once, folded whole)
            and factor.dtype == np.float64
            and factor.shape[1:] == (1,) * (value.ndim - 1)
            and factor.shape[0] in (1, value.shape[0])
        )

    def times(self, factor: np.ndarray) -> RowScaled:
        """This weight times one more factor (of :meth:`fits`'s form)."""
        return RowScaled(self.base, (*self.factors, factor.reshape(-1)), self.plus_zero)

    def plus_zeros(self) -> RowScaled:
        """This weight ``+ 0.0`` (a negative zero made a positive one)."""
        return RowScaled(self.base, self.factors, True)

    def _folded(self, values: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
        """``values`` times ``factors`` in turn, each broadcast against it, then ``+ 0.0``: a new float64 array."""
        out = np.multiply(values, factors[0])  # (float32 or float16 values widened: the float64 loop)
        for factor in factors[1:]:
            np.multiply(out, factor, out=out)
        if self.plus_zero:
            np.add(out, 0.0, out=out)
        return out

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` folded, a new C-contiguous float64 array."""
        spread = (-1,) + (1,) * (self.ndim - 1)
        return self._folded(
            self.base[start:stop],
            [(f[start:stop] if f.size > 1 else f).reshape(spread) for f in self.factors],
        )

    def taken(self, positions: np.ndarray) -> np.ndarray:
        """The folded values at these positions of the flattened weight, in their order."""
        rows = positions // (self.size // self.shape[0])
        return self._folded(self.base.reshape(-1)[positions], [f[rows] if f.size > 1 else f for f in self.factors])

    def columns(self, start: int, stop: int) -> np.ndarray:
        """Input columns ``start:stop`` as ``[stop - start, out * taps]``, folded: what moving the whole folded weight gives.

        Each (output, input) kernel is copied as one opaque element (see :func:`_norms`), then folded.
        """
        out, inputs = self.shape[0], self.shape[1]
        tail = self.size // (out * inputs)
        kernels = self.base.reshape(out, inputs * tail).view(np.dtype((np.void, self.base.itemsize * tail)))
        moved = np.array(kernels[:, start:stop].T, order="C").view(self.base.dtype).reshape(stop - start, out, tail)
        folded = self._folded(moved, [f.reshape(1, -1, 1) for f in self.factors])
        return folded.reshape(stop - start, -1)

    def whole(self) -> np.ndarray:
        """The folded weight, one new float64 array."""
        return self.rows(0, self.shape[0])


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


def _order_statistics(flat: np.ndarray | RowScaled, ranks: np.ndarray) -> np.ndarray:
    """The values of the given ranks in ``flat`` sorted (what ``np.partition(flat, ranks)[ranks]`` gives).

    ``np.partition`` costs about a pass per rank asked for. Here one pass counts the values in
    buckets (the top bits of an order-preserving integer key); only the few buckets holding an
    asked rank are then sorted. The statistics are the same values (a zero may come back as
    ``-0.0`` where partition gave ``0.0``, or the reverse: they compare equal, and only norms and
    differences of them are used). Values with NaN or infinities, few values, or values crowded
    into a few buckets are partitioned as before.

    Args:
        flat: a 1-D array (float64, float32 or float16 are bucketed, any other is partitioned),
            or a :class:`RowScaled` weight (its values in C order): read a few rows at a time,
            made whole only where partitioned.
        ranks: ascending ranks in ``0..flat.size - 1``.

    Returns:
        The order statistics, in ``flat``'s dtype.
    """
    native = _NATIVE.get(flat.dtype)
    if flat.size < _BUCKETED_FROM or native is None:
        return np.partition(_flat(flat), ranks)[ranks]
    integer, exponent_bits = native
    width = integer.itemsize * 8
    mantissa = _MANTISSA_BITS[flat.size >= _FINER_FROM]
    bucket_bits = width if width == 16 else 1 + exponent_bits + mantissa
    # Buckets at either end holding only infinities and NaNs (sign and exponent bits all ones).
    not_finite = 1 << (bucket_bits - 1 - exponent_bits)
    if isinstance(flat, RowScaled):
        return _scaled_order_statistics(flat, ranks, bucket_bits, not_finite)
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
    return _bucketed(flat, raw, ranks, bucket_bits, not_finite, lambda chosen: bits[chosen])


def _flat(flat: np.ndarray | RowScaled) -> np.ndarray:
    """The values in C order, one array (a :class:`RowScaled` weight made whole)."""
    return flat.whole().reshape(-1) if isinstance(flat, RowScaled) else flat


def _scaled_order_statistics(flat: RowScaled, ranks: np.ndarray, bucket_bits: int, not_finite: int) -> np.ndarray:
    """:func:`_order_statistics` of a :class:`RowScaled` weight (float64): the same buckets, from its pieces.

    Each piece of rows is folded in cache and its buckets shifted into the scratch; the values
    of the wanted buckets are folded again, at their positions, for their sort.
    """
    raw = _scratch(flat.size)
    per_row = flat.size // flat.shape[0]
    step = max(1, _ROW_PIECE // per_row)
    shift = np.uint64(64 - bucket_bits)
    for start in range(0, flat.shape[0], step):
        stop = min(start + step, flat.shape[0])
        piece = flat.rows(start, stop).reshape(-1).view(np.uint64)
        np.right_shift(piece, shift, out=raw[start * per_row : stop * per_row].view(np.uint64))
    return _bucketed(
        flat, raw, ranks, bucket_bits, not_finite, lambda chosen: flat.taken(np.flatnonzero(chosen)).view(np.int64)
    )


def _bucketed(
    flat: np.ndarray | RowScaled,
    raw: np.ndarray,
    ranks: np.ndarray,
    bucket_bits: int,
    not_finite: int,
    chosen_bits: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """:func:`_order_statistics` once each value's raw bucket is in ``raw``.

    ``chosen_bits`` gives, for a boolean mask of the values, the signed integer bits of those
    values (in any order: they are sorted).
    """
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
        return np.partition(_flat(flat), ranks)[ranks]
    ends = np.cumsum(counts)
    holding = np.searchsorted(ends, ranks, side="right")  # the (occupied) bucket of each rank
    wanted = np.unique(holding)
    if counts[wanted].sum() > flat.size // 8:  # crowded (a narrow range): sorting them would not pay
        return np.partition(_flat(flat), ranks)[ranks]
    width = flat.dtype.itemsize * 8
    if bucket_bits == width:  # a bucket per value (float16): its raw bits are the statistic
        return buckets[holding].astype(np.dtype(f"u{flat.dtype.itemsize}")).view(flat.dtype)
    raw_chosen = np.zeros(raw_counts.size, dtype=bool)
    raw_chosen[buckets[wanted]] = True
    inside = np.sort(_order_keys(chosen_bits(raw_chosen[raw])))  # the wanted buckets' values, in order
    # Where each wanted bucket starts in ``inside``, and each rank's place in its bucket.
    starts = np.cumsum(counts[wanted]) - counts[wanted]
    place = starts[np.searchsorted(wanted, holding)] + (ranks - (ends[holding] - counts[holding]))
    return _order_keys(inside[place]).view(flat.dtype)


def _ordered_bucket(raw: int, half: int) -> int:
    """The place in value order of raw bucket ``raw`` (see :func:`_order_statistics`)."""
    return half + raw if raw < half else 2 * half - 1 - raw


def _resampled(values: np.ndarray | RowScaled, points: int = QUANTILES) -> np.ndarray:
    """The sorted values at ``points`` evenly spaced ranks (interpolated), whatever their count.

    Only the order statistics on either side of each rank are selected, not the whole array
    sorted; the interpolation is ``np.interp``'s over the ranks ``0..n-1``, term for term, so the
    result is the same to the bit.
    """
    flat = values if isinstance(values, RowScaled) else values.ravel()
    if flat.size <= points:
        return np.sort(_flat(flat)).astype(np.float64)
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


def signature(value: np.ndarray | RowScaled) -> list[np.ndarray]:
    """Permutation-invariant statistics of one weight in its canonical layout.

    Args:
        value: the weight, neurons on axis 0 (a matrix ``[out, in]``, a convolution kernel
            ``[out, in, k...]``) or a vector over neurons (a bias, a normalisation's scale);
            or a kernel with its neurons' factors folded in (:class:`RowScaled`), signed as
            the folded float64 array would be, without that array.

    Returns:
        Components compared one by one by :func:`distance`: the sorted values (resampled to
        :data:`QUANTILES` points) and, for a matrix, the sorted norms of its rows (neurons)
        and of its input columns (summed over kernel positions). Each is unchanged by any
        permutation of the neurons and of the inputs.
    """
    flat: np.ndarray | RowScaled = value if isinstance(value, RowScaled) else np.asarray(value)
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
        values = _order_statistics(flat if isinstance(flat, RowScaled) else flat.ravel(), ranks).astype(np.float64)
    else:
        values = _resampled(flat)
    parts = [values]
    if matrix:
        rows, columns = beside.result() if beside is not None else _norms(flat)
        parts += [np.sort(rows), np.sort(columns)]
    return parts


#: Elements per piece of :func:`_norms` (2 MB of float64): small arrays reused by the allocator.
_NORM_PIECE = 1 << 18


def _norms(flat: np.ndarray | RowScaled) -> tuple[np.ndarray, np.ndarray]:
    """The norms of a weight's rows (axis 0) and of its input columns (axis 1, over the rest).

    The squares summed along each row of ``squares.reshape(rows, -1)`` and of the columns moved
    first (``np.moveaxis(squares, 1, 0).reshape(columns, -1)``, a C-contiguous copy for a kernel).
    A C-contiguous kernel (three axes or more) is done a few rows, then a few columns, at a time:
    each sum runs over the same numbers in the same order (numpy sums each contiguous row on its
    own), so the norms are the same to the bit, without two whole arrays of squares (whose page
    faults cost more than the sums). Nothing is written into ``flat``. A float32 or float16
    weight is squared in float64 (each value widened, then squared: what a float64 copy gives).
    A :class:`RowScaled` kernel is folded a piece at a time, each piece as the folded array's.
    """
    out, inputs = flat.shape[0], flat.shape[1]
    if isinstance(flat, RowScaled):
        return _scaled_norms(flat)
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


def _scaled_norms(flat: RowScaled) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_norms` of a :class:`RowScaled` kernel: the same pieces, each folded where made.

    A row piece is the folded rows, a column piece the folded weight's kernels moved (the
    same numbers in the same C-contiguous layout as :func:`_norms` makes of the folded array):
    squared in place and summed as there.
    """
    out, inputs = flat.shape[0], flat.shape[1]
    row_sums = np.empty(out)
    step = max(1, _NORM_PIECE // max(flat.size // out, 1))
    for start in range(0, out, step):
        piece = flat.rows(start, min(start + step, out))
        row_sums[start : start + step] = np.square(piece, out=piece).reshape(piece.shape[0], -1).sum(axis=1)
    column_sums = np.empty(inputs)
    step = max(1, _NORM_PIECE // max(flat.size // inputs, 1))
    for start in range(0, inputs, step):
        stop = min(start + step, inputs)
        moved = flat.columns(start, stop)
        column_sums[start:stop] = np.square(moved, out=moved).sum(axis=1)
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
