"""A branch cut off where it joined the network: an operator of two activations removed.

A residual ``Add`` (a LoRA adapter's, a timestep embedding's, a cross-attention's), an
attention gate's ``Mul``, or the ``x * Phi(x)`` of an exported GELU joins two computed tensors.
Deleting it and making its readers read one of its two inputs drops the other branch: the
weights stay (the branch left dead in the file, or removed with its weights), every kept
operator keeps its name, and a comparison of constants finds nothing (held-out round 17, F1/F2:
`converted`, exit 0, on seven such copies). A converter removes arithmetic only where it can
prove it neutral (``x * 1``, ``x + 0``: one input a constant) or fuses it into an operator that
then writes its output; it never makes an operator's readers skip it and lose a computed input.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx

from onnxlady._audit._graph_edits import folded_tensors, graph_constants

__all__ = ["bypassed_branches"]

#: Binary arithmetic of the standard domain whose removal could hide a branch.
_JOINING = frozenset({"Add", "Sub", "Mul", "Div"})


def bypassed_branches(reference: onnx.ModelProto, suspect: onnx.ModelProto, merged: Collection[str] = ()) -> list[str]:
    """The reference's joins of two activations that the suspect skips, one line each.

    A main-graph ``Add``/``Sub``/``Mul``/``Div`` of two different tensors computed from the
    graph's inputs (neither a constant nor computed from constants and shapes alone), whose
    output no operator of the suspect writes (nor one under its node name), while every one of
    its readers that the suspect keeps (same output, type and node name; at least one) reads, at the same input, one and the same of the
    removed operator's two inputs.

    Args:
        reference: the reference model.
        suspect: the suspect, compared by tensor and node output names (a converter keeps them).
        merged: outputs of the reference's Adds that sum parallel branches the suspect holds
            re-parameterised into one kernel (:func:`~onnxlady._resync._branch_merges.merged_sums`):
            their branches were compared merged, none is lost.

    Returns:
        Lines such as ``"Add '/v/Add' removed: its readers read its input '/v/base/Add' in the
        suspect, and what its other input '/v/Mul' (computed from the inputs) carried is
        lost"``; empty when there is none.
    """
    graph = reference.graph
    constants = graph_constants(graph)
    computed, _ = folded_tensors(graph, dict(constants))
    held = set(constants) | computed
    written = {name for node in suspect.graph.node for name in node.output if name}
    kept = {node.output[0]: node for node in suspect.graph.node if node.output and node.output[0]}
    named = {node.name for node in suspect.graph.node if node.name}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name:
                readers.setdefault(name, []).append((node, slot))
    lines = []
    for node in graph.node:
        if node.op_type not in _JOINING or node.domain not in ("", "ai.onnx") or len(node.input) != 2 or not node.output:
            continue
        first, second = node.input
        output = node.output[0]
        if first == second or first in held or second in held or output in written or node.name in named or output in merged:
            continue  # (an operator kept under its node name gave its output another name: onnxslim)
        after = [(kept[reader.output[0]], slot) for reader, slot in readers.get(output, [])
                 if reader.output and reader.output[0] in kept and _same_node(reader, kept[reader.output[0]])]
        if not after:
            continue
        read = {other.input[slot] if slot < len(other.input) else "" for other, slot in after}
        if len(read) != 1 or not read & {first, second}:
            continue
        (data,) = read
        lost = second if data == first else first
        label = node.name or output
        lines.append(
            f"{node.op_type} '{label}' removed: its readers read its input '{data}' in the suspect, and what its "
            f"other input '{lost}' (computed from the inputs) carried is lost"
        )
    return lines


def _same_node(mine: onnx.NodeProto, theirs: onnx.NodeProto) -> bool:
    """One operator in both models: its type, and its node name where both have one."""
    return mine.op_type == theirs.op_type and (not mine.name or not theirs.name or mine.name == theirs.name)
