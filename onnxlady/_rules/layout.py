"""Operators that move, merge or split axes: the channel space follows, with an index map."""

from __future__ import annotations

import math

from onnxlady._expr import Expr, product
from onnxlady._graph import Shape
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register


def _axes(ctx: RuleContext, slot: int, rank: int) -> list[int] | None:
    """The ``axes`` of Squeeze/Unsqueeze/Reduce*: an attribute in old opsets, an input in new ones."""
    value = ctx.attr("axes")
    if value is None and ctx.input(slot):
        constant = ctx.const(slot)
        if constant is None:
            raise RuleDoesNotApply("not-constant", "axes are computed")
        value = constant.reshape(-1).tolist()
    if value is None:
        return None
    return sorted(int(a) % rank for a in value)


@register
class TransposeRule(OpRule):
    """Transpose: output axis j is input axis perm[j]."""

    op_types = ("Transpose",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        perm = ctx.attr("perm")
        if perm is None:
            perm = list(reversed(range(ctx.rank_in(0))))
        for axis, expr in spaces.items():
            ctx.emit(0, list(perm).index(axis), expr)


@register
class SqueezeRule(OpRule):
    """Squeeze removes size-1 axes; the others shift down."""

    op_types = ("Squeeze",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        rank = ctx.rank_in(0)
        removed = _axes(ctx, 1, rank)
        if removed is None:
            shape = ctx.shape_in(0) or ()
            if any(not isinstance(d, int) for d in shape):
                raise RuleDoesNotApply("unknown-shape", "Squeeze without axes on a shape with unknown dims")
            removed = [a for a, d in enumerate(shape) if d == 1]
        for axis, expr in spaces.items():
            if axis not in removed:
                ctx.emit(0, axis - sum(1 for r in removed if r < axis), expr)


@register
class UnsqueezeRule(OpRule):
    """Unsqueeze inserts size-1 axes; the others shift up."""

    op_types = ("Unsqueeze",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        out_rank = ctx.rank_in(0) + len(ctx.attr("axes") or (ctx.const(1).reshape(-1) if ctx.input(1) else []))
        inserted = _axes(ctx, 1, out_rank) or []
        kept = [a for a in range(out_rank) if a not in inserted]
        for axis, expr in spaces.items():
            ctx.emit(0, kept[axis], expr)


@register
class FlattenRule(OpRule):
    """Flatten(axis=k): the permuted axis becomes a digit of a merged axis (p (x) I_S, ...)."""

    op_types = ("Flatten",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        shape = ctx.shape_in(0)
        if shape is None:
            raise RuleDoesNotApply("unknown-shape", "input shape unknown")
        split = int(ctx.attr("axis", 1))
        split = split + len(shape) if split < 0 else split
        for axis, expr in spaces.items():
            block = range(0, split) if axis < split else range(split, len(shape))
            ctx.emit(0, 0 if axis < split else 1, _merged(ctx, expr, shape, list(block), axis))


def _merged(ctx: RuleContext, expr: Expr, shape: Shape, block: list[int], axis: int) -> Expr:
    """The expression of ``axis`` after the axes in ``block`` are merged (row-major)."""
    before = [shape[a] for a in block if a < axis]
    after = [shape[a] for a in block if a > axis]
    if not all(isinstance(d, int) for d in before + after):
        raise RuleDoesNotApply("unknown-shape", f"axes merged with permuted axis {axis} have unknown sizes")
    outer, inner = math.prod(before), math.prod(after)  # type: ignore[arg-type]
    merged = product(ctx.fixed(outer, "positions merged in front of the channels"), expr)
    return product(merged, ctx.fixed(inner, "positions merged behind the channels"))


@register
class ReshapeRule(OpRule):
    """Reshape: keep, merge or split the permuted axis, found by matching row-major blocks."""

    op_types = ("Reshape",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        in_shape = ctx.shape_in(0)
        out_shape = ctx.shape_out(0)
        if in_shape is None or out_shape is None:
            raise RuleDoesNotApply("unknown-shape", "input or output shape unknown")
        for axis, expr in spaces.items():
            self._carry(ctx, in_shape, out_shape, axis, expr)

    @staticmethod
    def _carry(ctx: RuleContext, in_shape: Shape, out_shape: Shape, axis: int, expr: Expr) -> None:
        rank_in, rank_out = len(in_shape), len(out_shape)
        # Everything up to and including the axis unchanged: row-major keeps its index.
        if rank_out > axis and all(_same(in_shape[i], out_shape[i]) for i in range(axis + 1)):
            ctx.emit(0, axis, expr)
            return
        # Everything from the axis on unchanged: same, counted from the end.
        tail = rank_in - axis
        if rank_out >= tail and all(_same(in_shape[axis + i], out_shape[rank_out - tail + i]) for i in range(tail)):
            ctx.emit(0, rank_out - tail, expr)
            return
        lead = 0
        while lead < min(axis, rank_out) and _same(in_shape[lead], out_shape[lead]):
            lead += 1
        trail = 0
        while trail < min(rank_in - axis - 1, rank_out - lead) and _same(in_shape[-1 - trail], out_shape[-1 - trail]):
            trail += 1
        first_in, first_out = lead, lead
        # Unknown leading dims (a dynamic batch) on both sides hold the same number of elements
        # when everything after them is known and agrees: they pair up as one block.
        while first_in < axis and not isinstance(in_shape[first_in], int):
            first_in += 1
        while first_out < rank_out - trail and not isinstance(out_shape[first_out], int):
            first_out += 1
        if (first_in > lead) != (first_out > lead):
            raise RuleDoesNotApply("unknown-shape", f"reshaped axes around permuted axis {axis} have unknown sizes")
        middle_in = list(range(first_in, rank_in - trail))
        middle_out = list(range(first_out, rank_out - trail))
        dims_in = [in_shape[a] for a in middle_in]
        dims_out = [out_shape[a] for a in middle_out]
        if not all(isinstance(d, int) for d in dims_in + dims_out):
            raise RuleDoesNotApply("unknown-shape", f"reshaped axes around permuted axis {axis} have unknown sizes")
        digits = _common_digits([int(d) for d in dims_in], [int(d) for d in dims_out])  # type: ignore[arg-type]
        if digits is None:
            ctx.freeze(expr, "index-map", "Reshape regroups the permuted axis in a way with no index map")
            return
        digits_in, digits_out = digits
        mine = [k for k, owner in enumerate(digits_in) if middle_in[owner[0]] == axis]
        targets = {middle_out[digits_out[k][0]] for k in mine}
        if len(mine) == 1:
            (k,) = mine
            ctx.emit(0, middle_out[digits_out[k][0]], _in_place(ctx, expr, digits_out, k))
            return
        # The axis is split across new axes: its permutation must be a product, one digit each.
        pieces = [ctx.new_group(digits_out[k][1]) for k in mine]
        split: Expr = pieces[-1]
        for piece in reversed(pieces[:-1]):
            split = product(piece, split)
        ctx.unify(expr, split)
        if len(targets) != len(mine):
            ctx.freeze(expr, "index-map", "Reshape merges parts of the permuted axis with each other")
            return
        for k, piece in zip(mine, pieces):
            ctx.emit(0, middle_out[digits_out[k][0]], _in_place(ctx, piece, digits_out, k))


def _in_place(ctx: RuleContext, expr: Expr, digits: list[tuple[int, int]], k: int) -> Expr:
    """``expr`` as digit ``k`` of its axis: identity on the axis's other digits."""
    axis = digits[k][0]
    before = math.prod(size for owner, size in digits[:k] if owner == axis)
    after = math.prod(size for owner, size in digits[k + 1 :] if owner == axis)
    placed = product(ctx.fixed(before, "positions merged in front of the channels"), expr)
    return product(placed, ctx.fixed(after, "positions merged behind the channels"))


def _common_digits(
    dims_in: list[int], dims_out: list[int]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
    """Split both shapes into a common sequence of digits (mixed radix), or None.

    Returns, for each digit, (owning axis position, size) on the input side and the output
    side; digit k is the same elements on both sides. Size-1 axes own no digit.
    """
    queue_in = [(i, d) for i, d in enumerate(dims_in) if d != 1]
    queue_out = [(j, d) for j, d in enumerate(dims_out) if d != 1]
    digits_in: list[tuple[int, int]] = []
    digits_out: list[tuple[int, int]] = []
    while queue_in and queue_out:
        (i, a), (j, b) = queue_in[0], queue_out[0]
        if a == b:
            digits_in.append((i, a))
            digits_out.append((j, b))
            queue_in.pop(0)
            queue_out.pop(0)
        elif a % b == 0:
            digits_in.append((i, b))
            digits_out.append((j, b))
            queue_in[0] = (i, a // b)
            queue_out.pop(0)
        elif b % a == 0:
            digits_in.append((i, a))
            digits_out.append((j, a))
            queue_out[0] = (j, b // a)
            queue_in.pop(0)
        else:
            return None
    if queue_in or queue_out:
        return None
    return digits_in, digits_out


def _same(a: int | str | None, b: int | str | None) -> bool:
    return a is not None and a == b


@register
class ExpandRule(OpRule):
    """Expand broadcasts size-1 axes; a permuted axis (full size) keeps its place from the right."""

    op_types = ("Expand",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if ctx.tracked(1):
            raise RuleDoesNotApply("blocking", "the shape input carries channels")
        if not spaces:
            return
        shift = ctx.rank_out(0) - ctx.rank_in(0)
        for axis, expr in spaces.items():
            ctx.emit(0, axis + shift, expr)


@register
class TileRule(OpRule):
    """Tile: repeating a permuted axis k times gives I_k (x) p."""

    op_types = ("Tile",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        repeats = ctx.require_const(1, "repeats").reshape(-1)
        for axis, expr in spaces.items():
            copies = int(repeats[axis])
            ctx.emit(0, axis, product(ctx.fixed(copies, "order of tiled copies"), expr))
