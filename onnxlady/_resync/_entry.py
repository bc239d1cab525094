"""The resync entry point: twin suspects are solved directly, converted ones through matching."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._errors import OnnxladyError
from onnxlady._resync._solver import METHODS, ResyncOptions, ResyncResult, say
from onnxlady._resync._state_analysis import analyze_with_state
from onnxlady._resync._twin import NotATwin, resync_twin, twin_leaves
from onnxlady._transforms._key import PermutationKey

__all__ = ["resync_model"]


def resync_model(
    reference: onnx.ModelProto,
    suspect: onnx.ModelProto,
    *,
    method: str = "hungarian",
    refine: bool = False,
    true_key: PermutationKey | None = None,
    progress: Callable[[str], None] | None = None,
    analysis: ChannelAnalysis | None = None,
    constants: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
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
        constants: the reference's and the suspect's constants when the caller has read them
            (:func:`~onnxlady._io._tensors.read_constants`): a twin's are not read again.

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
        from onnxlady._resync._across import resync_across  # (here: a twin resync runs without matching)

        # Weights left in their files (onnxlady._io._external) are read from them as memory maps
        # (read_array): no copy of either model's weights is made to compare them, only of the
        # suspect's to re-order them (_across._reorder_suspect).
        return resync_across(reference, suspect, options, true_key, progress, ref_analysis=analysis)[0]
    return resync_twin(reference, suspect, analysis, leaves, options, true_key, progress, constants)
