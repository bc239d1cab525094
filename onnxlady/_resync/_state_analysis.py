"""The analysis resync and audit work on: a decoder's KV caches taken as permutable state.

Apart from matching (:mod:`onnxlady._resync._match`, which re-exports it): a twin resync analyses
its reference so without importing the matching of converted copies.
"""

from __future__ import annotations

import onnx

from onnxlady._analysis._channels import ChannelAnalysis, analyze
from onnxlady._analysis._state import state_pairs
from onnxlady._transforms._key import PermutationKey, graph_fingerprint

__all__ = ["analyze_with_state"]


def analyze_with_state(model: onnx.ModelProto, true_key: PermutationKey | None = None) -> ChannelAnalysis:
    """The analysis resync and audit work on: a decoder's KV caches taken as permutable state.

    A suspect permuted with ``permute --kv-state`` moves the heads and head dims its caches
    carry; analysed with the caches pinned, those groups would be frozen in both models, so
    resync could neither solve nor write them back. Where the suspect's caches were not moved,
    the state groups are solved like any other (in place). A model with no ``past``/``present``
    pair is analysed as usual.

    Args:
        model: the model to analyse (not modified).
        true_key: a key made for this model (or its permuted copy): group ids are those of the
            analysis it was made on, so where it fits only the analysis with the caches pinned
            (a plain ``permute``), that analysis is returned.

    Returns:
        The analysis; its ``states`` list the KV-cache pairs it took as state (none when pinned).
    """
    if not state_pairs(model):
        return analyze(model)
    with_state = analyze(model, kv_state=True)
    if true_key is None or _fits(with_state, true_key):
        return with_state
    if graph_fingerprint(model) not in (true_key.source_fingerprint, true_key.permuted_fingerprint):
        return with_state  # a key for the other model says nothing about this one's ids
    pinned = analyze(model)
    return pinned if _fits(pinned, true_key) else with_state


def _fits(analysis: ChannelAnalysis, key: PermutationKey) -> bool:
    """Whether every group ``key`` permutes is a permutable group of ``analysis`` of the same size."""
    for gid, perm in key.permutations().items():
        try:
            group = analysis.group(gid)
        except KeyError:
            return False
        if group.frozen or group.size != perm.size:
            return False
    return True
