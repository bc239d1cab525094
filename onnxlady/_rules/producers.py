"""Producers: operators whose weights create new neurons (Conv, ConvTranspose, Gemm, MatMul, Gather)."""

from __future__ import annotations

from onnxlady._expr import DirectSum, product
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register


@register
class ConvRule(OpRule):
    """Conv: W[M, C/g, k...] — rows are output neurons, columns read input channels.

    Plain conv: new group for the M outputs. Depthwise (C/g == 1): outputs follow the input
    channel they read (times the depth multiplier). Grouped: the same permutation inside every
    input group, and an independent permutation of the outputs inside each output group.
    """

    op_types = ("Conv",)

    def propagate(self, ctx: RuleContext) -> None:
        weight_shape = ctx.const_shape(1)
        groups = int(ctx.attr("group", 1))
        out_channels, in_per_group = weight_shape[0], weight_shape[1]
        if out_channels % groups:
            raise RuleDoesNotApply("index-map", f"{out_channels} outputs do not split into {groups} groups")
        channels = ctx.take(0, 1, in_per_group * groups)
        if groups == 1:
            ctx.bind(1, 1, channels, "conv weight (input channels)")
            outputs = ctx.new_group(out_channels)
        elif in_per_group == 1:
            outputs = product(channels, ctx.fixed(out_channels // groups, "depth multiplier"))
        else:
            inner = ctx.new_group(in_per_group)
            ctx.unify(channels, product(ctx.fixed(groups, "order of conv groups"), inner))
            ctx.bind(1, 1, inner, "conv weight (input channels)")
            outputs = DirectSum(tuple(ctx.new_group(out_channels // groups) for _ in range(groups)))
        ctx.bind(1, 0, outputs, "conv weight")
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
        weight_shape = ctx.const_shape(1)
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        features = ctx.take(0, 0 if trans_a else 1, weight_shape[k_axis])
        ctx.bind(1, k_axis, features, "gemm weight (input features)")
        outputs = ctx.new_group(weight_shape[n_axis])
        ctx.bind(1, n_axis, outputs, "gemm weight")
        if ctx.input(2):
            bias_shape = ctx.shape_in(2) or ()
            if len(bias_shape) >= 1 and bias_shape[-1] == outputs.size:
                ctx.attach(2, len(bias_shape) - 1, outputs, "gemm bias")
        ctx.declare_producer(outputs)
        ctx.emit(0, 1, outputs)


@register
class MatMulRule(OpRule):
    """MatMul with one constant operand (a linear layer); two computed operands have no rule yet."""

    op_types = ("MatMul",)

    def propagate(self, ctx: RuleContext) -> None:
        a_const, b_const = ctx.is_const(0), ctx.is_const(1)
        if b_const and not a_const:
            self._weight_right(ctx)
        elif a_const and not b_const:
            self._weight_left(ctx)
        else:
            raise RuleDoesNotApply("blocking", "MatMul of two computed tensors (attention) has no rule")

    @staticmethod
    def _weight_right(ctx: RuleContext) -> None:
        # Y[..., N] = X[..., K] @ W[K, N]
        weight_shape = ctx.const_shape(1)
        if len(weight_shape) != 2:
            raise RuleDoesNotApply("index-map", f"batched MatMul weight of shape {list(weight_shape)}")
        rank = ctx.rank_in(0)
        if rank < 2:
            raise RuleDoesNotApply("index-map", "MatMul of a vector")
        features = ctx.take(0, rank - 1, weight_shape[0])
        ctx.bind(1, 0, features, "matmul weight (input features)")
        outputs = ctx.new_group(weight_shape[1])
        ctx.bind(1, 1, outputs, "matmul weight")
        for axis, expr in ctx.take_all(0).items():
            if axis != rank - 1:
                ctx.emit(0, axis, expr)  # row (token) axes pass through a 2-D weight
        ctx.declare_producer(outputs)
        ctx.emit(0, rank - 1, outputs)

    @staticmethod
    def _weight_left(ctx: RuleContext) -> None:
        # Y[..., M, N] = W[M, K] @ X[..., K, N]
        weight_shape = ctx.const_shape(0)
        if len(weight_shape) != 2:
            raise RuleDoesNotApply("index-map", f"batched MatMul weight of shape {list(weight_shape)}")
        rank = ctx.rank_in(1)
        if rank < 2:
            raise RuleDoesNotApply("index-map", "MatMul of a vector")
        features = ctx.take(1, rank - 2, weight_shape[1])
        ctx.bind(0, 1, features, "matmul weight (input features)")
        outputs = ctx.new_group(weight_shape[0])
        ctx.bind(0, 0, outputs, "matmul weight")
        for axis, expr in ctx.take_all(1).items():
            if axis != rank - 2:
                ctx.emit(0, axis, expr)
        ctx.declare_producer(outputs)
        ctx.emit(0, rank - 2, outputs)
