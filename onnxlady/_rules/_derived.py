"""Tensors computed from constants only: which stored constants a permutation of one of them moves.

A Vision Transformer exported with its position table interpolated to the input's grid computes
the table it adds to the tokens in the graph (Slice the class position off, Reshape the rest to
its grid, Transpose, Resize, Transpose and Reshape back, Concat the class position again). No
rule tracks a permutation through such a tensor (nothing permuted flows into it), so the residual
stream it is added to would freeze. Yet every one of those operators treats the channel axis as
an independent axis: permuting the stored table along its channel axis permutes the computed
tensor the same way. :func:`derived_uses` walks back from the computed tensor to the constants
it is made of and says which axis of which constant use to permute, or None where an operator on
the way mixes or moves positions of that axis; nothing is ever permuted on a guess. A
``Concat`` along the axis (onnxoptimizer's ``Concat(Wq, Wk, Wv)``) hands each input the piece of
the positions it fills, which then moves by a permutation of its own (the group is their block sum).

A computed tensor on the way may have several readers (Mamba's ``A = -exp(A_log)`` is read by
one Mul per unrolled scan step): each walk lists the reads it accounts for (tensor, axis,
reader, slot), and the analysis keeps the permutation only where, for every computed tensor
and axis some walk permutes, every reader of that tensor took that axis through such a walk
(:func:`~onnxlady._rules._context.freeze_partial_derived`); otherwise some operator would see
permuted values without the analysis knowing, so the group keeps the identity. The walks of
one tensor bind the same constant uses, which joins their groups into one permutation. No
computed tensor on the way may be a graph output. Constant leaves themselves may have several
readers: each use is bound on its own (and untied when the uses disagree), as for any constant
operand.
"""

from __future__ import annotations

import itertools
import math

import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph

#: (node index, input slot, axis as that node reads the input, block, piece): one constant use to
#: permute. ``block`` is ``(start, end)`` where the node is a ``Slice`` reading only those positions
#: of the constant's axis (torch's fused ``in_proj_weight`` cut into Q, K and V), else None.
#: ``piece`` is ``(start, end)`` where a ``Concat`` along the axis on the way makes the use only
#: those positions of the tensor asked about (onnxoptimizer's ``fuse_qkv`` packs Q, K and V weights
#: as a ``Concat`` of the three), else None (all of them).
DerivedUse = tuple[int, int, int, tuple[int, int] | None, tuple[int, int] | None]
#: (tensor, axis, reader node, input slot): one read of a computed tensor along a permuted axis
#: that a walk accounts for (the reader handles the permutation it takes there).
DerivedRead = tuple[str, int, int, int]

#: Element-wise operators of one input that commute with any permutation of the positions.
_UNARY = frozenset({
    "Identity", "Cast", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal",
    "Erf", "Softplus", "Floor", "Ceil", "Round", "Sign",
})  # fmt: skip
#: Broadcasting element-wise operators.
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"})
#: Reductions: equivariant along the axes they keep, unchanged by any permutation of those they reduce.
_REDUCE = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare",
})  # fmt: skip
#: The opset from which each reduction takes its axes as an input rather than an attribute.
_AXES_INPUT_SINCE = 18
#: Longest walk (operators) from the tensor asked about back to its constants.
_MAX_STEPS = 256


