"""Output shapes of ONNX Runtime's quantized contrib operators (``QuantFormat.QOperator``).

``onnxruntime.quantization.quantize_static(..., quant_format=QuantFormat.QOperator)`` writes the
activations between integer layers with ``com.microsoft`` operators (``QLinearAdd``,
``QLinearMul``, ``QLinearSigmoid``, ``QLinearConcat``, ``QLinearGlobalAveragePool``...) that
ONNX's shape inference does not know. Their shapes are those of the float operators they stand
for, read from the data inputs at their own slots; :mod:`onnxlady._graph._contrib_shapes` merges
this table into its own. Element types: ``0`` is the first input's; ``-(slot + 3)`` is the type
of input ``slot`` (the output zero point's, for operators whose first input is a scale).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import onnx

from onnxlady._graph._attributes import node_attribute

Dim = int | str | None
Shape = tuple[Dim, ...]
#: Output name -> (shape, element type); element type 0 means "as the node's first input".
Found = dict[str, tuple[Shape, int]]

MICROSOFT = "com.microsoft"


def input_name(node: onnx.NodeProto, slot: int) -> str:
    """The name at input ``slot``, empty when the node has fewer inputs (an optional one left out)."""
    return node.input[slot] if slot < len(node.input) else ""


def same_as_first_input(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """Element-wise on one operand (QLinearSigmoid, Gelu, RotaryEmbedding...): the data input's shape."""
    shape = shapes.get(input_name(node, 0))
    return {} if shape is None or not node.output[0] else {node.output[0]: (shape, 0)}


def _broadcast(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """QLinearAdd / QLinearMul: numpy broadcasting of A (slot 0) and B (slot 3)."""
    a, b = shapes.get(input_name(node, 0)), shapes.get(input_name(node, 3))
    if a is None or b is None or not node.output[0]:
        return {}
    rank = max(len(a), len(b))
    left, right = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    out: list[Dim] = []
    for x, y in zip(left, right):
        if x == 1:
            out.append(y)
        elif y == 1 or x == y:
            out.append(x)
        elif isinstance(x, int) and isinstance(y, int):
            return {}  # not broadcastable: a malformed node
        else:
            out.append(x if isinstance(x, int) else y if isinstance(y, int) else None)
    return {node.output[0]: (tuple(out), 0)}


def _concat(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """QLinearConcat(Y_scale, Y_zero_point, X0, X0_scale, X0_zp, X1...): Concat of the X's."""
    operands = [shapes.get(input_name(node, slot)) for slot in range(2, len(node.input), 3)]
    if not operands or any(shape is None for shape in operands) or not node.output[0]:
        return {}
    known = [shape for shape in operands if shape is not None]
    rank = len(known[0])
    if any(len(shape) != rank for shape in known) or rank == 0:
        return {}
    axis = int(node_attribute(node, "axis", 0)) % rank
    out: list[Dim] = list(known[0])
    sizes = [size for shape in known if isinstance(size := shape[axis], int)]
    out[axis] = sum(sizes) if len(sizes) == len(known) else None
    return {node.output[0]: (tuple(out), -(1 + 3))}


def _global_pool(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """QLinearGlobalAveragePool: every spatial axis reduced to 1 (channels first or last)."""
    x = shapes.get(input_name(node, 0))
    if x is None or len(x) < 3 or not node.output[0]:
        return {}
    if int(node_attribute(node, "channels_last", 0)):
        out = (x[0], *([1] * (len(x) - 2)), x[-1])
    else:
        out = (x[0], x[1], *([1] * (len(x) - 2)))
    return {node.output[0]: (out, 0)}


def _qgemm(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """QGemm(A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp): ``(M, N)``; float without y_scale."""
    a, b = shapes.get(input_name(node, 0)), shapes.get(input_name(node, 3))
    if a is None or b is None or len(a) != 2 or len(b) != 2 or not node.output[0]:
        return {}
    m = a[1] if int(node_attribute(node, "transA", 0)) else a[0]
    n = b[0] if int(node_attribute(node, "transB", 0)) else b[1]
    dtype = -(8 + 3) if input_name(node, 7) else onnx.TensorProto.FLOAT
    return {node.output[0]: ((m, n), dtype)}


QUANTIZED_SHAPES: dict[tuple[str, str], Callable[[onnx.NodeProto, Mapping[str, Shape]], Found]] = {
    (MICROSOFT, "QLinearAdd"): _broadcast,
    (MICROSOFT, "QLinearMul"): _broadcast,
    (MICROSOFT, "QLinearSigmoid"): same_as_first_input,
    (MICROSOFT, "QLinearLeakyRelu"): same_as_first_input,
    (MICROSOFT, "QLinearSoftmax"): same_as_first_input,
    (MICROSOFT, "QLinearConcat"): _concat,
    (MICROSOFT, "QLinearGlobalAveragePool"): _global_pool,
    (MICROSOFT, "QGemm"): _qgemm,
}
