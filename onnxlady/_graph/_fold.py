"""Constant folding of shape arithmetic, for analysis only.

Exporters keep shape arithmetic in the graph (``Shape -> Gather -> Div -> Unsqueeze -> Concat ->
Reshape``, ``ConstantOfShape -> Mul -> Equal -> Where -> Expand``...). ONNX shape inference
propagates shape *values* through a few operators only, so the rules would see computed Slice
bounds, Reshape targets or Pad amounts. :func:`fold_step` evaluates every node whose inputs are
all known small values (small constants or values folded before), plus ``Shape``/``Size`` of
tensors whose static shape is fully known, with numpy implementations of the common operators.

A folded value is exactly what a runtime computes for every input of the declared shapes: only
fully static shapes are read, integer arithmetic follows ONNX (``Div`` truncates toward zero,
``Mod`` follows ``fmod``), floating arithmetic is restricted to float32/float64 basic operations
(correctly rounded, so identical everywhere), and anything unusual (division by zero, NaN in
``Max``/``Min``, a Cast out of range, an output of more than ``limit`` elements, random
operators, subgraphs, other domains) is simply not folded. The model itself is never changed:
:class:`~onnxlady._graph.ModelGraph` only reads the values (``constant_value``) and the shapes
that inference finds with them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlady._graph._attributes import node_attribute
from onnxlady._io._external import is_mapped
from onnxlady._io._tensors import read_array

#: Folded values (and the constants they are computed from) up to this many elements.
FOLD_LIMIT = 4096

_INT_KINDS = "iu"
_EXACT_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

Value = np.ndarray
Shape = Sequence[object]


def constant_attribute_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node as numpy (tensor, int(s) or float(s) attributes)."""
    for attribute in node.attribute:
        if attribute.name == "value":
            if is_mapped(attribute.t):  # left in its external file (onnxlady._io._external)
                return read_array(attribute.t, f"Constant '{node.name}'")
            return numpy_helper.to_array(attribute.t)
        if attribute.name == "value_int":
            return np.asarray(attribute.i, dtype=np.int64)
        if attribute.name == "value_ints":
            return np.asarray(list(attribute.ints), dtype=np.int64)
        if attribute.name == "value_float":
            return np.asarray(attribute.f, dtype=np.float32)
        if attribute.name == "value_floats":
            return np.asarray(list(attribute.floats), dtype=np.float32)
    return None


def static_shape(shape: Shape | None) -> tuple[int, ...] | None:
    """A shape whose every dimension is a known int (else None)."""
    if shape is None:
        return None
    dims = [d for d in shape if isinstance(d, int) and not isinstance(d, bool) and d >= 0]
    return tuple(int(d) for d in dims) if len(dims) == len(shape) else None


def fold_node(
    node: onnx.NodeProto,
    values: Mapping[str, Value],
    shapes: Mapping[str, Shape],
    dtypes: Mapping[str, int],
    opset: int,
    limit: int = FOLD_LIMIT,
) -> Value | None:
    """The value of the single output of ``node`` if it can be folded now, else None.

    ``values`` holds the known values (small constants and values folded before), ``shapes``
    and ``dtypes`` what shape inference knows (only fully static shapes are read).
    """
    if node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE:
        return None
    if len(node.output) != 1 or not node.output[0]:
        return None
    name = node.output[0]
    if node.op_type in ("Shape", "Size"):
        if not node.input or not node.input[0]:
            return None
        shape = static_shape(shapes.get(node.input[0]))
        if shape is None:
            return None
        result = _shape(node, shape) if node.op_type == "Shape" else np.asarray(int(np.prod(shape)), dtype=np.int64)
    else:
        if any(name and name not in values for name in node.input):
            return None
        inputs = [values[name] if name else None for name in node.input]
        try:
            with np.errstate(all="ignore"):
                folded = _FOLDABLE[node.op_type](node, inputs, opset, limit)
        except Exception:
            return None
        if folded is None:
            return None
        result = np.asarray(folded)
    if result.size > limit or result.dtype.kind not in "iufb":
        return None
    expected = dtypes.get(name)
    if expected:
        try:
            if np.dtype(onnx.helper.tensor_dtype_to_np_dtype(expected)) != result.dtype:
                return None
        except Exception:
            return None
    known = static_shape(shapes.get(name))
    if known is not None and known != tuple(result.shape):
        return None
    return result


