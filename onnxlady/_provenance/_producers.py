"""The producer layers of a model and their weights in common form, read for a fingerprint.

Which layers count, and how their weights are read, is described in
:mod:`onnxlady._provenance._fingerprint` (section "Which layers"). Two readers give the same
layers and the same weights:

- :func:`producer_weights` on a :class:`~onnxlady._graph._model_graph.ModelGraph`: the units of
  :func:`onnxlady._resync._match.find_units`, whose constants are read through any chain the
  graph layer understands (Reshape, Squeeze, weight-only ``Mul``, blocked quantization...);
- :func:`model_producers`: the same walk on a :class:`WeightGraph`, which indexes only what the
  fingerprint reads (producers, consumers, constants through ``Identity``, ``Cast`` and per-tensor
  or per-axis ``DequantizeLinear``). Building a ModelGraph costs more than parsing a small model
  (every node's attributes, subgraphs, shapes); a registry build reads thousands of files, so
  :func:`model_producers` takes this path and falls back to the ModelGraph one whenever the
  model holds anything else (another constant chain, If/Loop/Scan bodies, nodes out of
  topological order). Both agree layer for layer and bit for bit (tests/test_provenance.py
  checks it on every fixture and conversion).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._functions import calls_local_functions, inlined_view
from onnxlady._graph._model_graph import CHAIN_OPS, ModelGraph, node_label
from onnxlady._io._tensors import read_array
from onnxlady._provenance._einsum import einsum_rows
from onnxlady._provenance._wire import PLAIN_TYPES
from onnxlady._resync._across import _batchnorm
from onnxlady._resync._match import UNIT_OPS, Unit, find_units
from onnxlady._resync._nchwc_forms import _SAME_CHANNELS, NCHWC, BlockedConv, _unblock, blocked_conv, read_blocked
from onnxlady._resync._units import foldable, is_channel_vector, weight_slot
from onnxlady._resync._values import read_constant

__all__ = ["ProducerWeight", "WeightGraph", "model_producers", "producer_weights"]

_MS_DOMAIN = "com.microsoft"
_STANDARD = ("", "ai.onnx")
#: Chain operators that move a constant's values without computing on them.
_SHAPE_CHAIN_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Expand"})
#: Operators whose output is a unit's BatchNorm input after a Cast or Identity (as find_units).
_TYPE_ONLY_OPS = frozenset({"Cast", "Identity"})
#: Units a following BatchNorm folds into (as find_units).
_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
_GRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
#: Standard operators with graph attributes (any other domain's node is checked attribute by attribute).
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
#: Operators :func:`_other_producer` reads (their domain is checked there).
_OTHER_PRODUCERS = frozenset(
    {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "Gemm", "MatMul", "FusedConv", "FusedGemm",
     "FusedMatMul", "MatMulNBits", "Conv", "NhwcConv", "Einsum"}
)  # fmt: skip


# -- the common form ------------------------------------------------------------------------
@dataclass(frozen=True)
class ProducerWeight:
    """One producer layer's weight in common form (see :mod:`onnxlady._provenance._fingerprint`).

    Attributes:
        node: index of the layer's node in the graph.
        name: the node's label (its name, or ``op_type#index``).
        op_type: the operator, ``domain::op`` for operators outside the standard domain.
        matrix: float32 2-D weight; its neurons run along ``neuron_axis``, their inputs along
            the other axis (a view of the stored weight where its layout allows: a MatMul's
            ``[K, N]`` weight is not transposed).
        neuron_axis: 0 or 1.
        kernel: spatial positions per input channel (1 for Gemm/MatMul).
        groups: the convolution's ``group`` attribute (1 otherwise).
        row_scale: per-neuron factor of a folded BatchNorm (``gamma / sqrt(var + eps)``),
            applied by the layer records without writing the product; None without one.
    """

    node: int
    name: str
    op_type: str
    matrix: np.ndarray
    neuron_axis: int
    kernel: int
    groups: int
    row_scale: np.ndarray | None = None

    #: Rows (neurons), their inputs and weight elements of ``matrix``: set once at construction
    #: (the layer arithmetic asks each a dozen times; a plain attribute costs the least to read).
    neurons: int = field(init=False, repr=False, compare=False)
    fan_in: int = field(init=False, repr=False, compare=False)
    size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = self.matrix.shape
        # Frozen: set through the instance dict (the matrix's shape never changes afterwards).
        self.__dict__.update(
            neurons=int(shape[self.neuron_axis]), fan_in=int(shape[1 - self.neuron_axis]), size=int(self.matrix.size)
        )

    def rows(self) -> np.ndarray:
        """The weight as a ``(neurons, fan_in)`` float32 matrix, BatchNorm scale applied."""
        rows = self.matrix if self.neuron_axis == 0 else self.matrix.T
        if self.row_scale is not None:
            rows = rows * self.row_scale.astype(np.float32)[:, None]
        return np.ascontiguousarray(rows, dtype=np.float32)


class ConstantSource(Protocol):
    """What the weight readers need of a graph: its nodes, who produces a tensor, constants."""

    nodes: list[onnx.NodeProto]
    producer: dict[str, tuple[int, int]]

    def constant_value(self, name: str) -> np.ndarray | None: ...


def _conv_rows(weight: np.ndarray) -> tuple[np.ndarray, int]:
    """Conv weight ``(out, in/g, *k)``: a row per output channel."""
    kernel = math.prod(weight.shape[2:]) if weight.ndim > 2 else 1
    return weight.reshape(weight.shape[0], -1), kernel


def _conv_transpose_rows(weight: np.ndarray, groups: int) -> tuple[np.ndarray, int]:
    """ConvTranspose weight ``(in, out/g, *k)`` as rows over output channels.

    Output channel ``g * out/g + j`` reads the inputs of group ``g`` only.
    """
    cin, per_group = weight.shape[:2]
    kernel = math.prod(weight.shape[2:]) if weight.ndim > 2 else 1
    grouped = weight.reshape(groups, cin // groups, per_group, kernel)
    return np.moveaxis(grouped, 2, 1).reshape(groups * per_group, -1), kernel


def _axis_matrix(weight: np.ndarray, out_axis: int) -> tuple[np.ndarray, int]:
    """A Gemm/MatMul weight as (2-D matrix, neuron axis).

    A 2-D weight as it is, a batched one with its output axis first and the rest flattened.
    """
    out_axis %= weight.ndim
    if weight.ndim == 2:
        return weight, out_axis
    return np.moveaxis(weight, out_axis, 0).reshape(weight.shape[out_axis], -1), 0


def _along(vector: np.ndarray, axis: int, rank: int) -> np.ndarray:
    view = [1] * rank
    view[axis % rank] = -1
    return vector.reshape(view)


def _is_float(value: np.ndarray) -> bool:
    kind = value.dtype.kind
    # ``dtype.name`` is computed in Python on every read: asked only of what might be bfloat16.
    return kind == "f" or (kind == "V" and value.dtype.name == "bfloat16")


def _float_value(graph: ConstantSource, name: str) -> np.ndarray | None:
    """A constant operand as float32 (through its chain: Cast, DequantizeLinear...), or None."""
    if not name:
        return None
    value = graph.constant_value(name)
    if value is None:
        return _transposed_constant(graph, name)
    if not _is_float(value):
        return None  # integers are indices or shapes here; quantized weights are read elsewhere
    return np.asarray(value, dtype=np.float32)


def _transposed_constant(graph: ConstantSource, name: str) -> np.ndarray | None:
    """``Transpose(constant)``, read as the constant's transposed value.

    A tied head reads the embedding table this way; an optimizer folds it into a stored copy, so
    both forms must give the same weight.
    """
    produced = graph.producer.get(name)
    if produced is None:
        return None
    node = graph.nodes[produced[0]]
    if node.op_type != "Transpose" or node.domain not in _STANDARD:
        return None
    value = graph.constant_value(node.input[0])
    if value is None or not _is_float(value):
        return None
    perm = node_attribute(node, "perm", None)
    return np.transpose(np.asarray(value, dtype=np.float32), perm)


def _quantized(graph: ConstantSource, node: onnx.NodeProto, slot: int, scale_slot: int | None, zero_slot: int,
               out_axis: int) -> np.ndarray | None:  # fmt: skip
    """An integer weight minus its zero point, times its scale.

    The scale is per tensor or per output channel, as QLinearConv/QLinearMatMul/ConvInteger/
    MatMulInteger read it.
    """
    name = node.input[slot] if len(node.input) > slot else ""
    raw = graph.constant_value(name) if name else None
    if raw is None and scale_slot is None:
        return _runtime_weight(graph, name)
    if raw is None or raw.dtype.kind not in "iu":
        return None
    weight = raw.astype(np.float32)
    rank = weight.ndim
    zero_name = node.input[zero_slot] if len(node.input) > zero_slot else ""
    zero = graph.constant_value(zero_name) if zero_name else None
    if zero is not None:
        zero32 = zero.astype(np.float32)
        weight -= zero32.reshape(()) if zero32.size == 1 else _along(zero32, out_axis, rank)
    if scale_slot is not None:
        scale = graph.constant_value(node.input[scale_slot])
        if scale is None:
            return None
        scale32 = np.asarray(scale, dtype=np.float32)
        weight *= scale32.reshape(()) if scale32.size == 1 else _along(scale32, out_axis, rank)
    return weight


def _runtime_weight(graph: ConstantSource, name: str) -> np.ndarray | None:
    """The float constant an integer layer's weight is quantized from at run time, or None.

    Where a model holds its weights in ``Constant`` nodes (Paddle's exporter), ONNX Runtime's
    ``quantize_dynamic`` leaves them float and quantizes each at run time like an activation:
    ``ConvInteger``/``MatMulInteger`` read output 0 of a ``DynamicQuantizeLinear`` of the float
    weight, whose scale (output 1) enters the scale ``Mul`` after the layer with the input's. The
    layer computes with that float weight rounded to 8 bits (uint8, per tensor), so the float
    constant is its weight, scale included (as :mod:`onnxlady._resync._quantized_forms` reads it).
    """
    produced = graph.producer.get(name) if name else None
    if produced is None or produced[1] != 0:
        return None
    quantizer = graph.nodes[produced[0]]
    if quantizer.op_type != "DynamicQuantizeLinear" or quantizer.domain not in _STANDARD:
        return None
    value = graph.constant_value(quantizer.input[0])
    return None if value is None or not _is_float(value) else np.asarray(value, dtype=np.float32)


#: Integer layers whose scale (and BatchNorm) ONNX Runtime's dynamic form applies after them.
_DYNAMIC_INTEGER = frozenset({"ConvInteger", "MatMulInteger"})


def _consumer(graph: ConstantSource, name: str, op_type: str) -> int | None:
    """The first node of ``op_type`` reading ``name`` (a scan: only the rare dynamic int8 form asks)."""
    return next((i for i, n in enumerate(graph.nodes) if n.op_type == op_type and name in n.input), None)


def _dynamic_scale_mul(graph: ConstantSource, index: int) -> int | None:
    """The ``Mul`` that applies an integer layer's scales in ONNX Runtime's dynamic form, if it is that form.

    ``quantize_dynamic`` writes ``ConvInteger``/``MatMulInteger -> Cast -> Mul(., a_scale * w_scale)``.
    """
    cast = _consumer(graph, graph.nodes[index].output[0], "Cast")
    return None if cast is None else _consumer(graph, graph.nodes[cast].output[0], "Mul")


def _times_output_scale(graph: ConstantSource, index: int, weight: np.ndarray, out_axis: int) -> np.ndarray:
    """An integer layer's weight times its own scale, read where ONNX Runtime's dynamic form applies it.

    The weight's scale (per tensor or per output channel) is a constant factor of the Mul that
    makes the second operand of :func:`_dynamic_scale_mul`'s Mul. Without it, a layer's
    ``level`` is off by ``log w_scale`` and an int8 copy reads as another model. The weight is
    returned as it is where the form differs.
    """
    mul = _dynamic_scale_mul(graph, index)
    if mul is None:
        return weight
    node = graph.nodes[mul]
    produced = [graph.producer.get(name) for name in node.input[:2]]
    for found in produced:
        scales = graph.nodes[found[0]] if found is not None else None
        if scales is None or scales.op_type != "Mul":
            continue
        for name in scales.input[:2]:
            value = graph.constant_value(name)
            if value is None or not _is_float(value):
                continue
            factor = np.asarray(value, dtype=np.float32)
            if factor.size == 1:
                return weight * factor.reshape(())
            if factor.size == weight.shape[out_axis]:
                return weight * _along(factor.reshape(-1), out_axis, weight.ndim)
    return weight


def _batchnorm_after_dynamic(graph: ConstantSource, index: int) -> int | None:
    """A BatchNormalization right after an integer layer's dynamic form (its bias Add between), if any."""
    mul = _dynamic_scale_mul(graph, index)
    if mul is None:
        return None
    tail = graph.nodes[mul].output[0]
    add = _consumer(graph, tail, "Add")
    if add is not None and any(graph.constant_value(name) is not None for name in graph.nodes[add].input[:2]):
        tail = graph.nodes[add].output[0]
    return _consumer(graph, tail, "BatchNormalization")


def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Little-endian bit fields of ``bits`` bits from uint8 bytes, the first ``count`` of each row.

    MatMulNBits packs its weights and zero points this way.
    """
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    fields = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return fields.reshape(*packed.shape[:-1], -1)[..., :count]


def _matmul_nbits(graph: ConstantSource, node: onnx.NodeProto) -> np.ndarray | None:
    """com.microsoft MatMulNBits, dequantized as rows ``(N, K)``.

    ``B`` is uint8 ``[N, blocks, block_size * bits / 8]``, scales ``[N * blocks]``, optional zero
    points (packed uint8, or in the scales' type; default ``2^(bits-1)``). Returns the dequantized
    weight as rows ``(N, K)``.
    """
    k, n = int(node_attribute(node, "K", 0)), int(node_attribute(node, "N", 0))
    bits, block = int(node_attribute(node, "bits", 4)), int(node_attribute(node, "block_size", 0))
    packed = graph.constant_value(node.input[1]) if len(node.input) > 1 else None
    scales = graph.constant_value(node.input[2]) if len(node.input) > 2 else None
    if packed is None or scales is None or bits not in (2, 4, 8) or k <= 0 or n <= 0 or block <= 0:
        return None
    blocks = -(-k // block)
    packed = np.asarray(packed, dtype=np.uint8).reshape(n, blocks, -1)
    quantized = _unpack_bits(packed, bits, block).astype(np.float32)  # (n, blocks, block)
    zero_name = node.input[3] if len(node.input) > 3 else ""
    zero_value = graph.constant_value(zero_name) if zero_name else None
    if zero_value is None:
        zero = np.full((n, blocks), float(1 << (bits - 1)), dtype=np.float32)
    elif zero_value.dtype == np.uint8:
        zero = _unpack_bits(zero_value.reshape(n, -1), bits, blocks).astype(np.float32)
    else:
        zero = np.asarray(zero_value, dtype=np.float32).reshape(n, blocks)
    scale = np.asarray(scales, dtype=np.float32).reshape(n, blocks)
    weight = (quantized - zero[..., None]) * scale[..., None]
    return weight.reshape(n, blocks * block)[:, :k]


def _plain_matrix(
    graph: ConstantSource, node: onnx.NodeProto, transpose_a: int, transpose_b: int
) -> tuple[np.ndarray, int] | None:
    """A Gemm-like ``A @ B`` with exactly one constant operand.

    Its output neurons are B's columns (rows when ``transB``) or A's rows (columns when
    ``transA``).
    """
    if len(node.input) < 2:
        return None
    left, right = (_float_value(graph, name) for name in node.input[:2])
    if (left is None) == (right is None):
        return None
    if right is not None and right.ndim >= 2:
        return _axis_matrix(right, -2 if transpose_b else -1)
    if left is not None and left.ndim >= 2:
        return _axis_matrix(left, -1 if transpose_a else -2)
    return None


def _other_producer(graph: ConstantSource, index: int) -> tuple[np.ndarray, int, int, int] | None:
    """(matrix, neuron axis, kernel, groups) of a producer that is not a unit of find_units."""
    node = graph.nodes[index]
    domain, op = node.domain or "", node.op_type
    groups = int(node_attribute(node, "group", 1))
    weight: np.ndarray | None
    if domain in _STANDARD:
        if op in ("QLinearConv", "ConvInteger"):
            weight = (
                _quantized(graph, node, 3, 4, 5, 0) if op == "QLinearConv" else _quantized(graph, node, 1, None, 3, 0)
            )
            if weight is None:
                return None
            if op == "ConvInteger":
                weight = _times_output_scale(graph, index, weight, 0)
            matrix, kernel = _conv_rows(weight)
            return matrix, 0, kernel, groups
        if op in ("QLinearMatMul", "MatMulInteger"):
            weight = (
                _quantized(graph, node, 3, 4, 5, -1)
                if op == "QLinearMatMul"
                else _quantized(graph, node, 1, None, 3, -1)
            )
            if weight is not None and op == "MatMulInteger":
                weight = _times_output_scale(graph, index, weight, -1)
            return None if weight is None or weight.ndim < 2 else (*_axis_matrix(weight, -1), 1, 1)
        if op in ("Gemm", "MatMul"):  # a weight find_units does not see: Transpose(constant)
            found = _plain_matrix(graph, node, 0, int(node_attribute(node, "transB", 0)))
            return None if found is None else (*found, 1, 1)
        if op == "Einsum":  # the letters the Einsum rule reads as neurons and inputs (_einsum.py)
            rows = einsum_rows(node, [_float_value(graph, name) if name else None for name in node.input])
            return None if rows is None else (rows, 0, 1, 1)
        return None
    if domain == NCHWC and op == "Conv":  # ORT_ENABLE_ALL's blocked layout: read as the Conv it stands for
        if not isinstance(graph, ModelGraph):
            raise FullGraphNeeded("an NCHWc convolution (its layout is read off the whole graph)")
        blocked, conv = read_blocked(graph, index, 1), blocked_conv(graph, index)
        if blocked is None or conv is None:
            return None
        value = blocked.value
        counts = _nchwc_channels(graph).get(index)
        stored = read_constant(graph, node.input[1]) if counts is not None else None
        if counts is not None and stored is not None:  # channels the layout took for padding are true ones
            value = _unblock(stored.value, conv.form, conv.block)[: counts[0], : counts[1]]
        matrix, kernel = _conv_rows(np.asarray(value, dtype=np.float32))
        return matrix, 0, kernel, conv.group
    if domain != _MS_DOMAIN:
        return None
    if op == "FusedConv":
        weight = _float_value(graph, node.input[1]) if len(node.input) > 1 else None
        if weight is None or weight.ndim < 3:
            return None
        matrix, kernel = _conv_rows(weight)
        return matrix, 0, kernel, groups
    if op == "NhwcConv":
        return _nhwc_conv(graph, node, groups)
    if op in ("FusedGemm", "FusedMatMul"):
        found = _plain_matrix(
            graph, node, int(node_attribute(node, "transA", 0)), int(node_attribute(node, "transB", 0))
        )
        return None if found is None else (*found, 1, 1)
    if op == "MatMulNBits":
        weight = _matmul_nbits(graph, node)
        return None if weight is None else (weight, 0, 1, 1)
    return None


def _nhwc_conv(graph: ConstantSource, node: onnx.NodeProto, groups: int) -> tuple[np.ndarray, int, int, int] | None:
    """ORT's channels-last ``NhwcConv``: its weight is stored ``(out, *k, in/g)``.

    A neuron's row is the same values as the Conv's ``(in/g, *k)`` row in another order, which
    no field depends on (per-neuron statistics are symmetric, per-input ones sorted); only the
    kernel size is read off the middle axes. The layout is taken from ``kernel_shape``: a weight
    whose middle axes are not the kernel is not read (no guess).
    """
    weight = _float_value(graph, node.input[1]) if len(node.input) > 1 else None
    kernel_shape = node_attribute(node, "kernel_shape", None)
    if weight is None or weight.ndim < 3 or kernel_shape is None:
        return None
    if tuple(weight.shape[1:-1]) != tuple(int(k) for k in kernel_shape):
        return None
    return weight.reshape(weight.shape[0], -1), 0, math.prod(weight.shape[1:-1]), groups


_NCHWC_CHANNELS: weakref.WeakKeyDictionary[ModelGraph, dict[int, tuple[int, int]]] = weakref.WeakKeyDictionary()


def _nchwc_channels(graph: ModelGraph) -> dict[int, tuple[int, int]]:
    """(outputs, inputs) of the NCHWc convolutions whose true channel counts the layout reads short.

    Where the graph does not tell a blocked tensor's channel count, the layout takes trailing
    all-zero output channels for padding. A layer can hold true zero channels: timm's ResNet
    initialises each block's last BatchNorm to zero, and folded into the convolution its rows
    are zeros, so layer1.0.conv2 (64 channels) read as 49, and the convolution after it as
    reading 49 inputs. Padding is zero in every layer reading it too: a channel that a
    following convolution weighs with a non-zero column is a true one. Only the convolutions
    whose counts change this way are listed (the others read as the layout reads them).
    """
    found = _NCHWC_CHANNELS.get(graph)
    if found is not None:
        return found
    convs = {index: conv for index in graph.order if (conv := blocked_conv(graph, index)) is not None}
    outputs = {index: conv.shape[0] for index, conv in convs.items()}
    for index, conv in convs.items():
        if conv.shape[0] < conv.stored[0]:
            used = _channels_read(graph, graph.nodes[index].output[0], convs)
            outputs[index] = max(outputs[index], min(used, conv.stored[0]))
    found = {}
    for index, conv in convs.items():
        inputs = conv.shape[1]
        if conv.form == "OIHWBiBo" and conv.group == 1:
            source = _blocked_source(graph, graph.nodes[index].input[0], convs)
            if source is not None and outputs[source] > convs[source].shape[0]:
                inputs = max(inputs, min(outputs[source], conv.stored[1]))
        if (outputs[index], inputs) != conv.shape[:2]:
            found[index] = (outputs[index], inputs)
    _NCHWC_CHANNELS[graph] = found
    return found


def _channels_read(graph: ModelGraph, name: str, convs: dict[int, BlockedConv]) -> int:
    """One past the last channel of blocked tensor ``name`` that a following convolution weighs.

    Followed through operators that keep channels and through the residual a convolution adds
    (its output holds the same channels); 0 where no ungrouped blocked convolution reads it.
    """
    used, stack, seen = 0, [name], {name}
    while stack:
        for index, slot in graph.consumers.get(stack.pop(), []):
            if index < 0:
                continue
            node = graph.nodes[index]
            conv = convs.get(index)
            follow = (slot == 3 and conv is not None) or (
                conv is None and (node.domain == NCHWC or node.op_type in _SAME_CHANNELS)
            )
            if follow:
                for out in node.output[:1]:
                    if out and out not in seen:
                        seen.add(out)
                        stack.append(out)
            elif conv is not None and slot == 0 and conv.form == "OIHWBiBo" and conv.group == 1:
                read = read_constant(graph, node.input[1])
                if read is None or read.value.shape != conv.stored:
                    continue
                weighed = np.flatnonzero(np.any(_unblock(read.value, conv.form, conv.block) != 0, axis=(0, 2, 3)))
                if weighed.size:
                    used = max(used, int(weighed[-1]) + 1)
    return used


def _blocked_source(graph: ModelGraph, name: str, convs: dict[int, BlockedConv]) -> int | None:
    """The NCHWc convolution whose output ``name`` is, through operators that keep channels."""
    while True:
        produced = graph.producer.get(name)
        if produced is None:
            return None
        index = produced[0]
        if index in convs:
            return index
        node = graph.nodes[index]
        if not node.input or not ((node.domain == NCHWC and node.op_type != "Conv") or node.op_type in _SAME_CHANNELS):
            return None
        name = node.input[0]


def _collect(
    graph: ConstantSource,
    order: list[int],
    op_types: list[str],
    units: dict[int, Unit],
    batchnorm_scale: Callable[[int], np.ndarray | None],
) -> list[ProducerWeight]:
    """The producer weights of ``graph`` in ``order``.

    Units (with their BatchNorm's scale) and the other producers (see the fingerprint's module
    docstring).
    """
    found: list[ProducerWeight] = []
    for index in order:
        unit = units.get(index)
        if unit is None and op_types[index] not in _OTHER_PRODUCERS:
            continue
        node = graph.nodes[index]
        row_scale = None
        if unit is not None:
            weight = _float_value(graph, node.input[unit.weight_slot])
            if weight is None:
                continue
            op = op_types[index]
            # Only a convolution has groups (reading an attribute costs more than the test).
            groups = int(node_attribute(node, "group", 1)) if op in ("Conv", "ConvTranspose") else 1
            if op == "Conv":
                matrix, kernel = _conv_rows(weight)
                axis = 0
            elif op == "ConvTranspose":
                (matrix, kernel), axis = _conv_transpose_rows(weight, groups), 0
            else:
                (matrix, axis), kernel, groups = _axis_matrix(weight, unit.out_axis), 1, 1
            if unit.batchnorm is not None:
                scale = batchnorm_scale(unit.batchnorm)
                if scale is not None and scale.size == matrix.shape[axis]:
                    row_scale = np.asarray(scale, dtype=np.float64).ravel()
        else:
            other = _other_producer(graph, index)
            if other is None:
                continue
            matrix, axis, kernel, groups = other
            batchnorm = _batchnorm_after_dynamic(graph, index) if op_types[index] in _DYNAMIC_INTEGER else None
            scale = batchnorm_scale(batchnorm) if batchnorm is not None else None
            if scale is not None and scale.size == matrix.shape[axis]:
                row_scale = np.asarray(scale, dtype=np.float64).ravel()
        # A weight holding NaN or infinity is left out by the fingerprint's arithmetic, which
        # sees it in its own pass (a check here would read every weight once more).
        if matrix.size == 0:
            continue
        op = node.op_type if (node.domain or "") in _STANDARD else f"{node.domain}::{node.op_type}"
        found.append(ProducerWeight(index, node_label(node, index), op, matrix, axis, kernel, groups, row_scale))
    return found


def producer_weights(graph: ModelGraph) -> list[ProducerWeight]:
    """Every producer layer of ``graph`` with its weight in common form, in topological order.

    Args:
        graph: the model's graph (shape inference is not needed).

    Returns:
        One :class:`ProducerWeight` per layer whose weight could be read (see
        :mod:`onnxlady._provenance._fingerprint` for the operators read and the common form).
    """

    def scale(index: int) -> np.ndarray | None:
        batchnorm = _batchnorm(graph, index)
        return None if batchnorm is None else np.asarray(batchnorm.scale.value)

    order = _pulled_order(graph)
    return _collect(graph, order, [node.op_type for node in graph.nodes], find_units(graph), scale)


def _pulled_order(graph: ModelGraph) -> list[int]:
    """:func:`pulled_order` of a ModelGraph's main nodes (a subgraph's reads count as its node's)."""
    count = graph.main_count
    return pulled_order(
        [graph.input_names(index) + graph.implicit_inputs.get(index, ()) for index in range(count)],
        [graph.output_names(index) for index in range(count)],
        graph.graph_outputs,
    )


def pulled_order(
    inputs: Sequence[Sequence[str]], outputs: Sequence[Sequence[str]], graph_outputs: Sequence[str]
) -> list[int]:
    """A topological order of nodes that depends on the graph, not on how its node list is sorted.

    Each graph output in turn (then each node in list order, for nodes no output reads) pulls in
    the nodes it reads from, depth first, inputs in slot order: a node comes right after the
    last node it needs. Two lists of the same graph give the same order, whichever valid order
    the writer chose. Exporters list independent branches one after the other (CLIP's vision
    tower, then its text tower); ONNX Runtime's quantizer re-sorts the list breadth first,
    interleaving them, and its float16 converter appends the ``Cast`` of an input at the end
    of the list. Read in list order, both moved CLIP's layers by up to 11 positions against the
    reference's, beyond the alignment window (held-out round 14: the dynamic-int8 copy 0.57 from
    clip.onnx, four layers each side unpaired; 0.024 in this order).

    Args:
        inputs: per node, the names it reads (in slot order; '' for an absent input).
        outputs: per node, the names it writes.
        graph_outputs: the graph's outputs, in order.

    Returns:
        Every node index once.
    """
    count = len(inputs)
    # The last writer of each name (one comprehension, no branch per name).
    writer = {name: index for index, names in enumerate(outputs) for name in names}
    writer.pop("", None)
    # Names written more than once (a malformed model): every writer, in list order. Rare: the
    # walk reads one writer per name and looks here only when this holds any; it is built only
    # when the outputs hold more names than ``writer`` (a name given twice, or an empty one).
    several: dict[str, list[int]] = {}
    if sum(map(len, outputs)) != len(writer):
        seen: dict[str, int] = {}
        for index in range(count):
            for name in outputs[index]:
                if name:
                    if name in seen:
                        several.setdefault(name, [seen[name]]).append(index)
                    seen[name] = index
    roots = [w for name in graph_outputs for w in several.get(name, [writer[name]] if name in writer else [])]
    order: list[int] = []
    # 0: not reached; 1: entered or placed (a node entered already is not pulled again: a name
    # written twice can close a loop, and the walk still ends).
    state = bytearray(count)
    get = writer.get
    append = order.append
    for root in itertools.chain(roots, range(count)):
        if state[root]:
            continue
        # Iterative depth-first walk (a deep chain would pass Python's recursion limit): a node
        # is placed (its complement popped) once every writer of what it reads is.
        stack = [root]
        push, pop = stack.append, stack.pop
        while stack:
            index = pop()
            if index < 0:
                append(~index)
                continue
            if state[index]:
                continue
            state[index] = 1
            push(~index)
            if several:
                for name in reversed(inputs[index]):
                    if name in several:
                        stack.extend(w for w in reversed(several[name]) if not state[w])
                        continue
                    w = get(name)
                    if w is not None and not state[w]:
                        push(w)
            else:
                for name in reversed(inputs[index]):
                    w = get(name)
                    if w is not None and not state[w]:
                        push(w)
    return order


# -- the fast walk ----------------------------------------------------------------------------
class FullGraphNeeded(Exception):  # ruff: ignore[error-suffix-on-exception-name] - a signal to fall back to ModelGraph, not an error
    """The model holds a form only :class:`ModelGraph` reads the same way (message: which)."""


class WeightGraph:
    """What a fingerprint reads of a model's main graph, indexed in one pass over its nodes.

    Producers and consumers of every tensor; constants read lazily (only those a producer,
    bias or BatchNorm asks for) from initializers and ``Constant`` nodes, through ``Identity``,
    ``Cast`` and per-tensor or per-axis ``DequantizeLinear`` computed exactly as
    :class:`ModelGraph` computes them. The answers are those of a ``ModelGraph`` built without
    shape inference; where they might not be (any other chain of constants, a subgraph, a node
    reading a tensor defined after it), :class:`FullGraphNeeded` is raised.

    Raises:
        FullGraphNeeded: from the constructor or any method, see above.
    """

    def __init__(self, model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None) -> None:
        graph = model.graph
        self.graph = graph
        #: Initializer values read already (:func:`onnxlady._provenance._wire.read_weights`'
        #: views of the file): used instead of the initializer's own bytes, which are not there.
        self.arrays: dict[str, np.ndarray] = arrays or {}
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        nodes = self.nodes
        self.initializers: dict[str, onnx.TensorProto] = {tensor.name: tensor for tensor in graph.initializer}
        declared_outputs = [value.name for value in graph.output]
        self.graph_outputs: set[str] = set(declared_outputs)
        #: Each node's operator and domain (read once: a protobuf field costs more than a list item).
        self.op_types: list[str] = [node.op_type for node in nodes]
        self.domains: list[str] = [node.domain for node in nodes]
        # Each node's input and output names as Python lists (each protobuf name read once), and
        # every name in one flat list each with the node owning each position, built by C-level
        # constructors, not a Python loop per name (on a graph of a thousand nodes the loop cost
        # more than parsing the file).
        inputs = [node.input[:] for node in nodes]  # a slice: a list, faster than list()
        outputs = [node.output[:] for node in nodes]
        self._inputs: list[list[str]] = inputs
        self._outputs: list[list[str]] = outputs
        names = list(itertools.chain.from_iterable(inputs))
        sizes = list(map(len, inputs))
        self._reader_of: list[int] = list(itertools.chain.from_iterable(map(itertools.repeat, range(len(nodes)), sizes)))
        self._input_start: list[int] = list(itertools.accumulate(sizes, initial=0))
        #: Readers per tensor name, and the position (in the flat input list) of its first reader.
        self._readers: Counter[str] = Counter(names)
        self._first_read: dict[str, int] = dict(zip(reversed(names), range(len(names) - 1, -1, -1)))
        # The last node writing a name is its producer (as a ModelGraph reads it).
        self.producer: dict[str, tuple[int, int]] = {
            name: (index, slot) for index, made in enumerate(outputs) for slot, name in enumerate(made)
        }
        writes_empty = "" in self.producer
        for table in (self._readers, self._first_read, self.producer):
            table.pop("", None)  # an omitted optional input or output
        given = set(self.initializers)
        given.update(value.name for value in graph.input)
        # Topological order: each tensor read is given, or written by a node before its reader
        # (an omitted input, '', is no read).
        defined = given | {""}
        for index, read in enumerate(inputs):
            if not defined.issuperset(read):
                name = next(name for name in read if name not in defined)
                raise FullGraphNeeded(f"node {index} reads '{name}' before it is defined")
            defined.update(outputs[index])
        for index in [i for i, (op, domain) in enumerate(zip(self.op_types, self.domains))
                      if op in _SUBGRAPH_OPS or domain not in _STANDARD]:  # fmt: skip
            for attribute in nodes[index].attribute:
                if attribute.type in _GRAPH_ATTRIBUTES:
                    raise FullGraphNeeded(f"node {index} holds a subgraph")
        # Every graph output given or made ('' only where a name '' is).
        if not self.graph_outputs <= defined or ("" in self.graph_outputs and not writes_empty and "" not in given):
            raise FullGraphNeeded("a graph output is not produced")
        #: The order the layers come in (:func:`pulled_order`).
        self.order = pulled_order(inputs, outputs, declared_outputs)
        self._values: dict[str, np.ndarray | None] = {}
        self._declared: dict[str, tuple[int | str | None, ...]] | None = None
        self._infos: dict[str, list[onnx.ValueInfoProto]] | None = None
        self._headers: dict[str, tuple[str, tuple[int, ...]] | None] = {}

    # -- constants ---------------------------------------------------------------------------
    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor as its user reads it, or None when it is not constant."""
        if name not in self._values:
            self._values[name] = self._resolve(name) if name else None
        return self._values[name]

    def _resolve(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        if tensor is not None:
            array = self.arrays.get(name)
            return array if array is not None else _initializer_array(tensor, name)
        produced = self.producer.get(name)
        if produced is None:
            return None
        node = self.nodes[produced[0]]
        if node.domain not in _STANDARD:
            return None
        op = node.op_type
        if op == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return _initializer_array(attribute.t, name)
                if attribute.name in ("value_float", "value_int", "value_floats", "value_ints"):
                    raise FullGraphNeeded(f"Constant '{name}' holds a {attribute.name}")
            return None
        if op not in CHAIN_OPS:
            return None
        values: list[np.ndarray] = []
        for source in self._inputs[produced[0]]:
            if source:
                operand = self.constant_value(source)
                if operand is None:
                    # A chain with any input computed at run time is no constant: its other
                    # inputs are not read (a MatMul's activation operand, a Reshape of one,
                    # would otherwise have every constant up its chain read for nothing).
                    return None
                values.append(operand)
        if not values:
            return None
        value = values[0]
        if op == "Identity":
            return value
        if op == "Cast":
            try:
                return value.astype(onnx.helper.tensor_dtype_to_np_dtype(node_attribute(node, "to")))
            except (KeyError, TypeError, ValueError) as exc:
                raise FullGraphNeeded(f"Cast '{name}': {exc}") from exc
        if op == "DequantizeLinear":
            return self._dequantized(node, name)
        if op == "Mul":
            return self._product(node)
        if op in _SHAPE_CHAIN_OPS:
            return self._reshaped(node, value)
        raise FullGraphNeeded(f"'{name}' is a {op} of constants")

    def _product(self, node: onnx.NodeProto) -> np.ndarray | None:
        """``Mul`` of two constants: the operand of the output's full shape times the other.

        A weight times its scale; None (no constant) when neither operand has the full shape.
        """
        if len(node.input) != 2 or not all(node.input):
            return None
        first, second = (self.constant_value(name) for name in node.input)
        if first is None or second is None:
            return None
        operands = (first, second)
        shapes = [self._declared_shape(name, operand) for name, operand in zip(node.input, operands)]
        try:
            out = tuple(np.broadcast_shapes(*shapes))
        except ValueError:
            return None
        for slot, shape in enumerate(shapes):
            if shape == out:
                return np.multiply(operands[slot], operands[1 - slot])  # IEEE products commute
        return None

    def _declared_shape(self, name: str, value: np.ndarray | None) -> tuple[int, ...]:
        """A constant's shape as ModelGraph sees it: a fully known declared shape, else its value's."""
        produced = self.producer.get(name)
        stored = name in self.initializers or (produced is not None and self.nodes[produced[0]].op_type == "Constant")
        declared = None if stored else self.declared_shapes().get(name)
        if declared is not None and all(isinstance(d, int) for d in declared):
            return tuple(int(d) for d in declared)  # type: ignore[arg-type]
        assert value is not None
        return tuple(int(d) for d in value.shape)

    def _reshaped(self, node: onnx.NodeProto, value: np.ndarray) -> np.ndarray | None:
        """Flatten, Reshape, Squeeze, Unsqueeze, Expand of a constant (as ModelGraph computes them)."""
        op = node.op_type
        if op == "Flatten":
            axis = int(node_attribute(node, "axis", 1))
            axis = axis + value.ndim if axis < 0 else axis
            return value.reshape(int(np.prod(value.shape[:axis])), -1)
        axes_value = node_attribute(node, "axes", None)
        if axes_value is None and len(node.input) > 1 and node.input[1]:
            axes_value = self.constant_value(node.input[1])
        if op == "Expand":
            if axes_value is None:
                return None
            target = tuple(int(d) for d in np.asarray(axes_value).reshape(-1))
            return np.broadcast_to(value, np.broadcast_shapes(value.shape, target)).copy()
        if op == "Reshape":
            if axes_value is None:
                return None
            shape = [int(d) for d in np.asarray(axes_value).reshape(-1)]
            if not int(node_attribute(node, "allowzero", 0)):
                shape = [value.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            return value.reshape(shape)
        if op == "Squeeze":
            if axes_value is None:
                return np.squeeze(value)
            return np.squeeze(value, axis=tuple(int(a) for a in np.asarray(axes_value).reshape(-1)))
        if axes_value is None:  # Unsqueeze
            return None
        out_rank = value.ndim + np.asarray(axes_value).size
        for axis in sorted(int(a) % out_rank for a in np.asarray(axes_value).reshape(-1)):
            value = np.expand_dims(value, axis)
        return value

    def _dequantized(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        """``(x - zero_point) * scale`` per tensor or per axis, computed as ModelGraph does."""
        value = self.constant_value(node.input[0])
        scale = self.constant_value(node.input[1]) if len(node.input) > 1 else None
        zero = self.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if (
            value is None
            or scale is None
            or value.dtype.kind not in "iub"
            or int(node_attribute(node, "block_size", 0))
        ):
            raise FullGraphNeeded(f"DequantizeLinear '{name}' of blocks or float8")
        axis = int(node_attribute(node, "axis", 1)) % max(value.ndim, 1)

        def spread(parameter: np.ndarray) -> np.ndarray:
            if parameter.size == 1 and parameter.ndim <= 1:
                return parameter.reshape(())
            shape = [1] * value.ndim
            shape[axis] = -1
            return parameter.reshape(shape)

        shifted = value.astype(np.int64) - (0 if zero is None else spread(zero).astype(np.int64))
        return (shifted.astype(np.float32) * spread(scale).astype(np.float32)).astype(scale.dtype)

    def float_constant(self, name: str) -> bool:
        """A constant whose values are real numbers (find_units' ``_float_constant``)."""
        stored = self._stored(name)
        if stored is not None:
            return stored[0] == "f"
        value = self.constant_value(name) if name else None
        return value is not None and value.dtype.kind == "f"

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of a constant (the chains read here keep shapes)."""
        stored = self._stored(name)
        if stored is not None:
            return stored[1]
        value = self.constant_value(name) if name else None
        return None if value is None else tuple(int(d) for d in value.shape)

    def _stored(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        """The numpy kind and shape of a plain-typed initializer, from its header (None otherwise).

        Type and shape questions about a bias or a weight's operand are answered from the
        tensor's header, so a bias the fingerprint never reads is never converted; its value,
        once read, has that kind and shape (:func:`_initializer_array`). Each header is read once:
        units ask about a tensor several times.
        """
        if name in self._headers:
            return self._headers[name]
        tensor = self.initializers.get(name)
        kind = None if tensor is None else _KINDS.get(tensor.data_type)
        # A repeated int64 field gives Python ints already: no conversion per dimension.
        header = None if tensor is None or kind is None else (kind, tuple(tensor.dims[:]))
        self._headers[name] = header
        return header

    def declared_shapes(self) -> dict[str, tuple[int | str | None, ...]]:
        """Shapes the graph declares: inputs, outputs, value_info, the best known of each name.

        ModelGraph collects the same without shape inference.
        """
        if self._declared is None:
            self._declared = {}
            for info in (*self.graph.input, *self.graph.output, *self.graph.value_info):
                if info.name in self.initializers or not info.type.HasField("tensor_type"):
                    continue
                if info.type.tensor_type.HasField("shape"):
                    shape = tuple(_dim(d) for d in info.type.tensor_type.shape.dim)
                    old = self._declared.get(info.name)
                    if old is None or _known(shape) > _known(old):
                        self._declared[info.name] = shape
        return self._declared

    def rank(self, name: str) -> int | None:
        """A tensor's rank from the graph's declared shapes (the shape :meth:`declared_shapes` keeps).

        Only the declarations of ``name`` are read: a Gemm asks for its output's rank, and
        converting every declared shape of a graph (a transformer declares one per tensor) cost
        more than the rest of its producers.
        """
        if self._declared is not None:
            shape = self._declared.get(name)
            return None if shape is None else len(shape)
        if name in self.initializers:
            return None  # declared_shapes leaves initializers out
        if self._infos is None:
            self._infos = {}
            for info in (*self.graph.input, *self.graph.output, *self.graph.value_info):
                self._infos.setdefault(info.name, []).append(info)
        best: tuple[int | str | None, ...] | None = None
        for info in self._infos.get(name, ()):
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
                shape = tuple(_dim(d) for d in info.type.tensor_type.shape.dim)
                if best is None or _known(shape) > _known(best):
                    best = shape
        return None if best is None else len(best)

    # -- units, as find_units finds them -----------------------------------------------------
    def units(self) -> dict[int, Unit]:
        """Every Conv/ConvTranspose/Gemm/MatMul with a constant weight, with its following BatchNorm.

        The bias is left unset: the fingerprint does not read it.
        """
        units: dict[int, Unit] = {}
        # Names come from the lists read once (:attr:`_inputs`, :attr:`_outputs`), not the protobuf.
        inputs, outputs = self._inputs, self._outputs
        for index, op_type in enumerate(self.op_types):
            if op_type not in UNIT_OPS:
                continue
            node = self.nodes[index]
            read = inputs[index]
            if self.domains[index] not in _STANDARD or len(read) < 2:
                continue
            slot_axis = weight_slot(self, node)
            if slot_axis is None:
                continue
            slot, out_axis = slot_axis
            tail = outputs[index][0]
            if op_type in ("Conv", "ConvTranspose", "Gemm") and len(read) > 2 and read[2]:
                pass  # the bias is the node's own input: the BatchNorm reads the node's output
            else:
                reader = self._single_consumer(tail, "Add")
                if reader is not None:
                    if is_channel_vector(self, inputs[reader[0]][1 - reader[1]], node, slot, out_axis):
                        tail = outputs[reader[0]][0]
            batchnorm = None
            if op_type in _FOLDABLE and foldable(self, node):
                reader = self._single_consumer(tail, "BatchNormalization")
                if (
                    reader is not None
                    and reader[1] == 0
                    and all(self.float_constant(name) for name in inputs[reader[0]][1:5])
                ):
                    batchnorm = reader[0]
            units[index] = Unit(index, slot, out_axis, None, batchnorm)
        return units


    def _single_consumer(self, name: str, op_type: str) -> tuple[int, int] | None:
        while True:
            if self._readers.get(name, 0) != 1 or name in self.graph_outputs:
                return None
            at = self._first_read[name]
            index = self._reader_of[at]
            slot = at - self._input_start[index]
            if self.op_types[index] == op_type:
                return index, slot
            made = self._outputs[index]
            if slot != 0 or self.op_types[index] not in _TYPE_ONLY_OPS or len(made) != 1:
                return None
            name = made[0]

    def batchnorm_scale(self, index: int) -> np.ndarray | None:
        """``gamma / sqrt(var + eps)`` of a BatchNorm, in float64."""
        node = self.nodes[index]
        parts = [self.constant_value(name) for name in self._inputs[index][1:5]]
        if len(parts) < 4 or any(part is None for part in parts):
            return None
        gamma, var = np.asarray(parts[0], dtype=np.float64), np.asarray(parts[3], dtype=np.float64)
        eps = float(node_attribute(node, "epsilon", 1e-5))
        return gamma / np.sqrt(var + eps)


#: numpy kind of each plain ONNX element type (read as that dtype); others are read to know.
_KINDS: dict[int, str] = {data_type: dtype.kind for data_type, dtype in PLAIN_TYPES.items()}


def _initializer_array(tensor: onnx.TensorProto, name: str) -> np.ndarray:
    """:func:`~onnxlady._io._tensors.read_array` of an initializer, the common case read directly.

    A tensor of a plain numeric type whose values are all in ``raw_data`` is a view of those
    bytes, as ``to_array`` gives it, without its dozen protobuf field reads per tensor (on a
    small model they cost more than the parse); a float32 tensor stored in ``float_data`` (as
    PaddleOCR's exports store theirs) is copied out of it, the values ``to_array`` gives.
    Anything else goes to ``read_array``. Constant nodes' tensors are read here too.
    """
    data_type = tensor.data_type
    dtype = PLAIN_TYPES.get(data_type)
    if dtype is not None and tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.HasField("segment"):
        raw = tensor.raw_data
        dims = tuple(tensor.dims[:])  # a slice: a list, read faster than the field itself
        count = 1
        for dim in dims:
            count *= dim
        if raw and len(raw) == count * dtype.itemsize:
            if min(dims, default=0) >= 0:  # the same read-only view of raw, in one call
                return np.ndarray(dims, dtype, raw)
            return np.frombuffer(raw, dtype=dtype).reshape(dims)  # reshape's own error
        if data_type == onnx.TensorProto.FLOAT and not raw and not tensor.HasField("raw_data"):
            values = tensor.float_data
            if len(values) == count:
                return np.array(values, dtype=np.float32).reshape(dims)
    return read_array(tensor, f"tensor '{name}'")


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        return dim.dim_param
    return None


def _known(shape: tuple[int | str | None, ...]) -> int:
    return sum(1 for d in shape if isinstance(d, int))


def model_producers(
    model: onnx.ModelProto,
    arrays: dict[str, np.ndarray] | None = None,
    full_model: Callable[[], onnx.ModelProto] | None = None,
) -> list[ProducerWeight]:
    """:func:`producer_weights` of ``model``, read by a :class:`WeightGraph` where it can be.

    A WeightGraph gives the same answer without building a ModelGraph; other models are read by a
    ModelGraph.

    Args:
        model: a loaded model (external data loaded); not modified. With ``arrays``: the
            skeleton of :func:`onnxlady._provenance._wire.read_weights`.
        arrays: values of the initializers whose bytes ``model`` lacks.
        full_model: for a skeleton, the whole model (called only when a ModelGraph must read it).

    Returns:
        The producer weights, in topological order.

    Raises:
        OnnxladyError: the model is malformed (a tensor nothing defines, a cycle...).
    """
    if calls_local_functions(model):
        # Layers inside local functions are read on the model with its calls inlined (the
        # weights a call reads are the model's own): a model and its inlined form read alike.
        if arrays and full_model is None:
            raise ValueError("a skeleton model needs full_model to be read by a ModelGraph")
        whole = full_model() if arrays and full_model is not None else model
        view = inlined_view(whole)
        return producer_weights(ModelGraph(view.model if view is not None else whole, infer_shapes=False))
    try:
        graph = WeightGraph(model, arrays)
        return _collect(graph, graph.order, graph.op_types, graph.units(), graph.batchnorm_scale)
    except FullGraphNeeded:
        if arrays and full_model is None:
            raise ValueError("a skeleton model needs full_model to be read by a ModelGraph") from None
        whole = full_model() if arrays and full_model is not None else model
        return producer_weights(ModelGraph(whole, infer_shapes=False))
