"""Values a graph computes from its constants and its tensors' shapes, static or partial: one evaluator.

torch's MultiheadAttention (and HF's exports) compute an attention's q/k scale at run time from
the head size: ``Shape(q) -> Slice (or Gather) -> Cast -> Sqrt -> Div(1, .) -> Sqrt``, applied by
``Mul``. A converter that knows the shapes (onnxslim, onnxsim) folds that chain into one stored
scalar, kept in the ``Mul`` or folded into a projection's weight. To compare the two forms, the
reference's scalar is evaluated as the converter does: by the audit (the constants that
arithmetic reads, :mod:`onnxlady._audit._operator_constants`) and by the resync (a layer's scalar
step, :mod:`onnxlady._resync._sites`).

The graph's own folding (:mod:`onnxlady._graph._fold`, :attr:`ModelGraph.folded`) reads fully
static shapes only. With a dynamic batch or sequence axis the head size is still known (the last
axis of q), so here a ``Shape`` of a tensor with unknown dims holds -1 for them, and only the
operators that pick elements out of a shape value (:data:`_PICKING`) read it: their value is
known where it holds no -1. A value that needs an unknown dim is not evaluated (never a guess).
Floats are evaluated in float64 (:func:`~onnxlady._graph._fold.evaluate_node`); integers computed
by integer arithmetic alone are exact (:meth:`ShapeValues.exact`), as the runtime computes them.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import onnx

from onnxlady._graph._fold import EVALUATE_LIMIT, _shape, evaluate_node, static_shape
from onnxlady._graph._model_graph import ModelGraph

__all__ = ["ShapeValues", "shape_values"]

#: Operators that pick elements out of a shape value: what they pick is known where no unknown dim is picked.
_PICKING = frozenset({"Slice", "Gather", "Squeeze", "Unsqueeze", "Identity"})
#: Most operators between a value and the constants and shapes it is computed from.
_DEPTH = 64
#: Standard domains.
_STANDARD = ("", "ai.onnx")
#: What a tensor is computed from (:meth:`ShapeValues._source`): a graph input's values (or an
#: operator not read here), constants alone, or constants and shapes.
_NONE, _CONSTANTS, _SHAPES = 0, 1, 2


class ShapeValues:
    """The values one graph computes from constants and shapes, evaluated on demand and kept."""

    def __init__(self, graph: ModelGraph) -> None:
        self._graph = graph
        self._memo: dict[str, np.ndarray | None] = {}
        self._partial: set[str] = set()  # shape values that hold an unknown dim (as -1)
        self._inexact: set[str] = set()  # values computed through float arithmetic
        self._sources: dict[str, int] = {}  # what a tensor is computed from (_NONE, _CONSTANTS, _SHAPES)

    def value(self, name: str) -> np.ndarray | None:
        """``name``'s value where it is computed from shapes (and constants) and every element is known, else None.

        Floats are in float64. A tensor computed from constants alone is no concern of this
        evaluator (:meth:`ModelGraph.constant_value`, the resync's bounded reads).
        """
        value = self._evaluate(name, 0) if name and self._source(name, 0) == _SHAPES else None
        return None if value is None or name in self._partial else value

    def scalar(self, name: str) -> np.ndarray | None:
        """``name``'s value where it is one known float (in float64), else None."""
        dims = static_shape(self._graph.shape(name)) if name else None
        if dims is not None and math.prod(dims) != 1:
            return None  # a table (a position embedding gathered by a range): not evaluated for nothing
        value = self.value(name)
        return value if value is not None and value.dtype.kind == "f" and value.size == 1 else None

    def from_shapes(self, name: str) -> bool:
        """Whether ``name`` is computed from constants and at least one ``Shape`` or ``Size``, no graph input's values.

        What a converter that knows the input's shape folds, whether or not its value is known here.
        """
        return bool(name) and self._source(name, 0) == _SHAPES

    def exact(self, name: str) -> np.ndarray | None:
        """``name``'s value where it is integers (or booleans) computed by integer arithmetic alone, else None.

        Such a value is what the runtime computes, bit for bit: shape arithmetic has no rounding.
        """
        value = self.value(name)
        return value if value is not None and value.dtype.kind in "iub" and name not in self._inexact else None

    def known_shape_read(self, index: int) -> bool:
        """Whether node ``index`` is a ``Shape`` or ``Size`` whose readers take known values out of it.

        A converter that knows those dims folds such a read (onnxslim turns ``Shape(q) -> Slice``
        of the head size into a constant); it reads no element of its input's values either way.
        """
        graph = self._graph
        node = graph.nodes[index]
        if node.op_type not in ("Shape", "Size") or (node.domain or "") not in _STANDARD or len(node.output) != 1:
            return False
        return self._reads_known(node.output[0], 0)

    def _reads_known(self, name: str, depth: int) -> bool:
        """Whether ``name`` is known, or a partial shape value whose every reader makes a known value of it."""
        graph = self._graph
        if not name or name in graph.graph_outputs or depth >= _DEPTH:
            return False
        if self.value(name) is not None:
            return True
        if name not in self._partial:
            return False
        readers = graph.consumers.get(name, [])
        for reader, _ in readers:
            if not 0 <= reader < graph.main_count:
                return False
            outputs = graph.nodes[reader].output
            if len(outputs) != 1 or not self._reads_known(outputs[0], depth + 1):
                return False
        return bool(readers)

    def _source(self, name: str, depth: int) -> int:
        """What ``name`` is computed from: constants and at least one shape (:data:`_SHAPES`), constants alone, or more.

        Read from the graph's structure only, first: an activation's producers and their weights,
        and tensors computed from constants alone (folded weights: read with their bound by the
        resync), are never evaluated here.
        """
        sources = self._sources
        if name not in sources:
            graph = self._graph
            produced = graph.producer.get(name)
            if graph.constant_leaf(name) is not None:
                sources[name] = _CONSTANTS
            elif produced is None or not 0 <= produced[0] < graph.main_count or depth >= _DEPTH:
                sources[name] = _NONE
            else:
                node = graph.nodes[produced[0]]
                sources[name] = _NONE  # until shown otherwise (a cycle reads as not computed)
                if node.op_type in ("Shape", "Size") and (node.domain or "") in _STANDARD:
                    sources[name] = _SHAPES
                else:  # any domain: what a converter may fold (only the standard one is evaluated)
                    found = [self._source(item, depth + 1) for item in node.input if item]
                    sources[name] = _NONE if _NONE in found or not found else max(found)
        return sources[name]

    def _evaluate(self, name: str, depth: int) -> np.ndarray | None:
        """``name``'s value, a ``Shape`` or ``Size`` a leaf; a ``Shape`` with unknown dims holds -1 for them (partial)."""
        memo = self._memo
        if name in memo:
            return memo[name]
        memo[name] = None  # until computed (a cycle reads as unknown)
        graph = self._graph
        value: np.ndarray | None = None
        produced = graph.producer.get(name)
        if graph.constant_leaf(name) is not None:
            value = _stored(graph, name)
        elif produced is not None and 0 <= produced[0] < graph.main_count and depth < _DEPTH:
            node = graph.nodes[produced[0]]
            if (node.domain or "") not in _STANDARD:
                pass
            elif node.op_type in ("Shape", "Size"):
                value = self._shape_leaf(name, node)
            else:
                inputs = [self._evaluate(item, depth + 1) if item else None for item in node.input]
                partial = self._partial
                unknown = any(item in partial for item in node.input)
                if not unknown or (
                    node.op_type in _PICKING and node.input[0] in partial
                    and not any(item in partial for item in node.input[1:])
                ):
                    value = evaluate_node(node, inputs, graph.opsets.get("", 0))
                if unknown and value is not None and bool(np.any(value == -1)):
                    partial.add(name)  # still holds an unknown dim
                if value is not None and (value.dtype.kind == "f" or any(item in self._inexact for item in node.input)):
                    self._inexact.add(name)
        memo[name] = value
        return value

    def _shape_leaf(self, name: str, node: onnx.NodeProto) -> np.ndarray | None:
        """The value of a ``Shape`` (unknown dims as -1, ``name`` then partial) or of a ``Size`` (static shapes only)."""
        shape = self._graph.shape(node.input[0]) if node.input and node.input[0] else None
        if shape is None:
            return None
        dims = static_shape(shape)
        if node.op_type == "Size":
            return None if dims is None else np.asarray(math.prod(dims), dtype=np.int64)
        if dims is None:
            dims = tuple(d if isinstance(d, int) and not isinstance(d, bool) and d >= 0 else -1 for d in shape)
        value = _shape(node, dims)  # its start and end read as the fold does
        if bool(np.any(value == -1)):
            self._partial.add(name)
        return value


def _stored(graph: ModelGraph, name: str) -> np.ndarray | None:
    """A stored constant's value (floats widened to float64), or None when it is too large or not numeric."""
    shape = graph.constant_shape(name)
    if shape is None or int(np.prod(shape)) > EVALUATE_LIMIT:
        return None
    stored = graph.constant_value(name)
    return None if stored is None or stored.dtype.kind not in "iufb" else _widened(stored)


def _widened(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float64) if value.dtype.kind == "f" else value


#: Each graph's evaluator, kept while the graph lives (the resync asks once per site).
_BY_GRAPH: weakref.WeakKeyDictionary[ModelGraph, ShapeValues] = weakref.WeakKeyDictionary()


def shape_values(graph: ModelGraph) -> ShapeValues:
    """The evaluator of ``graph``'s values computed from constants and shapes (one per graph)."""
    found = _BY_GRAPH.get(graph)
    if found is None:
        found = _BY_GRAPH[graph] = ShapeValues(graph)
    return found
