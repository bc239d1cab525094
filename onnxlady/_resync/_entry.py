"""The resync entry point: twin suspects are solved directly, converted ones through matching."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._errors import OnnxladyError
from onnxlady._resync._across import resync_across
from onnxlady._resync._match import analyze_with_state
from onnxlady._resync._solver import METHODS, ResyncOptions, ResyncResult, say
from onnxlady._resync._twin import NotATwin, resync_twin, twin_leaves
from onnxlady._transforms._key import PermutationKey

__all__ = ["UNRELATED_AMBIGUOUS", "UNRELATED_SIMILARITY", "check_related", "resync_model"]


def resync_model(
    reference: onnx.ModelProto,
    suspect: onnx.ModelProto,
    *,
    method: str = "hungarian",
    refine: bool = False,
    true_key: PermutationKey | None = None,
    progress: Callable[[str], None] | None = None,
    analysis: ChannelAnalysis | None = None,
) -> ResyncResult:
    """Re-order the suspect's neurons into the reference's order.

    A suspect that is a node-for-node copy of the reference (a *twin*) is solved on its
    tensors as stored; any other is paired with the reference by :mod:`onnxlady._resync._match`
    and solved in a common form (see :mod:`onnxlady._resync._across`). Neither model is modified.

    Args:
        reference: the model whose neuron order is wanted.
        suspect: a permuted (and possibly perturbed or converted) copy of it.
        method: ``"hungarian"`` (best bijection) or ``"argmax"`` (the paper's rule, conflicts
            repaired greedily).
        refine: after the first pass, re-solve every group with all its slices aligned until
            no group changes.
        true_key: the key that made the suspect from the reference, to measure Psi.
        progress: called with one line per step.
        analysis: the reference's analysis when the caller already has it (it is then not
            computed again).

    Returns:
        The re-ordered suspect, the key that re-orders it and per-group statistics.

    Raises:
        OnnxladyError: the architectures differ, a compared weight holds NaN or Inf, or the
            true key does not fit the reference.
    """
    if method not in METHODS:
        raise OnnxladyError(f"unknown resync method {method!r}: choose one of {', '.join(METHODS)}")
    options = ResyncOptions(method=method, refine=refine)
    if analysis is None:
        say(progress, "resync: analysing the reference")
        # analyze() does not modify its model, so the reference is analysed as it is (a decoder's
        # KV caches as permutable state: a suspect permuted with them is solved whole).
        analysis = analyze_with_state(reference, true_key)
    say(progress, "resync: matching the suspect's tensors to the reference's")
    try:
        leaves = twin_leaves(analysis, suspect)
    except NotATwin:
        result = resync_across(reference, suspect, options, true_key, progress, ref_analysis=analysis)[0]
    else:
        result = resync_twin(reference, suspect, analysis, leaves, options, true_key, progress)
    return result


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

    Structure alone pairs any two models of the same layer widths (an independently trained
    copy, another encoder of equal sizes); only the weights' content tells a derivative, whose
    neurons each keep one clearly best match after any change resync can undo, from an unrelated
    model (or one changed beyond recognition), where almost every match is a near tie.

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
