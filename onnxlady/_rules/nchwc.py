"""ONNX Runtime's NCHWc layout (``com.microsoft.nchwc``): read, never permuted.

``ORT_ENABLE_ALL`` on an x86 CPU stores convolution weights in blocks of 8 or 16 channels, each
channel count padded to a whole block with zero channels, and runs the activations between
them in that blocked layout (see :mod:`onnxlady._resync._nchwc_forms`, which reads these
weights as the Conv they came from for resync, audit and match). Permuting such a graph would
have to move whole blocks, keep the padding channels last and re-block every weight; no rule
does that, so every channel space these operators touch is frozen with the reason. A
convolution's output neurons still count as producer neurons, frozen, so ``inspect`` says why.
"""

from __future__ import annotations

from onnxlady._rules._context import RuleContext
from onnxlady._rules._registry import OpRule, register

NCHWC = "com.microsoft.nchwc"
_WHY = (
    "ONNX Runtime's NCHWc layout (ORT_ENABLE_ALL: channels in padded blocks) is not permuted; "
    "permute before optimizing, or save at ORT_ENABLE_EXTENDED"
)


@register
class NchwcConvRule(OpRule):
    """An NCHWc Conv: its outputs are new neurons, frozen; what reaches it is frozen too."""

    op_types = ("Conv",)
    domain = NCHWC

    def propagate(self, ctx: RuleContext) -> None:
        if ctx.num_inputs < 2 or not ctx.is_const(1) or len(ctx.const_shape(1)) < 1:
            ctx.block("nchwc", _WHY)
        for slot in (0, 3):  # the input, and the residual a fused Add brings
            if slot < ctx.num_inputs and ctx.input(slot):
                for expr in ctx.take_all(slot).values():
                    ctx.freeze(expr, "nchwc", _WHY)
        outputs = ctx.new_group(ctx.const_shape(1)[0])
        ctx.freeze(outputs, "nchwc", _WHY)
        ctx.declare_producer(outputs)
        ctx.emit(0, 1, outputs)


@register
class NchwcLayoutRule(OpRule):
    """The other NCHWc operators (reorders, pooling, resizing): they freeze what reaches them."""

    op_types = ("ReorderInput", "ReorderOutput", "MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "Upsample")
    domain = NCHWC

    def propagate(self, ctx: RuleContext) -> None:
        ctx.block("nchwc", _WHY)
