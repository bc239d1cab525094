"""Axes along which a computed tensor is the same everywhere: broadcast copies.

``repeat_kv`` of multi-query and grouped-query attention (``x[:, :, None].expand(...)
.reshape(...)``, or ``Tile`` of the new axis: ``repeat_interleave``) and a broadcast mask made explicit by ``Expand`` give tensors whose slices
along an axis are all equal: every position of that axis holds a copy of one slice. Permuting
such an axis changes nothing, so a rule may couple it with any permutation (the query heads
that share one key/value head) without permuting anything there. The facts come from the graph
alone (operator types and static shapes), never from values: they hold for every weight.

Where a fact cannot be proven (an unknown shape, an operator not listed here) the axis is not
uniform: the caller then keeps the identity, as before.
"""

from __future__ import annotations

import math

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph, Shape

#: Operators whose output, at each position, is a function of the input at the same position.
_ELEMENTWISE_UNARY = frozenset({
    "Identity", "Cast", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal",
    "Erf", "Gelu", "Softplus", "Sign", "Floor", "Ceil", "Round", "Not",
})  # fmt: skip
#: Broadcasting element-wise operators: an output axis is uniform where every input is.
_ELEMENTWISE_BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater", "And", "Or",
})  # fmt: skip
#: How far back a fact is looked for (a chain of layout operators is a handful of nodes).
_MAX_DEPTH = 32


def uniform_axes(graph: ModelGraph, name: str, cache: dict[str, frozenset[int]]) -> frozenset[int]:
    """The axes (non-negative) along which tensor ``name`` holds equal slices, for every weight.

    Args:
        graph: The model's graph (static shapes must be known for the facts to be found).
        name: A tensor of the main graph or of a subgraph.
        cache: Facts already found, by tensor name (shared across calls of one analysis).

    Returns:
        The uniform axes; empty where nothing can be proven.
    """
    return _uniform(graph, name, cache, 0)


def _uniform(graph: ModelGraph, name: str, cache: dict[str, frozenset[int]], depth: int) -> frozenset[int]:
    found = cache.get(name)
    if found is not None:
        return found
    result = frozenset() if depth > _MAX_DEPTH else _find(graph, name, cache, depth)
    cache[name] = result
    return result


def _find(graph: ModelGraph, name: str, cache: dict[str, frozenset[int]], depth: int) -> frozenset[int]:
    produced = graph.producer.get(name)
    out_shape = graph.shape(name)
    if produced is None or out_shape is None:
        return frozenset()
    index, slot = produced
    op_type, domain = graph.op_of(index)
    if domain not in ("", "ai.onnx") or slot != 0:
        return frozenset()
    node = graph.nodes[index]
    inputs = graph.input_names(index)
    source = inputs[0] if inputs else ""
    in_shape = graph.shape(source) if source else None
    if in_shape is None:
        return frozenset()
    rank_in, rank_out = len(in_shape), len(out_shape)
    if op_type == "Expand":
        shift = rank_out - rank_in
        if shift < 0:
            return frozenset()
        before = _uniform(graph, source, cache, depth + 1)
        # A new leading axis or a size-1 axis is broadcast: every position is the one slice.
        return frozenset(
            a for a in range(rank_out) if a < shift or in_shape[a - shift] == 1 or (a - shift) in before
        )
    if op_type in _ELEMENTWISE_UNARY:
        return _uniform(graph, source, cache, depth + 1) if rank_in == rank_out else frozenset()
    if op_type in _ELEMENTWISE_BROADCAST:
        return _broadcast(graph, inputs, rank_out, cache, depth)
    if op_type == "Transpose":
        perm = node_attribute(node, "perm")
        order = list(perm) if perm is not None else list(reversed(range(rank_in)))
        if sorted(order) != list(range(rank_in)) or rank_out != rank_in:
            return frozenset()
        before = _uniform(graph, source, cache, depth + 1)
        return frozenset(j for j, a in enumerate(order) if a in before)
    if op_type == "Tile":
        # An axis of size 1 tiled is copies of its one slice; a uniform axis tiled stays uniform.
        if rank_in != rank_out:
            return frozenset()
        before = _uniform(graph, source, cache, depth + 1)
        return frozenset(a for a in range(rank_out) if out_shape[a] != 1 and (in_shape[a] == 1 or a in before))
    if op_type in ("Unsqueeze", "Squeeze"):
        return _unsqueeze(graph, index, in_shape, out_shape, _uniform(graph, source, cache, depth + 1))
    if op_type == "Reshape":
        return _reshape(in_shape, out_shape, _uniform(graph, source, cache, depth + 1))
    return frozenset()


