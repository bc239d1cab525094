"""Convolution weights standardized in the graph: which stored constants a permutation moves.

Weight standardization (timm's ``StdConv2d``, ``ScaledStdConv2d``, BiT, NF-ResNets, NFNets)
normalizes each output channel's filter before the convolution. Exported with constant folding,
the weight a Conv reads is computed:

    W = Reshape(BatchNormalization(V[1, M, F], gain[M], shift[M], mean, var), [M, C, k...])

with ``training_mode=1``: each of the M channels of ``V`` is normalized by its own mean and
variance over its ``F = C * prod(k)`` fan-in values, then scaled by ``gain`` and shifted. ``mean``
and ``var`` (here computed from a transposed copy of ``V``) only feed the running statistics,
outputs 1 and 2, which nothing reads. So:

- permuting W's output channels (axis 0) is permuting ``V`` along axis 1 with ``gain`` and
  ``shift`` (the statistics of each channel move with it);
- permuting W's input channels (axis 1) by ``p`` is permuting ``V``'s fan-in axis by
  ``p (x) I_K`` (``K = prod(k)``, the kernel positions of each input channel, row-major): a
  permutation of the positions a channel's statistics average over, which leaves them unchanged.

The transposed copy the unread ``mean`` and ``var`` come from is dead to every output: it takes
the same permutations (its axis 2 the outputs', its axis 1 the fan-in's), so the permuted model
keeps no copy of the weights in their original order (:func:`_statistics_uses`). Where ``V`` is
the stored conv weight reshaped (an export without folding), that weight is bound instead.

In inference mode (``training_mode`` 0) the given ``mean`` and ``var`` normalize instead: they
must then be constants, bound with ``gain``. Anything else (another exporter's form, a tensor on
the way read by another operator) is not recognized: the Conv's channels then keep the identity
with a ``not-constant`` reason (``producers._computed_conv_weight``); an axis whose bindings
fail is frozen with the failure's reason, the other axis still moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._expr import Expr, product
from onnxlady._rules._context import Binding, RuleContext, RuleDoesNotApply

#: What each BatchNormalization parameter is to a weight standardization.
_PARAMETERS = {1: "gain", 2: "shift", 3: "mean", 4: "variance"}
#: ``bind(axis_of_W, expr, role)`` for a standardized weight.
StandardizedBinder = Callable[[int, Expr, str], None]


def standardized_weight(ctx: RuleContext, slot: int) -> tuple[tuple[int, ...], StandardizedBinder] | None:
    """The static shape of a Conv weight standardized in the graph, and how to bind its axes.

    Args:
        ctx: the Conv's rule context.
        slot: the weight's input slot.

    Returns:
        ``(shape, bind)``, or None when input ``slot`` is not such a weight. ``bind(axis, expr,
        role)`` buffers the bindings of the constants behind the weight (axis 0: output channels,
        axis 1: input channels) in ``ctx``; where they cannot follow (or for another axis) it
        freezes ``expr`` with the reason instead.
    """
    graph = ctx.graph
    name = ctx.input(slot)
    found = _single_reader_producer(ctx, name, ctx.index, slot, "Reshape")
    if found is None:
        return None
    reshape_index, reshape = found
    found = _single_reader_producer(ctx, reshape.input[0], reshape_index, 0, "BatchNormalization")
    if found is None:
        return None
    norm_index, norm = found
    inputs = list(norm.input)
    if len(inputs) < 5 or any(out and _used(ctx, out) for out in norm.output[1:]):
        return None  # the running statistics are read: they would have to follow too
    values = graph.constant_shape(inputs[0])
    shape = graph.shape(name)
    if values is None or shape is None or len(values) != 3 or values[0] != 1 or len(shape) < 3:
        return None
    if not all(isinstance(d, int) for d in shape):
        return None
    weight = tuple(int(d) for d in shape)  # type: ignore[arg-type]
    channels, fan_in = values[1], values[2]
    kernel = math.prod(weight[2:])
    if weight[0] != channels or weight[1] * kernel != fan_in:
        return None
    training = int(node_attribute(norm, "training_mode", 0)) == 1
    parameters = (1, 2) if training else (1, 2, 3, 4)  # in training mode mean/var feed only outputs 1, 2
    for parameter in parameters:
        if graph.constant_shape(inputs[parameter]) != (channels,):
            return None

    statistics = _statistics_uses(ctx, norm_index, (1, fan_in, channels), weight) if training else []

    def bind(axis: int, expr: Expr, role: str) -> None:
        # The stored values are the weight's rows: they keep the weight's role (``role``).
        if axis not in (0, 1):
            ctx.freeze(expr, "index-map", f"axis {axis} of standardized weight '{name}'")
            return
        try:
            if axis == 0:
                _bind_values(ctx, norm_index, weight, 1, 0, expr, role)
                for parameter in parameters:
                    _bind_use(ctx, norm_index, parameter, 0, expr, f"{role}: standardization {_PARAMETERS[parameter]}")
                _bind_statistics(ctx, statistics, weight, 2, expr, 0, expr, role)
            else:
                kernel_positions = ctx.fixed(kernel, "kernel positions of one input channel")
                _bind_values(ctx, norm_index, weight, 2, 1, product(expr, kernel_positions), role, expr)
                _bind_statistics(ctx, statistics, weight, 1, product(expr, kernel_positions), 1, expr, role)
        except RuleDoesNotApply as stop:
            # Whatever was bound for this axis takes the identity with it: the rest still moves.
            ctx.freeze(expr, stop.kind, stop.message)

    return weight, bind


def _statistics_uses(
    ctx: RuleContext, norm_index: int, shape: tuple[int, int, int], weight: tuple[int, ...]
) -> list[tuple[int, int, bool]]:
    """The uses ``(node, slot)`` of the ``[1, F, M]`` constants the running statistics are computed from.

    In training mode a BatchNormalization's ``mean`` and ``var`` inputs reach nothing but its
    running statistics, which nothing reads: the nodes that compute them (ReduceMean over a
    transposed copy of ``V``, as timm exports) are dead to every output. Their copy may then be
    permuted like ``V`` itself (fan-in and channels), so that the permuted model holds no copy of
    the weights in their original order. Empty where anything computed on the way is read by
    another node, is a graph output, or is made from other constants than scalars and axes.
    Each use is ``(node, slot, is_weight)``: ``is_weight`` where it reads the stored conv weight
    itself through reshapes (an export without folding), else a ``[1, F, M]`` copy.
    """
    graph = ctx.graph
    norm = graph.nodes[norm_index]
    nodes: set[int] = set()
    uses: list[tuple[int, int, bool]] = []
    pending = [name for name in norm.input[3:5] if name]
    while pending:
        tensor = pending.pop()
        produced = graph.producer.get(tensor)
        if graph.is_constant(tensor) or produced is None or produced[0] >= graph.main_count:
            return []
        index = produced[0]
        if index in nodes:
            continue
        nodes.add(index)
        for slot, source in enumerate(graph.input_names(index)):
            if not source:
                continue
            if not graph.is_constant(source):
                pending.append(source)
                continue
            source_shape = graph.constant_shape(source)
            leaf = graph.constant_leaf(source)
            if source_shape == shape:
                uses.append((index, slot, False))
            elif leaf is not None and leaf.chain and graph.shape(leaf.name) == weight:
                uses.append((index, slot, True))
            elif source_shape is None or (math.prod(source_shape) > 1 and slot == 0):
                return []  # another constant with data: not the statistics of a copy
    for index in nodes:
        for out in graph.output_names(index):
            if out in graph.graph_outputs:
                return []
            for reader, slot in graph.consumers.get(out, []):
                if reader not in nodes and not (reader == norm_index and slot in (3, 4)):
                    return []
    return uses


def _bind_statistics(
    ctx: RuleContext,
    uses: list[tuple[int, int, bool]],
    weight: tuple[int, ...],
    axis: int,
    expr: Expr,
    weight_axis: int,
    weight_expr: Expr,
    role: str,
) -> None:
    """Bind every use the statistics are computed from, or none (they then keep their order).

    A ``[1, F, M]`` copy along ``axis`` by ``expr``; the stored weight along ``weight_axis`` by
    ``weight_expr`` (see :func:`_statistics_uses`).
    """
    where = f"{role}: statistics"
    bindings = [
        _weight_leaf_binding(ctx, node, slot, weight, weight_axis, weight_expr, where)
        if is_weight
        else ctx._constant_binding(node, slot, axis, expr, where)
        for node, slot, is_weight in uses
    ]
    if all(binding is not None for binding in bindings):
        ctx._bound.extend(binding for binding in bindings if binding is not None)


def _used(ctx: RuleContext, name: str) -> bool:
    return name in ctx.graph.consumers or name in ctx.graph.graph_outputs


def _single_reader_producer(
    ctx: RuleContext, name: str, reader: int, slot: int, op_type: str
) -> tuple[int, onnx.NodeProto] | None:
    """The main-graph ``op_type`` node that computes ``name``, read only at (``reader``, ``slot``), or None.

    Only an exclusive path is bound: another reader would see the permuted values unannounced.
    """
    graph = ctx.graph
    if not name or graph.is_constant(name) or name in graph.graph_outputs:
        return None
    if graph.consumers.get(name, []) != [(reader, slot)]:
        return None
    produced = graph.producer.get(name)
    if produced is None or produced[0] >= graph.main_count:
        return None
    node = graph.nodes[produced[0]]
    if node.op_type != op_type or node.domain not in ("", "ai.onnx") or node.output[0] != name:
        return None
    return produced[0], node


def _bind_values(
    ctx: RuleContext,
    node: int,
    weight: tuple[int, ...],
    axis: int,
    weight_axis: int,
    expr: Expr,
    role: str,
    weight_expr: Expr | None = None,
) -> None:
    """Bind ``V`` (input 0 of the normalization ``node``) along ``axis`` by ``expr``.

    Where ``V`` is a stored ``[1, M, F]`` tensor (an export with constant folding), that is its
    own binding. An export without folding reads ``V = Reshape(W, [1, M, -1])`` of the stored
    conv weight ``W[M, C, k...]``: no axis of ``V`` is one axis of ``W``, so ``W`` is bound
    instead, along ``weight_axis`` (M: axis 0; the fan-in's ``p (x) I_K``: axis 1 by ``p``,
    ``weight_expr``).
    """
    try:
        _bind_use(ctx, node, 0, axis, expr, role)
    except RuleDoesNotApply:
        _bind_weight_leaf(ctx, node, weight, weight_axis, expr if weight_expr is None else weight_expr, role)


def _bind_weight_leaf(ctx: RuleContext, node: int, weight: tuple[int, ...], axis: int, expr: Expr, role: str) -> None:
    """Bind axis ``axis`` of the stored conv weight that input 0 of ``node`` reshapes (see :func:`_bind_values`)."""
    binding = _weight_leaf_binding(ctx, node, 0, weight, axis, expr, role)
    if binding is None:
        name = ctx.graph.nodes[node].input[0]
        raise RuleDoesNotApply("index-map", f"the fan-in axis of '{name}' ({role}) is not one axis of a stored weight")
    ctx._bound.append(binding)


def _weight_leaf_binding(
    ctx: RuleContext, node: int, slot: int, weight: tuple[int, ...], axis: int, expr: Expr, role: str
) -> Binding | None:
    """The binding of axis ``axis`` of the stored conv weight that input ``slot`` of ``node`` reshapes.

    None where that input is no stored weight of shape ``weight`` read through reshapes only.
    """
    graph = ctx.graph
    leaf = graph.constant_leaf(graph.nodes[node].input[slot])
    leaf_shape = graph.shape(leaf.name) if leaf is not None else None
    if (
        leaf is None
        or leaf_shape is None
        or tuple(leaf_shape) != weight
        or any(graph.nodes[i].op_type not in ("Reshape", "Identity") for i in leaf.chain)
        or graph.dtypes.get(leaf.name) in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
        or (leaf.constant_node is not None and not isinstance(graph.leaf_tensor_or_none(leaf), onnx.TensorProto))
    ):
        return None
    return Binding(node, slot, leaf.name, axis, expr, role)


def _bind_use(ctx: RuleContext, node: int, slot: int, axis: int, expr: Expr, role: str) -> None:
    """Buffer the binding of input ``slot`` of node ``node`` (a constant) along ``axis`` in ``ctx``."""
    binding = ctx._constant_binding(node, slot, axis, expr, role)
    if binding is None:
        name = ctx.graph.nodes[node].input[slot]
        raise RuleDoesNotApply("not-constant", f"'{name}' ({role}) cannot take a permutation along axis {axis}")
    ctx._bound.append(binding)
