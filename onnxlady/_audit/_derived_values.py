"""Constants computed from constants, compared by value across two forms of one model.

One exporter keeps ``A_log (initializer) -> Exp -> Neg`` in the graph (torch's legacy exporter,
Mamba's ``A = -exp(A_log)``), another folds it into one stored constant (the dynamo exporter,
ONNX Runtime, onnx-simplifier). Matching pairs the two sites that read it (the same operator
and shape), but the resync compares stored constants, and the stored ``A_log`` has no
counterpart of its own: a tampered ``A_log`` across the two export forms read ``converted``
(held-out round 10). Here, where a paired site reads such a derived constant on either side,
both sides' values are computed (:func:`~onnxlady._graph._fold.evaluate_node`, in float64) and
compared. The comparison is of the sorted values: the neuron order of a permuted copy moves
them, and which neuron is which is the resync's to say, not this check's; a value changed
beyond storage rounding changes the sorted values.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._graph._fold import EVALUATE_LIMIT, evaluate_node
from onnxlady._graph._model_graph import ModelGraph, node_label
from onnxlady._resync._match import ModelMatch, axis_labels
from onnxlady._resync._sites import Operand, Site, read_operand

__all__ = ["changed_copies", "changed_derived_constants", "changed_norm_parameters"]

#: Relative difference of a sorted value beyond which a derived constant changed. A conversion
#: stores the folded value in float16 at worst (bfloat16: 2^-8 = 0.4 %); the computation itself,
#: in another precision, differs by far less.
DERIVED_RTOL = 1e-2

#: The largest finite float16: a float32 value beyond it is stored in float16 as +-65504 (ONNX
#: Runtime's float16 converter clamps) or +-inf (a plain cast), that storage's rounding.
_HALF_MAX = float(np.finfo(np.float16).max)


def _value(graph: ModelGraph, name: str, memo: dict[str, np.ndarray | None], depth: int = 0) -> np.ndarray | None:
    """``name``'s value, computed from the graph's constants (floats widened to float64), or None."""
    if name in memo:
        return memo[name]
    value: np.ndarray | None = None
    if graph.constant_leaf(name) is not None:
        shape = graph.constant_shape(name)
        if shape is not None and int(np.prod(shape)) <= EVALUATE_LIMIT:
            stored = graph.constant_value(name)
            if stored is not None and stored.dtype.kind in "iufb":
                value = stored.astype(np.float64) if stored.dtype.kind == "f" else stored
    elif name in graph.producer and depth < 64:
        index = graph.producer[name][0]
        if 0 <= index < graph.main_count:
            node = graph.nodes[index]
            inputs = [_value(graph, item, memo, depth + 1) if item else None for item in node.input]
            value = evaluate_node(node, inputs, graph.opsets.get("", 0))
    memo[name] = value
    return value


def _dequantized_step(graph: ModelGraph, name: str) -> float:
    """Half the largest step of the ``DequantizeLinear`` that writes ``name`` (0 for anything else).

    ONNX Runtime's static quantizer stores a folded constant (an embedding lookup by constant
    ids) as an activation behind a quantize/dequantize pair: its values are then the constant's
    rounded to that step, which is storage error, not a change (held-out round 13, F13).
    """
    produced = graph.producer.get(name) if name else None
    if produced is None or not 0 <= produced[0] < graph.main_count:
        return 0.0
    node = graph.nodes[produced[0]]
    if node.op_type != "DequantizeLinear" or len(node.input) < 2:
        return 0.0
    scale = graph.constant_value(node.input[1])
    if scale is None or scale.dtype.kind != "f" or not scale.size:
        return 0.0
    return 0.5 * float(np.abs(scale.astype(np.float64)).max())


def _derived(graph: ModelGraph, name: str) -> bool:
    """Computed by the graph (not a stored constant read through casts and reshapes)."""
    return bool(name) and graph.constant_leaf(name) is None


def _plainly_read(operand: Operand) -> bool:
    """Read whole, as the node reads it: no block, packed form or layout of its own.

    A computed Conv weight or bias (``Operand.computed``: a BatchNorm folded in by graph
    arithmetic) is the resync's to compare, folded like its partner: not read here as is.
    """
    return operand.block is None and not (operand.nbits or operand.quantized or operand.blocked or operand.computed)


def _differs(first: np.ndarray, second: np.ndarray, slack: float = 0.0) -> bool:
    """Whether two values differ beyond :data:`DERIVED_RTOL` (and ``slack``), up to the order of their elements.

    ``slack`` bounds every element's storage error (a quantized copy's step): sorting moves no
    value farther from its sorted counterpart than the largest element-wise difference.
    """
    if first.size != second.size:
        return True
    a, b = np.sort(first.astype(np.float64).ravel()), np.sort(second.astype(np.float64).ravel())
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    bound = DERIVED_RTOL * np.maximum(np.abs(a), np.abs(b)) + 1e-6 * scale + slack
    return bool(np.any(np.abs(a - b) > bound))


def changed_derived_constants(match: ModelMatch, matches: dict[str, np.ndarray] | None = None) -> list[str]:
    """Paired sites that read constants computed from constants, whose values differ between the models.

    Args:
        match: the pairing of the two models' sites (resync across conversions made it).
        matches: the resync's solved neuron matches per reference group (``aligned[j]`` = suspect
            neuron ``matches[gid][j]``). Where every axis of a derived operand that the reference
            binds lies on one solved group, whole, in both models, the suspect's value is put in
            the reference's neuron order and compared element by element: a positional table
            whose columns alone were moved (a wrong permutation) keeps its sorted values.

    Returns:
        One line per differing operand (``Mul '/Mul_5' reads -exp(A_log)...``), empty when every
        derived constant both sides can compute agrees within :data:`DERIVED_RTOL`. Operands
        stored as constants on both sides are the resync's to compare and are left out, as are
        values either side cannot compute.
    """
    ref_graph, sus_graph = match.reference.graph, match.suspect.graph
    values = (_Reader(ref_graph), _Reader(sus_graph))
    classes = _classes(match)
    readers: dict[tuple[str, str], list[str]] = {}  # (reference name, suspect name) -> reference readers
    for mine, operand, theirs, other in _paired_operands(match):
        names = (ref_graph.nodes[operand.node].input[operand.slot], sus_graph.nodes[other.node].input[other.slot])
        if names in readers:
            readers[names].append(node_label(ref_graph.nodes[mine.node], mine.node))
            continue
        if not (_derived(ref_graph, names[0]) or _derived(sus_graph, names[1])):
            continue
        ours, yours = values[0](names[0]), values[1](names[1])
        if ours is None or yours is None or ours.size != yours.size or ours.dtype.kind != "f" or yours.dtype.kind != "f":
            continue  # another layout (a broadcast copy) or integers: not this check's to read
        if _stored_in_half(sus_graph, names[1]):
            # HF's causal mask fills with finfo(float32).min: its float16 copy holds -65504.
            # Both sides are compared as float16 would store them; a value moved within
            # float16's range (-100 made -200, -3.4e38 made 0) still differs.
            ours, yours = np.clip(ours, -_HALF_MAX, _HALF_MAX), np.clip(yours, -_HALF_MAX, _HALF_MAX)
        aligned = _in_reference_order(match, operand, other, yours, matches) if matches else None
        slack = max(_dequantized_step(ref_graph, names[0]), _dequantized_step(sus_graph, names[1]))
        if not (
            _differs(ours, yours, slack)
            if aligned is None or aligned.shape != ours.shape
            else _differs_in_place(ours, aligned, slack)
        ):
            continue
        # Tables of one token (a rotary cos and sin) that content could not tell apart may be
        # paired crosswise: a value each model also holds elsewhere in the class is no change.
        # (Compared in order, the pair's own sites hold the sorted values: not counted.)
        skip = (mine, theirs) if aligned is not None and aligned.shape == ours.shape else ()
        if _held(ours, values[1], [site for site in classes[1].get(theirs.token, []) if site not in skip], operand.role) and _held(
            yours, values[0], [site for site in classes[0].get(mine.token, []) if site not in skip], operand.role
        ):
            continue
        readers[names] = [node_label(ref_graph.nodes[mine.node], mine.node)]
    found = []
    for (ref_name, sus_name), labels in readers.items():
        forms = " and ".join(
            f"{side}'s '{name}' ({'computed from constants' if _derived(graph, name) else 'stored'})"
            for side, graph, name in (("the reference", ref_graph, ref_name), ("the suspect", sus_graph, sus_name))
        )
        more = f" and {len(labels) - 1} more" if len(labels) > 1 else ""
        found.append(f"{forms} differ beyond storage rounding (read by '{labels[0]}'{more})")
    return found


def _stored_in_half(graph: ModelGraph, name: str, depth: int = 0) -> bool:
    """Whether ``name``'s value is held in float16: its own type, or a cast or reshape of a float16 value.

    ONNX Runtime's float16 converter with an ``op_block_list`` casts a float16 value back to
    float32 for the operators it keeps: the value read still passed float16 storage.
    """
    if graph.dtypes.get(name) == onnx.TensorProto.FLOAT16:
        return True
    produced = graph.producer.get(name) if name else None
    if produced is None or not 0 <= produced[0] < graph.main_count or depth >= 16:
        return False
    node = graph.nodes[produced[0]]
    return node.op_type in _PLAIN_CHAIN and bool(node.input) and _stored_in_half(graph, node.input[0], depth + 1)


def _paired_operands(match: ModelMatch, *, plain: bool = True) -> Iterator[tuple[Site, Operand, Site, Operand]]:
    """Each paired site's operands: (reference site, its operand, suspect site, its operand).

    ``plain``: only those read whole on both sides (:func:`_plainly_read`).
    """
    for ref_key, sus_key in sorted(match.sites.items()):
        mine, theirs = match.reference_site(ref_key), match.suspect_site(sus_key)
        for operand in mine.operands:
            other = theirs.operand(operand.role)
            if other is not None and (not plain or (_plainly_read(operand) and _plainly_read(other))):
                yield mine, operand, theirs, other


def _classes(match: ModelMatch) -> tuple[dict[tuple[object, ...], list[Site]], dict[tuple[object, ...], list[Site]]]:
    """Each model's sites by token (the sites content may not tell apart)."""
    classes: tuple[dict[tuple[object, ...], list[Site]], dict[tuple[object, ...], list[Site]]] = ({}, {})
    for side, sites in enumerate((match.reference_sites, match.suspect_sites)):
        for site in sites:
            classes[side].setdefault(site.token, []).append(site)
    return classes


