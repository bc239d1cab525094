"""A structural check of a model before any analysis touches it.

Protobuf parses many files that are no usable model: a name defined twice, an input nobody
defines, a tensor whose shape asks for more values than it holds (or for 2**64 of them), a
data type that does not exist, a Conv with no output channel or a bias of the wrong length.
Left unchecked they surface deep inside the analysis as an ``IndexError``, a ``MemoryError``
or, worse, a wrong result. :func:`validate_model` refuses them with one line naming the file,
the tensor or node and what is wrong. It reads shapes and counts only (never tensor bytes), so
it costs little even on large models.

:func:`external_data_target` checks where a tensor's external data lives: a relative location
inside the model's folder, with no NUL byte, naming a regular file.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._io._node_table import NodeTable

__all__ = ["external_data_target", "in_memory_capacity", "validate_model"]

_T = onnx.TensorProto
#: Every data type this onnx knows (0, UNDEFINED, is not a type).
KNOWN_DATA_TYPES = frozenset(value for value in _T.DataType.values() if value != _T.UNDEFINED)
#: The typed field holding a tensor's values when it has no ``raw_data``, and values per element.
_TYPED_FIELD: dict[int, tuple[str, int]] = {
    _T.FLOAT: ("float_data", 1),
    _T.COMPLEX64: ("float_data", 2),
    _T.DOUBLE: ("double_data", 1),
    _T.COMPLEX128: ("double_data", 2),
    _T.INT64: ("int64_data", 1),
    _T.UINT32: ("uint64_data", 1),
    _T.UINT64: ("uint64_data", 1),
    _T.STRING: ("string_data", 1),
}
#: Types packing several values per byte: their typed storage is not counted element by element.
_PACKED = frozenset(getattr(_T, name) for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(_T, name))
#: Bits per element, for the bytes a shape needs.
_BITS: dict[int, int] = {
    getattr(_T, name): bits
    for name, bits in {
        "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64,
        "BOOL": 8, "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64,
        "COMPLEX128": 128, "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8,
        "FLOAT8E5M2FNUZ": 8, "FLOAT8E8M0": 8, "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2,
    }.items()
    if hasattr(_T, name)
}  # fmt: skip
#: Operators whose constant operands must hold numbers (a string weight or bias is refused).
_NUMERIC_OPERATORS = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "BatchNormalization",
     "InstanceNormalization", "LayerNormalization", "PRelu", "Pow", "Sqrt", "Relu", "Sigmoid", "Tanh"}
)  # fmt: skip
#: The operators whose constants' ranks and lengths are checked (the others': their types only).
_GRAPH_TYPES = frozenset({onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS})
_SHAPE_CHECKED_OPERATORS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"})
_DEFAULT_DOMAINS = ("", "ai.onnx")
#: A node without attributes (most): no list made for it.
_NO_ATTRIBUTES: list[onnx.AttributeProto] = []
#: Longest name accepted for a node, tensor or graph value (a hostile file may hold megabytes).
MAX_NAME_BYTES = 1 << 16


def validate_model(
    model: onnx.ModelProto, origin: str, *, capacity: int | None = None, node_table: bool = False
) -> NodeTable | None:
    """Refuse a model that is not structurally sound, with one line saying why.

    Checked: names defined once per graph (a graph input may share its name with an
    initializer); every node input and graph output defined in its graph or an enclosing one;
    initializers not shadowing node outputs; known data types; non-negative dims whose element
    count fits in what the file can hold; typed values (``float_data``...) as many as the shape
    says; Conv/ConvTranspose/Gemm/MatMul/BatchNormalization constants of consistent ranks and
    lengths; no string constant where a number is needed; an ONNX opset this onnx knows.

    Args:
        model: the parsed model (external data may still be unloaded: their sizes are checked
            when they are read).
        origin: the file name for messages.
        capacity: bytes the model's tensors can hold at most (the file's size plus its external
            data's); ``None``: protobuf's 2 GiB limit.
        node_table: also return the main graph's nodes as read (see
            :mod:`onnxlady._io._node_table`), for the graph the caller builds next.

    Returns:
        With ``node_table``, the main graph's table, or None for a graph with a node holding a
        subgraph or with a sparse initializer (the graph reads those itself); else None.

    Raises:
        OnnxladyError: the first problem found.
    """
    limit = capacity if capacity is not None else 2**31
    for opset in model.opset_import:
        _check_text(opset.domain, "an opset domain", origin)
        if opset.domain in _DEFAULT_DOMAINS and not 1 <= opset.version <= onnx.defs.onnx_opset_version():
            # The operators' semantics are those of its opset: an unknown one leaves them a guess.
            raise OnnxladyError(
                f"{origin}: declares ONNX opset {opset.version}, which this onnx {onnx.__version__} does not know "
                f"(opsets 1 to {onnx.defs.onnx_opset_version()})"
            )
    graph = model.graph
    table = NodeTable(graph) if node_table else None
    filled = _check_graph(graph, frozenset(), origin, "the main graph", limit, table)
    return table if filled else None


def in_memory_capacity(model: onnx.ModelProto) -> int:
    """Bytes a model held in memory can hold: what its tensors carry, at least protobuf's 2 GiB.

    A model built in memory has no file size to bound its shapes by; its tensors' own bytes do
    (a tensor still pointing to external data is checked when its data is read, so any model
    holding one gets no bound here).
    """
    held = 0
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    tensors.append(attribute.t)
                tensors.extend(attribute.tensors)
                graphs.extend(_subgraphs(attribute))
        for tensor in tensors:
            if tensor.data_location == _T.EXTERNAL:
                return 2**62
            held += len(tensor.raw_data) + 8 * sum(
                len(getattr(tensor, name))
                for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
            )
            held += sum(len(text) for text in tensor.string_data)
    return max(held, 2**31)


def _check_text(value: object, what: str, origin: str) -> None:
    """A string field holding bytes that are not UTF-8 comes back from protobuf as ``bytes``."""
    if not isinstance(value, str):
        raise OnnxladyError(f"{origin}: {what} is not UTF-8 text ({bytes(value)[:40]!r}): damaged file")  # type: ignore[call-overload]


def _check_graph(
    graph: onnx.GraphProto, outer: frozenset[str], origin: str, where: str, limit: int, table: NodeTable | None = None
) -> bool:
    """Check one graph (and those nested in it); whether ``table`` was filled with its nodes."""
    # What defined each name: a phrase, or the node whose output it is (its phrase is made only
    # for a message: formatting one per node output costs more than the checks themselves).
    defined: dict[str, str | onnx.NodeProto] = {}

    def define(name: str, what: str | onnx.NodeProto) -> None:
        if type(name) is not str:
            _check_text(name, f"the name of {_definer(what)} in {where}", origin)
        if len(name) > MAX_NAME_BYTES:
            raise OnnxladyError(f"{origin}: {_definer(what)} in {where} has a name of {len(name)} characters")
        if not name:
            return
        previous = defined.get(name)
        if previous is not None and {_definer(previous), _definer(what)} != {"a graph input", "an initializer"}:
            raise OnnxladyError(
                f"{origin}: name '{name}' is defined twice in {where} ({_definer(previous)} and {_definer(what)})"
            )
        defined[name] = what

    for value in graph.input:
        if not value.name:
            raise OnnxladyError(f"{origin}: a graph input of {where} has no name")
        define(value.name, "a graph input")
    constants: dict[str, onnx.TensorProto] = {}
    for tensor in graph.initializer:
        name = tensor.name
        if not name:
            raise OnnxladyError(f"{origin}: an initializer of {where} has no name")
        if type(name) is str and len(name) <= MAX_NAME_BYTES and name not in defined:
            defined[name] = "an initializer"  # the common case of define(), without its call
        else:
            if name in defined and defined[name] == "an initializer":
                raise OnnxladyError(f"{origin}: initializer '{name}' is defined twice in {where}")
            define(name, "an initializer")
        _check_tensor(tensor, f"initializer '{name}'", origin, limit)
        constants[name] = tensor
    for sparse in graph.sparse_initializer:
        define(sparse.values.name, "an initializer")
        _check_tensor(sparse.values, f"sparse initializer '{sparse.values.name}'", origin, limit)
        _check_tensor(sparse.indices, f"indices of sparse initializer '{sparse.values.name}'", origin, limit)
    # Each node's fields are read once (every protobuf read makes new Python objects); a
    # node's label is made only for a message (formatting one per node costs more than the checks).
    nodes = []
    tensor_type, tensors_type = onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS
    # The table's lists, filled as the nodes are read (see onnxlady._io._node_table).
    table_inputs, table_outputs, table_ops, table_attributed = (
        (table.inputs, table.outputs, table.ops, table.attributed) if table is not None else ([], [], [], [])
    )
    in_order = True  # every node read only names defined before it (so far)
    for node in graph.node:
        op_type, domain, node_name = node.op_type, node.domain, node.name
        if type(op_type) is not str or type(domain) is not str or type(node_name) is not str:
            for text, what in ((op_type, "an operator type"), (domain, "an operator domain"), (node_name, "a node name")):
                _check_text(text, f"{what} in {where}", origin)
        # (A repeated field's slice is a list made in C: cheaper than reading it through its iterator.)
        inputs = node.input[:]
        # An input defined already (most) needs no second look: the others (read before their
        # producer, from an enclosing graph, from nowhere, or no text) are checked after the
        # whole graph is read. Looked up before this node's outputs are defined: a node reading
        # its own output is not listed in order.
        late = False
        for name in inputs:
            if name and name not in defined:
                late = True
                break
        outputs = node.output[:]
        for name in outputs:
            if type(name) is str and name and len(name) <= MAX_NAME_BYTES and name not in defined:
                defined[name] = node  # the common case of define(), without its call
            else:
                define(name, node)
        if late:
            in_order = False
            for name in inputs:  # (a name that is no text is never defined: only a late node can hold one)
                if type(name) is not str:
                    _check_text(name, f"an input name of node {_node_label(node)}", origin)
        attribute_count = len(node.attribute)
        if table is not None:
            table_inputs.append(tuple(inputs))
            table_outputs.append(tuple(outputs))
            table_ops.append((op_type, domain))
            table_attributed.append(attribute_count > 0)
        attributes = list(node.attribute) if attribute_count else _NO_ATTRIBUTES
        subgraph_attributes = _NO_ATTRIBUTES  # the attributes visited again: those holding subgraphs
        for attribute in attributes:
            attribute_name, attribute_type = attribute.name, attribute.type
            if type(attribute_name) is not str:
                _check_text(attribute_name, f"an attribute name of node {_node_label(node)}", origin)
            if attribute_name in _AXIS_ATTRIBUTES:
                _check_attribute(attribute, _node_label(node), origin)
            if attribute_type == tensor_type:
                _check_tensor(attribute.t, f"attribute '{attribute_name}' of node {_node_label(node)}", origin, limit)
                if op_type == "Constant" and domain in _DEFAULT_DOMAINS and node.output:
                    constants[node.output[0]] = attribute.t
            elif attribute_type == tensors_type:
                for tensor in attribute.tensors:
                    _check_tensor(tensor, f"attribute '{attribute_name}' of node {_node_label(node)}", origin, limit)
            elif attribute_type in _GRAPH_TYPES:
                if subgraph_attributes is _NO_ATTRIBUTES:
                    subgraph_attributes = []
                subgraph_attributes.append(attribute)
        numeric = domain in _DEFAULT_DOMAINS and op_type in _NUMERIC_OPERATORS
        nodes.append((node, inputs, late, subgraph_attributes, op_type if numeric else None))
    # The main graph sees only its own names: they are looked up in ``defined`` itself, and the
    # set of every visible name is made only for a subgraph (or where an enclosing scope adds some).
    visible: Mapping[str, object] | frozenset[str] = outer | frozenset(defined) if outer else defined
    nested: frozenset[str] | None = None
    # Without a string constant, an operator outside the shape-checked ones has nothing to check.
    strings = any(tensor.data_type == _T.STRING for tensor in constants.values())
    for node, inputs, late, attributes, numeric_op in nodes:
        for name in inputs if late else ():
            if name and name not in visible:
                raise OnnxladyError(
                    f"{origin}: node {_node_label(node)} in {where} reads '{name}', which nothing defines"
                )
        for attribute in attributes:
            for subgraph in _subgraphs(attribute):
                label = _node_label(node)
                if nested is None:
                    nested = visible if isinstance(visible, frozenset) else frozenset(visible)
                _check_graph(subgraph, nested, origin, f"subgraph '{attribute.name}' of node {label}", limit)
        if numeric_op is not None and (strings or numeric_op in _SHAPE_CHECKED_OPERATORS):
            _check_operator(node, numeric_op, inputs, constants, origin)
    if not in_order:
        _check_acyclic([node for node, *_ in nodes], defined, origin, where)
    for value in graph.output:
        _check_text(value.name, f"a graph output name of {where}", origin)
        if not value.name or value.name not in visible:
            raise OnnxladyError(f"{origin}: graph output '{value.name}' of {where} is not produced by anything")
    if table is None or len(graph.sparse_initializer) or any(attributes for _, _, _, attributes, _ in nodes):
        return False  # (the graph reads sparse initializers and subgraphs' outer names itself)
    table.listed_in_order = in_order
    return True


def _check_acyclic(
    nodes: list[onnx.NodeProto], defined: Mapping[str, str | onnx.NodeProto], origin: str, where: str
) -> None:
    """Refuse a graph whose nodes read, through one another, what they compute (a graph listed out of order).

    Every command reads a model in some topological order; an audit of bit-identical weights
    never builds one, and would compare a cyclic copy operator by operator (held-out round 17, F8).
    """
    position = {id(node): index for index, node in enumerate(nodes)}
    readers: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for index, node in enumerate(nodes):
        for name in set(node.input):
            producer = defined.get(name) if name else None
            if isinstance(producer, onnx.NodeProto):
                readers[position[id(producer)]].append(index)
                waiting[index] += 1
    ready = [index for index, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for reader in readers[index]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                ready.append(reader)
    if done < len(nodes):
        stuck = next(node for index, node in enumerate(nodes) if waiting[index] > 0)
        raise OnnxladyError(f"{origin}: {where} has a cycle: node {_node_label(stuck)} depends on its own output")


#: Attributes naming tensor axes: a rank is never this large, and a rule iterating up to an
#: axis of 2**63 would never end.
_AXIS_ATTRIBUTES = frozenset({"axis", "axes", "perm", "batch_axis", "time_axis"})
MAX_AXIS = 1024


def _check_attribute(attribute: onnx.AttributeProto, label: str, origin: str) -> None:
    if attribute.name not in _AXIS_ATTRIBUTES:
        return
    values = [attribute.i] if attribute.type == onnx.AttributeProto.INT else list(attribute.ints)
    for value in values:
        if not -MAX_AXIS <= value <= MAX_AXIS:
            raise OnnxladyError(f"{origin}: node {label}: attribute {attribute.name} = {value} is no tensor axis")


def _subgraphs(attribute: onnx.AttributeProto) -> Iterable[onnx.GraphProto]:
    if attribute.type == onnx.AttributeProto.GRAPH:
        return [attribute.g]
    if attribute.type == onnx.AttributeProto.GRAPHS:
        return list(attribute.graphs)
    return []


def _definer(what: str | onnx.NodeProto) -> str:
    """The phrase for what defined a name (a node: "an output of node ...")."""
    return what if isinstance(what, str) else f"an output of node {_node_label(what)}"


def _node_label(node: onnx.NodeProto) -> str:
    name = node.name if len(node.name) <= 200 else node.name[:200] + "..."
    return f"'{name}' ({node.op_type})" if name else f"{node.op_type} -> {list(node.output)[:1]}"


# -- tensors ----------------------------------------------------------------------------------
def element_count(dims: Iterable[int]) -> int:
    """Elements of a shape, in exact integer arithmetic (numpy's product wraps around)."""
    return math.prod(int(dim) for dim in dims)


def _check_tensor(tensor: onnx.TensorProto, label: str, origin: str, limit: int) -> None:
    data_type = tensor.data_type  # each protobuf read makes a new object: read once
    if data_type not in KNOWN_DATA_TYPES:
        raise OnnxladyError(f"{origin}: {label} has data type {data_type}, which ONNX does not define")
    dims = tensor.dims[:]  # (a list, made in C)
    if dims and min(dims) < 0:
        raise OnnxladyError(f"{origin}: {label} has a negative dimension {dims}")
    count = math.prod(dims)  # exact integers (numpy's product wraps around)
    bits = _BITS.get(data_type)
    if bits is not None and (count * bits + 7) // 8 > limit:
        raise OnnxladyError(f"{origin}: {label} has shape {dims} ({count} elements), more than the file can hold")
    if data_type == _T.STRING and count > limit:
        raise OnnxladyError(f"{origin}: {label} has shape {dims}, more strings than the file can hold")
    if tensor.HasField("raw_data") or tensor.data_location == _T.EXTERNAL or data_type in _PACKED:
        return  # raw bytes are counted when read (external data once loaded)
    field, per_element = _TYPED_FIELD.get(data_type, ("int32_data", 1))
    held = len(getattr(tensor, field))
    if held != count * per_element:
        others = [
            name
            for name in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
            if name != field and len(getattr(tensor, name))
        ]
        detail = f"; it stores {others[0]} instead" if others else ""
        raise OnnxladyError(
            f"{origin}: {label} holds {held} values in {field}, its shape {list(tensor.dims)} needs "
            f"{count * per_element}{detail}"
        )


# -- operators --------------------------------------------------------------------------------
def _check_operator(
    node: onnx.NodeProto, op: str, inputs: list[str], constants: Mapping[str, onnx.TensorProto], origin: str
) -> None:
    """Refuse constants of the wrong type, rank or length at a numeric operator.

    ``op`` is the node's ONNX operator (one of ``_NUMERIC_OPERATORS``), ``inputs`` its input names.
    """
    has_constant = False
    for name in inputs:
        tensor = constants.get(name) if name else None
        if tensor is not None:
            has_constant = True
            if tensor.data_type == _T.STRING:
                label = _node_label(node)
                raise OnnxladyError(f"{origin}: node {label} needs numbers, but its input '{tensor.name}' holds strings")
    if op not in _SHAPE_CHECKED_OPERATORS:
        return  # its constants' types are all there is to check
    if op not in ("Conv", "ConvTranspose") and not has_constant:
        return  # no constant operand: nothing of its shapes to check (Conv's group is checked anyway)
    _check_operator_shapes(node, op, inputs, constants, origin)


def _check_operator_shapes(
    node: onnx.NodeProto, op: str, inputs: list[str], constants: Mapping[str, onnx.TensorProto], origin: str
) -> None:
    """The rank and length checks of :func:`_check_operator`, for an operator with a constant operand."""
    if op == "MatMul":  # (most of them in a deep network: no helper made for its two operands)
        a = constants.get(inputs[0]) if len(inputs) > 0 and inputs[0] else None
        b = constants.get(inputs[1]) if len(inputs) > 1 and inputs[1] else None
        for tensor in (a, b):
            if tensor is not None and not tensor.dims:
                raise OnnxladyError(
                    f"{origin}: node {_node_label(node)}: operand '{tensor.name}' is a scalar; MatMul needs rank 1 or more"
                )
        if a is not None and b is not None and a.dims and b.dims:
            inner_b = b.dims[-2] if len(b.dims) >= 2 else b.dims[0]
            if a.dims[-1] != inner_b:
                raise OnnxladyError(
                    f"{origin}: node {_node_label(node)}: operands '{a.name}' {list(a.dims)} and '{b.name}' "
                    f"{list(b.dims)} do not multiply"
                )
        return

    def constant(slot: int) -> onnx.TensorProto | None:
        if slot >= len(inputs) or not inputs[slot]:
            return None
        return constants.get(inputs[slot])

    def fail(message: str) -> None:
        raise OnnxladyError(f"{origin}: node {_node_label(node)}: {message}")

    if op in ("Conv", "ConvTranspose"):
        weight, bias = constant(1), constant(2)
        group = _int_attribute(node, "group", 1)
        if group < 1:
            fail(f"group {group} must be at least 1")
        if weight is not None:
            dims = list(weight.dims)
            if len(dims) < 3:
                fail(f"weight '{weight.name}' has shape {dims}; a {op} kernel has rank 3 or more")
            if op == "Conv" and dims[0] == 0:
                fail(f"weight '{weight.name}' has 0 output channels")
            if op == "Conv" and dims[0] % group:
                fail(f"weight '{weight.name}' has {dims[0]} output channels, not a multiple of group {group}")
        if bias is not None:
            if len(bias.dims) != 1:
                fail(f"bias '{bias.name}' has shape {list(bias.dims)}; it must be one-dimensional")
            if weight is not None and len(weight.dims) >= 3:
                channels = weight.dims[0] if op == "Conv" else weight.dims[1] * group
                if bias.dims[0] != channels:
                    fail(f"bias '{bias.name}' has {bias.dims[0]} values for {channels} output channels")
    elif op == "Gemm":
        a, b, c = constant(0), constant(1), constant(2)
        for tensor in (a, b):
            if tensor is not None and len(tensor.dims) != 2:
                fail(f"operand '{tensor.name}' has shape {list(tensor.dims)}; Gemm multiplies matrices")
        if c is not None and b is not None and len(b.dims) == 2:
            columns = b.dims[0] if _int_attribute(node, "transB", 0) else b.dims[1]
            if len(c.dims) > 2 or (c.dims and c.dims[-1] not in (1, columns)):
                fail(f"bias '{c.name}' has shape {list(c.dims)}, which does not broadcast to {columns} columns")
    elif op == "BatchNormalization":
        vectors = [tensor for tensor in (constant(slot) for slot in range(1, 5)) if tensor is not None]
        for tensor in vectors:
            if len(tensor.dims) != 1:
                fail(f"'{tensor.name}' has shape {list(tensor.dims)}; it must be one-dimensional")
        if len({tensor.dims[0] for tensor in vectors}) > 1:
            fail(f"scale, bias, mean and variance differ in length ({[t.dims[0] for t in vectors]})")


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name and attribute.type == onnx.AttributeProto.INT:
            return int(attribute.i)
    return default


# -- external data ----------------------------------------------------------------------------
def external_data_target(tensor: onnx.TensorProto, base: Path, origin: str) -> Path:
    """The file holding ``tensor``'s external data, checked to be a regular file inside ``base``.

    Args:
        tensor: a tensor stored as external data.
        base: the model's folder, resolved.
        origin: the model file, for messages.

    Returns:
        The resolved data file.

    Raises:
        OnnxladyError: no location, a NUL byte, an absolute location or one leading outside the
            model folder, a name the file system refuses, a missing file, or not a regular file;
            a negative or non-integer offset or length.
    """
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    name = tensor.name if len(tensor.name) <= 200 else tensor.name[:200] + "..."
    shown = location if len(location) <= 200 else location[:200] + "..."
    if not location:
        raise OnnxladyError(f"{origin}: tensor '{name}' is stored as external data but names no file")
    if "\0" in location:
        raise OnnxladyError(f"{origin}: tensor '{name}' has a NUL byte in its external data location {shown!r}")
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        raise OnnxladyError(f"{origin}: tensor '{name}' points outside the model folder ({shown!r})")
    for key in ("offset", "length"):
        if key in info:
            try:
                number = int(info[key])
            except ValueError:
                raise OnnxladyError(f"{origin}: tensor '{name}' has external data {key} {info[key][:40]!r}") from None
            if number < 0:
                raise OnnxladyError(f"{origin}: tensor '{name}' has a negative external data {key}")
    try:
        target = (base / location).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise OnnxladyError(f"{origin}: tensor '{name}': unusable external data location {shown!r} ({exc})") from None
    if base not in target.parents:
        raise OnnxladyError(f"{origin}: tensor '{name}' points outside the model folder ({shown!r})")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        raise OnnxladyError(f"{origin}: external data file '{shown}' for tensor '{name}' not found in {base}") from None
    except OSError as exc:
        raise OnnxladyError(f"{origin}: external data file '{shown}' cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise OnnxladyError(f"{origin}: external data '{shown}' of tensor '{name}' is not a regular file")
    return target
