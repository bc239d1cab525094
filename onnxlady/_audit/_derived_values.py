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

import numpy as np

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._graph._fold import EVALUATE_LIMIT, evaluate_node
from onnxlady._graph._model_graph import ModelGraph, node_label
from onnxlady._resync._match import ModelMatch, axis_labels
from onnxlady._resync._sites import Operand, Site

__all__ = ["changed_derived_constants"]

#: Relative difference of a sorted value beyond which a derived constant changed. A conversion
#: stores the folded value in float16 at worst (bfloat16: 2^-8 = 0.4 %); the computation itself,
#: in another precision, differs by far less.
DERIVED_RTOL = 1e-2


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


def _derived(graph: ModelGraph, name: str) -> bool:
    """Computed by the graph (not a stored constant read through casts and reshapes)."""
    return bool(name) and graph.constant_leaf(name) is None


def _plainly_read(operand: Operand) -> bool:
    """Read whole, as the node reads it: no block, packed form or layout of its own."""
    return operand.block is None and not (operand.nbits or operand.quantized or operand.blocked)


def _differs(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two values differ beyond :data:`DERIVED_RTOL`, up to the order of their elements."""
    if first.size != second.size:
        return True
    a, b = np.sort(first.astype(np.float64).ravel()), np.sort(second.astype(np.float64).ravel())
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    bound = DERIVED_RTOL * np.maximum(np.abs(a), np.abs(b)) + 1e-6 * scale
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
    classes: tuple[dict[tuple[object, ...], list[Site]], dict[tuple[object, ...], list[Site]]] = ({}, {})
    for side, sites in enumerate((match.reference_sites, match.suspect_sites)):
        for site in sites:
            classes[side].setdefault(site.token, []).append(site)
    readers: dict[tuple[str, str], list[str]] = {}  # (reference name, suspect name) -> reference readers
    for ref_key, sus_key in sorted(match.sites.items()):
        mine, theirs = match.reference_site(ref_key), match.suspect_site(sus_key)
        for operand in mine.operands:
            other = theirs.operand(operand.role)
            if other is None or not (_plainly_read(operand) and _plainly_read(other)):
                continue
            names = (ref_graph.nodes[operand.node].input[operand.slot], sus_graph.nodes[other.node].input[other.slot])
            if names in readers:
                readers[names].append(node_label(ref_graph.nodes[mine.node], mine.node))
                continue
            if not (_derived(ref_graph, names[0]) or _derived(sus_graph, names[1])):
                continue
            ours, yours = values[0](names[0]), values[1](names[1])
            if ours is None or yours is None or ours.size != yours.size or ours.dtype.kind != "f" or yours.dtype.kind != "f":
                continue  # another layout (a broadcast copy) or integers: not this check's to read
            aligned = _in_reference_order(match, operand, other, yours, matches) if matches else None
            if not (_differs(ours, yours) if aligned is None or aligned.shape != ours.shape else _differs_in_place(ours, aligned)):
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


def _differs_in_place(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two values of one shape differ beyond :data:`DERIVED_RTOL`, element by element."""
    a, b = first.astype(np.float64), second.astype(np.float64)
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    bound = DERIVED_RTOL * np.maximum(np.abs(a), np.abs(b)) + 1e-6 * scale
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
