"""Pair the channel groups of two models whose graphs are not node-for-node copies.

A suspect has often been through a converter after it was permuted or watermarked: float16
weights, BatchNorm folded into the preceding Conv, ONNX Runtime's offline optimizer (MatMul and
Add fused into Gemm, Conv and Relu into FusedConv, LayerNorm and the residual Add into
SkipLayerNormalization, shape subgraphs folded and deduplicated, nodes reordered), its
transformer optimizer (Attention, EmbedLayerNormalization, BiasGelu), onnxslim, int4
``MatMulNBits``, QDQ int8, an opset upgrade. Names, node counts, operator types and node order
then differ, but what the weights *compute* does not. Matching works on that, never on names:

1. Each model is reduced to its *sites* (:mod:`onnxlady._resync._sites`): every weight as the
   computation uses it, in a canonical layout shared by the operator families that compute
   the same thing (MatMul+Add = Gemm = FusedGemm = FusedMatMul = MatMulNBits dequantized = a
   third of a packed Attention weight; Conv = FusedConv = Conv+BatchNorm folded; a LayerNorm's
   scale and shift = SkipLayerNorm's = the Mul and Add of a decomposed one). Shape
   arithmetic and constants computed from constants are no sites, so folding, deduplicating
   or moving them changes nothing. A BatchNorm no layer absorbs is a generic site, except
   where the other model wrote it as an NCHWc depthwise 1x1 Conv (ONNX Runtime at
   ``ORT_ENABLE_ALL``): there it is read as that convolution (:mod:`onnxlady._resync._site_pairing`).
2. **Structure.** Each site is a token (family and canonical shapes); the two token sequences,
   in topological order, are aligned (:class:`difflib.SequenceMatcher`, longest common blocks).
3. **Content.** Among sites of the same token, signatures invariant to the permutations being
   solved (:mod:`onnxlady._resync._invariants`: sorted values, sorted row and column norms)
   say which weight is which. Where content is decisive (the best candidate at most half as
   far as the second best) it decides, against the alignment if need be (a converter that
   reordered three projections of one shape); otherwise the alignment decides, and sites left
   over by both are paired in order; sites of one token that content leaves interchangeable
   (one table read by two branches) are then re-paired by the layers they connect to. *Twins*
   (one model's sites with bitwise equal signatures: one weight read by two MatMuls) compete
   for counterparts together: content confines them to a block, the alignment and order pair
   within it, and a layer on activations takes the counterpart on activations
   (:mod:`onnxlady._resync._site_pairing`). Every
   pair says how it was made (``structure``, ``content`` or ``order``), with the content
   margin (1 - best / second best distance).
4. Paired sites pair the groups of their operands axis by axis, position by position (both
   analyses' bindings). A group pairs with exactly one group of the same size, by every vote,
   or it is unmatched with the reason.
5. **Confidence**: the smallest of three shares: of both models' weights (elements) held by
   paired sites, of their sites paired, and of the layer-to-layer connections among paired
   layers that both models have (which layer's output reaches which next layer: fusing,
   folding, packing and quantizing keep them; another architecture with layers of the same
   shapes does not). Below :data:`MATCH_THRESHOLD` the two are *different models*:
   :func:`check_same_model` refuses, naming the first divergence; ``match``, ``resync`` and
   ``audit`` all apply it.

Conversions are recognised along the way (storage types, BatchNorm folded, quantization,
operators fused, ONNX Runtime's optimizers, opset, renames, reordering, removed operators) and
reported as findings separate from integrity.

The steps live in private modules by job: :mod:`~onnxlady._resync._signatures` (content
signatures), :mod:`~onnxlady._resync._content` (pairing the sites of one token),
:mod:`~onnxlady._resync._site_pairing` (the steps of item 3, on one shared state),
:mod:`~onnxlady._resync._connections` (which layer feeds which),
:mod:`~onnxlady._resync._group_pairing` (item 4), :mod:`~onnxlady._resync._conversions`,
:mod:`~onnxlady._resync._match_results` (what a match holds, the refusal) and
:mod:`~onnxlady._resync._state_analysis` (the analysis both sides get). This module puts them
together and re-exports the names other modules import.
"""


from __future__ import annotations

from collections import Counter

