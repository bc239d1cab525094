"""Einsum: every subscript letter is one index, so it takes one permutation wherever it appears.

``Y = einsum("bsd,df->bsf", X, W)`` sums products over every assignment of the letters;
permuting one letter's index alike in every operand and in the output (if it is there) only
renames the terms, so the output moves by that permutation on the letter's axis, or not at all
for a contracted letter. Hence, per letter:

- on data operands and the output (a free axis, ``b``, ``s``): the permutation passes through;
- on data operands only (contracted: attention scores ``bhse,bhte->bhst`` over ``e``): the
  operands are coupled, as MatMul couples ``Q @ K^T`` over the head dimension;
- on a data operand and a constant weight (``d`` of ``bsd,df``): the weight's axis follows the
  data, as a MatMul weight's input axis (the Einsum *consumes* the channels);
- on constants and the output only (``f`` of ``bsd,df->bsf``): a new group of neurons the Einsum
  *produces*, bound to every constant axis with that letter;
- on constants only: no constraint (nothing that moves reads it).

Ellipsis dimensions broadcast from the right like a MatMul's batch axes. Anything the rule
cannot prove keeps the identity: a letter repeated in one operand (a diagonal or trace), a
labelled axis of size 1 against a larger one (broadcasting a letter), an ellipsis the output
drops, an implicit output whose letter order mixes cases, an unknown rank.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._expr import Expr, Fixed, product
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register

#: A term of the equation: its letters, and where its ellipsis stands among them (None: none).
_Term = tuple[str, int | None]
_ELLIPSIS = "..."


def parse_equation(equation: str, num_inputs: int) -> tuple[list[_Term], _Term]:
    """The input terms and the output term of an Einsum equation (implicit output made explicit).

    Raises :class:`RuleDoesNotApply` for an equation the rule cannot read with certainty.
    """
    text = equation.replace(" ", "")
    if "->" in text:
        left, _, right = text.partition("->")
        explicit: str | None = right
    else:
        left, explicit = text, None
    inputs = [_term(part) for part in left.split(",")]
    if len(inputs) != num_inputs:
        raise RuleDoesNotApply("index-map", f"equation '{equation}' has {len(inputs)} operands, the node {num_inputs}")
    if explicit is not None:
        output = _term(explicit)
        if len(set(output[0])) != len(output[0]):
            raise RuleDoesNotApply("index-map", f"equation '{equation}' repeats a letter in its output")
        return inputs, output
    # Implicit output: the ellipsis first, then the letters seen once, in alphabetical order.
    counts: dict[str, int] = {}
    for letters, _ in inputs:
        for letter in letters:
            counts[letter] = counts.get(letter, 0) + 1
    once = sorted(letter for letter, count in counts.items() if count == 1)
    # Runtimes disagree on where upper case goes (numpy: first; ONNX Runtime's letter index: last).
    if any(c.isupper() for c in once) and any(c.islower() for c in once):
        raise RuleDoesNotApply("index-map", f"implicit output of '{equation}' mixes upper- and lower-case letters")
    has_ellipsis = any(position is not None for _, position in inputs)
    return inputs, ("".join(once), 0 if has_ellipsis else None)


def _term(text: str) -> _Term:
    """One term: its letters, and the position of its ellipsis among them."""
    position = text.find(_ELLIPSIS)
    letters = text.replace(_ELLIPSIS, "", 1) if position >= 0 else text
    if not all(c in string.ascii_letters for c in letters):
        raise RuleDoesNotApply("index-map", f"Einsum term '{text}' is not letters and one ellipsis")
    return letters, (position if position >= 0 else None)


@register
class EinsumRule(OpRule):
    """Einsum, read from its equation (see the module docstring)."""

    op_types = ("Einsum",)

    def propagate(self, ctx: RuleContext) -> None:
        slots = range(ctx.num_inputs)
        if not any(ctx.tracked(slot) for slot in slots) and all(ctx.is_const(slot) for slot in slots):
            return  # nothing can carry a permutation into a product of constants
        inputs, output = parse_equation(einsum_equation(ctx.node), ctx.num_inputs)
        ranks = [ctx.rank_in(slot) for slot in slots]
        # Where each letter and each ellipsis dimension lies, operand by operand.
        letters: dict[str, list[tuple[int, int]]] = {}
        ellipses: list[tuple[int, int, int]] = []  # (slot, first axis, number of axes)
        for slot, ((term, position), rank) in enumerate(zip(inputs, ranks)):
            width = rank - len(term)
            if width < 0 or (position is None and width):
                raise RuleDoesNotApply("index-map", f"term '{term}' does not fit operand {slot} of rank {rank}")
            if len(set(term)) != len(term):
                raise RuleDoesNotApply("index-map", f"term '{term}' repeats a letter (a diagonal or a trace)")
            for index, letter in enumerate(term):
                axis = index if position is None or index < position else index + width
                letters.setdefault(letter, []).append((slot, axis))
            if position is not None:
                ellipses.append((slot, position, width))
        out_letters, out_position = output
        if any(letter not in letters for letter in out_letters):
            raise RuleDoesNotApply("index-map", "the output names a letter no operand has")
        batch = max((width for _, _, width in ellipses), default=0)
        if batch and out_position is None:
            raise RuleDoesNotApply("index-map", "the output drops the ellipsis dimensions")

        def out_axis(index: int) -> int:
            return index if out_position is None or index < out_position else index + batch

        new_letters: list[Expr] = []
        weighing = False  # a letter contracted between a data operand and a constant: a layer's weight
        for letter, places in letters.items():
            out_index = out_letters.find(letter)
            expr = self._letter(ctx, letter, places, in_output=out_index >= 0)
            constant = [ctx.is_const(slot) for slot, _ in places]
            weighing = weighing or (out_index < 0 and any(constant) and not all(constant))
            if expr is None or out_index < 0:
                continue
            if all(constant):
                new_letters.append(expr)
            if not isinstance(expr, Fixed):
                ctx.emit(0, out_axis(out_index), expr)
        for offset in range(batch):
            expr = self._ellipsis_axis(ctx, ellipses, batch, offset)
            if expr is not None and out_position is not None:
                ctx.emit(0, out_position + offset, expr)
        if new_letters and weighing:  # (an outer product with a constant vector makes no neurons)
            neurons = new_letters[0]
            for expr in new_letters[1:]:
                neurons = product(neurons, expr)
            ctx.declare_producer(neurons)

    @staticmethod
    def _letter(ctx: RuleContext, letter: str, places: list[tuple[int, int]], in_output: bool) -> Expr | None:
        """The permutation of one letter's index, bound on its constants and coupled on its data operands."""
        tracked = {(slot, axis): ctx.tracked(slot)[axis] for slot, axis in places if axis in ctx.tracked(slot)}
        dims = set()
        for slot, axis in places:
            dim = (ctx.shape_in(slot) or ())[axis] if (slot, axis) not in tracked else tracked[(slot, axis)].size
            if isinstance(dim, int):
                dims.add(dim)
        if len(dims) > 1:
            raise RuleDoesNotApply("index-map", f"letter '{letter}' has sizes {sorted(dims)} (a broadcast letter)")
        if not dims:
            return None  # an untracked index of unknown size: nothing moves on it
        size = dims.pop()
        data = [(slot, axis) for slot, axis in places if not ctx.is_const(slot)]
        constants = [(slot, axis) for slot, axis in places if ctx.is_const(slot)]
        expr: Expr
        if data:
            expr = ctx.take(*data[0], size)
            for slot, axis in data[1:]:
                ctx.unify(expr, ctx.take(slot, axis, size))
        elif in_output and size > 1:
            expr = ctx.new_group(size)  # a new neuron axis the weights make
        else:
            return None  # contracted between constants: nothing that moves reads it
        if size > 1:
            role = "einsum weight" if not data else "einsum weight (input features)"
            for slot, axis in constants:
                ctx.bind(slot, axis, expr, f"{role}, letter '{letter}'")
        return expr

    @staticmethod
    def _ellipsis_axis(ctx: RuleContext, ellipses: list[tuple[int, int, int]], batch: int, offset: int) -> Expr | None:
        """One broadcast ellipsis dimension (counted from the left of the output's): coupled like a batch axis."""
        operands = [
            (slot, first + offset - (batch - width)) for slot, first, width in ellipses if offset >= batch - width
        ]
        tracked = [ctx.tracked(slot)[axis] for slot, axis in operands if axis in ctx.tracked(slot)]
        if not tracked:
            return None
        expr = tracked[0]
        for slot, axis in operands:
            if axis in ctx.tracked(slot):
                ctx.unify(expr, ctx.take(slot, axis))
                continue
            dim = (ctx.shape_in(slot) or ())[axis]
            if dim == 1:
                continue  # broadcast: every entry sees the same slice
            if not isinstance(dim, int):
                raise RuleDoesNotApply(
                    "unknown-shape", f"cannot tell whether '{ctx.input(slot)}' broadcasts on axis {axis}"
                )
            if ctx.is_const(slot):
                ctx.bind(slot, axis, expr, "einsum constant (broadcast dimension)")
            else:
                ctx.unify(expr, ctx.take(slot, axis, expr.size))
        return expr


