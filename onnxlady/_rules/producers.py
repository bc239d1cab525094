"""Producers: operators whose weights create new neurons (Conv, ConvTranspose, Gemm, MatMul, Gather)."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._expr import DirectSum, Expr, Fixed, grouped, product
from onnxlady._rules._context import Binding, RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register
from onnxlady._rules.standardized import standardized_weight


def grouped_conv_outputs(
    ctx: RuleContext, channels: Expr, groups: int, out_channels: int, in_per_group: int,
    bind_inputs: Callable[[Expr], None],
) -> Expr:
    """A convolution's output neurons from the permutation of its ``groups * in_per_group`` input channels.

    Plain (one group): the weight's input axis follows ``channels`` (``bind_inputs``) and the
    outputs are a new group. Depthwise (one input per group): the outputs move in blocks with
    the input channel they read, each block of ``depth multiplier`` outputs in its own order.
    Grouped: the groups keep their order, one permutation inside every input group (bound to the
    weight's input axis), and the outputs of each group permute on their own. Shared by Conv,
    ONNX Runtime's channels-last NhwcConv and the integer convolutions (QLinearConv, ConvInteger).
    """
    if groups == 1:
        bind_inputs(channels)
        return ctx.new_group(out_channels)
    if in_per_group == 1:
        # Output ``c * m + j`` reads input channel ``c`` alone through its own weight row, so
        # the ``m`` outputs of each input channel re-order among themselves, independently of
        # the other channels' (weight rows and bias follow): ``channels (x) {q_c}``.
        multiplier = out_channels // groups
        if multiplier == 1:
            return channels
        return grouped(channels, [ctx.new_group(multiplier) for _ in range(channels.size)])
    inner = ctx.new_group(in_per_group)
    ctx.unify(channels, product(ctx.fixed(groups, "order of conv groups"), inner))
    bind_inputs(inner)
    return DirectSum(tuple(ctx.new_group(out_channels // groups) for _ in range(groups)))


@register
class ConvRule(OpRule):
    """Conv: W[M, C/g, k...] — rows are output neurons, columns read input channels.

    Plain conv: new group for the M outputs. Depthwise (C/g == 1): outputs follow the input
    channel they read, the depth multiplier's outputs of each channel in their own order.
    Grouped: the same permutation inside every input group, and an independent permutation of
    the outputs inside each output group.
    """

    op_types = ("Conv",)

    def propagate(self, ctx: RuleContext) -> None:
        bind = _direct_binder(ctx, 1)
        weight_shape = ctx.graph.constant_shape(ctx.input(1))
        if weight_shape is None:
            weight_shape, bind = _computed_conv_weight(ctx)
        groups = int(ctx.attr("group", 1))
        out_channels, in_per_group = weight_shape[0], weight_shape[1]
        if out_channels % groups:
            raise RuleDoesNotApply("index-map", f"{out_channels} outputs do not split into {groups} groups")
        channels = ctx.take(0, 1, in_per_group * groups)
        outputs = grouped_conv_outputs(
            ctx, channels, groups, out_channels, in_per_group,
            lambda expr: bind(1, expr, "conv weight (input channels)"),
        )  # fmt: skip
        bind(0, outputs, "conv weight")
        ctx.attach(2, 0, outputs, "conv bias")
        ctx.declare_producer(outputs)
        ctx.emit(0, 1, outputs)


@register
class ConvTransposeRule(OpRule):
    """ConvTranspose: W[C, M/g, k...] — axis 0 reads input channels, axis 1 makes outputs."""

    op_types = ("ConvTranspose",)

    def propagate(self, ctx: RuleContext) -> None:
        weight_shape = ctx.const_shape(1)
        groups = int(ctx.attr("group", 1))
        in_channels, out_per_group = weight_shape[0], weight_shape[1]
        if in_channels % groups:
            raise RuleDoesNotApply("index-map", f"{in_channels} inputs do not split into {groups} groups")
        channels = ctx.take(0, 1, in_channels)
        outputs: Expr
        inner: Expr | None
        if groups == 1:
            ctx.bind(1, 0, channels, "conv-transpose weight (input channels)")
            inner = ctx.new_group(out_per_group)
            outputs = inner
        elif in_channels == groups and out_per_group == 1:
            ctx.bind(1, 0, channels, "conv-transpose weight (input channels)")
            outputs = channels
            inner = None
        else:
            blocks = DirectSum(tuple(ctx.new_group(in_channels // groups) for _ in range(groups)))
            ctx.unify(channels, blocks)
            ctx.bind(1, 0, blocks, "conv-transpose weight (input channels)")
            inner = ctx.new_group(out_per_group)
            outputs = product(ctx.fixed(groups, "order of conv groups"), inner)
        if inner is not None:
            ctx.bind(1, 1, inner, "conv-transpose weight")
        ctx.attach(2, 0, outputs, "conv-transpose bias")
        ctx.declare_producer(outputs)
        ctx.emit(0, 1, outputs)


@register
class GemmRule(OpRule):
    """Gemm: Y = A' B' + C with B constant; B's N axis makes the outputs, its K axis reads A."""

    op_types = ("Gemm",)

    def propagate(self, ctx: RuleContext) -> None:
        trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
        bind = _direct_binder(ctx, 1)
        derived = None if ctx.is_const(1) else _derived_matrix(ctx, 1)
        if derived is not None and not ctx.graph.constant_derived(ctx.input(0)):
            # A weight computed from constants (weight norm's g * v / ReduceL2(v)): bound
            # through the constants it is made of, frozen where they cannot follow.
            weight_shape, bind = derived, _derived_binder(ctx, 1)
        else:
            weight_shape = ctx.const_shape(1)
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        features = ctx.take(0, 0 if trans_a else 1, weight_shape[k_axis])
        bind(k_axis, features, "gemm weight (input features)")
        outputs = ctx.new_group(weight_shape[n_axis])
        bind(n_axis, outputs, "gemm weight")
        if ctx.input(2):
            bias_shape = ctx.shape_in(2) or ()
            if len(bias_shape) >= 1 and bias_shape[-1] == outputs.size:
                ctx.attach(2, len(bias_shape) - 1, outputs, "gemm bias")
        ctx.declare_producer(outputs)
        ctx.emit(0, 1, outputs)


@register
class MatMulRule(OpRule):
    """MatMul: a linear layer when one operand is a constant, a contraction when both are computed.

    - ``X @ W`` (``W`` constant ``[K, N]``, possibly read through a ``Transpose`` of a ``[N, K]``
      constant, as tied LM heads export): ``W``'s K axis reads X's last axis, its N axis makes
      new neurons; ``W @ X`` likewise with the roles of the axes swapped.
    - ``A @ B`` with both computed (attention: ``Q @ K^T``, ``softmax @ V``): A's last axis and
      B's second-to-last (the contracted axis) must take the same permutation; A's row axis
      carries to Y's row axis, B's column axis to Y's column axis; batch axes broadcast like
      element-wise operators (equal-size axes are coupled, size-1 axes are not).
    """

    op_types = ("MatMul",)

    def propagate(self, ctx: RuleContext) -> None:
        a_const, b_const = ctx.is_const(0), ctx.is_const(1)
        if b_const and not a_const:
            self._linear(ctx, ctx.const_shape(1), _direct_binder(ctx, 1), data_slot=0)
        elif a_const and not b_const:
            self._linear(ctx, ctx.const_shape(0), _direct_binder(ctx, 0), data_slot=1)
        elif a_const and b_const:
            return  # nothing can carry a permutation into a product of constants
        elif (right := _transposed_constant(ctx, 1)) is not None:
            self._linear(ctx, *right, data_slot=0)
        elif (left := _transposed_constant(ctx, 0)) is not None:
            self._linear(ctx, *left, data_slot=1)
        elif (shape := _derived_matrix(ctx, 1)) is not None and not ctx.graph.constant_derived(ctx.input(0)):
            self._linear(ctx, shape, _derived_binder(ctx, 1), data_slot=0)
        else:
            self._contraction(ctx)

    @staticmethod
    def _linear(ctx: RuleContext, weight_shape: tuple[int, ...], bind: _Binder, data_slot: int) -> None:
        """A linear layer: Y = X @ W[K, N] (``data_slot`` 0) or Y = W[M, K] @ X (``data_slot`` 1).

        W's K axis reads X's contracted axis; its other axis makes the new neurons, which land
        where the contracted axis was; X's remaining axes pass through a 2-D weight.
        """
        if len(weight_shape) != 2:
            raise RuleDoesNotApply("index-map", f"batched MatMul weight of shape {list(weight_shape)}")
        rank = ctx.rank_in(data_slot)
        if rank < 2:
            raise RuleDoesNotApply("index-map", "MatMul of a vector")
        contracted = rank - 1 if data_slot == 0 else rank - 2
        in_axis, out_axis = (0, 1) if data_slot == 0 else (1, 0)
        features = ctx.take(data_slot, contracted, weight_shape[in_axis])
        bind(in_axis, features, "matmul weight (input features)")
        outputs = ctx.new_group(weight_shape[out_axis])
        bind(out_axis, outputs, "matmul weight")
        for axis, expr in ctx.take_all(data_slot).items():
            if axis != contracted:
                ctx.emit(0, axis, expr)  # row (token) axes pass through a 2-D weight
        ctx.declare_producer(outputs)
        ctx.emit(0, contracted, outputs)

    @staticmethod
    def _contraction(ctx: RuleContext) -> None:
        """``Y = A @ B`` with both operands computed (numpy semantics, rank-1 operands promoted)."""
        a_spaces, b_spaces = ctx.tracked(0), ctx.tracked(1)
        if not a_spaces and not b_spaces:
            return
        rank_a, rank_b = ctx.rank_in(0), ctx.rank_in(1)
        if rank_a == 0 or rank_b == 0:
            raise RuleDoesNotApply("index-map", "MatMul of a scalar")
        ctx.take_all(0)
        ctx.take_all(1)
        batch_a, batch_b = max(rank_a - 2, 0), max(rank_b - 2, 0)
        batch = max(batch_a, batch_b)
        row_out = batch if rank_a >= 2 else None  # Y's M axis (absent for a vector A)
        col_out = batch + (rank_a >= 2) if rank_b >= 2 else None  # Y's N axis

        # The contracted axis: A[..., k] and B[..., k, :] must be permuted alike.
        k_a, k_b = rank_a - 1, (rank_b - 2 if rank_b >= 2 else 0)
        if k_a in a_spaces or k_b in b_spaces:
            known = a_spaces[k_a] if k_a in a_spaces else b_spaces[k_b]
            ctx.unify(ctx.take(0, k_a, known.size), ctx.take(1, k_b, known.size))
        if rank_a >= 2 and rank_a - 2 in a_spaces:
            ctx.emit(0, row_out, a_spaces[rank_a - 2])  # type: ignore[arg-type]
        if rank_b >= 2 and rank_b - 1 in b_spaces:
            ctx.emit(0, col_out, b_spaces[rank_b - 1])  # type: ignore[arg-type]

        # Batch axes broadcast from the right, like an element-wise operator.
        for out_axis in range(batch):
            operands = []
            for slot, spaces, own_batch in ((0, a_spaces, batch_a), (1, b_spaces, batch_b)):
                axis = out_axis - (batch - own_batch)
                if axis >= 0:
                    operands.append((slot, spaces, axis))
            tracked = [spaces[axis] for _, spaces, axis in operands if axis in spaces]
            if not tracked:
                continue
            expr = tracked[0]
            for other in tracked[1:]:
                ctx.unify(expr, other)
            for slot, spaces, axis in operands:
                if axis in spaces:
                    continue
                dim = (ctx.shape_in(slot) or ())[axis]
                if dim == 1:
                    continue  # broadcast: every batch entry sees the same matrix
                if not isinstance(dim, int):
                    raise RuleDoesNotApply(
                        "unknown-shape", f"cannot tell whether '{ctx.input(slot)}' broadcasts on axis {axis}"
                    )
                ctx.unify(expr, ctx.take(slot, axis, expr.size))
            ctx.emit(0, out_axis, expr)


#: ``bind(axis_as_the_matmul_sees_it, expr, role)`` for a constant MatMul operand.
_Binder = Callable[[int, Expr, str], None]


def _direct_binder(ctx: RuleContext, slot: int) -> _Binder:
    return lambda axis, expr, role: ctx.bind(slot, axis, expr, role)


def _computed_conv_weight(ctx: RuleContext) -> tuple[tuple[int, ...], _Binder]:
    """The shape of a Conv weight computed in the graph, and how its axes take a permutation.

    A weight standardized in the graph (:mod:`onnxlady._rules.standardized`) binds the constants
    it is made of. Any other weight computed from constants only keeps its convolution's
    channels at the identity, with the reason: its output channels are still a group (so
    ``inspect`` says why they cannot move), never permuted on a guess. A weight computed from
    the inputs is no weight: the rule does not apply.
    """
    found = standardized_weight(ctx, 1)
    if found is not None:
        return found
    name = ctx.input(1)
    shape = ctx.shape_in(1)
    if not name or not ctx.graph.constant_derived(name) or shape is None or len(shape) < 2:
        return ctx.const_shape(1), _direct_binder(ctx, 1)  # (raises: not a constant)
    if not all(isinstance(d, int) for d in shape):
        raise RuleDoesNotApply("unknown-shape", f"the shape of conv weight '{name}' is unknown")

    def freeze(axis: int, expr: Expr, role: str) -> None:
        message = f"'{name}' ({role}) is computed in the graph by operators no rule maps back to its constants"
        ctx.freeze(expr, "not-constant", message)

    def bind(axis: int, expr: Expr, role: str) -> None:
        # A channel axis reached through the constants it is computed from (onnxoptimizer's
        # BatchNorm fold: W * Unsqueeze(scale / Sqrt(var + eps))) moves them; else it stays.
        taken = ctx.take(1, axis, expr.size)
        if isinstance(taken, Fixed):
            freeze(axis, expr, role)
        else:
            ctx.unify(taken, expr)

    for axis, expr in ctx.take_all(1).items():
        if axis >= 2:  # a kernel axis the computation carries (a product's own group): it never moves
            ctx.freeze(expr, "index-map", f"axis {axis} of conv weight '{name}' (computed in the graph) is a kernel axis")
    return tuple(int(d) for d in shape), bind  # type: ignore[arg-type]


def _derived_matrix(ctx: RuleContext, slot: int) -> tuple[int, ...] | None:
    """The static shape of a 2-D weight computed from constants only (a block Sliced from a fused one), if it is one.

    torch's ``nn.MultiheadAttention`` cuts its fused ``in_proj_weight`` into Q, K and V with
    ``Slice`` (bounds from shape arithmetic, folded) and a ``Transpose``: a linear layer whose
    weight the analysis reaches through :func:`~onnxlady._rules._derived.derived_uses`.
    """
    name = ctx.input(slot)
    if not name or not ctx.graph.constant_derived(name):
        return None
    shape = ctx.shape_in(slot)
    if shape is None or len(shape) != 2 or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def _derived_binder(ctx: RuleContext, slot: int) -> _Binder:
    """Bind a computed weight's axis through the constants it is made of (frozen where they cannot follow)."""
    return lambda axis, expr, role: ctx.unify(ctx.take(slot, axis, expr.size), expr)


def _transposed_constant(ctx: RuleContext, slot: int) -> tuple[tuple[int, ...], _Binder] | None:
    """A 2-D constant read through ``Transpose(perm=[1, 0])`` by this MatMul alone, if ``slot`` is one.

    Tied LM heads export as ``MatMul(x, Transpose(embedding_table))``. The transposed tensor is
    computed, so the usual binding cannot reach the table; the table is bound at its use by the
    Transpose instead, with the axes swapped. Only when this MatMul is the Transpose's single
    reader (and it is no graph output): another reader would see the permuted table unannounced.
    """
    graph = ctx.graph
    name = ctx.input(slot)
    produced = graph.producer.get(name) if name else None
    if produced is None:
        return None
    index = produced[0]
    node = graph.nodes[index]
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    source = node.input[0]
    shape = graph.constant_shape(source)
    if shape is None or len(shape) != 2:
        return None
    perm = list(node_attribute(node, "perm", [1, 0]))
    if [int(p) for p in perm] != [1, 0]:
        return None
    if graph.consumers.get(name, []) != [(ctx.index, slot)] or name in graph.graph_outputs:
        return None

    def bind(axis: int, expr: Expr, role: str) -> None:
        _bind_at(ctx, index, 0, 1 - axis, expr, f"{role}, transposed")

    return (shape[1], shape[0]), bind


def _bind_at(ctx: RuleContext, node_index: int, slot: int, axis: int, expr: Expr, role: str) -> None:
    """:meth:`RuleContext.bind` for input ``slot`` of another node (the Transpose that feeds this one).

    Same checks as ``bind``; the binding is buffered in the context like any other, so a rule that
    gives up leaves nothing behind.
    """
    graph = ctx.graph
    name = graph.nodes[node_index].input[slot]
    leaf = graph.constant_leaf(name)
    if leaf is None:
        raise RuleDoesNotApply("not-constant", f"'{name}' ({role}) is computed, not a constant")
    shape = graph.constant_shape(name) or ()
    if not 0 <= axis < len(shape) or shape[axis] != expr.size:
        raise RuleDoesNotApply("index-map", f"constant '{name}' has shape {list(shape)}, not {expr.size} along axis {axis}")
    leaf_axis = graph.leaf_axis(name, axis)
    if leaf_axis is None:
        raise RuleDoesNotApply("index-map", f"constant '{name}' is reshaped so that axis {axis} mixes with others")
    if leaf.constant_node is not None and not isinstance(graph.leaf_tensor_or_none(leaf), onnx.TensorProto):
        raise RuleDoesNotApply("not-constant", f"constant '{leaf.name}' is a list attribute, not a tensor")
    if graph.dtypes.get(leaf.name) in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        raise RuleDoesNotApply("blocking", f"constant '{leaf.name}' packs two values per byte")
    ctx._bound.append(Binding(node_index, slot, leaf.name, leaf_axis, expr, role))  # a bind at the Transpose (see above)
