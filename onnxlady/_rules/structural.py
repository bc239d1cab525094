"""Concat, Split, Slice and Gather: channel spaces joined or cut into blocks (direct sums)."""

from __future__ import annotations

import numpy as np

from onnxlady._graph._expr import DirectSum, Expr, Fixed, direct_sum
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register


@register
class ConcatRule(OpRule):
    """Concat: on its axis the output is the direct sum of the inputs; other axes are coupled.

    An operand whose size along the axis is unknown (a Loop output: ONNX does not infer it)
    cannot be permuted, and hides where the operands after it start; when the output's size is
    known, the span from the first to the last such operand becomes one identity block and the
    operands before and after it keep their own permutations. Only when the output's size is
    unknown too do all operands freeze along the axis (the other axes are unaffected).
    """

    op_types = ("Concat",)

    def propagate(self, ctx: RuleContext) -> None:
        slots = [slot for slot in range(ctx.num_inputs) if ctx.input(slot)]
        if not any(ctx.tracked(slot) for slot in slots):
            return
        shapes = [ctx.shape_in(slot) for slot in slots] + [ctx.shape_out(0)]
        known = [shape for shape in shapes if shape is not None]
        if not known:
            raise RuleDoesNotApply("unknown-shape", "the rank of every operand and of the output is unknown")
        rank = len(known[0])  # Concat operands all have the output's rank
        concat_axis = int(ctx.attr("axis")) % rank
        tracked_axes = sorted({axis for slot in slots for axis in ctx.tracked(slot)})
        for axis in tracked_axes:
            if axis == concat_axis:
                self._concatenate(ctx, slots, axis)
            else:
                exprs = [ctx.take(slot, axis) for slot in slots if axis in ctx.tracked(slot)]
                expr = exprs[0]
                for other in exprs[1:]:
                    ctx.unify(expr, other)
                for slot in slots:
                    if axis in ctx.tracked(slot):
                        continue
                    ctx.attach(slot, axis, expr, "concat operand")
                ctx.emit(0, axis, expr)

    def _concatenate(self, ctx: RuleContext, slots: list[int], axis: int) -> None:
        sizes = [_operand_size(ctx, slot, axis) for slot in slots]
        unknown = [k for k, size in enumerate(sizes) if size is None]
        if not unknown:
            ctx.emit(0, axis, direct_sum([self._part(ctx, slot, axis) for slot in slots]))
            return
        names = ", ".join(f"'{ctx.input(slots[k])}'" for k in unknown)
        out_shape = ctx.shape_out(0)
        total = out_shape[axis] if out_shape is not None and axis < len(out_shape) else None
        first, last = unknown[0], unknown[-1]
        outside = sum(size for k, size in enumerate(sizes) if not first <= k <= last and size is not None)
        inside = sum(size for size in sizes[first : last + 1] if size is not None)
        if not isinstance(total, int) or total < outside + inside:
            # No operand's place in the output is known for sure: none can move along the axis.
            for slot in slots:
                if axis in ctx.tracked(slot):
                    ctx.freeze(ctx.take(slot, axis), "unknown-shape",
                               f"the sizes of {names} and of the output along axis {axis} are unknown")
            return
        # Operands between the first and last unknown one have unknown offsets: they freeze.
        for slot in slots[first : last + 1]:
            if axis in ctx.tracked(slot):
                ctx.freeze(ctx.take(slot, axis), "unknown-shape", f"its place after {names} (sizes unknown) is unknown")
        middle = Fixed(total - outside, ctx.reason("unknown-shape", f"channels of {names}, whose number is unknown"))
        parts = [self._part(ctx, slot, axis) for slot in slots[:first]]
        parts.append(middle)
        parts += [self._part(ctx, slot, axis) for slot in slots[last + 1 :]]
        ctx.emit(0, axis, direct_sum(parts))

    @staticmethod
    def _part(ctx: RuleContext, slot: int, axis: int) -> Expr:
        if axis in ctx.tracked(slot):
            return ctx.take(slot, axis)
        if ctx.is_const(slot):
            # A constant block moves with whatever permutation its consumers give it.
            part = ctx.new_group(ctx.const_shape(slot)[axis])
            ctx.bind(slot, axis, part, "concat constant")
            return part
        return ctx.take(slot, axis)  # identity with its reason; raises if the size is unknown


def _operand_size(ctx: RuleContext, slot: int, axis: int) -> int | None:
    """Size of a Concat operand along ``axis``: from its permutation, its constant or its shape."""
    tracked = ctx.tracked(slot)
    if axis in tracked:
        return tracked[axis].size
    if ctx.is_const(slot):
        const_shape = ctx.const_shape(slot)
        return const_shape[axis] if axis < len(const_shape) else None
    shape = ctx.shape_in(slot)
    dim = shape[axis] if shape is not None and axis < len(shape) else None
    return dim if isinstance(dim, int) else None


