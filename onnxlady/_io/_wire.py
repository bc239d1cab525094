"""The one reader of ONNX's protobuf wire format: fields, the tensors of a model, and skeletons.

Three readers want a model's bytes without its weights, walking the serialized message instead of
parsing it (protobuf copies every ``raw_data`` it parses): loading with the large payloads left in
the file as views (:mod:`onnxlady._io._skim`), handing ONNX Runtime the model with its weights
pointing back into the file (:mod:`onnxlady._verify._weightless`), and fingerprinting from views of
the file's bytes (:mod:`onnxlady._provenance._wire`). They share this module:

- :func:`read_varint`, :func:`encode_varint` and :func:`message_fields`: the wire format itself;
- :func:`tensor_spans`: in one pass over a model's bytes, where each tensor is (a main-graph
  initializer, the value of a ``Constant`` node, or, with ``everywhere``, any tensor of any
  graph), as the path of fields that lead to it;
- :func:`describe_tensor`: a tensor's layout (its single ``raw_data`` field, name, type and
  dimensions) when its values are exactly one ``raw_data`` payload;
- :func:`splice`: the bytes of a message with chosen fields dropped or given a new payload, every
  field that holds them re-encoded with its new length (a *skeleton* when ``raw_data`` fields are
  dropped).

Each reader keeps only its own policy: which tensors it leaves out and what it does with their
bytes. Field numbers come from the message descriptors, never from literals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import onnx

__all__ = [
    "Field",
    "TensorLayout",
    "TensorSpan",
    "describe_tensor",
    "encode_varint",
    "field_key",
    "length_field",
    "message_fields",
    "read_varint",
    "splice",
    "tensor_spans",
]

#: The wire types ONNX uses (groups, 3 and 4, are deprecated and never used).
VARINT, I64, LEN, I32 = 0, 1, 2, 5

_MODEL = onnx.ModelProto.DESCRIPTOR.fields_by_name
_GRAPH = onnx.GraphProto.DESCRIPTOR.fields_by_name
_NODE = onnx.NodeProto.DESCRIPTOR.fields_by_name
_ATTR = onnx.AttributeProto.DESCRIPTOR.fields_by_name
_TENSOR = onnx.TensorProto.DESCRIPTOR.fields_by_name
_SPARSE = onnx.SparseTensorProto.DESCRIPTOR.fields_by_name
_ENTRY = onnx.StringStringEntryProto.DESCRIPTOR.fields_by_name
MODEL_GRAPH = _MODEL["graph"].number
GRAPH_NODE = _GRAPH["node"].number
GRAPH_INITIALIZER = _GRAPH["initializer"].number
GRAPH_SPARSE_INITIALIZER = _GRAPH["sparse_initializer"].number
NODE_OUTPUT = _NODE["output"].number
NODE_OP_TYPE = _NODE["op_type"].number
NODE_DOMAIN = _NODE["domain"].number
NODE_ATTRIBUTE = _NODE["attribute"].number
ATTR_NAME = _ATTR["name"].number
ATTR_T = _ATTR["t"].number
ATTR_TENSORS = _ATTR["tensors"].number
ATTR_G = _ATTR["g"].number
ATTR_GRAPHS = _ATTR["graphs"].number
SPARSE_VALUES = _SPARSE["values"].number
SPARSE_INDICES = _SPARSE["indices"].number
TENSOR_DIMS = _TENSOR["dims"].number
TENSOR_DATA_TYPE = _TENSOR["data_type"].number
TENSOR_NAME = _TENSOR["name"].number
TENSOR_RAW_DATA = _TENSOR["raw_data"].number
TENSOR_SEGMENT = _TENSOR["segment"].number
TENSOR_EXTERNAL_DATA = _TENSOR["external_data"].number
TENSOR_DATA_LOCATION = _TENSOR["data_location"].number
ENTRY_KEY = _ENTRY["key"].number
ENTRY_VALUE = _ENTRY["value"].number
#: The fields of a TensorProto that hold its values.
TENSOR_DATA = frozenset(
    _TENSOR[name].number
    for name in ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
)
#: Fields that make a tensor's values something other than one ``raw_data`` payload.
_NOT_PLAIN = (TENSOR_DATA - {TENSOR_RAW_DATA}) | {TENSOR_SEGMENT, TENSOR_EXTERNAL_DATA}


def read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    """The protobuf varint at ``position`` and the position after it.

    Raises:
        ValueError: the varint runs over 64 bits.
        IndexError: it runs past the end of ``buffer``.
    """
    byte = buffer[position]
    if byte < 0x80:  # the common case: one byte
        return byte, position + 1
    result, shift = byte & 0x7F, 7
    position += 1
    while True:
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def encode_varint(value: int) -> bytes:
    """``value`` as a protobuf varint."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def field_key(number: int, length: int) -> bytes:
    """The key and length that start a length-delimited field ``number`` of ``length`` bytes."""
    return encode_varint((number << 3) | LEN) + encode_varint(length)


