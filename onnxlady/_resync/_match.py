"""Pair the channel groups of two models whose graphs are not node-for-node copies.

A suspect has often been through a converter after it was permuted or watermarked: float16
weights, BatchNorm folded into the preceding Conv, a simplifier that removes Identity nodes and
renames every tensor, QDQ int8 quantization, an opset upgrade. Names and node counts then
differ, but the *computation* keeps its skeleton: the same linear layers in the same order with
weights of the same shapes, the same normalisations and per-channel constants. Matching works on
that skeleton, never on names:

1. Each model is reduced to its *sites*: nodes that read a weight. A Conv/ConvTranspose/Gemm/
   MatMul with a constant weight is a *unit* together with its bias (its own input, or an Add
   of a constant right after it) and a BatchNormalization right after it (folding merges them
   into one node, so they must count as one on both sides); other nodes that read a float
   constant of more than one element (LayerNorm, PRelu, per-channel Mul/Add, unfused
   BatchNorm, Gather tables...) are sites of their own. Chain nodes that only carry a weight
   to its user (Identity, Cast, DequantizeLinear, Reshape...) are not sites.
2. Each site becomes a token -- operator type and the shapes of the constants it reads as it
   reads them (dequantized, after reshapes) -- and the two token sequences, in topological
   order, are aligned (:class:`difflib.SequenceMatcher`, longest common blocks). What does
   not align is reported as a divergence, naming the first operators on each side.
3. Paired sites pair the groups of their outputs axis by axis (both analyses' channel
   expressions, atom by atom). A group pairs with exactly one group of the same size, by every
   vote, or it is unmatched with the reason.

Conversions are recognised along the way (storage types of paired weights, BatchNorm present
on one side only, DequantizeLinear on one side only, opset versions, renamed sites, operators
removed or added) and reported as findings separate from integrity.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxlady._analysis._channels import ChannelAnalysis, analyze
from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._expr import Expr
from onnxlady._graph._model_graph import ModelGraph, node_label

__all__ = ["ConversionFinding", "GroupPair", "ModelMatch", "Unit", "UnmatchedGroup", "match_models"]

#: Operators that make a unit with their constant weight (and, for the first three, a following
#: BatchNormalization that folding would merge into them).
UNIT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
#: Operators a converter or simplifier adds or removes without changing the computation.
_PASS_THROUGH_OPS = frozenset({"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """A linear layer with a constant weight, its bias and the BatchNorm folding would absorb.

    ``out_axis`` is the axis of the weight, as the node reads it, that indexes output neurons.
    ``bias`` is the (node, input slot) of the bias as it is stored: the layer's own input, or
    the constant operand of an Add right after it.
    """

    node: int
    weight_slot: int
    out_axis: int
    bias: tuple[int, int] | None
    batchnorm: int | None


@dataclass(frozen=True)
class GroupPair:
    """A reference group and the suspect group holding the same neurons."""

    reference: str
    suspect: str
    size: int
    permutable: bool  # in both models


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

    kind: str  # "float16", "bfloat16", "float64", "batchnorm-folded", "quantized", "opset", "renamed", "simplified"
    model: str  # the side that has the converted form: "reference" or "suspect"
    detail: str


@dataclass
class ModelMatch:
    """How two models' sites and groups correspond."""

    reference: ChannelAnalysis
    suspect: ChannelAnalysis
    #: Paired sites: reference node index -> suspect node index (units by their linear node).
    sites: dict[int, int]
    reference_units: dict[int, Unit]
    suspect_units: dict[int, Unit]
    groups: list[GroupPair]
    unmatched: list[UnmatchedGroup]
    divergences: list[str]
    conversions: list[ConversionFinding]
    #: Site counts on each side (what the alignment worked on).
    site_counts: tuple[int, int] = (0, 0)
    _by_reference: dict[str, GroupPair] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_reference = {pair.reference: pair for pair in self.groups}

    def suspect_group(self, reference_group: str) -> GroupPair | None:
        return self._by_reference.get(reference_group)

    @property
    def complete(self) -> bool:
        """Every permutable group of either model is paired."""
        return not any(item.reason != "frozen in both models" for item in self.unmatched) and not self.divergences

    def to_dict(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "sites": {"reference": self.site_counts[0], "suspect": self.site_counts[1], "paired": len(self.sites)},
            "groups": [asdict(pair) for pair in self.groups],
            "unmatched": [asdict(item) for item in self.unmatched],
            "divergences": list(self.divergences),
            "conversions": [asdict(item) for item in self.conversions],
        }


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


