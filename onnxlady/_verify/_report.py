"""The report types of verify: one comparison per compared tensor, one record per fed input, the verdict."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OutputComparison:
    """How one tensor of the candidate model compares with the same tensor of the reference.

    Errors are aggregated over all iterations: maxima are maxima over every compared element,
    counts are summed, and ``mean_abs_error`` is the mean over every finite element pair.
    ``passed`` says whether no element failed; ``degenerate``, when set, says why this tensor's
    agreement proves nothing (non-finite, vanishing, constant or saturated values), so a passed
    comparison with it set is no evidence of equivalence.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    #: Largest finite ``|b|`` in the reference output, to judge the scale of the errors.
    reference_max_abs: float
    mismatched_elements: int
    total_elements: int
    passed: bool
    degenerate: str | None
    #: ``"output"`` (a graph output), ``"added"`` (asked for by name) or ``"squash-input"`` (the
    #: input of a squashing op that makes a graph output, compared automatically).
    kind: str = "output"
    #: The squashing op (``Sigmoid``) that makes this graph output, or whose input this is.
    op: str | None = None
    #: For a ``"squash-input"``: the graph output it stands for.
    stands_for: str | None = None
    #: For a tensor with failed elements: how far the reference alone moves on it when only its
    #: rounding changes (see :mod:`onnxlady._verify._noise_floor`); None when not measured.
    reference_noise: float | None = None

    @property
    def within_rounding(self) -> bool:
        """Whether its failed elements are all within the reference's own rounding noise."""
        return not self.passed and self.reference_noise is not None and self.max_abs_error <= self.reference_noise

    @property
    def carries_evidence(self) -> bool:
        """Whether this tensor passed and its agreement means something."""
        return self.passed and self.degenerate is None


@dataclass(frozen=True)
class InputRecord:
    """How verify fed one input: for the report, and for a README table of what was drawn.

    ``rule`` is one of ``value-range``, ``mask-ones``, ``segment-zeros``, ``embedding-index``,
    ``integers``, ``coin``, ``uniform`` (drawn by verify), or ``loaded`` / ``script`` (given by
    the user). ``low``/``high`` are the drawing bounds (integers inclusive, floats uniform in
    ``[low, high)``), or for given inputs the smallest and largest value seen.
    """

    name: str
    #: The shape of the first feed (given inputs may vary: see ``shapes_vary``).
    shape: tuple[int, ...]
    dtype: str
    rule: str
    low: float | None
    high: float | None
    #: Why the rule applies (``indices of a Gather on 'E' (10 rows)``, ``its name contains 'mask'``).
    detail: str
    #: How each dynamic dimension got its size (``dim 1 (sequence) = 16: shared with input 'ids'``).
    shape_notes: tuple[str, ...] = ()
    shapes_vary: bool = False


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of verify: settings used, one comparison per compared tensor, and the verdict."""

    #: What the caller asked for: ``"auto"``, ``"cuda"`` or ``"cpu"``.
    provider_requested: str
    #: The execution provider that actually ran both models, e.g. ``"CPUExecutionProvider"``.
    provider_used: str
    #: Why ``"auto"`` fell back to the CPU, when it did; ``None`` otherwise.
    fallback_reason: str | None
    atol: float
    rtol: float
    #: Number of feeds both models ran on (generated iterations, or the feeds the user gave).
    iterations: int
    seed: int
    #: The concrete shape fed to each graph input (the first feed's).
    input_shapes: dict[str, tuple[int, ...]]
    #: One entry per graph output, in the models' output order, then one per added tensor.
    outputs: tuple[OutputComparison, ...]
    #: ``"equivalent"``, ``"inconclusive"`` or ``"not-equivalent"``.
    verdict: str
    #: Why the verdict is not ``equivalent``: one line per failing or hollow tensor.
    reasons: tuple[str, ...] = ()
    #: Inputs of squashing ops making graph outputs, compared automatically.
    squash_inputs: tuple[OutputComparison, ...] = ()
    #: How each input was fed, in graph order.
    inputs: tuple[InputRecord, ...] = ()
    #: Remarks that change no verdict (an output judged on its squashing op's input, say).
    notes: tuple[str, ...] = ()

    @property
    def equivalent(self) -> bool:
        """True only for the ``equivalent`` verdict: every element passed and every comparison carries evidence."""
        return self.verdict == "equivalent"

    @property
    def reason(self) -> str | None:
        """The reasons as one line, None for an ``equivalent`` verdict."""
        return "; ".join(self.reasons) if self.reasons else None

    @property
    def degenerate_outputs(self) -> tuple[OutputComparison, ...]:
        """Compared tensors whose agreement proves nothing (see :attr:`OutputComparison.degenerate`)."""
        return tuple(o for o in self.outputs + self.squash_inputs if o.degenerate is not None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (for ``--json``); non-finite floats become ``"inf"``/``"nan"`` strings.

        Strict JSON has no infinities or NaNs, so they are written as strings to keep the output
        parseable by any JSON reader.
        """
        data = jsonable(dataclasses.asdict(self))
        data["equivalent"] = self.equivalent
        data["reason"] = self.reason
        return data


def jsonable(value: Any) -> Any:
    """Turn tuples into lists and non-finite floats into strings, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return value
