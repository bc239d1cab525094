"""A read-only view of an ONNX graph for channel analysis.

:class:`ModelGraph` answers the questions every permutation rule asks: who produces and who
consumes a tensor, what its static shape is, whether it is a constant (an initializer or a
``Constant`` node, possibly reached through ``Identity``/``Cast``) and what that constant's
leaf tensor is. A constant may also reach its user through ``DequantizeLinear`` (QDQ weights;
``QuantizeLinear`` too, for float weights fake-quantized by ``Q -> DQ`` as quantization-aware
training exports them) or ``Mul`` by another constant (weight-only quantization,
``Cast(W_int8) * scale``): the per-channel scales, zero points and factors met on the way are the
leaf's *companions* (:meth:`ModelGraph.chain_companions`), which must be permuted with it.

Shapes come from ONNX shape inference run on a *skeleton* of the model: large weights are
replaced by typed graph inputs, so inference never copies hundreds of megabytes. A plain graph
of fully static shapes (element-wise operators and MatMuls only) gets the same shapes from
:mod:`onnxlady._graph._static_shapes` without running it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlady._errors import OnnxladyError
from onnxlady._graph import _contrib_shapes as _contrib_shapes
from onnxlady._graph import _fold as _fold
from onnxlady._graph import _static_shapes as _static_shapes
from onnxlady._graph import _subgraphs as _subgraphs
from onnxlady._graph._attributes import node_attribute
from onnxlady._io._external import is_mapped
from onnxlady._io._node_table import NodeTable
from onnxlady._io._tensors import integer_range, read_array

if TYPE_CHECKING:
    import networkx as nx

#: Operators that forward a constant to its user unchanged up to dtype or size-1 axes
#: (exporters reshape biases to [1, C, 1, 1]), or element-wise with other constants
#: (``DequantizeLinear`` of a quantized weight, ``QuantizeLinear`` of a fake-quantized one,
#: ``Mul`` of a weight by its scale); their other inputs must be constants too.
QUANTIZE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
CHAIN_OPS = frozenset(
    {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Mul"} | QUANTIZE_OPS
)
#: Chain operators whose other inputs are only read (shapes, axes): a value folded from
#: constant shape arithmetic is enough there, no stored constant is needed.
SHAPE_ARGUMENT_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Expand"})
#: Chain operators whose output has the shape of their data input: axis k stays axis k.
SHAPE_KEEPING_CHAIN_OPS = frozenset({"Identity", "Cast", "Mul"} | QUANTIZE_OPS)
#: Foldable operators that read their input's shape, not its value.
_SHAPE_READERS = frozenset({"Shape", "Size"})
#: Initializers up to this many elements stay in the shape-inference skeleton (shape tensors).
_SKELETON_KEEP_ELEMENTS = 4096

Dim = int | str | None
Shape = tuple[Dim, ...]


@dataclass(frozen=True)
class ConstantLeaf:
    """Where a constant operand really lives: an initializer or a ``Constant`` node's value."""

    name: str  # tensor name of the leaf (initializer name or Constant output)
    chain: tuple[int, ...]  # node indices of the chain nodes (CHAIN_OPS) between leaf and use
    constant_node: int | None  # index of the Constant node holding it, if not an initializer


@dataclass(frozen=True)
class Companion:
    """A constant operand of a chain node that varies along the permuted axis of the data.

    A per-axis ``(De)QuantizeLinear`` scale (zero point) whose ``axis`` is the permuted one, or the
    other factor of a ``Mul`` where it is not broadcast: it must take the data's permutation.
    """

    node: int  # the chain node (DequantizeLinear, QuantizeLinear, Mul)
    slot: int  # the companion's input slot of that node
    name: str  # the tensor read there (itself possibly a chain output)
    axis: int  # its axis, as the chain node reads it, that follows the permutation
    kind: str  # "dequantize scale", "dequantize zero point", "mul factor"


