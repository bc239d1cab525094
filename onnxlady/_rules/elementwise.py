"""Element-wise operators: unary ones pass every channel space through; broadcasting ones couple.

Broadcasting (Add, Mul, Where, ...): shapes align from the right. On each output axis, every
input that has that axis at full size must take the same permutation: computed inputs are
coupled (residual connections, squeeze-and-excitation gates), constants are permuted along,
inputs of size 1 there are broadcast and unaffected.
"""

from __future__ import annotations

from onnxlady._graph._expr import Expr, Fixed
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._derived import derived_uses, reduced_along
from onnxlady._rules._registry import OpRule, register


@register
class UnaryRule(OpRule):
    """Element-wise with one data input; other inputs are scalars or type carriers."""

    op_types = (
        "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
        "Celu", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Shrink", "Erf", "Sqrt",
        "Exp", "Log", "Neg", "Abs", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
        "Not", "IsNaN", "IsInf", "Identity", "Cast", "CastLike", "Clip", "Softmax", "LogSoftmax",
        "LpNormalization", "Dropout",
    )  # fmt: skip

    def propagate(self, ctx: RuleContext) -> None:
        for slot in range(1, ctx.num_inputs):
            if ctx.tracked(slot) and ctx.op_type != "CastLike":
                raise RuleDoesNotApply("blocking", f"input {slot} carries channels where a scalar is expected")
            ctx.take_all(slot)  # CastLike's second input only gives a dtype
        for axis, expr in ctx.take_all(0).items():
            ctx.emit(0, axis, expr)
            if ctx.op_type == "Dropout":
                ctx.emit(1, axis, expr)  # the mask has the data's shape


@register
class BroadcastRule(OpRule):
    """Multi-input element-wise operators with numpy broadcasting.

    A computed operand whose size along an axis is unknown (or whose rank is unknown: a Loop
    output) may or may not broadcast there: the permutation on that axis must be the identity,
    so that axis freezes; the other axes are coupled as usual. Only when the output's rank
    cannot be known either does the rule give up.
    """

    op_types = (
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Mod",
        "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
    )  # fmt: skip

    def propagate(self, ctx: RuleContext) -> None:
        # Each operand read once (every node of a deep network goes through here): its shape,
        # whether it is a constant and the spaces it carries; what the checks below need is
        # counted in the same pass (no comprehension per question).
        slots: list[int] = []
        operands: dict[int, _Operand] = {}
        constants = 0
        carried = unknown_rank = False
        top_rank = 0  # the highest known rank (the output's, when every rank is known)
        names: set[str] = set()
        tracked = ctx.state_tracked
        for slot, name in enumerate(ctx.input_names):
            if name:
                operand = operands[slot] = _Operand(ctx, name, tracked)
                slots.append(slot)
                names.add(name)
                constants += operand.const
                carried = carried or bool(operand.spaces)
                rank = operand.rank
                if rank is None:  # (rank None: shape None)
                    unknown_rank = True
                elif rank > top_rank:
                    top_rank = rank
        if not carried and not (constants and constants < len(slots)):
            return
        if not carried and unknown_rank:
            return  # nothing to carry, and no shapes to find a new axis with
        if unknown_rank:
            out_rank = ctx.rank_out(0)  # raises when the output's rank is unknown too
            for slot in slots:
                if operands[slot].rank is None:
                    # Its axes cannot be placed: what it carries cannot move.
                    for expr in ctx.take_all(slot).values():
                        ctx.freeze(expr, "unknown-shape", f"the rank of '{ctx.input(slot)}' is unknown")
        else:
            out_rank = top_rank  # (every rank known here)
        # A take may start a state input's space (KV caches): one operand read twice (x * x)
        # must then see it at its other slot, so its spaces are read again at each axis.
        again = len(names) < len(slots)
        for out_axis in range(out_rank):
            self._couple_axis(ctx, slots, operands, out_rank, out_axis, again)

    @staticmethod
    def _couple_axis(
        ctx: RuleContext, slots: list[int], operands: dict[int, _Operand], out_rank: int, out_axis: int, again: bool
    ) -> None:
        tracked: list[Expr] = []
        constants: list[tuple[int, int]] = []
        computed: list[tuple[int, int]] = []
        reduced: list[tuple[int, int]] = []  # constants reduced over this axis, broadcast back
        uncertain: list[str] = []  # computed operands that may or may not broadcast here
        for slot in slots:
            operand = operands[slot]
            rank = operand.rank
            if rank is None:
                uncertain.append(operand.name)
                continue
            axis = out_axis - (out_rank - rank)
            if axis < 0:
                continue
            spaces = ctx.tracked(slot) if again else operand.spaces
            if axis in spaces:
                tracked.append(ctx.take(slot, axis))
                continue
            dim = operand.shape[axis]  # type: ignore[index]  # (known: its rank is)
            if dim == 1:
                if not operand.const and ctx.graph.constant_derived(operand.name) and reduced_along(ctx.graph, operand.name, axis):
                    reduced.append((slot, axis))
                continue  # broadcast along this axis: unaffected by its permutation
            if operand.const:
                constants.append((slot, axis))
            elif isinstance(dim, int):
                computed.append((slot, axis))
            else:
                uncertain.append(operand.name)
        if not tracked:
            # Tensors computed from constants only (Mamba's A = -exp(A_log)) count as constants
            # here where their constants can follow (see RuleContext.take).
            derived = [(slot, axis) for slot, axis in computed if _follows_constants(ctx, operands[slot].name, slot, axis)]
            # (A computed operand that is no such tensor must be there, broadcast: else the
            # result is computed from constants too, and nothing it reaches is a neuron.)
            activations = (
                any(not operands[slot].const and not ctx.graph.constant_derived(operands[slot].name) for slot in slots)
                if derived
                else len(constants) < len(slots)
            )
            if (constants or derived) and len(derived) == len(computed) and not uncertain and activations:
                # Constants vary along an axis every computed input broadcasts over: the axis is
                # new here, like a producer's (a LayerNorm gamma times a broadcast inverse std).
                first_slot, first_axis = (constants or derived)[0]
                size = operands[first_slot].shape[first_axis]  # type: ignore[index]
                if not isinstance(size, int):
                    raise RuleDoesNotApply("unknown-shape", f"the size of axis {first_axis} of '{ctx.input(first_slot)}' is unknown")
                group = ctx.new_group(size)
                for slot, axis in derived:
                    ctx.unify(group, ctx.take(slot, axis, size))
                for slot, axis in constants:
                    ctx.bind(slot, axis, group, f"{ctx.op_type.lower()} operand")
                _reduced_alike(ctx, reduced, group)
                ctx.emit(0, out_axis, group)
            return
        expr = tracked[0]
        for other in tracked[1:]:
            ctx.unify(expr, other)
        for slot, axis in computed:
            ctx.unify(expr, ctx.take(slot, axis, expr.size))
        if uncertain:
            names = ", ".join(f"'{name}'" for name in uncertain)
            ctx.freeze(expr, "unknown-shape", f"cannot tell whether {names} broadcasts on output axis {out_axis}")
        for slot, axis in constants:
            ctx.bind(slot, axis, expr, f"{ctx.op_type.lower()} operand")
        _reduced_alike(ctx, reduced, expr)
        ctx.emit(0, out_axis, expr)


