"""ONNX Runtime's quantized activations (``com.microsoft`` QLinear operators, QOperator format).

``quantize_static(..., quant_format=QuantFormat.QOperator)`` keeps the activations between
``QLinearConv`` / ``QLinearMatMul`` layers in integers and writes each float operator as its
``com.microsoft`` QLinear form: ``QLinearAdd``/``QLinearMul`` (A, A_scale, A_zp, B, B_scale,
B_zp, C_scale, C_zp), ``QLinearSigmoid``/``QLinearLeakyRelu``/``QLinearSoftmax`` (X, X_scale,
X_zp, Y_scale, Y_zp), ``QLinearConcat`` (Y_scale, Y_zp, then X, X_scale, X_zp per operand),
``QLinearGlobalAveragePool``, and ``QGemm`` for a Gemm. Each computes its float operator on
the dequantized inputs and quantizes the result. With per-tensor scales and zero points (all
the quantizer writes for activations) a permutation of any axis commutes with the
(de)quantization, so each has exactly the float operator's permutation semantics: the float
operator's rule runs on the data inputs at their own slots. A per-axis activation scale would
tie values to positions: the rule then does not apply (frozen, with the reason).

``QGemm(A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp)``: Gemm on integers; B's scale and
zero point, per output column, follow the outputs, and so does the int32 bias C.
"""

from __future__ import annotations

from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register
from onnxlady._rules._slots import data_slots, per_tensor
from onnxlady._rules.elementwise import BroadcastRule, UnaryRule
from onnxlady._rules.pooling import PoolRule
from onnxlady._rules.quantized import SCALE, ZERO, _vector
from onnxlady._rules.structural import ConcatRule

MICROSOFT = "com.microsoft"


@register
class QLinearBinaryRule(OpRule):
    """QLinearAdd / QLinearMul: Add / Mul (broadcasting) on A (slot 0) and B (slot 3)."""

    op_types = ("QLinearAdd", "QLinearMul")
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        per_tensor(ctx, [1, 2, 4, 5, 6, 7])
        BroadcastRule().propagate(data_slots(ctx, [0, 3]))


@register
class QLinearUnaryRule(OpRule):
    """QLinearSigmoid / QLinearLeakyRelu / QLinearSoftmax: element-wise (Softmax along its axis)."""

    op_types = ("QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax")
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        per_tensor(ctx, [1, 2, 3, 4])
        UnaryRule().propagate(data_slots(ctx, [0]))


@register
class QLinearConcatRule(OpRule):
    """QLinearConcat(Y_scale, Y_zp, X0, X0_scale, X0_zp, ...): Concat of the X's."""

    op_types = ("QLinearConcat",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        if (ctx.num_inputs - 2) % 3 or ctx.num_inputs < 5:
            raise RuleDoesNotApply("index-map", f"QLinearConcat with {ctx.num_inputs} inputs is not (Y_scale, Y_zp, triples)")
        data = list(range(2, ctx.num_inputs, 3))
        per_tensor(ctx, [0, 1, *(slot + k for slot in data for k in (1, 2))])
        ConcatRule().propagate(data_slots(ctx, data))


@register
class QLinearGlobalAveragePoolRule(OpRule):
    """QLinearGlobalAveragePool(X, x_scale, x_zp, y_scale, y_zp): GlobalAveragePool (channels first)."""

    op_types = ("QLinearGlobalAveragePool",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        if int(ctx.attr("channels_last", 0)):
            raise RuleDoesNotApply("index-map", "channels_last pooling: the channels are not axis 1")
        per_tensor(ctx, [1, 2, 3, 4])
        PoolRule().propagate(data_slots(ctx, [0]))


@register
class QGemmRule(OpRule):
    """QGemm: Gemm on integers, B constant; b's per-column scale and zero point and C follow the outputs."""

    op_types = ("QGemm",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        if ctx.is_const(0) or not ctx.is_const(3):
            raise RuleDoesNotApply("blocking", "QGemm needs a computed A and a constant B to have a rule")
        trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
        weight_shape = ctx.const_shape(3)
        if len(weight_shape) != 2:
            raise RuleDoesNotApply("index-map", f"QGemm weight of shape {list(weight_shape)}")
        per_tensor(ctx, [1, 2, 7, 8])
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        features = ctx.take(0, 0 if trans_a else 1, weight_shape[k_axis])
        ctx.bind(3, k_axis, features, "gemm weight (input features)")
        outputs = ctx.new_group(weight_shape[n_axis])
        ctx.bind(3, n_axis, outputs, "gemm weight")
        _vector(ctx, 4, outputs, f"gemm weight: {SCALE}")
        _vector(ctx, 5, outputs, f"gemm weight: {ZERO}")
        if ctx.input(6):
            bias_shape = ctx.shape_in(6) or ctx.graph.constant_shape(ctx.input(6)) or ()
            if len(bias_shape) >= 1 and bias_shape[-1] == outputs.size:
                ctx.attach(6, len(bias_shape) - 1, outputs, "gemm bias")
        ctx.declare_producer(outputs)
        ctx.emit(0, 1, outputs)
