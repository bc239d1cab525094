"""Linear layers with a constant weight, as the fingerprints read them: the weight, its bias and a BatchNorm to fold.

A *unit* is a standard Conv, ConvTranspose, Gemm or MatMul whose weight is a float constant,
with the bias it adds (its own input or the constant operand of the Add right after it) and the
BatchNormalization folding would merge into it (through the Casts a float16 converter puts
around it). :mod:`onnxlady._provenance` reads layers this way; matching reads
:class:`~onnxlady._resync._sites.Site`, which covers the contrib forms too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._sites import activation_rounding

__all__ = ["UNIT_OPS", "LayerReader", "Unit", "find_units", "foldable", "is_channel_vector", "weight_slot"]

#: Operators that make a unit with their constant weight (and, for the first three, a following
#: BatchNormalization that folding would merge into them).
UNIT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


@dataclass(frozen=True)
class Unit:
    """A linear layer with a constant weight, its bias and the BatchNorm folding would absorb.

    ``out_axis`` is the axis of the weight, as the node reads it, that indexes output neurons.
    ``bias`` is the (node, input slot) of the bias as it is stored: the layer's own input, or
    the constant operand of an Add right after it. (The fingerprints of
    :mod:`onnxlady._provenance` read standard layers this way; matching uses
    :class:`~onnxlady._resync._sites.Site`, which covers the contrib forms too.)
    """

    node: int
    weight_slot: int
    out_axis: int
    bias: tuple[int, int] | None
    batchnorm: int | None


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
        rounded = activation_rounding(graph, index) if slot == 0 else None
        if rounded is not None:
            name = rounded
            continue
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


class LayerReader(Protocol):
    """What finding a unit asks of a graph.

    Answered by a :class:`ModelGraph` (:class:`_GraphReader`) or by the fingerprint's own protobuf
    reader (:mod:`onnxlady._provenance`), so both find the same layers.
    """

    def float_constant(self, name: str) -> bool: ...

    def constant_shape(self, name: str) -> tuple[int, ...] | None: ...

    def rank(self, name: str) -> int | None: ...


@dataclass(frozen=True)
class _GraphReader:
    """:class:`LayerReader` over a :class:`ModelGraph`."""

    graph: ModelGraph

    def float_constant(self, name: str) -> bool:
        return _float_constant(self.graph, name)

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        return self.graph.constant_shape(name)

    def rank(self, name: str) -> int | None:
        return self.graph.rank(name)


def find_units(graph: ModelGraph) -> dict[int, Unit]:
    """Every linear layer with a constant weight, with its bias and following BatchNorm."""
    units: dict[int, Unit] = {}
    layers = _GraphReader(graph)
    for index in graph.order:
        node = graph.nodes[index]
        if node.op_type not in UNIT_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        slot_axis = weight_slot(layers, node)
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
                if is_channel_vector(layers, add.input[other], node, slot, out_axis):
                    bias, tail = (reader[0], other), add.output[0]
        batchnorm = None
        if node.op_type in _FOLDABLE and foldable(layers, node):
            reader = _single_consumer(graph, tail, "BatchNormalization")
            bn = graph.nodes[reader[0]] if reader is not None and reader[1] == 0 else None
            if reader is not None and bn is not None and all(_float_constant(graph, n) for n in bn.input[1:5]):
                batchnorm = reader[0]
        units[index] = Unit(index, slot, out_axis, bias, batchnorm)
    return units


def weight_slot(reader: LayerReader, node: onnx.NodeProto) -> tuple[int, int] | None:
    """(input slot of a unit operator's constant weight, its output-neuron axis as read), or None."""
    float_constant, constant_shape = reader.float_constant, reader.constant_shape
    op = node.op_type
    if op == "Conv":
        return (1, 0) if float_constant(node.input[1]) else None
    if op == "ConvTranspose":
        return (1, 1) if float_constant(node.input[1]) else None
    if op == "Gemm":
        if not float_constant(node.input[1]) or float_constant(node.input[0]):
            return None
        return (1, 0 if int(node_attribute(node, "transB", 0)) else 1)
    if op == "MatMul":
        left, right = (float_constant(name) for name in node.input[:2])
        if left == right:
            return None
        shape = constant_shape(node.input[1 if right else 0])
        if shape is None or len(shape) < 2:
            return None
        return (1, len(shape) - 1) if right else (0, len(shape) - 2)
    return None


def foldable(reader: LayerReader, node: onnx.NodeProto) -> bool:
    """BatchNorm folds into this layer along the weight's output axis."""
    if node.op_type == "ConvTranspose":
        return int(node_attribute(node, "group", 1)) == 1
    if node.op_type == "Gemm":
        return reader.rank(node.output[0]) == 2
    return True


def is_channel_vector(reader: LayerReader, name: str, node: onnx.NodeProto, slot: int, out_axis: int) -> bool:
    """A constant added to the layer's output along its channel axis only: a bias.

    The output's rank is the weight's for convolutions (channels on axis 1, counted from the
    left) and unknown for MatMul (channels last, counted from the right), so neither needs
    shape inference.
    """
    weight = reader.constant_shape(node.input[slot])
    shape = reader.constant_shape(name) if reader.float_constant(name) else None
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
