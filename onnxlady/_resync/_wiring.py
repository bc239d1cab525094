"""A twin whose node reads another tensor than the reference's: refused before it is re-ordered.

Resync re-orders a node-for-node copy's tensors as the reference's channels move; a copy rewired
to read a tensor that moves otherwise would be written computing something else (held-out round
17, F8: an unsorted, shape-inconsistent copy resynced to a file ONNX Runtime cannot load).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import node_label
from onnxlady._transforms._key import PermutationKey

__all__ = ["check_wiring"]


def check_wiring(analysis: ChannelAnalysis, suspect: onnx.ModelProto, key: PermutationKey, origin: object) -> None:
    """Refuse a node-for-node suspect whose node reads, in the reference's order, channels in another order.

    A twin's tensors are re-ordered as the reference's channels move. Where a suspect's node
    reads another tensor than the reference's node does (rewired: a residual moved, a graph
    listed out of order and made inconsistent), the tensor it reads may move otherwise than the
    one its weights were matched for: the re-ordered suspect would then compute something else
    than the suspect (and may not even load; held-out round 17, F8). Refused then; a rewiring
    between tensors that move alike is re-ordered as usual (and the audit names it).

    Raises:
        OnnxladyError: such a node, with the tensors it reads in the two models.
    """
    perms = key.permutations()
    if not perms:
        return
    graph, tracked, joint = analysis.graph, analysis.state.tracked, analysis.state.joint
    moves: dict[str, tuple[object, ...]] = {}

    def moved(name: str) -> tuple[object, ...]:
        """How the re-ordering moves tensor ``name``: its non-identity index arrays, by axis."""
        known = moves.get(name)
        if known is None:
            found: list[object] = []
            spaces: list[tuple[tuple[int, ...], Any]] = [((axis,), expr) for axis, expr in tracked.get(name, {}).items()]
            spaces += [(space.axes, space.expr) for space in joint.get(name, [])]
            for axes, expr in sorted(spaces, key=lambda item: item[0]):
                index = analysis.index_array(expr, perms)
                if not np.array_equal(index, np.arange(index.size)):
                    found.append((axes, index.tobytes()))
            known = moves[name] = tuple(found)
        return known

    twins = {node.output[0]: node for node in suspect.graph.node if node.output and node.output[0]}
    for index, node in enumerate(graph.nodes):
        twin = twins.get(node.output[0]) if node.output else None
        if twin is None or (twin.domain, twin.op_type) != (node.domain, node.op_type):
            continue  # (a node inside a local function: its call is what the suspect lists)
        for slot, (mine, theirs) in enumerate(zip(node.input, twin.input)):
            if mine == theirs or not mine or graph.is_constant(mine):
                continue
            label = f"{origin}: node {node_label(node, index)} reads '{theirs}' at input {slot} where the reference's reads '{mine}'"
            if moved(mine) != moved(theirs):
                raise OnnxladyError(
                    f"{label}, whose channels the reference's order moves otherwise: re-ordered, the suspect would "
                    "compute something else (resync re-orders copies wired as the reference; audit names the edit)"
                )
            shapes = graph.shape(mine), graph.shape(theirs)
            if None not in shapes and shapes[0] != shapes[1]:
                # Same operator, same constants, another shape read: not the reference's graph
                # (a Conv reading another channel count cannot run: no runtime loads such a file).
                raise OnnxladyError(
                    f"{label}, of shape {_dims(shapes[1])} instead of {_dims(shapes[0])}: the suspect's graph is "
                    "not the reference's (resync re-orders copies wired as the reference; audit names the edit)"
                )


def _dims(shape: tuple[object, ...] | None) -> str:
    return "[" + ",".join("?" if dim is None else str(dim) for dim in shape or ()) + "]"
