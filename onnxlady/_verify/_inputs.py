"""Inputs a real model accepts, drawn the way Polygraphy's data loader draws them, plus what the graph says.

Each fed input gets a shape (see :mod:`onnxlady._verify._shapes`) and a rule for its values:

* ``value-range``: the user's range for this input (``--val-range NAME:[lo,hi]``), first of all;
* ``mask-ones``: an input named ``*mask*``, or one that reaches a Softmax's scores through mask
  arithmetic (``1 - mask``, ``Where(mask, ...)``), or the mask of a fused attention op, is all ones
  (every position attended: a random mask can turn whole rows of scores into ``-inf``);
* ``segment-zeros``: ``token_type_ids`` / segment ids are zeros (one segment);
* ``embedding-index``: an integer input used (through Cast/Unsqueeze/Reshape/...) as the indices of
  a Gather into a constant table is drawn within ``[0, rows)``;
* ``integers``: other integers in ``[0, 16)``; ``coin``: booleans are fair coin flips;
* ``uniform``: floating-point inputs are uniform in ``input_range`` (default ``[-1, 1)``).

Inputs are drawn in graph order from one generator, so one seed always gives the same feeds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from onnxlady._errors import OnnxladyError
from onnxlady._verify._models import (
    FLOAT_TYPES,
    INPUT_TYPES,
    INT_TYPES,
    GraphIndex,
    elem_type,
    fed_inputs,
    op_set,
    type_name,
    vi_type,
)
from onnxlady._verify._shapes import BROADCAST, resolve_shapes

#: Integer inputs not recognised by any rule are drawn from [0, INT_HIGH).
INT_HIGH: int = 16
#: Ops through which an integer input keeps its values on the way to a Gather's indices.
_INDEX_PASS_THROUGH = op_set("Cast Unsqueeze Reshape Squeeze Identity Flatten")
#: Ops a mask goes through on its way to the attention scores (shape moves and mask arithmetic).
_MASK_OPS = op_set("Cast Unsqueeze Reshape Squeeze Identity Expand Flatten Transpose Tile Not Neg") | BROADCAST
#: Ops that turn a 0/1 mask into a selection: once met, a float input is a mask too.
_MASK_MAKERS = op_set("Not Where Equal Less Greater LessOrEqual GreaterOrEqual And Or")
#: Fused attention ops (com.microsoft, and ONNX's own Attention) and the input position of their mask.
_FUSED_MASKS = {("Attention", 3), ("MultiHeadAttention", 4), ("EmbedLayerNormalization", 7)}
_MASK_DEPTH = 12
_INT64_MAX = int(np.iinfo(np.int64).max)
_SEGMENT_NAME = re.compile(r"token_type|segment", re.IGNORECASE)

RULES = ("value-range", "mask-ones", "segment-zeros", "embedding-index", "integers", "coin", "uniform")


@dataclass(frozen=True)
class InputPlan:
    """How verify draws one input: its shape, element type and the rule for its values."""

    name: str
    elem: int
    shape: tuple[int, ...]
    #: One of :data:`RULES`.
    rule: str
    #: Smallest and largest value drawn (integers: both inclusive; floats: uniform in [low, high)).
    low: float
    high: float
    #: Why this rule applies, for the report (``indices of Gather on 'E' (10 rows)``).
    detail: str
    #: How each dynamic dimension got its size.
    shape_notes: tuple[str, ...] = ()
    #: Axes whose size is a default guess.
    guessed: tuple[int, ...] = ()

    @property
    def dtype(self) -> str:
        """NumPy name of the element type (``float32``, ``int64``, ``bool``)."""
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem)))


def check_range(value_range: Sequence[float], what: str = "input range") -> tuple[float, float]:
    """Validate a ``(low, high)`` pair: two finite numbers with ``low <= high``.

    Raises:
        OnnxladyError: anything else.
    """
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError) as exc:
        raise OnnxladyError(f"{what} must be two numbers (low, high), got {value_range!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise OnnxladyError(f"{what} must be finite with low <= high, got ({low}, {high})")
    return low, high


def parse_value_ranges(specs: Sequence[str]) -> tuple[dict[str, tuple[float, float]], tuple[float, float] | None]:
    """Parse Polygraphy-style ``--val-range`` specs: ``NAME:[lo,hi]`` for one input, ``[lo,hi]`` for all.

    The name is everything before the *last* colon (TensorFlow names like ``input:0`` work).

    Returns:
        ``({name: (lo, hi)}, the range for every other input or None)``: the ``value_ranges`` and
        ``input_range`` arguments of verify.

    Raises:
        OnnxladyError: a malformed spec, a range with low > high, or a name given twice.
    """
    ranges: dict[str, tuple[float, float]] = {}
    default: tuple[float, float] | None = None
    for spec in specs:
        text = str(spec).strip()
        match = re.fullmatch(r"(?:(.+):)?\[\s*([^,\]]+?)\s*,\s*([^,\]]+?)\s*\]", text)
        if match is None:
            raise OnnxladyError(f"bad value range {spec!r}: expected NAME:[lo,hi] or [lo,hi], e.g. input_ids:[0,99]")
        try:
            low, high = float(match[2]), float(match[3])
        except ValueError as exc:
            raise OnnxladyError(f"bad value range {spec!r}: the bounds must be numbers") from exc
        name, bounds = match[1], check_range((low, high), f"value range {spec!r}")
        if name is None:
            if default is not None:
                raise OnnxladyError(f"value range for every input given more than once ({spec!r})")
            default = bounds
        elif name in ranges:
            raise OnnxladyError(f"value range for input {name!r} given more than once")
        else:
            ranges[name] = bounds
    return ranges, default


def embedding_bounds(index: GraphIndex, input_names: Sequence[str]) -> dict[str, tuple[int, str]]:
    """For each input used as Gather indices into a constant table: ``(table size on the gather axis, table)``.

    The indices may pass through Cast, Unsqueeze, Reshape, Squeeze, Identity or Flatten first
    (as token ids usually do). When several Gathers read one input, the smallest bound wins, so
    every drawn index is valid for all of them.
    """
    bounds: dict[str, tuple[int, str]] = {}
    for name in input_names:
        best: tuple[int, str] | None = None
        frontier, seen = [name], {name}
        while frontier:
            tensor = frontier.pop()
            for node, position in index.consumers.get(tensor, []):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type == "Gather" and position == 1:
                    data_shape = index.shapes.get(node.input[0])
                    if not data_shape:
                        continue
                    axis = int(index.attribute(node, "axis", 0) or 0)
                    axis += len(data_shape) if axis < 0 else 0
                    if 0 <= axis < len(data_shape) and (best is None or data_shape[axis] < best[0]):
                        best = (int(data_shape[axis]), node.input[0])
                elif node.op_type in _INDEX_PASS_THROUGH and position == 0:
                    for out in node.output:
                        if out and out not in seen:
                            seen.add(out)
                            frontier.append(out)
        if best is not None:
            bounds[name] = (max(best[0], 1), best[1])
    return bounds


def mask_use(index: GraphIndex, name: str, elem: int) -> str | None:
    """Why ``name`` is an attention mask, or None: its name, a fused attention op, or mask arithmetic before a Softmax."""
    if "mask" in name.lower():
        return "its name contains 'mask'"
    frontier: list[tuple[str, int, bool]] = [(name, 0, elem not in FLOAT_TYPES)]
    seen = {name}
    while frontier:
        tensor, depth, selecting = frontier.pop()
        for node, position in index.consumers.get(tensor, []):
            label = f" {node.name!r}" if node.name else ""
            if (node.op_type, position) in _FUSED_MASKS:
                return f"it is the mask input of {node.op_type}{label}"
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Softmax" and selecting and depth > 0:
                return f"it reaches the scores of Softmax{label} through mask arithmetic"
            if node.op_type not in _MASK_OPS or depth >= _MASK_DEPTH:
                continue
            # ``1 - mask`` (the constant first) makes a float 0/1 input a mask, like a comparison does.
            makes = node.op_type in _MASK_MAKERS or (
                node.op_type == "Sub" and position == 1 and index.is_constant(node.input[0])
            )
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    frontier.append((out, depth + 1, selecting or makes))
    return None


def _checked_value_ranges(
    value_ranges: Mapping[str, Sequence[float]] | None, inputs: Sequence[onnx.ValueInfoProto]
) -> dict[str, tuple[float, float]]:
    known = {vi.name for vi in inputs}
    checked: dict[str, tuple[float, float]] = {}
    for name, value_range in (value_ranges or {}).items():
        if name not in known:
            listing = ", ".join(repr(n) for n in sorted(known)) or "none"
            raise OnnxladyError(f"value range for unknown input {name!r} (the model's inputs: {listing})")
        checked[name] = check_range(value_range, f"value range of input {name!r}")
    return checked


def plan_inputs(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]] | None = None,
    input_range: Sequence[float] = (-1.0, 1.0),
    value_ranges: Mapping[str, Sequence[float]] | None = None,
    index: GraphIndex | None = None,
) -> list[InputPlan]:
    """Decide the shape and the value rule of every input the model must be fed (see the module docstring).

    Args:
        model: The model (read only).
        shapes: Shape overrides by input name.
        input_range: ``(low, high)`` for floating-point inputs without a rule of their own.
        value_ranges: ``{name: (low, high)}`` for particular inputs; integers are drawn within
            ``[ceil(low), floor(high)]``, both ends included (as Polygraphy does).
        index: The model's :class:`GraphIndex`, when the caller has one already.

    Returns:
        One plan per fed input, in graph order.

    Raises:
        OnnxladyError: a bad range or shape override, an input type verify cannot generate.
    """
    inputs = fed_inputs(model)
    low, high = check_range(input_range)
    ranges = _checked_value_ranges(value_ranges, inputs)
    index = index or GraphIndex(model)
    choices = resolve_shapes(model, shapes, index)
    bounds = embedding_bounds(index, [vi.name for vi in inputs if elem_type(vi) in INT_TYPES])
    plans = []
    for vi in inputs:
        elem = elem_type(vi)
        if elem is None or elem not in INPUT_TYPES:
            raise OnnxladyError(
                f"input {vi.name!r} is {vi_type(vi)}: verify can generate only float, integer and bool tensors"
            )
        rule, lo, hi, detail = _value_rule(index, vi.name, elem, ranges, bounds, (low, high))
        choice = choices[vi.name]
        plans.append(InputPlan(vi.name, elem, choice.shape, rule, lo, hi, detail, choice.notes, choice.guessed))
    return plans


def _value_rule(
    index: GraphIndex,
    name: str,
    elem: int,
    ranges: Mapping[str, tuple[float, float]],
    bounds: Mapping[str, tuple[int, str]],
    default: tuple[float, float],
) -> tuple[str, float, float, str]:
    """``(rule, low, high, detail)`` for one input."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    # Integers are drawn as int64 and cast: uint64 values above int64's range are out of reach.
    top = 1 if elem == TensorProto.BOOL else min(int(np.iinfo(dtype).max), _INT64_MAX) if elem in INT_TYPES else 0
    if name in ranges:
        lo, hi = ranges[name]
        if elem in FLOAT_TYPES:
            return "value-range", lo, hi, "the range given for it"
        bottom = 0 if elem == TensorProto.BOOL else int(np.iinfo(dtype).min)
        ilo, ihi = max(math.ceil(lo), bottom), min(math.floor(hi), top)
        if ilo > ihi:
            raise OnnxladyError(f"value range of input {name!r} holds no {type_name(elem)} value: ({lo}, {hi})")
        return "value-range", float(ilo), float(ihi), "the range given for it"
    why = mask_use(index, name, elem)
    if why is not None:
        return "mask-ones", 1.0, 1.0, why
    if elem in INT_TYPES and _SEGMENT_NAME.search(name):
        return "segment-zeros", 0.0, 0.0, "token type / segment ids: one segment"
    if elem in FLOAT_TYPES:
        return "uniform", default[0], default[1], "floating-point input"
    if elem == TensorProto.BOOL:
        return "coin", 0.0, 1.0, "boolean input"
    if name in bounds:
        rows, table = bounds[name]
        return (
            "embedding-index",
            0.0,
            float(min(rows, top + 1) - 1),
            f"indices of a Gather on {table!r} ({rows} rows)",
        )
    return "integers", 0.0, float(min(INT_HIGH, top + 1) - 1), "integer input"