def _constant_computed(graph: ModelGraph) -> set[str]:
    """Tensors computed from constants only (a Gather of a constant table at constant indices).

    A simplifier folds them into stored constants, so they count as constants on both sides.
    """
    known = set(graph.initializers) | set(graph.constant_nodes) | set(graph.folded)
    computed: set[str] = set()
    for index in graph.order:
        node = graph.nodes[index]
        if index in graph.implicit_inputs or not node.input or node.op_type.startswith("Random"):
            continue
        if all(not name or name in known or name in computed or graph.is_constant(name) for name in node.input):
            computed.update(name for name in node.output if name)
    return computed


def _constant_operand_shape(
    graph: ModelGraph, name: str, computed: set[str], planned: set[str]
) -> tuple[int, ...] | None:
    """Shape of a constant operand of more than one element that holds numbers, else None.

    A float, or any constant the analysis permutes (a one-hot's index table), stored or computed.
    Integer shapes and axes are left out: an opset upgrade moves them between attributes and
    inputs.
    """
    leaf = graph.constant_leaf(name)
    if _float_constant(graph, name) or (leaf is not None and leaf.name in planned):
        shape = graph.constant_shape(name)
    elif name in computed and graph.dtypes.get(name) in _FLOAT_TYPES:
        found = graph.shape(name)
        shape = tuple(found) if found is not None and all(isinstance(d, int) for d in found) else None  # type: ignore[arg-type]
    else:
        return None
    return shape if shape is not None and int(np.prod(shape)) > 1 else None


def _site_token(
    graph: ModelGraph, index: int, unit: Unit | None, computed: set[str], planned: set[str]
) -> tuple[Any, ...] | None:
    """What must agree for two sites to pair: operator and the shapes of what it reads."""
    node = graph.nodes[index]
    if unit is not None:
        shape = graph.constant_shape(node.input[unit.weight_slot])
        return ("unit", node.op_type, unit.weight_slot, shape, int(node_attribute(node, "group", 1)))
    if graph.is_chain_node(index) or (node.output and node.output[0] in computed):
        return None
    constants = tuple(
        (slot, shape)
        for slot, name in enumerate(node.input)
        if name and (shape := _constant_operand_shape(graph, name, computed, planned)) is not None
    )
    return (node.domain or "", node.op_type, constants) if constants else None


def _sites(graph: ModelGraph, units: dict[int, Unit], planned: set[str]) -> list[tuple[int, tuple[Any, ...]]]:
    """Sites in topological order with their tokens.

    A unit's bias Add and BatchNorm are none. ``planned``: the constants the analysis permutes.
    """
    absorbed = {u.batchnorm for u in units.values() if u.batchnorm is not None}
    absorbed |= {u.bias[0] for u in units.values() if u.bias is not None and u.bias[0] != u.node}
    computed = _constant_computed(graph)
    sites = []
    for index in graph.order:
        if index in absorbed:
            continue
        token = _site_token(graph, index, units.get(index), computed, planned)
        if token is not None:
            sites.append((index, token))
    return sites


