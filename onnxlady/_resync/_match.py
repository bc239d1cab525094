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
   ``ORT_ENABLE_ALL``): there it is read as that convolution (:func:`_pair_batchnorms_as_convs`).
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
   (:func:`_pair_weighing_twins`). Every
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
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from onnxlady._analysis._channels import ChannelAnalysis, analyze
from onnxlady._analysis._state import state_pairs
from onnxlady._assignment import linear_sum_assignment
from onnxlady._errors import OnnxladyError
from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph, node_label
from onnxlady._io._external import release_pages
from onnxlady._resync._computed import computed_use
from onnxlady._resync._invariants import distance, signature
from onnxlady._resync._nchwc_forms import NCHWC, is_fused_sum, nchwc_block
from onnxlady._resync._quantized_forms import quantized_form
from onnxlady._resync._sites import (
    Operand,
    Site,
    activation_rounding,
    find_sites,
    post_affine,
    read_operand,
    site_operand_axis,
)
from onnxlady._resync._values import read_constant
from onnxlady._transforms._key import PermutationKey, graph_fingerprint

__all__ = [
    "MATCH_THRESHOLD",
    "ConversionFinding",
    "GroupPair",
    "ModelMatch",
    "SitePair",
    "Unit",
    "UnmatchedGroup",
    "axis_labels",
    "check_same_model",
    "match_models",
]