# -- helpers -------------------------------------------------------------------------------
def _ints(value: np.ndarray | None) -> list[int]:
    """The integers of an input; a missing or non-integer input fails the fold (fold_node catches it)."""
    if value is None:
        raise ValueError("input missing")
    if value.dtype.kind not in _INT_KINDS:
        raise ValueError("integer input expected")
    return [int(v) for v in value.reshape(-1)]


def _count(shape: Sequence[int]) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def _numeric(*arrays: np.ndarray) -> bool:
    """Same dtype, and either integers/bools or float32/float64 (exact basic arithmetic)."""
    dtype = arrays[0].dtype
    if any(a.dtype != dtype for a in arrays):
        return False
    return dtype.kind in _INT_KINDS + "b" or dtype in _EXACT_FLOATS


def _broadcast_ok(arrays: Sequence[np.ndarray], limit: int) -> bool:
    return _count(np.broadcast_shapes(*(a.shape for a in arrays))) <= limit


def _axes_input(node: onnx.NodeProto, inputs: list, opset: int, since: int, slot: int = 1) -> list[int] | None:
    if opset < since:
        axes = node_attribute(node, "axes")
        return None if axes is None else [int(a) for a in axes]
    return _ints(inputs[slot]) if len(inputs) > slot and inputs[slot] is not None else None


def _shape(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    rank = len(shape)
    start = int(node_attribute(node, "start", 0))
    end = node_attribute(node, "end")
    start = min(max(start + rank if start < 0 else start, 0), rank)
    stop = rank if end is None else int(end)
    stop = min(max(stop + rank if stop < 0 else stop, 0), rank)
    return np.asarray(shape[start:stop], dtype=np.int64)


# -- operators -----------------------------------------------------------------------------
Impl = Callable[[onnx.NodeProto, list, int, int], "np.ndarray | None"]


def _identity(node, inputs, opset, limit):
    return inputs[0]


def _gather(node, inputs, opset, limit):
    data, indices = inputs[0], inputs[1]
    if indices.dtype.kind not in _INT_KINDS:
        return None
    axis = int(node_attribute(node, "axis", 0))
    axis = axis + data.ndim if axis < 0 else axis
    dim = data.shape[axis]
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        return None
    if _count(data.shape[:axis] + indices.shape + data.shape[axis + 1:]) > limit:
        return None
    return np.take(data, np.where(indices < 0, indices + dim, indices).astype(np.int64), axis=axis)


def _unsqueeze(node, inputs, opset, limit):
    axes = _axes_input(node, inputs, opset, 13)
    if axes is None:
        return None
    out_rank = inputs[0].ndim + len(axes)
    normal = sorted(a + out_rank if a < 0 else a for a in axes)
    if len(set(normal)) != len(normal) or any(not 0 <= a < out_rank for a in normal):
        return None
    value = inputs[0]
    for a in normal:
        value = np.expand_dims(value, a)
    return value


def _squeeze(node, inputs, opset, limit):
    axes = _axes_input(node, inputs, opset, 13)
    value = inputs[0]
    if axes is None:
        return np.squeeze(value)
    normal = tuple(a + value.ndim if a < 0 else a for a in axes)
    if any(value.shape[a] != 1 for a in normal):
        return None
    return np.squeeze(value, axis=normal)


def _concat(node, inputs, opset, limit):
    arrays = [a for a in inputs if a is not None]
    if not arrays or any(a.dtype != arrays[0].dtype for a in arrays):
        return None
    return np.concatenate(arrays, axis=int(node_attribute(node, "axis")))


def _slice(node, inputs, opset, limit):
    data = inputs[0]
    if opset < 10:
        starts = [int(v) for v in node_attribute(node, "starts")]
        ends = [int(v) for v in node_attribute(node, "ends")]
        axes = node_attribute(node, "axes")
        axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis + data.ndim if axis < 0 else axis
        dim = data.shape[axis]
        if step == 0:
            return None
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index[axis] = slice(start, end, step)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            index[axis] = slice(start, None if end < 0 else end, step)
    return data[tuple(index)]


def _binary(function: Callable) -> Impl:
    def run(node, inputs, opset, limit):
        a, b = inputs[0], inputs[1]
        if not _numeric(a, b) or a.dtype.kind == "b" or not _broadcast_ok((a, b), limit):
            return None
        return np.asarray(function(a, b), dtype=a.dtype)

    return run


def _div(node, inputs, opset, limit):
    a, b = inputs[0], inputs[1]
    if not _numeric(a, b) or a.dtype.kind == "b" or not _broadcast_ok((a, b), limit):
        return None
    if a.dtype.kind in _INT_KINDS:
        if np.any(b == 0):
            return None
        quotient = np.floor_divide(a, b)
        # ONNX (C++) integer division truncates toward zero, numpy floors
        adjust = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))
        return np.asarray(quotient + adjust.astype(a.dtype), dtype=a.dtype)
    return np.asarray(np.divide(a, b), dtype=a.dtype)


