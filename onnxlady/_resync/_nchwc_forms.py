"""Convolutions as ONNX Runtime's NCHWc layout writes them, read as the Conv they stand for.

``SessionOptions.graph_optimization_level = ORT_ENABLE_ALL`` on an x86 CPU with AVX2 or AVX-512
rewrites float ``Conv``/``FusedConv`` nodes into ``Conv`` of the ``com.microsoft.nchwc`` domain,
and the activations between them into a *blocked* layout: channels in blocks of ``B`` (8 with
AVX2, 16 with AVX-512), each channel count rounded up to a whole block with zero channels.
``ReorderInput``/``ReorderOutput`` convert at the edges of those regions (``ReorderOutput``'s
``channels`` attribute is the true count). The weights are re-laid out once, when the model is
saved (MLAS's ``MlasReorderFilterOIHWBiBo`` / ``MlasReorderFilterOIHWBo``), and stored with
the shape ``[O', I', kh, kw]`` where ``O'`` is ``O`` rounded up to ``B`` and ``I'`` is the
input channel count as the layout holds it:

- ``OIHWBiBo`` (the input is blocked; grouped convolutions with whole blocks per group):
  element ``[ob, ib, y, x, bi, bo]`` of the flat buffer is ``W[ob*B + bo, ib*B + bi, y, x]``,
  ``I'`` rounded up to ``B`` as well, padding zero.
- ``OIHWBo`` (a plain NCHW input with fewer than ``B`` channels, read directly; depthwise
  convolutions): element ``[ob, i, y, x, bo]`` is ``W[ob*B + bo, i, y, x]``; a depthwise
  convolution's ``group`` attribute is rounded up with its channels.

The bias is padded with zeros to ``O'``. A fused residual ``Add`` becomes the node's fourth
input (``Sum``), and an activation after it its ``activation`` attribute, as with
``FusedConv``. Nothing of this changes the linear map: here the stored buffer is un-blocked
and cut back to the true channel counts, so :mod:`onnxlady._resync._sites` reads the node as
the ``Conv`` it came from and it pairs with that Conv by what it computes.

The block size is not stored. It is read off the graph where the graph decides it (an output
count that is a multiple of 8 but not 16 means 8; a plain input of 8 or more channels read
directly means 16), else 16 (AVX-512) is assumed. The true channel counts come from the graph
too (``ReorderOutput``'s ``channels`` downstream, the channels of the plain tensor a
``ReorderInput`` reads, the producing convolution's count), else from the zero padding itself.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._values import Approx, read_constant

__all__ = ["NCHWC", "BlockedConv", "blocked_conv", "is_fused_sum", "is_reorder", "nchwc_block", "read_blocked"]

NCHWC = "com.microsoft.nchwc"
#: Block sizes MLAS uses: AVX-512 first (the default where the graph does not decide).
_BLOCKS = (16, 8)
#: Operators that keep an NCHWc tensor's channels as they are (elementwise, pooling): the
#: optimizer runs them on the blocked layout directly.
_SAME_CHANNELS = frozenset(
    {"Relu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softplus",
     "QuickGelu", "Gelu", "FastGelu", "BiasGelu", "Add", "Sum", "Mul", "Sub", "Div", "Max", "Min",
     "MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "Upsample", "Resize", "Identity"}
)  # fmt: skip
#: Operators that read a tensor's shape, not its values: their output is never blocked.
_SHAPE_READERS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class BlockedConv:
    """One NCHWc convolution: how its weight is stored and the Conv weight it stands for."""

    form: str  # "OIHWBiBo" or "OIHWBo"
    block: int
    stored: tuple[int, ...]  # the stored weight's shape [O', I', kh, kw]
    shape: tuple[int, ...]  # the Conv weight's shape [O, I / group, kh, kw]
    group: int  # the Conv's group count (a depthwise one's channels, unpadded)


@dataclass
class _Layout:
    block: int
    convs: dict[int, BlockedConv]


_LAYOUTS: weakref.WeakKeyDictionary[ModelGraph, _Layout] = weakref.WeakKeyDictionary()


def _is_conv(graph: ModelGraph, index: int) -> bool:
    node = graph.nodes[index]
    return node.domain == NCHWC and node.op_type == "Conv" and len(node.input) >= 2


def _blocked_tensors(graph: ModelGraph) -> set[str]:
    """The tensors in the blocked layout.

    Written by an NCHWc node, or computed from one by another operator (a Relu or Add between
    two NCHWc convolutions).
    """
    blocked: set[str] = set()
    for index in graph.order:
        node = graph.nodes[index]
        if node.domain == NCHWC:
            if node.op_type != "ReorderOutput":
                blocked.update(name for name in node.output if name)
        elif node.op_type not in _SHAPE_READERS and any(name in blocked for name in node.input):
            # Only ReorderOutput leaves the layout: whatever else reads a blocked tensor (an
            # activation ONNX Runtime fused, such as QuickGelu for SiLU) runs on it as it is.
            blocked.update(name for name in node.output if name)
    return blocked


def _weight_shape(graph: ModelGraph, index: int) -> tuple[int, ...] | None:
    name = graph.nodes[index].input[1]
    value = graph.constant_value(name) if graph.constant_leaf(name) is not None else None
    if value is None or value.dtype.kind != "f" or value.ndim != 4:
        return None
    return tuple(int(d) for d in value.shape)


def _downstream_channels(graph: ModelGraph, name: str) -> int | None:
    """The true channel count of a blocked tensor, from a ``ReorderOutput`` that reads it.

    Followed through operators that keep channels.
    """
    stack, seen = [name], {name}
    while stack:
        for index, slot in graph.consumers.get(stack.pop(), []):
            if index < 0:
                continue
            node = graph.nodes[index]
            if node.domain == NCHWC and node.op_type == "ReorderOutput":
                channels = int(node_attribute(node, "channels", 0))
                if channels > 0:
                    return channels
            elif (node.domain == NCHWC and node.op_type != "Conv") or (
                node.op_type in _SAME_CHANNELS
            ) or (_is_conv(graph, index) and slot == 3):  # the residual a convolution adds
                for out in node.output[:1]:
                    if out and out not in seen:
                        seen.add(out)
                        stack.append(out)
    return None


def _upstream_channels(graph: ModelGraph, name: str, counts: dict[int, int]) -> int | None:
    """The true channel count of a blocked tensor from what wrote it (counts: convolutions' outputs)."""
    while True:
        produced = graph.producer.get(name)
        if produced is None:
            return None
        index = produced[0]
        node = graph.nodes[index]
        if index in counts:
            return counts[index]
        if node.domain == NCHWC and node.op_type == "ReorderInput":
            shape = graph.shape(node.input[0])
            channels = shape[1] if shape is not None and len(shape) == 4 else None
            return channels if isinstance(channels, int) and channels > 0 else None
        if node.op_type == "Concat":
            parts = [_upstream_channels(graph, part, counts) for part in node.input]
            return sum(p for p in parts if p is not None) if all(p is not None for p in parts) else None
        if (node.domain == NCHWC and node.op_type != "Conv") or node.op_type in _SAME_CHANNELS:
            name = node.input[0]
            continue
        return None


def _block_size(graph: ModelGraph, shapes: dict[int, tuple[int, ...]], blocked: set[str]) -> int:
    """The block size the graph was written with: the one every convolution's storage fits."""
    fits = []
    for block in _BLOCKS:
        ok = True
        for index, stored in shapes.items():
            node = graph.nodes[index]
            group = int(node_attribute(node, "group", 1))
            plain = node.input[0] not in blocked
            if stored[0] % block or (group == 1 and plain and stored[1] >= block):
                ok = False
            elif group == 1 and not plain and stored[1] % block:
                ok = False
        if ok:
            fits.append(block)
    return fits[0] if fits else 0


def _trailing_zeros(values: np.ndarray, axis: int, most: int) -> int:
    """How many of the last ``most`` slices along ``axis`` are all zero (padding)."""
    moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    count = 0
    while count < most and count < moved.shape[0] - 1 and not np.any(moved[moved.shape[0] - 1 - count]):
        count += 1
    return count


def _unblock(stored: np.ndarray, form: str, block: int) -> np.ndarray:
    """The padded weight ``[O', I', kh, kw]`` in plain OIHW order."""
    o, i, kh, kw = stored.shape
    flat = stored.reshape(-1)
    if form == "OIHWBo":  # [ob, i, y, x, bo]
        return flat.reshape(o // block, i, kh, kw, block).transpose(0, 4, 1, 2, 3).reshape(o, i, kh, kw)
    # [ob, ib, y, x, bi, bo]
    return flat.reshape(o // block, i // block, kh, kw, block, block).transpose(0, 5, 1, 4, 2, 3).reshape(o, i, kh, kw)


def _layout(graph: ModelGraph) -> _Layout:
    found = _LAYOUTS.get(graph)
    if found is not None:
        return found
    shapes = {
        index: shape
        for index in graph.order
        if _is_conv(graph, index) and (shape := _weight_shape(graph, index)) is not None
    }
    blocked = _blocked_tensors(graph)
    block = _block_size(graph, shapes, blocked) if shapes else 0
    layout = _Layout(block, {})
    if block:
        out_counts: dict[int, int] = {}
        forms: dict[int, str] = {}
        for index in graph.order:  # topological: a producer's count is known before its readers
            if index not in shapes:
                continue
            node = graph.nodes[index]
            stored = shapes[index]
            group = int(node_attribute(node, "group", 1))
            depthwise = group > 1 and stored[1] == 1 and group == stored[0]
            forms[index] = "OIHWBo" if depthwise or (group == 1 and node.input[0] not in blocked) else "OIHWBiBo"
            count = _downstream_channels(graph, node.output[0])
            if count is None or not stored[0] - block < count <= stored[0]:
                count = stored[0] - _padding(graph, index, stored, forms[index], block, 0)
            out_counts[index] = count
        for index, form in forms.items():
            node, stored = graph.nodes[index], shapes[index]
            group = int(node_attribute(node, "group", 1))
            out = out_counts[index]
            if form == "OIHWBo":
                inputs = stored[1]
                group = out if group > 1 else 1  # a depthwise group count is padded with the channels
            else:
                total = _upstream_channels(graph, node.input[0], out_counts)
                per_group = total // group if total is not None and total % group == 0 else None
                if per_group is None or not stored[1] - block < per_group <= stored[1]:
                    per_group = stored[1] - _padding(graph, index, stored, form, block, 1)
                inputs = per_group
            layout.convs[index] = BlockedConv(form, block, stored, (out, inputs, *stored[2:]), group)
    _LAYOUTS[graph] = layout
    return layout


def _padding(graph: ModelGraph, index: int, stored: tuple[int, ...], form: str, block: int, axis: int) -> int:
    """Padding channels on ``axis`` (0 outputs, 1 inputs) told by their zeros, where the graph does not say."""
    read = read_constant(graph, graph.nodes[index].input[1])
    if read is None or read.value.shape != stored:
        return 0
    weight = _unblock(read.value, form, block)
    zeros = _trailing_zeros(weight, axis, block - 1)
    node = graph.nodes[index]
    if axis == 0 and zeros and len(node.input) > 2 and node.input[2]:
        bias = read_constant(graph, node.input[2])
        if bias is not None and bias.value.shape == (stored[0],):
            zeros = min(zeros, _trailing_zeros(bias.value, 0, zeros))
    return zeros


def nchwc_block(graph: ModelGraph) -> int:
    """The block size the graph's NCHWc convolutions are read with (0: none can be read)."""
    return _layout(graph).block


def blocked_conv(graph: ModelGraph, index: int) -> BlockedConv | None:
    """Node ``index`` as an NCHWc convolution whose weight can be un-blocked, else None."""
    if not _is_conv(graph, index):
        return None
    return _layout(graph).convs.get(index)


def is_reorder(node: onnx.NodeProto) -> bool:
    """Whether ``node`` only converts between the blocked layout and NCHW (``ReorderOutput``).

    It changes no value of any true channel: a scalar Mul or a bias Add after it still follows
    the convolution before it.
    """
    return node.domain == NCHWC and node.op_type == "ReorderOutput" and len(node.input) == 1


def is_fused_sum(graph: ModelGraph, index: int, slot: int) -> bool:
    """Whether input ``slot`` of node ``index`` is the residual an NCHWc convolution adds to its result.

    The optimizer fuses ``Add(conv(x), r)`` into the convolution as its fourth input (``Sum``):
    ``r`` flows past the convolution's weights to its output, as through the Add it was.
    """
    return slot == 3 and _is_conv(graph, index)


def read_blocked(graph: ModelGraph, index: int, slot: int) -> Approx | None:
    """An NCHWc convolution's weight (slot 1) or bias (slot 2) as the Conv reads it.

    Args:
        graph: the model.
        index: the ``com.microsoft.nchwc`` ``Conv`` node.
        slot: 1 or 2.

    Returns:
        The weight ``[O, I / group, kh, kw]`` or bias ``[O]``, un-blocked and without the padding
        channels, with the storage error bound; None when it is not such a node or operand.
    """
    conv = blocked_conv(graph, index)
    node = graph.nodes[index]
    if conv is None or slot not in (1, 2) or slot >= len(node.input) or not node.input[slot]:
        return None
    read = read_constant(graph, node.input[slot])
    if read is None:
        return None
    out = conv.shape[0]
    error = np.broadcast_to(read.error, read.value.shape)
    if slot == 2:
        if read.value.shape != (conv.stored[0],):
            return None
        return Approx(read.value[:out], error[:out])
    if read.value.shape != conv.stored:
        return None
    value = _unblock(read.value, conv.form, conv.block)[:out, : conv.shape[1]]
    bound = _unblock(np.ascontiguousarray(error), conv.form, conv.block)[:out, : conv.shape[1]]
    return Approx(np.ascontiguousarray(value), np.ascontiguousarray(bound))
