"""Operators that move, merge or split axes: the channel space follows, with an index map."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from onnxlady._graph._expr import Atom, Expr, Fixed, Grouped, grouped, leading, product
from onnxlady._graph._model_graph import Shape
from onnxlady._graph._uniform import agreeing_ends, common_digits
from onnxlady._rules._context import JointSpace, RuleContext, RuleDoesNotApply
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
    """Transpose: output axis j is input axis perm[j]; axes taken together move as they are."""

    op_types = ("Transpose",)
    joint_aware = True

    def propagate(self, ctx: RuleContext) -> None:
        joints = ctx.take_joint(0)
        spaces = ctx.take_all(0)
        if not spaces and not joints:
            return
        perm = ctx.attr("perm")
        if perm is None:
            perm = list(reversed(range(ctx.rank_in(0))))
        where = list(perm)
        for axis, expr in spaces.items():
            ctx.emit(0, where.index(axis), expr)
        for space in joints:
            # The digits keep their order of significance; only their places change.
            ctx.emit_joint(0, JointSpace(tuple(where.index(a) for a in space.axes), space.sizes, space.expr))


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
        listed = ctx.attr("axes")
        if not listed and ctx.input(1):
            listed = ctx.require_const(1, "axes").reshape(-1)
        out_rank = ctx.rank_in(0) + (len(listed) if listed is not None else 0)
        inserted = _axes(ctx, 1, out_rank) or []
        kept = [a for a in range(out_rank) if a not in inserted]
        for axis, expr in spaces.items():
            ctx.emit(0, kept[axis], expr)


@register
class FlattenRule(OpRule):
    """Flatten(axis=k): each permuted axis becomes a digit of a merged axis (p (x) I_S, ...).

    Several permuted axes merged into one output axis give the product of their permutations
    (row-major digits), not one permutation that would have to equal both.
    """

    op_types = ("Flatten",)

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        shape = ctx.shape_in(0)
        if shape is None:
            _unknown_shape(ctx, spaces.values(), "input shape unknown")
            return
        split = int(ctx.attr("axis", 1))
        split = split + len(shape) if split < 0 else split
        if not 0 <= split <= len(shape):
            # ONNX Runtime refuses such a node; bounded here so a hostile axis cannot make the loops below huge.
            _unknown_shape(ctx, spaces.values(), f"axis {ctx.attr('axis', 1)} outside the input's rank {len(shape)}")
            return
        for out_axis, block in ((0, range(split)), (1, range(split, len(shape)))):
            mine = {axis: spaces[axis] for axis in block if axis in spaces}
            if not mine:
                continue
            unknown = [a for a in block if a not in mine and not isinstance(shape[a], int)]
            if unknown:
                for expr in mine.values():
                    _unknown_shape(ctx, [expr], f"axes {unknown} merged with a permuted axis have unknown sizes")
                continue
            parts = [
                mine[a] if a in mine else _fixed_digit(ctx, int(shape[a]), a < min(mine))  # type: ignore[arg-type]
                for a in block
            ]
            ctx.emit(0, out_axis, _chain(parts))


def _chain(parts: list[Expr]) -> Expr:
    """Row-major digits, most significant first, as one mixed-radix expression."""
    result = parts[-1]
    for part in reversed(parts[:-1]):
        result = product(part, result)
    return result


def _fixed_digit(ctx: RuleContext, size: int, in_front: bool) -> Expr:
    where = "in front of" if in_front else "behind"
    return ctx.fixed(size, f"positions merged {where} the channels")


def _still_digit(ctx: RuleContext, digit: _Digit, in_front: bool) -> Expr:
    """The permutation of a digit merged with permuted ones that carries none itself.

    A digit of an input axis holding equal slices (the copies of ``repeat_kv``: key/value
    heads expanded for the query heads of their group) is a free group of its own: any
    permutation leaves those copies as they are. Any other digit keeps its positions.
    """
    size = int(digit.size)  # type: ignore[arg-type]  # (digits merged with others have known sizes)
    if ctx.is_uniform(0, digit.source, size):
        return ctx.new_group(size)
    return _fixed_digit(ctx, size, in_front)


@dataclass(frozen=True)
class _Digit:
    """A run of elements that is one digit of input axis ``source`` and of output axis ``target``."""

    source: int
    target: int
    size: int | None  # None: a whole axis of unknown size on both sides


def _align(in_shape: Shape, out_shape: Shape) -> tuple[list[_Digit], dict[int, tuple[str, str]]]:
    """The common row-major digits of a reshape, and the input axes that have none (with why).

    Leading and trailing axes that agree map one to one. In between, unknown leading dims on
    both sides (a dynamic batch) pair up as one block when everything after them is known, and
    the known dims are split into a common mixed radix. Consecutive digits of one input axis
    that land in one output axis are kept as one digit.
    """
    rank_in, rank_out = len(in_shape), len(out_shape)
    lead, trail = agreeing_ends(in_shape, out_shape)
    # Unknown last dims on both sides (a -1 that shape inference names afresh, as in ONNX Runtime's
    # folded ``[0, 4, 16, -1]``) are one block when everything between the leading axes and them
    # is known with equal products: the element count then makes them equal.
    last_in, last_out = rank_in - 1 - trail, rank_out - 1 - trail
    if last_in > lead and last_out > lead and not isinstance(in_shape[last_in], int) \
            and not isinstance(out_shape[last_out], int):
        middle_in, middle_out = in_shape[lead:last_in], out_shape[lead:last_out]
        if all(isinstance(d, int) for d in (*middle_in, *middle_out)) and \
                math.prod(middle_in) == math.prod(middle_out):  # type: ignore[arg-type]  # fmt: skip
            trail += 1
    digits = [_Digit(a, a, _size(in_shape[a])) for a in range(lead)]
    unaligned: dict[int, tuple[str, str]] = {}
    end_in, end_out = rank_in - trail, rank_out - trail
    first_in, first_out = lead, lead
    while first_in < end_in and not isinstance(in_shape[first_in], int):
        first_in += 1
    while first_out < end_out and not isinstance(out_shape[first_out], int):
        first_out += 1
    unknown = ("unknown-shape", "Reshape: axes reshaped together with this one have unknown sizes")
    if (first_in > lead) != (first_out > lead):
        unaligned.update(dict.fromkeys(range(lead, end_in), unknown))
    else:
        if first_in - lead == 1 and first_out - lead == 1:
            digits.append(_Digit(lead, lead, None))
        else:
            unaligned.update(dict.fromkeys(range(lead, first_in), unknown))
        dims_in, dims_out = list(in_shape[first_in:end_in]), list(out_shape[first_out:end_out])
        common = None
        if all(isinstance(d, int) for d in dims_in + dims_out):
            common = common_digits([int(d) for d in dims_in], [int(d) for d in dims_out])  # type: ignore[arg-type]
            if common is None:
                unknown = ("index-map", "Reshape regroups the permuted axis in a way with no index map")
        if common is None:
            unaligned.update(dict.fromkeys(range(first_in, end_in), unknown))
        else:
            _add_digits(digits, common, first_in, first_out)
    block = _known_block(in_shape, out_shape, lead, end_in, end_out)
    if block is not None and all(axis in unaligned for axis in range(block[0], end_in)):
        # The known dims ending both middles hold blocks of one size: they align whatever the unknown dims before them.
        start, common, start_out = block
        for axis in range(start, end_in):
            del unaligned[axis]
        _add_digits(digits, common, start, start_out)
    digits += [_Digit(end_in + k, end_out + k, _size(in_shape[end_in + k])) for k in range(trail)]
    return digits, unaligned


def _add_digits(digits: list[_Digit], common: tuple[list[tuple[int, int]], list[tuple[int, int]]],
                first_in: int, first_out: int) -> None:
    """Append :func:`common_digits`' digits (positions from ``first_in``/``first_out``), a run of one axis into one kept whole."""
    for (i, size), (j, _) in zip(*common):
        source, target = first_in + i, first_out + j
        last = digits[-1] if digits else None
        if last is not None and last.source == source and last.target == target and last.size is not None:
            digits[-1] = _Digit(source, target, last.size * size)
        else:
            digits.append(_Digit(source, target, size))