# -- groups -----------------------------------------------------------------------------------
def _output_atoms(analysis: ChannelAnalysis, name: str) -> list[tuple[int, list[tuple[str, int]]]]:
    """Per tracked axis of a tensor: its groups (id, size) in expression order."""
    tracked = analysis.state.tracked.get(name, {})
    found = []
    for axis in sorted(tracked):
        expr: Expr = tracked[axis]
        groups = []
        for atom in analysis.solver.atoms(expr):
            group = analysis.group_of_root(atom.id)
            if group is not None:
                groups.append((group.id, group.size))
        found.append((axis, groups))
    return found


def _vote_groups(
    reference: ChannelAnalysis, suspect: ChannelAnalysis, sites: dict[int, int]
) -> tuple[dict[str, Counter[str]], dict[str, Counter[str]]]:
    """For every group, the groups of the other model seen at the same place of paired sites."""
    forward: dict[str, Counter[str]] = {}
    backward: dict[str, Counter[str]] = {}
    for ref_index, sus_index in sites.items():
        ref_node, sus_node = reference.graph.nodes[ref_index], suspect.graph.nodes[sus_index]
        for ref_name, sus_name in zip(ref_node.output, sus_node.output):
            if not ref_name or not sus_name:
                continue
            ref_axes = dict(_output_atoms(reference, ref_name))
            sus_axes = dict(_output_atoms(suspect, sus_name))
            for axis in ref_axes.keys() & sus_axes.keys():
                ref_groups, sus_groups = ref_axes[axis], sus_axes[axis]
                if len(ref_groups) != len(sus_groups):
                    continue
                for (a, _), (b, _) in zip(ref_groups, sus_groups):
                    forward.setdefault(a, Counter())[b] += 1
                    backward.setdefault(b, Counter())[a] += 1
    return forward, backward


def _pair_groups(
    reference: ChannelAnalysis, suspect: ChannelAnalysis, sites: dict[int, int]
) -> tuple[list[GroupPair], list[UnmatchedGroup]]:
    forward, backward = _vote_groups(reference, suspect, sites)
    pairs: list[GroupPair] = []
    unmatched: list[UnmatchedGroup] = []
    paired_suspect: set[str] = set()
    for group in reference.groups:
        seen = forward.get(group.id)
        if not seen:
            unmatched.append(_unmatched("reference", group, "no paired operator writes it"))
            continue
        partners = [suspect.group(other) for other in sorted(seen)]
        if all(partner.frozen for partner in partners):
            # Nothing of the suspect moves here: the reference's group can still be solved (its
            # values are paired tensor by tensor), whichever frozen groups hold the neurons.
            ids = ", ".join(partner.id for partner in partners)
            if any(partner.size != group.size for partner in partners):
                unmatched.append(_unmatched("reference", group, f"suspect groups {ids} have other sizes"))
                continue
            pairs.append(GroupPair(group.id, ids, group.size, False))
            if group.permutable:
                reasons = "; ".join(str(r) for partner in partners for r in partner.reasons) or "fewer than two neurons"
                unmatched.append(_unmatched("reference", group, f"frozen in the suspect (as {ids}): {reasons}"))
            continue
        if len(seen) > 1:
            others = ", ".join(sorted(seen))
            unmatched.append(_unmatched("reference", group, f"its neurons are spread over suspect groups {others}"))
            continue
        (other_id,) = seen
        other = suspect.group(other_id)
        if len(backward[other_id]) > 1:
            merged = ", ".join(sorted(backward[other_id]))
            unmatched.append(_unmatched("reference", group, f"suspect group {other_id} merges reference groups {merged}"))
            continue
        if other.size != group.size:
            unmatched.append(
                _unmatched("reference", group, f"suspect group {other_id} has {other.size} neurons, not {group.size}")
            )
            continue
        paired_suspect.add(other_id)
        both = group.permutable and other.permutable
        pairs.append(GroupPair(group.id, other_id, group.size, both))
        if other.permutable and not group.permutable:
            reasons = "; ".join(str(r) for r in group.reasons) or "fewer than two neurons"
            unmatched.append(_unmatched("suspect", other, f"frozen in the reference (as {group.id}): {reasons}"))
    for group in suspect.groups:
        if group.id not in paired_suspect and group.permutable:
            unmatched.append(_unmatched("suspect", group, "no reference group holds its neurons"))
    # Frozen groups with no counterpart matter to nobody: keep only permutable ones.
    unmatched = [
        item
        for item in unmatched
        if (reference if item.model == "reference" else suspect).group(item.group).permutable
        or item.reason.startswith("frozen in")
    ]
    return pairs, unmatched


