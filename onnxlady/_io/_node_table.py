"""Each main-graph node's names and operator, read from the protobuf once and handed on.

Every read of a protobuf field makes new Python objects: at 50,000 nodes reading each node's
inputs, outputs, operator and whether it has attributes costs about 0.1 s, and both the structural
check (:func:`onnxlady._io._validate.validate_model`) and the graph the analysis builds
(:class:`onnxlady._graph._model_graph.ModelGraph`) need them. The check fills a
:class:`NodeTable` as it reads them; the graph takes it instead of reading the protobuf again.

A table is taken once (:meth:`NodeTable.take`), by a graph of the very ``GraphProto`` it was read
from and of as many nodes: the caller that asked for it passes it on at once, before anything
can change the model, and a second graph reads the protobuf as before.
"""

from __future__ import annotations

import onnx

__all__ = ["NodeTable"]


class NodeTable:
    """Per node of one graph, in its order: input names, output names, (op_type, domain), attributes.

    ``listed_in_order`` says whether every node reads only graph inputs, initializers and
    outputs of nodes listed before it (the check found that while reading).
    """

    __slots__ = ("_graph", "attributed", "inputs", "listed_in_order", "ops", "outputs")

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._graph: onnx.GraphProto | None = graph
        self.inputs: list[tuple[str, ...]] = []
        self.outputs: list[tuple[str, ...]] = []
        self.ops: list[tuple[str, str]] = []
        self.attributed: list[bool] = []
        self.listed_in_order = False

    def describes(self, graph: onnx.GraphProto) -> bool:
        """Whether this table (not taken yet) was read from ``graph`` and still has as many nodes.

        For a reader that only looks (the graph fingerprint), before the table is taken.
        """
        return self._graph is not None and self._graph is graph and len(graph.node) == len(self.ops)

    def take(self, graph: onnx.GraphProto) -> NodeTable | None:
        """This table for a graph of ``graph``, once; None when it was read from another or taken already.

        (Protobuf hands out one Python object per message while it lives: ``model.graph is
        model.graph``. The node count is checked too: a node added in between is refused.)
        """
        if self._graph is None or self._graph is not graph or len(graph.node) != len(self.ops):
            return None
        self._graph = None
        return self