class ChainAxisError(ValueError):
    """A chain node cannot carry a permutation of this axis (the message says why)."""


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A readable, unique label for a node: its name, or its type and position."""
    return node.name or f"{node.op_type}#{index}"


#: A memo's "not computed yet" (None is a computed answer).
_UNKNOWN: Any = object()


class _InitializerValues(dict):  # type: ignore[type-arg]
    """Small constant values by name: initializers converted to arrays on first use.

    The same mapping as converting every initializer of at most ``FOLD_LIMIT`` elements up front
    (one that cannot be converted is absent), without converting the weights no fold reads:
    at 50,000 nodes those conversions were a fifth of the graph's construction.
    """

    def __init__(self, pending: dict[str, onnx.TensorProto]) -> None:
        super().__init__()
        self._pending = pending

    def _load(self, name: object) -> bool:
        tensor = self._pending.pop(name, None) if isinstance(name, str) else None
        if tensor is None or _element_count(tensor) > _fold.FOLD_LIMIT:
            return False
        try:  # a tensor left in its external file is read from there (onnxlady._io._external)
            self[name] = read_array(tensor, f"tensor '{name}'") if is_mapped(tensor) else numpy_helper.to_array(tensor)
        except Exception:
            return False
        return True

    def __contains__(self, name: object) -> bool:
        # (asked for every node's output: _load is called only for a pending initializer)
        return dict.__contains__(self, name) or (name in self._pending and self._load(name))

    def __missing__(self, name: str) -> np.ndarray:
        if self._load(name):
            return dict.__getitem__(self, name)
        raise KeyError(name)

    def get(self, name: str, default: np.ndarray | None = None) -> np.ndarray | None:  # type: ignore[override]
        if name in self:  # loads it when pending
            return dict.__getitem__(self, name)
        return default


class ModelGraph:
    """Producers, consumers, constants and static shapes of one model's main graph."""

    def __init__(
        self, model: onnx.ModelProto, *, infer_shapes: bool = True, fold: bool = True, nodes: NodeTable | None = None
    ) -> None:
        """Read ``model``'s main graph.

        ``nodes``: its nodes as the model's check just read them (see :mod:`onnxlady._io._node_table`),
        taken if they are this graph's; else the protobuf is read.
        """
        self.model = model
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.graph_inputs: list[str] = [v.name for v in graph.input if v.name not in self.initializers]
        self.graph_outputs: list[str] = [v.name for v in graph.output]
        self.opsets: dict[str, int] = {
            (op.domain or ""): op.version for op in model.opset_import
        }
        self.producer: dict[str, tuple[int, int]] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        self.constant_nodes: dict[str, int] = {}
        self.implicit_inputs: dict[int, tuple[str, ...]] = {}
        #: Each node's input names, output names and (op_type, domain), read from the protobuf
        #: once (:meth:`input_names`, :meth:`output_names`, :meth:`op_of`): every read of a
        #: protobuf field makes new Python objects, and the passes over the graph read them often.
        self._node_inputs: list[tuple[str, ...]] = []
        self._node_outputs: list[tuple[str, ...]] = []
        self._node_ops: list[tuple[str, str]] = []
        #: Whether each node has any attribute (read with the fields above).
        self._node_attributed: list[bool] = []
        self._labels: list[str | None] = []
        #: The main graph's initializer names, where opened bodies add their own to :attr:`initializers`.
        self._main_initializers: frozenset[str] | None = None
        table = nodes.take(graph) if nodes is not None else None
        self._register_nodes(self.nodes, table)
        #: The main graph's nodes are ``nodes[:main_count]`` (``model.graph.node`` in its order);
        #: the nodes of opened If/Loop/Scan bodies follow (see :meth:`_open_subgraphs`).
        self.main_count = len(self.nodes)
        # A graph listed in order reads only names defined before (all defined): its inputs need
        # no second check (exporters emit sorted graphs; the others are checked, then sorted).
        listed_in_order = table.listed_in_order if table is not None else self._listed_in_order()
        self._check_defined(check_inputs=not listed_in_order)
        self.order: list[int] = list(range(len(self.nodes))) if listed_in_order else self._topological_order()
        self._open_subgraphs()
        self.shapes: dict[str, Shape] = {}
        self.dtypes: dict[str, int] = {}
        #: Values of computed tensors that are constant for every input of the declared shapes
        #: (shape arithmetic, see :mod:`onnxlady._graph._fold`): read by :meth:`constant_value` only;
        #: they are no constant leaves and never permuted.
        self.folded: dict[str, np.ndarray] = {}
        self._fold = fold
        self._collect_shapes(infer_shapes)
        self._values: dict[str, np.ndarray | None] = {}
        # Memos for the constant walks: a Mul's data slot needs its operands' shapes, which for
        # constants come from their own chains; without them, graphs full of Muls (activations,
        # normalisations) without inferred shapes would be walked again and again.
        self._leaves: dict[str, ConstantLeaf | None] = {}
        self._data_slots: dict[int, int | None] = {}
        self._derived: set[str] | None = None
        self._constant_shapes: dict[str, tuple[int, ...] | None] = {}
        self._output_positions: dict[str, int] | None = None

    # -- structure -----------------------------------------------------------------------
    def _register_nodes(self, nodes: list[onnx.NodeProto], table: NodeTable | None = None) -> None:
        """Record what ``nodes`` produce and read, and which are Constants.

        They are the nodes at indices ``len(self._node_inputs)`` on (registered in index order).
        ``table``: their names and operators as the model's check read them (the whole main
        graph), instead of reading them from the protobuf again.
        """
        producer, consumers, constant_nodes = self.producer, self.consumers, self.constant_nodes
        start = len(self._node_inputs)
        if table is None:
            # (A repeated field's slice is a list made in C: a tuple of it costs less than a
            # tuple read through the field's iterator.)
            inputs_of = [tuple(node.input[:]) for node in nodes]
            outputs_of = [tuple(node.output[:]) for node in nodes]
            ops_of = [(node.op_type, node.domain) for node in nodes]
            attributed_of = [len(node.attribute) > 0 for node in nodes]
        else:
            inputs_of, outputs_of, ops_of, attributed_of = table.inputs, table.outputs, table.ops, table.attributed
        self._node_inputs.extend(inputs_of)
        self._node_outputs.extend(outputs_of)
        self._node_ops.extend(ops_of)
        self._node_attributed.extend(attributed_of)
        for index, outputs, inputs, (op_type, domain), has_attributes in zip(
            range(start, start + len(nodes)), outputs_of, inputs_of, ops_of, attributed_of
        ):
            for slot, name in enumerate(outputs):
                if name:
                    producer[name] = (index, slot)
            for slot, name in enumerate(inputs):
                if name:
                    readers = consumers.get(name)
                    if readers is None:
                        consumers[name] = [(index, slot)]
                    else:
                        readers.append((index, slot))
            node = nodes[index - start]
            if op_type == "Constant" and domain in ("", "ai.onnx") and _constant_attribute(node) is not None:
                constant_nodes[outputs[0]] = index
            outer = _outer_scope_names(node) if has_attributes else None  # most nodes hold no subgraph
            if outer:
                self.implicit_inputs[index] = tuple(sorted(outer))
                for name in outer:
                    consumers.setdefault(name, []).append((index, -1))
        self._labels.extend([None] * len(nodes))

    def _open_subgraphs(self) -> None:
        """Add the nodes and initializers of every If/Loop/Scan body that can be analysed.

        An opened node's outer-scope reads are then made by its body nodes themselves (their
        ``(node, -1)`` entries go), and it reads its bodies' outputs instead (slot -1). Closed
        nodes keep their outer-scope reads, with the reason in :attr:`closed_subgraphs`.
        """
        if any(op in _subgraphs.CONTROL_FLOW_BODIES and domain in ("", "ai.onnx") for op, domain in self._node_ops):
            defined = set(self.initializers) | {v.name for v in self.model.graph.input} | set(self.producer)
            opened = _subgraphs.open_subgraphs(self.nodes, self.order, defined, self.opsets.get("", 1))
        else:  # no If, Loop or Scan: nothing to open (and no set of every name to make)
            opened = _subgraphs.OpenedSubgraphs()
        #: Bodies of each opened control-flow node (see :class:`onnxlady._graph._subgraphs.Subgraph`).
        self.subgraphs: dict[int, tuple[_subgraphs.Subgraph, ...]] = opened.subgraphs
        #: Why each control-flow node whose bodies are not analysed stays closed.
        self.closed_subgraphs: dict[int, str] = opened.closed
        #: The control-flow node each body node belongs to.
        self.subgraph_owner: dict[int, int] = opened.owner
        self._subgraph_infos = opened.value_infos
        self._subgraph_names = opened.names
        if opened.initializers:  # (the main graph's names kept apart first: see main_initializer_names)
            self._main_initializers = frozenset(self.initializers)
            self.initializers.update(opened.initializers)
        self.nodes.extend(opened.nodes)
        self._register_nodes(opened.nodes)
        for index, bodies in self.subgraphs.items():
            for name in self.implicit_inputs.get(index, ()):
                self.consumers[name].remove((index, -1))
            for body in bodies:
                for name in body.outputs:
                    if name:
                        self.consumers.setdefault(name, []).append((index, -1))

    def _check_defined(self, *, check_inputs: bool = True) -> None:
        """Refuse a node input or graph output nothing defines (``check_inputs=False``: graph outputs only)."""
        known = set(self.initializers) | {v.name for v in self.model.graph.input} | set(self.producer)
        for index, inputs in enumerate(self._node_inputs if check_inputs else ()):  # (one per node: self.nodes in its order)
            for name in inputs:
                if name and name not in known:
                    node = self.nodes[index]
                    if any(sparse.values.name == name for sparse in self.model.graph.sparse_initializer):
                        raise OnnxladyError(
                            f"node '{node_label(node, index)}' reads '{name}', a sparse_initializer: onnxlady reads "
                            "dense initializers only (store it as a dense initializer to permute, resync or audit it)"
                        )
                    raise OnnxladyError(
                        f"node '{node_label(node, index)}' reads tensor '{name}' that nothing defines "
                        "(truncated or malformed model)"
                    )
        for name in self.graph_outputs:
            if name not in known:
                raise OnnxladyError(f"graph output '{name}' is not produced by any node (malformed model)")

    def dependency_graph(self) -> nx.MultiDiGraph:
        """Operators and tensors as a networkx graph: ``("op", index)`` and ``("tensor", name)`` nodes."""
        import networkx as nx  # imported when used: it costs 0.3 s at start-up

        dag = nx.MultiDiGraph()
        for index, node in enumerate(self.nodes[: self.main_count]):
            op = ("op", index)
            dag.add_node(op, op_type=node.op_type, domain=node.domain, label=node_label(node, index))
            for name in list(node.input) + list(self.implicit_inputs.get(index, ())):
                if name:
                    dag.add_edge(("tensor", name), op)
            for name in node.output:
                if name:
                    dag.add_edge(op, ("tensor", name))
        return dag

    def _listed_in_order(self) -> bool:
        """Whether every node reads only graph inputs, initializers and outputs of nodes listed before it."""
        seen = set(self.initializers) | {v.name for v in self.model.graph.input}
        node_inputs, node_outputs, implicit = self._node_inputs, self._node_outputs, self.implicit_inputs
        for index in range(len(self.nodes)):  # (plain loops: no generator per node)
            for name in node_inputs[index] + implicit[index] if index in implicit else node_inputs[index]:
                if name and name not in seen:
                    return False
            for name in node_outputs[index]:
                if name:
                    seen.add(name)
        return True

    def _topological_order(self) -> list[int]:
        """The nodes sorted (networkx's lexicographical order), for a graph not listed in order."""
        import networkx as nx

        dag = self.dependency_graph()
        try:
            ordered = nx.lexicographical_topological_sort(dag, key=_sort_key)
            return [key[1] for key in ordered if key[0] == "op"]
        except nx.NetworkXUnfeasible as exc:
            raise OnnxladyError("the graph has a cycle (malformed model)") from exc

    # -- shapes --------------------------------------------------------------------------
    def _collect_shapes(self, infer: bool) -> None:
        graph = self.model.graph
        shapes, dtypes = self.shapes, self.dtypes
        for name, tensor in self.initializers.items():
            shapes[name] = tuple(tensor.dims[:])  # protobuf's int64 dims are Python ints
            dtypes[name] = tensor.data_type
        for name, index in self.constant_nodes.items():
            constant = _constant_attribute(self.nodes[index])
            if isinstance(constant, onnx.TensorProto):
                self.shapes[name] = tuple(int(d) for d in constant.dims)
                self.dtypes[name] = constant.data_type
        self._merge_infos(list(graph.input) + list(graph.output) + list(graph.value_info))
        self._merge_infos(self._subgraph_infos)
        if infer:
            # Inference on the skeleton names unknown dims consistently; value_info written by
            # another tool (a quantizer's) may name the same dim differently at each tensor.
            own = self._is_own_skeleton()
            # Large weights only change what inference would read (inputs of their shapes).
            if not ((own or self._is_own_skeleton(weights=True)) and self._static_shapes()):
                skeleton = self.model if own else self._skeleton()
                self._merge_infos(self._inferred_infos(skeleton), prefer=True)
            if self._fold:
                self._fold_shape_arithmetic()
                self._infer_past_contrib()

    def _static_shapes(self) -> bool:
        """Record what ONNX's inference would merge for a plain, fully static graph; whether it could.

        Only for a model :meth:`_is_own_skeleton` accepts, without local functions, whose graph
        inputs are no initializers and whose node outputs nothing has typed yet (no value_info):
        :func:`~onnxlady._graph._static_shapes.static_output_shapes` then gives every node
        output the shape and type inference gives it, and ``_merge_infos(..., prefer=True)`` of
        inference's answer would record exactly those. A graph output must be declared as
        computed (inference would merge a different declaration into it). False, with nothing
        recorded, otherwise: inference runs.
        """
        model, count = self.model, self.main_count
        if len(model.functions) or len(self.graph_inputs) != len(model.graph.input) or count != len(self.nodes):
            return False
        found = _static_shapes.static_output_shapes(
            self._node_ops, self._node_inputs, self._node_outputs,
            self._node_attributed, self.shapes, self.dtypes, self.nodes,
        )  # fmt: skip
        if found is None:
            return False
        shapes, dtypes, outputs = self.shapes, self.dtypes, set(self.graph_outputs)
        # Only graph outputs may be typed already (as declared); the others get their first type.
        if not ((shapes.keys() | dtypes.keys()) & found.keys()) <= outputs:
            return False
        for name in outputs:
            if name not in found or (shapes.get(name), dtypes.get(name)) != found[name]:
                return False
        for name, (shape, dtype) in found.items():  # (one pass, in found's order, as two updates would)
            if name not in outputs:
                shapes[name] = shape
                dtypes[name] = dtype
        return True

    def _infer_past_contrib(self) -> None:
        """Whole-graph inference again, with the outputs of other domains' operators typed.

        ONNX's inference stops at an operator it does not know (``MatMulNBits``...), and with
        it the propagation of shape values (``Shape`` -> ``Concat`` -> ``Expand``) beyond; the
        per-node pass types those outputs (:mod:`onnxlady._graph._contrib_shapes`) but folds
        numbers only, so symbolic shape values are propagated by one more whole-graph run.
        """
        typed = []
        # (the operators and outputs as read once, not each node's protobuf fields again)
        for (_, domain), outputs in zip(self._node_ops[: self.main_count], self._node_outputs[: self.main_count]):
            if domain in ("", "ai.onnx"):
                continue
            for name in outputs:
                shape, dtype = self.shapes.get(name), self.dtypes.get(name)
                if name and shape is not None and dtype:
                    dims = [d if isinstance(d, (int, str)) else None for d in shape]
                    typed.append(onnx.helper.make_tensor_value_info(name, dtype, dims))
        if typed:
            skeleton = self._skeleton()
            skeleton.graph.value_info.extend(typed)
            self._merge_infos(self._inferred_infos(skeleton))

    def _merge_infos(self, infos: list[onnx.ValueInfoProto], *, prefer: bool = False) -> None:
        """Record the shapes and types of ``infos`` where they know more (or, with ``prefer``, as much)."""
        initializers, shapes, dtypes, graph_inputs = self.initializers, self.shapes, self.dtypes, self.graph_inputs
        for info in infos:
            name = info.name  # each protobuf read makes a new string: read once
            type_proto = info.type
            if not type_proto.HasField("tensor_type") or name in initializers:
                continue
            tensor_type = type_proto.tensor_type
            if name not in dtypes:
                dtypes[name] = tensor_type.elem_type
            if tensor_type.HasField("shape"):
                # _dim inlined (one call per dim of every tensor): a positive dim_value, else the
                # dim_param (empty when unset), else unknown.
                shape = tuple([v if (v := d.dim_value) > 0 else (d.dim_param or None) for d in tensor_type.shape.dim])
                old = shapes.get(name)
                if (
                    old is None
                    or _known_count(shape) > _known_count(old)
                    or (
                        prefer
                        and len(shape) == len(old)
                        and _known_count(shape) == _known_count(old)
                        and name not in graph_inputs
                    )
                ):
                    shapes[name] = shape

    def _fold_shape_arithmetic(self) -> None:
        """Fold computed constants and infer the shapes they determine, in one topological pass.

        After shape inference on the whole skeleton, every node is visited in order: it folds
        if its inputs are known small values (or it is ``Shape``/``Size`` of a tensor of fully
        static shape, see :mod:`onnxlady._graph._fold`); otherwise, if its output shape is not fully
        known yet, ONNX's shape inference runs on that node alone with the folded values of
        its inputs (a ``Reshape`` to a computed target, a ``Slice`` with computed ends...), so
        that the ``Shape`` nodes further down can fold in turn. Linear in the graph's size.
        """
        overridable = {v.name for v in self.model.graph.input} if self.model.ir_version >= 4 else set()
        # Initializers are read when a node asks for them: most are weights no fold ever reads.
        values = _InitializerValues(
            {name: tensor for name, tensor in self.initializers.items() if name not in overridable}
        )
        for name, index in self.constant_nodes.items():
            value = _fold.constant_attribute_value(self.nodes[index])
            if value is not None and value.size <= _fold.FOLD_LIMIT and value.dtype.kind in "iufb":
                values[name] = value
        opset = self.opsets.get("", self.opsets.get("ai.onnx", 1))
        opset_imports = list(self.model.opset_import)
        protos: dict[str, onnx.TensorProto] = {}
        refined: set[str] = set()  # tensors whose shape became better known in this pass
        symbolic: dict[str, _fold.SymbolicValue] = {}  # shape values with symbolic elements
        shapes, implicit = self.shapes, self.implicit_inputs
        node_inputs, node_outputs, node_ops = self._node_inputs, self._node_outputs, self._node_ops
        # ``name in values`` without a call for the names it holds or cannot hold (most): a
        # pending initializer is asked the mapping itself, which reads it in.
        held, pending = dict.__contains__, values._pending
        contrib: dict[tuple[str, str], bool] = {}  # knows_operator's answer per operator
        for index in self.order:
            outputs = node_outputs[index]
            if index in implicit or not outputs:
                continue
            first = outputs[0]
            if held(values, first) or (first in pending and first in values):
                continue
            node = self.nodes[index]
            op = node_ops[index]
            op_type, domain = op
            default = domain in ("", "ai.onnx")
            # fold_node answers None for any other operator, and for one with an unknown input
            # (but Shape/Size, which read shapes): not called then (nor symbolic_value).
            value = None
            if default and op_type in _fold.FOLDABLE_OPS:
                for n in node_inputs[index] if op_type not in _SHAPE_READERS else ():
                    if n and not (held(values, n) or (n in pending and n in values)):
                        break
                else:
                    value = _fold.fold_node(node, values, shapes, self.dtypes, opset)
            if value is not None:
                name = outputs[0]
                values[name] = value
                self.folded[name] = value
                shapes[name] = tuple(int(d) for d in value.shape)
                continue
            if default and op_type in _fold.SYMBOLIC_OPS:
                found = _fold.symbolic_value(node, symbolic, values, shapes)
                # Kept though it names no dim: an int picked out of a symbolic shape (``Gather`` of
                # a known dim) or an Equal's 0/1 answers build the next value (torch's ``expand``).
                if found is not None:
                    symbolic[outputs[0]] = found
            if op_type == "Reshape" and default:
                refined |= self._reshape_symbolic(node, symbolic, values)
            if op_type == "Expand" and default:
                refined |= self._expand_symbolic(node, symbolic, values)
            known = contrib.get(op)
            if known is None:
                known = contrib[op] = _contrib_shapes.knows_operator(domain, op_type)
            if known:
                refined |= self._infer_contrib(node)
                continue
            if not default:
                continue
            for name in outputs:  # (a loop, not all(): no generator per node)
                if name and not _fully_static(shapes.get(name)):
                    break
            else:
                continue  # every output's shape fully known
            feeds = [name for name in node_inputs[index] if name]
            # An output still unknown with every input known: inference on the skeleton stopped
            # before it (at an unknown operator) while value_info told the inputs' shapes.
            stalled = all(shapes.get(name) is not None for name in feeds) and any(
                shapes.get(name) is None for name in outputs if name
            )
            if not stalled and not any(name in self.folded or name in refined for name in feeds):
                continue  # nothing new to tell shape inference about this node
            refined |= self._infer_node(node, values, protos, opset, opset_imports)

    def _expand_symbolic(
        self, node: onnx.NodeProto, symbolic: dict[str, _fold.SymbolicValue], values: dict[str, np.ndarray]
    ) -> set[str]:
        """An Expand's output shape from a target read symbolically: {output} if it knows more.

        torch's legacy exporter writes ``x.expand(b, kv, n, s, d)`` with dynamic ``b`` and ``s``
        as ``Expand(x, Where(Equal(shape, -1), 1, shape))``: ONNX's inference leaves every dim of
        the output unknown that is not the input's, the copies' count too (``repeat_kv``).
        """
        read = self._shape_and_target(node, symbolic, values)
        if read is None:
            return set()
        in_shape, target = read
        found = _fold.symbolic_expand(in_shape, target)
        name = node.output[0]
        old = self.shapes.get(name)
        if found is None or (old is not None and (len(old) != len(found) or _known_count(found) <= _known_count(old))):
            return set()
        return self._record_shape(node, found)

    def _record_shape(self, node: onnx.NodeProto, found: Shape) -> set[str]:
        """A shape found for ``node``'s output, its type that of its data input: {output}."""
        name = node.output[0]
        self.shapes[name] = found
        dtype = self.dtypes.get(node.input[0])
        if dtype:
            self.dtypes.setdefault(name, dtype)
        return {name}

    def _shape_and_target(
        self, node: onnx.NodeProto, symbolic: dict[str, _fold.SymbolicValue], values: dict[str, np.ndarray]
    ) -> tuple[Shape, _fold.SymbolicValue] | None:
        """An Expand's or Reshape's input shape and its shape operand, read symbolically or as values."""
        if len(node.input) < 2 or not node.output or not node.output[0]:
            return None
        in_shape = self.shapes.get(node.input[0])
        target = symbolic.get(node.input[1])
        if target is None and node.input[1] in values:
            target = tuple(int(v) for v in values[node.input[1]].reshape(-1))
        if in_shape is None or target is None:
            return None
        return in_shape, target

    def _reshape_symbolic(
        self, node: onnx.NodeProto, symbolic: dict[str, _fold.SymbolicValue], values: dict[str, np.ndarray]
    ) -> set[str]:
        """A Reshape's output shape from a target read symbolically (dims of other tensors): {output} if it helped.

        ONNX's inference cannot resolve ``-1`` next to symbolic dims (``[b, s, 4, 8]`` to
        ``[b, s, -1]``); the symbols cancel here.
        """
        read = self._shape_and_target(node, symbolic, values)
        if read is None:
            return set()
        in_shape, target = read
        found = _fold.symbolic_reshape(in_shape, target, bool(node_attribute(node, "allowzero", 0)))
        if found is None:
            return set()
        name = node.output[0]
        old = self.shapes.get(name)
        unknown = sum(1 for d in found if d is None)
        if old is not None and (
            len(old) != len(found)
            or _known_count(found) < _known_count(old)
            or (_known_count(found) == _known_count(old) and unknown >= sum(1 for d in old if d is None))
        ):
            return set()
        return self._record_shape(node, found)

    def _infer_contrib(self, node: onnx.NodeProto) -> set[str]:
        """Shapes of a contrib operator's outputs (ONNX inference does not know it): the outputs it helped."""
        helped: set[str] = set()
        for name, (shape, dtype) in _contrib_shapes.contrib_output_shapes(node, self.shapes, self.dtypes).items():
            old = self.shapes.get(name)
            if old is None or _known_count(shape) > _known_count(old):
                self.shapes[name] = shape
                helped.add(name)
            if dtype:
                self.dtypes.setdefault(name, dtype)
        return helped

    def _infer_node(
        self,
        node: onnx.NodeProto,
        values: dict[str, np.ndarray],
        protos: dict[str, onnx.TensorProto],
        opset: int,
        opset_imports: list[onnx.OperatorSetIdProto],
    ) -> set[str]:
        """Shape inference on one node with the folded values of its inputs: the outputs it helped."""
        types: dict[str, onnx.TypeProto] = {}
        data: dict[str, onnx.TensorProto] = {}
        for name in node.input:
            if not name:
                continue
            shape, dtype = self.shapes.get(name), self.dtypes.get(name)
            if shape is None or not dtype:
                return set()
            types[name] = onnx.helper.make_tensor_type_proto(dtype, [d if isinstance(d, (int, str)) else None for d in shape])
            if name in values:
                if name not in protos:
                    protos[name] = numpy_helper.from_array(values[name], name)
                data[name] = protos[name]
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
            outputs = onnx.shape_inference.infer_node_outputs(
                schema, node, types, data, opset_imports=opset_imports, ir_version=max(self.model.ir_version, 4)
            )
        except Exception:
            return set()
        helped: set[str] = set()
        for name, proto in outputs.items():
            if not proto.HasField("tensor_type") or not proto.tensor_type.HasField("shape"):
                continue
            shape = tuple(_dim(d) for d in proto.tensor_type.shape.dim)
            old = self.shapes.get(name)
            if old is None or _known_count(shape) > _known_count(old):
                self.shapes[name] = shape
                self.dtypes.setdefault(name, proto.tensor_type.elem_type)
                helped.add(name)
        return helped

    def _inferred_infos(self, skeleton: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
        """Shapes from ONNX shape inference, a best effort (rules freeze where shapes are missing).

        ONNX propagates shape *values* (Shape -> Gather -> Concat -> Reshape) only from opset 15
        on; for older models the skeleton is also converted to opset 17 and inferred again, and
        whatever that adds is used (tensor names survive the conversion).
        """
        infos: list[onnx.ValueInfoProto] = []
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
            # Loop outputs whose shapes are found from their bodies tell the nodes after them
            # theirs: infer again with them (once per Loop at most, for loops in a chain).
            for _ in range(sum(1 for node in skeleton.graph.node if node.op_type == "Loop")):
                carried = _loop_carried_infos(inferred.graph)
                if not carried:
                    break
                skeleton.graph.value_info.extend(carried)
                inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
            infos = list(inferred.graph.value_info) + list(inferred.graph.output)
            if self._subgraph_names:  # (a walk over every node's attributes)
                infos += [v for v in _nested_infos(inferred.graph) if v.name in self._subgraph_names]
        except Exception:
            pass
        if self.opsets.get("", 0) < 15 and self._has_unknown_outputs(infos):
            try:
                upgraded = onnx.version_converter.convert_version(skeleton, 17)
                inferred = onnx.shape_inference.infer_shapes(upgraded, check_type=False, strict_mode=False, data_prop=True)
                produced = set(self.producer)
                infos += [v for v in inferred.graph.value_info if v.name in produced]
            except Exception:
                pass
        return infos

    def _has_unknown_outputs(self, infos: list[onnx.ValueInfoProto]) -> bool:
        known = {v.name for v in infos if v.type.tensor_type.HasField("shape")}
        known |= {v.name for v in self.model.graph.value_info if v.type.tensor_type.HasField("shape")}
        return any(
            name not in known for name in self.producer if name not in self.constant_nodes and name not in self.folded
        )

    def _is_own_skeleton(self, weights: bool = False) -> bool:
        """Whether the model is already what :meth:`_skeleton` would make of it, for inference.

        So when it holds no large weight (nor one in an external file), no value_info, no
        sparse initializer or training info, lists its nodes in order and has nothing folded
        yet; and when :meth:`_inferred_infos` will not change it (no Loop to infer again with its
        carried shapes) nor convert it (opset 15 or later). Inference then reads the model
        itself, without copying every node and weight into a skeleton first.

        With ``weights``, large weights (inline or in their files) are let be: the skeleton
        would make each an input of its shape, which is all :meth:`_static_shapes` reads.
        """
        model, graph = self.model, self.model.graph
        if self.folded or model.ir_version < 4 or self.opsets.get("", 0) < 15:
            return False
        if len(graph.value_info) or len(graph.sparse_initializer) or len(model.training_info):
            return False
        if self.order != list(range(self.main_count)):
            return False
        if any(op == "Loop" for op, _ in self._node_ops):
            return False
        if weights:
            return True
        external = onnx.TensorProto.EXTERNAL
        for tensor in graph.initializer:
            # (is_mapped asked only of an external tensor: its first question, inlined)
            if math.prod(tensor.dims[:]) > _SKELETON_KEEP_ELEMENTS or (
                tensor.data_location == external and is_mapped(tensor)
            ):
                return False
        for index in self.constant_nodes.values():
            value = _constant_attribute(self.nodes[index])
            if isinstance(value, onnx.TensorProto) and _element_count(value) > _SKELETON_KEEP_ELEMENTS:
                return False
        return True

    def _skeleton(self) -> onnx.ModelProto:
        """The model without its large weights (they become typed inputs) for shape inference."""
        graph = self.model.graph
        skeleton = onnx.ModelProto()
        skeleton.ir_version = max(self.model.ir_version, 4)
        skeleton.opset_import.extend(self.model.opset_import)
        skeleton.functions.extend(self.model.functions)
        sgraph = skeleton.graph
        sgraph.name = graph.name
        input_names = {v.name for v in graph.input}
        sgraph.input.extend(graph.input)
        sgraph.output.extend(graph.output)
        small: list[onnx.TensorProto] = []  # added in one call, like the nodes below
        for tensor in graph.initializer:
            if _element_count(tensor) <= _SKELETON_KEEP_ELEMENTS:
                # ONNX's inference cannot read a tensor left in its file: it gets the values inline.
                small.append(numpy_helper.from_array(np.array(read_array(tensor, tensor.name)), tensor.name)
                             if is_mapped(tensor) else tensor)  # fmt: skip
            elif tensor.name not in input_names:
                sgraph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                )
        sgraph.initializer.extend(small)
        constant_indices = set(self.constant_nodes.values())
        # In topological order: ONNX's inference visits nodes as listed, and a converter may
        # list a node before its producer (ORT's float16 converter appends its Casts).
        folded = self.folded
        kept: list[onnx.NodeProto] = []  # added in one call: appending one by one costs more
        for index in self.order:
            node = self.nodes[index]
            outputs = [name for name in self._node_outputs[index] if name] if folded else None
            if outputs and all(name in folded for name in outputs):
                for name in outputs:
                    sgraph.initializer.append(numpy_helper.from_array(folded[name], name))
                continue
            value = _constant_attribute(node) if index in constant_indices else None
            if isinstance(value, onnx.TensorProto) and _element_count(value) > _SKELETON_KEEP_ELEMENTS:
                sgraph.input.append(
                    onnx.helper.make_tensor_value_info(node.output[0], value.data_type, list(value.dims))
                )
                continue
            kept.append(node)
        sgraph.node.extend(kept)
        return skeleton

    def shape(self, name: str) -> Shape | None:
        """Static shape of a tensor (dims are ints, symbolic names, or None), if known."""
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    # -- constants -----------------------------------------------------------------------
    def constant_leaf(self, name: str) -> ConstantLeaf | None:
        """The initializer or Constant node behind ``name``, through chain nodes, if any."""
        leaf = self._leaves.get(name, _UNKNOWN)
        if leaf is _UNKNOWN:
            leaf = self._leaves[name] = self._find_leaf(name)
        return leaf  # type: ignore[return-value]

    def _find_leaf(self, name: str) -> ConstantLeaf | None:
        chain: list[int] = []
        while True:
            if name in self.initializers:
                return ConstantLeaf(name, tuple(reversed(chain)), None)
            if name in self.constant_nodes:
                return ConstantLeaf(name, tuple(reversed(chain)), self.constant_nodes[name])
            produced = self.producer.get(name)
            if produced is None or self._node_ops[produced[0]][0] not in CHAIN_OPS:
                return None  # (most tensors: computed by an operator that forwards no constant)
            data = self.chain_data_slot(produced[0])
            if data is None or not self.is_chain_node(produced[0]):
                return None
            chain.append(produced[0])
            name = self._node_inputs[produced[0]][data]

    def chain_data_slot(self, index: int) -> int | None:
        """The input slot a chain operator forwards, or None when there is none.

        0, or for ``Mul`` the operand with the output's full shape (the other one is a broadcast
        factor); None when neither is.
        """
        if index not in self._data_slots:
            self._data_slots[index] = self._find_data_slot(index)
        return self._data_slots[index]

    def _find_data_slot(self, index: int) -> int | None:
        if self._node_ops[index][0] != "Mul":
            return 0
        inputs = self._node_inputs[index]
        if len(inputs) != 2 or not all(inputs):
            return None
        shapes = [self._static_shape(name) for name in inputs]
        if any(shape is None for shape in shapes):
            return None
        try:
            out = tuple(np.broadcast_shapes(*shapes))  # type: ignore[arg-type]
        except ValueError:
            return None
        for slot, shape in enumerate(shapes):
            if tuple(shape) == out:  # type: ignore[arg-type]
                return slot
        return None

    def _static_shape(self, name: str) -> tuple[int, ...] | None:
        """A fully known shape: inferred, or a constant's (which needs no shape inference)."""
        shape = self.shapes.get(name)
        if shape is not None and all(isinstance(d, int) for d in shape):
            return tuple(int(d) for d in shape)  # type: ignore[arg-type]
        return self.constant_shape(name)

    def is_chain_node(self, index: int) -> bool:
        """A node that forwards a constant (its data input) when all its other inputs are constants."""
        op_type, domain = self._node_ops[index]
        inputs = self._node_inputs[index]
        if op_type not in CHAIN_OPS or domain not in ("", "ai.onnx") or not inputs:
            return False
        data = self.chain_data_slot(index)
        if data is None:
            return False
        return all(
            not name
            or self.constant_leaf(name) is not None
            or (op_type in SHAPE_ARGUMENT_OPS and name in self.folded)
            for slot, name in enumerate(inputs)
            if slot != data
        )

    def _chain_axes(self, name: str, axis: int) -> tuple[list[tuple[int, int]], int] | None:
        """Walk from ``name`` back to its leaf: (chain node, axis of its output) per node, leaf axis."""
        leaf = self.constant_leaf(name)
        if leaf is None:
            return None
        steps: list[tuple[int, int]] = []
        current = name
        for index in reversed(leaf.chain):
            node = self.nodes[index]
            steps.append((index, axis))
            source = node.input[self.chain_data_slot(index) or 0]
            if node.op_type in SHAPE_KEEPING_CHAIN_OPS:
                current = source
                continue
            out_value, in_value = self.constant_value(current), self.constant_value(source)
            if out_value is None or in_value is None:
                return None
            out_shape, in_shape = out_value.shape, in_value.shape
            wide_out = [a for a, d in enumerate(out_shape) if d != 1]
            wide_in = [a for a, d in enumerate(in_shape) if d != 1]
            if [out_shape[a] for a in wide_out] != [in_shape[a] for a in wide_in] or axis not in wide_out:
                return None
            axis = wide_in[wide_out.index(axis)]
            current = source
        return steps, axis

    def leaf_axis(self, name: str, axis: int) -> int | None:
        """The axis of ``name``'s constant leaf that ``axis`` of ``name`` reads, if one does.

        Reshapes in a chain may only add or remove size-1 axes; anything else has no single
        leaf axis and the caller must not permute through it.
        """
        leaf = self.constant_leaf(name)
        if leaf is None:
            return None
        if not leaf.chain:  # a leaf read directly (most weights): its own axis
            return axis
        walked = self._chain_axes(name, axis)
        return None if walked is None else walked[1]

    def use_axis(self, name: str, leaf_axis: int) -> int | None:
        """The axis of ``name`` (a constant read through its chain) that reads ``leaf_axis`` of the leaf."""
        shape = self.constant_shape(name)
        if shape is None:
            return None
        for axis in range(len(shape)):
            if self.leaf_axis(name, axis) == leaf_axis:
                return axis
        return None

    def chain_companions(self, name: str, axis: int) -> list[Companion]:
        """The companions (see :class:`Companion`) met between ``name`` and its leaf for ``axis``.

        Per-tensor scales and zero points, and factors broadcast along the axis, are none.
        Raises :class:`ChainAxisError` where a chain node cannot carry a permutation of the axis
        (blocked quantization along it) or a shape needed to tell is unknown.
        """
        walked = self._chain_axes(name, axis)
        if walked is None:
            return []
        found: list[Companion] = []
        for index, out_axis in walked[0]:
            op_type = self.nodes[index].op_type
            if op_type in QUANTIZE_OPS:
                found += self._quantize_companions(index, out_axis)
            elif op_type == "Mul":
                found += self._mul_companions(index, out_axis)
        return found

    def _quantize_companions(self, index: int, axis: int) -> list[Companion]:
        node = self.nodes[index]
        label = f"{node.op_type} '{node_label(node, index)}'"
        what = "dequantize" if node.op_type == "DequantizeLinear" else "quantize"
        data_shape = self.constant_shape(node.input[0])
        scale_shape = self.constant_shape(node.input[1]) if len(node.input) > 1 else None
        if data_shape is None or scale_shape is None:
            raise ChainAxisError(f"{label}: the shape of its data or scale is unknown")
        if int(np.prod(scale_shape)) <= 1 and len(scale_shape) <= 1:
            return []  # per-tensor: one scale for every channel
        rank = len(data_shape)
        quantized_axis = int(node_attribute(node, "axis", 1))
        quantized_axis += rank if quantized_axis < 0 else 0
        block = int(node_attribute(node, "block_size", 0))
        slots = [(1, f"{what} scale"), (2, f"{what} zero point")]
        slots = [(slot, kind) for slot, kind in slots if slot < len(node.input) and node.input[slot]]
        if block:
            # Blocked quantization: scale and zero point have the data's rank, axis by axis.
            if axis == quantized_axis:
                raise ChainAxisError(
                    f"{label} quantizes axis {axis} in blocks of {block}: "
                    "only whole blocks could move"
                )
            if len(scale_shape) != rank or scale_shape[axis] == 1:
                return []
            return [Companion(index, slot, node.input[slot], axis, kind) for slot, kind in slots]
        if axis != quantized_axis:
            return []  # the per-axis scale is broadcast along the permuted axis
        return [Companion(index, slot, node.input[slot], 0, kind) for slot, kind in slots]

    def _mul_companions(self, index: int, axis: int) -> list[Companion]:
        node = self.nodes[index]
        data = self.chain_data_slot(index)
        assert data is not None
        other = 1 - data
        data_shape, other_shape = self._static_shape(node.input[data]), self._static_shape(node.input[other])
        if data_shape is None or other_shape is None:
            raise ChainAxisError(f"Mul '{node_label(node, index)}': the shape of an operand is unknown")
        out_rank = len(data_shape)
        other_axis = axis - (out_rank - len(other_shape))
        if other_axis < 0 or other_shape[other_axis] == 1:
            return []  # broadcast along the permuted axis
        return [Companion(index, other, node.input[other], other_axis, "mul factor")]

    def is_constant(self, name: str) -> bool:
        if not name:
            return False
        leaf = self._leaves.get(name, _UNKNOWN)  # constant_leaf's memo, read here: rules ask for every input
        if leaf is _UNKNOWN:
            leaf = self.constant_leaf(name)
        return leaf is not None

    def constant_derived(self, name: str) -> bool:
        """Whether ``name`` is computed, by main-graph nodes, from constants and folded values only.

        Such a tensor (a position table sliced, reshaped and resized in the graph) is the same
        for every input; it is no constant leaf, but permuting the constants it is made of can
        permute it (see :mod:`onnxlady._rules._derived`).
        """
        derived = self._derived
        return name in (derived if derived is not None else self.constant_derived_names())

    def constant_derived_names(self) -> set[str]:
        """Every tensor :meth:`constant_derived` accepts (read only; made on first use)."""
        if self._derived is None:
            derived: set[str] = set()
            folded, main_count, implicit = self.folded, self.main_count, self.implicit_inputs
            is_constant, node_inputs, node_ops = self.is_constant, self._node_inputs, self._node_ops
            for index in self.order:
                inputs = node_inputs[index]
                if index >= main_count or index in implicit or node_ops[index][0] == "Constant" or not inputs:
                    continue
                for n in inputs:  # (a loop, not all(): most nodes stop at their first input)
                    if n and n not in derived and n not in folded and not is_constant(n):
                        break
                else:
                    derived.update(out for out in self._node_outputs[index] if out and not is_constant(out))
            self._derived = derived
        return self._derived

    def leaf_tensor(self, leaf: ConstantLeaf) -> onnx.TensorProto:
        """The TensorProto that holds a leaf's data (initializer or Constant node attribute)."""
        if leaf.constant_node is None:
            return self.initializers[leaf.name]
        tensor = _constant_attribute(self.nodes[leaf.constant_node])
        assert isinstance(tensor, onnx.TensorProto)
        return tensor

    def leaf_tensor_or_none(self, leaf: ConstantLeaf) -> onnx.TensorProto | None:
        """The leaf's TensorProto, or None for a Constant holding a list or scalar attribute."""
        if leaf.constant_node is None:
            return self.initializers[leaf.name]
        value = _constant_attribute(self.nodes[leaf.constant_node])
        return value if isinstance(value, onnx.TensorProto) else None

    def forget_values(self) -> None:
        """Let go of the constant values read so far (:meth:`constant_value` reads them again).

        Resync across conversions holds a QDQ suspect's dequantized weights itself while it
        moves them: kept here too, each would stay alive beside its moved copy.
        """
        self._values.clear()

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (after its Cast chain), or None if not constant."""
        if name in self._values:
            return self._values[name]
        leaf = self.constant_leaf(name) if name else None
        value: np.ndarray | None = None
        if leaf is not None:
            node = self.nodes[leaf.constant_node] if leaf.constant_node is not None else None
            raw = _constant_attribute(node) if node is not None else self.initializers[leaf.name]
            if isinstance(raw, onnx.TensorProto):
                # One left in its external file (onnxlady._io._external) is read from there.
                value = read_array(raw, f"tensor '{leaf.name}'") if is_mapped(raw) else numpy_helper.to_array(raw)
            elif raw is not None:
                value = np.asarray(raw)
            if value is not None:
                for index in leaf.chain:
                    value = self._forward_chain(self.nodes[index], value)
                    if value is None:
                        break
        elif name:
            value = self.folded.get(name)  # computed but constant: readable, never a leaf
        self._values[name] = value
        return value

    def _forward_chain(self, node: onnx.NodeProto, value: np.ndarray) -> np.ndarray | None:
        """Apply one chain operator to a constant value (numpy semantics of the ONNX op)."""
        op = node.op_type
        if op == "Identity":
            return value
        if op == "Cast":
            to = node_attribute(node, "to")
            return value.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        if op in QUANTIZE_OPS:
            return self._quantization(node, value)
        if op == "Mul":
            data = self.chain_data_slot(self.producer[node.output[0]][0])
            factor = self.constant_value(node.input[1 - data]) if data is not None else None
            return None if factor is None else np.multiply(value, factor)  # IEEE products commute
        if op == "Flatten":
            axis = int(node_attribute(node, "axis", 1))
            axis = axis + value.ndim if axis < 0 else axis
            return value.reshape(int(np.prod(value.shape[:axis])), -1)
        axes_value = node_attribute(node, "axes", None)
        if axes_value is None and len(node.input) > 1 and node.input[1]:
            axes_value = self.constant_value(node.input[1])
        if op == "Expand":
            if axes_value is None:
                return None
            expand_shape = tuple(int(d) for d in np.asarray(axes_value).reshape(-1))
            return np.broadcast_to(value, np.broadcast_shapes(value.shape, expand_shape)).copy()
        if op == "Reshape":
            if axes_value is None:
                return None
            target = [int(d) for d in np.asarray(axes_value).reshape(-1)]
            if not int(node_attribute(node, "allowzero", 0)):
                target = [value.shape[i] if d == 0 else d for i, d in enumerate(target)]
            return value.reshape(target)
        if op == "Squeeze":
            if axes_value is None:
                return np.squeeze(value)
            return np.squeeze(value, axis=tuple(int(a) for a in np.asarray(axes_value).reshape(-1)))
        if op == "Unsqueeze":
            if axes_value is None:
                return None
            out_rank = value.ndim + np.asarray(axes_value).size
            axes = sorted(int(a) % out_rank for a in np.asarray(axes_value).reshape(-1))
            for a in axes:
                value = np.expand_dims(value, a)
            return value
        return None

    def _quantization(self, node: onnx.NodeProto, value: np.ndarray) -> np.ndarray | None:
        """DequantizeLinear or QuantizeLinear of constants.

        DequantizeLinear ``(x - zero_point) * scale`` or QuantizeLinear
        ``saturate(round(x / scale) + zero_point)``, with per-tensor, per-axis or blocked parameters.
        """
        scale = self.constant_value(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            return None
        zero = self.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        axis = int(node_attribute(node, "axis", 1)) % max(value.ndim, 1)
        block = int(node_attribute(node, "block_size", 0))

        def spread(parameter: np.ndarray) -> np.ndarray:
            if parameter.size == 1 and parameter.ndim <= 1:
                return parameter.reshape(())
            if block:
                return np.repeat(parameter, block, axis=axis).take(range(value.shape[axis]), axis=axis)
            shape = [1] * value.ndim
            shape[axis] = -1
            return parameter.reshape(shape)

        if node.op_type == "QuantizeLinear":
            out = np.dtype(np.uint8) if zero is None else zero.dtype
            limits = integer_range(out)
            if limits is None or out.kind == "b":
                return None  # float8 targets: not needed for shapes
            shifted = np.rint(value.astype(np.float32) / spread(scale).astype(np.float32))
            shifted += 0 if zero is None else spread(zero).astype(np.float32)
            return np.clip(shifted, *limits).astype(out)
        # int4/uint4 (kind "V", see integer_range) are integers too: read as floats, their zero
        # point was dropped (held-out round 13, F1).
        integers = integer_range(value.dtype) is not None
        narrow = value.dtype.itemsize <= 2 and (zero is None or zero.dtype.itemsize <= 2)
        small = integers and narrow and value.ndim > 0
        offset = spread(zero) if small and zero is not None else None
        if small and (offset is None or _broadcasts_into(offset.shape, value.shape)):
            # 4/8/16-bit integers and their difference are exact in float32 (below 2**24): the
            # int64 path's numbers, in one array instead of three (a QDQ weight). Cast, then
            # shifted in place: the same numbers as subtracting with ``dtype=float32``, whose
            # buffered casts took three times as long.
            real = value.astype(np.float32)
            if offset is not None:
                np.subtract(real, offset.astype(np.float32), out=real)
        elif small:
            real = np.subtract(value, 0 if offset is None else offset, dtype=np.float32)
        elif integers:
            shifted = value.astype(np.int64) - (0 if zero is None else spread(zero).astype(np.int64))
            real = shifted.astype(np.float32)
        else:  # float8 and friends: zero point is 0 by definition
            real = value.astype(np.float32)
        factor = spread(scale).astype(np.float32)
        if not isinstance(real, np.ndarray) or real.ndim == 0 or np.broadcast_shapes(real.shape, factor.shape) != real.shape:
            return (real * factor).astype(scale.dtype)  # (a scalar stays one, as before)
        # In place: ``real`` is a new array (the product rounds as ``real * factor`` does).
        return np.multiply(real, factor, out=real).astype(scale.dtype, copy=False)

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of a constant operand as its user sees it (after its chain)."""
        known = self._constant_shapes.get(name, _UNKNOWN)
        if known is _UNKNOWN:  # rules ask for it several times per node
            known = self._constant_shapes[name] = self._find_constant_shape(name)
        return known  # type: ignore[return-value]

    def _find_constant_shape(self, name: str) -> tuple[int, ...] | None:
        leaf = self.constant_leaf(name) if name else None
        if leaf is None:
            return None
        if not leaf.chain or all(self.nodes[i].op_type in SHAPE_KEEPING_CHAIN_OPS for i in leaf.chain):
            shape = self.shapes.get(leaf.name)
            if shape is None:
                return None
            for d in shape:
                if type(d) is not int:
                    break
            else:
                return shape  # type: ignore[return-value]  # (an initializer's dims, most constants: ints already)
            return tuple([int(d) for d in shape if d is not None])
        value = self.constant_value(name)
        return None if value is None else tuple(value.shape)

    def main_initializer_names(self) -> Collection[str]:
        """The names of the main graph's own initializers (:attr:`initializers` adds opened bodies' ones)."""
        return self.initializers.keys() if self._main_initializers is None else self._main_initializers

    def constant_uses(self, leaf_name: str) -> list[tuple[int, int]]:
        """Every (node, input slot) that reads a leaf, directly or through its chain (data slots).

        Slot -1 marks a use from inside a subgraph; a graph output is reported as ``(-1, k)``.
        """
        if self._output_positions is None:  # once, not per constant: a model may have thousands of outputs
            self._output_positions = {name: k for k, name in enumerate(self.graph_outputs)}
        outputs, node_ops = self._output_positions, self._node_ops
        readers = self.consumers.get(leaf_name)
        if readers is not None and leaf_name not in outputs:
            # Most weights: read by operators that forward no constant, the walk below reads
            # them as they are (one list, no stack).
            for index, _ in readers:
                if node_ops[index][0] in CHAIN_OPS:
                    break
            else:
                return list(readers)
        uses: list[tuple[int, int]] = []
        stack = [leaf_name]
        while stack:
            name = stack.pop()
            if name in outputs:
                uses.append((-1, outputs[name]))
            for index, slot in self.consumers.get(name, []):
                # (is_chain_node's first question asked first: most readers are no chain operator)
                if node_ops[index][0] in CHAIN_OPS and slot == self.chain_data_slot(index) and self.is_chain_node(index):
                    stack.append(self._node_outputs[index][0])
                else:
                    uses.append((index, slot))
        return uses

    def input_names(self, index: int) -> tuple[str, ...]:
        """A node's explicit input names, in slot order ('' for an absent optional input)."""
        return self._node_inputs[index]

    def output_names(self, index: int) -> tuple[str, ...]:
        """A node's output names, in slot order ('' for an unused optional output)."""
        return self._node_outputs[index]

    def op_of(self, index: int) -> tuple[str, str]:
        """A node's ``(op_type, domain)``."""
        return self._node_ops[index]

    def label(self, index: int) -> str:
        """:func:`node_label` of node ``index``, made once."""
        label = self._labels[index]
        if label is None:
            label = self._labels[index] = node_label(self.nodes[index], index)
        return label

    def inputs_of(self, index: int) -> Iterator[tuple[int, str]]:
        """Explicit inputs (slot, name) of a node, then subgraph outer-scope reads (slot -1)."""
        for slot, name in enumerate(self._node_inputs[index]):
            if name:
                yield slot, name
        for name in self.implicit_inputs.get(index, ()):
            yield -1, name


