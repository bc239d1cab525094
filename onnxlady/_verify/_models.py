"""The models verify compares: loading their graphs, describing and checking their interfaces.

Only the graph structure is read here (:func:`onnxlady._io._skim.read_graph`: neither external
weights nor the large tensors stored inside the file are read): the weights stay on disk until
ONNX Runtime opens the model. The small graph index (:class:`GraphIndex`) answers the
questions the input rules and the output checks ask: who produces and who consumes a tensor,
which tensors are constants, and what a small constant holds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxlady._errors import OnnxladyError
from onnxlady._graph._attributes import node_attribute
from onnxlady._io._skim import read_graph
from onnxlady._io._tensors import is_external

ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto]

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})
INT_TYPES = frozenset({
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
})  # fmt: skip
#: Element types onnxlady can generate as inputs.
INPUT_TYPES = FLOAT_TYPES | INT_TYPES | {TensorProto.BOOL}
#: Element types ONNX Runtime's Python API can hand back as NumPy arrays (no bfloat16, no float8).
OUTPUT_TYPES = (FLOAT_TYPES - {TensorProto.BFLOAT16}) | INT_TYPES | {TensorProto.BOOL, TensorProto.STRING}
#: Constants up to this many elements are read (shape targets, clip bounds, the 1 of ``1 - mask``).
_SMALL_CONSTANT = 4096


def op_set(names: str) -> frozenset[str]:
    """A set of operator types from one space-separated string (long op lists stay readable)."""
    return frozenset(names.split())


def describe(model: ModelLike, fallback: str) -> str:
    """A short name for messages: the file path, or ``fallback`` for an in-memory model."""
    if isinstance(model, onnx.ModelProto):
        return fallback
    return str(model)


def load_graph(model: ModelLike, name: str) -> onnx.ModelProto:
    """The model's protobuf without its weights (only the graph structure and small constants are needed).

    A file's large tensors come without their data (see :func:`onnxlady._io._skim.read_graph`):
    verify reads only the values of small constants, and ONNX Runtime reads the file itself.

    Raises:
        OnnxladyError: ``model`` is neither a path to a readable ONNX file nor a ModelProto.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise OnnxladyError(f"{name}: expected a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise OnnxladyError(f"{name}: no such file")
    try:
        loaded = read_graph(path).model
    except Exception as exc:  # DecodeError, OSError, ValueError...: the file is not an ONNX model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxladyError(f"{name}: not an ONNX model (protobuf parse failed: {first})") from exc
    if not loaded.HasField("graph"):
        raise OnnxladyError(f"{name}: not an ONNX model (no graph)")
    return loaded


def fed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that must be fed: those that are not also initializers (old IR versions list both)."""
    initializers = {init.name for init in model.graph.initializer}
    initializers.update(init.values.name for init in model.graph.sparse_initializer)
    return [vi for vi in model.graph.input if vi.name not in initializers]


def elem_type(vi: onnx.ValueInfoProto) -> int | None:
    """The element type of a tensor value, or None for sequences, maps and other non-tensors."""
    if vi.type.WhichOneof("value") != "tensor_type":
        return None
    return vi.type.tensor_type.elem_type


def type_name(elem: int) -> str:
    """``float32``-style name of an ONNX element type."""
    try:
        return TensorProto.DataType.Name(elem).lower()
    except ValueError:
        return f"type {elem}"


def vi_type(vi: onnx.ValueInfoProto) -> str:
    """The element type of a value for messages, or what kind of non-tensor it is."""
    elem = elem_type(vi)
    if elem is None:
        kind = vi.type.WhichOneof("value") or "untyped"
        return f"a non-tensor ({kind.replace('_type', '')})"
    return type_name(elem)


def declared_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """Declared dimensions (None for symbolic/unknown ones), or None when the rank is unknown."""
    tensor_type = vi.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    # Some exporters write -1 (or 0) as a dim_value for a dynamic axis: treat it as unknown.
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]


def dim_symbols(vi: onnx.ValueInfoProto) -> list[str | None]:
    """The symbolic name of each dynamic dimension (``batch``, ``sequence``), None where there is none."""
    tensor_type = vi.type.tensor_type
    if not tensor_type.HasField("shape"):
        return []
    # Exporters write placeholders ("?", "-1") for "unknown": those name no shared dimension.
    return [
        d.dim_param if d.HasField("dim_param") and re.search(r"[A-Za-z]", d.dim_param) else None
        for d in tensor_type.shape.dim
    ]


def check_interfaces(ref: onnx.ModelProto, cand: onnx.ModelProto, ref_name: str, cand_name: str) -> None:
    """Raise OnnxladyError naming the first difference between the two models' inputs or outputs."""
    ref_inputs = {vi.name: vi for vi in fed_inputs(ref)}
    cand_inputs = {vi.name: vi for vi in fed_inputs(cand)}
    for input_name, vi in ref_inputs.items():
        other = cand_inputs.get(input_name)
        if other is None:
            raise OnnxladyError(f"input {input_name!r} of {ref_name} is missing from {cand_name}")
        if elem_type(vi) != elem_type(other):
            raise OnnxladyError(
                f"input {input_name!r} is {vi_type(vi)} in {ref_name} but {vi_type(other)} in {cand_name}"
            )
        ref_dims, cand_dims = declared_dims(vi), declared_dims(other)
        if ref_dims is not None and cand_dims is not None:
            if len(ref_dims) != len(cand_dims):
                raise OnnxladyError(
                    f"input {input_name!r} has rank {len(ref_dims)} in {ref_name} but {len(cand_dims)} in {cand_name}"
                )
            for axis, (a, b) in enumerate(zip(ref_dims, cand_dims)):
                if a is not None and b is not None and a != b:
                    raise OnnxladyError(
                        f"input {input_name!r} has dimension {axis} = {a} in {ref_name} but {b} in {cand_name}"
                    )
    for input_name in cand_inputs:
        if input_name not in ref_inputs:
            raise OnnxladyError(f"input {input_name!r} of {cand_name} is missing from {ref_name}")

    ref_outputs, cand_outputs = list(ref.graph.output), list(cand.graph.output)
    for index in range(max(len(ref_outputs), len(cand_outputs))):
        if index >= len(cand_outputs):
            raise OnnxladyError(
                f"{ref_name} has {len(ref_outputs)} outputs but {cand_name} has {len(cand_outputs)}: "
                f"output {ref_outputs[index].name!r} is missing"
            )
        if index >= len(ref_outputs):
            raise OnnxladyError(
                f"{ref_name} has {len(ref_outputs)} outputs but {cand_name} has {len(cand_outputs)}: "
                f"extra output {cand_outputs[index].name!r}"
            )
        a, b = ref_outputs[index], cand_outputs[index]
        if a.name != b.name:
            raise OnnxladyError(f"output #{index} is {a.name!r} in {ref_name} but {b.name!r} in {cand_name}")
        if elem_type(a) != elem_type(b):
            raise OnnxladyError(f"output {a.name!r} is {vi_type(a)} in {ref_name} but {vi_type(b)} in {cand_name}")
        elem = elem_type(a)
        if elem is None or elem not in OUTPUT_TYPES:
            raise OnnxladyError(
                f"output {a.name!r} is {vi_type(a)}: verify can compare only tensors of numeric, "
                "boolean or string elements (ONNX Runtime's Python API cannot return this type)"
            )


class GraphIndex:
    """Producers, consumers and constants of a graph's top level, built once per model.

    Args:
        model: The model; only its graph structure and small constants are read.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = [n for n in graph.node if n.domain in ("", "ai.onnx")]
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for position, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, position))
        # Nodes of other domains still consume tensors: a custom op reading a mask is a use.
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                for position, name in enumerate(node.input):
                    if name:
                        self.consumers.setdefault(name, []).append((node, position))
        self._tensors: dict[str, onnx.TensorProto] = {init.name: init for init in graph.initializer}
        self.shapes: dict[str, tuple[int, ...]] = {name: tuple(t.dims) for name, t in self._tensors.items()}
        for sparse in graph.sparse_initializer:
            self.shapes[sparse.values.name] = tuple(sparse.dims)
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                value = node_attribute(node, "value")
                if isinstance(value, onnx.TensorProto):
                    self._tensors[node.output[0]] = value
                    self.shapes[node.output[0]] = tuple(value.dims)
        self.graph_inputs = {vi.name for vi in graph.input}
        self.graph_outputs = [vi.name for vi in graph.output]
        # Producers of every domain, for reading widths through contrib ops (MatMulNBits...);
        # ``producer`` keeps to the default domain, whose semantics the value reads rely on.
        self.any_producer: dict[str, onnx.NodeProto] = {
            name: node for node in graph.node for name in node.output if name
        }

    def is_constant(self, name: str) -> bool:
        """Whether ``name`` is an initializer or a Constant node's value."""
        return name in self.shapes

    def value(self, name: str) -> np.ndarray | None:
        """The value of a small constant (through Identity/Cast), or None when unknown or too large."""
        node = self.producer.get(name)
        if name not in self._tensors and node is not None and node.op_type in ("Identity", "Cast") and node.input:
            inner = self.value(node.input[0])
            if inner is None or node.op_type == "Identity":
                return inner
            to = int(node_attribute(node, "to", TensorProto.FLOAT))
            try:
                return inner.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
            except (TypeError, ValueError, KeyError):
                return None
        tensor = self._tensors.get(name)
        if tensor is None or is_external(tensor):  # unknown here, not an error: verify runs the model
            return None
        if int(np.prod(tensor.dims, dtype=np.int64)) > _SMALL_CONSTANT:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except Exception:
            return None

    def attribute(self, node: onnx.NodeProto, name: str, default: float | None = None) -> float | None:
        """An int or float attribute of ``node``, or ``default``."""
        value = node_attribute(node, name)
        return value if isinstance(value, (int, float)) else default
