"""Per-neuron figures of whole blocks of rows at once, equal to the per-row computations.

The scale analysis and the searches for scaled and rescaled neurons read every neuron's row
(cosine, norm ratio, least-squares scale and its residual). One row at a time, that was a few
numpy calls per neuron (gathers, conversions, dot products): the scale analysis's share of an
audit, most of it call overhead. Here the rows of a block of neurons form one matrix and each
dot product is still BLAS's dot of one row with another (``np.matmul`` of a 1 x n by an n x 1
matrix calls the same ``ddot`` that ``np.dot`` of two vectors does), so every figure is the
value the per-row code computed, bit for bit; the arithmetic around them is the same IEEE
operations elementwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["FittedRows", "cos_ratio_of", "least_squares_blocks", "least_squares_rows", "row_dots"]

#: The residuals of at most this many values are held at once (float64: 256 KiB, in cache).
_RESIDUAL_VALUES = 1 << 15


def row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[float(np.dot(a[j], b[j])) for j in ...]`` of two float64 matrices of the same shape, as an array."""
    if not a.shape[0]:
        return np.zeros(0)
    return np.matmul(a[:, None, :], b[:, :, None])[:, 0, 0]


def cos_ratio_of(norm_r: float, norm_s: float, dot: float) -> tuple[float, float, float]:
    """Cosine, norm ratio ``|s|/|r|`` and least-squares scale ``<r,s>/<r,r>`` from two norms and a dot product."""
    if not norm_r and not norm_s:  # exact zeros: the divisions below need them excluded
        return 1.0, 1.0, 1.0
    if not norm_r or not norm_s:
        return 0.0, (norm_s / norm_r if norm_r else float("inf")), 0.0
    return dot / (norm_r * norm_s), norm_s / norm_r, dot / (norm_r * norm_r)


def least_squares_rows(r: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the least-squares scale ``k`` of ``s`` against ``r``, ``|r|``, the residual std, and which rows have them.

    For row ``j`` with ``<r,r> != 0`` and at least two columns: ``k = <r,s> / <r,r>``,
    ``|r| = sqrt(<r,r>)``, residual ``sqrt(<e,e> / (width - 1))`` with ``e = s - k r``, as the
    per-row code computed them; other rows are left out (``usable`` False, figures 0).

    Args:
        r: the reference's rows, a C-contiguous float64 matrix.
        s: the suspect's rows, the same shape.

    Returns:
        ``(k, norms, residuals, usable)``, one entry per row.
    """
    count, width = r.shape
    norm2 = row_dots(r, r)
    usable = (norm2 != 0) & (width >= 2)
    ks, norms, resid = np.zeros(count), np.zeros(count), np.zeros(count)
    if not np.any(usable):
        return ks, norms, resid, usable
    error = np.zeros(count)
    # The residuals a few rows at a time, in one small buffer (in cache, allocated once).
    step = max(1, _RESIDUAL_VALUES // max(1, width))
    buffer = np.empty((min(step, count), width))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        k = row_dots(r, s) / norm2
        for start in range(0, count, step):
            part = slice(start, start + step)
            residual = buffer[: min(step, count - start)]
            np.multiply(k[part, None], r[part], out=residual)  # s - k r, as the per-row code computed it
            np.subtract(s[part], residual, out=residual)
            error[part] = row_dots(residual, residual) / (width - 1)
    ks[usable] = k[usable]
    norms[usable] = np.sqrt(norm2[usable])
    resid[usable] = np.sqrt(error[usable])
    return ks, norms, resid, usable


@dataclass(frozen=True)
class FittedRows:
    """Rows fitted already: :func:`least_squares_rows`'s figures, one entry per row (``len``: the rows)."""

    k: np.ndarray
    norms: np.ndarray
    residuals: np.ndarray
    usable: np.ndarray

    def __len__(self) -> int:
        return int(self.k.size)


def least_squares_blocks(r_blocks: Iterable[np.ndarray], s_blocks: Iterable[np.ndarray]) -> FittedRows:
    """:func:`least_squares_rows` of rows given a block at a time, joined (each row's figures depend on it alone)."""
    parts = [least_squares_rows(r, s) for r, s in zip(r_blocks, s_blocks)]
    k, norms, resid, usable = (np.concatenate([part[i] for part in parts]) for i in range(4))
    return FittedRows(k, norms, resid, usable)
