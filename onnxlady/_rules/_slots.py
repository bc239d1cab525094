"""A rule context seen through other input slots, for operators that are a float operator on integers.

ONNX Runtime's quantized operators (``QLinearAdd``, ``QLinearConcat``, ``QLinearMatMul`` of two
computed operands...) hold the float operator's data inputs at other slots, between their
scales and zero points. With every scale and zero point per tensor (:func:`per_tensor`) they
have exactly the float operator's permutation semantics, so its rule runs on the data inputs
(:func:`data_slots`).
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from onnxlady._graph._expr import Expr
from onnxlady._rules._context import RuleContext, RuleDoesNotApply

__all__ = ["data_slots", "per_tensor"]


class _DataSlots:
    """A rule context whose inputs are a QLinear operator's data inputs, in order.

    The float operator's rule sees input ``k`` where the QLinear operator holds it
    (``slots[k]``); outputs, attributes and everything else are the node's own.
    """

    def __init__(self, ctx: RuleContext, slots: list[int]) -> None:
        self._ctx = ctx
        self._slots = slots

    @property
    def num_inputs(self) -> int:
        return len(self._slots)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The data inputs' names, in the float operator's slot order."""
        return tuple(self._ctx.input(slot) for slot in self._slots)

    def _real(self, slot: int) -> int:
        return self._slots[slot] if 0 <= slot < len(self._slots) else len(self._ctx.node.input) + slot

    def input(self, slot: int) -> str:
        return self._ctx.input(self._real(slot))

    def shape_in(self, slot: int) -> Any:
        return self._ctx.shape_in(self._real(slot))

    def rank_in(self, slot: int) -> int:
        return self._ctx.rank_in(self._real(slot))

    def is_const(self, slot: int) -> bool:
        return self._ctx.is_const(self._real(slot))

    def const(self, slot: int) -> np.ndarray | None:
        return self._ctx.const(self._real(slot))

    def const_shape(self, slot: int) -> tuple[int, ...]:
        return self._ctx.const_shape(self._real(slot))

    def tracked(self, slot: int) -> dict[int, Expr]:
        return self._ctx.tracked(self._real(slot))

    def take(self, slot: int, axis: int, size: int | None = None) -> Expr:
        return self._ctx.take(self._real(slot), axis, size)

    def take_all(self, slot: int) -> dict[int, Expr]:
        return self._ctx.take_all(self._real(slot))

    def bind(self, slot: int, axis: int, expr: Expr, role: str) -> None:
        self._ctx.bind(self._real(slot), axis, expr, role)

    def attach(self, slot: int, axis: int, expr: Expr, role: str) -> None:
        self._ctx.attach(self._real(slot), axis, expr, role)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def per_tensor(ctx: RuleContext, slots: list[int]) -> None:
    """Every activation scale and zero point at ``slots`` must be one number (or absent).

    Raises:
        RuleDoesNotApply: one is per axis (it ties values to positions), or its shape is unknown.
    """
    for slot in slots:
        name = ctx.input(slot)
        if not name:
            continue
        shape = ctx.shape_in(slot)
        if shape is None:
            shape = ctx.graph.constant_shape(name)
        dims = [d for d in shape if isinstance(d, int)] if shape is not None else []
        if shape is None or len(dims) != len(shape):
            raise RuleDoesNotApply("unknown-shape", f"the shape of quantization parameter '{name}' is unknown")
        if math.prod(dims) > 1:
            raise RuleDoesNotApply(
                "index-map", f"quantization parameter '{name}' of shape {list(shape)} is not per tensor"
            )


def data_slots(ctx: RuleContext, slots: list[int]) -> RuleContext:
    """``ctx`` with input ``k`` at the node's input ``slots[k]`` (see :class:`_DataSlots`)."""
    return cast(RuleContext, _DataSlots(ctx, slots))
