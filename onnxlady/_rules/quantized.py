"""Quantized operators: QDQ pairs on activations, and the integer producers.

Quantized *weights* need no rule of their own: ``DequantizeLinear`` (and ``Mul`` by a scale) is a
chain operator (``_graph.CHAIN_OPS``), so Conv/Gemm/MatMul see the int8 weight through it and
their binding carries its per-axis scale and zero point along (``_context``: companions).

The rules here are for the other uses:

- ``QuantizeLinear`` / ``DequantizeLinear`` on a computed tensor (QDQ activations) are element-wise.
  A per-tensor scale leaves every channel space alone; a per-axis scale along a permuted axis is
  bound to that axis (like a broadcasting ``Mul`` by a ``[C]`` constant), zero point too.
  Blocked quantization along a permuted axis freezes (only whole blocks could move).
- ``DynamicQuantizeLinear``: element-wise; its scale and zero point come from the tensor's min
  and max, which no permutation changes.
- ``QLinearConv`` / ``ConvInteger``: ``Conv`` with the inputs at other slots; the weight scale and
  zero point, per output channel, follow the output neurons; the int32 bias too.
- ``QLinearMatMul`` / ``MatMulInteger``: ``MatMul`` with one constant operand; ``b``'s per-column
  and ``a``'s per-row scales and zero points follow the columns and rows they describe. A
  ``QLinearMatMul`` of two computed operands (attention in QOperator form) with per-tensor
  scales is ``MatMul``'s contraction on its data inputs (:mod:`onnxlady._rules._slots`).

Activation scales of the integer operators are per tensor by the standard; a per-axis one along a
permuted axis is bound like the others, anything else freezes.
"""

from __future__ import annotations

import math

from onnxlady._graph._expr import Expr
from onnxlady._graph._model_graph import Shape
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register
from onnxlady._rules._slots import data_slots, per_tensor
from onnxlady._rules.producers import MatMulRule, grouped_conv_outputs


def _int_dims(shape: Shape | None) -> tuple[int, ...] | None:
    """``shape`` when every dimension is a known number, else None."""
    if shape is None:
        return None
    dims = tuple(d for d in shape if isinstance(d, int))
    return dims if len(dims) == len(shape) else None


def _vector(ctx: RuleContext, slot: int, expr: Expr | None, role: str) -> None:
    """A quantization parameter that is per tensor, or one value per entry of ``expr``.

    Per tensor: nothing to do. One per entry (a 1-D tensor of ``expr.size``): attach along it
    (``expr`` None means that space carries no permutation, so nothing moves). Anything else is
    a layout this rule does not know: freeze.
    """
    name = ctx.input(slot)
    if not name:
        return
    inferred = ctx.shape_in(slot)
    shape = _int_dims(inferred if inferred is not None else ctx.graph.constant_shape(name))
    if shape is None:
        raise RuleDoesNotApply("unknown-shape", f"the shape of {role} '{name}' is unknown")
    if math.prod(shape) <= 1:
        return  # per tensor
    if expr is None:
        return
    if len(shape) == 1 and shape[0] == expr.size:
        ctx.attach(slot, 0, expr, role)
        return
    raise RuleDoesNotApply(
        "index-map", f"{role} '{name}' has shape {list(shape)}: neither per tensor nor one per channel ({expr.size})"
    )


@register
class QuantizeLinearRule(OpRule):
    """QuantizeLinear / DequantizeLinear of a computed tensor: element-wise, per-axis scales follow."""

    op_types = ("QuantizeLinear", "DequantizeLinear")

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return  # a quantized constant: a chain node, its users bind through it
        rank = ctx.rank_in(0)
        inferred = ctx.shape_in(1)
        scale_shape = _int_dims(inferred if inferred is not None else ctx.graph.constant_shape(ctx.input(1)))
        if scale_shape is None:
            raise RuleDoesNotApply("unknown-shape", f"the shape of scale '{ctx.input(1)}' is unknown")
        per_tensor = math.prod(scale_shape) <= 1 and len(scale_shape) <= 1
        axis = int(ctx.attr("axis", 1))
        axis += rank if axis < 0 else 0
        block = int(ctx.attr("block_size", 0) or 0)
        what = "quantize" if ctx.op_type == "QuantizeLinear" else "dequantize"
        for space, expr in spaces.items():
            if not per_tensor:
                if block:
                    if space == axis:
                        raise RuleDoesNotApply("index-map", f"axis {axis} is quantized in blocks of {block}")
                    if len(scale_shape) == rank and scale_shape[space] != 1:
                        ctx.attach(1, space, expr, f"{what} scale")
                        ctx.attach(2, space, expr, f"{what} zero point")
                elif space == axis:
                    ctx.attach(1, 0, expr, f"{what} scale")
                    ctx.attach(2, 0, expr, f"{what} zero point")
            ctx.emit(0, space, expr)


@register
class DynamicQuantizeLinearRule(OpRule):
    """DynamicQuantizeLinear: ``y`` element-wise; scale and zero point are permutation-invariant."""

    op_types = ("DynamicQuantizeLinear",)

    def propagate(self, ctx: RuleContext) -> None:
        for axis, expr in ctx.take_all(0).items():
            ctx.emit(0, axis, expr)


SCALE, ZERO = "quantization scale", "quantization zero point"
#: (input slot, what it holds) of a quantization parameter.
Params = tuple[tuple[int, str], ...]


