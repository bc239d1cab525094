"""ONNX Runtime's diffusion operators (``com.microsoft``), as its transformer optimizer writes them for a UNet.

``onnxruntime.transformers.optimizer.optimize_model(..., model_type="unet")`` (the Stable
Diffusion deployment path, CUDA only) rewrites convolutions and group normalisations into a
channels-last form, with ``Transpose`` nodes at the edges. Semantics from ONNX Runtime's
``docs/ContribOperators.md`` and its transformer fusions:

- ``NhwcConv``: ``Conv`` with the channels last, X ``[N, H, W, C]`` -> Y ``[N, H', W', M]``; the
  weight is the Conv weight transposed by ``(0, 2, 3, 1)``, ``[M, kh, kw, C / group]`` (axis 0
  the output neurons, the last axis the input channels), the bias ``[M]``.
- ``GroupNorm``: ``groups`` groups of consecutive channels, each normalised per sample over its
  channels and the spatial positions, then ``gamma`` / ``beta`` per channel and ``activation``
  (0 none, 1 SiLU: element-wise). The channel axis is the last when ``channels_last`` is 1 (the
  default), else axis 1. Only whole groups move (:func:`~onnxlady._rules.normalization_groups.group_channels`).
- ``SkipGroupNorm``: ``GroupNorm(x + skip + bias)`` (channels last); ``skip`` is ``[N, H, W, C]``,
  ``[N, 1, 1, C]`` or ``[N, C]``, ``bias`` ``[C]``; the second output is the sum.
- ``BiasAdd``: ``X + bias + skip``, X and skip ``[N, S, C]``, bias ``[C]``: broadcasting like ``Add``.
- ``BiasSplitGelu``: ``(X + bias)`` ``[N, S, D]`` cut into halves ``L, R`` along D, ``Y = L * Gelu(R)``:
  output channel ``j`` reads input channels ``j`` and ``j + D / 2``, so the input takes ``q (+) q``.

A permutation reaches none of them on a guess: anything else (an unknown ``channels_last``, a
skip of another shape, a weight that is not a constant) makes the rule not apply.
"""

from __future__ import annotations

from onnxlady._graph._expr import Expr, direct_sum
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register
from onnxlady._rules.elementwise import BroadcastRule
from onnxlady._rules.normalization_groups import group_channels
from onnxlady._rules.producers import grouped_conv_outputs

MICROSOFT = "com.microsoft"


