"""ONNX Runtime's dynamically quantized LSTM (``com.microsoft::DynamicQuantizeLSTM``).

``onnxruntime.quantization.quantize_dynamic`` writes every ``LSTM`` whose W and R are constants
as ``DynamicQuantizeLSTM``: the float LSTM's inputs at their own slots (X, W, R, B,
sequence_lens, initial_h, initial_c, P), then ``W_scale``, ``W_zero_point``, ``R_scale`` and
``R_zero_point`` (slots 8 to 11). W and R are 8-bit and *transposed* against the LSTM's layout:
W is ``[dirs, input_size, 4*H]`` and R ``[dirs, H, 4*H]`` (gate blocks i, o, f, c along the
last axis); the kernel multiplies the (dynamically quantized) input by them, so the gates'
columns are the LSTM's rows. B ``[dirs, 8*H]``, P ``[dirs, 3*H]`` and the initial states are
the float LSTM's. The operator has no ``layout`` attribute: X is always ``[seq, batch, input]``
and the outputs ``Y`` ``[seq, dirs, batch, H]``, ``Y_h`` and ``Y_c`` ``[dirs, batch, H]``.

So the hidden units are the float LSTM's one permutation ``p`` (see :mod:`recurrent`): W's and
R's last axis take ``I_4 (x) p``, R's axis 1 (the previous hidden state it reads) ``p``, W's
axis 1 the input's features. A scale or zero point is per tensor (``[dirs]``: one per
direction, which no permutation touches) or per output channel (``[dirs, 4*H]``: one per gate
column, which moves with its column, ``I_4 (x) p``). Dequantization is element-wise in the
weight, so permuting the integers and their per-channel parameters together is exact: the
permuted model computes bit for bit what the original computes, in permuted order. Both
directions share one ``p``, as in the float rule.
"""

from __future__ import annotations

from onnxlady._graph._expr import product
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register
from onnxlady._rules.quantized import SCALE, ZERO
from onnxlady._rules.recurrent import _attach_state

MICROSOFT = "com.microsoft"
#: Input slots: the float LSTM's, then W's and R's quantization parameters.
_B, _INITIAL_H, _INITIAL_C, _P = 3, 5, 6, 7
_W_SCALE, _W_ZERO, _R_SCALE, _R_ZERO = 8, 9, 10, 11
_GATES = 4  # i, o, f, c


@register
class DynamicQuantizeLSTMRule(OpRule):
    """DynamicQuantizeLSTM: the LSTM's hidden units on W's and R's transposed gate axis, with their scales."""

    op_types = ("DynamicQuantizeLSTM",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        w_shape, r_shape = ctx.const_shape(1), ctx.const_shape(2)
        directions = 2 if ctx.attr("direction", b"forward") in (b"bidirectional", "bidirectional") else 1
        if len(w_shape) != 3 or len(r_shape) != 3:
            raise RuleDoesNotApply("index-map", f"W {list(w_shape)} and R {list(r_shape)} are not 3-D")
        hidden = int(ctx.attr("hidden_size", r_shape[1]))
        expected_r = (directions, hidden, _GATES * hidden)
        if (w_shape[0], w_shape[2]) != (directions, _GATES * hidden) or tuple(r_shape) != expected_r:
            raise RuleDoesNotApply(
                "index-map",
                f"W {list(w_shape)} and R {list(r_shape)} are not [{directions}, input, {_GATES * hidden}] and "
                f"[{directions}, {hidden}, {_GATES * hidden}] ({directions} direction(s) of 4 gate blocks of {hidden} units)",
            )
        if ctx.rank_in(0) != 3:
            raise RuleDoesNotApply("index-map", f"input '{ctx.input(0)}' is not [seq, batch, features]")
        what = "DynamicQuantizeLSTM"
        # Check the quantization parameters' layouts before binding anything: a layout this
        # rule does not know declines the node as a whole.
        layouts = {
            slot: _layout(ctx, slot, directions, _GATES * hidden) for slot in (_W_SCALE, _W_ZERO, _R_SCALE, _R_ZERO)
        }
        features = ctx.take(0, 2, w_shape[1])
        ctx.bind(1, 1, features, f"{what} input weight (input features)")
        units = ctx.new_group(hidden)
        columns = product(ctx.fixed(_GATES, "order of the gate blocks"), units)
        ctx.bind(1, 2, columns, f"{what} input weight")
        ctx.bind(2, 2, columns, f"{what} recurrence weight")
        ctx.bind(2, 1, units, f"{what} recurrence weight (hidden units read)")
        for slot, role in (
            (_W_SCALE, f"{what} input weight: {SCALE}"),
            (_W_ZERO, f"{what} input weight: {ZERO}"),
            (_R_SCALE, f"{what} recurrence weight: {SCALE}"),
            (_R_ZERO, f"{what} recurrence weight: {ZERO}"),
        ):
            if layouts[slot]:
                ctx.attach(slot, 1, columns, role)
        if ctx.input(_B):
            # B is [Wb; Rb]: 8 blocks of H, as in the float LSTM.
            ctx.attach(_B, 1, product(ctx.fixed(2 * _GATES, "order of the bias blocks"), units), f"{what} bias")
        _attach_state(ctx, _INITIAL_H, units, f"{what} initial hidden state")
        _attach_state(ctx, _INITIAL_C, units, f"{what} initial cell state")
        if ctx.input(_P):
            ctx.attach(_P, 1, product(ctx.fixed(3, "order of the peephole blocks"), units), f"{what} peepholes")
        ctx.declare_producer(units)
        ctx.emit(0, 3, units)  # Y: [seq, dirs, batch, H]
        for slot in range(1, ctx.num_outputs):
            ctx.emit(slot, 2, units)  # Y_h, Y_c: [dirs, batch, H]


def _layout(ctx: RuleContext, slot: int, directions: int, columns: int) -> bool:
    """Whether quantization parameter ``slot`` is per output channel (True) or per tensor (False).

    Per tensor is ``[dirs]`` (or a single value); per channel ``[dirs, 4*H]``, as ONNX Runtime's
    kernel reads them. Anything else is a layout this rule does not know: the node freezes.
    """
    name = ctx.input(slot)
    if not name:
        raise RuleDoesNotApply("index-map", f"DynamicQuantizeLSTM input {slot} (a quantization parameter) is missing")
    inferred = ctx.shape_in(slot)
    shape = inferred if inferred is not None else ctx.graph.constant_shape(name)
    dims = tuple(d for d in shape if isinstance(d, int)) if shape is not None else None
    if shape is None or dims is None or len(dims) != len(shape):
        raise RuleDoesNotApply("unknown-shape", f"the shape of quantization parameter '{name}' is unknown")
    if dims in ((), (1,), (directions,)):
        return False
    if dims == (directions, columns):
        return True
    raise RuleDoesNotApply(
        "index-map",
        f"quantization parameter '{name}' has shape {list(dims)}: neither per tensor [{directions}] nor per "
        f"channel [{directions}, {columns}]",
    )