def _unmatched(model: str, group: Any, reason: str) -> UnmatchedGroup:
    return UnmatchedGroup(model, group.id, group.size, reason)


# -- conversions ------------------------------------------------------------------------------
_DTYPE_KIND: dict[int, str] = {
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}


def _stored_type(graph: ModelGraph, name: str) -> int | None:
    leaf = graph.constant_leaf(name)
    tensor = graph.leaf_tensor_or_none(leaf) if leaf is not None else None
    return None if tensor is None else tensor.data_type


def _dequantized(graph: ModelGraph, name: str) -> bool:
    leaf = graph.constant_leaf(name)
    return leaf is not None and any(graph.nodes[i].op_type == "DequantizeLinear" for i in leaf.chain)


def _conversions(
    reference: ModelGraph,
    suspect: ModelGraph,
    ref_units: dict[int, Unit],
    sus_units: dict[int, Unit],
    sites: dict[int, int],
) -> list[ConversionFinding]:
    findings: list[ConversionFinding] = []
    graphs = {"reference": reference, "suspect": suspect}
    # Storage types and quantization of paired weights.
    types: dict[str, Counter[int]] = {"reference": Counter(), "suspect": Counter()}
    quantized: Counter[str] = Counter()
    weights = 0
    for ref_index, sus_index in sites.items():
        if ref_index not in ref_units or sus_index not in sus_units:
            continue
        weights += 1
        for side, index, units in (("reference", ref_index, ref_units), ("suspect", sus_index, sus_units)):
            graph = graphs[side]
            name = graph.nodes[index].input[units[index].weight_slot]
            if _dequantized(graph, name):
                quantized[side] += 1
            stored = _stored_type(graph, name)
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
        if quantized[side] > quantized[other]:
            findings.append(
                ConversionFinding(
                    "quantized",
                    side,
                    f"{quantized[side]} of {weights} paired weights quantized (read through DequantizeLinear)",
                )
            )
    # BatchNorm folded on one side.
    folded = {"reference": 0, "suspect": 0}
    for ref_index, sus_index in sites.items():
        if ref_index in ref_units and sus_index in sus_units:
            has_ref = ref_units[ref_index].batchnorm is not None
            has_sus = sus_units[sus_index].batchnorm is not None
            if has_ref and not has_sus:
                folded["suspect"] += 1
            elif has_sus and not has_ref:
                folded["reference"] += 1
    for side, count in folded.items():
        if count:
            findings.append(
                ConversionFinding(
                    "batchnorm-folded", side, f"{count} BatchNormalization folded into the preceding layer's weights"
                )
            )
    # Opset.
    ref_opset, sus_opset = reference.opsets.get("", 0), suspect.opsets.get("", 0)
    if ref_opset != sus_opset:
        newer = "suspect" if sus_opset > ref_opset else "reference"
        findings.append(ConversionFinding("opset", newer, f"opset {ref_opset} in the reference, {sus_opset} in the suspect"))
    # Renamed sites (a unit is named by what it finally writes: folding moves names around).
    renamed = sum(
        1
        for ref_index, sus_index in sites.items()
        if _site_outputs(reference, ref_units, ref_index) != _site_outputs(suspect, sus_units, sus_index)
    )
    if renamed:
        findings.append(ConversionFinding("renamed", "suspect", f"{renamed} of {len(sites)} paired operators renamed"))
    # Operators added or removed that do not compute anything new.
    ref_ops = Counter(node.op_type for node in reference.nodes if node.op_type in _PASS_THROUGH_OPS)
    sus_ops = Counter(node.op_type for node in suspect.nodes if node.op_type in _PASS_THROUGH_OPS)
    for side, mine, theirs in (("suspect", sus_ops, ref_ops), ("reference", ref_ops, sus_ops)):
        removed = theirs - mine
        if removed:
            listing = ", ".join(f"{count} {op}" for op, count in sorted(removed.items()))
            findings.append(ConversionFinding("simplified", side, f"fewer pass-through operators: {listing}"))
    return findings