@register
class NhwcConvRule(OpRule):
    """NhwcConv: W ``[M, k..., C/g]``; axis 0 makes the output neurons, the last axis reads the input channels.

    The same three cases as :class:`~onnxlady._rules.producers.ConvRule` (plain, depthwise,
    grouped), with the channel axis of the activations and of the weight moved last.
    """

    op_types = ("NhwcConv",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        weight_shape = ctx.const_shape(1)  # (raises: a computed weight is not read)
        rank = ctx.rank_in(0)
        if len(weight_shape) != rank or rank < 3:
            raise RuleDoesNotApply("index-map", f"weight of shape {list(weight_shape)} for a rank-{rank} input")
        groups = int(ctx.attr("group", 1))
        out_channels, in_per_group = weight_shape[0], weight_shape[-1]
        if groups < 1 or out_channels % groups:
            raise RuleDoesNotApply("index-map", f"{out_channels} outputs do not split into {groups} groups")
        channels = ctx.take(0, rank - 1, in_per_group * groups)
        weight_in = len(weight_shape) - 1
        outputs = grouped_conv_outputs(
            ctx, channels, groups, out_channels, in_per_group,
            lambda expr: ctx.bind(1, weight_in, expr, "NhwcConv weight (input channels)"),
        )  # fmt: skip
        ctx.bind(1, 0, outputs, "NhwcConv weight")
        ctx.attach(2, 0, outputs, "NhwcConv bias")
        ctx.declare_producer(outputs)
        ctx.emit(0, rank - 1, outputs)


@register
class GroupNormRule(OpRule):
    """GroupNorm / SkipGroupNorm: whole groups of channels move, with gamma, beta and the skip's bias."""

    op_types = ("GroupNorm", "SkipGroupNorm")
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        rank = ctx.rank_in(0)
        if rank < 3:
            raise RuleDoesNotApply("index-map", f"{ctx.op_type} of a rank-{rank} input")
        channels_last = int(ctx.attr("channels_last", 1))
        if channels_last not in (0, 1) or (ctx.op_type == "SkipGroupNorm" and channels_last != 1):
            raise RuleDoesNotApply("index-map", f"{ctx.op_type} with channels_last={channels_last}")
        channel_axis = rank - 1 if channels_last else 1
        skip = ctx.op_type == "SkipGroupNorm"
        for axis in range(rank):
            expr = self._axis(ctx, rank, axis, skip)
            if expr is None:
                continue
            if axis == channel_axis:
                group_channels(ctx, expr, int(ctx.attr("groups", 0)))
                for slot, what in ((1, "gamma"), (2, "beta"), (4, "bias")):
                    if slot < ctx.num_inputs and ctx.input(slot):
                        shape = ctx.shape_in(slot) or ctx.graph.constant_shape(ctx.input(slot))
                        if shape is None or tuple(shape) != (expr.size,):
                            raise RuleDoesNotApply("index-map", f"{what} '{ctx.input(slot)}' is not one value per channel")
                        ctx.attach(slot, 0, expr, f"{ctx.op_type} {what}")
            ctx.emit(0, axis, expr)  # the statistics ignore the order of the batch and spatial axes
            if skip:
                ctx.emit(1, axis, expr)  # the sum x + skip + bias

    @staticmethod
    def _axis(ctx: RuleContext, rank: int, axis: int, skip: bool) -> Expr | None:
        """The permutation of axis ``axis`` of the input (and of the skip, which must agree), or None."""
        expr = ctx.take(0, axis) if axis in ctx.tracked(0) else None
        if not skip:
            return expr
        shape = ctx.shape_in(3) or ctx.graph.constant_shape(ctx.input(3))
        if shape is None or len(shape) not in (2, rank):
            raise RuleDoesNotApply("index-map", f"skip '{ctx.input(3)}' is not [N, H, W, C], [N, 1, 1, C] or [N, C]")
        # A 2-D skip is [N, C]: its axis 1 is the channel axis, whatever the input's rank.
        skip_axis = axis if len(shape) == rank else {0: 0, rank - 1: 1}.get(axis)
        if skip_axis is None or shape[skip_axis] == 1:
            return expr  # broadcast: the skip does not vary along this axis
        if expr is None:
            if skip_axis not in ctx.tracked(3):
                return None
            expr = ctx.take(3, skip_axis)
            ctx.unify(expr, ctx.take(0, axis, expr.size))  # (an input axis that carries nothing freezes it)
            return expr
        ctx.attach(3, skip_axis, expr, "SkipGroupNorm skip")
        return expr


@register
class BiasAddRule(OpRule):
    """BiasAdd: ``X + bias + skip`` broadcasts like a three-operand ``Add``."""

    op_types = ("BiasAdd",)
    domain = MICROSOFT

    _broadcast = BroadcastRule()

    def propagate(self, ctx: RuleContext) -> None:
        self._broadcast.propagate(ctx)


@register
class BiasSplitGeluRule(OpRule):
    """BiasSplitGelu: output channel ``j`` is ``(X + bias)[j] * Gelu((X + bias)[j + D/2])``.

    The two halves of the input's last axis and of the bias take one permutation ``q`` each,
    the same (``q (+) q``), and the output's last axis takes ``q``; the other axes pass through.
    """

    op_types = ("BiasSplitGelu",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        rank = ctx.rank_in(0)
        last = rank - 1
        for axis, expr in spaces.items():
            if axis != last:
                ctx.emit(0, axis, expr)
        if last not in spaces:
            return
        width = spaces[last].size
        if width % 2:
            raise RuleDoesNotApply("index-map", f"hidden size {width} does not split in halves")
        half = ctx.new_group(width // 2)
        both = direct_sum([half, half])
        ctx.unify(spaces[last], both)
        ctx.attach(1, 0, both, "BiasSplitGelu bias")
        ctx.emit(0, last, half)