def _differs_in_place(first: np.ndarray, second: np.ndarray, slack: float = 0.0) -> bool:
    """Whether two values of one shape differ beyond :data:`DERIVED_RTOL` (and ``slack``), element by element."""
    a, b = first.astype(np.float64), second.astype(np.float64)
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    bound = DERIVED_RTOL * np.maximum(np.abs(a), np.abs(b)) + 1e-6 * scale + slack
    return bool(np.any(np.abs(a - b) > bound))


def _labels(analysis: ChannelAnalysis, operand: Operand, axis: int) -> dict[str, np.ndarray]:
    """Per group: the neuron at each position of an operand's axis (a computed one: its tensor's)."""
    found = axis_labels(analysis, operand, axis)
    if found or operand.axes is not None:
        return found
    expr = analysis.state.tracked.get(analysis.graph.nodes[operand.node].input[operand.slot], {}).get(axis)
    return analysis.neuron_labels(expr) if expr is not None else {}


def _in_reference_order(
    match: ModelMatch, operand: Operand, other: Operand, value: np.ndarray, matches: dict[str, np.ndarray]
) -> np.ndarray | None:
    """The suspect's ``value`` in the reference's neuron order, or None where that cannot be said.

    Each axis the reference binds must lie whole on one solved group, and the suspect's axis on
    the group paired with it, each position one neuron; the axes nothing binds stay as they are.
    None also where no axis is bound (the sorted comparison then stands).
    """
    if operand.shape != other.shape or value.ndim != len(operand.shape):
        return None
    moved = False
    for axis in range(value.ndim):
        mine = _labels(match.reference, operand, axis)
        if not mine:
            continue
        theirs = _labels(match.suspect, other, axis)
        if len(mine) != 1 or len(theirs) != 1:
            return None
        (gid, labels), (sid, suspect_labels) = next(iter(mine.items())), next(iter(theirs.items()))
        pair = match.suspect_group(gid)
        size = value.shape[axis]
        if (
            gid not in matches or pair is None or pair.suspect != sid or labels.shape != (size,)
            or suspect_labels.shape != (size,) or len(matches[gid]) != size
            or not np.array_equal(np.sort(labels), np.arange(size))
            or not np.array_equal(np.sort(suspect_labels), np.arange(size))
        ):  # fmt: skip
            return None
        where = np.argsort(suspect_labels)  # suspect neuron -> its position
        value = np.take(value, where[np.asarray(matches[gid])[labels]], axis=axis)
        moved = True
    return value if moved else None


