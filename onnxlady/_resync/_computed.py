"""Weights a graph computes from its constants, read as numbers with a bound.

onnxoptimizer's ``fuse_bn_into_conv`` folds a BatchNormalization into the Conv before it not as
new stored constants but as graph arithmetic on the old ones: the weight becomes
``Mul(W, Unsqueeze(Div(gamma, Sqrt(Add(var, Cast(eps))))))`` and the bias
``Add(Mul(Sub(Cast(b), mean), s), beta)``. The analysis permutes such a weight through the
constants it is made of (:func:`~onnxlady._rules._derived.derived_uses`); to pair it with another
model's Conv (a BatchNorm kept or folded into stored constants) the matching and the resync need
its value. :func:`read_computed` evaluates the constant subgraph in float64
(:func:`~onnxlady._graph._fold.evaluate_node`) and carries a first-order bound of what the
runtime's own computation in the tensor's type may differ by (the stored constants' rounding,
then one rounding per operator). Only the element-wise arithmetic and reshapes such folds are
written with are evaluated (:func:`computed_shape` says which tensors qualify): every operator
on the way must have a bound rule here, so a value is never compared without its bound.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxlady._graph._fold import evaluate_node
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._graph._shape_scalars import shape_values
from onnxlady._resync._statistics import STATISTICS_OPS, evaluate_statistics, statistics_inputs
from onnxlady._resync._values import Approx, half_ulp, read_constant
from onnxlady._rules._derived import derived_uses

__all__ = ["aligned_uses", "computed_shape", "computed_use", "read_computed"]

#: Operators that only move or reshape values: the bound moves with them.
_SHAPE_OPS = frozenset({"Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"})
#: Element-wise arithmetic with a bound rule in :func:`_bound`.
_ARITHMETIC_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Neg", "Cast"})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})
#: Most operators between a computed weight and its stored constants (a folded BatchNorm has six).
_MAX_NODES = 64
#: Most elements of a value evaluated here (a large convolution's weight).
_LIMIT = 1 << 28


def _subgraph(graph: ModelGraph, name: str, shapes: bool = False) -> list[int] | None:
    """The nodes computing ``name`` from stored constants, if every one has a bound rule here.

    With ``shapes``, values computed exactly from static or partial shapes count as stored
    (:meth:`~onnxlady._graph._shape_scalars.ShapeValues.exact`: shape arithmetic has no rounding).
    """
    found: list[int] = []
    pending, seen = [name], {name}
    while pending:
        tensor = pending.pop()
        if graph.constant_leaf(tensor) is not None or (shapes and _exact_from_shapes(graph, tensor) is not None):
            continue
        produced = graph.producer.get(tensor)
        if produced is None or not 0 <= produced[0] < graph.main_count or len(found) >= _MAX_NODES:
            return None
        node = graph.nodes[produced[0]]
        data = _data_inputs(graph, node, produced[1])
        if data is None:
            return None
        found.append(produced[0])
        for item in data:
            if item and item not in seen:
                seen.add(item)
                pending.append(item)
    return found


def _data_inputs(graph: ModelGraph, node: onnx.NodeProto, output: int) -> list[str] | None:
    """The inputs whose values output ``output`` of ``node`` is computed from, if it is evaluated here, else None.

    A reshape's shape and a reduction's axes are integer constants, read as stored: not listed.
    """
    if (node.domain or "") not in ("", "ai.onnx"):
        return None
    if node.op_type in STATISTICS_OPS:  # a normalization's statistics (see _statistics)
        slots = statistics_inputs(node, graph.opsets.get("", 0), output)
        axes = node.input[1] if node.op_type != "BatchNormalization" and len(node.input) > 1 else ""
        if slots is None or (axes and graph.constant_value(axes) is None):
            return None
        return [node.input[slot] for slot in slots if node.input[slot]]
    if output != 0 or node.op_type not in _SHAPE_OPS | _ARITHMETIC_OPS:
        return None
    return list(node.input[:1] if node.op_type in _SHAPE_OPS else node.input)


def _exact_from_shapes(graph: ModelGraph, name: str) -> np.ndarray | None:
    """``name``'s value where the graph computes it exactly from constants and shapes, static or partial, else None."""
    folded = graph.folded.get(name)  # folded from static shapes, in its type as the runtime does
    return folded if folded is not None else shape_values(graph).exact(name)


def computed_shape(graph: ModelGraph, name: str, shapes: bool = False) -> tuple[int, ...] | None:
    """The static shape of a float tensor computed from constants alone that :func:`read_computed` reads, else None.

    With ``shapes``, also from values computed exactly from shapes (see :func:`read_computed`):
    the walk of :func:`_subgraph` then shows what it is computed from.
    """
    if not name or graph.constant_leaf(name) is not None or not (shapes or graph.constant_derived(name)):
        return None
    if name in graph.graph_outputs or graph.dtypes.get(name) not in _FLOAT_TYPES:
        return None
    shape = graph.shape(name)
    if shape is None or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return None
    found = _subgraph(graph, name, shapes)
    return tuple(int(d) for d in shape) if found else None  # type: ignore[arg-type]


