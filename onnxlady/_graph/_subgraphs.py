"""The bodies of ``If``, ``Loop`` and ``Scan`` nodes, opened for channel analysis.

A control-flow node's bodies are *opened* when their nodes can be analysed like the main
graph's: :func:`open_subgraphs` lists their nodes (appended after the main graph's in
:class:`~onnxlady._graph._model_graph.ModelGraph`), their initializers and the value infos they
declare, and which control-flow node owns each. A body reads outer-scope tensors by name, so
opening is only sound when every name a body defines is defined nowhere else in the model (the
ONNX IR asks for this; exporters comply); where it is not, or a body cannot be read for another
reason, the node stays *closed* with the reason, and the analysis freezes what it touches.

Nested control flow is opened recursively: a body's own ``If``/``Loop``/``Scan`` nodes are
opened (or closed) in turn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx

from onnxlady._graph._attributes import node_attribute

__all__ = ["CONTROL_FLOW_BODIES", "OpenedSubgraphs", "Subgraph", "is_control_flow", "open_subgraphs"]

#: The graph attributes of each control-flow operator, in the order the analysis walks them.
CONTROL_FLOW_BODIES: dict[str, tuple[str, ...]] = {
    "If": ("then_branch", "else_branch"),
    "Loop": ("body",),
    "Scan": ("body",),
}


@dataclass(frozen=True)
class Subgraph:
    """One body of a control-flow node, as the analysis walks it."""

    owner: int  # index of the If/Loop/Scan node in ModelGraph.nodes
    attribute: str  # "then_branch", "else_branch" or "body"
    nodes: tuple[int, ...]  # its own nodes (ModelGraph indices) in graph order; nested bodies' nodes not included
    inputs: tuple[str, ...]  # formal inputs (Loop: iteration, condition, carried values; Scan: states, slices)
    outputs: tuple[str, ...]


@dataclass
class OpenedSubgraphs:
    """What :func:`open_subgraphs` found: the nodes to append and where they belong."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    subgraphs: dict[int, tuple[Subgraph, ...]] = field(default_factory=dict)
    closed: dict[int, str] = field(default_factory=dict)
    owner: dict[int, int] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    value_infos: list[onnx.ValueInfoProto] = field(default_factory=list)
    names: set[str] = field(default_factory=set)


def is_control_flow(node: onnx.NodeProto) -> bool:
    """An ONNX ``If``, ``Loop`` or ``Scan`` node."""
    return node.op_type in CONTROL_FLOW_BODIES and node.domain in ("", "ai.onnx")


def open_subgraphs(
    nodes: list[onnx.NodeProto], order: list[int], defined: set[str], opset: int
) -> OpenedSubgraphs:
    """Open the bodies of the control-flow nodes among ``nodes`` (the main graph's, in ``order``).

    Args:
        nodes: the main graph's nodes; body nodes get the indices ``len(nodes)``, ``len(nodes) + 1``...
        order: the main graph's topological order (bodies are opened in that order).
        defined: every name the main graph defines (inputs, initializers, node outputs).
        opset: the model's default-domain opset (``Scan`` before opset 9 has a batch axis).

    Returns:
        The body nodes to append, each opened node's bodies, the reason each closed node stays
        closed, the body initializers and the value infos the bodies declare.
    """
    result = OpenedSubgraphs()
    taken = set(defined)
    base = len(nodes)

    def visit(index: int, node: onnx.NodeProto, nested: bool) -> None:
        # A nested node's names were checked (and taken) with its outermost control-flow node's.
        problem = _problem(node, set() if nested else taken, opset)
        if problem is not None:
            result.closed[index] = problem
            return
        if not nested:
            inside = _defined_inside(node)
            taken.update(inside)
            result.names.update(inside)
        bodies = []
        for attribute in CONTROL_FLOW_BODIES[node.op_type]:
            graph = _graph_attribute(node, attribute)
            assert graph is not None  # _problem checked it
            own = []
            for body_node in graph.node:
                position = base + len(result.nodes)
                result.nodes.append(body_node)
                result.owner[position] = index
                own.append(position)
            result.initializers.update((tensor.name, tensor) for tensor in graph.initializer)
            result.value_infos.extend([*graph.input, *graph.output, *graph.value_info])
            inputs, outputs = tuple(v.name for v in graph.input), tuple(v.name for v in graph.output)
            bodies.append(Subgraph(index, attribute, tuple(own), inputs, outputs))
        result.subgraphs[index] = tuple(bodies)
        for body in bodies:
            for position in body.nodes:
                inner = result.nodes[position - base]
                if is_control_flow(inner):
                    visit(position, inner, True)

    for index in order:
        if is_control_flow(nodes[index]):
            visit(index, nodes[index], False)
    return result


