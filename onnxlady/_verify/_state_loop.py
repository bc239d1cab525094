"""Several steps for models with a recurrent state: each model is fed its own state output back.

A streaming model (a voice-activity detector, an RNN exported step by step) reads a state input
and writes the next state as an output of the same shape (``state`` -> ``stateN``, ``h0`` ->
``hn``). Compared on one step, a wrong model can pass: a change that moves the next state by
less than the tolerance, and the outputs not at all (they read the state given, not the one
written), shows only when the state is fed back (the real Silero VAD with two rows of one
convolution swapped: equal outputs and a state within ``rtol`` on one step, its speech
probability 60 % off after eight). So where the reference has such pairs, each generated feed
runs :data:`STATE_STEPS` steps: the first on the generated state, each next one on the state
output the model itself wrote, the other inputs as generated; every output is compared at every
step. Equivalent models stay equivalent over the loop; a wrong one drifts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

__all__ = ["STATE_STEPS", "StateLoop", "next_feed", "plan_state_loop"]

#: Steps each generated feed runs for a model with a recurrent state.
STATE_STEPS = 8
#: How an output names the state it writes for an input ``x``: ``x`` + suffix, prefix + ``x``.
_SUFFIXES = ("N", "n", "_out", "_new", "_next", "out", "_n")  # not "_1": exporters name duplicates so
_PREFIXES = ("new_", "next_", "out_")


@dataclass(frozen=True)
class StateLoop:
    """The state pairs (input, output) a feed is looped over, and the number of steps."""

    pairs: tuple[tuple[str, str], ...]
    steps: int = STATE_STEPS

    def describe(self) -> str:
        """The note the report carries."""
        names = ", ".join(f"{output} -> {state}" for state, output in self.pairs)
        return (
            f"recurrent state ({names}): each feed ran as {self.steps} steps, each model reading back the state it "
            "wrote; every output compared at every step"
        )


def _signature(value: onnx.ValueInfoProto) -> tuple[int, tuple[int | str | None, ...]] | None:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    dims = tuple(
        int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
    )
    return int(tensor.elem_type), dims


def _writes(output: str, state: str) -> bool:
    """Whether ``output`` is named as the next value of the input ``state``."""
    if any(output == state + suffix for suffix in _SUFFIXES) or any(output == prefix + state for prefix in _PREFIXES):
        return True
    return state.endswith("0") and output == state[:-1] + "n"  # h0 -> hn


def _compatible(
    written: tuple[int, tuple[int | str | None, ...]] | None, state: tuple[int, tuple[int | str | None, ...]]
) -> bool:
    """Same element type and rank, and no two known sizes that differ (exporters name output dims anew)."""
    if written is None or written[0] != state[0] or len(written[1]) != len(state[1]):
        return False
    return all(not (isinstance(a, int) and isinstance(b, int)) or a == b for a, b in zip(written[1], state[1]))


def plan_state_loop(model: onnx.ModelProto, fed: Sequence[str]) -> StateLoop | None:
    """The state loop of ``model``, or None when no fed input has a state output.

    A pair is a fed floating-point input and a graph output named as its next value (see
    :data:`_SUFFIXES`) with the same element type and rank and no two known sizes that differ;
    the loop checks the real shapes before feeding a state back (:func:`next_feed`).
    """
    outputs = {value.name: value for value in model.graph.output}
    inputs = {value.name: value for value in model.graph.input}
    pairs: list[tuple[str, str]] = []
    for name in fed:
        value = inputs.get(name)
        signature = _signature(value) if value is not None else None
        if signature is None or signature[0] not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        for output, written in outputs.items():
            if _writes(output, name) and _compatible(_signature(written), signature):
                pairs.append((name, output))
                break
    return StateLoop(tuple(pairs)) if pairs else None


def next_feed(
    loop: StateLoop, feed: Mapping[str, np.ndarray], outputs: Mapping[str, Any]
) -> dict[str, np.ndarray] | None:
    """The next step's feed: ``feed`` with each state input replaced by the state output just written.

    None when a state output's shape is not its input's (then it is no state to feed back).
    """
    following = dict(feed)
    for state, output in loop.pairs:
        written = np.asarray(outputs[output])
        if written.shape != feed[state].shape:
            return None
        following[state] = written.astype(feed[state].dtype, copy=False)
    return following
