"""The element-wise check of one compared tensor, and the statistics that say whether it proves anything.

An element fails only where ``|a - b| > atol`` and ``|a - b| > rtol * |b|`` (``b`` from the
reference), the way Polygraphy compares; matching NaN/Inf count as equal; integer, boolean and
string elements must be identical. Over all iterations the accumulator also keeps what the
evidence check needs: whether the reference held non-finite values, its largest magnitude, its
spread, and whether every value sat on a squashing op's bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from onnxlady._verify._report import OutputComparison

#: An output whose reference values all lie below this magnitude (or 10 x atol) proves nothing.
DEGENERATE_THRESHOLD: float = 1e-6
#: Denominator floor for relative errors, so that a zero reference value gives a large but finite error.
_TINY: float = float(np.finfo(np.float32).tiny)


def within_tolerance(diff: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """Where a difference passes the element check: within atol, or within rtol of the reference."""
    return (diff <= atol) | (diff <= rtol * np.abs(reference))


class Accumulator:
    """Running statistics of one compared tensor over all iterations.

    Args:
        name: The tensor's name in the reference model.
        kind: ``"output"``, ``"added"`` or ``"squash-input"`` (see :class:`OutputComparison`).
        op: The squashing op that makes this output, or whose input this is.
        stands_for: For a squash input, the graph output it stands for.
        bounds: The squashing op's bounds, for an output it makes: values within tolerance of
            them are saturated.
    """

    def __init__(
        self,
        name: str,
        *,
        kind: str = "output",
        op: str | None = None,
        stands_for: str | None = None,
        bounds: Sequence[float] = (),
    ) -> None:
        self.name, self.kind, self.op, self.stands_for = name, kind, op, stands_for
        self.bounds = tuple(bounds)
        self.shape: tuple[int, ...] | None = None
        self.dtype = ""
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.sum_abs = 0.0
        self.finite_pairs = 0
        self.ref_max_abs = 0.0
        self.ref_min = math.inf
        self.ref_max = -math.inf
        self.ref_nonfinite = False
        self.saturated = bool(self.bounds)
        self.mismatched = 0
        self.total = 0
        self.atol = 0.0  # the last comparison's: what "vanishing" reference outputs are measured by
        self.rtol = 0.0

    def add(self, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> None:
        """Compare candidate ``a`` with reference ``b`` and fold the result in."""
        self.atol, self.rtol = atol, rtol
        if self.shape is None:
            self.shape, self.dtype = tuple(int(d) for d in b.shape), str(b.dtype)
        self.total += int(b.size)
        if b.size == 0:
            return
        if b.dtype.kind in "OUS":  # strings: exact match, no numeric error
            self.mismatched += int(np.count_nonzero(a != b))
            return

        exact = b.dtype.kind in "biu"
        a64 = a.astype(np.float64)
        b64 = b.astype(np.float64)
        finite_b = np.isfinite(b64)
        both_finite = np.isfinite(a64) & finite_b
        if not finite_b.all():
            self.ref_nonfinite = True
        if finite_b.any():
            finite_values = b64[finite_b]
            self.ref_max_abs = max(self.ref_max_abs, float(np.max(np.abs(finite_values))))
            self.ref_min = min(self.ref_min, float(finite_values.min()))
            self.ref_max = max(self.ref_max, float(finite_values.max()))
            if self.saturated:
                near = np.zeros(finite_values.shape, dtype=bool)
                for bound in self.bounds:
                    near |= within_tolerance(np.abs(finite_values - bound), finite_values, atol, rtol)
                self.saturated = bool(near.all())

        # Non-finite values: equal only when the same non-finite value sits at the same place.
        either_nonfinite = ~both_finite
        same_nonfinite = either_nonfinite & ((np.isnan(a64) & np.isnan(b64)) | (a64 == b64))
        nonfinite_mismatch = int(np.count_nonzero(either_nonfinite & ~same_nonfinite))

        diff = np.abs(a64[both_finite] - b64[both_finite])
        if exact:
            failed = int(np.count_nonzero(a != b))
        else:
            failed = int(np.count_nonzero(~within_tolerance(diff, b64[both_finite], atol, rtol))) + nonfinite_mismatch
        self.mismatched += failed
        if diff.size:
            # A boolean's relative error says nothing (a flipped False reads 1 / tiny).
            rel = diff / np.maximum(np.abs(b64[both_finite]), _TINY) if b.dtype.kind != "b" else diff
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float(rel.max()))
            self.sum_abs += float(diff.sum())
            self.finite_pairs += int(diff.size)
        if nonfinite_mismatch:
            self.max_abs = self.max_rel = math.inf

    def _vanishing(self) -> float:
        return max(DEGENERATE_THRESHOLD, 10.0 * self.atol)

    def hollow(self) -> str | None:
        """Why agreement on this tensor proves nothing, or None when it carries evidence."""
        if self.total == 0:
            return "empty output (no elements to compare)"
        if self.ref_nonfinite:
            return "non-finite values (NaN or Inf) in the reference output"
        kind = np.dtype(self.dtype).kind if self.dtype else "O"
        if kind in "OUS":
            return None
        if self.ref_max_abs < self._vanishing():
            # Within a few atol of zero, any candidate near zero passes: the check cannot fail.
            return f"all reference values below {self._vanishing():g} in magnitude (10 x atol)"
        spread = self.ref_max - self.ref_min
        exact = kind in "biu"
        if (self.total > 1 or exact) and (spread == 0 or (not exact and spread <= max(self.atol, self.rtol * self.ref_max_abs))):
            # One value for every element: a candidate that mixes the elements up still passes.
            if spread == 0 and self.total == 1:
                return f"a single value ({self.ref_min:g}): one agreeing element proves next to nothing"
            if spread == 0:
                return f"constant: every reference value is {self.ref_min:g}"
            return (
                f"constant: every reference value lies within the tolerance of {self.ref_min:g} (spread {spread:.3g})"
            )
        if self.saturated:
            bounds = " and ".join(f"{b:g}" for b in self.bounds)
            return f"saturated: every reference value lies within the tolerance of the {self.op}'s bounds ({bounds})"
        return None

    def result(self) -> OutputComparison:
        """The comparison over all iterations so far."""
        return OutputComparison(
            name=self.name,
            shape=self.shape or (),
            dtype=self.dtype,
            max_abs_error=self.max_abs,
            max_rel_error=self.max_rel,
            mean_abs_error=self.sum_abs / self.finite_pairs if self.finite_pairs else 0.0,
            reference_max_abs=self.ref_max_abs,
            mismatched_elements=self.mismatched,
            total_elements=self.total,
            passed=self.mismatched == 0,
            degenerate=self.hollow(),
            kind=self.kind,
            op=self.op,
            stands_for=self.stands_for,
        )