def _mod(node, inputs, opset, limit):
    a, b = inputs[0], inputs[1]
    if not _numeric(a, b) or a.dtype.kind not in _INT_KINDS or not _broadcast_ok((a, b), limit):
        return None  # float Mod: not needed for shapes
    if np.any(b == 0):
        return None
    if int(node_attribute(node, "fmod", 0)):
        return np.asarray(np.fmod(a, b), dtype=a.dtype)
    return np.asarray(np.mod(a, b), dtype=a.dtype)


def _compare(function: Callable) -> Impl:
    def run(node, inputs, opset, limit):
        a, b = inputs[0], inputs[1]
        if not _numeric(a, b) or not _broadcast_ok((a, b), limit):
            return None
        return np.asarray(function(a, b), dtype=np.bool_)

    return run


def _logical(function: Callable) -> Impl:
    def run(node, inputs, opset, limit):
        arrays = inputs[:2]
        if any(a.dtype != np.bool_ for a in arrays) or not _broadcast_ok(arrays, limit):
            return None
        return np.asarray(function(*arrays), dtype=np.bool_)

    return run


def _not(node, inputs, opset, limit):
    return np.logical_not(inputs[0]) if inputs[0].dtype == np.bool_ else None


def _where(node, inputs, opset, limit):
    condition, x, y = inputs
    if condition.dtype != np.bool_ or x.dtype != y.dtype or not _broadcast_ok(inputs, limit):
        return None
    return np.asarray(np.where(condition, x, y), dtype=x.dtype)


def _constant_of_shape(node, inputs, opset, limit):
    shape = _ints(inputs[0])
    if any(d < 0 for d in shape) or _count(shape) > limit:
        return None
    value = node_attribute(node, "value")
    fill = numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    if fill.size != 1:
        return None
    return np.full(shape, fill[0], dtype=fill.dtype)


def _cast(node, inputs, opset, limit):
    value = inputs[0]
    try:
        target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node_attribute(node, "to"))))
    except Exception:
        return None
    if target.kind not in "iufb":
        return None
    if value.dtype.kind not in "iufb":
        return None
    if target.kind == "f" and target not in _EXACT_FLOATS:
        return None  # float16: rounding modes of converters differ in corner cases
    if value.dtype.kind == "f" and value.dtype not in _EXACT_FLOATS:
        return None
    if value.dtype.kind == "f" and target.kind in _INT_KINDS:
        if not np.all(np.isfinite(value)):
            return None
        info = np.iinfo(target)
        truncated = np.trunc(value.astype(np.float64))
        if np.any(truncated < info.min) or np.any(truncated > info.max):
            return None
    if value.dtype.kind in _INT_KINDS and target.kind in _INT_KINDS:
        info = np.iinfo(target)
        if value.size and (value.min() < info.min or value.max() > info.max):
            return None
    return value.astype(target)


