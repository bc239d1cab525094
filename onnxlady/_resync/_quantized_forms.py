"""Linear layers and tables as ONNX Runtime's quantizer writes them in integer operators.

``onnxruntime.quantization`` writes a float model's weights in two forms besides QDQ (which
:func:`~onnxlady._resync._values.read_constant` reads through its ``DequantizeLinear``):

- ``quantize_dynamic``: ``MatMulInteger`` / ``ConvInteger`` on an int8 weight and its zero
  point, the int32 result ``Cast`` to float and multiplied by the activation's dynamic scale
  times the weight's scale (``Mul(x_scale, w_scale)``, computed at run time); the bias an
  ``Add`` after that. An embedding table is stored as integers: ``Gather`` on them, then a
  ``DequantizeLinear`` of the gathered rows (after a ``Transpose`` or reshape of the integers,
  when the float model moved the rows so); where the gathered rows feed a MatMul, the integer
  rows go straight into ``MatMulInteger`` (the table's zero point at slot 2, its scale first in
  the scale ``Mul``), besides that ``DequantizeLinear`` if a float path reads them too. An
  ``LSTM`` becomes ``DynamicQuantizeLSTM``: int8 W and R transposed, their scales and zero
  points per direction or per gate column.
- ``quantize_static(..., quant_format=QuantFormat.QOperator)``: ``QLinearConv`` (weight, scale
  and zero point per output channel at slots 3-5, the bias an int32 at slot 8 with scale
  ``x_scale * w_scale``), ``QLinearMatMul`` (``b`` at slots 3-5, per column), ``QGemm``
  (com.microsoft, ``C`` an int32 bias like QLinearConv's), a ``MatMul``'s bias a constant
  operand of the ``QLinearAdd`` after it, dequantized by its own scale and zero point.

Here each such weight is read as the float layer it stands for: the integers minus their zero
point, times the weight's scale (read from the node's own inputs, or from the constant factor of
the scale ``Mul`` for the dynamic form), with an error bound of half a quantization step (the
quantizer rounds to nearest). Activation quantization (``DynamicQuantizeLinear``, the
activation scales of the ``QLinear*`` operators) is no weight and is left out; it enters only
where it scales an int32 bias. :mod:`onnxlady._resync._sites` asks this module, through small
hooks, whether a node is such a layer (:func:`quantized_linear`), where its float result is
(:func:`quantized_tail`), which operand holds its bias (:func:`quantized_bias`), whether a
Gather reads an integer table (:func:`quantized_table`) or a QLinearMul/QLinearAdd an integer
channel vector (:func:`quantized_channel_op`), and for the values (:func:`read_quantized`), so
these forms pair with the float layers they came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._values import Approx, read_constant

__all__ = [
    "QuantizedLinear",
    "quantized_bias",
    "quantized_channel_op",
    "quantized_form",
    "quantized_linear",
    "quantized_table",
    "quantized_tail",
    "read_quantized",
]

MICROSOFT = "com.microsoft"
_STANDARD = ("", "ai.onnx")
#: A quantizer rounds ``w / scale`` to nearest in float32: half a step, and a few units in the
#: last place of the division on top.
_HALF_STEP = 0.5 * (1.0 + 2.0**-20)


@dataclass(frozen=True)
class QuantizedLinear:
    """An integer linear layer's weight: where it is stored and its canonical layout.

    ``family`` is ``dense`` (``[out, in]``) or ``conv`` (``[out, in / group, k...]``); ``axes``
    reorders the stored axes into the canonical ones (``np.transpose``); ``extra`` is the
    token beyond the weight's shape (a convolution's groups); ``factor`` multiplies it (QGemm's
    ``alpha``; its ``beta`` the quantizer folds into the int32 bias).
    """

    family: str
    slot: int
    shape: tuple[int, ...]
    canonical: tuple[int, ...]
    axes: tuple[int, ...] | None
    extra: tuple[object, ...]
    factor: float = 1.0


def _key(graph: ModelGraph, index: int) -> tuple[str, str]:
    node = graph.nodes[index]
    domain = node.domain or ""
    return ("" if domain in _STANDARD else domain), node.op_type


def _integer_constant(graph: ModelGraph, name: str) -> np.ndarray | None:
    """A constant of integers (a quantized weight, an int32 bias), or None."""
    value = graph.constant_value(name) if name else None
    return value if value is not None and value.dtype.kind in "iu" else None


def _float_value(graph: ModelGraph, name: str) -> np.ndarray | None:
    value = graph.constant_value(name) if name else None
    return np.asarray(value, dtype=np.float64) if value is not None and value.dtype.kind == "f" else None


def _input(graph: ModelGraph, index: int, slot: int) -> str:
    node = graph.nodes[index]
    return node.input[slot] if slot < len(node.input) else ""


def _runtime_weight(graph: ModelGraph, name: str) -> str | None:
    """The float constant a weight is quantized from at run time, or None.

    Where a model holds its weights in ``Constant`` nodes (Paddle's exporter), ``quantize_dynamic``
    leaves them float and quantizes each at run time, like an activation: ``ConvInteger`` reads
    output 0 of a ``DynamicQuantizeLinear`` of the float weight (its scale, output 1, enters the
    scale ``Mul``). The weight is then that float constant.
    """
    produced = graph.producer.get(name) if name else None
    if produced is None or produced[1] != 0 or _key(graph, produced[0]) != ("", "DynamicQuantizeLinear"):
        return None
    source = graph.nodes[produced[0]].input[0]
    value = graph.constant_value(source) if graph.constant_leaf(source) is not None else None
    return source if value is not None and value.dtype.kind == "f" else None


def _weight_value(graph: ModelGraph, index: int, slot: int) -> np.ndarray | None:
    """An integer layer's weight as stored: integers, or the float constant quantized at run time."""
    name = _input(graph, index, slot)
    weight = _integer_constant(graph, name)
    if weight is None and (source := _runtime_weight(graph, name)) is not None:
        weight = graph.constant_value(source)
    return weight


# -- the dynamic form: MatMulInteger / ConvInteger, Cast, Mul by x_scale * w_scale ---------------
@dataclass(frozen=True)
class _IntegerScale:
    cast: int
    mul: int  # the Mul giving the float result
    scale_mul: int | None  # Mul(x_scale, w_scale), computed at run time
    scale: np.ndarray  # w_scale


def _only_reader(graph: ModelGraph, name: str) -> tuple[int, int] | None:
    readers = graph.consumers.get(name, [])
    if len(readers) != 1 or name in graph.graph_outputs:
        return None
    return readers[0]


def _integer_scale(graph: ModelGraph, index: int) -> _IntegerScale | None:
    """The Cast and scale Mul after a MatMulInteger / ConvInteger, and the weight's scale.

    The factor is ``Mul(x_scale, w_scale)`` with ``x_scale`` the scale of the
    ``DynamicQuantizeLinear`` that quantized this node's input and ``w_scale`` a constant;
    anything else is not the quantizer's form and is not read.
    """
    node = graph.nodes[index]
    reader = _only_reader(graph, node.output[0]) if node.output else None
    if reader is None or graph.nodes[reader[0]].op_type != "Cast":
        return None
    cast = reader[0]
    reader = _only_reader(graph, graph.nodes[cast].output[0])
    if reader is None or reader[1] not in (0, 1) or _key(graph, reader[0]) != ("", "Mul"):
        return None
    mul = reader[0]
    factor = graph.nodes[mul].input[1 - reader[1]]
    produced = graph.producer.get(factor)
    if produced is None or _key(graph, produced[0]) != ("", "Mul"):
        return None
    scale_mul = graph.nodes[produced[0]]
    for slot in (0, 1):
        scale = _float_value(graph, scale_mul.input[slot])
        if scale is None:  # a weight quantized at run time: its scale comes from its own quantizer
            scale = _runtime_scale(graph, index, scale_mul.input[slot])
        source = graph.producer.get(scale_mul.input[1 - slot])
        if scale is None or source is None:
            continue
        quantizer = graph.nodes[source[0]]
        if (_key(graph, source[0]) == ("", "DynamicQuantizeLinear") and source[1] == 1
                and quantizer.output[0] == node.input[0]):  # fmt: skip
            return _IntegerScale(cast, mul, produced[0], scale)
    # Rows of an integer table gathered straight into the layer: their scale is the table's
    # constant one, first in the scale Mul (the quantizer's order: input scale, weight scale).
    rows_scale = _float_value(graph, scale_mul.input[0]) if len(scale_mul.input) == 2 else None
    weight_scale = _float_value(graph, scale_mul.input[1]) if len(scale_mul.input) == 2 else None
    if (rows_scale is not None and rows_scale.size == 1 and weight_scale is not None
            and _gathered_rows(graph, index) is not None):  # fmt: skip
        return _IntegerScale(cast, mul, produced[0], weight_scale)
    return None


def _gathered_rows(graph: ModelGraph, index: int) -> int | None:
    """The Gather whose integer rows a ``MatMulInteger`` reads as its input, or None.

    ``quantize_dynamic`` quantizes an embedding table and, where the gathered rows feed a
    MatMul, passes them to ``MatMulInteger`` as they are: the table's zero point at slot 2
    (a constant, per tensor) and no ``DynamicQuantizeLinear``.
    """
    if _key(graph, index) != ("", "MatMulInteger"):
        return None
    produced = graph.producer.get(_input(graph, index, 0))
    if produced is None or produced[1] != 0 or _key(graph, produced[0]) != ("", "Gather"):
        return None
    gather = graph.nodes[produced[0]]
    if int(node_attribute(gather, "axis", 0)) != 0:
        return None
    table = _integer_constant(graph, gather.input[0] if gather.input else "")
    zero = _integer_constant(graph, _input(graph, index, 2))
    if table is None or table.ndim != 2 or zero is None or zero.size != 1:
        return None
    return produced[0]


def _runtime_scale(graph: ModelGraph, index: int, name: str) -> np.ndarray | None:
    """The scale ``name`` when it is output 1 of the quantizer of this layer's run-time weight.

    ``DynamicQuantizeLinear``'s scale: the range of the values and zero over 255 (uint8).
    """
    produced = graph.producer.get(name)
    if produced is None or produced[1] != 1 or _key(graph, produced[0]) != ("", "DynamicQuantizeLinear"):
        return None
    quantizer = graph.nodes[produced[0]]
    if quantizer.output[0] != _input(graph, index, 1) or _runtime_weight(graph, quantizer.output[0]) is None:
        return None
    weight = np.asarray(graph.constant_value(quantizer.input[0]), dtype=np.float64)
    return np.array((max(float(weight.max()), 0.0) - min(float(weight.min()), 0.0)) / 255.0)


# -- what the sites ask ------------------------------------------------------------------------
def quantized_linear(graph: ModelGraph, index: int) -> QuantizedLinear | None:
    """The weight of an integer linear layer with a constant integer weight, or None.

    Args:
        graph: the model.
        index: any node.

    Returns:
        Where its weight is stored and how it maps to the canonical layout; None for any other
        node, a weight not stored as integers, or a scale that cannot be read.
    """
    key = _key(graph, index)
    node = graph.nodes[index]
    if key in (("", "QLinearConv"), ("", "ConvInteger")):
        slot = 3 if key[1] == "QLinearConv" else 1
        weight = _weight_value(graph, index, slot) if key[1] == "ConvInteger" else _integer_constant(graph, _input(graph, index, slot))
        if weight is None or weight.ndim < 3:
            return None
        if key[1] == "ConvInteger" and _integer_scale(graph, index) is None:
            return None
        shape = tuple(int(d) for d in weight.shape)
        return QuantizedLinear("conv", slot, shape, shape, None, (int(node_attribute(node, "group", 1)),))
    if key in (("", "QLinearMatMul"), ("", "MatMulInteger")):
        slot = 3 if key[1] == "QLinearMatMul" else 1
        weight = _weight_value(graph, index, slot) if key[1] == "MatMulInteger" else _integer_constant(graph, _input(graph, index, slot))
        activation = 0
        if weight is None or weight.ndim != 2 or _integer_constant(graph, _input(graph, index, activation)) is not None:
            return None
        if key[1] == "MatMulInteger" and _integer_scale(graph, index) is None:
            return None
        k, n = (int(d) for d in weight.shape)
        return QuantizedLinear("dense", slot, (k, n), (n, k), (1, 0), ())
    if key == (MICROSOFT, "QGemm"):
        weight = _integer_constant(graph, _input(graph, index, 3))
        if weight is None or weight.ndim != 2 or int(node_attribute(node, "transA", 0)):
            return None
        if _integer_constant(graph, _input(graph, index, 0)) is not None:
            return None
        shape = tuple(int(d) for d in weight.shape)
        alpha = float(node_attribute(node, "alpha", 1.0))
        if int(node_attribute(node, "transB", 0)):
            return QuantizedLinear("dense", 3, shape, shape, None, (), alpha)
        return QuantizedLinear("dense", 3, shape, (shape[1], shape[0]), (1, 0), (), alpha)
    return None


def quantized_tail(graph: ModelGraph, index: int) -> tuple[list[int], list[str]] | None:
    """The nodes after an integer layer that make its float result, and their operators.

    For ``MatMulInteger`` / ``ConvInteger``: the Cast, the scale Mul and the Mul computing the
    scale (``Mul(x_scale, w_scale)``, listed first so the last node is where the float result
    is). For a ``QLinear*`` layer whose only reader is a ``DequantizeLinear``: that node. None
    when the layer's own output is its result (a ``QLinear*`` feeding another one).
    """
    key = _key(graph, index)
    if key in (("", "MatMulInteger"), ("", "ConvInteger")):
        found = _integer_scale(graph, index)
        if found is None:
            return None
        nodes = [found.scale_mul] if found.scale_mul is not None else []
        return [*nodes, found.cast, found.mul], ["Cast", "Mul"]
    if key in (("", "QLinearConv"), ("", "QLinearMatMul"), (MICROSOFT, "QGemm")):
        reader = _only_reader(graph, graph.nodes[index].output[0])
        if reader is not None and reader[1] == 0 and _key(graph, reader[0]) == ("", "DequantizeLinear"):
            return [reader[0]], ["DequantizeLinear"]
    return None


def quantized_bias(graph: ModelGraph, index: int, size: int) -> tuple[int, int, tuple[int, ...]] | None:
    """The bias an integer layer holds itself, or the ``QLinearAdd`` after it holds.

    Args:
        graph: the model.
        index: an integer layer (see :func:`quantized_linear`).
        size: its output neurons.

    Returns:
        (node, input slot, stored shape) of the bias, or None when it has none.
    """
    key = _key(graph, index)
    own = {("", "QLinearConv"): 8, (MICROSOFT, "QGemm"): 6}.get(key)
    if own is not None and _input(graph, index, own):
        bias = _integer_constant(graph, _input(graph, index, own))
        return (index, own, tuple(int(d) for d in bias.shape)) if bias is not None and bias.size == size else None
    if key not in (("", "QLinearMatMul"), ("", "QLinearConv")):
        return None
    # A bias Add after the layer (Paddle writes a Conv's as one) becomes a QLinearAdd of a constant.
    reader = _only_reader(graph, graph.nodes[index].output[0])
    if reader is None or reader[1] not in (0, 3) or _key(graph, reader[0]) != (MICROSOFT, "QLinearAdd"):
        return None
    slot = 3 - reader[1]
    bias = _integer_constant(graph, _input(graph, reader[0], slot))
    if bias is None or bias.size != size or sum(d != 1 for d in bias.shape) > 1:
        return None
    shape = tuple(int(d) for d in bias.shape)
    if key[1] == "QLinearMatMul" and shape[-1:] != (size,):
        return None
    if key[1] == "QLinearConv":  # over the channel axis of [N, C, spatial...] only
        weight = _integer_constant(graph, _input(graph, index, 3))
        rank = weight.ndim if weight is not None else 0
        if rank < 2 or len(shape) > rank or ((1,) * (rank - len(shape)) + shape)[1] != size:
            return None
    return reader[0], slot, shape


def quantized_table(graph: ModelGraph, index: int) -> tuple[int | None, tuple[int, int]] | None:
    """A ``Gather`` of an integer table and the shape of the table.

    Its rows are read by a ``DequantizeLinear`` (the dynamic form: that node, part of the
    table's site, comes first) or by a ``QLinearAdd``/``QLinearMul`` with the table's scale and
    zero point (the QOperator form: None, that node is an activation operator of its own).
    """
    if _key(graph, index) != ("", "Gather") or int(node_attribute(graph.nodes[index], "axis", 0)) != 0:
        return None
    table = _integer_constant(graph, _input(graph, index, 0))
    reader = _table_reader(graph, index)
    if table is None or table.ndim != 2 or reader is None or _dequantize_table(graph, index, table) is None:
        return None
    dequantize = reader[0] if _key(graph, reader[0]) == ("", "DequantizeLinear") else None
    return dequantize, (int(table.shape[0]), int(table.shape[1]))


def quantized_channel_op(graph: ModelGraph, index: int) -> tuple[str, int, tuple[int, ...], int] | None:
    """A ``QLinearMul`` / ``QLinearAdd`` of a computed tensor and an integer channel vector.

    The QOperator form of a Mul or Add by a per-channel constant (a decomposed LayerNorm's scale
    and shift): (``scale`` or ``shift``, the constant's slot, its stored shape, its channels).
    """
    key = _key(graph, index)
    if key not in ((MICROSOFT, "QLinearMul"), (MICROSOFT, "QLinearAdd")):
        return None
    constant = [slot for slot in (0, 3) if _integer_constant(graph, _input(graph, index, slot)) is not None]
    if len(constant) != 1:
        return None
    value = _integer_constant(graph, _input(graph, index, constant[0]))
    assert value is not None
    wide = [d for d in value.shape if d != 1]
    if len(wide) != 1 or wide[0] < 2:
        return None
    role = "scale" if key[1] == "QLinearMul" else "shift"
    return role, constant[0], tuple(int(d) for d in value.shape), int(wide[0])


def quantized_form(graph: ModelGraph, index: int) -> str:
    """How a quantized weight is held, for the conversion finding (``MatMulInteger``...)."""
    return f"{graph.nodes[index].op_type} (ONNX Runtime's quantizer)"


# -- reading -----------------------------------------------------------------------------------
def _per_axis(parameter: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """A scale or zero point per tensor or one per entry of ``axis``, broadcast to ``shape``."""
    if parameter.size == 1:
        return np.broadcast_to(parameter.reshape(()), shape)
    if parameter.size != shape[axis]:
        return None
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(parameter.reshape(view), shape)


def _dequantized(raw: np.ndarray, scale: np.ndarray | None, zero: np.ndarray | None, axis: int) -> Approx | None:
    shape = tuple(raw.shape)
    if scale is None:
        return None
    spread_scale = _per_axis(scale, shape, axis % len(shape))
    spread_zero = _per_axis(zero, shape, axis % len(shape)) if zero is not None else np.zeros(shape)
    if spread_scale is None or spread_zero is None:
        return None
    value = (raw.astype(np.float64) - spread_zero) * spread_scale
    return Approx(value, _HALF_STEP * np.abs(spread_scale))


def _zero(graph: ModelGraph, index: int, slot: int) -> np.ndarray | None:
    name = _input(graph, index, slot)
    value = graph.constant_value(name) if name else None
    return None if value is None else np.asarray(value, dtype=np.float64)


#: Operators that only move a quantized tensor's integers: ``quantize_dynamic`` runs a Transpose
#: or Reshape after an integer table's Gather on the integers and dequantizes after it.
_MOVING_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def _table_reader(graph: ModelGraph, gather: int) -> tuple[int, int, bool] | None:
    """The node that reads a Gather's integer rows as numbers: (node, slot, whether they were moved first).

    Transposes and reshapes on the way are passed (a per-tensor scale and zero point commute with them).
    """
    direct = _rows_readers(graph, gather)
    if direct is not None:  # integer layers read the rows as they are (and a DequantizeLinear, maybe)
        dequantize, layers = direct
        return (dequantize if dequantize is not None else layers[0]), 0, False
    name, moved = graph.nodes[gather].output[0], False
    while True:
        reader = _only_reader(graph, name)
        if reader is None:
            return None
        node = graph.nodes[reader[0]]
        if reader[1] != 0 or node.op_type not in _MOVING_OPS or (node.domain or "") not in _STANDARD:
            return reader[0], reader[1], moved
        name, moved = node.output[0], True


def _rows_readers(graph: ModelGraph, gather: int) -> tuple[int | None, list[int]] | None:
    """The ``MatMulInteger`` layers reading a Gather's integer rows directly, and a ``DequantizeLinear``.

    The ``DequantizeLinear`` (None when there is none) reads the rows for the float paths; any
    other reader, or no such layer, gives None.
    """
    name = graph.nodes[gather].output[0]
    if name in graph.graph_outputs:
        return None
    dequantize: int | None = None
    layers: list[int] = []
    for node, slot in graph.consumers.get(name, []):
        if node < 0 or slot != 0:
            return None
        if _key(graph, node) == ("", "MatMulInteger") and _gathered_rows(graph, node) == gather:
            layers.append(node)
        elif _key(graph, node) == ("", "DequantizeLinear") and dequantize is None:
            dequantize = node
        else:
            return None
    return (dequantize, layers) if layers else None


def _rows_parameters(graph: ModelGraph, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The scale and zero point a ``MatMulInteger`` reads gathered integer rows with."""
    found = _integer_scale(graph, layer)
    if found is None or found.scale_mul is None:
        return None
    scale = _float_value(graph, graph.nodes[found.scale_mul].input[0])
    zero = _zero(graph, layer, 2)
    return None if scale is None or zero is None else (scale, zero)


def _same_rows_reading(graph: ModelGraph, gather: int, scale: np.ndarray, zero: np.ndarray | None) -> bool:
    """Whether every integer layer reading the rows directly reads them as (scale, zero) does.

    Such a layer takes one scale and zero point for all rows, so the table's must be per tensor.
    """
    direct = _rows_readers(graph, gather)
    if direct is None:
        return True
    if scale.size != 1 or (zero is not None and zero.size != 1):
        return False
    expected = (float(scale.reshape(-1)[0]), 0.0 if zero is None else float(zero.reshape(-1)[0]))
    for layer in direct[1]:
        read = _rows_parameters(graph, layer)
        if read is None or read[0].size != 1 or (float(read[0].reshape(-1)[0]), float(read[1].reshape(-1)[0])) != expected:
            return False
    return True


def _dequantize_table(graph: ModelGraph, gather: int, table: np.ndarray) -> Approx | None:
    """A Gather's integer table read as the operator after it reads its rows.

    That is a DequantizeLinear (scale and zero point at slots 1 and 2, per tensor or per column)
    or a QLinearAdd/QLinearMul reading the rows at slot 0 or 3 (their parameters right after,
    per tensor).
    """
    reader = _table_reader(graph, gather)
    if reader is None:
        return None
    dequantize, slot, moved = reader
    if _key(graph, dequantize) == ("", "MatMulInteger"):  # no DequantizeLinear: the layer's own reading
        read = _rows_parameters(graph, dequantize)
        if read is None or read[0].size != 1 or not _same_rows_reading(graph, gather, *read):
            return None
        return _dequantized(table, read[0], read[1], 0)
    if _key(graph, dequantize) == ("", "DequantizeLinear") and slot == 0:
        scale_slot = 1
    elif _key(graph, dequantize) in ((MICROSOFT, "QLinearAdd"), (MICROSOFT, "QLinearMul")) and slot in (0, 3):
        scale_slot = slot + 1
    else:
        return None
    scale = _float_value(graph, _input(graph, dequantize, scale_slot))
    zero = _zero(graph, dequantize, scale_slot + 1)
    if scale is None or (_input(graph, dequantize, scale_slot + 1) and zero is None):
        return None
    if not _same_rows_reading(graph, gather, scale, zero):  # the layers reading the integers agree
        return None
    if scale_slot != 1 and (scale.size > 1 or (zero is not None and zero.size > 1)):
        return None
    if scale.size > 1 or (zero is not None and zero.size > 1):  # per axis: only along the table's columns
        if moved:  # which axis the columns became is not followed
            return None
        rank = graph.rank(graph.nodes[gather].output[0])
        axis = int(node_attribute(graph.nodes[dequantize], "axis", 1))
        if not rank or axis % rank != rank - 1:
            return None
        return _dequantized(table, scale.reshape(-1), None if zero is None else zero.reshape(-1), 1)
    return _dequantized(table, scale, zero, 0)


def read_quantized(graph: ModelGraph, index: int, slot: int) -> Approx | None:
    """An integer operand of a quantized layer as the float number it stands for.

    Args:
        graph: the model.
        index: the node reading it (an integer layer, the ``QLinearAdd`` holding a bias, the
            ``Gather`` of a quantized table).
        slot: the input slot.

    Returns:
        The value in the stored layout, in float64, with half a quantization step as its
        error bound; None when it is not one of the forms this module reads.
    """
    key = _key(graph, index)
    if key in (("", "MatMulInteger"), ("", "ConvInteger")) and slot == 1:
        source = _runtime_weight(graph, _input(graph, index, 1))
        if source is not None:  # quantized at run time: the stored float weight is what it stands for
            return read_constant(graph, source) if _integer_scale(graph, index) is not None else None
    raw = _integer_constant(graph, _input(graph, index, slot))
    if raw is None or raw.ndim == 0:
        return None
    if key == ("", "QLinearConv") and slot == 3:
        return _dequantized(raw, _float_value(graph, _input(graph, index, 4)), _zero(graph, index, 5), 0)
    if key == ("", "QLinearMatMul") and slot == 3:
        return _dequantized(raw, _float_value(graph, _input(graph, index, 4)), _zero(graph, index, 5), -1)
    if key == (MICROSOFT, "QGemm") and slot == 3:
        axis = 0 if int(node_attribute(graph.nodes[index], "transB", 0)) else -1
        return _dequantized(raw, _float_value(graph, _input(graph, index, 4)), _zero(graph, index, 5), axis)
    if key in (("", "MatMulInteger"), ("", "ConvInteger")) and slot == 1:
        found = _integer_scale(graph, index)
        if found is None:
            return None
        axis = -1 if key[1] == "MatMulInteger" else 0
        return _dequantized(raw, found.scale.reshape(-1), _zero(graph, index, 3), axis)
    if key in (("", "QLinearConv"), (MICROSOFT, "QGemm")) and slot == (8 if key[1] == "QLinearConv" else 6):
        # An int32 bias, zero point 0, scale x_scale * w_scale (per output channel).
        x_scale = _float_value(graph, _input(graph, index, 1))
        w_scale = _float_value(graph, _input(graph, index, 4))
        if x_scale is None or w_scale is None or x_scale.size != 1:
            return None
        return _dequantized(raw.reshape(-1), x_scale.reshape(()) * w_scale.reshape(-1), None, 0)
    if key in ((MICROSOFT, "QLinearAdd"), (MICROSOFT, "QLinearMul")) and slot in (0, 3):
        return _dequantized(raw, _float_value(graph, _input(graph, index, slot + 1)), _zero(graph, index, slot + 2), -1)
    if key == ("", "Gather") and slot == 0 and raw.ndim == 2:
        return _dequantize_table(graph, index, raw)
    if key == (MICROSOFT, "DynamicQuantizeLSTM") and slot in (1, 2) and raw.ndim == 3:
        scale_slot = 8 if slot == 1 else 10
        return _dequantized_recurrent(raw, _float_value(graph, _input(graph, index, scale_slot)), _zero(graph, index, scale_slot + 1))
    return None


def _dequantized_recurrent(raw: np.ndarray, scale: np.ndarray | None, zero: np.ndarray | None) -> Approx | None:
    """A ``DynamicQuantizeLSTM``'s W or R ``[dirs, rows, 4*H]`` with its scale and zero point.

    Each is per tensor (one value, or one per direction: ``[dirs]``) or per gate column
    (``[dirs, 4*H]``), as ONNX Runtime's kernel reads them; any other layout is not read.
    """
    directions, _, columns = raw.shape

    def spread(parameter: np.ndarray) -> np.ndarray | None:
        if parameter.size == 1:
            return np.broadcast_to(parameter.reshape(()), raw.shape)
        if parameter.size == directions:
            return np.broadcast_to(parameter.reshape(directions, 1, 1), raw.shape)
        if parameter.size == directions * columns:
            return np.broadcast_to(parameter.reshape(directions, 1, columns), raw.shape)
        return None

    if scale is None:
        return None
    spread_scale = spread(scale)
    spread_zero = spread(zero) if zero is not None else np.zeros(raw.shape)
    if spread_scale is None or spread_zero is None:
        return None
    return Approx((raw.astype(np.float64) - spread_zero) * spread_scale, _HALF_STEP * np.abs(spread_scale))
