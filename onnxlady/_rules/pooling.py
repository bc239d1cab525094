"""Pooling and resampling: they act on spatial axes and leave batch and channel axes alone."""

from __future__ import annotations

import numpy as np

from onnxlady._graph._expr import direct_sum
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register


@register
class PoolRule(OpRule):
    """Pooling keeps axes 0 and 1; MaxPool's Indices output encodes channel positions."""

    op_types = (
        "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
    )  # fmt: skip

    def propagate(self, ctx: RuleContext) -> None:
        if ctx.op_type == "MaxPool" and ctx.output_used(1):
            raise RuleDoesNotApply("blocking", "MaxPool's Indices output flattens the channel index")
        for axis in (0, 1):
            if axis in ctx.tracked(0):
                ctx.emit(0, axis, ctx.take(0, axis))


@register
class ResizeRule(OpRule):
    """Resize/Upsample: an axis whose size does not change (scale 1) passes through."""

    op_types = ("Resize", "Upsample")

    def propagate(self, ctx: RuleContext) -> None:
        for slot in range(1, ctx.num_inputs):
            if ctx.tracked(slot):
                raise RuleDoesNotApply("blocking", f"input {slot} carries channels")
        in_shape, out_shape = ctx.shape_in(0), ctx.shape_out(0)
        for axis in ctx.tracked(0):
            same = (
                in_shape is not None
                and out_shape is not None
                and isinstance(in_shape[axis], int)
                and in_shape[axis] == out_shape[axis]
            ) or self._unit_scale(ctx, axis)
            if same:
                ctx.emit(0, axis, ctx.take(0, axis))

    @staticmethod
    def _unit_scale(ctx: RuleContext, axis: int) -> bool:
        """True when the constant scales (or sizes) leave ``axis`` unchanged."""
        if ctx.op_type == "Upsample":
            scales = ctx.const(1) if ctx.input(1) else np.asarray(ctx.attr("scales", []), dtype=np.float32)
            sizes = None
        elif ctx.opset < 11:
            scales, sizes = ctx.const(1), None
        else:
            scales = ctx.const(2) if ctx.input(2) else None
            sizes = ctx.const(3) if ctx.input(3) else None
        axes = ctx.attr("axes")
        if scales is not None and scales.size:
            dims = list(axes) if axes is not None else list(range(scales.size))
            return axis not in dims or float(scales[dims.index(axis)]) == 1.0  # ruff: ignore[float-equality-comparison] - exactly 1 is the identity resize; any other scale moves positions
        if sizes is not None and sizes.size:
            dims = list(axes) if axes is not None else list(range(sizes.size))
            in_shape = ctx.shape_in(0)
            dim = in_shape[axis] if in_shape is not None else None
            return axis not in dims or (isinstance(dim, int) and int(sizes[dims.index(axis)]) == dim)
        return False


@register
class PadRule(OpRule):
    """Pad: an axis not padded passes through; one padded with a constant keeps its positions.

    The padded positions stay in place around the permuted ones (a block sum); edge, reflect and
    wrap padding read the permuted values, so they freeze the axis.
    """

    op_types = ("Pad",)

    def propagate(self, ctx: RuleContext) -> None:
        rank = ctx.rank_in(0)
        pads = ctx.const(1) if ctx.opset >= 11 else np.asarray(ctx.attr("pads", []))
        if pads is None:
            raise RuleDoesNotApply("not-constant", "pads are computed")
        axes = ctx.const(3) if ctx.input(3) else None
        padded_axes = [int(a) % rank for a in axes] if axes is not None else list(range(rank))
        count = len(padded_axes)
        if ctx.input(2) and ctx.tracked(2):
            raise RuleDoesNotApply("blocking", "the pad value carries channels")
        mode = ctx.attr("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        for axis, expr in ctx.tracked(0).items():
            ctx.take(0, axis)
            if axis in padded_axes:
                k = padded_axes.index(axis)
                before, after = int(pads[k]), int(pads[k + count])
                if before == 0 and after == 0:
                    pass
                elif mode == "constant" and before >= 0 and after >= 0:
                    # The padded positions hold one value whatever the order of the others:
                    # they stay in place around the permuted ones (EfficientViT pads V with 1s).
                    padding = "positions padded with a constant"
                    expr = direct_sum([ctx.fixed(before, padding), expr, ctx.fixed(after, padding)])
                else:
                    ctx.freeze(expr, "blocking", f"Pad ({mode}, {before} and {after}) adds positions on permuted axis {axis}")
                    continue
            ctx.emit(0, axis, expr)