@register
class SplitRule(OpRule):
    """Split: each output is one block of the input's permutation (permuted within the block)."""

    op_types = ("Split",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        rank = ctx.rank_in(0)
        split_axis = int(ctx.attr("axis", 0)) % rank
        for axis, expr in spaces.items():
            if axis != split_axis:
                for slot in range(ctx.num_outputs):
                    ctx.emit(slot, axis, expr)
                continue
            sizes = self._sizes(ctx, expr.size)
            pieces = tuple(ctx.new_group(size) for size in sizes)
            ctx.unify(expr, DirectSum(pieces) if len(pieces) > 1 else pieces[0])
            for slot, piece in enumerate(pieces):
                ctx.emit(slot, axis, piece)

    @staticmethod
    def _sizes(ctx: RuleContext, total: int) -> list[int]:
        split = ctx.attr("split")
        if split is None and ctx.input(1):
            split = ctx.require_const(1, "split sizes").reshape(-1).tolist()
        if split is None:
            count = int(ctx.attr("num_outputs", ctx.num_outputs))
            chunk = -(-total // count)
            split = [min(chunk, total - k * chunk) for k in range(count)]
        sizes = [int(s) for s in split]
        if sum(sizes) != total or len(sizes) != ctx.num_outputs:
            raise RuleDoesNotApply("index-map", f"split sizes {sizes} do not cover {total} channels")
        return sizes


@register
class SliceRule(OpRule):
    """Slice: a contiguous range of a permuted axis is a block; other axes pass through."""

    op_types = ("Slice",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        rank = ctx.rank_in(0)
        starts, ends, axes, steps = self._arguments(ctx, rank)
        for axis, expr in spaces.items():
            if axis not in axes:
                ctx.emit(0, axis, expr)
                continue
            k = axes.index(axis)
            start, stop, step = _clamp(int(starts[k]), int(ends[k]), int(steps[k]), expr.size)
            if step != 1:
                ctx.freeze(expr, "index-map", f"Slice with step {step} on permuted axis {axis}")
                continue
            if stop <= start:
                continue
            pieces = [ctx.new_group(size) for size in (start, stop - start, expr.size - stop) if size > 0]
            middle = pieces[1] if start > 0 else pieces[0]
            ctx.unify(expr, DirectSum(tuple(pieces)) if len(pieces) > 1 else pieces[0])
            ctx.emit(0, axis, middle)

    @staticmethod
    def _arguments(ctx: RuleContext, rank: int) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray]:
        if ctx.opset < 10:
            starts = np.asarray(ctx.attr("starts"))
            ends = np.asarray(ctx.attr("ends"))
            axes_value = ctx.attr("axes")
            steps = np.ones(len(starts), dtype=np.int64)
        else:
            starts = ctx.require_const(1, "starts").reshape(-1)
            ends = ctx.require_const(2, "ends").reshape(-1)
            axes_value = ctx.require_const(3, "axes").reshape(-1).tolist() if ctx.input(3) else None
            steps = ctx.require_const(4, "steps").reshape(-1) if ctx.input(4) else np.ones(len(starts), np.int64)
        axes = [int(a) % rank for a in axes_value] if axes_value is not None else list(range(len(starts)))
        return starts, ends, axes, steps


def _clamp(start: int, stop: int, step: int, size: int) -> tuple[int, int, int]:
    """ONNX Slice semantics for one axis (negative indices, clamping)."""
    start = start + size if start < 0 else start
    stop = stop + size if stop < 0 else stop
    if step > 0:
        return max(0, min(start, size)), max(0, min(stop, size)), step
    return max(-1, min(start, size - 1)), max(-1, min(stop, size - 1)), step


@register
class GatherRule(OpRule):
    """Gather: an embedding table [V, C] makes new channels; gathering a permuted axis freezes it."""

    op_types = ("Gather",)

    def propagate(self, ctx: RuleContext) -> None:
        if ctx.tracked(1):
            raise RuleDoesNotApply("blocking", "the indices carry channels")
        gather_axis = int(ctx.attr("axis", 0))
        if ctx.is_const(0):
            table = ctx.const_shape(0)
            if len(table) == 2 and gather_axis % 2 == 0:
                channels = ctx.new_group(table[1])
                ctx.bind(0, 1, channels, "embedding table")
                ctx.declare_producer(channels)
                ctx.emit(0, ctx.rank_out(0) - 1, channels)
            return
        spaces = ctx.take_all(0)
        if not spaces:
            return
        rank = ctx.rank_in(0)
        gather_axis %= rank
        index_rank = ctx.rank_in(1)
        for axis, expr in spaces.items():
            if axis != gather_axis:
                ctx.emit(0, axis if axis < gather_axis else axis + index_rank - 1, expr)
                continue
            at = _identity_gather_axis(ctx.const(1), expr.size)
            if at is None:
                ctx.freeze(expr, "blocking", f"Gather selects positions along permuted axis {axis}")
            else:
                ctx.emit(0, axis + at, expr)


def _identity_gather_axis(indices: np.ndarray | None, size: int) -> int | None:
    """The axis of ``indices`` that lists every position of an axis of ``size`` in order, or None.

    Exporters lower a view (torch's ``as_strided``) to a Gather of ``arange(size)`` shaped like
    ``[1, size, 1, 1]``: that Gather copies the axis in order to the indices' one long axis, so
    the permutation travels with it unchanged. Any other index vector (a subset, a reordering)
    selects positions and is not followed.
    """
    if indices is None or indices.size != size or size < 2:
        return None
    long_axes = [axis for axis, extent in enumerate(indices.shape) if extent != 1]
    if len(long_axes) != 1:
        return None
    flat = indices.reshape(-1).astype(np.int64)
    flat = np.where(flat < 0, flat + size, flat)
    return long_axes[0] if np.array_equal(flat, np.arange(size)) else None