def _constant_attribute(node: onnx.NodeProto | None) -> onnx.TensorProto | list | float | int | None:
    if node is None:
        return None
    for attribute in node.attribute:
        if attribute.name == "value":
            return attribute.t
        if attribute.name in ("value_float", "value_int", "value_floats", "value_ints"):
            return onnx.helper.get_attribute_value(attribute)
    return None


def _outer_scope_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (implicit inputs)."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs: Iterable[onnx.GraphProto] = ()
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs = (attribute.g,)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs = attribute.graphs
        for subgraph in graphs:
            names |= _free_names(subgraph)
    return names


def _nested_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    """The value infos (inputs, outputs, value_info) of every graph nested in ``graph``'s nodes."""
    for node in graph.node:
        for attribute in node.attribute:
            nested = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for subgraph in nested:
                yield from (*subgraph.input, *subgraph.output, *subgraph.value_info)
                yield from _nested_infos(subgraph)


def _free_names(graph: onnx.GraphProto) -> set[str]:
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    free: set[str] = set()
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                free.add(name)
        free |= _outer_scope_names(node) - defined
        defined.update(node.output)
    return free


def _loop_carried_infos(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Shapes of the Loop outputs whose value the body maps to its own shape.

    ONNX shape inference drops the shape of a loop-carried value (it could change from one
    iteration to the next). When the body, inferred with the initial value's fully static shape
    (and declaring no other), returns exactly that shape, every iteration keeps it, and zero
    iterations return the initial value itself: the final value has that shape too.
    """
    types = {v.name: v.type.tensor_type for v in (*graph.input, *graph.value_info, *graph.output)}
    shapes: dict[str, tuple[int, ...]] = {t.name: tuple(int(d) for d in t.dims) for t in graph.initializer}
    for name, tensor_type in types.items():
        static = _static_dims(tensor_type)
        if static is not None:
            shapes[name] = static
    infos: list[onnx.ValueInfoProto] = []
    for node in graph.node:
        if node.op_type != "Loop" or node.domain not in ("", "ai.onnx"):
            continue
        body = node_attribute(node, "body")
        if not isinstance(body, onnx.GraphProto):
            continue
        body_types = {v.name: v.type.tensor_type for v in (*body.input, *body.value_info, *body.output)}
        for k, (initial, final) in enumerate(zip(node.input[2:], node.output)):
            start = shapes.get(initial)
            if not final or start is None or final in shapes or len(body.input) < 3 + k or len(body.output) < 2 + k:
                continue
            declared = body.input[2 + k].type.tensor_type
            if declared.HasField("shape") and _static_dims(declared) not in (None, start):
                continue  # the body was written for another shape: leave it unknown
            returned = body_types.get(body.output[1 + k].name)
            if returned is not None and _static_dims(returned) == start and initial in types:
                infos.append(onnx.helper.make_tensor_value_info(final, types[initial].elem_type, list(start)))
    return infos


def _static_dims(tensor_type: onnx.TypeProto.Tensor) -> tuple[int, ...] | None:
    """The dims of a tensor type when all are known numbers, else None."""
    if not tensor_type.HasField("shape"):
        return None
    dims = tuple(_dim(d) for d in tensor_type.shape.dim)
    return dims if all(isinstance(d, int) for d in dims) else None  # type: ignore[return-value]


def _element_count(tensor: onnx.TensorProto) -> int:
    # math.prod: np.prod costs microseconds per call, and this runs once per initializer.
    return math.prod(tensor.dims)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    # dim_value and dim_param are one oneof: one question tells which is set.
    kind = dim.WhichOneof("value")
    if kind == "dim_value":
        value = dim.dim_value
        return int(value) if value > 0 else None
    if kind == "dim_param":
        return dim.dim_param or None
    return None


def _fully_static(shape: Shape | None) -> bool:
    """``_fold.static_shape(shape) is not None``, without making the tuple: every dim a known int."""
    if shape is None:
        return False
    for d in shape:
        if type(d) is not int and (not isinstance(d, int) or isinstance(d, bool)):
            return False
        if d < 0:  # type: ignore[operator]
            return False
    return True


def _known_count(shape: Shape) -> int:
    return sum(isinstance(d, int) for d in shape)


def _sort_key(key: tuple[str, object]) -> str:
    kind, value = key
    return f"{kind}:{value:012d}" if isinstance(value, int) else f"{kind}:{value}"


def _broadcasts_into(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` broadcasts against one of ``target`` without growing it."""
    return len(shape) <= len(target) and all(size in (1, full) for size, full in zip(shape[::-1], target[::-1]))