def length_field(number: int, payload: bytes) -> bytes:
    """A whole length-delimited field ``number`` holding ``payload``."""
    return field_key(number, len(payload)) + payload


def message_fields(buffer: memoryview, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """Every field of the protobuf message in ``buffer[start:end]`` (the wire readers' one walker).

    Each as (number, wire type, field start, payload start, field end); a varint's payload is
    the varint itself. One-byte keys and lengths (most of a graph's) are read inline: a graph
    holds a field per node, and this loop runs once per field.

    Raises:
        ValueError: a field runs past ``end`` or the buffer ("truncated message"), a varint
            over 64 bits, or a wire type ONNX never uses.
    """
    found: list[tuple[int, int, int, int, int]] = []
    append = found.append
    position = start
    try:
        while position < end:
            field_start = position
            key = buffer[position]
            position += 1
            if key >= 0x80:
                key, position = read_varint(buffer, field_start)
            wire = key & 7
            if wire == LEN:
                length = buffer[position]
                if length < 0x80:
                    position += 1
                else:
                    length, position = read_varint(buffer, position)
                payload = position
                position += length
            elif wire == VARINT:
                payload = position
                position = read_varint(buffer, position)[1]
            elif wire == I64:
                payload, position = position, position + 8
            elif wire == I32:
                payload, position = position, position + 4
            else:  # groups are deprecated and no ONNX message uses them
                raise ValueError(f"unsupported wire type {wire}")
            if position > end:
                raise ValueError("truncated message")
            append((key >> 3, wire, field_start, payload, position))
    except IndexError:  # a varint runs past the buffer's end
        raise ValueError("truncated message") from None
    return found


class Field(NamedTuple):
    """One field of a message: its number, wire type, and where its key, payload and end are."""

    number: int
    wire: int
    start: int
    payload: int
    end: int


#: ``Field(*fields)`` without the Python-level ``__new__`` (a walk makes one per tensor).
_field: Callable[[tuple[int, int, int, int, int]], Field] = functools.partial(tuple.__new__, Field)

#: Where a tensor of :func:`tensor_spans` lives.
INITIALIZER, CONSTANT, ATTRIBUTE, SPARSE = "initializer", "constant", "attribute", "sparse"


class TensorSpan(NamedTuple):
    """A TensorProto in a model's bytes, found by :func:`tensor_spans`."""

    #: :data:`INITIALIZER`, :data:`CONSTANT` (a main-graph Constant node's value), :data:`ATTRIBUTE`
    #: (any other node's tensor attribute) or :data:`SPARSE` (the values or indices of a sparse
    #: initializer).
    where: str
    #: 0 in the main graph; 1 in a subgraph of a main-graph node, and so on.
    depth: int
    #: Its position among its graph's initializers (else -1).
    initializer: int
    #: For a node's tensor: the node's position in its graph (else -1).
    node: int
    #: For a node's tensor: the attribute's position in the node (else -1).
    attribute: int
    #: The fields that lead to it, outermost first (the message :func:`tensor_spans` walked holds
    #: the first), the tensor's own field last.
    path: tuple[Field, ...]

    @property
    def tensor(self) -> Field:
        """The tensor's own field."""
        return self.path[-1]


#: ``TensorSpan(*values)``, made as :data:`_field` is.
_span: Callable[[tuple[str, int, int, int, int, tuple[Field, ...]]], TensorSpan] = functools.partial(
    tuple.__new__, TensorSpan
)


def tensor_spans(
    buffer: memoryview, start: int, end: int, *, min_bytes: int = 0, constants: bool = True, everywhere: bool = False
) -> list[TensorSpan]:
    """The tensors of the ModelProto in ``buffer[start:end]``, in file order, in one pass.

    By default, the main graph's: every initializer (whatever its size), and the ``value`` of each
    ONNX-domain ``Constant`` node whose field holds at least ``min_bytes`` (a Constant with one
    output and one ``value`` attribute holding one tensor); without ``constants``, no node is
    looked into. With ``everywhere``, every tensor holding at least ``min_bytes`` in every graph
    (initializers, sparse initializers, tensor attributes of any node, subgraphs): only fields of
    that size are looked into.

    Args:
        buffer: the serialized model (a memory map's view, or bytes).
        start: where the ModelProto starts in ``buffer``.
        end: where it ends.
        min_bytes: the smallest field looked into (see above).
        constants: also find main-graph Constant values.
        everywhere: find every tensor of the model, subgraphs included.

    Returns:
        Each tensor's span, in the order its bytes come in the file.

    Raises:
        ValueError: the bytes are not a well-formed protobuf message.
    """
    spans: list[TensorSpan] = []
    if everywhere and end - start < min_bytes:
        return spans  # nothing inside can be that large: not even walked
    for field in message_fields(buffer, start, end):
        if field[0] == MODEL_GRAPH and field[1] == LEN and (not everywhere or field[4] - field[3] >= min_bytes):
            _graph_spans(buffer, (_field(field),), 0, min_bytes, constants, everywhere, spans)
    return spans


def _graph_spans(
    buffer: memoryview,
    path: tuple[Field, ...],
    depth: int,
    min_bytes: int,
    constants: bool,
    everywhere: bool,
    spans: list[TensorSpan],
) -> None:
    """Add the tensors of the GraphProto held by ``path[-1]`` to ``spans``."""
    initializer = node = 0
    graph = path[-1]
    for field in message_fields(buffer, graph.payload, graph.end):
        number, wire, _, payload, field_end = field
        if wire != LEN:
            continue
        large = field_end - payload >= min_bytes
        if number == GRAPH_INITIALIZER:
            if large or not everywhere:
                spans.append(_span((INITIALIZER, depth, initializer, -1, -1, (*path, _field(field)))))
            initializer += 1
        elif number == GRAPH_NODE:
            if large and (constants or everywhere):
                if everywhere:
                    _node_spans(buffer, (*path, _field(field)), depth, node, min_bytes, spans)
                else:
                    constant = _constant_value(buffer, _field(field))
                    if constant is not None:
                        attribute, fields = constant
                        spans.append(_span((CONSTANT, depth, -1, node, attribute, (*path, *fields))))
            node += 1
        elif number == GRAPH_SPARSE_INITIALIZER and everywhere and large:
            sparse = (*path, _field(field))
            for inner in message_fields(buffer, payload, field_end):
                if inner[0] in (SPARSE_VALUES, SPARSE_INDICES) and inner[1] == LEN and inner[4] - inner[3] >= min_bytes:
                    spans.append(_span((SPARSE, depth, -1, -1, -1, (*sparse, _field(inner)))))


def _node_spans(
    buffer: memoryview, path: tuple[Field, ...], depth: int, node: int, min_bytes: int, spans: list[TensorSpan]
) -> None:
    """Add the tensors of the NodeProto held by ``path[-1]`` (its attributes', its subgraphs') to ``spans``."""
    attribute = 0
    for field in message_fields(buffer, path[-1].payload, path[-1].end):
        if field[0] != NODE_ATTRIBUTE or field[1] != LEN:
            continue
        if field[4] - field[3] >= min_bytes:
            holder = (*path, _field(field))
            for inner in message_fields(buffer, field[3], field[4]):
                number, wire, _, payload, inner_end = inner
                if wire != LEN or inner_end - payload < min_bytes:
                    continue
                if number in (ATTR_T, ATTR_TENSORS):
                    spans.append(_span((ATTRIBUTE, depth, -1, node, attribute, (*holder, _field(inner)))))
                elif number in (ATTR_G, ATTR_GRAPHS):
                    _graph_spans(buffer, (*holder, _field(inner)), depth + 1, min_bytes, True, True, spans)
        attribute += 1


def _constant_value(buffer: memoryview, node: Field) -> tuple[int, tuple[Field, Field, Field]] | None:
    """The ``value`` tensor of the Constant node ``node``: the attribute's position, and (node, attribute, tensor).

    None unless the node is an ONNX-domain Constant with one output and one ``value`` attribute
    holding one tensor (protobuf keeps the last of a repeated op_type or domain: so does this).
    """
    op_type = domain = b""
    outputs = 0
    found = None
    attribute = 0
    for field in message_fields(buffer, node.payload, node.end):
        number, wire, _, payload, field_end = field
        if wire != LEN:
            continue
        if number == NODE_OP_TYPE:
            op_type = bytes(buffer[payload:field_end])
        elif number == NODE_DOMAIN:
            domain = bytes(buffer[payload:field_end])
        elif number == NODE_OUTPUT:
            outputs += 1
        elif number == NODE_ATTRIBUTE:
            tensor = _value_tensor(buffer, payload, field_end)
            if tensor is not None:
                if found is not None:
                    return None  # two values: left to protobuf
                found = (attribute, (node, _field(field), tensor))
            attribute += 1
    if op_type != b"Constant" or domain not in (b"", b"ai.onnx") or outputs != 1:
        return None
    return found


def _value_tensor(buffer: memoryview, start: int, end: int) -> Field | None:
    """The one tensor field of the AttributeProto in ``[start, end)`` when the attribute is named ``value``."""
    name = None
    tensor = None
    for field in message_fields(buffer, start, end):
        number, wire, _, payload, field_end = field
        if wire != LEN:
            continue
        if number == ATTR_NAME:
            name = bytes(buffer[payload:field_end])
        elif number == ATTR_T:
            if tensor is not None:
                return None  # two tensors
            tensor = _field(field)
    return tensor if name == b"value" else None


class TensorLayout(NamedTuple):
    """What :func:`describe_tensor` read of a TensorProto."""

    #: Whether its values are exactly its one ``raw_data`` field: no typed values, no segment,
    #: no external data, no second name or type, ``data_location`` DEFAULT if stated.
    plain: bool
    #: Whether it names external data (an ``external_data`` field).
    external: bool
    #: Its ``raw_data`` field (the first), or None.
    raw: Field | None
    #: Where its name's bytes are (payload start, end), or None.
    name: tuple[int, int] | None
    #: Its element type, or None.
    data_type: int | None
    #: Its dimensions.
    dims: list[int]


#: ``TensorLayout(*values)``, made as :data:`_field` is.
_layout: Callable[[tuple[bool, bool, Field | None, tuple[int, int] | None, int | None, list[int]]], TensorLayout] = (
    functools.partial(tuple.__new__, TensorLayout)
)


def describe_tensor(buffer: memoryview, start: int, end: int) -> TensorLayout:
    """The layout of the TensorProto in ``buffer[start:end]``: what a reader needs to take its values as they lie.

    Args:
        buffer: the bytes holding the tensor.
        start: where its fields start (its field's payload).
        end: where they end.

    Returns:
        Its layout (see :class:`TensorLayout`).

    Raises:
        ValueError: the bytes are not a well-formed protobuf message.
    """
    plain = True
    external = False
    raw = name = data_type = None
    dims: list[int] = []
    for field in message_fields(buffer, start, end):
        number, wire, _, payload, field_end = field
        if number == TENSOR_DIMS and wire == VARINT:  # the most frequent field first
            dim = buffer[payload]
            dims.append(dim if dim < 0x80 else read_varint(buffer, payload)[0])
        elif number == TENSOR_RAW_DATA and wire == LEN and raw is None:
            raw = _field(field)
        elif number == TENSOR_DIMS and wire == LEN:
            dims += _packed_varints(buffer, payload, field_end)
        elif number == TENSOR_DATA_TYPE and wire == VARINT and data_type is None:
            data_type = read_varint(buffer, payload)[0]
        elif number == TENSOR_NAME and wire == LEN and name is None:
            name = (payload, field_end)
        elif number == TENSOR_DATA_LOCATION:
            if wire != VARINT or read_varint(buffer, payload)[0] != onnx.TensorProto.DEFAULT:
                plain = False
        elif number in _NOT_PLAIN or number in (TENSOR_RAW_DATA, TENSOR_DATA_TYPE, TENSOR_NAME):
            plain = False  # another storage, or a field given twice: protobuf's reading, not ours
            external = external or number == TENSOR_EXTERNAL_DATA
    return _layout((plain and raw is not None, external, raw, name, data_type, dims))


def _packed_varints(buffer: memoryview, start: int, end: int) -> list[int]:
    """The varints packed in ``buffer[start:end]``.

    Raises:
        ValueError: the last one runs past ``end``.
    """
    values = []
    try:
        while start < end:
            value, start = read_varint(buffer, start)
            values.append(value)
    except IndexError:
        raise ValueError("truncated message") from None
    if start != end:
        raise ValueError("truncated message")
    return values


def splice(
    buffer: memoryview, start: int, end: int, edits: Sequence[tuple[tuple[Field, ...], bytes | None]]
) -> list[bytes | memoryview]:
    """The message in ``buffer[start:end]`` with ``edits`` made, as pieces to join.

    Each edit is (path, payload): the last field of ``path`` is dropped (payload None) or given
    ``payload``; every field of ``path`` before it (the first lies in ``[start, end)``, each next
    one inside the one before) is re-encoded with its new length, and every other byte is copied
    (as views of ``buffer``). Edits come in file order (as :func:`tensor_spans` gives paths).

    Args:
        buffer: the serialized message's bytes.
        start: where the message starts in ``buffer``.
        end: where it ends.
        edits: (path, payload) pairs, in file order.

    Returns:
        Pieces that each hold whole fields of the message: views of ``buffer`` and new bytes
        (a memory map cannot close while a view of it lives: join them, then let them go).

    Raises:
        ValueError: two edits of one field, or edits out of order.
    """
    return _splice(buffer, start, end, edits)[0]


def _splice(
    buffer: memoryview, start: int, end: int, edits: Sequence[tuple[tuple[Field, ...], bytes | None]]
) -> tuple[list[bytes | memoryview], int]:
    """:func:`splice`'s pieces, and how many bytes they hold."""
    pieces: list[bytes | memoryview] = []
    length = 0
    copied = start
    count = len(edits)
    index = 0
    while index < count:
        path, payload = edits[index]
        outer = path[0]
        if outer.start < copied:
            raise ValueError("edits out of order")
        after = index + 1
        while after < count and edits[after][0][0].start == outer.start:
            after += 1
        pieces.append(buffer[copied : outer.start])
        length += outer.start - copied
        if len(path) == 1:
            if after != index + 1:
                raise ValueError("two edits of one field")
            new = b"" if payload is None else field_key(outer.number, len(payload)) + payload
        elif len(path) == 2 and payload is None and after == index + 1:  # the common case: one field dropped
            inner = path[1]
            body = (outer.end - outer.payload) - (inner.end - inner.start)
            new = b"".join(
                (field_key(outer.number, body), buffer[outer.payload : inner.start], buffer[inner.end : outer.end])
            )
        else:
            nested, body = _splice(
                buffer, outer.payload, outer.end, [(edit[1:], data) for edit, data in edits[index:after]]
            )
            new = b"".join([field_key(outer.number, body), *nested])
        if new:
            pieces.append(new)
            length += len(new)
        copied = outer.end
        index = after
    pieces.append(buffer[copied:end])
    return pieces, length + end - copied