def _integer_conv(ctx: RuleContext, x: int, w: int, bias: int | None, w_params: Params,
                  x_params: Params, y_params: Params) -> None:
    """``ConvRule`` for a convolution whose inputs sit at the given slots."""
    weight_shape = ctx.const_shape(w)
    if len(weight_shape) < 2:
        raise RuleDoesNotApply("index-map", f"conv weight of shape {list(weight_shape)}")
    groups = int(ctx.attr("group", 1))
    out_channels, in_per_group = weight_shape[0], weight_shape[1]
    if out_channels % groups:
        raise RuleDoesNotApply("index-map", f"{out_channels} outputs do not split into {groups} groups")
    channels = ctx.take(x, 1, in_per_group * groups)
    outputs = grouped_conv_outputs(
        ctx, channels, groups, out_channels, in_per_group, lambda expr: ctx.bind(w, 1, expr, "conv weight (input channels)")
    )
    ctx.bind(w, 0, outputs, "conv weight")
    for slot, kind in w_params:
        _vector(ctx, slot, outputs, f"conv weight: {kind}")
    for slot, kind in x_params:
        _vector(ctx, slot, channels, f"conv input: {kind}")
    for slot, kind in y_params:
        _vector(ctx, slot, outputs, f"conv output: {kind}")
    if bias is not None:
        ctx.attach(bias, 0, outputs, "conv bias")
    ctx.declare_producer(outputs)
    ctx.emit(0, 1, outputs)


@register
class QLinearConvRule(OpRule):
    """QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B): Conv on integers."""

    op_types = ("QLinearConv",)

    def propagate(self, ctx: RuleContext) -> None:
        _integer_conv(ctx, x=0, w=3, bias=8, w_params=((4, SCALE), (5, ZERO)),
                      x_params=((1, SCALE), (2, ZERO)), y_params=((6, SCALE), (7, ZERO)))


@register
class ConvIntegerRule(OpRule):
    """ConvInteger(x, w, x_zp, w_zp): Conv to int32 accumulators, w_zp per output channel."""

    op_types = ("ConvInteger",)

    def propagate(self, ctx: RuleContext) -> None:
        _integer_conv(ctx, x=0, w=1, bias=None, w_params=((3, ZERO),), x_params=((2, ZERO),), y_params=())


def _integer_matmul(ctx: RuleContext, a: int, b: int, a_params: Params, b_params: Params, y_params: Params) -> None:
    """``MatMulRule`` for one constant 2-D operand, with per-row (a) / per-column (b) parameters."""
    a_const, b_const = ctx.is_const(a), ctx.is_const(b)
    if a_const == b_const:
        raise RuleDoesNotApply("blocking", f"{ctx.op_type} needs exactly one constant operand to have a rule")
    weight, data = (b, a) if b_const else (a, b)
    weight_shape = ctx.const_shape(weight)
    if len(weight_shape) != 2:
        raise RuleDoesNotApply("index-map", f"batched {ctx.op_type} weight of shape {list(weight_shape)}")
    rank = ctx.rank_in(data)
    if rank < 2:
        raise RuleDoesNotApply("index-map", f"{ctx.op_type} of a vector")
    spaces = ctx.take_all(data)
    row_expr: Expr | None
    col_expr: Expr | None
    if b_const:
        # Y[..., M, N] = A[..., M, K] @ B[K, N]: B's columns are new neurons.
        contracted, kept = rank - 1, rank - 2
        features = ctx.take(data, contracted, weight_shape[0])
        ctx.bind(weight, 0, features, "matmul weight (input features)")
        outputs = ctx.new_group(weight_shape[1])
        ctx.bind(weight, 1, outputs, "matmul weight")
        row_expr, col_expr = spaces.get(kept), outputs
    else:
        # Y[..., M, N] = A[M, K] @ B[..., K, N]: A's rows are new neurons.
        contracted, kept = rank - 2, rank - 1
        features = ctx.take(data, contracted, weight_shape[1])
        ctx.bind(weight, 1, features, "matmul weight (input features)")
        outputs = ctx.new_group(weight_shape[0])
        ctx.bind(weight, 0, outputs, "matmul weight")
        row_expr, col_expr = outputs, spaces.get(kept)
    weight_params, data_params = (b_params, a_params) if b_const else (a_params, b_params)
    for slot, kind in weight_params:
        _vector(ctx, slot, outputs, f"matmul weight: {kind}")  # b per column, a per row
    data_expr = row_expr if b_const else col_expr
    for slot, kind in data_params:
        _vector(ctx, slot, data_expr, f"matmul input: {kind}")
    for slot, kind in y_params:
        _vector(ctx, slot, row_expr, f"matmul output: {kind}")  # per row of y
    for axis, expr in spaces.items():
        if axis != contracted:
            ctx.emit(0, axis, expr)  # batch axes and the computed operand's own rows/columns
    ctx.declare_producer(outputs)
    ctx.emit(0, rank - 1 if b_const else rank - 2, outputs)


@register
class QLinearMatMulRule(OpRule):
    """QLinearMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp) with one constant operand."""

    op_types = ("QLinearMatMul",)

    def propagate(self, ctx: RuleContext) -> None:
        if not ctx.is_const(0) and not ctx.is_const(3):
            # Two computed operands (attention's Q @ K^T, probabilities @ V in QOperator form):
            # with per-tensor scales, MatMul's contraction on the data inputs.
            per_tensor(ctx, [1, 2, 4, 5, 6, 7])
            MatMulRule._contraction(data_slots(ctx, [0, 3]))
            return
        _integer_matmul(ctx, a=0, b=3, a_params=((1, SCALE), (2, ZERO)), b_params=((4, SCALE), (5, ZERO)),
                        y_params=((6, SCALE), (7, ZERO)))


@register
class MatMulIntegerRule(OpRule):
    """MatMulInteger(A, B, a_zp, b_zp) with one constant operand; int32 output."""

    op_types = ("MatMulInteger",)

    def propagate(self, ctx: RuleContext) -> None:
        _integer_matmul(ctx, a=0, b=1, a_params=((2, ZERO),), b_params=((3, ZERO),), y_params=())
