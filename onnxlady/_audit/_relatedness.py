"""Whether a suspect's weights are related to the reference's at all, after resync.

Structure alone pairs any two models of the same layer widths (an independently trained copy,
another encoder of equal sizes): the match's confidence is 100 % for DistilBERT against CLIP's
text encoder. Only the weights' content tells a derivative from an unrelated model, and only after
resync has put the neurons side by side: a derivative's neurons keep one clearly best match after
any change resync can undo, an unrelated model's matches are near ties. The audit asks this before
naming a change (an unrelated model is no "modified" copy); resync does not (it orders any pairable
suspect, the paper's Table 1 measures it under noise up to Omega 10).
"""

from __future__ import annotations

from onnxlady._errors import OnnxladyError
from onnxlady._resync._solver import ResyncResult

__all__ = ["UNRELATED_AMBIGUOUS", "UNRELATED_SIMILARITY", "check_related"]

#: At or above this share of ambiguous neurons (no match clearly better than the next, see
#: :data:`~onnxlady._resync._solver.AMBIGUITY_MARGIN`) after resync, the suspect's weights are
#: unrelated to the reference's. Measured 2026-12-05 (docs/cli.md, audit): permuted copies with
#: Gaussian noise up to Omega 2 (Psi 100) 0 to 30 %; independently initialised copies of five
#: fixtures 88 to 100 %; DistilBERT against CLIP's text encoder, structurally alike, 100 %;
#: noise Omega 4, which resync cannot undo any more (Psi 5 to 22 %), 96 to 99 %.
UNRELATED_AMBIGUOUS = 0.75
#: ...and below this size-weighted mean cosine similarity of the paired neurons: pruning keeps
#: the surviving weights' neurons near their originals (99 % pruned: 0.48 and above) while it
#: makes the all-zero ones ties; unrelated copies measured 0.07 to 0.30, noise Omega 2 0.29 to
#: 0.37 with few ambiguous neurons.
UNRELATED_SIMILARITY = 0.35
#: Fewer paired neurons than this say too little to call two models unrelated.
_LEAST_NEURONS = 16


def check_related(result: ResyncResult) -> None:
    """Refuse a resync whose paired neurons are unrelated: another model of the same shape, not a derivative.

    An unrelated model (or one changed beyond what resync can undo) has almost every match a
    near tie and a low similarity; see the module docstring.

    Raises:
        OnnxladyError: "different models", with what was measured.
    """
    groups = [group for group in result.groups if group.mean_similarity is not None and group.size > 1]
    neurons = sum(group.size for group in groups)
    if neurons < _LEAST_NEURONS:
        return
    ambiguous = sum(group.ambiguous for group in groups) / neurons
    similarity = sum(group.size * float(group.mean_similarity) for group in groups) / neurons
    if ambiguous >= UNRELATED_AMBIGUOUS and similarity < UNRELATED_SIMILARITY:
        raise OnnxladyError(
            f"different models: the structures pair, but the weights do not: after resync {ambiguous:.0%} of "
            f"{neurons} paired neurons have no clearly best match (mean cosine similarity {similarity:.3f}); "
            "an unrelated model of the same structure, or one changed beyond what resync can undo"
        )