def derived_uses(
    graph: ModelGraph, name: str, axis: int, reader: int, slot: int
) -> tuple[list[DerivedUse], list[DerivedRead]] | None:
    """The constant uses whose permutation along an axis permutes ``name`` along ``axis``.

    Args:
        graph: the model's graph.
        name: a tensor computed from constants only, read by node ``reader``.
        axis: the axis of ``name`` to permute.
        reader: the node that asks.
        slot: the input slot at which ``reader`` reads ``name``.

    Returns:
        The uses (node, slot, axis, block) of constants to permute, possibly none (the tensor
        is constant along ``axis``), and the reads of computed tensors the walk accounts for
        (starting with ``reader``'s own); None when the walk finds an operator that is not
        equivariant along the axis, a computed tensor that is a graph output, or anything that
        is not computed from constants. Other readers of a computed tensor on the way are the
        caller's to check (they must take the same axis through a walk of their own).
    """
    if not graph.constant_derived(name) or name in graph.graph_outputs:
        return None
    uses: list[DerivedUse] = []
    reads: list[DerivedRead] = [(name, axis, reader, slot)]
    # (tensor, axis, piece): every operator walked keeps each position's index along the axis,
    # but a Concat along it, whose inputs each make one piece of the positions asked about.
    pending: list[tuple[str, int, tuple[int, int] | None]] = [(name, axis, None)]
    steps = 0
    while pending:
        tensor, tensor_axis, piece = pending.pop()
        steps += 1
        if steps > _MAX_STEPS:
            return None
        produced = graph.producer.get(tensor)
        if produced is None or produced[0] >= graph.main_count:
            return None
        index = produced[0]
        node = graph.nodes[index]
        if node.domain not in ("", "ai.onnx"):
            return None
        block = slice_block(graph, node, tensor_axis) if node.op_type == "Slice" else None
        if block is not None and graph.is_constant(node.input[0]):
            uses.append((index, 0, tensor_axis, block, piece))  # a block of the constant's axis
            continue
        if node.op_type == "Concat":
            pieces = _concat_pieces(graph, node, tensor_axis, piece)
            sources = None if pieces is None else [(slot, tensor_axis) for slot, _ in pieces]
        else:
            pieces = None
            sources = _sources(graph, index, tensor_axis)
        if sources is None:
            return None
        for number, (source_slot, source_axis) in enumerate(sources):
            source = node.input[source_slot]
            source_piece = pieces[number][1] if pieces is not None else piece
            if graph.is_constant(source):
                uses.append((index, source_slot, source_axis, None, source_piece))
                continue
            if not graph.constant_derived(source) or source in graph.graph_outputs:
                return None
            reads.append((source, source_axis, index, source_slot))
            pending.append((source, source_axis, source_piece))
    return uses, reads


def _concat_pieces(
    graph: ModelGraph, node: onnx.NodeProto, axis: int, piece: tuple[int, int] | None
) -> list[tuple[int, tuple[int, int] | None]] | None:
    """The inputs (slot, piece of the positions asked about) of a Concat walked along ``axis``.

    Along another axis every input reads the walked positions as they are (its piece is the
    Concat's own); along the Concat's axis each input is the block of positions it fills, in
    order. Empty inputs are left out; None where an input's size along the axis is unknown.
    """
    out_shape = graph.shape(node.output[0])
    if out_shape is None or not 0 <= axis < len(out_shape):
        return None
    if int(node_attribute(node, "axis", 0)) % len(out_shape) != axis:
        return [(slot, piece) for slot, name in enumerate(node.input) if name]
    start = piece[0] if piece is not None else 0
    found: list[tuple[int, tuple[int, int] | None]] = []
    for slot, name in enumerate(node.input):
        shape = (graph.shape(name) or graph.constant_shape(name)) if name else None
        dim = shape[axis] if shape is not None and axis < len(shape) else None
        if not isinstance(dim, int):
            return None
        if dim:
            found.append((slot, (start, start + dim)))
        start += dim
    return found


