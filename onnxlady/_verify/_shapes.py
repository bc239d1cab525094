"""Concrete shapes for a model's inputs: what the user gave, what the graph pins, then defaults.

A dynamic dimension takes, in this order: the user's override (``--shape``); a size the graph
pins (a MatMul/Gemm/Conv/normalization with a constant weight, an element-wise op with a
constant of that size, a Reshape to a constant shape, a constant table gathered by the input);
the size of another input's dimension with the same symbolic name (``sequence``); and last a
default: 1 for the first axis (the batch), 64 elsewhere, no more than the rows of a position
table (a constant table gathered at positions computed from an input's shape).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._graph._attributes import node_attribute
from onnxlady._verify._models import GraphIndex, declared_dims, dim_symbols, fed_inputs, op_set

#: Default for an unknown (symbolic) dimension other than the first one.
UNKNOWN_DIM: int = 64

#: Ops whose output has their first input's shape (extra inputs are scales, bounds, slopes).
_SAME_SHAPE = op_set(
    "Abs BatchNormalization Cast Ceil Celu Clip Cos Dropout Elu Erf Exp Floor Gelu HardSigmoid HardSwish "
    "Identity InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Log LogSoftmax Mish Neg Not "
    "Reciprocal Relu Round Selu Sigmoid Sign Sin Softmax Softplus Softsign Sqrt Tanh ThresholdedRelu"
)
#: Element-wise ops that broadcast their operands (NumPy rules).
BROADCAST = op_set(
    "Add And BitShift Div Equal Greater GreaterOrEqual Less LessOrEqual Max Min Mod Mul Or PRelu Pow Sub Where Xor"
)


@dataclass(frozen=True)
class ShapeChoice:
    """The shape fed to one input and how its dynamic dimensions were chosen."""

    shape: tuple[int, ...]
    #: One line per dynamic dimension: its size and why (``dim 1 (sequence) = 16: ...``).
    notes: tuple[str, ...]
    #: Axes set to a default because nothing pinned them: the first suspects when a model fails.
    guessed: tuple[int, ...]


def parse_shape_overrides(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME:1x3x224x224`` shape overrides for graph inputs.

    The name is everything before the *last* colon, so input names that contain colons (as
    exported by TensorFlow, e.g. ``input:0``) work. Dimensions are positive integers separated by
    ``x`` (``,`` is accepted too, as are surrounding brackets: ``NAME:[1,3,224,224]``).

    Raises:
        OnnxladyError: a malformed spec or a name given twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = str(spec).rpartition(":")
        if not sep or not name:
            raise OnnxladyError(f"bad shape override {spec!r}: expected NAME:DIMS, e.g. input:1x3x224x224")
        text = dims_text.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        parts = [p.strip() for p in re.split(r"[x,]", text)] if text else []
        if not parts or any(not re.fullmatch(r"[0-9]+", p) for p in parts):
            raise OnnxladyError(
                f"bad shape override {spec!r}: dimensions must be positive integers separated by 'x', "
                "e.g. input:1x3x224x224"
            )
        dims = tuple(int(p) for p in parts)
        if any(d < 1 for d in dims):
            raise OnnxladyError(f"bad shape override {spec!r}: every dimension must be at least 1")
        if name in shapes:
            raise OnnxladyError(f"shape override for input {name!r} given more than once")
        shapes[name] = dims
    return shapes


def _checked_overrides(
    inputs: Sequence[onnx.ValueInfoProto], shapes: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    overrides = {str(k): tuple(int(d) for d in v) for k, v in (shapes or {}).items()}
    known = {vi.name: vi for vi in inputs}
    for name, override in overrides.items():
        vi = known.get(name)
        if vi is None:
            listing = ", ".join(repr(n) for n in sorted(known)) or "none"
            raise OnnxladyError(f"shape override for unknown input {name!r} (the model's inputs: {listing})")
        if any(d < 0 for d in override):
            raise OnnxladyError(f"shape override for input {name!r} has a negative dimension: {override}")
        dims = declared_dims(vi)
        if dims is None:
            continue
        if len(override) != len(dims):
            raise OnnxladyError(
                f"shape override for input {name!r} has rank {len(override)} but the model declares rank {len(dims)}"
            )
        for axis, (want, fixed) in enumerate(zip(override, dims)):
            if fixed is not None and want != fixed:
                raise OnnxladyError(
                    f"shape override for input {name!r} sets dimension {axis} to {want} but the model fixes it at {fixed}"
                )
    return overrides


def resolve_shapes(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None, index: GraphIndex | None = None
) -> dict[str, ShapeChoice]:
    """Choose a concrete shape for every fed input of ``model`` (see the module docstring for the order).

    Args:
        model: The model (its graph is read, not changed).
        shapes: User overrides by input name; each must match the declared rank and fixed dims.
        index: The model's :class:`GraphIndex`, when the caller has one already.

    Returns:
        One :class:`ShapeChoice` per fed input, in graph order.

    Raises:
        OnnxladyError: an override for an unknown input, of the wrong rank, contradicting a fixed
            dimension, or an input without a declared shape and no override.
    """
    inputs = fed_inputs(model)
    overrides = _checked_overrides(inputs, shapes)
    index = index or GraphIndex(model)
    dims: dict[str, list[int | None]] = {}
    symbols = {vi.name: dim_symbols(vi) for vi in inputs}
    notes: dict[str, dict[int, str]] = {vi.name: {} for vi in inputs}
    bound: dict[str, tuple[int, str]] = {}  # symbol -> (size, where it came from)
    for vi in inputs:
        override = overrides.get(vi.name)
        declared = declared_dims(vi)
        if override is not None:
            dims[vi.name] = list(override)
            for axis in range(len(override)):
                if declared is None or declared[axis] is None:
                    notes[vi.name][axis] = "given"
        elif declared is None:
            raise OnnxladyError(f"input {vi.name!r} has no declared shape: give one with a shape override")
        else:
            dims[vi.name] = list(declared)

    def symbol(name: str, axis: int) -> str | None:
        names = symbols[name]
        return names[axis] if axis < len(names) else None

    def settle(name: str, axis: int, size: int, why: str) -> bool:
        if dims[name][axis] is not None:
            return False
        dims[name][axis] = size
        notes[name][axis] = why
        sym = symbol(name, axis)
        if sym is not None and sym not in bound:
            bound[sym] = (size, f"input {name!r}")
        return True

    for name, override in overrides.items():
        for axis, given in enumerate(override):
            sym = symbol(name, axis)
            if sym is not None:
                bound.setdefault(sym, (given, f"input {name!r}"))

    pins, products = _graph_pins(index, dims)

    def propagate() -> None:
        """Apply pins, shared symbols and Reshape products until nothing changes."""
        changed = True
        while changed:
            changed = False
            for (name, axis), (size, why) in pins.items():
                changed |= settle(name, axis, size, why)
            for name, sizes in dims.items():
                for axis, current in enumerate(list(sizes)):
                    sym = symbol(name, axis)
                    if current is None and sym is not None and sym in bound:
                        value, origin = bound[sym]
                        changed |= settle(name, axis, value, f"shared with {origin}")
            for name, axes, total, why in products:
                unknown = [a for a in axes if dims[name][a] is None]
                if len(unknown) == 1:
                    known = 1
                    for a in axes:
                        known *= int(dims[name][a] or 1) if a != unknown[0] else 1
                    if total % known == 0 and total // known >= 1:
                        changed |= settle(name, unknown[0], total // known, why)

    propagate()
    guessed: dict[str, list[int]] = {vi.name: [] for vi in inputs}
    # Batch sizes first: a Reshape product or a shared symbol may then settle the other dims.
    for vi in inputs:
        if dims[vi.name] and dims[vi.name][0] is None:
            guessed[vi.name].append(0)
            settle(vi.name, 0, 1, "default batch size (nothing in the graph pins it)")
    propagate()
    limit = _position_limit(index, list(dims))
    for vi in inputs:
        for axis, current in enumerate(list(dims[vi.name])):
            if current is not None:
                continue
            guessed[vi.name].append(axis)
            if vi.name in limit and limit[vi.name][0] < UNKNOWN_DIM:
                rows, table = limit[vi.name]
                settle(vi.name, axis, rows, f"the position table {table!r} holds {rows} rows")
            else:
                settle(vi.name, axis, UNKNOWN_DIM, "default (nothing in the graph pins it)")
            propagate()

    choices: dict[str, ShapeChoice] = {}
    for vi in inputs:
        shape = tuple(int(d) for d in dims[vi.name])  # type: ignore[arg-type]
        lines = []
        for axis, why in sorted(notes[vi.name].items()):
            sym = symbol(vi.name, axis)
            lines.append(f"dim {axis}{f' ({sym})' if sym else ''} = {shape[axis]}: {why}")
        choices[vi.name] = ShapeChoice(shape, tuple(lines), tuple(sorted(guessed[vi.name])))
    return choices


def _const_shape(index: GraphIndex, name: str) -> tuple[int, ...] | None:
    return index.shapes.get(name) if name else None


def _trace(index: GraphIndex, start: str, rank: int) -> Iterator[tuple[onnx.NodeProto, int, dict[int, int], int]]:
    """Follow an input through shape-keeping ops: ``(consumer, position, tensor axis -> input axis, rank)``."""
    frontier = [(start, {a: a for a in range(rank)}, rank)]
    seen = {start}
    while frontier:
        tensor, axes, tensor_rank = frontier.pop()
        for node, position in index.consumers.get(tensor, []):
            yield node, position, axes, tensor_rank
            out: tuple[dict[int, int], int] | None = None
            if node.op_type in _SAME_SHAPE and position == 0:
                out = (axes, tensor_rank)
            elif node.op_type in BROADCAST:
                others = [_const_shape(index, n) for i, n in enumerate(node.input) if i != position and n]
                if all(s is not None for s in others):
                    out_rank = max([tensor_rank] + [len(s) for s in others if s is not None])
                    shift = out_rank - tensor_rank
                    out = ({a + shift: v for a, v in axes.items()}, out_rank)
            elif node.op_type == "Gather" and position == 1 and _const_shape(index, node.input[0]):
                data_rank = len(_const_shape(index, node.input[0]) or ())
                axis = int(index.attribute(node, "axis", 0) or 0) % max(data_rank, 1)
                out = ({a + axis: v for a, v in axes.items()}, data_rank - 1 + tensor_rank)
            elif node.op_type == "Transpose" and position == 0:
                perm = [int(p) for p in node_attribute(node, "perm", [])] or list(reversed(range(tensor_rank)))
                out = ({j: axes[p] for j, p in enumerate(perm) if p in axes}, tensor_rank)
            if out is not None and node.output and node.output[0] and node.output[0] not in seen:
                seen.add(node.output[0])
                frontier.append((node.output[0], out[0], out[1]))


def _graph_pins(
    index: GraphIndex, dims: Mapping[str, Sequence[int | None]]
) -> tuple[dict[tuple[str, int], tuple[int, str]], list[tuple[str, list[int], int, str]]]:
    """Sizes the graph fixes for unknown input dims, and Reshape-to-constant product constraints."""
    pins: dict[tuple[str, int], tuple[int, str]] = {}
    products: list[tuple[str, list[int], int, str]] = []
    for name, input_dims in dims.items():
        if all(d is not None for d in input_dims):
            continue
        rank = len(input_dims)
        for node, position, axes, tensor_rank in _trace(index, name, rank):
            for tensor_axis, size, why in _node_pins(index, node, position, tensor_rank):
                input_axis = axes.get(tensor_axis)
                if input_axis is not None and input_dims[input_axis] is None and size >= 1:
                    pins.setdefault((name, input_axis), (size, why))
            if node.op_type == "Reshape" and position == 0 and len(axes) == tensor_rank:
                target = index.value(node.input[1]) if len(node.input) > 1 else None
                if target is None or target.ndim != 1 or np.any(target < 0):
                    continue
                copied = {i for i, t in enumerate(target.tolist()) if t == 0}
                if int(index.attribute(node, "allowzero", 0) or 0):
                    continue
                total = int(np.prod([t for t in target.tolist() if t != 0], dtype=np.int64))
                kept = [axes[a] for a in range(tensor_rank) if a not in copied]
                products.append((name, kept, total, f"Reshape to the constant shape {target.tolist()}"))
    return pins, products


def _node_pins(index: GraphIndex, node: onnx.NodeProto, position: int, rank: int) -> list[tuple[int, int, str]]:
    """``(tensor axis, size, why)`` for each axis of the tensor at ``position`` that ``node``'s constants fix."""
    op = node.op_type
    inputs = list(node.input)

    def const(i: int) -> tuple[int, ...] | None:
        return _const_shape(index, inputs[i]) if i < len(inputs) else None

    found: list[tuple[int, int, str]] = []
    if op == "MatMul":
        other = const(1 - position)
        if other is not None and len(other) >= 2 and rank >= 1:
            if position == 0:
                found.append((rank - 1, other[-2], f"MatMul with the constant {inputs[1]!r} {list(other)}"))
            elif rank >= 2:
                found.append((rank - 2, other[-1], f"MatMul with the constant {inputs[0]!r} {list(other)}"))
    elif op == "Gemm" and position == 0 and rank == 2:
        weight = const(1)
        if weight is not None and len(weight) == 2:
            trans_a, trans_b = (index.attribute(node, "transA", 0), index.attribute(node, "transB", 0))
            found.append((0 if trans_a else 1, weight[1 if trans_b else 0], f"Gemm with the constant {inputs[1]!r}"))
    elif op in ("Conv", "ConvTranspose") and position == 0 and rank >= 3:
        weight = const(1)
        if weight is not None and len(weight) == rank:
            group = int(index.attribute(node, "group", 1) or 1)
            channels = weight[1] * group if op == "Conv" else weight[0]
            found.append((1, channels, f"{op} with the constant weight {inputs[1]!r} {list(weight)}"))
    elif op in ("BatchNormalization", "InstanceNormalization") and position == 0 and rank >= 2:
        scale = const(1)
        if scale is not None and len(scale) == 1:
            found.append((1, scale[0], f"{op} with the constant scale {inputs[1]!r}"))
    elif op == "LayerNormalization" and position == 0:
        scale = const(1)
        axis = int(index.attribute(node, "axis", -1) or -1) % max(rank, 1)
        if scale is not None and len(scale) == rank - axis:
            found.extend(
                (axis + k, size, f"LayerNormalization with the constant scale {inputs[1]!r}")
                for k, size in enumerate(scale)
            )
    elif op in _CACHE_SLOTS and position in _CACHE_SLOTS[op] and rank == 4:
        found.extend(_cache_pins(index, node))
    elif op in BROADCAST:
        for i, name in enumerate(inputs):
            other = const(i) if i != position else None
            if other is None:
                continue
            for k, size in enumerate(other):
                tensor_axis = k - len(other) + rank
                if size > 1 and 0 <= tensor_axis < rank:
                    found.append((tensor_axis, size, f"{op} with the constant {name!r} {list(other)}"))
    return found


