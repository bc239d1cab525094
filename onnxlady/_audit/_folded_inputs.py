"""Integer inputs of kept operators compared by value across a conversion: a folded chain holds what it computed.

An operator's shape, pad, index or axis input is often computed from constants alone (a
``Concat`` of ``Constant`` pieces reshaped and cast, as exporters write a token shift's pads).
A constant folder stores the value that chain computes, so a converted copy reads a literal
where the reference computes one; the audit read such an input as "a constant" on both sides,
and a literal of *another* value (an RWKV token shift by two tokens instead of one: the pads
chain left dead or cleaned away) read ``converted``, exit 0, while verify said NOT EQUIVALENT
(held-out round 18, F2).

Here each operator found under its node name and type in both models, reading and writing the
same activations (an operator a layout optimizer moved a Transpose past reads another tensor),
has the integer inputs both models compute from constants alone (or store) evaluated and
compared, in the forms that cannot change with a layout (:data:`_COMPARED`): ONNX Runtime's
transformer optimizer rewrites a UNet's ``Unsqueeze`` axes for NHWC under the same names.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxlady._audit._graph_edits import _named_nodes, _Values, folded_tensors, graph_constants

__all__ = ["changed_folded_inputs"]

#: The integer inputs compared, by operator and slot, and how. A layout optimizer (ONNX Runtime's
#: NHWC and transpose passes) rewrites an operator it keeps for another axis order and may keep
#: every name: axes, reshape targets and slice bounds are then other numbers for the same
#: computation and are not compared; sizes listed per axis are compared up to their order
#: (``sorted``; a ``Pad``'s begin/end pairs as pairs); counts and indices along one axis do not
#: depend on the layout (``exact``; ``index``: a negative index counts from the back and is not
#: compared). Float inputs are left to the weight and arithmetic comparisons, which know float16
#: and quantization steps; an audit never evaluates a float weight here.
_COMPARED: dict[str, dict[int, str]] = {
    "Pad": {1: "pairs"},
    "Tile": {1: "sorted"},
    "Expand": {1: "sorted"},
    "ConstantOfShape": {0: "sorted"},
    "Resize": {3: "sorted"},
    "TopK": {1: "exact"},
    "Trilu": {1: "exact"},
    "Split": {1: "exact"},
    "Gather": {1: "index"},
    "GatherElements": {1: "index"},
    "ScatterElements": {1: "index"},
}
#: The most elements of a compared input: shapes, pads, indices; not tables.
_MOST = 1 << 12


def _agree(how: str, first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two equal-size integer inputs say the same thing in the way ``how`` reads them."""
    ours, yours = first.ravel(), second.ravel()
    if how == "pairs" and ours.size % 2 == 0:
        half = ours.size // 2
        pairs = [sorted(zip(values[:half].tolist(), values[half:].tolist(), strict=True)) for values in (ours, yours)]
        return pairs[0] == pairs[1]
    if how in ("sorted", "pairs"):
        return bool(np.array_equal(np.sort(ours), np.sort(yours)))
    places = (ours >= 0) & (yours >= 0) if how == "index" else np.ones(ours.size, dtype=bool)
    return bool(np.array_equal(ours[places], yours[places]))


def changed_folded_inputs(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> list[str]:
    """The integer inputs of operators kept under their names that hold other values in the suspect, one line each.

    Returns:
        Lines such as ``"Pad '/blocks.0/Pad' input 1 holds [0 2 0 0 -2 0] in the suspect, where
        the reference computes [0 1 0 0 -1 0]"``; empty where every compared input agrees.
    """
    ours, theirs = _named_nodes(reference.graph), _named_nodes(suspect.graph)
    sides = []
    for model in (reference, suspect):
        constants = graph_constants(model.graph)
        _, pure = folded_tensors(model.graph, constants)
        sides.append((set(constants) | pure, _Values(model, constants)))
    (ref_known, ref_values), (sus_known, sus_values) = sides
    lines: list[str] = []
    for name, mine in ours.items():
        other = theirs.get(name)
        slots = _COMPARED.get(mine.op_type, {}) if mine.domain in ("", "ai.onnx") else {}
        if not slots or other is None or (mine.op_type, mine.domain or "") != (other.op_type, other.domain or ""):
            continue
        # Only where it reads and writes the same activations: a layout optimizer that pushes a
        # Transpose past an operator rewrites its axes, pads or target for the other layout.
        if list(mine.output) != list(other.output) or [item for item in mine.input if item not in ref_known] != [
            item for item in other.input if item not in sus_known
        ]:
            continue
        for slot, (first, second) in enumerate(zip(mine.input, other.input)):
            if slot not in slots or not first or not second or first not in ref_known or second not in sus_known:
                continue
            ours_value, yours = ref_values(first), sus_values(second)
            if ours_value is None or yours is None or ours_value.dtype.kind not in "iu" or yours.dtype.kind not in "iu":
                continue
            if ours_value.size > _MOST:
                continue
            if ours_value.size != yours.size:
                lines.append(f"{mine.op_type} '{name}' input {slot} holds {yours.size} values in the suspect, "
                             f"where the reference holds {ours_value.size}")
                continue
            if not _agree(slots[slot], ours_value, yours):
                lines.append(f"{mine.op_type} '{name}' input {slot} holds {yours.ravel().tolist()} in the suspect, "
                             f"where the reference holds {ours_value.ravel().tolist()}")
    return lines