def _problem(node: onnx.NodeProto, taken: set[str], opset: int) -> str | None:
    """Why the bodies of ``node`` cannot be opened, or None."""
    if node.op_type == "Scan" and opset < 9:
        return "Scan before opset 9 has a batch axis; its body is not analysed"
    graphs = []
    for attribute in CONTROL_FLOW_BODIES[node.op_type]:
        graph = _graph_attribute(node, attribute)
        if graph is None:
            return f"it has no '{attribute}' graph"
        graphs.append(graph)
    shape_problem = _signature_problem(node, graphs)
    if shape_problem is not None:
        return shape_problem
    for graph in _all_graphs(graphs):
        if len(graph.sparse_initializer):
            return f"body '{graph.name}' holds a sparse initializer; its bodies are not analysed"
    counts = Counter(_defined_names(graphs))
    clash = sorted(name for name, count in counts.items() if count > 1 or name in taken)
    if clash:
        return (
            f"its bodies define '{clash[0]}', a name defined elsewhere in the model too; bodies are "
            "analysed only where every name is defined once"
        )
    for graph in graphs:
        unsorted = _unsorted_node(graph)
        if unsorted is not None:
            return f"body '{graph.name}' uses '{unsorted}' before the node that computes it"
    return None


def _signature_problem(node: onnx.NodeProto, graphs: list[onnx.GraphProto]) -> str | None:
    """Whether the bodies' inputs and outputs match the node's, as the operator defines them."""
    outputs = len(node.output)
    if node.op_type == "If":
        if any(len(graph.input) or len(graph.output) != outputs for graph in graphs):
            return f"a branch does not return {outputs} value(s) from no input"
        return None
    (body,) = graphs
    if node.op_type == "Loop":
        carried = len(node.input) - 2
        if carried < 0 or len(body.input) != 2 + carried or not 1 + carried <= len(body.output) == outputs + 1:
            return "its body's inputs and outputs do not match the Loop's"
        return None
    scan_inputs = int(node_attribute(node, "num_scan_inputs", -1))
    states = len(node.input) - scan_inputs
    if scan_inputs < 1 or states < 0 or len(body.input) != len(node.input) or len(body.output) != outputs:
        return "its body's inputs and outputs do not match the Scan's"
    return None


def _graph_attribute(node: onnx.NodeProto, name: str) -> onnx.GraphProto | None:
    value = node_attribute(node, name)
    return value if isinstance(value, onnx.GraphProto) else None


def _nested_graphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _all_graphs(graphs: list[onnx.GraphProto]) -> Iterator[onnx.GraphProto]:
    """``graphs`` and every graph nested in them, at any depth."""
    for graph in graphs:
        yield graph
        for node in graph.node:
            yield from _all_graphs(list(_nested_graphs(node)))


def _defined_names(graphs: list[onnx.GraphProto]) -> Iterator[str]:
    """Every name a graph defines, nested graphs included, once per definition."""
    for graph in _all_graphs(graphs):
        yield from (value.name for value in graph.input)
        yield from (tensor.name for tensor in graph.initializer)
        for node in graph.node:
            yield from (name for name in node.output if name)


def _defined_inside(node: onnx.NodeProto) -> set[str]:
    return set(_defined_names(list(_nested_graphs(node))))


def _unsorted_node(graph: onnx.GraphProto) -> str | None:
    """A name a node of ``graph`` reads before a later node of ``graph`` computes it, if any."""
    later = {name for node in graph.node for name in node.output if name}
    for node in graph.node:
        for name in node.input:
            if name in later:
                return name
        later.difference_update(node.output)
    return None