#: Attention operators (com.microsoft) and the input slots of their past key and value caches,
#: each ``[batch, kv heads, past length, head size]``.
_CACHE_SLOTS = {"GroupQueryAttention": (3, 4), "MultiHeadAttention": (6, 7)}


def _cache_pins(index: GraphIndex, node: onnx.NodeProto) -> list[tuple[int, int, str]]:
    """Heads and head size of an attention node's KV cache, read off its attributes and projections.

    The genai builder names the head size ``kv_cache_dim`` and nothing else in the graph pins
    it: it is the width of the query projection over the heads it holds (Q alone, or Q, K and V
    packed when the key input is empty).
    """
    op = node.op_type
    heads = int(index.attribute(node, "num_heads", 0) or 0)
    kv_heads = int(index.attribute(node, "kv_num_heads", 0) or 0) if op == "GroupQueryAttention" else heads
    found: list[tuple[int, int, str]] = []
    if kv_heads > 0:
        found.append((1, kv_heads, f"{op} {node.name!r} with {kv_heads} KV heads"))
    packed = len(node.input) < 2 or not node.input[1]
    width = _projection_width(index, node.input[0]) if node.input else None
    columns = heads + 2 * kv_heads if packed else heads
    if width is not None and columns > 0 and width % columns == 0:
        found.append((3, width // columns, f"{op} {node.name!r}: query projection of width {width} over {columns} heads"))
    return found


def _projection_width(index: GraphIndex, name: str, depth: int = 3) -> int | None:
    """Output width of the linear layer making ``name`` (through a bias Add), or None."""
    node = index.any_producer.get(name)
    if node is None or depth == 0:
        return None
    weight = index.shapes.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type == "MatMulNBits":
        return int(index.attribute(node, "N", 0) or 0) or None
    if node.op_type in ("MatMul", "FusedMatMul") and weight is not None and len(weight) >= 2:
        return int(weight[-1])
    if node.op_type == "Gemm" and weight is not None and len(weight) == 2:
        return int(weight[0] if index.attribute(node, "transB", 0) else weight[1])
    if node.op_type == "Add":
        computed = [n for n in node.input if n and not index.is_constant(n)]
        if len(computed) == 1:
            return _projection_width(index, computed[0], depth - 1)
    return None


def _position_limit(index: GraphIndex, input_names: Sequence[str]) -> dict[str, tuple[int, str]]:
    """For inputs whose length indexes a position table: ``(rows of the smallest such table, its name)``.

    A position table is a constant gathered (or sliced) at positions computed from a ``Shape`` of
    the graph, not fed: its rows bound the sequence length the model accepts.
    """
    fed = set(input_names)
    limits: dict[str, tuple[int, str]] = {}
    for node in index.nodes:
        found = _table_read(index, node)
        if found is None:
            continue
        table, rows, positions = found
        sources, via_shape = _ancestors(index, positions, fed)
        if sources and via_shape:
            for name in sources:
                if name not in limits or rows < limits[name][0]:
                    limits[name] = (rows, table)
    return limits


def _table_read(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, int, str] | None:
    """``(table, rows read along, positions tensor)`` for a Gather or Slice reading a constant table."""
    shape = _const_shape(index, node.input[0]) if node.input else None
    if not shape:
        return None
    if node.op_type == "Gather" and len(node.input) > 1 and len(shape) >= 2:
        axis = int(index.attribute(node, "axis", 0) or 0) % len(shape)
        return node.input[0], int(shape[axis]), node.input[1]
    if node.op_type == "Slice" and len(node.input) > 2 and not index.is_constant(node.input[2]):
        axes = index.value(node.input[3]) if len(node.input) > 3 and node.input[3] else np.array([0])
        if axes is None or axes.size != 1:
            return None
        return (node.input[0], int(shape[int(axes.reshape(-1)[0]) % len(shape)]), node.input[2])
    return None


def _ancestors(index: GraphIndex, start: str, fed: set[str]) -> tuple[set[str], bool]:
    """Fed inputs that reach ``start`` only through a ``Shape`` (and whether any does so at all)."""
    through_shape: set[str] = set()
    directly = False
    stack, seen = [(start, False)], set()
    while stack:
        tensor, after_shape = stack.pop()
        if (tensor, after_shape) in seen:
            continue
        seen.add((tensor, after_shape))
        if tensor in fed:
            if after_shape:
                through_shape.add(tensor)
            else:
                directly = True
            continue
        node = index.producer.get(tensor)
        if node is None:
            continue
        shape_op = after_shape or node.op_type in ("Shape", "Size")
        stack.extend((name, shape_op) for name in node.input if name)
    # Values that a fed input reaches directly are data (token ids), not positions.
    return (through_shape, bool(through_shape)) if not directly else (set(), False)