def _sources(graph: ModelGraph, index: int, axis: int) -> list[tuple[int, int]] | None:
    """The data inputs (slot, axis) of node ``index`` that its output's ``axis`` reads, one to one.

    An input broadcast along the axis (size 1, or no such axis) is left out: it is the same for
    every position. None when the operator moves or mixes positions along the axis.
    """
    node = graph.nodes[index]
    op = node.op_type
    out_shape = graph.shape(node.output[0])
    if out_shape is None or not 0 <= axis < len(out_shape):
        return None
    if op in _UNARY:
        return [(0, axis)]
    if op == "Transpose":
        perm = node_attribute(node, "perm")
        rank = len(out_shape)
        order = [int(p) for p in perm] if perm is not None else list(reversed(range(rank)))
        return [(0, order[axis])]
    if op in ("Unsqueeze", "Squeeze"):
        return _squeezed(graph, node, axis, len(out_shape))
    if op in ("Reshape", "Flatten"):
        source = _whole_axis(graph.shape(node.input[0]), out_shape, axis)
        return None if source is None else [(0, source)]
    if op == "Slice":
        return [(0, axis)] if _slice_keeps(graph, node, axis) else None
    if op in ("Resize", "Upsample"):
        in_shape = graph.shape(node.input[0])
        mode = node_attribute(node, "coordinate_transformation_mode", b"half_pixel")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        same = in_shape is not None and isinstance(in_shape[axis], int) and in_shape[axis] == out_shape[axis]
        # A size-preserving axis reads position i at i in every coordinate mode but the crop.
        return [(0, axis)] if same and mode != "tf_crop_and_resize" else None
    if op == "Expand":
        return _broadcast(graph, node, [0], axis, len(out_shape))
    if op in _BINARY:
        return _broadcast(graph, node, [slot for slot, name in enumerate(node.input) if name], axis, len(out_shape))
    if op in _REDUCE:
        return _reduced(graph, node, axis)
    if op == "Gather":
        if graph.constant_value(node.input[1]) is None:
            return None
        rank = len(graph.shape(node.input[0]) or ())
        gathered = int(node_attribute(node, "axis", 0)) % max(rank, 1)
        index_rank = len(graph.shape(node.input[1]) or ())
        if axis < gathered:
            return [(0, axis)]
        if axis >= gathered + index_rank:
            return [(0, axis - index_rank + 1)]
        return None
    return None


def _reduction_axes(graph: ModelGraph, node: onnx.NodeProto, rank: int) -> set[int] | None:
    """The axes a reduction of a rank-``rank`` input reduces (None where unknown, or it reduces none)."""
    opset = graph.opsets.get("", graph.opsets.get("ai.onnx", 1))
    if (node.op_type == "ReduceSum" and opset >= 13) or opset >= _AXES_INPUT_SINCE:
        given = graph.constant_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if len(node.input) > 1 and node.input[1] and given is None:
            return None
        axes = [] if given is None else [int(a) for a in given.reshape(-1)]
        if not axes and int(node_attribute(node, "noop_with_empty_axes", 0)):
            return None  # the identity: not read as a reduction
    else:
        attribute = node_attribute(node, "axes")
        axes = [int(a) for a in attribute] if attribute is not None else []
    if any(not -rank <= a < rank for a in axes):
        return None
    return {a % rank for a in axes} if axes else set(range(rank))


def _reduced(graph: ModelGraph, node: onnx.NodeProto, axis: int) -> list[tuple[int, int]] | None:
    """The input axis that output ``axis`` of a reduction reads.

    A kept axis is read position for position. A reduced axis kept as size 1 (``keepdims``) is
    the same whatever permutation its input takes along it (a sum, a norm, a maximum of the
    same values): the input may take the walked permutation there, so that every use of a
    constant a weight is normalized by (weight norm's ``v / ReduceL2(v)``) moves alike and
    none is left in its stored order.
    """
    in_shape = graph.shape(node.input[0]) if node.input else None
    if in_shape is None:
        return None
    reduced = _reduction_axes(graph, node, len(in_shape))
    if reduced is None:
        return None
    if int(node_attribute(node, "keepdims", 1)):
        return [(0, axis)] if axis < len(in_shape) else None
    kept = [a for a in range(len(in_shape)) if a not in reduced]
    return [(0, kept[axis])] if axis < len(kept) else None


def reduced_along(graph: ModelGraph, name: str, axis: int) -> bool:
    """Whether computed ``name`` is a reduction over ``axis`` kept as size 1 (through element-wise operators of one input)."""
    produced = graph.producer.get(name)
    while produced is not None and 0 <= produced[0] < graph.main_count:
        node = graph.nodes[produced[0]]
        if node.domain not in ("", "ai.onnx") or not node.input:
            return False
        if node.op_type in _REDUCE:
            shape = graph.shape(node.input[0])
            reduced = _reduction_axes(graph, node, len(shape)) if shape is not None else None
            return reduced is not None and axis in reduced and bool(int(node_attribute(node, "keepdims", 1)))
        if node.op_type not in _UNARY:
            return False
        produced = graph.producer.get(node.input[0])
    return False