class _Reader:
    """One model's operand values, computed once each (:func:`_value`)."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.memo: dict[str, np.ndarray | None] = {}

    def __call__(self, name: str) -> np.ndarray | None:
        return _value(self.graph, name, self.memo)

    def operand(self, operand: Operand) -> np.ndarray | None:
        return self(self.graph.nodes[operand.node].input[operand.slot]) if _plainly_read(operand) else None


def _held(value: np.ndarray, reader: _Reader, sites: list[Site], role: str) -> bool:
    """Whether some site of the other model's class holds ``value`` in its operand ``role``."""
    for site in sites:
        operand = site.operand(role)
        other = reader.operand(operand) if operand is not None else None
        if other is not None and other.dtype.kind == "f" and not _differs(value, other):
            return True
    return False


def changed_copies(match: ModelMatch) -> list[str]:
    """Stored copies of one reference constant in the suspect, each compared with it; one line per copy that differs.

    The resync compares each reference constant once, through one of the sites that read it.
    A converter may store one constant twice: ONNX Runtime and onnx-simplifier fold a tied
    output layer's ``Transpose`` of the token table into a stored copy of its own, ORT's
    transpose optimizer stores a rotary table once per layout. A copy then changed (the output
    layer scaled, the table of the keys alone) was compared through no site, and the suspect
    read ``converted`` while it computes something else. Here every suspect constant paired with
    a reference constant that the suspect holds more than one copy of is read through its site
    and compared with the reference's (sorted values, as :func:`changed_derived_constants`: a
    permuted copy moves them; within :data:`DERIVED_RTOL`). Values quantized, packed or of
    another size are left out; a copy whose values another site of its kind holds in the
    reference (a cos and a sin table paired crosswise) is no change. Normalization parameters,
    which no site reads, are compared by :func:`changed_norm_parameters` and reported here too.
    """
    ref_graph, sus_graph = match.reference.graph, match.suspect.graph
    # Every stored copy counts, quantized ones too: a quantizer that rounds the copy one site
    # reads and leaves another site a float copy (ORT's dynamic and MatMulNBits quantizers on
    # DeBERTa's relative-position projections) has the resync compare the rounded one only.
    copies: dict[str, dict[str, tuple[Site, Operand, Site, Operand] | None]] = {}
    for mine, operand, theirs, other in _paired_operands(match, plain=False):
        if _folds(mine) != _folds(theirs):
            # One side folds steps after the layer (a BatchNorm, a per-channel Mul or Add) into
            # its weight and bias, the other keeps them: the stored tensors are not copies of one
            # another (onnxslim's fused bias ``b1 * w + b2`` against a shared zero bias).
            continue
        ref_leaf = ref_graph.constant_leaf(ref_graph.nodes[operand.node].input[operand.slot])
        sus_leaf = sus_graph.constant_leaf(sus_graph.nodes[other.node].input[other.slot])
        if ref_leaf is not None and sus_leaf is not None:
            plainly = _plainly_read(operand) and _plainly_read(other)
            by_copy = copies.setdefault(ref_leaf.name, {})
            if by_copy.get(sus_leaf.name) is None:
                by_copy[sus_leaf.name] = (mine, operand, theirs, other) if plainly else None
    readers = (_Reader(ref_graph), _Reader(sus_graph))
    classes = _classes(match)
    found = []
    for ref_name, by_copy in copies.items():
        if len(by_copy) < 2:
            continue  # one copy: the resync's comparison reads it
        for sus_name, paired in by_copy.items():
            if paired is None:
                continue  # read through its rounding: the resync's comparison
            mine, operand, theirs, other = paired
            ours_read, yours_read = read_operand(ref_graph, operand, bounds=True), read_operand(sus_graph, other, bounds=True)
            if ours_read is None or yours_read is None:
                continue
            ours, yours = np.asarray(ours_read.value), np.asarray(yours_read.value)
            # A copy behind DequantizeLinear (ORT's int4 QDQ quantizes only the MatMul that reads
            # a shared weight directly) differs by its rounding: within the bounds, no change.
            slack = float(np.max(ours_read.error, initial=0.0)) + float(np.max(yours_read.error, initial=0.0))
            if ours.size != yours.size or not _differs(ours, yours, slack):
                continue
            if _held(yours, readers[0], [site for site in classes[0].get(mine.token, []) if site is not mine], operand.role):
                continue
            found.append(f"the suspect's '{sus_name}', one of {len(by_copy)} copies of the reference's '{ref_name}', "
                         f"differs from it beyond storage rounding (read by '{node_label(sus_graph.nodes[theirs.node], theirs.node)}')")
    return found + changed_norm_parameters(match)


