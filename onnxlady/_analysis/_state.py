"""Recurrent state of decoders: a KV-cache input and the output that becomes it at the next step.

A decoder exported with a KV cache reads ``past_key_values.N.key`` and writes ``present.N.key``;
whoever runs it feeds each step's ``present`` back as the next step's ``past``. The two are one
state: permuting both by the same permutation (the heads, the dims inside a head) keeps the
function of the whole decoding loop, as long as the first step starts from an empty cache (or
from a cache permuted the same way). :func:`state_pairs` finds such pairs by the naming
conventions exporters use:

- ``past_key_values.X`` -> ``present.X`` (torch.onnx / Optimum, the onnxruntime-genai builder);
- ``past_X`` / ``past.X`` / ``past_key.X``... -> the same name with ``past`` replaced by ``present``.

A pair must have the same rank, the same element type and the same static sizes on every axis
but one: the sequence axis, which grows (its symbolic names differ, ``past_sequence_length`` vs
``total_sequence_length``, or its static sizes do).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass(frozen=True)
class StatePair:
    """A state input and the output that is fed back into it at the next step.

    Attributes:
        input: the graph input holding the previous step's state (``past_key_values.0.key``).
        output: the graph output holding the next step's state (``present.0.key``).
        sequence_axis: the axis along which the state grows (positions), or None when the
            shapes do not tell (no axis differs between the two).
    """

    input: str
    output: str
    sequence_axis: int | None


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """The declared dims of a tensor value (int, symbolic name, or None when unnamed), None without a shape."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return dims


def _output_names(name: str) -> list[str]:
    """The output names a state input ``name`` may pair with, most specific first."""
    candidates = []
    if "past_key_values" in name:
        candidates.append(name.replace("past_key_values", "present", 1))
    if "past" in name:
        candidates.append(name.replace("past", "present", 1))
    return list(dict.fromkeys(candidates))


def state_pairs(model: onnx.ModelProto) -> list[StatePair]:
    """The KV-cache (state) pairs of ``model``'s main graph, in graph-input order.

    Args:
        model: the model (not modified).

    Returns:
        One :class:`StatePair` per graph input named like a past state whose present output
        exists with a matching type and shape (see the module docstring).
    """
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    outputs = {value.name: value for value in graph.output}
    pairs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        for candidate in _output_names(value.name):
            present = outputs.get(candidate)
            if present is None:
                continue
            axis = _sequence_axis(value, present)
            if axis is not False:
                pairs.append(StatePair(value.name, candidate, axis if isinstance(axis, int) else None))
            break
    return pairs


def _sequence_axis(past: onnx.ValueInfoProto, present: onnx.ValueInfoProto) -> int | bool | None:
    """The axis where ``past`` and ``present`` differ: an int, None when none does, False when they do not pair."""
    if past.type.tensor_type.elem_type != present.type.tensor_type.elem_type:
        return False
    past_dims, present_dims = _dims(past), _dims(present)
    if past_dims is None or present_dims is None:
        return None if past_dims == present_dims else False
    if len(past_dims) != len(present_dims):
        return False
    differing = [axis for axis, (a, b) in enumerate(zip(past_dims, present_dims)) if a != b]
    if len(differing) > 1:  # two axes that differ: not one state growing along its positions
        return False
    return differing[0] if differing else None