def einsum_weight_axes(
    equation: str, num_inputs: int, slot: int, rank: int, constant: Callable[[int], bool]
) -> tuple[list[int], list[int]] | None:
    """The producer and consumer axes of constant operand ``slot`` of an Einsum, for readers of its weights.

    Producer axes carry letters only constants and the output have (the neurons the Einsum
    makes); consumer axes carry letters contracted with a data operand (the channels it reads).
    ``constant(i)`` says whether operand ``i`` is a constant. None where the equation cannot be
    read or the operand is not a plain weight (an ellipsis, a repeated letter, a rank mismatch).
    """
    try:
        inputs, (out_letters, _) = parse_equation(equation, num_inputs)
    except RuleDoesNotApply:
        return None
    if not 0 <= slot < num_inputs or not constant(slot):
        return None
    term, position = inputs[slot]
    if position is not None or len(term) != rank or len(set(term)) != len(term):
        return None
    data = set("".join(letters for index, (letters, _) in enumerate(inputs) if not constant(index)))
    if not data:
        return None
    producer = [axis for axis, letter in enumerate(term) if letter in out_letters and letter not in data]
    consumer = [axis for axis, letter in enumerate(term) if letter in data and letter not in out_letters]
    return producer, consumer


def einsum_batch_axes(
    equation: str, num_inputs: int, slot: int, rank: int, constant: Callable[[int], bool]
) -> list[int] | None:
    """The batch axes of constant operand ``slot`` of an Einsum: letters also on a data operand and the output.

    A per-head weight's ``h`` of ``bhsd,hdf->bhsf`` is one: one weight per head, as a batched
    MatMul's ``[heads, in, out]`` weight holds. None where :func:`einsum_weight_axes` reads no weight.
    """
    if einsum_weight_axes(equation, num_inputs, slot, rank, constant) is None:
        return None
    inputs, (out_letters, _) = parse_equation(equation, num_inputs)  # readable: einsum_weight_axes read it
    data = set("".join(letters for index, (letters, _) in enumerate(inputs) if not constant(index)))
    return [axis for axis, letter in enumerate(inputs[slot][0]) if letter in data and letter in out_letters]


def einsum_equation(node: onnx.NodeProto) -> str:
    """An Einsum node's equation as text ('' when it has none)."""
    equation = node_attribute(node, "equation", b"")
    return equation.decode("utf-8", "replace") if isinstance(equation, bytes) else str(equation)
