"""Reductions, arg-reductions and sinks: a reduced permuted axis is absorbed, others move."""

from __future__ import annotations

from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register
from onnxlady._rules.layout import _axes


@register
class ReduceRule(OpRule):
    """Reduce* are symmetric in the reduced positions: a reduced permuted axis needs nothing."""

    op_types = (
        "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    )  # fmt: skip

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        rank = ctx.rank_in(0)
        reduced = _axes(ctx, 1, rank)
        if not reduced:
            if int(ctx.attr("noop_with_empty_axes", 0)):
                for axis, expr in spaces.items():
                    ctx.emit(0, axis, expr)
                return
            reduced = list(range(rank))
        keepdims = int(ctx.attr("keepdims", 1))
        for axis, expr in spaces.items():
            if axis in reduced:
                continue  # absorbed: a symmetric reduction does not see the order
            ctx.emit(0, axis if keepdims else axis - sum(1 for r in reduced if r < axis), expr)


@register
class ArgReduceRule(OpRule):
    """ArgMax/ArgMin/TopK/CumSum return or depend on positions along their axis."""

    op_types = ("ArgMax", "ArgMin", "TopK", "CumSum", "Hardmax")

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        rank = ctx.rank_in(0)
        if ctx.op_type == "CumSum":
            axis_value = ctx.require_const(1, "axis").reshape(-1)[0]
        else:
            axis_value = ctx.attr("axis", -1 if ctx.op_type in ("TopK", "Hardmax") else 0)
        along = int(axis_value) % rank
        keepdims = int(ctx.attr("keepdims", 1)) if ctx.op_type in ("ArgMax", "ArgMin") else 1
        for axis, expr in spaces.items():
            if axis == along:
                ctx.freeze(expr, "blocking", f"{ctx.op_type} depends on the order along permuted axis {axis}")
                continue
            target = axis if keepdims or axis < along else axis - 1
            for slot in range(ctx.num_outputs):
                ctx.emit(slot, target, expr)


@register
class SinkRule(OpRule):
    """Shape and Size read only the dimensions: the order of channels does not matter."""

    op_types = ("Shape", "Size")

    def propagate(self, ctx: RuleContext) -> None:
        ctx.take_all(0)


@register
class SourceRule(OpRule):
    """Operators that make tensors from attributes or shapes carry no channel permutation."""

    op_types = (
        "Constant", "ConstantOfShape", "Range", "EyeLike", "RandomNormal", "RandomUniform",
        "RandomNormalLike", "RandomUniformLike",
    )  # fmt: skip

    def propagate(self, ctx: RuleContext) -> None:
        for slot in range(ctx.num_inputs):
            if ctx.tracked(slot) and ctx.op_type not in ("RandomNormalLike", "RandomUniformLike", "EyeLike"):
                raise RuleDoesNotApply("blocking", f"input {slot} carries channels")
            ctx.take_all(slot)