def _folds(site: Site) -> tuple[bool, int]:
    """What a site applies after its layer's weight and bias: a BatchNorm, and how many affine steps."""
    return site.batchnorm is not None, len(site.post)


#: Normalizations' per-channel parameters by operator: (input slot, role). A Skip variant's
#: fifth input is the bias of the fused linear layer (the resync's to compare), not read here.
_NORM_PARAMETERS: dict[str, tuple[tuple[int, str], ...]] = {
    "LayerNormalization": ((1, "scale"), (2, "bias")),
    "SkipLayerNormalization": ((2, "scale"), (3, "bias")),
    "SimplifiedLayerNormalization": ((1, "scale"),),
    "SkipSimplifiedLayerNormalization": ((2, "scale"),),
    "RMSNormalization": ((1, "scale"),),
    "EmbedLayerNormalization": ((5, "scale"), (6, "bias")),
    "InstanceNormalization": ((1, "scale"), (2, "bias")),
    "GroupNormalization": ((1, "scale"), (2, "bias")),
}
#: Chain operators that store a constant as is (a quantized or scaled one has its own rounding).
_PLAIN_CHAIN = frozenset({"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def changed_norm_parameters(match: ModelMatch) -> list[str]:
    """Normalization scales and biases of the suspect that no constant of the reference holds.

    Sites pair linear layers; a LayerNorm's gamma and beta are compared by the name they are
    stored under. A constant several normalizations share (ALBERT's one layer, torch's and
    onnxslim's deduplication of equal tensors) keeps one name in a converted copy, often not
    the reference's: a change to it was compared nowhere and the copy read ``converted``
    (held-out round 13). Here every normalization parameter the suspect stores (read through
    casts and reshapes only) must equal, as sorted values within :data:`DERIVED_RTOL`, some
    constant of the reference of its size: a permuted copy moves the values, a conversion
    stores them in another precision, a fusion (decomposed LayerNorm -> LayerNormalization)
    reads the reference's ``Mul`` constant. A value the reference holds nowhere is a change;
    one swapped for another constant of the reference (a layer's gamma copied to another) is
    not seen here.
    """
    ref_graph, sus_graph = match.reference.graph, match.suspect.graph
    ref_values, sus_values = _Reader(ref_graph), _Reader(sus_graph)
    params: dict[str, tuple[str, np.ndarray | None, list[str]]] = {}  # suspect leaf -> (name read, value, readers)
    for index, node in enumerate(sus_graph.nodes[: sus_graph.main_count]):
        for slot, role in _NORM_PARAMETERS.get(node.op_type, ()):
            name = node.input[slot] if slot < len(node.input) else ""
            leaf = sus_graph.constant_leaf(name) if name else None
            if leaf is None or any(sus_graph.nodes[step].op_type not in _PLAIN_CHAIN for step in leaf.chain):
                continue
            if leaf.name not in params:
                value = sus_values(name)
                usable = value is not None and value.dtype.kind == "f" and bool(np.all(np.isfinite(value)))
                params[leaf.name] = (name, value if usable else None, [])
            params[leaf.name][2].append(f"{role} of {node.op_type} '{node_label(node, index)}'")
    sizes = {value.size for _, value, _ in params.values() if value is not None}
    held: dict[int, list[np.ndarray]] = {}  # the reference's float constants of those sizes, by size
    seen: set[str] = set()
    for node in ref_graph.nodes[: ref_graph.main_count]:
        norm = {node.input[slot] for slot, _ in _NORM_PARAMETERS.get(node.op_type, ()) if slot < len(node.input)}
        for name in node.input:
            if not name or name in seen:
                continue
            seen.add(name)
            if ref_graph.constant_leaf(name) is None and name not in norm:
                continue
            shape = ref_graph.constant_shape(name)
            if shape is not None and int(np.prod(shape)) not in sizes:
                continue  # (read only where a suspect parameter could equal it)
            value = ref_values(name)
            if value is not None and value.dtype.kind == "f":
                held.setdefault(value.size, []).append(value)
    readers = {
        leaf: labels for leaf, (_, value, labels) in params.items()
        if value is not None and not any(not _differs(value, other) for other in held.get(value.size, []))
    }  # fmt: skip
    found = []
    for name, labels in readers.items():
        if labels:
            more = f" and {len(labels) - 1} more" if len(labels) > 1 else ""
            found.append(f"the suspect's '{name}' ({labels[0]}{more}) equals no constant of the reference")
    return found