def _known_block(
    in_shape: Shape, out_shape: Shape, lead: int, end_in: int, end_out: int
) -> tuple[int, tuple[list[tuple[int, int]], list[tuple[int, int]]], int] | None:
    """The longest runs of known dims ending both middles with one product, split into common digits.

    Row-major, the last ``Q`` elements' positions within each block of ``Q`` are the same on both
    sides when ``Q`` is a product of known trailing dims on both: the dims before them, known or
    not, only count the blocks (the context layer ``[B, S, H, D] -> [B', S', H * D]`` of an export
    whose ``B``, ``S`` shape inference lost). Returns (first input axis, digits, first output axis).
    """
    start_in, start_out = end_in, end_out
    while start_in > lead and isinstance(in_shape[start_in - 1], int):
        start_in -= 1
    while start_out > lead and isinstance(out_shape[start_out - 1], int):
        start_out -= 1
    if start_in == lead and start_out == lead:
        return None  # all known: the common digits above have decided
    products_out = {math.prod(out_shape[j:end_out]): j for j in range(end_out - 1, start_out - 1, -1)}  # type: ignore[arg-type]
    for i in range(start_in, end_in):
        j = products_out.get(math.prod(in_shape[i:end_in]))  # type: ignore[arg-type]
        if j is None:
            continue
        common = common_digits([int(d) for d in in_shape[i:end_in]], [int(d) for d in out_shape[j:end_out]])  # type: ignore[arg-type]
        if common is not None:
            return i, common, j
    return None