def _range(node, inputs, opset, limit):
    start, stop, delta = (a.reshape(()) if a.size == 1 else None for a in inputs)
    if start is None or stop is None or delta is None:
        return None
    if not _numeric(start, stop, delta) or start.dtype.kind not in _INT_KINDS or int(delta) == 0:
        return None
    count = max(-(-(int(stop) - int(start)) // int(delta)), 0)
    if count > limit:
        return None
    return (int(start) + np.arange(count, dtype=np.int64) * int(delta)).astype(start.dtype)


def _reshape(node, inputs, opset, limit):
    data = inputs[0]
    if opset < 5:
        target = [int(d) for d in node_attribute(node, "shape")]
    else:
        target = _ints(inputs[1])
    allowzero = int(node_attribute(node, "allowzero", 0))
    if not allowzero:
        target = [data.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return data.reshape(target)


def _expand(node, inputs, opset, limit):
    shape = _ints(inputs[1])
    out = np.broadcast_shapes(inputs[0].shape, tuple(shape))
    if _count(out) > limit:
        return None
    return np.broadcast_to(inputs[0], out).copy()


def _reduce_prod(node, inputs, opset, limit):
    value = inputs[0]
    if value.dtype.kind not in _INT_KINDS:
        return None  # float products depend on the order of evaluation
    axes = _axes_input(node, inputs, opset, 18)
    keepdims = bool(int(node_attribute(node, "keepdims", 1)))
    if not axes:
        if axes is not None or int(node_attribute(node, "noop_with_empty_axes", 0)):
            return value if axes is not None and int(node_attribute(node, "noop_with_empty_axes", 0)) else None
        axes_tuple = None
    else:
        axes_tuple = tuple(a + value.ndim if a < 0 else a for a in axes)
    return np.asarray(np.prod(value, axis=axes_tuple, keepdims=keepdims), dtype=value.dtype)


def _unary(function: Callable, floats_only: bool = False) -> Impl:
    def run(node, inputs, opset, limit):
        value = inputs[0]
        if not _numeric(value) or value.dtype.kind == "b":
            return None
        if floats_only and value.dtype.kind != "f":
            return value  # Floor/Ceil of an integer: itself (not produced by exporters anyway)
        return np.asarray(function(value), dtype=value.dtype)

    return run


def _extremum(function: Callable) -> Impl:
    def run(node, inputs, opset, limit):
        arrays = [a for a in inputs if a is not None]
        if not arrays or not _numeric(*arrays) or arrays[0].dtype.kind == "b" or not _broadcast_ok(arrays, limit):
            return None
        if arrays[0].dtype.kind == "f" and any(np.any(np.isnan(a)) for a in arrays):
            return None
        result = arrays[0]
        for other in arrays[1:]:
            result = function(result, other)
        return np.asarray(result, dtype=arrays[0].dtype)

    return run


def _transpose(node, inputs, opset, limit):
    perm = node_attribute(node, "perm")
    return np.transpose(inputs[0], None if perm is None else [int(p) for p in perm])


_FOLDABLE: dict[str, Impl] = {
    "Shape": _identity,  # handled by fold_step (needs the static shape)
    "Size": _identity,
    "Identity": _identity,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Slice": _slice,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _div,
    "Mod": _mod,
    "Equal": _compare(np.equal),
    "Less": _compare(np.less),
    "Greater": _compare(np.greater),
    "LessOrEqual": _compare(np.less_equal),
    "GreaterOrEqual": _compare(np.greater_equal),
    "Not": _not,
    "And": _logical(np.logical_and),
    "Or": _logical(np.logical_or),
    "Where": _where,
    "ConstantOfShape": _constant_of_shape,
    "Cast": _cast,
    "Range": _range,
    "Reshape": _reshape,
    "Expand": _expand,
    "ReduceProd": _reduce_prod,
    "Neg": _unary(np.negative),
    "Abs": _unary(np.abs),
    "Floor": _unary(np.floor, floats_only=True),
    "Ceil": _unary(np.ceil, floats_only=True),
    "Max": _extremum(np.maximum),
    "Min": _extremum(np.minimum),
    "Transpose": _transpose,
}
#: The operators :func:`fold_node` may fold (it answers None for any other without reading the node).
FOLDABLE_OPS = frozenset(_FOLDABLE)


# -- evaluation for comparisons ---------------------------------------------------------------
#: Elements up to which :func:`evaluate_node` computes a value (a derived table, not a layer's weights).
EVALUATE_LIMIT = 1 << 20
#: Float operators :func:`evaluate_node` computes but :func:`fold_node` never folds: their results
#: are not correctly rounded, so two runtimes (or a converter's folder) may differ in the last bits.
_APPROXIMATE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Exp": np.exp,
    "Log": np.log,
    "Sqrt": np.sqrt,
    "Reciprocal": np.reciprocal,
    "Tanh": np.tanh,
    "Sigmoid": lambda x: 0.5 * (1.0 + np.tanh(0.5 * x)),
    "Softplus": lambda x: np.logaddexp(0.0, x),
    "Sin": np.sin,
    "Cos": np.cos,
    "Relu": lambda x: np.maximum(x, 0.0),
}


def evaluate_node(node: onnx.NodeProto, inputs: Sequence[Value | None], opset: int, limit: int = EVALUATE_LIMIT) -> Value | None:
    """The value of ``node``'s single output from known inputs, real numbers in float64: for comparisons only.

    Two models that hold one constant in two forms (``A_log -> Exp -> Neg`` kept by one exporter,
    folded into a stored ``-exp(A_log)`` by another) are compared by value within a tolerance;
    the analysis never reads these values (:func:`fold_node` folds what is exact). Float inputs
    must be float64 (the caller widens the stored constants); a Cast between float types keeps
    float64, as the tolerance covers its rounding.

    Args:
        node: a node of the standard domain with one output.
        inputs: the value of each input (None for an absent optional one).
        opset: the model's standard opset.
        limit: the most elements the result may have.

    Returns:
        The value, or None when it cannot be computed here (another operator or domain, an
        input missing, a result not finite or over ``limit`` elements).
    """
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1 or not node.output[0]:
        return None
    if any(name and value is None for name, value in zip(node.input, inputs)) or not inputs or inputs[0] is None:
        return None
    op, first = node.op_type, inputs[0]
    try:
        with np.errstate(all="ignore"):
            if op in _APPROXIMATE:
                result = _APPROXIMATE[op](first) if first.dtype == np.float64 else None
            elif op == "Pow":
                exponent = inputs[1] if len(inputs) > 1 else None
                result = None if exponent is None or first.dtype != np.float64 else np.power(first, exponent.astype(np.float64))
            elif op == "Cast" and first.dtype.kind in "fiu" and np.dtype(
                onnx.helper.tensor_dtype_to_np_dtype(int(node_attribute(node, "to")))
            ).kind == "f":
                result = first.astype(np.float64)
            elif op in _FOLDABLE and op not in ("Shape", "Size"):
                result = _FOLDABLE[op](node, list(inputs), opset, limit)
            else:
                result = None
    except Exception:
        return None
    if result is None:
        return None
    result = np.asarray(result)
    if result.size > limit or result.dtype.kind not in "iufb" or (result.dtype.kind == "f" and not np.all(np.isfinite(result))):
        return None
    return result
#: The operators :func:`symbolic_value` reads (it answers None for any other).
SYMBOLIC_OPS = frozenset({
    "Shape", "Identity", "Cast", "Unsqueeze", "Squeeze", "Concat", "Gather", "Slice", "Reshape", "Equal", "Where",
})  # fmt: skip


# -- symbolic shape values ------------------------------------------------------------------
#: One element of a shape value: a known int, a dimension's symbolic name, or None (unknown).
SymbolicDim = int | str | None
#: A shape value read symbolically, element by element.
SymbolicValue = tuple[SymbolicDim, ...]


def symbolic_value(
    node: onnx.NodeProto,
    symbolic: Mapping[str, SymbolicValue],
    values: Mapping[str, Value],
    shapes: Mapping[str, Shape],
) -> SymbolicValue | None:
    """The shape value ``node`` computes, element by element, where dims are symbolic.

    A dynamic-axes export builds reshape targets from ``Shape`` (``x.view(b, s, h, d)`` reads
    ``b`` and ``s`` from ``x``'s Shape); with symbolic ``b`` and ``s`` nothing folds, but each
    element is still a known dim of a known tensor. Shape, Gather, Unsqueeze, Squeeze, Concat,
    Slice, Cast, Identity and a 1-D Reshape of 1-D int64 shape values are read, and Equal and
    Where as torch's ``expand`` uses them (``Where(Equal(sizes, -1), 1, sizes)``, see
    :func:`symbolic_expand`); anything else is None. A 0-D value is kept as one element.
    """
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    op = node.op_type

    def read(name: str) -> SymbolicValue | None:
        if name in symbolic:
            return symbolic[name]
        value = values.get(name)
        if value is None or value.dtype.kind not in _INT_KINDS or value.ndim > 1:
            return None
        return tuple(int(v) for v in value.reshape(-1))

    try:
        if op == "Shape":
            shape = shapes.get(node.input[0])
            if shape is None:
                return None
            rank = len(shape)
            start = int(node_attribute(node, "start", 0))
            end = node_attribute(node, "end")
            start = min(max(start + rank if start < 0 else start, 0), rank)
            stop = rank if end is None else int(end)
            stop = min(max(stop + rank if stop < 0 else stop, 0), rank)
            return tuple(d if isinstance(d, (int, str)) else None for d in shape[start:stop])
        if op in ("Identity", "Cast", "Unsqueeze", "Squeeze"):
            if op == "Cast" and int(node_attribute(node, "to", 0)) not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                return None
            return read(node.input[0])
        if op == "Concat":
            pieces = [read(name) for name in node.input if name]
            if any(piece is None for piece in pieces):
                return None
            return tuple(d for piece in pieces if piece is not None for d in piece)
        if op == "Gather":
            data, index = read(node.input[0]), values.get(node.input[1])
            if data is None or index is None or int(node_attribute(node, "axis", 0)) != 0:
                return None
            return tuple(data[int(i)] for i in index.reshape(-1))
        if op == "Slice":
            data = read(node.input[0])
            arguments = [values.get(name) if name else None for name in node.input[1:5]]
            if data is None or len(arguments) < 2 or arguments[0] is None or arguments[1] is None:
                return None
            if any(a is not None and int(v) != 0 for a in arguments[2:3] if a is not None for v in a.reshape(-1)):
                return None  # a 1-D value has axis 0 only
            step = int(arguments[3].reshape(-1)[0]) if len(arguments) > 3 and arguments[3] is not None else 1
            begin, stop = int(arguments[0].reshape(-1)[0]), int(arguments[1].reshape(-1)[0])
            return tuple(data[slice(begin, stop, step)])
        if op == "Reshape":
            # A 1-D value reshaped to one axis (``view(-1)`` of a shape list) keeps its elements.
            data, target = read(node.input[0]), values.get(node.input[1])
            if data is None or target is None or target.size != 1 or int(target.reshape(-1)[0]) not in (-1, len(data)):
                return None
            return data
        if op == "Equal":
            return _symbolic_equal(read(node.input[0]), read(node.input[1]))
        if op == "Where":
            condition, chosen, other = (read(name) for name in node.input[:3])
            if condition is None or chosen is None or other is None:
                return None
            size = max(len(condition), len(chosen), len(other))
            if any(len(piece) not in (1, size) for piece in (condition, chosen, other)):
                return None
            pick = [condition[k % len(condition)] for k in range(size)]
            return tuple(
                None if c is None or isinstance(c, str) else chosen[k % len(chosen)] if c else other[k % len(other)]
                for k, c in enumerate(pick)
            )
    except (IndexError, ValueError, TypeError):
        return None
    return None


def _symbolic_equal(left: SymbolicValue | None, right: SymbolicValue | None) -> SymbolicValue | None:
    """``Equal`` of two shape values, 1 or 0 per element where it is decided, else None.

    A dimension's symbolic name stands for a size, never negative: it differs from a negative
    int (torch's ``expand`` compares its sizes with ``-1``); two equal names are equal.
    """
    if left is None or right is None:
        return None
    size = max(len(left), len(right))
    if any(len(piece) not in (1, size) for piece in (left, right)):
        return None
    result: list[SymbolicDim] = []
    for k in range(size):
        a, b = left[k % len(left)], right[k % len(right)]
        if isinstance(a, int) and isinstance(b, int):
            result.append(int(a == b))
        elif isinstance(a, str) and isinstance(b, str) and a == b:
            result.append(1)
        elif (isinstance(a, str) and isinstance(b, int) and b < 0) or (isinstance(b, str) and isinstance(a, int) and a < 0):
            result.append(0)
        else:
            result.append(None)
    return tuple(result)


def symbolic_expand(in_shape: Sequence[SymbolicDim], target: SymbolicValue) -> SymbolicValue | None:
    """The output shape of ``Expand(in_shape, target)`` with symbolic dims, where it is determined.

    Broadcasting, right-aligned: a dim of 1 on one side takes the other's; equal dims stay; an
    input dim known to be more than 1 is the output's (the target must then be 1 or the same);
    anything else stays None.
    """
    rank = max(len(in_shape), len(target))
    padded_in = [1] * (rank - len(in_shape)) + list(in_shape)
    padded_target = [1] * (rank - len(target)) + list(target)
    dims: list[SymbolicDim] = []
    for a, b in zip(padded_in, padded_target):
        if a == 1:
            dims.append(b if b is None or isinstance(b, str) or b >= 0 else None)
        elif b == 1 or a == b:
            dims.append(a)
        elif isinstance(a, int) and a > 1:
            dims.append(a)
        elif isinstance(b, int) and b > 1:
            dims.append(b)
        else:
            dims.append(None)
    return tuple(dims)


def symbolic_reshape(in_shape: Sequence[SymbolicDim], target: SymbolicValue, allow_zero: bool) -> SymbolicValue | None:
    """The output shape of ``Reshape(in_shape -> target)`` with symbolic dims, where it is determined.

    ``0`` copies the input's dim (unless ``allow_zero``); one ``-1`` is what is left of the
    input once the other dims are divided out, symbols cancelling symbols of the same name
    (``[b, s, 4, 8]`` to ``[b, s, -1]`` is ``[b, s, 32]``). Unknown elements stay None.
    """
    dims: list[SymbolicDim] = []
    for axis, d in enumerate(target):
        if d == 0 and not allow_zero:
            dims.append(in_shape[axis] if axis < len(in_shape) else None)
        else:
            dims.append(d)
    if sum(1 for d in dims if d == -1) > 1 or any(isinstance(d, int) and d < -1 for d in dims):
        return None
    if -1 in dims:
        if any(d is None for d in in_shape) or any(d is None for d in dims):
            dims = [None if d == -1 else d for d in dims]
        else:
            numerator = [d for d in in_shape if isinstance(d, str)]
            known = int(np.prod([d for d in in_shape if isinstance(d, int)], dtype=np.int64))
            divisor = 1
            for d in dims:
                if isinstance(d, str):
                    if d not in numerator:
                        return tuple(None if x == -1 else x for x in dims)
                    numerator.remove(d)
                elif d != -1:
                    divisor *= int(d)  # type: ignore[arg-type]
            if divisor <= 0 or known % divisor:
                return None
            rest = known // divisor
            if not numerator:
                missing: SymbolicDim = rest
            elif len(numerator) == 1 and rest == 1:
                missing = numerator[0]
            else:
                missing = None
            dims = [missing if d == -1 else d for d in dims]
    return tuple(dims)
