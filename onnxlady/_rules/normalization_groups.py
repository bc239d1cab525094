"""Group normalisation: statistics over groups of channels, so only whole groups may move.

``GroupNormalization`` (ONNX, opset 18 and 21) splits the channel axis (axis 1) into ``G``
consecutive groups of ``k = C / G`` channels and normalises each group of each sample over its
channels and every spatial position. A channel permutation passes through exactly when it maps
each group onto one group: the rule takes the permutations of the form ``p (x) q`` (``p`` moves
whole groups, ``q`` the channels inside them, the same ``q`` in every group), the form a legacy
export's ``Reshape -> InstanceNormalization -> Reshape`` gets from the Reshape rules, so the
fused operator and its decomposition carry the same permutations. The affine parameters follow:
opset 18's ``scale`` / ``bias`` hold one value per *group* (``p``), opset 21's one per *channel*
(``p (x) q``). Batch and spatial axes pass through: the statistics do not depend on their order.

A different in-group order per group (``q_g``) keeps the function too, but is no permutation
of the axes of the decomposition's ``[N, G, k * H * W]`` tensor (the order of its last axis would
depend on the group), so the permutation family here leaves it out: such a copy audits
``modified``, its reason naming the constants and weights that only moved (round 16, F2).

:func:`group_channels` is shared with ONNX Runtime's fused ``GroupNorm`` / ``SkipGroupNorm``
(:mod:`onnxlady._rules.contrib_unet`).
"""

from __future__ import annotations

from onnxlady._graph._expr import Expr, product
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register


def group_channels(ctx: RuleContext, channels: Expr, groups: int) -> Expr:
    """Restrict ``channels`` to whole-group moves; returns the permutation of the groups.

    Args:
        ctx: The normalisation node's rule context.
        channels: The permutation of the channel axis (``C`` entries).
        groups: The number of groups ``G`` (a divisor of ``C``).

    Returns:
        ``p``, the permutation of the ``G`` groups, after unifying ``channels`` with ``p (x) q``.

    Raises:
        RuleDoesNotApply: ``groups`` is not a positive divisor of the channel count.
    """
    size = channels.size
    if groups < 1 or size % groups:
        raise RuleDoesNotApply("index-map", f"{size} channels do not split into {groups} groups")
    outer = ctx.new_group(groups)
    ctx.unify(channels, product(outer, ctx.new_group(size // groups)))
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