def _size(dim: int | str | None) -> int | None:
    return dim if isinstance(dim, int) else None


@register
class ReshapeRule(OpRule):
    """Reshape: keep, merge or split permuted axes, found by matching row-major digits.

    A permuted axis split over output axes of its own (each receiving one digit and nothing
    else) stays one permutation over those axes taken together (a :class:`JointSpace`); other
    rules see it as a product of one permutation per digit, but a later Reshape that merges
    the digits back reads the whole permutation, in the order the digits now lie: for a
    channel shuffle (split C into (g, C/g), Transpose, merge) the block sum of a Concat becomes
    an interleave, with no restriction. Otherwise a split axis is restricted to a product of
    one permutation per digit, and the digits landing in one output axis (from any input axes,
    permuted or not) make that axis's mixed-radix expression.
    """

    op_types = ("Reshape",)
    joint_aware = True

    def propagate(self, ctx: RuleContext) -> None:
        joints = ctx.take_joint(0)
        spaces = ctx.take_all(0)
        if not spaces and not joints:
            return
        in_shape = ctx.shape_in(0)
        out_shape = _contracted(ctx, ctx.shape_out(0))
        if in_shape is None or out_shape is None:
            exprs = [*spaces.values(), *(space.expr for space in joints)]
            _unknown_shape(ctx, exprs, "input or output shape unknown")
            return
        digits, unaligned = _align(in_shape, out_shape)
        for space in joints:
            if not spaces and _ungroup(ctx, space, digits):
                continue
            if not _move_joint(ctx, space, digits, unaligned):
                spaces.update(ctx.materialize(space))  # the digits one by one, as below
        pieces: dict[int, Expr] = {}
        for axis, expr in spaces.items():
            mine = [k for k, digit in enumerate(digits) if digit.source == axis]
            if axis in unaligned or not mine:
                kind, message = unaligned.get(axis, ("index-map", f"Reshape: axis {axis} has no place in the output"))
                if kind == "unknown-shape":
                    _unknown_shape(ctx, [expr], message)
                else:
                    ctx.freeze(expr, kind, message)
                continue
            if len(mine) == 1:
                size = digits[mine[0]].size
                if size is not None and size != expr.size:
                    ctx.freeze(expr, "index-map", f"Reshape: axis {axis} has {size} positions, not {expr.size}")
                    continue
                pieces[mine[0]] = expr
                continue
            targets = [digits[k].target for k in mine]
            sizes = tuple(size for k in mine if isinstance(size := digits[k].size, int))
            if _exclusive(digits, targets) and len(sizes) == len(mine):
                # Each digit has an output axis to itself: keep the permutation whole.
                ctx.emit_joint(0, JointSpace(tuple(targets), sizes, expr))
                continue
            if len(spaces) == 1 and _group_rows(ctx, expr, mine, digits):
                continue
            # The axis is split across output axes: one permutation per digit.
            split = [ctx.new_group(int(digits[k].size)) for k in mine]  # type: ignore[arg-type]
            ctx.unify(expr, _chain(list(split)))
            for k, piece in zip(mine, split):
                pieces[k] = _settled(ctx, piece)
        for target in sorted({digits[k].target for k in pieces}):
            owned = [k for k, digit in enumerate(digits) if digit.target == target]
            first = min(k for k in owned if k in pieces)
            parts: list[Expr] = []
            for k in owned:
                part = pieces[k] if k in pieces else _still_digit(ctx, digits[k], k < first)
                if k > first and k not in pieces and isinstance(part, Atom) and parts:
                    # Copies (repeat_kv) behind a digit: each of its positions holds its own copies,
                    # which may take their own order (the query heads of one key/value head).
                    ahead = parts.pop()
                    part = grouped(ahead, [part, *(ctx.new_group(part.size) for _ in range(ahead.size - 1))])
                parts.append(part)
            _emit_moving(ctx, target, _chain(parts))