#: Operators that make a unit with their constant weight (and, for the first three, a following
#: BatchNormalization that folding would merge into them).
UNIT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
#: Operators a converter or simplifier adds or removes without changing the computation.
_PASS_THROUGH_OPS = frozenset({"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})
#: Below this confidence two models are different models, not conversions of one another
#: (:func:`check_same_model`). The confidence is the smallest of three shares (module
#: docstring, item 5): weights, sites and connections paired. A converter keeps all three (a
#: permuted, converted copy pairs 100 %); two different architectures share a few layers of
#: common shapes and fewer of their connections.
MATCH_THRESHOLD = 0.9
#: Weights from which a layer only one model has makes them different models (smaller ones, a
#: constant 1x16 DFL kernel say, may be folded away by a simplifier).
LAYER_ELEMENTS = 256
#: Content decides between candidates when the best is at most this share of the second best.
DECISIVE_RATIO = 0.5
#: A signature distance at most this is an equal counterpart within storage rounding (float16
#: tables: about 1e-4; noise of 0.1 x std: above 1e-2).
_NEAR_EXACT = 1e-3
#: The same for a table stored in 8 bits (a static quantizer's uint8 sin table: about 4e-3),
#: still below noise's; used only to rule out a counterpart decisively farther.
_NEAR_QUANTIZED = 6e-3


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """A linear layer with a constant weight, its bias and the BatchNorm folding would absorb.

    ``out_axis`` is the axis of the weight, as the node reads it, that indexes output neurons.
    ``bias`` is the (node, input slot) of the bias as it is stored: the layer's own input, or
    the constant operand of an Add right after it. (The fingerprints of
    :mod:`onnxlady._provenance` read standard layers this way; matching uses
    :class:`~onnxlady._resync._sites.Site`, which covers the contrib forms too.)
    """

    node: int
    weight_slot: int
    out_axis: int
    bias: tuple[int, int] | None
    batchnorm: int | None


@dataclass(frozen=True)
class GroupPair:
    """A reference group and the suspect group holding the same neurons, and how they were paired.

    ``method``: ``structure`` when every site that paired them was paired by the aligned
    structure, ``content`` when one was paired on its weights' invariant signatures against
    (or without) the structure, ``order`` when one was left over by both and paired in order.
    ``margin``: the smallest content margin of those sites (1 - best / second-best signature
    distance; ``None`` when no site had a competitor); ``distance``: the largest signature
    distance of those sites (0 for a permuted copy, the storage error for a conversion).
    """

    reference: str
    suspect: str
    size: int
    permutable: bool  # in both models
    method: str = "structure"
    margin: float | None = None
    distance: float | None = None
    #: Both models hold the neurons alike (the same neuron at every paired position); False
    #: where the suspect holds them in groups of another structure (then ``suspect`` may list
    #: several ids, and the group is solved in the reference's form only).
    alike: bool = True


@dataclass(frozen=True)
class UnmatchedGroup:
    """A group with no counterpart, and why."""

    model: str  # "reference" or "suspect"
    group: str
    size: int
    reason: str


@dataclass(frozen=True)
class ConversionFinding:
    """A difference of form, not of function: what a converter did and on which side."""

    #: "float16", "bfloat16", "float64", "batchnorm-folded", "quantized", "opset", "renamed",
    #: "simplified", "fused", "reordered", "ort-optimized", "ort-transformer-optimized", "scale-folded",
    #: "gelu-approximated"
    kind: str
    model: str  # the side that has the converted form: "reference" or "suspect"
    detail: str


@dataclass(frozen=True)
class SitePair:
    """Two sites holding the same weights, and how they were paired (see :class:`GroupPair`)."""

    reference: str
    suspect: str
    method: str
    margin: float | None
    distance: float | None


@dataclass
class ModelMatch:
    """How two models' sites and groups correspond."""

    reference: ChannelAnalysis
    suspect: ChannelAnalysis
    #: Paired sites: reference site key (node, part) -> suspect site key.
    sites: dict[tuple[int, int], tuple[int, int]]
    reference_sites: list[Site]
    suspect_sites: list[Site]
    groups: list[GroupPair]
    unmatched: list[UnmatchedGroup]
    divergences: list[str]
    conversions: list[ConversionFinding]
    #: Site counts on each side (what the alignment worked on).
    site_counts: tuple[int, int] = (0, 0)
    #: How much of both models pairs, 0 to 1 (see :data:`MATCH_THRESHOLD`).
    confidence: float = 0.0
    site_pairs: list[SitePair] = field(default_factory=list)
    #: Learned layers (a Conv/Gemm/MatMul's own weights, :data:`LAYER_ELEMENTS` or more) that
    #: only one model has: ``"reference: Gemm 'head' [100,192]"``. A converter fuses, folds,
    #: packs and quantizes layers but never adds or removes one, so any makes two models.
    unpaired_layers: list[str] = field(default_factory=list)
    #: The three shares the confidence is the smallest of: weights (elements) held by paired
    #: sites, sites paired, layer-to-layer connections both models have.
    shares: tuple[float, float, float] = (0.0, 0.0, 0.0)
    _by_reference: dict[str, GroupPair] = field(default_factory=dict)
    _reference_by_key: dict[tuple[int, int], Site] = field(default_factory=dict)
    _suspect_by_key: dict[tuple[int, int], Site] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_reference = {pair.reference: pair for pair in self.groups}
        self._reference_by_key = {site.key: site for site in self.reference_sites}
        self._suspect_by_key = {site.key: site for site in self.suspect_sites}

    def suspect_group(self, reference_group: str) -> GroupPair | None:
        """The pairing of a reference group with its suspect group.

        Args:
            reference_group: a group id of the reference's analysis.

        Returns:
            The pair, or None when the reference group has no partner in the suspect.
        """
        return self._by_reference.get(reference_group)

    def reference_site(self, key: tuple[int, int]) -> Site:
        """The reference's site with key ``key``.

        Args:
            key: a site key, ``(node index, part)``, as :attr:`sites` holds them.

        Returns:
            The site.

        Raises:
            KeyError: the reference has no site with that key.
        """
        return self._reference_by_key[key]

    def suspect_site(self, key: tuple[int, int]) -> Site:
        """The suspect's site with key ``key``.

        Args:
            key: a site key, ``(node index, part)``, as :attr:`sites` holds them.

        Returns:
            The site.

        Raises:
            KeyError: the suspect has no site with that key.
        """
        return self._suspect_by_key[key]

    @property
    def same_model(self) -> bool:
        """Enough of both models pairs for them to be one model in two forms, and no learned layer is extra."""
        return self.confidence >= MATCH_THRESHOLD and not self.unpaired_layers

    @property
    def complete(self) -> bool:
        """Every permutable group of either model is paired and every site has its counterpart."""
        return not any(item.reason != "frozen in both models" for item in self.unmatched) and not self.divergences

    def to_dict(self) -> dict[str, Any]:
        """The match as JSON-ready data (``onnxlady match --json`` prints it beside the two paths).

        Returns:
            A dict of plain values: completeness, confidence, site counts, paired sites and groups,
            unmatched groups, divergences, learned layers only one model has and conversion findings.
        """
        return {
            "complete": self.complete,
            "confidence": round(self.confidence, 6),
            "threshold": MATCH_THRESHOLD,
            "same_model": self.same_model,
            "sites": {"reference": self.site_counts[0], "suspect": self.site_counts[1], "paired": len(self.sites)},
            "site_pairs": [asdict(pair) for pair in self.site_pairs],
            "groups": [asdict(pair) for pair in self.groups],
            "unmatched": [asdict(item) for item in self.unmatched],
            "divergences": list(self.divergences),
            "unpaired_layers": list(self.unpaired_layers),
            "conversions": [asdict(item) for item in self.conversions],
        }


def check_same_model(match: ModelMatch) -> None:
    """Refuse two models whose weights mostly do not pair: they are different models.

    Args:
        match: a pairing from :func:`match_analyses`.

    Raises:
        OnnxladyError: the paired share is below :data:`MATCH_THRESHOLD` ("different models",
            with the share and the first divergence; a layout onnxlady does not read is named
            as the likely cause).
    """
    if match.same_model:
        return
    if match.confidence >= MATCH_THRESHOLD:  # they pair, but one has a learned layer the other lacks
        extra = match.unpaired_layers
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise OnnxladyError(
            f"different models: {100 * match.confidence:.1f} % of them pair, but a learned layer is only in one "
            f"of them, which no conversion does: {extra[0]}{more}"
        )
    where = match.divergences[0] if match.divergences else _no_divergence(match)
    more = f" (and {len(match.divergences) - 1} more places)" if len(match.divergences) > 1 else ""
    raise OnnxladyError(
        f"different models: {100 * match.confidence:.1f} % of them pair (weights, operators and their "
        f"connections), below the {100 * MATCH_THRESHOLD:.0f} % a conversion keeps; suspect differs from "
        f"reference beyond a conversion: {where}{more}" + _unread_layouts(match)
    )


def _no_divergence(match: ModelMatch) -> str:
    """What fell short where every weighing site found a counterpart: the smallest share, said plainly."""
    weights, sites, connections = match.shares
    if not match.sites:
        return "no weight of either model has a counterpart"
    if connections <= min(weights, sites):
        return (
            f"{len(match.sites)} of {max(match.site_counts)} weights pair, but only {100 * connections:.1f} % of "
            "the connections between paired layers (which layer feeds which) agree"
        )
    what = "weights (elements)" if weights <= sites else "weighing sites"
    return f"{len(match.sites)} weights pair, but they hold only {100 * min(weights, sites):.1f} % of both models' {what}"


def _unread_layouts(match: ModelMatch) -> str:
    """Why a conversion may look like another model: a weight layout onnxlady does not read."""
    for side, analysis in (("reference", match.reference), ("suspect", match.suspect)):
        blocked = sum(node.domain == NCHWC for node in analysis.graph.model.graph.node)
        if blocked:
            block = nchwc_block(analysis.graph)
            how = f"read in blocks of {block} channels" if block else "that no block size fits"
            return (
                f"; the {side} holds {blocked} nodes of ONNX Runtime's NCHWc layout (com.microsoft.nchwc, "
                f"written by the CPU optimizer at ORT_ENABLE_ALL), {how} (the model does not store the "
                "block size, 8 with AVX2 or 16 with AVX-512): compare a copy saved at ORT_ENABLE_EXTENDED"
            )
    return ""


# -- sites ------------------------------------------------------------------------------------
#: Operators that only change an activation's type: a float16 converter runs a BatchNorm in
#: float32 between two Casts, and the BatchNorm still follows its Conv.
_TYPE_ONLY_OPS = frozenset({"Cast", "Identity"})


def _single_consumer(graph: ModelGraph, name: str, op_type: str) -> tuple[int, int] | None:
    """The only reader of ``name`` (through Casts) if it is an ``op_type`` node.

    None when anything on the way is a graph output.
    """
    while True:
        readers = graph.consumers.get(name, [])
        if len(readers) != 1 or name in graph.graph_outputs:
            return None
        index, slot = readers[0]
        node = graph.nodes[index]
        if slot >= 0 and node.op_type == op_type:
            return index, slot
        rounded = activation_rounding(graph, index) if slot == 0 else None
        if rounded is not None:
            name = rounded
            continue
        if slot != 0 or node.op_type not in _TYPE_ONLY_OPS or len(node.output) != 1:
            return None
        name = node.output[0]


def _float_constant(graph: ModelGraph, name: str) -> bool:
    """A constant operand whose values are real numbers (weights, scales), not indices or shapes."""
    leaf = graph.constant_leaf(name) if name else None
    if leaf is None:
        return False
    tensor = graph.leaf_tensor_or_none(leaf)
    if tensor is None:
        return False
    value = graph.constant_value(name)
    return value is not None and value.dtype.kind == "f"


def find_units(graph: ModelGraph) -> dict[int, Unit]:
    """Every linear layer with a constant weight, with its bias and following BatchNorm."""
    units: dict[int, Unit] = {}
    for index in graph.order:
        node = graph.nodes[index]
        if node.op_type not in UNIT_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        slot_axis = _weight_slot(graph, index)
        if slot_axis is None:
            continue
        slot, out_axis = slot_axis
        bias: tuple[int, int] | None = None
        tail = node.output[0]
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
            if _float_constant(graph, node.input[2]):
                bias = (index, 2)
        elif node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            reader = _single_consumer(graph, tail, "Add")
            if reader is not None:
                add = graph.nodes[reader[0]]
                other = 1 - reader[1]
                if _is_channel_vector(graph, add.input[other], node, slot, out_axis):
                    bias, tail = (reader[0], other), add.output[0]
        batchnorm = None
        if node.op_type in _FOLDABLE and _foldable(graph, node):
            reader = _single_consumer(graph, tail, "BatchNormalization")
            bn = graph.nodes[reader[0]] if reader is not None and reader[1] == 0 else None
            if reader is not None and bn is not None and all(_float_constant(graph, n) for n in bn.input[1:5]):
                batchnorm = reader[0]
        units[index] = Unit(index, slot, out_axis, bias, batchnorm)
    return units


def _weight_slot(graph: ModelGraph, index: int) -> tuple[int, int] | None:
    """(input slot of the constant weight, its output-neuron axis as read), or None."""
    node = graph.nodes[index]
    op = node.op_type
    if op == "Conv":
        return (1, 0) if _float_constant(graph, node.input[1]) else None
    if op == "ConvTranspose":
        return (1, 1) if _float_constant(graph, node.input[1]) else None
    if op == "Gemm":
        if not _float_constant(graph, node.input[1]) or _float_constant(graph, node.input[0]):
            return None
        return (1, 0 if int(node_attribute(node, "transB", 0)) else 1)
    if op == "MatMul":
        left, right = (_float_constant(graph, name) for name in node.input[:2])
        if left == right:
            return None
        shape = graph.constant_shape(node.input[1 if right else 0])
        if shape is None or len(shape) < 2:
            return None
        return (1, len(shape) - 1) if right else (0, len(shape) - 2)
    return None


def _foldable(graph: ModelGraph, node: onnx.NodeProto) -> bool:
    """BatchNorm folds into this layer along the weight's output axis."""
    if node.op_type == "ConvTranspose":
        return int(node_attribute(node, "group", 1)) == 1
    if node.op_type == "Gemm":
        return graph.rank(node.output[0]) == 2
    return True


def _is_channel_vector(graph: ModelGraph, name: str, node: onnx.NodeProto, slot: int, out_axis: int) -> bool:
    """A constant added to the layer's output along its channel axis only: a bias.

    The output's rank is the weight's for convolutions (channels on axis 1, counted from the
    left) and unknown for MatMul (channels last, counted from the right), so neither needs
    shape inference.
    """
    weight = graph.constant_shape(node.input[slot])
    shape = graph.constant_shape(name) if _float_constant(graph, name) else None
    if weight is None or shape is None:
        return False
    channels = weight[out_axis]
    if node.op_type == "MatMul" or node.op_type == "Gemm":
        return shape[-1:] == (channels,) and all(d == 1 for d in shape[:-1])
    rank = len(weight)
    if len(shape) > rank:
        return False
    aligned = (1,) * (rank - len(shape)) + tuple(shape)
    return aligned[1] == channels and all(d == 1 for axis, d in enumerate(aligned) if axis != 1)


# -- pairing sites ----------------------------------------------------------------------------
@dataclass
class _Pairing:
    """Site indices (into each model's site list) paired, and how."""

    pairs: dict[int, int]
    how: dict[int, tuple[str, float | None, float | None]]  # reference index -> (method, margin, distance)
    opcodes: Sequence[tuple[str, int, int, int, int]]


#: Operand roles a converter may store once for several sites (ONNX Runtime and onnxslim
#: deduplicate equal zero biases and shifts): a change to one then moves the signature of
#: every reader alike (:func:`_decided_by_own_weights`).
_SHAREABLE_ROLES = frozenset({"bias", "shift"})


class _Signatures:
    """Content signatures of one model's sites, computed when first asked for."""

    def __init__(self, graph: ModelGraph, sites: list[Site], scratch: list[np.ndarray] | None = None) -> None:
        self.graph = graph
        self.sites = sites
        self._cache: dict[int, list[np.ndarray]] = {}
        self._own: dict[int, list[np.ndarray]] = {}  # the same without the shareable operands' parts
        # Where folded weights are written (see _folded_for_signature): shared by both models' signatures.
        self._scratch: list[np.ndarray] = [] if scratch is None else scratch

    def __getitem__(self, number: int) -> list[np.ndarray]:
        if number not in self._cache:
            parts: list[np.ndarray] = []
            own: list[np.ndarray] = []
            site = self.sites[number]
            for operand in site.operands:
                if operand.role.startswith(("bn", "post")):
                    continue
                value = read_operand(self.graph, operand, bounds=False, compact=True)  # the value alone is signed
                if value is None:
                    continue
                signed = signature(_folded_for_signature(self.graph, site, operand, value.value, self._scratch))
                parts.extend(signed)
                if operand.role not in _SHAREABLE_ROLES:
                    own.extend(signed)
                # The solver reads it again (reading_once) in a while: its file pages need not stay meanwhile.
                release_pages(value.value)
            self._cache[number] = parts
            self._own[number] = own
        return self._cache[number]

    def own(self, number: int) -> list[np.ndarray]:
        """A site's signature without the parts of its bias and shift (see :func:`_decided_by_own_weights`)."""
        self[number]
        return self._own[number]

    def forget(self, number: int) -> None:
        """Drop a site's signature (its site was rewritten in place)."""
        self._cache.pop(number, None)
        self._own.pop(number, None)


def _folded_for_signature(
    graph: ModelGraph, site: Site, operand: Operand, value: np.ndarray, scratch: list[np.ndarray] | None = None
) -> np.ndarray:
    """A unit's weight and bias with its BatchNorm, then its scalar steps, folded in.

    A folded copy then signs the same as the unfolded one. With ``scratch`` (a list holding at
    most one float64 array, grown as needed), a folded weight is written into that array, reused
    from weight to weight: the result is then only valid until the next call with the same
    scratch (a signature is computed from it at once). A fresh array per weight cost its page
    faults, more than the products themselves.
    """
    if operand.role not in ("weight", "bias"):
        return value
    if site.batchnorm is not None:
        if site.lone_batchnorm:  # a BatchNorm of its own: a layer of weight ones and bias zeros, folded
            value = np.ones(value.shape) if operand.role == "weight" else np.zeros(value.shape)
            node = graph.nodes[site.node]
            gamma, beta, mean, var = (read_constant(graph, name) for name in node.input[1:5])
        else:
            gamma, beta, mean, var = (read_operand(graph, site.operand(f"bn{slot}")) for slot in range(1, 5))  # type: ignore[arg-type]
        if gamma is not None and beta is not None and mean is not None and var is not None:
            eps = float(node_attribute(graph.nodes[site.batchnorm], "epsilon", 1e-5))
            scale = gamma.value / np.sqrt(var.value + eps)
            if operand.role == "weight":
                value = _product(value, scale.reshape((-1,) + (1,) * (value.ndim - 1)), scratch)
            else:
                value = (value - mean.value) * scale + beta.value
    post = post_affine(graph, site)
    if post is not None:
        if operand.role == "weight":
            value = _product(value, post[0].value.reshape((-1,) + (1,) * (value.ndim - 1)), scratch)
            value = np.add(value, 0.0, out=value) if scratch is not None and _in_scratch(value, scratch) else value + 0.0
        else:
            value = value * post[0].value + post[1].value
    return value


def _in_scratch(array: np.ndarray, scratch: list[np.ndarray]) -> bool:
    """Whether ``array`` is written in the scratch array (and so may be overwritten in place)."""
    return bool(scratch) and np.shares_memory(array, scratch[0])


def _product(value: np.ndarray, factor: np.ndarray, scratch: list[np.ndarray] | None) -> np.ndarray:
    """``value * factor``, written into ``scratch`` (see :func:`_folded_for_signature`) when it may be.

    Only where the plain product would be a C-contiguous float64 array of ``value``'s shape: the
    same numbers in the same layout, so the signature sums them in the same order.
    """
    if (
        scratch is None
        or not value.flags.c_contiguous
        or np.result_type(value, factor) != np.float64
        or np.broadcast_shapes(value.shape, factor.shape) != value.shape
    ):
        return value * factor
    if _in_scratch(value, scratch):  # already folded once: the second step is done in place
        return np.multiply(value, factor, out=value)
    if not scratch or scratch[0].size < value.size:
        scratch[:] = [np.empty(value.size)]
    return np.multiply(value, factor, out=scratch[0][: value.size].reshape(value.shape))


def _pair_sites(
    reference: ModelGraph, suspect: ModelGraph, ref_sites: list[Site], sus_sites: list[Site]
) -> _Pairing:
    """Structure first, content where it is decisive, order for what is left (module docstring)."""
    ref_tokens, sus_tokens = [site.token for site in ref_sites], [site.token for site in sus_sites]
    matcher = difflib.SequenceMatcher(None, ref_tokens, sus_tokens, autojunk=False)
    structural: dict[int, int] = {}
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            structural[block.a + offset] = block.b + offset
    classes: dict[tuple[object, ...], tuple[list[int], list[int]]] = {}
    for number, token in enumerate(ref_tokens):
        classes.setdefault(token, ([], []))[0].append(number)
    for number, token in enumerate(sus_tokens):
        if token in classes:
            classes[token][1].append(number)
    scratch: list[np.ndarray] = []  # folded weights of both models, one at a time
    ref_sig, sus_sig = _Signatures(reference, ref_sites, scratch), _Signatures(suspect, sus_sites, scratch)
    pairs: dict[int, int] = {}
    how: dict[int, tuple[str, float | None, float | None]] = {}
    for rows, cols in classes.values():
        if not rows or not cols:
            continue
        if len(rows) == 1 and len(cols) == 1:
            pairs[rows[0]] = cols[0]
            d = distance(ref_sig[rows[0]], sus_sig[cols[0]])
            how[rows[0]] = ("structure", None, d if np.isfinite(d) else None)
            continue
        _pair_class(rows, cols, structural, ref_sig, sus_sig, pairs, how)
    _pair_batchnorms_as_convs(reference, suspect, ref_sites, sus_sites, (ref_sig, sus_sig), pairs, how)
    _pair_across_unit_axes(reference, suspect, ref_sites, sus_sites, pairs, how)
    _pair_weighing_twins(ref_sites, sus_sites, ref_sig, sus_sig, pairs, how)
    _settle_by_connections(reference, suspect, ref_sites, sus_sites, ref_sig, sus_sig, pairs, how)
    return _Pairing(pairs, how, matcher.get_opcodes())


def _lone_batchnorm(graph: ModelGraph, site: Site) -> int | None:
    """The channels of a BatchNormalization no layer absorbs (a generic site of four vectors), else None."""
    if site.family != "other" or site.token[1] not in ("", "ai.onnx") or site.token[2] != "BatchNormalization":
        return None
    node = graph.nodes[site.node]
    if [o.slot for o in site.operands] != [1, 2, 3, 4] or sum(1 for name in node.output if name) != 1 or int(
        node_attribute(node, "training_mode", 0)
    ):
        return None
    sizes = {operand.size for operand in site.operands}
    if len(sizes) != 1 or any(sum(d != 1 for d in operand.shape) != 1 for operand in site.operands):
        return None
    return sizes.pop()


def _channel_conv(site: Site) -> int | None:
    """The channels of an NCHWc depthwise 1x1 convolution with no BatchNorm or scalar step of its own, else None.

    ONNX Runtime's NCHWc transformer writes a BatchNormalization no Conv absorbs so (ConvMixer's
    BatchNorm after the activation): weight ``gamma / sqrt(var + eps)`` ``[C, 1, 1, 1]``, bias
    ``beta - mean * that``, ``group`` C (with a residual Add after it as its fourth input).
    """
    weight = site.operand("weight")
    if site.family != "conv" or weight is None or not weight.blocked or site.batchnorm is not None or site.post or site.part:
        return None
    channels = weight.shape[0]
    if channels < 2 or any(d != 1 for d in weight.shape[1:]) or tuple(site.token[2:]) != (channels,):
        return None
    return channels


def _batchnorm_as_conv(site: Site, token: tuple[object, ...], channels: int) -> Site:
    """A lone BatchNorm's generic site as the per-channel 1x1 convolution it computes (:attr:`Site.lone_batchnorm`)."""
    gamma, beta, mean, var = site.operands
    weight_shape = token[1]
    assert isinstance(weight_shape, tuple)
    operands = (replace(gamma, role="weight", shape=weight_shape), replace(beta, role="bias", shape=(channels,)),
                replace(mean, role="bn3", shape=(channels,)), replace(var, role="bn4", shape=(channels,)))  # fmt: skip
    return Site(site.node, 0, "conv", token, operands, site.ops, site.tail, site.node, weighs=site.weighs, live=site.live)


def _pair_batchnorms_as_convs(
    reference: ModelGraph,
    suspect: ModelGraph,
    ref_sites: list[Site],
    sus_sites: list[Site],
    signatures: tuple[_Signatures, _Signatures],
    pairs: dict[int, int],
    how: dict[int, tuple[str, float | None, float | None]],
) -> None:
    """Pair a BatchNormalization no layer absorbs with the NCHWc depthwise 1x1 Conv it was written as.

    ``ORT_ENABLE_ALL`` on an x86 CPU turns such a BatchNorm (one after an activation, which no
    Conv folds) into a ``com.microsoft.nchwc`` Conv of weight ``gamma / sqrt(var + eps)`` and
    bias ``beta - mean * gamma / sqrt(var + eps)``: the BatchNorm folded into a 1x1 convolution
    of weight ones and bias zeros. Among the sites both models left unpaired, each such BatchNorm
    (either model's) is read as that convolution (:attr:`Site.lone_batchnorm`, token the
    convolution's) and paired as sites of one token are: content where decisive, else the
    alignment of these sites in graph order, else order. Its weight and bias are then compared
    folded, as a folded BatchNorm's are (its mean and variance have no counterpart). Sites that
    stay unpaired keep their own form.
    """
    graphs, lists = (reference, suspect), (ref_sites, sus_sites)
    for norm_side in (0, 1):
        conv_side = 1 - norm_side
        taken = (set(pairs), set(pairs.values()))
        convs = {n: c for n, site in enumerate(lists[conv_side]) if n not in taken[conv_side] and (c := _channel_conv(site)) is not None}
        if not convs:  # (no model without the NCHWc layout has one)
            continue
        norms = {n: c for n, site in enumerate(lists[norm_side])
                 if n not in taken[norm_side] and (c := _lone_batchnorm(graphs[norm_side], site)) is not None}  # fmt: skip
        tokens = {c: lists[conv_side][n].token for n, c in convs.items()}
        rewritten = {n: _batchnorm_as_conv(lists[norm_side][n], tokens[c], c) for n, c in norms.items() if c in tokens}
        if not rewritten:
            continue
        trial = list(lists[norm_side])
        for number, site in rewritten.items():
            trial[number] = site
        trial_sig = _Signatures(graphs[norm_side], trial)
        sides = [sorted(rewritten), sorted(convs)] if norm_side == 0 else [sorted(convs), sorted(rewritten)]
        channels = [[(norms if side == norm_side else convs)[n] for n in sides[side]] for side in (0, 1)]
        matcher = difflib.SequenceMatcher(None, channels[0], channels[1], autojunk=False)
        structural = {sides[0][b.a + k]: sides[1][b.b + k] for b in matcher.get_matching_blocks() for k in range(b.size)}
        classes: dict[int, tuple[list[int], list[int]]] = {}
        for side in (0, 1):
            for number, count in zip(sides[side], channels[side]):
                classes.setdefault(count, ([], []))[side].append(number)
        sigs = (trial_sig, signatures[1]) if norm_side == 0 else (signatures[0], trial_sig)
        found: dict[int, int] = {}
        for rows, cols in classes.values():
            if rows and cols:
                _pair_class(rows, cols, structural, sigs[0], sigs[1], found, how)
        for mine, theirs in found.items():
            pairs[mine] = theirs
            number = mine if norm_side == 0 else theirs
            lists[norm_side][number] = rewritten[number]
            signatures[norm_side].forget(number)


def _squeezed_token(site: Site) -> tuple[object, ...]:
    """A generic site's token with the unit axes of its operands' shapes left out."""
    return ("other", site.token[1], site.token[2], tuple((o.slot, tuple(d for d in o.shape if d != 1)) for o in site.operands))


def _telling_signature(graph: ModelGraph, site: Site) -> list[np.ndarray] | None:
    """The signature of a generic site's operands without their unit axes; None where they cannot tell sites apart.

    An operand that cannot be read, or holds one value throughout (a zero initial state, a
    tensor of ones), says nothing about which site is which: such sites are left unpaired.
    """
    parts: list[np.ndarray] = []
    for operand in site.operands:
        if (operand.axes is not None or operand.split is not None or operand.block is not None or operand.nbits
                or operand.quantized or operand.blocked):  # fmt: skip
            return None  # laid out by its own reader: its canonical shape is not the stored one's
        read = read_operand(graph, operand, bounds=False)
        if read is None or read.value.size < 2:
            return None
        value = np.asarray(read.value, dtype=np.float64)
        first = value.flat[0]
        if not np.all(np.isfinite(value)) or bool(np.all(value == first)):
            return None
        parts.extend(signature(value.reshape(tuple(d for d in value.shape if d != 1))))
    return parts


def _pair_across_unit_axes(
    reference: ModelGraph,
    suspect: ModelGraph,
    ref_sites: list[Site],
    sus_sites: list[Site],
    pairs: dict[int, int],
    how: dict[int, tuple[str, float | None, float | None]],
) -> None:
    """Pair generic sites left over by both models whose constants differ only by unit axes.

    ONNX Runtime's transpose optimizer stores a rotary table ``[1, 1, S, D]`` as ``[1, S, 1, D]``
    (the Transpose moved past the Mul folded into the table): the same numbers, another token.
    Only sites left unpaired by the tokens as stored are considered, only those whose every
    operand varies (:func:`_telling_signature`: a constant tensor, a zero initial state, of the
    same non-unit shape as another would pair with it on shape alone, which decides nothing),
    and only pairs equal within storage rounding (:data:`_NEAR_EXACT`): a layout is all that
    tells them apart, so anything more is left to the divergences, as before. Except where
    another table of the same token pairs so (the layout did move): a table there that differs
    beyond any storage's rounding (:data:`_NEAR_QUANTIZED`) and that the graph order pairs is
    kept, so the audit compares it and says ``modified`` rather than "different models" (a
    scaled rotary table under ORT's optimizer, held-out round 11). Paired sites are rewritten in
    place with the unit axes left out of their operands' canonical shapes, so both sides
    compare in one layout.
    """
    paired_suspect = set(pairs.values())
    left_over = [
        {n: _squeezed_token(site) for n, site in enumerate(sites) if n not in taken and site.family == "other"}
        for sites, taken in ((ref_sites, set(pairs)), (sus_sites, paired_suspect))
    ]
    both = set(left_over[0].values()) & set(left_over[1].values())  # read values only where a counterpart may be
    sides: list[dict[int, list[np.ndarray]]] = [{}, {}]
    ref_left: list[int] = []
    sus_left: list[int] = []
    for graph, sites, tokens, signatures, left in (
        (reference, ref_sites, left_over[0], sides[0], ref_left),
        (suspect, sus_sites, left_over[1], sides[1], sus_left),
    ):
        for number, token in tokens.items():
            if token not in both:
                continue
            found = _telling_signature(graph, sites[number])
            if found is not None:
                signatures[number] = found
                left.append(number)
    if not ref_left or not sus_left:
        return
    ref_tokens = [_squeezed_token(ref_sites[n]) for n in ref_left]
    sus_tokens = [_squeezed_token(sus_sites[n]) for n in sus_left]
    matcher = difflib.SequenceMatcher(None, ref_tokens, sus_tokens, autojunk=False)
    structural = {ref_left[b.a + k]: sus_left[b.b + k] for b in matcher.get_matching_blocks() for k in range(b.size)}
    classes: dict[tuple[object, ...], tuple[list[int], list[int]]] = {}
    for number, token in zip(ref_left, ref_tokens):
        classes.setdefault(token, ([], []))[0].append(number)
    for number, token in zip(sus_left, sus_tokens):
        if token in classes:
            classes[token][1].append(number)
    found_pairs: dict[int, int] = {}
    moved: set[int] = set()  # rows of a class in which a table is the same numbers in another layout
    for rows, cols in classes.values():
        if rows and cols:
            _pair_class(rows, cols, structural, sides[0], sides[1], found_pairs, how)
            made_here = [how[row][2] for row in rows if row in found_pairs]
            if any(made is not None and made <= _NEAR_EXACT for made in made_here):
                moved.update(rows)
    for mine, theirs in found_pairs.items():
        method, _, made = how[mine]
        # The same numbers; or, in a class where a table is (so the layout moved), a table
        # changed beyond any storage's rounding that the graph order puts there: compared, and
        # found changed (a scaled rotary table), rather than left unpaired and the models
        # refused as different. One within a quantizer's rounding stays unpaired, as before.
        changed = made is not None and made > _NEAR_QUANTIZED and method in ("structure", "order") and mine in moved
        if made is None or (made > _NEAR_EXACT and not changed):
            del how[mine]
            continue
        pairs[mine] = theirs
        ref_sites[mine], sus_sites[theirs] = _without_unit_axes(ref_sites[mine]), _without_unit_axes(sus_sites[theirs])


def _without_unit_axes(site: Site) -> Site:
    """A generic site with its operands' canonical shapes (and its token) free of unit axes."""
    operands = tuple(replace(o, shape=tuple(d for d in o.shape if d != 1)) for o in site.operands)
    return replace(site, operands=operands, token=_squeezed_token(site))


def _pair_class(
    rows: list[int],
    cols: list[int],
    structural: dict[int, int],
    ref_sig: _Signatures | dict[int, list[np.ndarray]],
    sus_sig: _Signatures | dict[int, list[np.ndarray]],
    pairs: dict[int, int],
    how: dict[int, tuple[str, float | None, float | None]],
) -> None:
    """Pair the sites of one token: decisive content, then the alignment, then order."""
    table = np.array([[distance(ref_sig[r], sus_sig[s]) for s in cols] for r in rows], dtype=np.float64)
    table = np.where(np.isfinite(table), table, 4.0)
    row_twins, col_twins = _twins([ref_sig[r] for r in rows]), _twins([sus_sig[c] for c in cols])
    content, decisive, confined = _content_decisions(table, row_twins, col_twins)
    position = {s: j for j, s in enumerate(cols)}
    taken: set[int] = set()
    decided: dict[int, tuple[int, str]] = {}
    for i, j in content.items():
        if i in decisive:
            method = "structure" if structural.get(rows[i]) == cols[j] else "content"
            decided[i] = (j, method)
            taken.add(j)
    own_table, by_own, own_confined = _decided_by_own_weights(rows, cols, ref_sig, sus_sig, decisive | set(confined), taken)
    for i, j in by_own.items():
        decided[i] = (j, "structure" if structural.get(rows[i]) == cols[j] else "content")
        taken.add(j)
    confined.update(own_confined)
    # A counterpart content rules out: the site has a counterpart equal within storage rounding
    # and this one is decisively farther. Identical copies (a rotary table read by the queries
    # and by the keys) leave content undecided between them, yet still rule out the other table
    # of the same shape, whatever the order says. Under noise no counterpart is that close, and
    # content, unreliable there, rules nothing out.
    # The same holds from the other side: a counterpart with an equal site among these rules
    # out the sites decisively farther (one table stored again in another layout leaves one
    # suspect site of the reference's shape, which the reference's other table must not take).
    # Equal here means within an 8-bit quantizer's rounding too (a rotary table put through
    # QuantizeLinear/DequantizeLinear by a static quantizer: held-out round 12, F8).
    nearest, nearest_col = table.min(axis=1), table.min(axis=0)
    ruled_out = (table > 1e-9) & (
        ((nearest[:, None] <= _NEAR_QUANTIZED) & (nearest[:, None] <= DECISIVE_RATIO * table))
        | ((nearest_col[None, :] <= _NEAR_QUANTIZED) & (nearest_col[None, :] <= DECISIVE_RATIO * table))
    )
    for i, block in confined.items():  # within its block a twin rules nothing out: one float, one quantized
        ruled_out[i] = ~block
    for i, r in enumerate(rows):
        if i in decided or r not in structural or structural[r] not in position:
            continue
        j = position[structural[r]]
        if j not in taken and not ruled_out[i, j]:
            decided[i] = (j, "structure")
            taken.add(j)
    left_rows = [i for i in range(len(rows)) if i not in decided]
    left_cols = [j for j in range(len(cols)) if j not in taken]
    for i in left_rows:  # in graph order: the first counterpart left that content allows
        allowed = next((j for j in left_cols if not ruled_out[i, j]), None)
        if allowed is not None:
            decided[i] = (allowed, "order")
            left_cols.remove(allowed)
    # Then what content rules out, in order: only where no other site left could take it (a
    # site whose every counterpart is ruled out must not take the one another site equals).
    for i in left_rows:
        if i not in decided and left_cols:
            decided[i] = (left_cols.pop(0), "order")
    for i, (j, method) in decided.items():
        pairs[rows[i]] = cols[j]
        best = float(table[i, j])
        # How much closer the chosen counterpart is than any other candidate of either site
        # (negative: content preferred another, and the structure or the order decided); for
        # a pair its own weights decided, by those (the distance stays the whole signature's).
        margins = own_table if i in by_own and own_table is not None else table
        others = np.concatenate([np.delete(margins[i], j), np.delete(margins[:, j], i)])
        second = float(others.min()) if others.size else float("inf")
        margin = 1.0 - float(margins[i, j]) / second if 0 < second < 4.0 else None
        how[rows[i]] = (method, margin, best if best < 4.0 else None)


def _content_decisions(
    table: np.ndarray, row_twins: np.ndarray, col_twins: np.ndarray
) -> tuple[dict[int, int], set[int], dict[int, np.ndarray]]:
    """What content decides in a table of signature distances (rows: reference sites, columns: suspect's).

    Returns the least-distance assignment, the rows it pairs decisively (the best at most
    :data:`DECISIVE_RATIO` of the second best) and the twin rows it confines to a block of
    counterparts (by their columns).
    """
    chosen_rows, chosen_cols = linear_sum_assignment(table)
    content = {int(i): int(j) for i, j in zip(chosen_rows, chosen_cols)}
    decisive: set[int] = set()
    # Twins (sites of one model reading equal weights: ALBERT's layers, DeBERTa's query read by
    # two MatMuls) compete for the same counterparts: a site's second best is looked for outside
    # its twins and theirs (without twins: the row and column less the pair itself). Content
    # then only confines the site to that block; which twin takes which is the alignment's and
    # the order's to say, content being blind to it.
    confined: dict[int, np.ndarray] = {}
    assigned_col = np.full(table.shape[0], -1)
    assigned_row = np.full(table.shape[1], -1)
    for i, j in content.items():
        assigned_col[i], assigned_row[j] = j, i
    for i, j in content.items():
        same_rows, same_cols = row_twins == row_twins[i], col_twins == col_twins[j]
        block_cols = same_cols.copy()
        block_cols[assigned_col[same_rows & (assigned_col >= 0)]] = True
        block_rows = same_rows.copy()
        block_rows[assigned_row[same_cols & (assigned_row >= 0)]] = True
        others = np.concatenate([table[i, ~block_cols], table[~block_rows, j]])
        second = float(others.min()) if others.size else float("inf")
        if second > 1e-9 and table[i, j] <= DECISIVE_RATIO * second:
            if np.count_nonzero(same_rows) > 1 or np.count_nonzero(same_cols) > 1:
                confined[i] = block_cols
            else:
                decisive.add(i)
    return content, decisive, confined


def _decided_by_own_weights(
    rows: list[int],
    cols: list[int],
    ref_sig: _Signatures | dict[int, list[np.ndarray]],
    sus_sig: _Signatures | dict[int, list[np.ndarray]],
    settled: set[int],
    taken: set[int],
) -> tuple[np.ndarray | None, dict[int, int], dict[int, np.ndarray]]:
    """Sites whose own weights, their bias and shift left out, decide a counterpart the whole signature did not.

    A converter stores equal biases once (ONNX Runtime's extended level and onnxslim
    deduplicate BART's and CLIP's zero biases, read by a dozen layers); one element changed
    there moves every reader's signature by the same large amount (a zero bias made nonzero
    is as far as two signatures get), so no reader's counterpart is decisively nearer than
    the others, the structure and the order pair a reordered graph crosswise, and the two
    models are refused as different (held-out round 14, F7). A layer's own weight still tells
    it apart: where it decides (:func:`_content_decisions`) it decides, or confines twins to
    their block (DeBERTa's query and key, each read by two MatMuls), and the audit then
    compares the changed bias. Only rows not ``settled`` (decided or confined by the whole
    signature) and counterparts not ``taken``; the whole signature's decisions are kept.

    Returns:
        The table of the own weights' distances (None where none was needed), the rows it
        decides and the twin rows it confines (by position in ``rows`` and ``cols``).
    """
    if not isinstance(ref_sig, _Signatures) or not isinstance(sus_sig, _Signatures) or len(rows) + len(cols) < 3:
        return None, {}, {}
    open_rows = [i for i in range(len(rows)) if i not in settled]
    if not any(len(ref_sig.own(rows[i])) < len(ref_sig[rows[i]]) for i in open_rows):
        return None, {}, {}  # no site left open reads a bias or shift: its own weights are its whole signature
    ref_own, sus_own = [ref_sig.own(r) for r in rows], [sus_sig.own(c) for c in cols]
    if not all(ref_own) or not all(sus_own):
        return None, {}, {}
    table = np.array([[distance(a, b) for b in sus_own] for a in ref_own], dtype=np.float64)
    table = np.where(np.isfinite(table), table, 4.0)
    row_twins = _twins(ref_own)
    content, decisive, confined = _content_decisions(table, row_twins, _twins(sus_own))
    decided = {i: j for i, j in content.items() if i in decisive and i not in settled and j not in taken}
    # A twin the assignment left out (more twins than counterparts) is confined with its twin.
    blocks = {int(row_twins[i]): block for i, block in confined.items()}
    return table, decided, {i: blocks[int(t)] for i, t in enumerate(row_twins) if int(t) in blocks and i not in settled}


def _signature_key(signature: list[np.ndarray]) -> tuple[tuple[tuple[int, ...], bytes], ...]:
    """A signature as a hashable value: bitwise equal ones are the same weight (or an equal copy) read twice."""
    return tuple((part.shape, part.tobytes()) for part in signature)


def _twins(signatures: list[list[np.ndarray]]) -> np.ndarray:
    """Per site, the first site of the list whose signature is bitwise equal to its own."""
    first: dict[tuple[tuple[tuple[int, ...], bytes], ...], int] = {}
    return np.array([first.setdefault(_signature_key(sig), n) for n, sig in enumerate(signatures)], dtype=np.int64)


def _pair_weighing_twins(
    ref_sites: list[Site],
    sus_sites: list[Site],
    ref_sig: _Signatures,
    sus_sig: _Signatures,
    pairs: dict[int, int],
    how: dict[int, tuple[str, float | None, float | None]],
) -> None:
    """Give a layer that reads activations the counterpart that reads activations, among twins.

    DeBERTa-v2 projects its relative-position table through each layer's query and key
    weights: two MatMuls of one weight, one on the hidden states, one on constants (a layer of
    constants, which does not weigh). Content cannot tell the two apart, and a quantizer
    reorders or folds the constant one (``quantize_dynamic`` leaves it in float after the
    quantized ones; ``quant_pre_process`` folds it away), so the order may pair the hidden
    states' layer with the constants' one, and every connection of both then counts as lost.
    Where a pair joins a weighing site to a non-weighing one and the side's twin (same token,
    same content) matches the other's kind, the twin takes the counterpart: swapped with the
    twin's own, or moved where the twin had none. Twins read equal weights, so no weight is
    paired with another value than before.
    """
    back = {b: a for a, b in pairs.items()}
    for mine in sorted(pairs):
        theirs = pairs.get(mine)
        if theirs is None or ref_sites[mine].weighs == sus_sites[theirs].weighs:
            continue
        twin = _hand_to_twin(ref_sites, ref_sig, sus_sites, pairs, back, mine, theirs)
        if twin is not None:  # the distances stay with the pairs: the twins' contents are equal
            made, other = how.pop(mine), how.pop(twin, None)
            how[twin] = made
            if other is not None:
                how[mine] = other
            continue
        _hand_to_twin(sus_sites, sus_sig, ref_sites, back, pairs, theirs, mine)


def _hand_to_twin(
    sites: list[Site],
    signatures: _Signatures,
    counterparts: list[Site],
    forward: dict[int, int],
    backward: dict[int, int],
    mine: int,
    theirs: int,
) -> int | None:
    """Give ``mine``'s counterpart ``theirs`` to a twin of ``mine`` of its kind (see :func:`_pair_weighing_twins`).

    ``forward`` pairs ``sites`` with ``counterparts`` (``backward`` the other way). The twin's
    own counterpart, if of ``mine``'s kind, goes to ``mine``; without one, ``mine`` is left
    unpaired. Returns the twin, or None where there is none.
    """
    key = _signature_key(signatures[mine])
    for twin, site in enumerate(sites):
        if twin == mine or site.token != sites[mine].token or site.weighs != counterparts[theirs].weighs:
            continue
        partner = forward.get(twin)
        if partner is not None and counterparts[partner].weighs != sites[mine].weighs:
            continue
        if _signature_key(signatures[twin]) != key:
            continue
        if partner is None:
            del forward[mine]
        else:
            forward[mine], backward[partner] = partner, mine
        forward[twin], backward[theirs] = theirs, twin
        return twin
    return None


# -- connections ------------------------------------------------------------------------------
#: Site families whose connections are compared: layers and tables (a normalisation's scale
#: and shift move between fused and unfused forms; layers do not).
_CONNECTED_FAMILIES = ("dense", "conv", "conv-transpose", "table")
#: Operators whose output depends on their input's shape only.
_SHAPE_READERS = frozenset({"Shape", "Size"})


def _successors(graph: ModelGraph, sites: list[Site]) -> set[tuple[int, int]]:
    """Pairs (a, b) of layer sites where b is the next layer on some path from a's output.

    What a converter keeps: fusing MatMul and Add, packing Q/K/V into one Attention, folding
    a BatchNorm or quantizing leave which layer feeds which layer unchanged; two architectures
    that merely share layer shapes do not.
    """
    at_node: dict[int, list[int]] = {}
    for number, site in enumerate(sites):
        if site.family in _CONNECTED_FAMILIES:
            at_node.setdefault(site.node, []).append(number)
    edges: set[tuple[int, int]] = set()
    reached_from: dict[tuple[int, int], set[int]] = {}
    for number, site in enumerate(sites):
        if site.family not in _CONNECTED_FAMILIES:
            continue
        tail_outputs = graph.nodes[site.tail].output
        # A part of a layer packed behind a Split starts at its own output: the other parts'
        # readers are not its successors (the same layer cut by Slices has one tail per part).
        own = graph.nodes[site.tail].op_type == "Split" and site.node != site.tail and site.part < len(tail_outputs)
        tail = (site.tail, site.part if own else -1)
        if tail not in reached_from:
            found: set[int] = set()
            stack = [tail_outputs[site.part]] if own else [name for name in tail_outputs if name]
            seen: set[str] = set(stack)
            while stack:
                for index, slot in graph.consumers.get(stack.pop(), []):
                    # Shape arithmetic reads sizes, not values: a simplifier folds it away.
                    if index < 0 or graph.nodes[index].op_type in _SHAPE_READERS:
                        continue
                    # An NCHWc Conv's fourth input is a residual Add fused after it: passed through.
                    if index in at_node and index != site.node and not is_fused_sum(graph, index, slot):
                        found.update(at_node[index])
                        continue
                    outputs = graph.nodes[index].output
                    if graph.nodes[index].op_type == "DynamicQuantizeLinear":  # its scale reaches the next layer's Mul
                        outputs = outputs[:1]
                    for name in outputs:
                        if name and name not in seen:
                            seen.add(name)
                            stack.append(name)
            reached_from[tail] = found
        edges.update((number, other) for other in reached_from[tail])
    return edges


def _settle_by_connections(
    reference: ModelGraph,
    suspect: ModelGraph,
    ref_sites: list[Site],
    sus_sites: list[Site],
    ref_sig: _Signatures,
    sus_sig: _Signatures,
    pairs: dict[int, int],
    how: dict[int, tuple[str, float | None, float | None]],
) -> None:
    """Re-pair layer sites that content cannot tell apart by the layers they connect to.

    One table read twice (BART's token embedding, shared by its encoder and decoder) gives two
    sites of equal content; where a converter reorders the graph (ONNX Runtime puts the decoder's
    Gather first) the alignment and the order pair them crosswise, and every layer each feeds
    then counts as a lost connection. Among the sites of one token whose counterparts content
    leaves interchangeable (none decisively farther than the site's own), the assignment that
    keeps the most connections to the other paired layers (both ways) is taken, only where it
    keeps strictly more than the pairing made so far.
    """
    classes: dict[tuple[object, ...], list[int]] = {}
    for mine in sorted(pairs):
        margin = how[mine][1] if mine in how else None
        if margin is not None and margin >= 1.0 - DECISIVE_RATIO:  # content decided it
            continue
        if ref_sites[mine].family in _CONNECTED_FAMILIES and sus_sites[pairs[mine]].token == ref_sites[mine].token:
            classes.setdefault(ref_sites[mine].token, []).append(mine)
    candidates: list[tuple[list[int], np.ndarray]] = []
    for rows in classes.values():
        if len(rows) < 2:
            continue
        table = np.array([[distance(ref_sig[r], sus_sig[pairs[c]]) for c in rows] for r in rows], dtype=np.float64)
        table = np.where(np.isfinite(table), table, 4.0)
        own = np.diag(table)[:, None]
        allowed = (table * DECISIVE_RATIO <= own) | (table <= _NEAR_EXACT)
        if np.count_nonzero(allowed) > len(rows):  # some site has an interchangeable counterpart
            candidates.append((rows, np.where(allowed, table, np.inf)))
    if not candidates:
        return
    ref_edges, sus_edges = _successors(reference, ref_sites), _successors(suspect, sus_sites)
    back = {b: a for a, b in pairs.items()}
    ref_next: dict[int, set[int]] = {}
    ref_prev: dict[int, set[int]] = {}
    sus_next: dict[int, set[int]] = {}
    sus_prev: dict[int, set[int]] = {}
    for a, b in ref_edges:
        ref_next.setdefault(a, set()).add(b)
        ref_prev.setdefault(b, set()).add(a)
    for a, b in sus_edges:  # keyed by the suspect's site, its neighbours in the reference's numbering
        if a in back and b in back:
            sus_next.setdefault(a, set()).add(back[b])
            sus_prev.setdefault(b, set()).add(back[a])
    for rows, table in candidates:
        cols = [pairs[r] for r in rows]
        score = np.array(
            [
                [len(ref_next.get(r, set()) & sus_next.get(c, set())) + len(ref_prev.get(r, set()) & sus_prev.get(c, set()))
                 for c in cols]
                for r in rows
            ],
            dtype=np.float64,
        )  # fmt: skip
        cost = np.where(np.isfinite(table), -score, 1e9)
        chosen_rows, chosen_cols = linear_sum_assignment(cost)
        if float(score[chosen_rows, chosen_cols].sum()) <= float(np.trace(score)):
            continue
        if any(not np.isfinite(table[i, j]) for i, j in zip(chosen_rows, chosen_cols)):
            continue
        for i, j in zip(chosen_rows, chosen_cols):
            if i != j:
                pairs[rows[int(i)]] = cols[int(j)]
                how[rows[int(i)]] = ("structure", None, float(table[i, j]) if table[i, j] < 4.0 else None)


def _connection_agreement(
    reference: ModelGraph, suspect: ModelGraph, ref_sites: list[Site], sus_sites: list[Site], pairs: dict[int, int]
) -> float:
    """Share of layer-to-layer connections among paired sites that both models have (Jaccard).

    A pair of a live site and a dead one (an edge rewired around a layer: held-out round 14,
    F7) is left out: the site and weight shares already count it lost, and its connections
    would count the same edit a second time, refusing as another model one that is mostly the
    same (the audit names the dead layer).
    """
    pairs = {a: b for a, b in pairs.items() if ref_sites[a].live == sus_sites[b].live}
    back = {b: a for a, b in pairs.items()}
    mine = {(a, b) for a, b in _successors(reference, ref_sites) if a in pairs and b in pairs}
    theirs = {(back[a], back[b]) for a, b in _successors(suspect, sus_sites) if a in back and b in back}
    union = mine | theirs
    return len(mine & theirs) / len(union) if union else 1.0


# -- groups -----------------------------------------------------------------------------------
def axis_labels(analysis: ChannelAnalysis, operand: Operand, axis: int) -> dict[str, np.ndarray]:
    """Per group on one canonical axis of an operand: which of its neurons sits at each position."""
    if operand.computed:  # bound where the constants it is computed from are
        read = operand.read_axis(axis)
        name = analysis.graph.nodes[operand.node].input[operand.slot]
        use = computed_use(analysis.graph, name, read, operand.node, operand.slot) if read is not None else None
        binding = analysis.state.bindings.get(use) if use is not None else None
        positions = slice(None)
    else:
        found = site_operand_axis(analysis.graph, operand, axis)
        if found is None:
            return {}
        leaf_axis, positions = found
        binding = analysis.state.bindings.get((operand.node, operand.slot, leaf_axis))
    if binding is None:
        return {}
    return {gid: lab[positions] for gid, lab in analysis.neuron_labels(binding.expr).items()}


def _vote_groups(match_sites: list[tuple[Site, Site]], reference: ChannelAnalysis, suspect: ChannelAnalysis) -> _Votes:
    """Which groups of the two models sit at the same positions of paired operands."""
    votes = _Votes()
    for number, (mine, theirs) in enumerate(match_sites):
        for operand in mine.operands:
            other = theirs.operand(operand.role)
            if other is None or other.shape != operand.shape:
                continue
            for axis in range(len(operand.shape)):
                ref_labels = axis_labels(reference, operand, axis)
                if not ref_labels:
                    continue
                sus_labels = axis_labels(suspect, other, axis)
                if not sus_labels:  # the suspect's analysis gave up on the operator holding it
                    for a in ref_labels:
                        votes.unbound.setdefault(a, []).append(number)
                alike = {
                    (a, b)
                    for a, lab_a in ref_labels.items()
                    for b, lab_b in sus_labels.items()
                    if lab_a.shape == lab_b.shape and np.any(lab_a >= 0) and np.array_equal(lab_a, lab_b)
                }
                for a, b in alike:
                    votes.voters.setdefault((a, b), []).append(number)
                    votes.overlap.setdefault(a, set()).add(b)
                    votes.overlap_back.setdefault(b, set()).add(a)
                    votes.exact.setdefault(a, Counter())[b] += 1
                    votes.exact_back.setdefault(b, Counter())[a] += 1
                # A group held alike by none here (the other side holds these positions in
                # groups of another structure) touches every group it shares positions with.
                lonely_ref = set(ref_labels) - {a for a, _ in alike}
                lonely_sus = set(sus_labels) - {b for _, b in alike}
                for a, lab_a in ref_labels.items():
                    for b, lab_b in sus_labels.items():
                        if (a in lonely_ref or b in lonely_sus) and lab_a.shape == lab_b.shape and np.any(
                            (lab_a >= 0) & (lab_b >= 0)
                        ):
                            votes.voters.setdefault((a, b), []).append(number)
                            votes.overlap.setdefault(a, set()).add(b)
                            votes.overlap_back.setdefault(b, set()).add(a)
    return votes


@dataclass
class _Votes:
    """Group pairs seen at the same positions, and the site pairs behind each.

    ``exact`` where both hold the positions alike (same neuron at each), ``overlap`` wherever they
    share positions at all; ``voters``: the site pairs (by number) behind each.
    """

    exact: dict[str, Counter[str]] = field(default_factory=dict)
    exact_back: dict[str, Counter[str]] = field(default_factory=dict)
    overlap: dict[str, set[str]] = field(default_factory=dict)
    overlap_back: dict[str, set[str]] = field(default_factory=dict)
    voters: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    #: Reference groups at positions where the suspect binds no permutation, and the site pairs.
    unbound: dict[str, list[int]] = field(default_factory=dict)


def _pair_groups(
    reference: ChannelAnalysis,
    suspect: ChannelAnalysis,
    match_sites: list[tuple[Site, Site]],
    how: list[tuple[str, float | None, float | None]],
) -> tuple[list[GroupPair], list[UnmatchedGroup]]:
    """Pair each reference group with the suspect group holding its neurons alike, or say why not.

    Where the suspect holds a group's neurons in groups of another structure (frozen by its
    form, restricted to whole quantization blocks by MatMulNBits, split or merged), the group
    is paired as not permutable in both: resync solves it in the reference's form and leaves
    it in place in the output.
    """
    votes = _vote_groups(match_sites, reference, suspect)
    pairs: list[GroupPair] = []
    unmatched: list[UnmatchedGroup] = []
    paired_suspect: set[str] = set()
    other_way: set[str] = set()  # suspect groups listed as solved the other way round
    alike_ids: set[str] = set()  # suspect groups paired alike (solved in the reference's form)

    def made(a: str, bs: list[str]) -> tuple[str, float | None, float | None]:
        """How the sites behind a pairing were paired (the weakest of them)."""
        numbers = {n for b in bs for n in votes.voters.get((a, b), [])} or set(votes.unbound.get(a, []))
        methods = {how[n][0] for n in numbers}
        method = next((m for m in ("order", "content") if m in methods), "structure")
        margins = [m for n in numbers if (m := how[n][1]) is not None]
        distances = [d for n in numbers if (d := how[n][2]) is not None]
        return method, (min(margins) if margins else None), (max(distances) if distances else None)

    for group in reference.groups:
        exact = votes.exact.get(group.id, Counter())
        touching = votes.overlap.get(group.id, set())
        if not touching:
            if group.id not in votes.unbound:
                unmatched.append(_unmatched("reference", group, "no paired operator writes it"))
                continue
            # The suspect's analysis froze the operators holding these neurons (it binds nothing
            # there): solved in the reference's form, its values are still paired.
            pairs.append(GroupPair(group.id, "-", group.size, False, *made(group.id, []), alike=False))
            if group.permutable:
                why = "frozen in the suspect: its analysis binds no permutation where the paired operators hold it"
                unmatched.append(_unmatched("reference", group, why))
            continue
        if len(exact) == 1 and set(exact) == touching:
            (other_id,) = exact
            other = suspect.group(other_id)
            alike = set(votes.exact_back.get(other_id, ())) == {group.id} == votes.overlap_back.get(other_id, set())
            if alike and other.size == group.size:
                paired_suspect.add(other_id)
                alike_ids.add(other_id)
                pairs.append(GroupPair(group.id, other_id, group.size, group.permutable and other.permutable,
                                       *made(group.id, [other_id])))  # fmt: skip
                if group.permutable and not other.permutable:
                    reasons = "; ".join(str(r) for r in other.reasons) or "fewer than two neurons"
                    unmatched.append(_unmatched("reference", group, f"frozen in the suspect (as {other_id}): {reasons}"))
                elif other.permutable and not group.permutable:
                    reasons = "; ".join(str(r) for r in group.reasons) or "fewer than two neurons"
                    unmatched.append(_unmatched("suspect", other, f"frozen in the reference (as {group.id}): {reasons}"))
                continue
        # The suspect holds these neurons otherwise: solved in the reference's form (its values
        # are paired tensor by tensor) and left in place in the output.
        partners = sorted(touching)
        ids = ", ".join(partners)
        pairs.append(GroupPair(group.id, ids, group.size, False, *made(group.id, partners), alike=False))
        others = [suspect.group(other) for other in partners]
        if group.permutable:
            paired_suspect.update(partners)
            if all(other.frozen for other in others):
                reasons = "; ".join(str(r) for other in others for r in other.reasons) or "fewer than two neurons"
                why = f"frozen in the suspect (as {ids}): {reasons}"
            else:
                why = (
                    f"the suspect holds its neurons in groups of another structure ({ids}): "
                    "solved in the reference's form, left in place in the output"
                )
            unmatched.append(_unmatched("reference", group, why))
            # A movable suspect group that is a factor of this one (the query heads within one
            # key/value head of GroupQueryAttention, which the reference's form pins) moves
            # neurons the reference's form cannot say: solved the other way round.
            for other in others:
                if other.permutable and other.id not in other_way:
                    other_way.add(other.id)
                    unmatched.append(_unmatched(
                        "suspect", other,
                        f"the reference holds its neurons in a group of another structure (as {group.id}): "
                        "solved in the suspect's form",
                    ))  # fmt: skip
        else:  # only the suspect's form can move them: left to be solved the other way round
            reasons = "; ".join(str(r) for r in group.reasons) or "fewer than two neurons"
            for other in others:
                if other.permutable and other.id not in paired_suspect and other.id not in other_way:
                    paired_suspect.add(other.id)
                    other_way.add(other.id)
                    unmatched.append(_unmatched("suspect", other, f"frozen in the reference (as {group.id}): {reasons}"))
    for group in suspect.groups:
        if group.id not in paired_suspect and group.permutable:
            unmatched.append(_unmatched("suspect", group, "no reference group holds its neurons"))
    # Frozen groups with no counterpart matter to nobody: keep only permutable ones. A suspect
    # group some reference group holds alike is solved in the reference's form, not mirrored.
    unmatched = [
        item
        for item in unmatched
        if ((reference if item.model == "reference" else suspect).group(item.group).permutable
            or item.reason.startswith("frozen in"))
        and not (item.model == "suspect" and item.group in alike_ids and item.reason.startswith("the reference holds"))
    ]  # fmt: skip
    return pairs, unmatched


def _unmatched(model: str, group: Any, reason: str) -> UnmatchedGroup:
    return UnmatchedGroup(model, group.id, group.size, reason)


# -- conversions ------------------------------------------------------------------------------
_DTYPE_KIND: dict[int, str] = {
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}
_LINEAR_FAMILIES = ("dense", "conv", "conv-transpose")
#: Opset domains only ONNX Runtime's offline optimizer writes into a saved model (it imports
#: every domain it registers).
_ORT_DOMAINS = frozenset({"com.microsoft.nchwc", "org.pytorch.aten", "ai.onnx.training"})


def _stored_type(graph: ModelGraph, operand: Operand) -> int | None:
    if operand.nbits:
        return None
    leaf = graph.constant_leaf(graph.nodes[operand.node].input[operand.slot])
    tensor = graph.leaf_tensor_or_none(leaf) if leaf is not None else None
    return None if tensor is None else tensor.data_type


def _quantized_form(graph: ModelGraph, operand: Operand) -> str | None:
    if operand.nbits:
        return f"{int(node_attribute(graph.nodes[operand.node], 'bits', 4))}-bit MatMulNBits"
    if operand.quantized:
        return quantized_form(graph, operand.node)
    leaf = graph.constant_leaf(graph.nodes[operand.node].input[operand.slot])
    if leaf is not None and any(graph.nodes[i].op_type == "DequantizeLinear" for i in leaf.chain):
        return "read through DequantizeLinear"
    return None


def _conversions(
    reference: ModelGraph, suspect: ModelGraph, pairs: list[tuple[Site, Site]], methods: Counter[str]
) -> list[ConversionFinding]:
    findings: list[ConversionFinding] = []
    graphs = {"reference": reference, "suspect": suspect}
    # Storage types and quantization of paired weights.
    types: dict[str, Counter[int]] = {"reference": Counter(), "suspect": Counter()}
    quantized: dict[str, Counter[str]] = {"reference": Counter(), "suspect": Counter()}
    weights = 0
    for mine, theirs in pairs:
        if mine.family not in _LINEAR_FAMILIES:
            continue
        weights += 1
        for side, site in (("reference", mine), ("suspect", theirs)):
            weight = site.operand("weight")
            assert weight is not None
            form = _quantized_form(graphs[side], weight)
            if form is not None:
                quantized[side][form] += 1
            stored = _stored_type(graphs[side], weight)
            if stored is not None and stored in _FLOAT_TYPES:
                types[side][stored] += 1
    for side in ("reference", "suspect"):
        other = "suspect" if side == "reference" else "reference"
        for dtype, count in sorted(types[side].items()):
            if dtype in _DTYPE_KIND and types[other][dtype] < count:
                findings.append(
                    ConversionFinding(
                        _DTYPE_KIND[dtype], side, f"{count} of {weights} paired weights stored as {_DTYPE_KIND[dtype]}"
                    )
                )
        if sum(quantized[side].values()) > sum(quantized[other].values()):
            listed = ", ".join(f"{count} {form}" for form, count in sorted(quantized[side].items()))
            findings.append(ConversionFinding("quantized", side, f"of {weights} paired weights, quantized: {listed}"))
    # Convolutions re-laid out in ONNX Runtime's NCHWc blocks on one side.
    blocked = {side: sum(1 for pair in pairs if (w := pair[n].operand("weight")) is not None and w.blocked)
               for n, side in enumerate(("reference", "suspect"))}  # fmt: skip
    for side, count in blocked.items():
        if count:
            block = nchwc_block(graphs[side])
            findings.append(ConversionFinding(
                "nchwc", side, f"{count} paired convolutions in ONNX Runtime's NCHWc layout (weights in blocks of {block} channels)"
            ))  # fmt: skip
    # BatchNorm folded on one side.
    folded = {"reference": 0, "suspect": 0}
    as_conv = {"reference": 0, "suspect": 0}  # a BatchNorm of its own written as a 1x1 convolution
    for mine, theirs in pairs:
        if mine.batchnorm is not None and theirs.batchnorm is None and theirs.family in _LINEAR_FAMILIES:
            (as_conv if mine.lone_batchnorm else folded)["suspect"] += 1
        elif theirs.batchnorm is not None and mine.batchnorm is None and mine.family in _LINEAR_FAMILIES:
            (as_conv if theirs.lone_batchnorm else folded)["reference"] += 1
    for side, count in folded.items():
        if count:
            findings.append(
                ConversionFinding(
                    "batchnorm-folded", side, f"{count} BatchNormalization folded into the preceding layer's weights"
                )
            )
    for side, count in as_conv.items():
        if count:
            findings.append(ConversionFinding(
                "batchnorm-folded", side, f"{count} BatchNormalization written as a per-channel 1x1 convolution"
            ))  # fmt: skip
    # A per-channel scale after a layer (timm's layer scale) folded on one side.
    scaled = {"reference": 0, "suspect": 0}
    for mine, theirs in pairs:
        mine_scaled, theirs_scaled = mine.operand("post") is not None, theirs.operand("post") is not None
        if mine_scaled and not theirs_scaled and theirs.family in _LINEAR_FAMILIES:
            scaled["suspect"] += 1
        elif theirs_scaled and not mine_scaled and mine.family in _LINEAR_FAMILIES:
            scaled["reference"] += 1
    for side, count in scaled.items():
        if count:
            findings.append(
                ConversionFinding("scale-folded", side, f"{count} per-channel scales (Mul) folded into the preceding layer's weights")
            )
    # Operators fused: the same weights held by other operators.
    fused: Counter[tuple[str, str]] = Counter()
    for mine, theirs in pairs:
        forms = tuple("+".join(op for op in site.ops if op != "BatchNormalization") for site in (mine, theirs))
        if forms[0] != forms[1] and all(forms):  # (a BatchNorm written as a convolution: named above)
            fused[forms] += 1  # type: ignore[index]
    if fused:
        side = "suspect" if len(suspect.nodes) <= len(reference.nodes) else "reference"
        listing = ", ".join(f"{count} {a} as {b}" for (a, b), count in sorted(fused.items(), key=lambda kv: -kv[1]))
        findings.append(ConversionFinding("fused", side, f"weights held by other operators (reference as suspect): {listing}"))
    # The tools that did it, where they sign their output.
    for side, graph in graphs.items():
        other_graph = suspect if side == "reference" else reference
        if _ORT_DOMAINS & set(graph.opsets) and not _ORT_DOMAINS & set(other_graph.opsets):
            findings.append(
                ConversionFinding(
                    "ort-optimized", side, "saved by ONNX Runtime's offline optimizer (optimized_model_filepath)"
                )
            )
        if graph.model.producer_name == "onnxruntime.transformers" and other_graph.model.producer_name != graph.model.producer_name:
            findings.append(
                ConversionFinding("ort-transformer-optimized", side, "written by onnxruntime.transformers.optimizer")
            )
    # Opset.
    ref_opset, sus_opset = reference.opsets.get("", 0), suspect.opsets.get("", 0)
    if ref_opset != sus_opset:
        newer = "suspect" if sus_opset > ref_opset else "reference"
        findings.append(ConversionFinding("opset", newer, f"opset {ref_opset} in the reference, {sus_opset} in the suspect"))
    # Renamed sites (a site is named by what it finally writes: folding moves names around).
    renamed = sum(
        1
        for mine, theirs in pairs
        if list(reference.nodes[mine.tail].output) != list(suspect.nodes[theirs.tail].output)
    )
    if renamed:
        findings.append(ConversionFinding("renamed", "suspect", f"{renamed} of {len(pairs)} paired operators renamed"))
    moved = methods["content"] + methods["order"]
    if moved:
        findings.append(
            ConversionFinding("reordered", "suspect", f"{moved} of {len(pairs)} paired operators in another order")
        )
    # Operators added or removed that do not compute anything new.
    ref_ops = Counter(node.op_type for node in reference.nodes if node.op_type in _PASS_THROUGH_OPS)
    sus_ops = Counter(node.op_type for node in suspect.nodes if node.op_type in _PASS_THROUGH_OPS)
    for side, mine_ops, theirs_ops in (("suspect", sus_ops, ref_ops), ("reference", ref_ops, sus_ops)):
        removed = theirs_ops - mine_ops
        if removed:
            listing = ", ".join(f"{count} {op}" for op, count in sorted(removed.items()))
            findings.append(ConversionFinding("simplified", side, f"fewer pass-through operators: {listing}"))
    return findings


# -- entry point ------------------------------------------------------------------------------
def _describe_site(graph: ModelGraph, site: Site, shapes: bool = True) -> str:
    """``Conv 'name'``, with the shapes of the weights it reads."""
    node = graph.nodes[site.node]
    text = f"{node.op_type} '{node_label(node, site.node)}'"
    if site.part:
        text += f" (part {site.part})"
    if not shapes:
        return text
    return text + " " + " ".join("[" + ",".join(str(d) for d in o.shape) + "]" for o in site.operands if not o.role.startswith("bn"))


def _divergences(
    reference: ModelGraph,
    suspect: ModelGraph,
    ref_sites: list[Site],
    sus_sites: list[Site],
    pairing: _Pairing,
) -> list[str]:
    """Where sites stayed without counterpart, by the alignment's unequal stretches."""
    found = []
    paired_suspect = set(pairing.pairs.values())
    for tag, a0, a1, b0, b1 in pairing.opcodes:
        if tag == "equal":
            continue
        ref_part = [
            _describe_site(reference, ref_sites[i])
            for i in range(a0, a1)
            if i not in pairing.pairs and ref_sites[i].weighs and ref_sites[i].live
        ]
        sus_part = [
            _describe_site(suspect, sus_sites[i])
            for i in range(b0, b1)
            if i not in paired_suspect and sus_sites[i].weighs and sus_sites[i].live
        ]
        if not ref_part and not sus_part:
            continue
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
    pairing = _pair_sites(ref_graph, sus_graph, ref_sites, sus_sites)
    ordered = sorted(pairing.pairs.items())
    pairs = [(ref_sites[a], sus_sites[b]) for a, b in ordered]
    how = [pairing.how[a] for a, _ in ordered]
    groups, unmatched = _pair_groups(reference, suspect, pairs, how)
    methods = Counter(method for method, _, _ in how)
    conversions = _conversions(ref_graph, sus_graph, pairs, methods)
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
    # The smallest of three shares: of weights, of sites (a narrower first layer holds few
    # weights but is a different model all the same) and of layer-to-layer connections (two
    # encoders of one width pair every layer, but not how the layers connect).
    sites = len(counted_ref) + len(counted_sus)
    connections = _connection_agreement(ref_graph, sus_graph, ref_sites, sus_sites, pairing.pairs)
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
        if site.family in _LINEAR_FAMILIES and counts(site) and site.size >= LAYER_ELEMENTS and number not in paired
    ]
    return ModelMatch(
        reference,
        suspect,
        {mine.key: theirs.key for mine, theirs in pairs},
        ref_sites,
        sus_sites,
        groups,
        unmatched,
        _divergences(ref_graph, sus_graph, ref_sites, sus_sites, pairing),
        conversions,
        (len(ref_sites), len(sus_sites)),
        confidence,
        site_pairs,
        unpaired_layers,
        shares,
    )


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


def match_models(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> ModelMatch:
    """Analyse both models (as resync does) and pair their groups. Neither model is modified."""
    return match_analyses(analyze_with_state(reference), analyze_with_state(suspect))