import onnx

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._graph._model_graph import ModelGraph, node_label
from onnxlady._resync._branch_merges import absorbed_sites, merge_branches
from onnxlady._resync._connections import connection_agreement
from onnxlady._resync._conversions import LINEAR_FAMILIES, find_conversions
from onnxlady._resync._group_pairing import axis_labels, pair_groups
from onnxlady._resync._match_results import (
    LAYER_ELEMENTS,
    MATCH_THRESHOLD,
    ConversionFinding,
    GroupPair,
    ModelMatch,
    SitePair,
    UnmatchedGroup,
    check_same_model,
)
from onnxlady._resync._site_pairing import SitePairing, pair_sites
from onnxlady._resync._sites import Site, find_sites
from onnxlady._resync._state_analysis import analyze_with_state
from onnxlady._resync._units import UNIT_OPS, Unit, find_units

__all__ = [
    "LAYER_ELEMENTS",
    "MATCH_THRESHOLD",
    "UNIT_OPS",
    "ConversionFinding",
    "GroupPair",
    "ModelMatch",
    "SitePair",
    "Unit",
    "UnmatchedGroup",
    "analyze_with_state",
    "axis_labels",
    "check_same_model",
    "find_units",
    "match_analyses",
    "match_models",
]

def _describe_site(graph: ModelGraph, site: Site, shapes: bool = True) -> str:
    """``Conv 'name'``, with the shapes of the weights it reads."""
    node = graph.nodes[site.node]
    text = f"{node.op_type} '{node_label(node, site.node)}'"
    if site.part:
        text += f" (part {site.part})"
    if not shapes:
        return text
    return text + " " + " ".join("[" + ",".join(str(d) for d in o.shape) + "]" for o in site.operands if not o.role.startswith("bn"))


def _holding(graph: ModelGraph, site: Site) -> str:
    """How a site holds its weights: stored, or computed in the graph (and whether read as a layer)."""
    computed = any(
        operand.computed or graph.constant_leaf(graph.nodes[operand.node].input[operand.slot]) is None
        for operand in site.operands
        if not operand.nbits
    )
    if not computed:
        return f"stored weights, read as {site.family}"
    if site.family == "other":
        return "weights computed in the graph by operators not evaluated here, read as an opaque operator"
    return f"weights computed in the graph, read as {site.family}"


def _divergences(
    reference: ModelGraph,
    suspect: ModelGraph,
    ref_sites: list[Site],
    sus_sites: list[Site],
    pairing: SitePairing,
    absorbed: tuple[set[int], set[int]] = (set(), set()),
) -> list[str]:
    """Where sites stayed without counterpart, by the alignment's unequal stretches (branches merged into a pair are held)."""
    found = []
    paired_suspect = set(pairing.pairs.values()) | absorbed[1]
    paired_reference = set(pairing.pairs) | absorbed[0]
    for tag, a0, a1, b0, b1 in pairing.opcodes:
        if tag == "equal":
            continue
        ref_left = [ref_sites[i] for i in range(a0, a1) if i not in paired_reference and ref_sites[i].weighs and ref_sites[i].live]
        sus_left = [sus_sites[i] for i in range(b0, b1) if i not in paired_suspect and sus_sites[i].weighs and sus_sites[i].live]
        if not ref_left and not sus_left:
            continue
        ref_part = [_describe_site(reference, site) for site in ref_left]
        sus_part = [_describe_site(suspect, site) for site in sus_left]
        if set(ref_part) & set(sus_part):
            # The same operators and shapes on both sides: what differs is how each holds its
            # weights (held-out round 17, F1: a weight computed in the graph that was not read
            # as a layer, beside its folded copy, listed alike on both sides).
            ref_part = [f"{text} ({_holding(reference, site)})" for text, site in zip(ref_part, ref_left)]
            sus_part = [f"{text} ({_holding(suspect, site)})" for text, site in zip(sus_part, sus_left)]
        where = (
            f"after {_describe_site(reference, ref_sites[a0 - 1], shapes=False)} of the reference" if a0 > 0 else "at the start"
        )
        found.append(f"{where}: reference has {_listing(ref_part)}, suspect has {_listing(sus_part)}")
    for mine, theirs in ((ref_sites[a], sus_sites[b]) for a, b in sorted(pairing.pairs.items())):
        if mine.live != theirs.live and mine.weighs:
            dead, side = (_describe_site(suspect, theirs, False), "suspect") if mine.live else (
                _describe_site(reference, mine, False), "reference")  # fmt: skip
            found.append(f"the {side}'s {dead} computes nothing its outputs read, unlike its counterpart")
    return found


