"""``onnxlady.match``: pair the groups of two models whose graphs differ because a converter ran on one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxlady._analysis._channels import analyze
from onnxlady._api._results import Result
from onnxlady._api._sources import ModelSource, jsonable, open_model, path_text
from onnxlady._resync._match import (
    MATCH_THRESHOLD,
    ConversionFinding,
    GroupPair,
    ModelMatch,
    UnmatchedGroup,
    check_same_model,
    match_analyses,
)


@dataclass
class MatchResult(Result):
    """The outcome of :func:`match`: which reference group holds the same neurons as which suspect group.

    Attributes:
        details: the full pairing (paired sites, both analyses, units).
        reference: the reference's path; ``None`` for a model given in memory.
        suspect: the suspect's path; ``None`` for a model given in memory.
    """

    details: ModelMatch = field(repr=False)
    reference: Path | None = None
    suspect: Path | None = None

    @property
    def complete(self) -> bool:
        """Every permutable group of either model has its counterpart and the structures agree."""
        return self.details.complete

    @property
    def groups(self) -> list[GroupPair]:
        """The paired groups."""
        return self.details.groups

    @property
    def unmatched(self) -> list[UnmatchedGroup]:
        """Groups with no counterpart, and why."""
        return self.details.unmatched

    @property
    def conversions(self) -> list[ConversionFinding]:
        """What a converter did, on which side (float16, folded BatchNorm, QDQ, renames...)."""
        return self.details.conversions

    @property
    def divergences(self) -> list[str]:
        """Where the two structures differ beyond a conversion."""
        return self.details.divergences

    @property
    def confidence(self) -> float:
        """How much of the two models pairs, 0 to 1.

        The smallest of the shares of weights, of weight-reading operators and of layer-to-layer
        connections paired (at least ``MATCH_THRESHOLD``, 0.9, or :func:`match` refuses them as
        different models).
        """
        return self.details.confidence

    @property
    def exit_code(self) -> int:
        """0 when the pairing is complete, 1 when it is not (different models raise instead)."""
        return 0 if self.details.complete else 1

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady match --json`` prints."""
        return jsonable(
            {"reference": path_text(self.reference), "suspect": path_text(self.suspect), **self.details.to_dict()}
        )

    def to_text(self) -> str:
        """What ``onnxlady match`` prints: sites paired, one row per group pair, what stayed apart."""
        result = self.details
        reference = self.reference if self.reference is not None else "reference"
        suspect = self.suspect if self.suspect is not None else "suspect"
        paired = sum(pair.permutable for pair in result.groups)
        lines = [
            (
                f"{reference} <-> {suspect}: {len(result.sites)} of {result.site_counts[0]} reference sites "
                f"and {result.site_counts[1]} suspect sites paired; {paired} permutable groups paired; "
                f"confidence {100 * result.confidence:.1f} % (threshold {100 * MATCH_THRESHOLD:.0f} %)"
            )
        ]
        lines.append(f"{'reference':>10} {'suspect':>8} {'size':>6}  permutable  paired by   margin  distance")
        for pair in result.groups:
            margin = "" if pair.margin is None else f"{pair.margin:.3f}"
            gap = "" if pair.distance is None else f"{pair.distance:.2e}"
            lines.append(
                f"{pair.reference:>10} {pair.suspect:>8} {pair.size:>6}  {'yes' if pair.permutable else 'no':>10}"
                f"  {pair.method:<9} {margin:>7} {gap:>9}"
            )
        for item in result.unmatched:
            lines.append(f"unmatched {item.model} group {item.group} ({item.size}): {item.reason}")
        for where in result.divergences:
            lines.append(f"structures diverge {where}")
        for finding in result.conversions:
            lines.append(f"conversion ({finding.kind}) in the {finding.model}: {finding.detail}")
        if result.complete:
            lines.append("every permutable group has its counterpart")
        return "\n".join(lines)


def match(
    reference: ModelSource,
    suspect: ModelSource,
    *,
    progress: Callable[[str], None] | None = None,
) -> MatchResult:
    """Pair the channel groups of two models, across the differences a converter makes.

    Weights are paired by what they compute, never by name or operator: float16/bfloat16
    weights, BatchNorm folded into the conv, a simplifier's renames and removed nodes, QDQ int8,
    int4 ``MatMulNBits``, opset upgrades and ONNX Runtime's fusions (Gemm, FusedConv, FusedMatMul,
    SkipLayerNormalization, Attention...) are recognised and reported; where the structure does
    not say which weight is which, their permutation-invariant content does (each group says
    how it was paired, and with what margin). :func:`resync` and :func:`audit` use this pairing
    for converted suspects, with the same refusal of different models. Neither model is modified.

    Args:
        reference: a path to an ONNX file or an ``onnx.ModelProto``.
        suspect: the other model.
        progress: called before the models are analysed.

    Returns:
        The pairing; :attr:`MatchResult.complete` says whether every permutable group found its
        counterpart, :attr:`MatchResult.confidence` how much of the two models pairs.

    Raises:
        OnnxladyError: a model cannot be read, or the two are different models (their
            confidence is below ``MATCH_THRESHOLD``; the message names the first divergence).
    """
    # (No sha256 of either input is recorded: their files are not read once more to be hashed.)
    opened_reference = open_model(reference, "reference", progress, digest=False)
    opened_suspect = open_model(suspect, "suspect", progress, digest=False)
    if progress is not None:
        progress("match: analysing both models")
    details = match_analyses(analyze(opened_reference.model), analyze(opened_suspect.model))
    check_same_model(details)
    return MatchResult(details, opened_reference.path, opened_suspect.path)