def read_computed(graph: ModelGraph, name: str, bounds: bool = True, shapes: bool = False) -> Approx | None:
    """The value of a tensor :func:`computed_shape` accepts, in float64, with its bound (zeros without ``bounds``).

    None where a step cannot be evaluated (a value not finite, a stored constant unreadable).
    With ``shapes``, values computed exactly from shapes, static or partial (a dynamic batch), are
    read as exact stored numbers: torch's MultiheadAttention computes its q/k scale from the head
    size at run time (``Shape -> Slice -> Cast -> Sqrt -> Div -> Sqrt``), which a converter that
    knows the shapes folds.
    """
    if computed_shape(graph, name, shapes) is None:
        return None
    # Read with its bound either way: whether a value reads must not depend on ``bounds``.
    value = _read(graph, name, {}, shapes)
    return value if value is None or bounds else Approx(value.value)


def _read(graph: ModelGraph, name: str, memo: dict[str, Approx | None], shapes: bool = False) -> Approx | None:
    if name in memo:
        return memo[name]
    value: Approx | None = None
    folded = _exact_from_shapes(graph, name) if shapes and graph.constant_leaf(name) is None else None
    if folded is not None:  # shape arithmetic, computed in its type as the runtime does
        value = Approx(folded.astype(np.float64) if folded.dtype.kind == "f" else folded, np.zeros(folded.shape))
    elif graph.constant_leaf(name) is not None:
        stored = graph.constant_value(name)
        if stored is not None and stored.dtype.kind in "iub":  # axes and shapes: exact
            value = Approx(stored, np.zeros(stored.shape))
        elif stored is not None:
            value = read_constant(graph, name)
    else:
        index, output = graph.producer[name]
        node = graph.nodes[index]
        data = _data_inputs(graph, node, output) or []
        inputs: list[Approx | None] = [_read(graph, item, memo, shapes) if item in data else None for item in node.input]
        for item, read in zip(node.input, inputs):
            if item and read is None and item in data:
                memo[name] = None
                return None
        if node.op_type in STATISTICS_OPS:
            memo[name] = value = _statistics(graph, node, inputs)
            return value
        arrays = [
            read.value if read is not None else graph.constant_value(item) if item else None
            for item, read in zip(node.input, inputs)
        ]
        result = evaluate_node(node, arrays, graph.opsets.get("", 0), _LIMIT)
        if result is not None and result.dtype.kind == "f":
            result = result.astype(np.float64)
            error = _bound(graph, node, inputs, result)
            # A bound that is no number (a division by about zero) bounds nothing: no value.
            value = Approx(result, error) if np.all(np.isfinite(error)) else None
    memo[name] = value
    return value


def _statistics(graph: ModelGraph, node: onnx.NodeProto, inputs: list[Approx | None]) -> Approx | None:
    """A reduction's or a normalization's output 0 (:mod:`onnxlady._resync._statistics`), rounded to its type."""
    axes = graph.constant_value(node.input[1]) if node.op_type != "BatchNormalization" and len(node.input) > 1 and node.input[1] else None
    read = evaluate_statistics(node, inputs, axes, graph.opsets.get("", 0), graph.dtypes.get(node.input[0]))
    if read is None or read.value.size > _LIMIT:
        return None
    stored = graph.dtypes.get(node.output[0])
    if stored not in _FLOAT_TYPES:
        return None
    rounding = half_ulp(read.value, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(stored)))
    return Approx(read.value, read.error + rounding)


def _bound(graph: ModelGraph, node: onnx.NodeProto, inputs: list[Approx | None], result: np.ndarray) -> np.ndarray:
    """First order: how far ``result`` may be from what the runtime computes from the stored numbers."""
    op = node.op_type
    if op in _SHAPE_OPS:
        assert inputs[0] is not None
        return np.broadcast_to(inputs[0].error, inputs[0].value.shape).reshape(result.shape)
    values = [item.value for item in inputs if item is not None]
    errors = [np.broadcast_to(item.error, item.value.shape) for item in inputs if item is not None]
    if op in ("Add", "Sub"):
        error = np.broadcast_to(errors[0] + errors[1], result.shape)
    elif op == "Mul":
        error = np.abs(values[0]) * errors[1] + np.abs(values[1]) * errors[0] + errors[0] * errors[1]
    elif op == "Div":  # d(a / b) = da / b - a db / b^2
        with np.errstate(all="ignore"):
            error = errors[0] / np.abs(values[1]) + np.abs(values[0]) * errors[1] / values[1] ** 2
    elif op == "Sqrt":  # d sqrt(x) = dx / (2 sqrt(x))
        with np.errstate(all="ignore"):
            error = errors[0] / (2.0 * np.sqrt(values[0]))
    else:  # Neg; a Cast of a real number rounds it to the target type (below)
        error = errors[0]
    error = np.broadcast_to(error, result.shape)
    stored = graph.dtypes.get(node.output[0])
    if stored in _FLOAT_TYPES:  # the runtime rounds each result to the tensor's type
        error = error + half_ulp(result, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(stored)))
    return error