def _reduced_alike(ctx: RuleContext, reduced: list[tuple[int, int]], expr: Expr) -> None:
    """Move the constants a broadcast operand reduces over the axis (weight norm's ``v`` in ``v / ReduceL2(v)``) with it.

    The reduction is the same whatever their order along the axis, so the operand stays
    unchanged; their use there then takes the permutation the other uses of the same constant
    take, and no copy of it is left in its stored order. Where the walk cannot reach them it
    stays as it is (the operand is broadcast: nothing it computes moves).
    """
    for slot, axis in reduced:
        taken = ctx.take(slot, axis, expr.size)
        if not isinstance(taken, Fixed):
            ctx.unify(expr, taken)


def _follows_constants(ctx: RuleContext, name: str, slot: int, axis: int) -> bool:
    """Whether computed operand ``name`` is made of constants that a permutation of ``axis`` can reach."""
    graph = ctx.graph
    return graph.constant_derived(name) and derived_uses(graph, name, axis, ctx.index, slot) is not None


class _Operand:
    """What :class:`BroadcastRule` reads of one input: its name, shape, rank, constness and spaces."""

    __slots__ = ("const", "name", "rank", "shape", "spaces")

    def __init__(self, ctx: RuleContext, name: str, tracked: dict[str, dict[int, Expr]]) -> None:
        # (ctx.shape_in, ctx.is_const and ctx.tracked, read from the name once: a named input's)
        self.name = name
        graph = ctx.graph
        shape = self.shape = graph.shapes.get(name)
        self.rank = None if shape is None else len(shape)
        self.const = graph.is_constant(name)
        spaces = tracked.get(name)
        self.spaces = dict(spaces) if spaces else {}  # (a copy, as ctx.tracked gives)