def _site_outputs(graph: ModelGraph, units: dict[int, Unit], index: int) -> list[str]:
    unit = units.get(index)
    if unit is not None and unit.batchnorm is not None:
        index = unit.batchnorm
    elif unit is not None and unit.bias is not None:
        index = unit.bias[0]
    return list(graph.nodes[index].output)


# -- entry point ------------------------------------------------------------------------------
def _describe_site(graph: ModelGraph, index: int, token: tuple[Any, ...] | None = None) -> str:
    """``Conv 'name'``, with the shapes of the weights it reads when ``token`` is given."""
    node = graph.nodes[index]
    text = f"{node.op_type} '{node_label(node, index)}'"
    if token is None:
        return text
    shapes = [token[3]] if token[0] == "unit" else [shape for _, shape in token[2]]
    return text + " " + " ".join("[" + ",".join(str(d) for d in shape) + "]" for shape in shapes if shape is not None)


def _divergences(
    reference: ModelGraph,
    suspect: ModelGraph,
    ref_sites: list[tuple[int, tuple[Any, ...]]],
    sus_sites: list[tuple[int, tuple[Any, ...]]],
    opcodes: Sequence[tuple[str, int, int, int, int]],
) -> list[str]:
    found = []
    for tag, a0, a1, b0, b1 in opcodes:
        if tag == "equal":
            continue
        ref_part = [_describe_site(reference, *ref_sites[i]) for i in range(a0, a1)]
        sus_part = [_describe_site(suspect, *sus_sites[i]) for i in range(b0, b1)]
        where = (
            f"after {_describe_site(reference, ref_sites[a0 - 1][0])} of the reference" if a0 > 0 else "at the start"
        )
        found.append(
            f"{where}: reference has {_listing(ref_part)}, suspect has {_listing(sus_part)}"
        )
    return found


def _listing(items: list[str]) -> str:
    if not items:
        return "nothing"
    shown = ", ".join(items[:3])
    return shown + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def match_analyses(reference: ChannelAnalysis, suspect: ChannelAnalysis) -> ModelMatch:
    """Pair the sites and groups of two analysed models (see the module docstring)."""
    ref_graph, sus_graph = reference.graph, suspect.graph
    ref_units, sus_units = find_units(ref_graph), find_units(sus_graph)
    ref_sites = _sites(ref_graph, ref_units, {plan.source for plan in reference.tensors})
    sus_sites = _sites(sus_graph, sus_units, {plan.source for plan in suspect.tensors})
    matcher = difflib.SequenceMatcher(
        None, [token for _, token in ref_sites], [token for _, token in sus_sites], autojunk=False
    )
    sites: dict[int, int] = {}
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            sites[ref_sites[block.a + offset][0]] = sus_sites[block.b + offset][0]
    divergences = _divergences(ref_graph, sus_graph, ref_sites, sus_sites, matcher.get_opcodes())
    groups, unmatched = _pair_groups(reference, suspect, sites)
    conversions = _conversions(ref_graph, sus_graph, ref_units, sus_units, sites)
    return ModelMatch(
        reference,
        suspect,
        sites,
        ref_units,
        sus_units,
        groups,
        unmatched,
        divergences,
        conversions,
        (len(ref_sites), len(sus_sites)),
    )


def match_models(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> ModelMatch:
    """Analyse both models and pair their groups. Neither model is modified."""
    return match_analyses(analyze(reference), analyze(suspect))