#: Operators that pass a tensor on in its shape, stored anew: a product after them contracts it all the same.
_RESTORED = frozenset({"Identity", "Cast", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Matrix products by (domain, op type): the input slot of their second factor, whose dim -2 they
#: contract the first factor's last dim with.
_CONTRACTING: dict[tuple[str, str], int] = {
    ("", "MatMul"): 1, ("", "MatMulInteger"): 1, ("", "QLinearMatMul"): 3,
    ("com.microsoft", "MatMulIntegerToFloat"): 1, ("com.microsoft", "DynamicQuantizeMatMul"): 1,
}  # fmt: skip


def _contracted(ctx: RuleContext, shape: Shape | None) -> Shape | None:
    """``shape`` with an unknown last dim read from a matrix product that contracts it with rows of known count.

    A target computed at run time (``[B, S, -1]`` from ``Shape`` ops, the context layer of a
    Hugging Face attention) leaves the merged dim unknown to shape inference; the projection
    after it (``MatMul``, its quantized forms, ``MatMulNBits``' ``K``) fixes it: any other size
    fails there, so every run has this one.
    """
    if shape is None or not shape or isinstance(shape[-1], int):
        return shape
    graph = ctx.graph
    pending: list[str] = [ctx.output(0)]
    seen: set[str] = set()
    while pending and len(seen) < 16:
        name = pending.pop()
        seen.add(name)
        for index, slot in graph.consumers.get(name, []):
            node = graph.nodes[index]
            domain = "" if node.domain == "ai.onnx" else node.domain
            if slot != 0:
                continue
            if node.op_type in _RESTORED and domain == "" and node.output and node.output[0] not in seen:
                pending.append(node.output[0])
            elif (domain, node.op_type) == ("com.microsoft", "MatMulNBits"):
                rows = next((a.i for a in node.attribute if a.name == "K"), 0)
                if rows > 0:
                    return (*shape[:-1], int(rows))
            elif (domain, node.op_type) in _CONTRACTING and len(node.input) > _CONTRACTING[domain, node.op_type]:
                other = graph.shapes.get(node.input[_CONTRACTING[domain, node.op_type]])
                if other is not None and len(other) >= 2 and isinstance(other[-2], int):
                    return (*shape[:-1], other[-2])
    return shape


#: Operators after which every element of their input still sits at a position of its own in
#: the output, or changes it (element-wise maps, Softmax over any axis, moves of axes).
_POSITIONAL = frozenset({
    "Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Softmax", "LogSoftmax",
    "Sigmoid", "Relu", "Tanh", "Exp", "Log", "Neg", "Abs", "Clip", "HardSigmoid", "LeakyRelu",
})  # fmt: skip


def _unknown_shape(ctx: RuleContext, exprs: Iterable[Expr], message: str) -> None:
    """Freeze spaces an unresolved reshape cannot carry: pinned by a graph output where one reads it.

    A classifier's outputs reshaped with a computed target (a dynamic CRNN head) are the graph
    output itself: whatever the reshape does, no permutation of them leaves the output alone.
    That is the true reason they stay; elsewhere the unknown shape is.
    """
    output = _reached_output(ctx)
    for expr in exprs:
        if output is not None:
            ctx.freeze(expr, "graph-output", f"graph output '{output}' (read through this {ctx.op_type} of unknown shape)")
        else:
            ctx.freeze(expr, "unknown-shape", message)


def _reached_output(ctx: RuleContext) -> str | None:
    """The graph output that this node's output reaches through positional operators only, if any."""
    graph = ctx.graph
    pending: list[str] = [ctx.output(0)]
    seen: set[str] = set()
    while pending and len(seen) < 64:
        name = pending.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in graph.graph_outputs:
            return name
        for index, slot in graph.consumers.get(name, []):
            node = graph.nodes[index]
            if slot == 0 and node.op_type in _POSITIONAL and node.domain in ("", "ai.onnx"):
                pending.extend(node.output[:1])
    return None


def _exclusive(digits: list[_Digit], targets: list[int]) -> bool:
    """Whether each of ``targets`` is a distinct output axis made of exactly one digit."""
    return len(set(targets)) == len(targets) and all(
        sum(1 for digit in digits if digit.target == target) == 1 for target in targets
    )


def _move_joint(ctx: RuleContext, space: JointSpace, digits: list[_Digit], unaligned: dict[int, tuple[str, str]]) -> bool:
    """Carry a joint space through a Reshape; False when it must be read digit by digit.

    Two cases keep it whole: every axis of the space stays an output axis of its own (the
    space moves), or the axes are merged into one output axis and nothing else: the merged
    axis reads the digits in layout order, so the permutation is read in that order (the
    same order, or two digits swapped, which is :meth:`GroupSolver.transposed`).
    """
    if any(axis in unaligned for axis in space.axes):
        return False
    found: list[int] = []
    for axis, size in zip(space.axes, space.sizes):
        mine = [k for k, digit in enumerate(digits) if digit.source == axis]
        if len(mine) != 1 or digits[mine[0]].size != size:
            return False
        found.append(mine[0])
    targets = [digits[k].target for k in found]
    if _exclusive(digits, targets):
        ctx.emit_joint(0, JointSpace(tuple(targets), space.sizes, space.expr))
        return True
    target = targets[0]
    owned = [k for k, digit in enumerate(digits) if digit.target == target]
    if any(t != target for t in targets) or sorted(owned) != sorted(found):
        return False
    if owned == found:
        merged: Expr | None = space.expr  # digits already in layout order
    elif len(found) == 2 and owned == found[::-1]:
        merged = ctx.solver.transposed(space.expr, space.sizes[0], space.sizes[1])
    else:
        merged = None
    if merged is None:
        return False
    _emit_moving(ctx, target, merged)
    return True


def _group_rows(ctx: RuleContext, expr: Expr, mine: list[int], digits: list[_Digit]) -> bool:
    """A legacy GroupNorm's ``[N, C, H, W] -> [N, G, k * H * W]`` before its InstanceNormalization: per-group orders.

    The channels split into ``G`` rows of ``k``, each row merged with the positions behind it;
    the InstanceNormalization reading it (its only reader) normalises each row over itself, so
    each row may keep its own order: axes 1 and 2 leave as one joint space ``p (x) {q_g (x) I}``,
    and the channels take ``p (x) {q_g}``. Anything else is split digit by digit (False).
    """
    if len(mine) != 2 or ctx.rank_out(0) != 3:
        return False
    rows, row = digits[mine[0]], digits[mine[1]]
    owned = [k for k, digit in enumerate(digits) if digit.target == row.target]
    if (rows.target, row.target) != (1, 2) or owned[0] != mine[1] or rows.size is None or row.size is None:
        return False
    if sum(1 for digit in digits if digit.target == 1) != 1 or any(digits[k].size is None for k in owned):
        return False
    readers = ctx.graph.consumers.get(ctx.output(0), [])
    if len(readers) != 1 or ctx.output(0) in ctx.graph.graph_outputs:
        return False
    reader = ctx.graph.nodes[readers[0][0]]
    if reader.op_type != "InstanceNormalization" or reader.domain not in ("", "ai.onnx") or readers[0][1] != 0:
        return False
    behind = math.prod([digits[k].size or 1 for k in owned[1:]])  # (every size known: checked above)
    outer = ctx.new_group(int(rows.size))
    inners: list[Expr] = [ctx.new_group(int(row.size)) for _ in range(int(rows.size))]
    ctx.unify(expr, grouped(outer, inners))
    resolved = ctx.solver.resolve(grouped(outer, inners))
    if not isinstance(resolved, Grouped):
        ctx.unify(resolved, product(outer, inners[0]))  # (tied elsewhere: the digits as before)
        _emit_moving(ctx, 1, _settled(ctx, outer))
        _emit_moving(ctx, 2, product(_settled(ctx, inners[0]), _fixed_digit(ctx, behind, False)))
        return True
    rest = _fixed_digit(ctx, behind, False)
    joint = grouped(resolved.outer, [product(inner, rest) for inner in resolved.inners])
    ctx.emit_joint(0, JointSpace((1, 2), (resolved.outer.size, joint.size // resolved.outer.size), joint))
    return True


def _ungroup(ctx: RuleContext, space: JointSpace, digits: list[_Digit]) -> bool:
    """The Reshape after a legacy GroupNorm's InstanceNormalization: ``p (x) {q_g (x) I}`` back to the channels.

    Axis 1 (``G`` rows) and the first digit of axis 2 (``k``) make output axis 1 and nothing else;
    the rest of axis 2 lands elsewhere in place. The channels take ``p (x) {q_g}``. Anything else
    is read as every joint space is (False).
    """
    expr = ctx.solver.resolve(space.expr)
    if not isinstance(expr, Grouped) or len(space.axes) != 2 or expr.outer.size != space.sizes[0]:
        return False
    first, second = space.axes
    rows = [k for k, digit in enumerate(digits) if digit.source == first]
    row = [k for k, digit in enumerate(digits) if digit.source == second]
    if len(rows) != 1 or not row or digits[rows[0]].size != space.sizes[0]:
        return False
    target = digits[rows[0]].target
    owned = [k for k, digit in enumerate(digits) if digit.target == target]
    width = digits[row[0]].size
    if owned != [rows[0], row[0]] or width is None or any(digits[k].target == target for k in row[1:]):
        return False
    inners = [leading(inner, int(width)) for inner in expr.inners]
    if any(inner is None for inner in inners):
        return False
    _emit_moving(ctx, target, grouped(expr.outer, [inner for inner in inners if inner is not None]))
    return True


def _settled(ctx: RuleContext, piece: Expr) -> Expr:
    """A digit that the split already froze is the identity: say so instead of keeping an atom."""
    resolved = ctx.solver.resolve(piece)
    if isinstance(resolved, Atom) and ctx.solver.is_frozen(resolved.id):
        return Fixed(resolved.size, ctx.solver.reasons(resolved.id)[0])
    return resolved


def _emit_moving(ctx: RuleContext, axis: int, expr: Expr) -> None:
    """Emit ``expr`` on output 0 unless it is the identity everywhere (a frozen digit)."""
    if any(True for _ in ctx.solver.atoms(expr)):
        ctx.emit(0, axis, expr)


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


@register
class DepthToSpaceRule(OpRule):
    """DepthToSpace / SpaceToDepth (NCHW, block size b): channels and b x b pixel blocks trade places.

    From the ONNX reference implementation (checked with ``onnx.reference``):

    - DepthToSpace, DCR: input channel ``(b1 * b + b2) * C_out + c`` goes to output channel ``c``
      at pixel offset (b1, b2): the input takes ``I_{b^2} (x) p`` when the output takes ``p``;
    - DepthToSpace, CRD: input channel ``c * b^2 + (b1 * b + b2)``: the input takes ``p (x) I_{b^2}``;
    - SpaceToDepth: output channel ``(b1 * b + b2) * C + c``: the output takes ``I_{b^2} (x) p``.

    A permuted spatial axis is the high digit of the spatial output axis (``h * b + b1``), and
    for SpaceToDepth the input's spatial permutation must keep the pixel blocks (``q (x) I_b``).
    """

    op_types = ("DepthToSpace", "SpaceToDepth")

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        if ctx.rank_in(0) != 4:
            raise RuleDoesNotApply("index-map", f"{ctx.op_type} of a rank-{ctx.rank_in(0)} tensor")
        block = int(ctx.attr("blocksize", 0))
        if block < 1:
            raise RuleDoesNotApply("index-map", "blocksize is missing")
        mode = ctx.attr("mode", b"DCR")
        mode = (mode.decode() if isinstance(mode, bytes) else str(mode)).upper()
        if mode not in ("DCR", "CRD"):
            raise RuleDoesNotApply("index-map", f"unknown mode '{mode}'")
        to_space = ctx.op_type == "DepthToSpace"
        for axis, expr in spaces.items():
            if axis == 0:
                ctx.emit(0, 0, expr)
            elif axis == 1:
                offsets = ctx.fixed(block * block, "pixel offsets inside a block")
                if not to_space:
                    ctx.emit(0, 1, product(offsets, expr))
                    continue
                if expr.size % (block * block):
                    ctx.freeze(expr, "index-map", f"{expr.size} channels are not a multiple of {block * block}")
                    continue
                channels = ctx.new_group(expr.size // (block * block))
                ctx.unify(expr, product(offsets, channels) if mode == "DCR" else product(channels, offsets))
                _emit_moving(ctx, 1, _settled(ctx, channels))
            else:
                inside = ctx.fixed(block, "pixel offsets inside a block")
                if to_space:
                    ctx.emit(0, axis, product(expr, inside))
                    continue
                if expr.size % block:
                    ctx.freeze(expr, "index-map", f"{expr.size} positions are not a multiple of {block}")
                    continue
                blocks = ctx.new_group(expr.size // block)
                ctx.unify(expr, product(blocks, inside))
                _emit_moving(ctx, axis, _settled(ctx, blocks))
