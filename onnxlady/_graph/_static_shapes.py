"""The shapes ONNX's inference gives a plain, fully static graph, without running it.

ONNX's shape inference costs about 10 microseconds per node (it serializes the model, looks up
each operator's schema, propagates data): at 50,000 nodes, half a second, more than loading
and saving the file; and its first call in a process loads every operator's schema (9 to 13 ms,
a sixth of permuting an 11 MB CNN). For the simplest graphs its answer is plain arithmetic:
every node an element-wise operator or a ``MatMul`` of the default domain without attributes,
or one of the layers of a plain CNN or MLP head (:data:`LAYER_OPS`: Conv, pools, inference
BatchNorm, Flatten, Gemm, their attributes read), every input of known static shape (positive
dims) and floating-point type. :func:`static_output_shapes` computes that answer in one pass
over the nodes, the same shapes and element types inference gives, and gives up (None:
inference then runs as before) at anything else: another operator, an attribute it does not
read (SAME padding, ceil_mode, a training BatchNorm...), a symbolic or zero dim, operands of
different types, shapes that do not broadcast or channels that do not agree (where inference
fails), a graph output declared other than computed. Broadcasting follows ONNX's
multidirectional rule (numpy's), ``MatMul`` its rank-2-or-more rule: the batch dims broadcast,
the inner dims must agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnx

#: A shape as :class:`~onnxlady._graph._model_graph.ModelGraph` records it (dims: ints, names or None).
Shape = tuple[int | str | None, ...]

#: Operators whose output has their one input's shape and type.
UNARY_OPS = frozenset({"Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Exp", "Erf", "Sqrt"})
#: Operators broadcasting their two inputs (of one type) to their output, of that type.
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
#: Element types the operators above take and none of ONNX's data propagation reads.
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16})
_DEFAULT_DOMAINS = ("", "ai.onnx")


def static_output_shapes(
    ops: Sequence[tuple[str, str]],
    inputs: Sequence[tuple[str, ...]],
    outputs: Sequence[tuple[str, ...]],
    attributed: Sequence[bool],
    shapes: Mapping[str, Shape],
    dtypes: Mapping[str, int],
    nodes: Sequence[onnx.NodeProto] | None = None,
) -> dict[str, tuple[tuple[int, ...], int]] | None:
    """Each node output's shape and element type, in node order; None where inference must run.

    Args:
        ops: each node's ``(op_type, domain)``, in topological order.
        inputs: each node's input names.
        outputs: each node's output names.
        attributed: whether each node has any attribute.
        shapes: the known shapes of the graph inputs and initializers (read, not changed).
        dtypes: their element types.
        nodes: the nodes themselves, in the same order: with them, the layers of
            :data:`LAYER_OPS` are computed too (their attributes read); without, any node
            with an attribute gives up.

    Returns:
        Output name -> (shape, element type) for every node, or None when a node or a shape is
        outside what this computes exactly as ONNX's inference does.
    """
    found: dict[str, tuple[tuple[int, ...], int]] = {}
    for index, ((op_type, domain), names, results, has_attributes) in enumerate(zip(ops, inputs, outputs, attributed)):
        if domain not in _DEFAULT_DOMAINS or len(results) != 1 or not results[0]:
            return None
        if results[0] in found:  # a name defined twice (no model, but inference's answer is its own)
            return None
        layer = LAYER_OPS.get(op_type) if nodes is not None else None
        if layer is not None:
            assert nodes is not None
            operands = [_operand(name, found, shapes, dtypes) if name else None for name in names]
            computed = layer(nodes[index], operands)
            if computed is None:
                return None
            found[results[0]] = computed
            continue
        if has_attributes:
            return None
        if op_type in UNARY_OPS:
            if len(names) != 1:
                return None
            operand = found.get(names[0]) or _operand(names[0], found, shapes, dtypes)
            if operand is None:
                return None
            found[results[0]] = operand
            continue
        if len(names) != 2 or (op_type not in BINARY_OPS and op_type != "MatMul"):
            return None
        first, second = names
        # (a node output found here, most operands: no call)
        left = found.get(first) or _operand(first, found, shapes, dtypes)
        right = found.get(second) or _operand(second, found, shapes, dtypes)
        if left is None or right is None or left[1] != right[1]:
            return None
        if op_type == "MatMul":
            (a, dtype), b = left, right[0]
            if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
                return None
            batch = broadcast(a[:-2], b[:-2])
            shape = None if batch is None else (*batch, a[-2], b[-1])
        else:
            shape, dtype = broadcast(left[0], right[0]), left[1]
        if shape is None:
            return None
        found[results[0]] = (shape, dtype)
    return found


def _operand(
    name: str,
    found: Mapping[str, tuple[tuple[int, ...], int]],
    shapes: Mapping[str, Shape],
    dtypes: Mapping[str, int],
) -> tuple[tuple[int, ...], int] | None:
    """The static shape and float type of ``name`` (a node output computed here, or given); None if unknown."""
    known = found.get(name)
    if known is not None:
        return known
    if not name:
        return None
    shape, dtype = shapes.get(name), dtypes.get(name)
    if shape is None or dtype not in FLOAT_TYPES:
        return None
    for dim in shape:
        if type(dim) is not int or dim < 1:
            return None
    return shape, dtype  # type: ignore[return-value]


def broadcast(left: tuple[int, ...], right: tuple[int, ...]) -> tuple[int, ...] | None:
    """Two static shapes broadcast (ONNX's multidirectional rule); None when they do not."""
    if left == right:  # (most operands: no dim to compare)
        return left
    rank = max(len(left), len(right))
    left, right = (1,) * (rank - len(left)) + left, (1,) * (rank - len(right)) + right
    result = []
    for a, b in zip(left, right):
        if a != b and a != 1 and b != 1:
            return None
        result.append(b if a == 1 else a)
    return tuple(result)


# -- layers: the operators of a plain CNN or MLP head, with their attributes ---------------------
#: A static shape and element type (what :func:`static_output_shapes` records per output).
Typed = tuple[tuple[int, ...], int]


def _attributes(node: onnx.NodeProto, allowed: frozenset[str]) -> dict[str, Any] | None:
    """``node``'s attributes by name; None when it sets one outside ``allowed`` (or one twice)."""
    values: dict[str, Any] = {}
    for attribute in node.attribute:
        if attribute.name not in allowed or attribute.name in values:
            return None
        values[attribute.name] = onnx.helper.get_attribute_value(attribute)
    return values


def _ints(values: dict[str, Any], name: str, default: list[int], count: int, least: int) -> list[int] | None:
    """An ints attribute (or its default) of ``count`` values, each at least ``least``; None otherwise."""
    value = values.get(name, default)
    if not isinstance(value, list) or len(value) != count or any(type(v) is not int or v < least for v in value):
        return None
    return value


def _windows(values: dict[str, Any], spatial: tuple[int, ...], kernel: tuple[int, ...]) -> list[int] | None:
    """The output sizes of a sliding window over ``spatial`` (a Conv's, a pool's without ceil_mode).

    ONNX's ``convPoolShapeInference`` with explicit pads (``auto_pad`` NOTSET) or none (VALID):
    ``(in + pad_begin + pad_end - ((k - 1) * dilation + 1)) // stride + 1``. None where that
    inference would fail or do otherwise (SAME padding, pads with VALID, a window larger than
    the padded input).
    """
    count = len(spatial)
    auto_pad = values.get("auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", b"VALID") or (auto_pad == b"VALID" and "pads" in values):
        return None
    strides = _ints(values, "strides", [1] * count, count, 1)
    dilations = _ints(values, "dilations", [1] * count, count, 1)
    pads = _ints(values, "pads", [0] * (2 * count), 2 * count, 0)
    if strides is None or dilations is None or pads is None:
        return None
    sizes = []
    for axis, (size, taps) in enumerate(zip(spatial, kernel)):
        padded = size + pads[axis] + pads[axis + count] - ((taps - 1) * dilations[axis] + 1)
        if padded < 0:
            return None
        sizes.append(padded // strides[axis] + 1)
    return sizes


_CONV_ATTRIBUTES = frozenset({"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"})


def _conv(node: onnx.NodeProto, operands: list[Typed | None]) -> Typed | None:
    """``Conv``: ``[N, M, out...]`` from X ``[N, C, in...]`` and W ``[M, C / group, k...]`` (X's type)."""
    values = _attributes(node, _CONV_ATTRIBUTES)
    if values is None or len(operands) not in (2, 3) or operands[0] is None or operands[1] is None:
        return None
    (x, dtype), (w, w_dtype) = operands[0], operands[1]
    group = values.get("group", 1)
    if len(x) < 3 or len(w) != len(x) or w_dtype != dtype or type(group) is not int or group < 1:
        return None
    if x[1] != w[1] * group or w[0] % group:
        return None
    if len(operands) == 3 and (operands[2] is None or operands[2] != ((w[0],), dtype)):
        return None
    kernel = w[2:]
    if "kernel_shape" in values and values["kernel_shape"] != list(kernel):
        return None
    sizes = _windows(values, x[2:], kernel)
    return None if sizes is None else ((x[0], w[0], *sizes), dtype)


_POOL_ATTRIBUTES = {
    "MaxPool": frozenset({"auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order", "strides"}),
    # (AveragePool reads dilations from opset 19 on, ignores them before: not computed here)
    "AveragePool": frozenset({"auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides"}),
}


def _pool(node: onnx.NodeProto, operands: list[Typed | None]) -> Typed | None:
    """``MaxPool`` and ``AveragePool`` (one output, no ceil_mode): ``[N, C, out...]`` of X's type."""
    values = _attributes(node, _POOL_ATTRIBUTES[node.op_type])
    if values is None or len(operands) != 1 or operands[0] is None or values.get("ceil_mode", 0) != 0:
        return None
    x, dtype = operands[0]
    if len(x) < 3:
        return None
    kernel = _ints(values, "kernel_shape", [], len(x) - 2, 1)
    sizes = None if kernel is None else _windows(values, x[2:], tuple(kernel))
    return None if sizes is None else ((x[0], x[1], *sizes), dtype)


def _global_pool(node: onnx.NodeProto, operands: list[Typed | None]) -> Typed | None:
    """``GlobalAveragePool`` and ``GlobalMaxPool``: ``[N, C, 1...]`` of X's type."""
    if len(node.attribute) or len(operands) != 1 or operands[0] is None or len(operands[0][0]) < 3:
        return None
    x, dtype = operands[0]
    return (x[0], x[1], *(1,) * (len(x) - 2)), dtype


_BATCHNORM_ATTRIBUTES = frozenset({"epsilon", "momentum", "training_mode"})


def _batchnorm(node: onnx.NodeProto, operands: list[Typed | None]) -> Typed | None:
    """``BatchNormalization`` for inference (one output): X's shape and type, four ``[C]`` vectors of that type."""
    values = _attributes(node, _BATCHNORM_ATTRIBUTES)
    if values is None or values.get("training_mode", 0) != 0 or len(operands) != 5 or operands[0] is None:
        return None
    x, dtype = operands[0]
    if len(x) < 2 or any(operand != ((x[1],), dtype) for operand in operands[1:]):
        return None
    return x, dtype


def _flatten(node: onnx.NodeProto, operands: list[Typed | None]) -> Typed | None:
    """``Flatten``: ``[prod(dims before axis), prod(dims from axis)]`` of X's type."""
    values = _attributes(node, frozenset({"axis"}))
    if values is None or len(operands) != 1 or operands[0] is None:
        return None
    x, dtype = operands[0]
    axis = values.get("axis", 1)
    if not x or type(axis) is not int or not -len(x) <= axis <= len(x):
        return None
    axis = axis + len(x) if axis < 0 else axis
    return (math.prod(x[:axis]), math.prod(x[axis:])), dtype


_GEMM_ATTRIBUTES = frozenset({"alpha", "beta", "transA", "transB"})


def _gemm(node: onnx.NodeProto, operands: list[Typed | None]) -> Typed | None:
    """``Gemm``: ``[M, N]`` of A's type, from A ``[M, K]`` and B ``[K, N]`` (either transposed) and a C that broadcasts to it."""
    values = _attributes(node, _GEMM_ATTRIBUTES)
    if values is None or len(operands) not in (2, 3) or operands[0] is None or operands[1] is None:
        return None
    (a, dtype), (b, b_dtype) = operands[0], operands[1]
    trans_a, trans_b = values.get("transA", 0), values.get("transB", 0)
    if len(a) != 2 or len(b) != 2 or b_dtype != dtype or trans_a not in (0, 1) or trans_b not in (0, 1):
        return None
    rows, inner = (a[1], a[0]) if trans_a else a
    inner_b, columns = (b[1], b[0]) if trans_b else b
    if inner != inner_b:
        return None
    if len(operands) == 3:
        bias = operands[2]
        if bias is None or bias[1] != dtype or len(bias[0]) > 2:
            return None
        if any(d not in (1, full) for d, full in zip(reversed(bias[0]), (columns, rows))):
            return None
    return (rows, columns), dtype


#: Operators with attributes computed here (given the nodes), each by a function of the node
#: and its operands' static shapes and types (None for an operand not known so, or absent).
LAYER_OPS: dict[str, Callable[[onnx.NodeProto, list[Typed | None]], Typed | None]] = {
    "Conv": _conv,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
    "BatchNormalization": _batchnorm,
    "Flatten": _flatten,
    "Gemm": _gemm,
}