def _walks_reduced(graph: ModelGraph, node: onnx.NodeProto, slot: int, axis: int) -> bool:
    """Whether input ``slot`` of ``node``, broadcast along ``axis``, is a reduction over it whose constants a walk reaches.

    Optional: where no walk reaches them the input is left out as any broadcast one is (it is
    the same for every position), so a walk that went through before still does.
    """
    name = node.input[slot]
    if not graph.constant_derived(name) or not reduced_along(graph, name, axis):
        return False
    produced = graph.producer.get(node.output[0])
    return produced is not None and derived_uses(graph, name, axis, produced[0], slot) is not None


def _squeezed(graph: ModelGraph, node: onnx.NodeProto, axis: int, out_rank: int) -> list[tuple[int, int]] | None:
    in_shape = graph.shape(node.input[0])
    if in_shape is None:
        return None
    value = node_attribute(node, "axes")
    if value is None and len(node.input) > 1 and node.input[1]:
        constant = graph.constant_value(node.input[1])
        if constant is None:
            return None
        value = constant.reshape(-1).tolist()
    if node.op_type == "Unsqueeze":
        if value is None:
            return None
        inserted = {int(a) % out_rank for a in value}
        if axis in inserted:
            return []  # a new axis of size 1
        return [(0, axis - sum(1 for a in inserted if a < axis))]
    rank = len(in_shape)
    removed = {int(a) % rank for a in value} if value is not None else {a for a, d in enumerate(in_shape) if d == 1}
    kept = [a for a in range(rank) if a not in removed]
    return [(0, kept[axis])] if axis < len(kept) else None


def _whole_axis(in_shape: tuple | None, out_shape: tuple, axis: int) -> int | None:
    """The input axis that output ``axis`` of a reshape is, whole and in place, or None.

    Static shapes only: the axes in front of it hold as many positions on both sides and the
    axis has the same size, so every position keeps its index along it.
    """
    if in_shape is None or not all(isinstance(d, int) for d in (*in_shape, *out_shape)):
        return None
    size = out_shape[axis]
    if size == 1:
        return None
    before = math.prod(out_shape[:axis])
    for source, dim in enumerate(in_shape):
        if dim == size and math.prod(in_shape[:source]) == before:
            return source
    return None


def _slice_keeps(graph: ModelGraph, node: onnx.NodeProto, axis: int) -> bool:
    """Whether a Slice leaves ``axis`` whole (not sliced, or from 0 to the end with step 1)."""
    in_shape = graph.shape(node.input[0])
    arguments = _slice_arguments(graph, node)
    if in_shape is None or arguments is None:
        return False
    rank = len(in_shape)
    starts, ends, given_axes, steps = arguments
    axes = [a % rank for a in given_axes]
    if axis not in axes:
        return True
    k = axes.index(axis)
    dim = in_shape[axis]
    return steps[k] == 1 and starts[k] in (0, -dim if isinstance(dim, int) else 0) and (
        isinstance(dim, int) and ends[k] >= dim
    )


