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
        split = int(ctx.attr("axis", 1)) % (len(shape) + 1) if len(shape) else 0
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
        # Strip equal leading and trailing dims (symbolic batch dims match by name).
        lead = 0
        while lead < min(len(in_shape), len(out_shape)) and lead < axis and _same(in_shape[lead], out_shape[lead]):
            lead += 1
        trail = 0
        while (
            trail < min(len(in_shape), len(out_shape)) - lead
            and len(in_shape) - 1 - trail > axis
            and _same(in_shape[-1 - trail], out_shape[-1 - trail])
        ):
            trail += 1
        middle_in = list(range(lead, len(in_shape) - trail))
        middle_out = list(range(lead, len(out_shape) - trail))
        dims_in = [in_shape[a] for a in middle_in]
        dims_out = [out_shape[a] for a in middle_out]
        if not all(isinstance(d, int) for d in dims_in + dims_out):
            raise RuleDoesNotApply("unknown-shape", f"reshaped axes around permuted axis {axis} have unknown sizes")
        blocks = _row_major_blocks(middle_in, [int(d) for d in dims_in], middle_out, [int(d) for d in dims_out])
        if blocks is None:
            ctx.freeze(expr, "index-map", "Reshape changes the number of elements")
            return
        for block_in, block_out in blocks:
            if axis not in block_in:
                continue
            wide_out = [a for a in block_out if out_shape[a] != 1]
            wide_in = [a for a in block_in if in_shape[a] != 1]
            if len(wide_out) == 1:
                ctx.emit(0, wide_out[0], _merged(ctx, expr, in_shape, block_in, axis))
                return
            if wide_in == [axis] and wide_out:
                # Split: the permutation must be a product of one permutation per new axis.
                digits = [ctx.new_group(int(out_shape[a])) for a in wide_out]  # type: ignore[arg-type]
                split: Expr = digits[-1]
                for digit in reversed(digits[:-1]):
                    split = product(digit, split)
                ctx.unify(expr, split)
                for a, digit in zip(wide_out, digits):
                    ctx.emit(0, a, digit)
                return
            ctx.freeze(expr, "index-map", f"Reshape mixes permuted axis {axis} with other axes")
            return
        ctx.freeze(expr, "index-map", f"Reshape drops permuted axis {axis}")


def _row_major_blocks(
    axes_in: list[int], dims_in: list[int], axes_out: list[int], dims_out: list[int]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair up the smallest runs of input and output axes that hold the same elements."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(axes_in) or j < len(axes_out):
        block_in: list[int] = []
        block_out: list[int] = []
        size_in = size_out = 1
        if i < len(axes_in):
            block_in.append(axes_in[i])
            size_in *= dims_in[i]
            i += 1
        if j < len(axes_out):
            block_out.append(axes_out[j])
            size_out *= dims_out[j]
            j += 1
        while size_in != size_out:
            if size_in < size_out and i < len(axes_in):
                block_in.append(axes_in[i])
                size_in *= dims_in[i]
                i += 1
            elif size_out < size_in and j < len(axes_out):
                block_out.append(axes_out[j])
                size_out *= dims_out[j]
                j += 1
            else:
                return None
        blocks.append((block_in, block_out))
    return blocks


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
