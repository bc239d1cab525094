"""Two decoding steps for models with a KV cache: each model is fed its own ``present`` as the next ``past``.

A decoder permuted with its KV cache as state (``permute --kv-state``) writes its cache in its
own order and expects it back in that order: fed the reference's cache, or a random one, it
computes something else, while over a decoding loop it computes exactly what the reference does.
So where a model has state pairs (:func:`onnxlady._analysis._state.state_pairs`), each generated
feed is run as a loop of two steps:

1. a prefill of ``L`` new tokens from an empty cache (the past inputs have 0 positions);
2. ``L`` more tokens, each model reading the ``present`` outputs it wrote in step 1.

``L`` is half the generated length of the new-token inputs (those with a symbolic dim that is
neither the batch, the past nor the total length), so both steps stay within the positions the
generated feed was sized for; inputs sized by the total length (the attention mask) are cut or
repeated to ``past + L``. The non-state outputs are compared element-wise at both steps. The
``present`` outputs are compared position by position as sorted values: a cache permuted along
heads and head dims holds the same values at each position, in another order (the second step's
outputs check the order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxlady._analysis._state import StatePair, state_pairs


@dataclass(frozen=True)
class DecodingPlan:
    """How to turn one generated feed into two decoding steps."""

    pairs: tuple[StatePair, ...]
    #: Fed inputs with axes sized by the total length (past + new): input -> axes.
    total_axes: Mapping[str, tuple[int, ...]]
    #: Fed inputs with axes sized by the new tokens: input -> axes.
    token_axes: Mapping[str, tuple[int, ...]]

    @property
    def state_outputs(self) -> dict[str, int]:
        """Present output name -> its sequence axis."""
        return {pair.output: int(pair.sequence_axis) for pair in self.pairs if pair.sequence_axis is not None}

    def describe(self, tokens: int) -> str:
        """The note the report carries."""
        names = ", ".join(pair.output for pair in self.pairs[:2]) + (", ..." if len(self.pairs) > 2 else "")
        return (
            f"KV cache ({len(self.pairs)} state pair(s): {names}): each feed ran as two decoding steps of {tokens} "
            "token(s), a prefill from an empty cache then a step reading each model's own present outputs; the "
            "present outputs are compared position by position as sorted values"
        )


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    return [
        int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
        for d in value.type.tensor_type.shape.dim
    ]


def plan_decoding(model: onnx.ModelProto, fed: Sequence[str]) -> DecodingPlan | None:
    """The decoding plan of ``model``, or None when it has no state pair the shapes let decode.

    Args:
        model: the reference model.
        fed: the names of the inputs a feed holds.

    Returns:
        The plan: every state pair must have a sequence axis whose present length is symbolic.
    """
    pairs = state_pairs(model)
    if not pairs or any(pair.sequence_axis is None for pair in pairs):
        return None
    inputs = {value.name: value for value in model.graph.input}
    outputs = {value.name: value for value in model.graph.output}
    past_symbols: set[str] = set()
    total_symbols: set[str] = set()
    for pair in pairs:
        axis = int(pair.sequence_axis)  # type: ignore[arg-type]  # checked above
        past_dim, total_dim = _dims(inputs[pair.input])[axis], _dims(outputs[pair.output])[axis]
        if not isinstance(total_dim, str):
            return None  # a static cache length: the steps cannot grow it
        total_symbols.add(total_dim)
        if isinstance(past_dim, str):
            past_symbols.add(past_dim)
    state_inputs = {pair.input for pair in pairs}
    total_axes: dict[str, tuple[int, ...]] = {}
    token_axes: dict[str, tuple[int, ...]] = {}
    for name in fed:
        if name in state_inputs or name not in inputs:
            continue
        dims = _dims(inputs[name])
        total = tuple(axis for axis, dim in enumerate(dims) if isinstance(dim, str) and dim in total_symbols)
        tokens = tuple(
            axis for axis, dim in enumerate(dims)
            if axis > 0 and isinstance(dim, str) and dim not in total_symbols and dim not in past_symbols
        )  # fmt: skip
        if total:
            total_axes[name] = total
        if tokens:
            token_axes[name] = tokens
    return DecodingPlan(tuple(pairs), total_axes, token_axes)


def step_length(plan: DecodingPlan, feed: Mapping[str, np.ndarray]) -> int | None:
    """New tokens per step for ``feed``: half its new-token length (None when the feed tells none)."""
    sizes = [int(feed[name].shape[axis]) for name, axes in plan.token_axes.items() if name in feed for axis in axes]
    if not sizes:
        past = [int(feed[p.input].shape[int(p.sequence_axis)]) for p in plan.pairs if p.input in feed]  # type: ignore[arg-type]
        totals = [int(feed[name].shape[axis]) for name, axes in plan.total_axes.items() if name in feed for axis in axes]
        sizes = [min(totals) - max(past)] if totals and past else []
    length = min(sizes) // 2 if sizes else 0
    return length if length >= 1 else None


def _resize(array: np.ndarray, axis: int, size: int, start: int = 0) -> np.ndarray:
    """``size`` entries of ``array`` along ``axis`` from ``start``, wrapping around (cut or repeated)."""
    length = array.shape[axis]
    if length == 0:
        raise ValueError("cannot resize an empty axis")
    return np.ascontiguousarray(np.take(array, (np.arange(size) + start) % length, axis=axis))


def first_step(plan: DecodingPlan, feed: Mapping[str, np.ndarray], tokens: int) -> dict[str, np.ndarray]:
    """The prefill: ``tokens`` new tokens, an empty cache, totals of ``tokens``."""
    step = dict(feed)
    for pair in plan.pairs:
        if pair.input in step:
            step[pair.input] = np.take(step[pair.input], np.arange(0), axis=int(pair.sequence_axis))  # type: ignore[arg-type]
    return _sized(plan, step, tokens, tokens, 0)


def next_step(
    plan: DecodingPlan, feed: Mapping[str, np.ndarray], tokens: int, presents: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The second step: ``tokens`` more tokens, the cache a model wrote (``presents``: output name -> array)."""
    step = dict(feed)
    past_length = 0
    for pair in plan.pairs:
        cache = np.asarray(presents[pair.output])
        step[pair.input] = cache
        past_length = int(cache.shape[int(pair.sequence_axis)])  # type: ignore[arg-type]
    return _sized(plan, step, tokens, past_length + tokens, tokens)


def _sized(plan: DecodingPlan, step: dict[str, np.ndarray], tokens: int, total: int, start: int) -> dict[str, np.ndarray]:
    for name, axes in plan.token_axes.items():
        if name in step:
            for axis in axes:
                step[name] = _resize(step[name], axis, tokens, start)
    for name, axes in plan.total_axes.items():
        if name in step:
            for axis in axes:
                step[name] = _resize(np.asarray(step[name]), axis, total)
    return step


def state_view(array: np.ndarray, sequence_axis: int) -> np.ndarray:
    """A cache's values per (batch, position), sorted: what any permutation of its other axes keeps."""
    array = np.asarray(array)
    if array.ndim < 2:
        return np.sort(array.reshape(-1))
    lead = [0, sequence_axis] if sequence_axis != 0 else [0]
    moved = np.moveaxis(array, lead, list(range(len(lead))))
    flat = moved.reshape(*moved.shape[: len(lead)], -1)
    return np.sort(flat, axis=-1)