def _slice_arguments(graph: ModelGraph, node: onnx.NodeProto) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(starts, ends, axes, steps) of a Slice as given (constants or folded shape arithmetic), or None."""
    if len(node.input) > 1:
        arguments = [graph.constant_value(name) if name else None for name in node.input[1:5]]
        if arguments[0] is None or arguments[1] is None:
            return None
        starts, ends = arguments[0].reshape(-1).tolist(), arguments[1].reshape(-1).tolist()
        axes = arguments[2].reshape(-1).tolist() if len(arguments) > 2 and arguments[2] is not None else list(range(len(starts)))
        steps = arguments[3].reshape(-1).tolist() if len(arguments) > 3 and arguments[3] is not None else [1] * len(starts)
    else:
        starts, ends = list(node_attribute(node, "starts", [])), list(node_attribute(node, "ends", []))
        axes = list(node_attribute(node, "axes", range(len(starts))))
        steps = [1] * len(starts)
    return [int(v) for v in starts], [int(v) for v in ends], [int(v) for v in axes], [int(v) for v in steps]


def slice_block(graph: ModelGraph, node: onnx.NodeProto, axis: int) -> tuple[int, int] | None:
    """The positions ``[start, end)`` a step-1 Slice keeps of its input's ``axis``, where it cuts that axis.

    None where the Slice leaves the axis whole, steps by other than 1, or its bounds or the
    axis's size are not known (bounds computed from static shapes are folded, so they are).
    """
    in_shape = graph.shape(node.input[0])
    arguments = _slice_arguments(graph, node)
    if in_shape is None or arguments is None or not 0 <= axis < len(in_shape):
        return None
    dim = in_shape[axis]
    starts, ends, axes, steps = arguments
    axes = [a % len(in_shape) for a in axes]
    if not isinstance(dim, int) or axis not in axes:
        return None
    k = axes.index(axis)
    if steps[k] != 1:
        return None
    start = min(max(starts[k] + dim if starts[k] < 0 else starts[k], 0), dim)
    end = min(max(ends[k] + dim if ends[k] < 0 else ends[k], 0), dim)
    if end <= start or (start, end) == (0, dim):
        return None
    return start, end


def slice_cut(graph: ModelGraph, node: onnx.NodeProto, axis: int) -> tuple[int, int] | None:
    """The block ``[start, end)`` a step-1 Slice keeps of its input's ``axis``, where it cuts that axis alone.

    None where :func:`slice_block` is, or where the Slice also cuts another axis (its output is
    then not the block of whole positions along ``axis``).
    """
    block = slice_block(graph, node, axis)
    arguments = _slice_arguments(graph, node)
    rank = len(graph.shape(node.input[0]) or ())
    if block is None or arguments is None:
        return None
    others = {a % rank for a in arguments[2]} - {axis}
    return block if all(_slice_keeps(graph, node, other) for other in others) else None


def block_partition(graph: ModelGraph, name: str, axis: int, size: int) -> list[tuple[int, int, bool]]:
    """The segments of axis ``axis`` of constant ``name`` that its Slice readers cut it into.

    Returns:
        ``(start, end, read)`` segments covering ``[0, size)``, bounded by every start and end of
        a step-1 Slice of ``name`` along ``axis``; ``read`` when some such Slice reads it. Each
        read segment takes a permutation of its own, so the Slices' blocks together are one
        permutation of the whole axis, however many readers cut it.
    """
    bounds = {0, size}
    blocks = []
    for node_index, slot in graph.consumers.get(name, []):
        node = graph.nodes[node_index] if node_index >= 0 else None
        if node is None or slot != 0 or node.op_type != "Slice":
            continue
        block = slice_block(graph, node, axis)
        if block is not None:
            bounds.update(block)
            blocks.append(block)
    edges = sorted(bounds)
    return [(a, b, any(s <= a and b <= e for s, e in blocks)) for a, b in itertools.pairwise(edges)]


def _broadcast(graph: ModelGraph, node: onnx.NodeProto, slots: list[int], axis: int, out_rank: int) -> list[tuple[int, int]] | None:
    """Inputs aligned from the right: those with the full axis, leaving out broadcast ones."""
    out_dim = (graph.shape(node.output[0]) or ())[axis]
    found: list[tuple[int, int]] = []
    for slot in slots:
        shape = graph.shape(node.input[slot])
        if shape is None:
            return None
        source = axis - (out_rank - len(shape))
        if source >= 0 and shape[source] == 1 and out_dim != 1 and _walks_reduced(graph, node, slot, source):
            # A norm over the axis (weight norm's ReduceL2(v)) broadcast back: the constants it
            # reduces take the permutation too, which leaves it unchanged (see _reduced).
            found.append((slot, source))
            continue
        if source < 0 or shape[source] == 1:
            continue
        if shape[source] != out_dim:
            return None
        found.append((slot, source))
    return found
