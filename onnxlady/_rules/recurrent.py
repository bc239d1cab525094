"""Recurrent layers (LSTM, GRU, RNN): their hidden units are one permutation ``p`` of ``hidden_size``.

Every gate of a recurrent cell is element-wise in the hidden units: permuting the units by ``p``
permutes, in every gate block of ``W`` ``[dirs, gates*H, input]``, ``R`` ``[dirs, gates*H, H]``
and ``B`` ``[dirs, 2*gates*H]``, the rows by the same ``p`` (the index map ``I_gates (x) p``), the
columns of ``R`` by ``p`` (the previous hidden state it reads), the peepholes ``P``
``[dirs, 3*H]`` by ``I_3 (x) p``, the initial states along H, and the outputs ``Y``, ``Y_h`` and
``Y_c`` along their last axis (H is last in both layouts). Gate order (LSTM ``iofc``, GRU
``zrh``, RNN a single gate) does not matter: every block takes the same ``p``.
``linear_before_reset``, activations, ``clip`` and ``input_forget`` act unit by unit and change
nothing. ``W``'s columns read the input's feature axis (axis 2 of ``X`` in both layouts).

Both directions of a bidirectional layer share one ``p``. Each direction's units are a
symmetry of their own, but ``W``, ``R``, ``B``, ``P`` and the initial states hold both
directions in one tensor (axis 0 is the direction): a permutation that differs between
directions is a permutation of axes 0 and 1 taken together, and a constant's binding (and the
key) gives each axis of a tensor one index array of its own. One shared ``p`` is exact, with
fewer choices.

An initial state that is computed but the same value for every unit (``ConstantOfShape``, or
folded to a tensor constant along H) needs no permutation; any other computed initial state
must carry ``p`` from its producer, and a graph input freezes ``p`` (the caller feeds it in the
original unit order).
"""

from __future__ import annotations

import numpy as np

from onnxlady._graph._expr import Atom, product
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register

#: Gate blocks per operator: LSTM i, o, f, c; GRU z, r, h; RNN one.
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
#: Input slots (all operators): X, W, R, B, sequence_lens, initial_h; LSTM adds initial_c, P.
_B, _INITIAL_H, _INITIAL_C, _P = 3, 5, 6, 7


@register
class RecurrentRule(OpRule):
    """LSTM, GRU and RNN: one new group of ``hidden_size`` units, shared by both directions."""

    op_types = tuple(_GATES)

    def propagate(self, ctx: RuleContext) -> None:
        gates = _GATES[ctx.op_type]
        w_shape, r_shape = ctx.const_shape(1), ctx.const_shape(2)
        directions = 2 if ctx.attr("direction", b"forward") in (b"bidirectional", "bidirectional") else 1
        if len(w_shape) != 3 or len(r_shape) != 3:
            raise RuleDoesNotApply("index-map", f"W {list(w_shape)} and R {list(r_shape)} are not 3-D")
        hidden = int(ctx.attr("hidden_size", r_shape[2]))
        if w_shape[:2] != (directions, gates * hidden) or tuple(r_shape) != (directions, gates * hidden, hidden):
            raise RuleDoesNotApply(
                "index-map",
                f"W {list(w_shape)} and R {list(r_shape)} do not hold {directions} direction(s) of "
                f"{gates} gate block(s) of {hidden} units",
            )
        if ctx.rank_in(0) != 3:
            raise RuleDoesNotApply("index-map", f"input '{ctx.input(0)}' is not [seq, batch, features]")
        what = ctx.op_type
        features = ctx.take(0, 2, w_shape[2])
        ctx.bind(1, 2, features, f"{what} input weight (input features)")
        units = ctx.new_group(hidden)
        rows = product(ctx.fixed(gates, "order of the gate blocks"), units)
        ctx.bind(1, 1, rows, f"{what} input weight")
        ctx.bind(2, 1, rows, f"{what} recurrence weight")
        ctx.bind(2, 2, units, f"{what} recurrence weight (hidden units read)")
        if ctx.input(_B):
            # B is [Wb; Rb]: 2 * gates blocks of H.
            ctx.attach(_B, 1, product(ctx.fixed(2 * gates, "order of the bias blocks"), units), f"{what} bias")
        _attach_state(ctx, _INITIAL_H, units, f"{what} initial hidden state")
        if ctx.op_type == "LSTM":
            _attach_state(ctx, _INITIAL_C, units, "LSTM initial cell state")
            if ctx.input(_P):
                ctx.attach(_P, 1, product(ctx.fixed(3, "order of the peephole blocks"), units), "LSTM peepholes")
        ctx.declare_producer(units)
        ctx.emit(0, 3, units)  # Y: [seq, dirs, batch, H] or, with layout=1, [batch, seq, dirs, H]
        for slot in range(1, ctx.num_outputs):
            ctx.emit(slot, 2, units)  # Y_h, Y_c: [dirs, batch, H] or [batch, dirs, H]


def _attach_state(ctx: RuleContext, slot: int, units: Atom, role: str) -> None:
    """An initial state ``[dirs, batch, H]`` (or ``[batch, dirs, H]``) takes ``units`` along H."""
    if not ctx.input(slot):
        return
    if ctx.is_const(slot):
        ctx.bind(slot, 2, units, role)
        return
    if 2 not in ctx.tracked(slot) and _same_for_every_unit(ctx, slot):
        return
    ctx.unify(ctx.take(slot, 2, units.size), units)


def _same_for_every_unit(ctx: RuleContext, slot: int) -> bool:
    """A computed tensor that holds one value along axis 2 whatever the input: nothing to permute."""
    produced = ctx.graph.producer.get(ctx.input(slot))
    if produced is not None:
        node = ctx.graph.nodes[produced[0]]
        if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx"):
            return True
    value = ctx.const(slot)  # a computed tensor that folds to a constant (shape arithmetic)
    return value is not None and value.ndim == 3 and bool(np.all(value == value[:, :, :1]))