def computed_use(graph: ModelGraph, name: str, axis: int, reader: int, slot: int) -> tuple[int, int, int] | None:
    """A constant use that axis ``axis`` of computed ``name`` moves with: ``(node, slot, leaf axis)``, the analysis's binding key.

    Every use a walk reaches (:func:`~onnxlady._rules._derived.derived_uses`) moves with the axis,
    so any is as good; one read whole (no block or piece of it) is taken. None where no walk
    reaches one.
    """
    standardized = standardized_values(graph, name)
    if standardized is not None:  # its output channels are the normalized constant's axis 1
        return (*standardized, graph.leaf_axis(graph.nodes[standardized[0]].input[0], 1)) if axis == 0 else None  # type: ignore[return-value]
    walk = derived_uses(graph, name, axis, reader, slot)
    for node, use_slot, use_axis, block, piece in walk[0] if walk is not None else []:
        if block is not None or piece is not None:
            continue
        leaf_axis = graph.leaf_axis(graph.nodes[node].input[use_slot], use_axis)
        if leaf_axis is not None:
            return node, use_slot, leaf_axis
    return None


def aligned_uses(graph: ModelGraph, name: str, reader: int, slot: int) -> list[tuple[int, int]]:
    """The constant uses ``(node, slot)`` that hold computed ``name`` element for element, each position where it is.

    A use of the same shape that every axis of ``name`` (of more than one position) reaches at
    that same axis: the folded weight's ``W``, the folded bias's ``gamma``, ``beta``, mean and
    variance. A permutation of ``name`` is one of each such constant, so a reference constant
    held so is compared through ``name``'s value (both models' layers in one form).
    """
    shape = computed_shape(graph, name)
    if shape is None:
        return []
    standardized = standardized_values(graph, name)
    if standardized is not None:
        return [standardized]
    found: set[tuple[int, int]] | None = None
    for axis, size in enumerate(shape):
        if size < 2:
            continue
        walk = derived_uses(graph, name, axis, reader, slot)
        if walk is None:
            return []
        here = {
            (node, use_slot)
            for node, use_slot, use_axis, block, piece in walk[0]
            if use_axis == axis and block is None and piece is None
            and graph.constant_shape(graph.nodes[node].input[use_slot]) == shape
        }  # fmt: skip
        found = here if found is None else found & here
    return sorted(found or ())


#: Operators a constant may reach its user through and keep its elements in their order.
_ORDER_KEEPING = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def standardized_values(graph: ModelGraph, name: str) -> tuple[int, int] | None:
    """Where computed ``name`` is a weight standardized in the graph: the use ``(node, slot)`` of the values it normalizes.

    ``W = Reshape(BatchNormalization(V [1, M, F], gain, shift, ...))`` (see
    :mod:`onnxlady._rules.standardized`): ``V``, read in its stored order, holds ``W``'s elements
    row-major, each normalized within its output channel, so a permutation of ``W`` (output
    channels on ``V``'s axis 1, input channels on blocks of its axis 2) is the same permutation
    of ``V`` reshaped. ``V``'s plan is then solved and compared through ``W``'s value, as a
    constant that holds a computed weight element for element (:func:`aligned_uses`). None for
    any other form, or where the stored constant reaches the BatchNormalization through
    anything but reshapes (a transpose would reorder its elements).
    """
    produced = graph.producer.get(name)
    if produced is None or graph.nodes[produced[0]].op_type not in ("Reshape", "Flatten"):
        return None
    shape = computed_shape(graph, name)
    source = graph.producer.get(graph.nodes[produced[0]].input[0])
    if shape is None or source is None or source[1] != 0 or not 0 <= source[0] < graph.main_count:
        return None
    norm = graph.nodes[source[0]]
    if norm.op_type != "BatchNormalization" or statistics_inputs(norm, graph.opsets.get("", 0), 0) is None:
        return None
    leaf = graph.constant_leaf(norm.input[0])
    values = graph.constant_shape(norm.input[0])
    if leaf is None or values is None or any(graph.nodes[index].op_type not in _ORDER_KEEPING for index in leaf.chain):
        return None
    if len(values) != 3 or values[0] != 1 or values[1] != shape[0] or values[1] * values[2] != int(np.prod(shape)):
        return None
    return source[0], 0