def _listing(items: list[str]) -> str:
    if not items:
        return "nothing"
    shown = ", ".join(items[:3])
    return shown + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def match_analyses(reference: ChannelAnalysis, suspect: ChannelAnalysis) -> ModelMatch:
    """Pair the sites and groups of two analysed models (see the module docstring).

    Args:
        reference: the reference's analysis.
        suspect: the suspect's.

    Returns:
        The pairing, with its confidence; it does not refuse (see :func:`check_same_model`).
    """
    ref_graph, sus_graph = reference.graph, suspect.graph
    ref_sites = find_sites(ref_graph, {plan.source for plan in reference.tensors})
    sus_sites = find_sites(sus_graph, {plan.source for plan in suspect.tensors})
    pairing = pair_sites(ref_graph, sus_graph, ref_sites, sus_sites)
    # Parallel branches one model re-parameterised into one convolution: read merged (F7).
    merge_branches(ref_graph, sus_graph, ref_sites, sus_sites, pairing.pairs)
    absorbed = (absorbed_sites(ref_sites), absorbed_sites(sus_sites))
    ordered = sorted(pairing.pairs.items())
    pairs = [(ref_sites[a], sus_sites[b]) for a, b in ordered]
    how = [pairing.how[a] for a, _ in ordered]
    groups, unmatched = pair_groups(reference, suspect, pairs, how)
    methods = Counter(method for method, _, _ in how)
    conversions = find_conversions(ref_graph, sus_graph, pairs, methods)
    # What counts: live sites that weigh. A live site paired with dead code (no output reads it)
    # is no conversion: a converter never makes a computation dead.
    def counts(site: Site) -> bool:
        return site.weighs and site.live

    counted_ref = [site for site in ref_sites if counts(site)]
    counted_sus = [site for site in sus_sites if counts(site)]
    total = sum(site.size for site in counted_ref) + sum(site.size for site in counted_sus)
    alike = [(mine, theirs) for mine, theirs in pairs if mine.live == theirs.live]
    held = sum(mine.size * counts(mine) + theirs.size * counts(theirs) for mine, theirs in alike)
    counted_pairs = sum(counts(mine) + counts(theirs) for mine, theirs in alike)
    # Branches merged into a paired site are held by that pair.
    merged = [sites[number] for sites, numbers in zip((ref_sites, sus_sites), absorbed) for number in numbers]
    held += sum(site.size for site in merged if counts(site))
    counted_pairs += sum(1 for site in merged if counts(site))
    # The smallest of three shares: of weights, of sites (a narrower first layer holds few
    # weights but is a different model all the same) and of layer-to-layer connections (two
    # encoders of one width pair every layer, but not how the layers connect).
    sites = len(counted_ref) + len(counted_sus)
    connections = connection_agreement(ref_graph, sus_graph, ref_sites, sus_sites, pairing.pairs)
    shares = (held / total if total else 0.0, counted_pairs / sites if sites else 0.0, connections)
    confidence = min(shares)
    site_pairs = [
        SitePair(_describe_site(ref_graph, mine, False), _describe_site(sus_graph, theirs, False), *made)
        for (mine, theirs), made in zip(pairs, how)
    ]
    paired_suspect = set(pairing.pairs.values())
    unpaired_layers = [
        f"{side}: {_describe_site(graph, site)}"
        for side, graph, sites, paired in (
            ("reference", ref_graph, ref_sites, set(pairing.pairs)),
            ("suspect", sus_graph, sus_sites, paired_suspect),
        )
        for number, site in enumerate(sites)
        if site.family in LINEAR_FAMILIES and counts(site) and site.size >= LAYER_ELEMENTS and number not in paired
        and number not in absorbed[side == "suspect"]
    ]
    return ModelMatch(
        reference,
        suspect,
        {mine.key: theirs.key for mine, theirs in pairs},
        ref_sites,
        sus_sites,
        groups,
        unmatched,
        _divergences(ref_graph, sus_graph, ref_sites, sus_sites, pairing, absorbed),
        conversions,
        (len(ref_sites), len(sus_sites)),
        confidence,
        site_pairs,
        unpaired_layers,
        shares,
    )


def match_models(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> ModelMatch:
    """Analyse both models (as resync does) and pair their groups. Neither model is modified."""
    return match_analyses(analyze_with_state(reference), analyze_with_state(suspect))
