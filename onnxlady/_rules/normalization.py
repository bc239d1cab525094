"""Normalisations with per-channel parameters: the parameters follow the channels."""

from __future__ import annotations

from onnxlady._graph._expr import Expr
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register


@register
class BatchNormRule(OpRule):
    """BatchNormalization: scale, B, mean, var follow axis 1; other axes pass through."""

    op_types = ("BatchNormalization",)

    def propagate(self, ctx: RuleContext) -> None:
        self.channels(ctx, ctx.take_all(0))

    @staticmethod
    def channels(ctx: RuleContext, spaces: dict[int, Expr]) -> None:
        """Pass ``spaces`` (input 0's, taken) through; the parameters follow axis 1.

        Shared with InstanceNormalization (:mod:`onnxlady._rules.normalization_groups`).
        """
        for axis, expr in spaces.items():
            ctx.emit(0, axis, expr)  # element-wise on every axis but the statistics' one
        if 1 not in spaces:
            return  # channels not permuted: parameters stay
        channels = spaces[1]
        parameters = 5 if ctx.op_type == "BatchNormalization" else 3
        for slot in range(1, min(parameters, ctx.num_inputs)):
            ctx.attach(slot, 0, channels, f"{ctx.op_type} parameter {slot}")
        for slot in (1, 2):  # training-mode running statistics
            if ctx.op_type == "BatchNormalization" and ctx.output_used(slot):
                ctx.emit(slot, 0, channels)


@register
class LayerNormRule(OpRule):
    """LayerNormalization: normalising over a permuted axis is equivariant if Scale/B follow it."""

    op_types = ("LayerNormalization",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        rank = ctx.rank_in(0)
        first = int(ctx.attr("axis", -1))
        first = first + rank if first < 0 else first
        for axis, expr in spaces.items():
            if axis >= first:
                for slot in (1, 2):
                    if ctx.input(slot):
                        param_rank = len(ctx.shape_in(slot) or ())
                        param_axis = axis - (rank - param_rank)
                        if param_axis < 0:
                            continue
                        if (ctx.shape_in(slot) or ())[param_axis] == 1:
                            continue
                        ctx.attach(slot, param_axis, expr, f"LayerNormalization parameter {slot}")
            ctx.emit(0, axis, expr)
        if ctx.output_used(1) or ctx.output_used(2):
            raise RuleDoesNotApply("blocking", "LayerNormalization mean/inv-std outputs are used")
