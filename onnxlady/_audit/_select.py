"""Exact medians of large arrays without partitioning all of them.

``np.median`` partitions a copy of the whole array (introselect: several passes of swaps over
every element); the forensics takes two medians per weight tensor (the change's median and its
median absolute deviation), the largest cost of an audit's forensics before this module. Here
a sorted strided sample of the array brackets the wanted order statistics, two comparisons
count the elements below and within the bracket, and only the elements within it (a few
percent) are partitioned. The values are exactly those ``np.partition`` puts at the wanted
ranks, so :func:`median` returns what ``np.median`` returns, bit for bit; where the bracket
misses (a sample unlike the whole) or a value is NaN, the full partition is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["median", "median_deviation", "order_statistics"]

#: Below this many elements the plain partition is as fast.
_SMALL = 1 << 15
#: About this many elements are sampled (every ``size // _SAMPLE``-th).
_SAMPLE = 1 << 14
#: The bracket reaches this many standard deviations of a sample rank beyond the wanted rank.
_MARGIN = 6.0
#: Elements per chunk of :func:`_bracketed` (1 MiB of float64; its two masks, 256 KiB).
_CHUNK = 1 << 17


#: What :func:`order_statistics` reads in place of the values themselves: ``(values, out)`` writes
#: an elementwise function of ``values`` into ``out`` (an array of their size) and returns ``out``.
Transform = Callable[[np.ndarray, np.ndarray], np.ndarray]


def order_statistics(values: np.ndarray, ranks: list[int], transform: Transform | None = None) -> list[np.float64]:
    """``np.partition(values, ranks)[ranks]`` of a flat float array without NaNs (``values`` is not changed).

    Args:
        values: a 1-D float array with no NaN.
        ranks: 0-based ranks, each below ``values.size``.
        transform: where given, the order statistics are those of ``transform(values)``
            (float64, no NaN), computed a chunk at a time as they are read: the transformed
            array is never held whole (but where the bracket misses).

    Returns:
        The values at those ranks in sorted order, in the order of ``ranks``.
    """
    size = values.size
    if size >= _SMALL:
        step = size // _SAMPLE
        picked = values[::step]
        sample = np.sort(picked if transform is None else transform(picked, np.empty(picked.size)))
        count = sample.size
        spread = _MARGIN * 0.5 * math.sqrt(count)  # a sample rank's std is at most sqrt(count) / 2
        low_index = math.floor(min(ranks) / size * count - spread)
        high_index = math.ceil((max(ranks) + 1) / size * count + spread)
        low = sample[min(max(low_index, 0), count - 1)]
        high = sample[min(max(high_index, 0), count - 1)]
        below, up_to, inside = _bracketed(values, low, high, transform)
        if below <= min(ranks) and max(ranks) < up_to:
            shifted = [rank - below for rank in ranks]
            inside.partition(shifted)
            return [inside[rank] for rank in shifted]
    if transform is not None:
        values = transform(values, np.empty(size))
    part = np.partition(values, ranks)
    return [part[rank] for rank in ranks]


def _bracketed(
    values: np.ndarray, low: np.float64, high: np.float64, transform: Transform | None = None
) -> tuple[int, int, np.ndarray]:
    """How many of ``values`` are below ``low``, how many up to ``high``, and those within, in order.

    A chunk at a time (:data:`_CHUNK` elements): the masks of ``value < low`` and ``value <= high``
    stay in the cache, where masks the size of the array cost four passes over memory (and
    their bytes). The elements within ``[low, high]`` are those ``values[(low <= values) &
    (values <= high)]`` gives, in the same order (``low <= high``). With ``transform``, of
    ``transform(values)``, each chunk transformed into a buffer of the chunk's size.
    """
    size = values.size
    lower = np.empty(min(_CHUNK, size), dtype=bool)
    within = np.empty_like(lower)
    work = np.empty(min(_CHUNK, size)) if transform is not None else None
    below = up_to = 0
    pieces = []
    for start in range(0, size, _CHUNK):
        chunk = values[start : start + _CHUNK]
        if work is not None and transform is not None:
            chunk = transform(chunk, work[: chunk.size])
        low_mask, high_mask = lower[: chunk.size], within[: chunk.size]
        np.less(chunk, low, out=low_mask)
        below += int(np.count_nonzero(low_mask))
        np.less_equal(chunk, high, out=high_mask)
        up_to += int(np.count_nonzero(high_mask))
        np.logical_xor(high_mask, low_mask, out=high_mask)  # low <= value <= high
        # (np.compress reads the mask faster than boolean indexing: the same elements, in order)
        pieces.append(np.compress(high_mask, chunk))
    return below, up_to, np.concatenate(pieces)


def median_deviation(values: np.ndarray, center: float) -> np.float64:
    """``median(np.abs(values - center))`` of a flat float64 array of finite values, ``center`` finite.

    The deviations are computed a chunk at a time as the selection reads them (see
    :func:`order_statistics`): the same values, hence the same median, without writing the
    array of deviations and reading it back (the median absolute deviation of every weight's
    change in the forensics). The deviations of finite values are never NaN, so the median
    is always the one :func:`median` selects.
    """
    size = values.size
    if not size or values.dtype != np.float64:
        return median(np.abs(np.subtract(values, center)))

    def deviation(chunk: np.ndarray, out: np.ndarray) -> np.ndarray:
        return np.abs(np.subtract(chunk, center, out=out), out=out)

    middle = [size // 2 - 1, size // 2] if size % 2 == 0 else [(size - 1) // 2]
    return np.float64(np.mean(np.array(order_statistics(values, middle, deviation), dtype=np.float64)))


def median(values: np.ndarray | Sequence[float]) -> np.float64:
    """``np.median(values)`` of a float64 array, computed as :func:`order_statistics` (``values`` is not changed).

    Also for the small arrays and lists of the per-tensor figures: ``np.median`` imports
    ``numpy.ma`` the first time it runs (tens of milliseconds, a tenth of a small model's audit).
    """
    flat = np.asarray(values).reshape(-1)
    size = flat.size
    with np.errstate(invalid="ignore", over="ignore"):
        unordered = bool(size) and bool(np.isnan(np.sum(flat)))
    if not size or flat.dtype != np.float64 or unordered:  # NaN (or +inf and -inf): numpy's own
        return np.float64(np.median(flat))
    middle = [size // 2 - 1, size // 2] if size % 2 == 0 else [(size - 1) // 2]
    # np.median returns the mean of the middle one or two values: the same mean here.
    return np.float64(np.mean(np.array(order_statistics(flat, middle), dtype=np.float64)))