def _broadcast(
    graph: ModelGraph, inputs: tuple[str, ...], rank_out: int, cache: dict[str, frozenset[int]], depth: int
) -> frozenset[int]:
    """Output axes along which every input is uniform, of size 1 or absent (right-aligned)."""
    result = set(range(rank_out))
    for name in inputs:
        if not name:
            continue
        shape = graph.shape(name)
        if shape is None:
            return frozenset()
        shift = rank_out - len(shape)
        own = _uniform(graph, name, cache, depth + 1) if not graph.is_constant(name) else frozenset()
        result = {a for a in result if a < shift or shape[a - shift] == 1 or (a - shift) in own}
    return frozenset(result)


def _unsqueeze(
    graph: ModelGraph, index: int, in_shape: Shape, out_shape: Shape, before: frozenset[int]
) -> frozenset[int]:
    """Uniform axes after Squeeze/Unsqueeze: the kept axes keep their facts, in order; new axes have size 1."""
    node = graph.nodes[index]
    squeeze = node.op_type == "Squeeze"
    rank = len(out_shape) if not squeeze else len(in_shape)
    axes = node_attribute(node, "axes")
    inputs = graph.input_names(index)
    if axes is None and len(inputs) > 1 and inputs[1]:
        value = graph.constant_value(inputs[1])
        if value is None:
            return frozenset()
        axes = value.reshape(-1).tolist()
    if axes is None:
        if not squeeze:
            return frozenset()
        axes = [a for a, dim in enumerate(in_shape) if dim == 1]
    moved = {int(a) % rank for a in axes} if rank else set()
    if squeeze:
        kept = [a for a in range(len(in_shape)) if a not in moved]
        if len(kept) != len(out_shape):
            return frozenset()
        return frozenset(j for j, a in enumerate(kept) if a in before)
    kept = [j for j in range(len(out_shape)) if j not in moved]
    if len(kept) != len(in_shape):
        return frozenset()
    return frozenset(moved | {j for a, j in enumerate(kept) if a in before})


def _reshape(in_shape: Shape, out_shape: Shape, before: frozenset[int]) -> frozenset[int]:
    """Uniform axes after a Reshape: an output axis all of whose elements vary only along uniform input axes.

    Leading and trailing axes that agree (an int or the same symbolic name) map one to one; the
    known dims between them are matched digit by digit (row-major, size-1 axes own no digit). An
    output axis is uniform when each of its digits lies in a uniform input axis.
    """
    rank_in, rank_out = len(in_shape), len(out_shape)
    lead, trail = agreeing_ends(in_shape, out_shape)
    result = {a for a in range(lead) if a in before}
    result |= {rank_out - 1 - k for k in range(trail) if rank_in - 1 - k in before}
    middle_in = list(in_shape[lead : rank_in - trail])
    middle_out = list(out_shape[lead : rank_out - trail])
    if not all(isinstance(d, int) for d in (*middle_in, *middle_out)):
        return frozenset(result)
    if math.prod(middle_in) != math.prod(middle_out):  # type: ignore[arg-type]
        return frozenset(result)
    # Each output axis's elements, as (input axis) digits: uniform iff all its digits are.
    owners = _digit_owners([int(d) for d in middle_in], [int(d) for d in middle_out])  # type: ignore[arg-type]
    if owners is None:
        return frozenset(result)
    for j, dim in enumerate(middle_out):
        sources = owners.get(j, set())
        if dim == 1 or all(lead + i in before for i in sources):
            result.add(lead + j)
    return frozenset(result)


def _digit_owners(dims_in: list[int], dims_out: list[int]) -> dict[int, set[int]] | None:
    """For each output axis, the input axes its row-major digits come from; None if no common radix."""
    common = common_digits(dims_in, dims_out)
    if common is None:
        return None
    owners: dict[int, set[int]] = {}
    for (i, _), (j, _) in zip(*common):
        owners.setdefault(j, set()).add(i)
    return owners


def common_digits(
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


def agreeing_ends(in_shape: Shape, out_shape: Shape) -> tuple[int, int]:
    """How many leading and trailing axes of a Reshape agree (an int or the same symbolic name).

    Those map one to one; only the axes between them are regrouped (the trailing count never
    overlaps the leading one).
    """
    rank_in, rank_out = len(in_shape), len(out_shape)
    lead = 0
    while lead < min(rank_in, rank_out) and _same(in_shape[lead], out_shape[lead]):
        lead += 1
    trail = 0
    while trail < min(rank_in, rank_out) - lead and _same(in_shape[-1 - trail], out_shape[-1 - trail]):
        trail += 1
    return lead, trail
