"""The shapes ONNX's inference gives a plain, fully static graph, without running it.

ONNX's shape inference costs about 10 microseconds per node (it serializes the model, looks up
each operator's schema, propagates data): at 50,000 nodes, half a second, more than loading
and saving the file. For the simplest graphs its answer is plain arithmetic: every node an
element-wise operator or a ``MatMul`` of the default domain without attributes, every input of
known static shape (positive dims) and floating-point type. :func:`static_output_shapes`
computes that answer in one pass over the nodes, the same shapes and element types inference
gives, and gives up (None: inference then runs as before) at anything else: another operator,
an attribute, a symbolic or zero dim, operands of different types, shapes that do not
broadcast, a graph output declared other than computed. Broadcasting follows ONNX's
multidirectional rule (numpy's), ``MatMul`` its rank-2-or-more rule: the batch dims broadcast,
the inner dims must agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
) -> dict[str, tuple[tuple[int, ...], int]] | None:
    """Each node output's shape and element type, in node order; None where inference must run.

    Args:
        ops: each node's ``(op_type, domain)``, in topological order.
        inputs: each node's input names.
        outputs: each node's output names.
        attributed: whether each node has any attribute.
        shapes: the known shapes of the graph inputs and initializers (read, not changed).
        dtypes: their element types.

    Returns:
        Output name -> (shape, element type) for every node, or None when a node or a shape is
        outside what this computes exactly as ONNX's inference does.
    """
    found: dict[str, tuple[tuple[int, ...], int]] = {}
    for (op_type, domain), names, results, has_attributes in zip(ops, inputs, outputs, attributed):
        if has_attributes or domain not in _DEFAULT_DOMAINS or len(results) != 1 or not results[0]:
            return None
        if results[0] in found:  # a name defined twice (no model, but inference's answer is its own)
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
