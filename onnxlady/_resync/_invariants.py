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

import numpy as np

__all__ = ["QUANTILES", "distance", "signature"]

#: Points of the quantile function kept per tensor (the sorted values, resampled).
QUANTILES = 33

#: Below this many values, ``np.partition`` selects the ranks faster than bucketing them.
_BUCKETED_FROM = 1 << 16

#: Buckets of :func:`_order_statistics`: the top bits of each value's order-preserving key.
_BUCKET_BITS = 20

#: The 63 magnitude bits of a float64 seen as an int64: flipping them for negative values makes
#: the integers sort as the floats do.
_MAGNITUDE_BITS = np.int64(0x7FFFFFFFFFFFFFFF)

#: Buckets at either end that hold only infinities and NaNs (whose exponent bits are all ones).
_NOT_FINITE_BUCKETS = 1 << (_BUCKET_BITS - 12)


def _order_keys(bits: np.ndarray) -> np.ndarray:
    """Int64 keys ordered as the float64 whose bits are ``bits`` (``-0.0`` just before ``0.0``).

    The map is its own inverse.
    """
    return bits ^ ((bits >> 63) & _MAGNITUDE_BITS)


def _order_statistics(flat: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The values of the given ranks in ``flat`` sorted (what ``np.partition(flat, ranks)[ranks]`` gives).

    ``np.partition`` costs about a pass per rank asked for. Here one pass counts the values in
    buckets (the top bits of an order-preserving integer key); only the few buckets holding an
    asked rank are then sorted. The statistics are the same values (a zero may come back as
    ``-0.0`` where partition gave ``0.0``, or the reverse: they compare equal, and only norms and
    differences of them are used). Values with NaN or infinities, few values, or values crowded
    into a few buckets are partitioned as before.

    Args:
        flat: a 1-D array.
        ranks: ascending ranks in ``0..flat.size - 1``.

    Returns:
        The order statistics, in ``flat``'s dtype.
    """
    if flat.size < _BUCKETED_FROM or flat.dtype != np.float64:
        return np.partition(flat, ranks)[ranks]
    bits = np.ascontiguousarray(flat).view(np.int64)
    # The keys' top bits, made in place on one new array: a negative value's magnitude bits
    # flipped, as _order_keys flips them, then shifted to count from 0.
    buckets = bits >> (64 - _BUCKET_BITS)
    np.bitwise_xor(buckets, (1 << (_BUCKET_BITS - 1)) - 1, out=buckets, where=buckets < 0)
    buckets += 1 << (_BUCKET_BITS - 1)
    counts = np.bincount(buckets, minlength=1 << _BUCKET_BITS)
    if counts[:_NOT_FINITE_BUCKETS].any() or counts[-_NOT_FINITE_BUCKETS:].any():
        return np.partition(flat, ranks)[ranks]
    ends = np.cumsum(counts)
    holding = np.searchsorted(ends, ranks, side="right")  # the bucket of each rank
    wanted = np.unique(holding)
    if counts[wanted].sum() > flat.size // 8:  # crowded (a narrow range): sorting them would not pay
        return np.partition(flat, ranks)[ranks]
    chosen = np.zeros(counts.size, dtype=bool)
    chosen[wanted] = True
    inside = np.sort(_order_keys(bits[chosen[buckets]]))  # the wanted buckets' values, in order
    # Where each wanted bucket starts in ``inside``, and each rank's place in its bucket.
    starts = np.cumsum(counts[wanted]) - counts[wanted]
    place = starts[np.searchsorted(wanted, holding)] + (ranks - (ends[holding] - counts[holding]))
    return _order_keys(inside[place]).view(np.float64)


def _resampled(values: np.ndarray, points: int = QUANTILES) -> np.ndarray:
    """The sorted values at ``points`` evenly spaced ranks (interpolated), whatever their count.

    Only the order statistics on either side of each rank are selected, not the whole array
    sorted; the interpolation is ``np.interp``'s over the ranks ``0..n-1``, term for term, so the
    result is the same to the bit.
    """
    flat = values.ravel()
    if flat.size <= points:
        return np.sort(flat)
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
    flat = np.asarray(value, dtype=np.float64)
    if flat.size == 0:
        return []
    if flat.size > 1 << 22:  # quantiles of a huge tensor cost a full sort: a selection suffices
        ranks = np.linspace(0, flat.size - 1, QUANTILES).astype(np.int64)
        values = _order_statistics(flat.ravel(), ranks)
    else:
        values = _resampled(flat)
    parts = [values]
    if flat.ndim >= 2 and flat.shape[0] > 1:
        squares = flat * flat
        rows = np.sqrt(squares.reshape(flat.shape[0], -1).sum(axis=1))
        columns = np.sqrt(np.moveaxis(squares, 1, 0).reshape(flat.shape[1], -1).sum(axis=1))
        parts += [np.sort(rows), np.sort(columns)]
    return parts


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
