"""What a passed comparison proves: squashing ops, saturated or hollow outputs, and the verdict.

Agreement proves something only where a wrong model would have disagreed. It proves nothing on
an output that is empty, non-finite, vanishing (every value within a few ``atol`` of zero),
constant (every value within the tolerance of one another) or saturated (every value of a
Sigmoid/Softmax/Tanh/Clip within the tolerance of the op's bounds, where a change of its input no
longer shows). So verify also compares the *input* of a squashing op that makes a graph output
(the logits) and judges that output's evidence on it; likewise the scores an ArgMax, ArgMin or
TopK reduces to indices (one agreeing class index is next to no evidence: a wrong permutation
often keeps it).

The verdict is three-valued: ``not-equivalent`` when any compared element fails;
``equivalent`` when none fails and every compared tensor carries evidence (a squashing output
may lend its evidence from its input); ``inconclusive`` otherwise, with one reason per hollow
tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from onnxlady._verify._models import GraphIndex
from onnxlady._verify._report import OutputComparison

EQUIVALENT = "equivalent"
INCONCLUSIVE = "inconclusive"
NOT_EQUIVALENT = "not-equivalent"
VERDICTS = (EQUIVALENT, INCONCLUSIVE, NOT_EQUIVALENT)

#: Ops that flatten large inputs onto bounds, and those bounds (Clip's come from its operands).
_SQUASH_BOUNDS: dict[str, tuple[float, ...]] = {
    "Sigmoid": (0.0, 1.0),
    "HardSigmoid": (0.0, 1.0),
    "Softmax": (0.0, 1.0),
    "LogSoftmax": (0.0,),
    "Tanh": (-1.0, 1.0),
    "Clip": (),
}
#: Ops that reduce their input to indices (a class, the top k): one agreeing index proves little,
#: so their input (the scores) is compared too.
_INDEX_OPS = frozenset({"ArgMax", "ArgMin", "TopK"})
#: Ops that only move values between a squashing op and the graph output.
_LAYOUT_OPS = frozenset({"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


@dataclass(frozen=True)
class Squash:
    """A graph output made by a squashing op (possibly through reshapes): what to compare besides it."""

    #: The graph output.
    output: str
    #: The squashing op type (``Sigmoid``).
    op: str
    #: The op's input (the logits), compared automatically.
    tensor: str
    #: Values the op saturates at (within tolerance of these, the output carries no evidence).
    bounds: tuple[float, ...]


def find_squashes(index: GraphIndex) -> dict[str, Squash]:
    """The graph outputs made by a squashing op, by output name."""
    found: dict[str, Squash] = {}
    for output in index.graph_outputs:
        tensor = output
        node = index.producer.get(tensor)
        while node is not None and node.op_type in _LAYOUT_OPS and node.input:
            node = index.producer.get(node.input[0])
        if node is None or (node.op_type not in _SQUASH_BOUNDS and node.op_type not in _INDEX_OPS) or not node.input:
            continue
        source = node.input[0]
        if source in index.graph_inputs or index.is_constant(source):
            continue  # nothing to learn from comparing a fed input or a constant
        if node.op_type in _INDEX_OPS:
            found[output] = Squash(output, node.op_type, source, ())
            continue
        bounds = _clip_bounds(index, node) if node.op_type == "Clip" else _SQUASH_BOUNDS[node.op_type]
        if bounds:
            found[output] = Squash(output, node.op_type, source, bounds)
    return found


def _clip_bounds(index: GraphIndex, node: onnx.NodeProto) -> tuple[float, ...]:
    """Clip's constant bounds (operands since opset 11, attributes before), empty when unknown."""
    bounds: list[float] = []
    for position, attribute in ((1, "min"), (2, "max")):
        if len(node.input) > position and node.input[position]:
            value = index.value(node.input[position])
            if value is None or value.size != 1:
                return ()
            bounds.append(float(value.reshape(-1)[0]))
        else:
            found = index.attribute(node, attribute)
            if found is not None:
                bounds.append(float(found))
    return tuple(bounds)


def match_squashes(reference: GraphIndex, candidate: GraphIndex) -> tuple[dict[str, tuple[Squash, str]], list[str]]:
    """Pair each squashing output of the reference with the candidate's tensor in the same place.

    Returns:
        ``({output: (the reference's squash, the candidate's input tensor)}, notes)``; a note says
        why an output's input could not be compared (the candidate has no such op there).
    """
    ref_squashes, cand_squashes = find_squashes(reference), find_squashes(candidate)
    pairs: dict[str, tuple[Squash, str]] = {}
    notes: list[str] = []
    for output, squash in ref_squashes.items():
        other = cand_squashes.get(output)
        if other is None or other.op != squash.op:
            notes.append(
                f"output {output!r} is made by {squash.op} in the reference but not in the candidate: "
                "its input is not compared"
            )
            continue
        pairs[output] = (squash, other.tensor)
    return pairs, notes


def judge(
    outputs: Sequence[OutputComparison], squash_inputs: Sequence[OutputComparison]
) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The verdict over every comparison: ``(verdict, reasons, notes)``.

    ``reasons`` say why the verdict is not ``equivalent`` (one per failing or hollow tensor);
    ``notes`` say where a hollow squashing output was judged on its input instead.
    """
    compared = list(outputs) + list(squash_inputs)
    failed = [c for c in compared if not c.passed]
    if failed:
        return NOT_EQUIVALENT, tuple(_failure(c) for c in failed), ()
    inputs_of = {c.stands_for: c for c in squash_inputs if c.stands_for is not None}
    reasons: list[str] = []
    notes: list[str] = []
    for out in outputs:
        if out.degenerate is None:
            continue
        stand_in = inputs_of.get(out.name)
        if stand_in is not None and stand_in.degenerate is None:
            notes.append(
                f"output {out.name!r} proves nothing by itself ({out.degenerate}); "
                f"judged on the input of its {stand_in.op}, {stand_in.name!r}, which carries signal"
            )
            continue
        reasons.append(f"{tensor_label(out)} {out.name!r}: {out.degenerate}")
    for tensor in squash_inputs:
        if tensor.degenerate is not None:
            reasons.append(f"{tensor_label(tensor)} {tensor.name!r}: {tensor.degenerate}")
    return (INCONCLUSIVE if reasons else EQUIVALENT), tuple(reasons), tuple(notes)


def tensor_label(comparison: OutputComparison) -> str:
    if comparison.kind == "squash-input":
        return f"input of the {comparison.op} making {comparison.stands_for!r},"
    return "added tensor" if comparison.kind == "added" else "output"


def _failure(comparison: OutputComparison) -> str:
    return (
        f"{tensor_label(comparison)} {comparison.name!r}: {comparison.mismatched_elements} of "
        f"{comparison.total_elements} elements differ (max abs error {comparison.max_abs_error:.3g}, "
        f"max rel error {comparison.max_rel_error:.3g})"
    )
