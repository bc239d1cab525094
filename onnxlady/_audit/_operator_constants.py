"""Constant operands of arithmetic operators outside the weights, compared by value across two forms of one model.

The resync compares the constants that weighing operators read; the scalars and small tables
that plain arithmetic reads (CLIP's ``exp(logit_scale)``, QuickGELU's 1.702, an attention scale,
a ``Pow`` exponent, a normalization's epsilon, a folded shifted-window mask added to the scores)
are read by no site. In an unconverted copy the graph comparison finds such a constant changed
under its name; a converter renames, folds (``Exp(logit_scale)`` stored as one value) and
deduplicates them, so in its copy a changed one read ``converted`` (held-out round 14, F1).

Here each model's arithmetic constants are gathered by the kind of operation that reads them
(``Div`` by a constant as ``Mul`` by its reciprocal, ``Sub`` as ``Add`` of its negation, so a
converter that rewrites one as the other keeps the value), each computed from the graph's
constants (:func:`~onnxlady._audit._derived_values._value`, as exporters fold them). A value is
changed when the suspect reads one that no operator of its kind reads in the reference *and* the
reference reads one that the suspect no longer does: a value replaced by another. A converter
removes arithmetic (a fusion into a ``Gelu`` or ``LayerNormalization`` keeps the value as an
attribute) and folds it into weights, but does not put a new value in place of an old one; a
value that is only new (a scale the reference computes from a shape) or only gone (a fused
operator) is no evidence either way. Values are compared sorted (a permuted copy moves a
per-channel table) within :data:`~onnxlady._audit._derived_values.DERIVED_RTOL` and the step of a
quantizer that stores them (and float16's subnormal step); beyond float16's range, values saturate by
design and compare equal.

A converter also moves a scalar factor into a fused operator's attribute (ORT's FusedMatMul
``alpha`` holds an attention's score scale; an Attention's ``scale``): no operand holds it, and
the attention scales of a model are one value, so one changed among them is no value gone. Each
such attribute is compared on its own: it must be one of the reference's factors, one squared,
or one times the attention's default 1/sqrt(head size) (session 15).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx

from onnxlady._audit._derived_values import DERIVED_RTOL, _dequantized_step, _value
from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph, node_label
from onnxlady._graph._shape_scalars import shape_values
from onnxlady._resync._match import ModelMatch
from onnxlady._resync._sites import Site

__all__ = ["changed_operator_constants"]

#: The most elements of a compared constant: masks and per-channel tables, not weights.
_MOST = 1 << 16
#: Float16's largest finite value: a larger magnitude saturates to it (or to inf) in a float16 copy.
_HALF_MAX = 65504.0
#: Float16's smallest step (between its subnormals): an epsilon of 1e-6 is stored 1.3 % off.
_HALF_STEP = 2.0**-24


#: ONNX Runtime's fused operators that add some of their inputs (slots) before the rest of their
#: computation: an ``Add`` ORT fuses into one keeps its constant there (BERT's position embedding
#: as the skip input of a SkipLayerNormalization).
_FUSED_ADDS: dict[str, tuple[int, ...]] = {
    "SkipLayerNormalization": (1, 4),
    "SkipSimplifiedLayerNormalization": (1, 4),
    "BiasGelu": (1,),
    "FastGelu": (1,),
    "BiasAdd": (1, 2),
}


#: Scalar attributes into which a converter moves a ``Mul`` (or ``Div``) by a constant, and the
#: value that means "no factor" (ORT's MatMulScaleFusion puts an attention's score scale in
#: FusedMatMul's ``alpha``; its attention fusions put it in ``scale``, 0 for 1/sqrt(head size)).
_FACTOR_ATTRIBUTES: dict[tuple[str, str], tuple[tuple[str, float], ...]] = {
    ("com.microsoft", "FusedMatMul"): (("alpha", 1.0),),
    ("com.microsoft", "FusedGemm"): (("alpha", 1.0), ("beta", 1.0)),
    ("", "Gemm"): (("alpha", 1.0), ("beta", 1.0)),
    ("com.microsoft", "Attention"): (("scale", 0.0),),
    ("com.microsoft", "MultiHeadAttention"): (("scale", 0.0),),
    ("com.microsoft", "GroupQueryAttention"): (("scale", 0.0),),
    ("com.microsoft", "PackedAttention"): (("scale", 0.0),),
    ("com.microsoft", "PackedMultiHeadAttention"): (("scale", 0.0),),
    ("", "Attention"): (("scale", 0.0),),  # ONNX's (opset 23): no ``scale`` is 1/sqrt(head size) too
}
#: ONNX integer and boolean element types: a tensor of one computed from shapes is an index, not a factor.
_INTEGER_TYPES = frozenset({
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
})  # fmt: skip
#: Float16's relative step: a factor a converter computed from a float16 constant is that far off.
_HALF_RTOL = 2.0**-10


class _Item:
    """One constant operand: its value (float64, saturated), the step that bounds its storage, and its readers."""

    def __init__(self, value: np.ndarray, step: float, name: str) -> None:
        self.value = value
        self.sorted = np.sort(value.ravel())  # compared up to the order of the elements, sorted once
        self.step = step
        self.name = name
        self.readers: list[str] = []


def _kind(op_type: str, slot: int) -> tuple[str, bool]:
    """The operation a constant at ``slot`` of ``op_type`` takes part in, and whether it is read inverted."""
    if op_type == "Div":
        return ("Mul", True) if slot == 1 else ("Div", False)
    if op_type == "Sub":
        return ("Add", True) if slot == 1 else ("Sub", False)
    return (op_type if op_type != "Pow" or slot == 1 else "Pow base"), False


def _from_constants(graph: ModelGraph, name: str, known: dict[str, bool], depth: int = 0) -> bool:
    """Whether ``name`` is a constant or computed from constants alone (no graph input upstream, no shape)."""
    if name not in known:
        produced = graph.producer.get(name)
        if graph.constant_leaf(name) is not None:
            known[name] = True
        elif produced is None or not 0 <= produced[0] < graph.main_count or depth >= 64:
            known[name] = False
        else:
            known[name] = False  # until shown otherwise (a cycle reads as not constant)
            node = graph.nodes[produced[0]]
            known[name] = all(not item or _from_constants(graph, item, known, depth + 1) for item in node.input)
    return known[name]


def _constants(
    graph: ModelGraph, sites: list[Site], uncompared: set[tuple[int, int]]
) -> tuple[dict[str, dict[str, _Item]], dict[str, set[int | None]]]:
    """The float constants the graph's arithmetic reads outside the weighing sites' operands, by kind and by name.

    And per kind, the sizes (None: not known statically) of the tables its operators also read
    computed from an activation's shape (BERT's token-type embedding of zeros shaped like the
    input): a converter that knows the shape folds such a table, and may add it to another
    constant of the kind (ORT sums BERT's token-type and position embeddings), so a table of
    that size new in that kind is no evidence. Where every dim such a table reads is static, its
    value is known (a position table gathered by a range up to the sequence length): it is
    compared as the constant a converter folds it to, a table changed in the folded copy is
    evidence (it read ``converted`` before), unless another table of its kind and size could
    have been summed with it.
    """
    shaped: dict[str, set[int | None]] = {}
    # A site that does not weigh (a mask or a table added to the scores) pairs its constants, but
    # the resync compares only the weighing sites' operands: the others are compared here, and so
    # are those of a weighing site paired with one that does not (``uncompared``: a table one
    # model stores and the other computes, a position table folded).
    weighed = {(operand.node, operand.slot) for site in sites if site.weighs and site.key not in uncompared
               for operand in site.operands}
    memo: dict[str, np.ndarray | None] = {}
    by_shapes = shape_values(graph)  # scalars computed from static or partial shapes
    known: dict[str, bool] = {}
    found: dict[str, dict[str, _Item]] = {}
    tables: dict[str, dict[str, int]] = {}  # by kind: the tables computed from static shapes, their sizes
    for index in range(graph.main_count):
        node = graph.nodes[index]
        fused = _FUSED_ADDS.get(node.op_type, ()) if node.domain == "com.microsoft" else ()
        if not fused and (node.op_type not in ("Mul", "Add", "Sub", "Div", "Pow") or node.domain not in ("", "ai.onnx")):
            continue
        for slot, name in enumerate(node.input):
            if not name or (index, slot) in weighed or slot >= (2 if not fused else len(node.input)):
                continue
            if fused and slot not in fused:
                continue
            value: np.ndarray | None = None
            if not _from_constants(graph, name, known):
                table = by_shapes.value(name) if by_shapes.from_shapes(name) else None
                if table is not None and table.dtype.kind == "f" and 1 < table.size <= _MOST:
                    # every dim it reads is static: the table a converter folds it to, compared as such
                    kind = "Add" if fused else _kind(node.op_type, slot)[0]
                    if name not in tables.setdefault(kind, {}):
                        tables[kind][name] = table.size
                    value = table
                elif by_shapes.from_shapes(name):  # a Shape or Size upstream: what a converter knowing it folds
                    dims = graph.shape(name)
                    ints = [d for d in dims if isinstance(d, int)] if dims is not None else []
                    size = math.prod(ints) if dims is not None and len(ints) == len(dims) else None
                    # a scalar too, where the shapes do not give its value: a converter that knows the
                    # input's shape folds it, into an attribute too (``_changed_factors``); an integer
                    # (an index computed from a dim) is no factor and no table of this arithmetic
                    floating = graph.dtypes.get(name) not in _INTEGER_TYPES
                    if floating and (size != 1 or by_shapes.scalar(name) is None):
                        shaped.setdefault("Add" if fused else _kind(node.op_type, slot)[0], set()).add(size)
                # a scalar computed from shapes is compared as the constant a converter folds it to
                value = by_shapes.scalar(name) if value is None else value
                if value is None:
                    continue  # an activation: not read (its producers' weights would be, in float64)
            value = _value(graph, name, memo) if value is None else value
            if value is None or value.dtype.kind != "f" or not 0 < value.size <= _MOST:
                continue
            kind, inverted = ("Add", False) if fused else _kind(node.op_type, slot)
            items = found.setdefault(kind, {})
            if name not in items:
                with np.errstate(all="ignore"):
                    shown = (1.0 / value if kind == "Mul" else -value) if inverted else value
                if np.any(np.isnan(shown)):
                    continue  # an infinity saturates below (a mask's fill value); a NaN compares with nothing
                items[name] = _Item(np.clip(shown, -_HALF_MAX, _HALF_MAX), _dequantized_step(graph, name), name)
            items[name].readers.append(node_label(node, index))
    for kind, sizes in tables.items():
        # Beside another table of its kind and size it may be summed with it by a converter (ORT
        # sums BERT's token-type and position embeddings): a new table of that size tells nothing.
        counts = Counter(item.value.size for item in found.get(kind, {}).values())
        shaped.setdefault(kind, set()).update(size for size in sizes.values() if counts[size] > 1)
    return found, shaped


def _head_size(graph: ModelGraph, node: onnx.NodeProto) -> int | None:
    """The head size of an attention operator from its inputs' static shapes (None when they do not tell)."""
    if node.domain in ("", "ai.onnx"):
        return _standard_head_size(graph, node)
    heads = node_attribute(node, "num_heads", 0)
    if not isinstance(heads, int) or heads <= 0 or not node.input:
        return None
    if node.op_type in ("Attention", "PackedAttention"):
        weights = graph.shape(node.input[1]) if len(node.input) > 1 else None
        sizes = node_attribute(node, "qkv_hidden_sizes", None)
        if sizes:
            width: object = next(iter(sizes))
        else:
            width = weights[-1] // 3 if weights and isinstance(weights[-1], int) else None
    else:
        query = graph.shape(node.input[0])
        if not query or not isinstance(query[-1], int):
            return None
        if len(query) == 5:  # [B, S, N, 3, H]: packed q, k, v
            return query[-1]
        packed = len(node.input) < 2 or not node.input[1]  # q, k, v in one tensor
        kv_heads = node_attribute(node, "kv_num_heads", heads) if node.op_type == "GroupQueryAttention" else heads
        width = query[-1] // (heads + 2 * kv_heads) * heads if packed and isinstance(kv_heads, int) else query[-1]
    if not isinstance(width, int) or width <= 0 or width % heads:
        return None
    return width // heads


def _standard_head_size(graph: ModelGraph, node: onnx.NodeProto) -> int | None:
    """The head size of ONNX's ``Attention`` (opset 23): the query's last dim, per head where its heads are merged.

    Its query is ``[B, heads, S, head size]``, or ``[B, S, hidden]`` with ``q_num_heads`` heads.
    """
    query = graph.shape(node.input[0]) if node.input and node.input[0] else None
    if not query or not isinstance(query[-1], int) or isinstance(query[-1], bool) or query[-1] <= 0:
        return None
    if len(query) == 4:
        return query[-1]
    heads = node_attribute(node, "q_num_heads", 0)
    if len(query) != 3 or not isinstance(heads, int) or heads <= 0 or query[-1] % heads:
        return None
    return query[-1] // heads


def _factors(graph: ModelGraph) -> list[tuple[float, str, str, float | None]]:
    """The factors the graph's operators hold in attributes (:data:`_FACTOR_ATTRIBUTES`), with their readers' labels.

    A default (no factor, or an attention's 1/sqrt(head size)) is left out: it is no value a
    converter moved there. Last, an attention's default scale, which a factor moved into its
    ``scale`` multiplies (NaN where its head size is not known: then nothing can be said).
    """
    found = []
    for index in range(graph.main_count):
        node = graph.nodes[index]
        domain = "" if node.domain == "ai.onnx" else node.domain
        for attribute, neutral in _FACTOR_ATTRIBUTES.get((domain, node.op_type), ()):
            value = node_attribute(node, attribute, neutral)
            if isinstance(value, float) and math.isfinite(value) and value != neutral:
                default: float | None = None
                if attribute == "scale":
                    size = _head_size(graph, node)
                    default = 1.0 / math.sqrt(size) if size else math.nan
                found.append((value, f"{node.op_type} '{node_label(node, index)}'", attribute, default))
    return found


def _scalar_factors(graph: ModelGraph, items: dict[str, _Item]) -> set[float]:
    """The factors a reference applies as ``Mul`` (or ``Div``) by a constant scalar, or holds in an attribute."""
    values = {float(item.value.ravel()[0]) for item in items.values() if item.value.size == 1}
    return {value for value in values if value} | {found[0] for found in _factors(graph)}


def _moved_factor(value: float, factors: set[float], default: float | None) -> bool:
    """Whether ``value`` is one of the reference's ``factors``, one squared, or one times an attention's ``default``.

    Squared: a scale split between q and k, as torch's exporter writes a scaled dot-product attention.
    """
    def near(a: float, b: float) -> bool:
        return abs(a - b) <= max(DERIVED_RTOL, _HALF_RTOL) * max(abs(a), abs(b))

    moved = factors | {one * one for one in factors}
    if default is not None:
        moved |= {default} | {one * default for one in factors}
    return any(near(value, one) for one in moved)


def _changed_factors(reference: ModelGraph, suspect: ModelGraph, mine: dict[str, _Item], scaled: bool) -> list[str]:
    """Factors the suspect holds in a fused operator's attribute that are no factor of the reference's, one line.

    A converter moves a ``Mul`` by a constant into an attribute (an attention's score scale into
    FusedMatMul's ``alpha``, the factors on both of its inputs multiplied; into an attention's
    ``scale``, times its default), so an attribute whose value is none of those holds one put in
    place of the reference's: compared per operator, a value changed in one of many attentions
    that share it is found. ``scaled``: the reference computes a
    ``Mul``'s scalar from a shape (a scale of 1/sqrt of a dimension), which a converter that
    knows the shape folds: no evidence then.
    """
    if scaled:
        return []
    factors = _scalar_factors(reference, mine)
    # An attention's scale whose head size is not known (its default NaN) tells nothing.
    new = [found for found in _factors(suspect)
           if not (found[3] is not None and math.isnan(found[3])) and not _moved_factor(found[0], factors, found[3])]
    if not new:
        return []
    value, label, attribute, _ = new[0]
    others = f" (and {len(new) - 1} more such attributes)" if len(new) > 1 else ""
    line = (f"the suspect's {label} holds {attribute} {value:.6g}, no factor of the reference (none of its Mul or "
            f"Div by a constant scalar, squared, or times an attention's default scale){others}")
    return [line]


def _agree(item: _Item, other: _Item) -> bool:
    """Whether two constants hold the same values up to their order (as ``_derived_values._differs``, sorted once)."""
    a, b = item.sorted, other.sorted
    if a.size != b.size:
        return False
    slack = item.step + other.step + _HALF_STEP
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    return not np.any(np.abs(a - b) > DERIVED_RTOL * np.maximum(np.abs(a), np.abs(b)) + 1e-6 * scale + slack)


def _unheld(items: dict[str, _Item], others: dict[str, _Item]) -> list[_Item]:
    """The ``items`` whose values no constant of ``others`` holds; equal values are compared once."""
    verdicts: dict[tuple[int, float, bytes], bool] = {}
    found = []
    for item in items.values():
        key = (item.sorted.size, item.step, item.sorted.tobytes())
        if key not in verdicts:
            verdicts[key] = any(_agree(item, other) for other in others.values())
        if not verdicts[key]:
            found.append(item)
    return found


def changed_operator_constants(match: ModelMatch) -> list[str]:
    """Arithmetic constants outside the weights that the suspect holds in place of the reference's; one line per kind.

    Args:
        match: the pairing of the two models' sites (resync across conversions made it): the
            sites' operands are the weights, compared by the resync, and left out here.

    Returns:
        One line per kind of operation (``Mul``, ``Add``, ``Pow`` ...) where the suspect reads a
        value the reference's operators of that kind never read while a value of the reference's,
        of the same size, is read by none of the suspect's; empty otherwise.
    """
    ref, sus = match.reference.graph, match.suspect.graph
    # Paired sites of which one weighs and the other does not: the resync compares neither's operands.
    odd = [(a, b) for a, b in match.sites.items() if match.reference_site(a).weighs != match.suspect_site(b).weighs]
    (mine, shaped), (theirs, _) = (_constants(ref, match.reference_sites, {a for a, _ in odd}),
                                   _constants(sus, match.suspect_sites, {b for _, b in odd}))
    folded = shaped.get("Mul", set())
    found = _changed_factors(ref, sus, mine.get("Mul", {}), 1 in folded or None in folded)
    for kind in sorted(set(mine) & set(theirs)):
        new, gone = _unheld(theirs[kind], mine[kind]), _unheld(mine[kind], theirs[kind])
        sizes = {item.value.size for item in gone}
        folds = shaped.get(kind, set())
        new = [item for item in new if item.value.size in sizes
               and not (item.value.size > 1 and (None in folds or item.value.size in folds))]
        if not new:
            continue
        item = new[0]
        was = next(other for other in gone if other.value.size == item.value.size)
        more = f" and {len(item.readers) - 1} more" if len(item.readers) > 1 else ""
        others = f" (and {len(new) - 1} more such constants)" if len(new) > 1 else ""
        found.append(
            f"the suspect's {kind} constant '{item.name}' ({_shown(item.value)}, read by '{item.readers[0]}'{more}) is read by no "
            f"{kind} of the reference, whose '{was.name}' ({_shown(was.value)}) the suspect no longer reads{others}"
        )
    return found


def _shown(value: np.ndarray) -> str:
    """A short description of a value: the number itself for a scalar, else its size."""
    return f"{float(value.ravel()[0]):.6g}" if value.size == 1 else f"{value.size} values"
