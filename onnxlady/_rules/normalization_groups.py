"""Group normalisation: statistics over groups of channels, so only whole groups may move.

``GroupNormalization`` (ONNX, opset 18 and 21) splits the channel axis (axis 1) into ``G``
consecutive groups of ``k = C / G`` channels and normalises each group of each sample over its
channels and every spatial position. A channel permutation passes through exactly when it maps
each group onto one group: the fused operator takes the permutations ``p (x) {q_g}``
(:class:`~onnxlady._graph._expr.Grouped`: ``p`` moves whole groups, and each group keeps its own
in-group order ``q_g``, since the statistics of a group ignore the order of its channels). The
affine parameters follow: opset 18's ``scale`` / ``bias`` hold one value per *group* (``p``),
opset 21's one per *channel* (``p (x) {q_g}``). Batch and spatial axes pass through: the
statistics do not depend on their order.

A legacy export's ``Reshape -> InstanceNormalization -> Reshape`` gets ``p (x) q`` (the same
``q`` in every group) from the Reshape rules, and keeps it: a different in-group order per group
is no permutation of the axes of its ``[N, G, k * H * W]`` tensor (the order of that last axis
would depend on the group), so no Reshape can carry it. Where a fused GroupNorm's channels meet
such a space, the solver ties every ``q_g`` into that one ``q``.

:func:`group_channels` is shared with ONNX Runtime's fused ``GroupNorm`` / ``SkipGroupNorm``
(:mod:`onnxlady._rules.contrib_unet`).
"""

from __future__ import annotations

from onnxlady._graph._expr import Expr, Grouped, grouped
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register
from onnxlady._rules.normalization import BatchNormRule


def group_channels(ctx: RuleContext, channels: Expr, groups: int) -> Expr:
    """Restrict ``channels`` to whole-group moves, each group in its own order; returns the groups' permutation.

    Args:
        ctx: The normalisation node's rule context.
        channels: The permutation of the channel axis (``C`` entries).
        groups: The number of groups ``G`` (a divisor of ``C``).

    Returns:
        ``p``, the permutation of the ``G`` groups, after unifying ``channels`` with ``p (x) {q_g}``.

    Raises:
        RuleDoesNotApply: ``groups`` is not a positive divisor of the channel count.
    """
    size = channels.size
    if groups < 1 or size % groups:
        raise RuleDoesNotApply("index-map", f"{size} channels do not split into {groups} groups")
    outer = ctx.new_group(groups)
    # One in-group order per group (atoms made in group order: the analysis numbers them so).
    inners: list[Expr] = [ctx.new_group(size // groups) for _ in range(groups)]
    ctx.unify(channels, grouped(outer, inners))
    return outer


@register
class GroupNormalizationRule(OpRule):
    """GroupNormalization: whole groups of channels move, with their scale and bias."""

    op_types = ("GroupNormalization",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        for axis, expr in spaces.items():
            if axis != 1:
                ctx.emit(0, axis, expr)  # batch and spatial axes: the statistics ignore their order
        if 1 not in spaces:
            return  # channels not permuted: parameters stay
        channels = spaces[1]
        groups = int(ctx.attr("num_groups", 0))
        outer = group_channels(ctx, channels, groups)
        # Opset 18 (deprecated in 21) stores one scale and bias per group, opset 21 one per channel.
        per_group = ctx.opset < 21
        expr = outer if per_group else channels
        for slot, what in ((1, "scale"), (2, "bias")):
            shape = ctx.shape_in(slot) or ctx.graph.constant_shape(ctx.input(slot))
            if shape is None or tuple(shape) != (expr.size,):
                layout = "group" if per_group else "channel"
                raise RuleDoesNotApply(
                    "index-map", f"{what} '{ctx.input(slot)}' is not one value per {layout} ({expr.size}) at opset {ctx.opset}"
                )
            ctx.attach(slot, 0, expr, f"GroupNormalization {what}")
        ctx.emit(0, 1, channels)


@register
class InstanceNormalizationRule(OpRule):
    """InstanceNormalization: the parameters follow axis 1; inside the middle of a decomposed GroupNorm, per-group orders.

    A legacy GroupNorm reshapes ``[N, C, H, W]`` to ``[N, G, k * H * W]`` and normalises each
    row of the last axis: any order of a row's elements, chosen per row, keeps the statistics.
    The Reshape before it hands over axes 1 and 2 as one joint space ``p (x) {q_g (x) I}``
    (:mod:`onnxlady._rules.layout`); it passes through whole, ``scale`` and ``B`` following ``p``,
    and the Reshape after it gives the channels ``p (x) {q_g}`` back. Any other joint space is
    read digit by digit, as every rule that reads none does.
    """

    op_types = ("InstanceNormalization",)
    joint_aware = True

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        for space in ctx.take_joint(0):
            expr = ctx.solver.resolve(space.expr)
            if isinstance(expr, Grouped) and space.axes == (1, 2) and expr.outer.size == space.sizes[0] and ctx.rank_in(0) == 3:
                for slot in range(1, min(3, ctx.num_inputs)):
                    ctx.attach(slot, 0, expr.outer, f"InstanceNormalization parameter {slot}")
                ctx.emit_joint(0, space)  # each row normalised over itself: its own order stays
            else:
                spaces.update(ctx.materialize(space))
        BatchNormRule.channels(ctx, spaces)