def draw(plan: InputPlan, rng: np.random.Generator, shape: Sequence[int] | None = None) -> np.ndarray:
    """One random array for ``plan`` (of ``shape`` when given, else the plan's)."""
    size = tuple(plan.shape if shape is None else shape)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(plan.elem)
    if plan.rule in ("mask-ones", "segment-zeros"):
        return np.full(size, plan.low, dtype=dtype)
    if plan.elem in FLOAT_TYPES:
        return rng.uniform(plan.low, plan.high, size=size).astype(dtype)
    if plan.elem == TensorProto.BOOL:
        return rng.integers(int(plan.low), int(plan.high) + 1, size=size).astype(np.bool_)
    high = min(int(plan.high), _INT64_MAX - 1)  # a float64 bound can round up past int64
    return rng.integers(int(plan.low), high + 1, size=size, dtype=np.int64).astype(dtype)


def generate_inputs(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]] | None,
    rng: np.random.Generator,
    input_range: tuple[float, float] = (-1.0, 1.0),
    value_ranges: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, np.ndarray]:
    """Draw one feed for every input the model must be fed, following :func:`plan_inputs`.

    A ``bfloat16`` input is returned as an array of ``ml_dtypes.bfloat16`` (NumPy has no native
    bfloat16); verify wraps it for ONNX Runtime.

    Args:
        model: The model (read only).
        shapes: Shape overrides by input name.
        rng: The generator; inputs are drawn from it in graph order.
        input_range: ``(low, high)`` for floating-point inputs.
        value_ranges: ``{name: (low, high)}`` for particular inputs.

    Returns:
        ``{input name: array}``.
    """
    return {plan.name: draw(plan, rng) for plan in plan_inputs(model, shapes, input_range, value_ranges)}
