"""Read a model's graph without its weights, and extend a model file without parsing it.

``onnx.load(path, load_external_data=False)`` still parses and copies every weight stored inside
the file (``raw_data``): for a command that needs only the graph (``verify`` reading the inputs,
outputs and small constants before ONNX Runtime opens the file itself) that is a full copy of
the model for nothing. :func:`read_graph` walks the protobuf wire format over a memory map of
the file and hands protobuf only the bytes around the weights: every tensor whose encoding is
larger than ``keep_bytes`` loses its data fields (``raw_data``, ``float_data``...), keeping its
name, type, dimensions and external-data location. The pages holding the weights are never
touched, so reading the graph costs time and memory in proportion to the graph, not the model.

:func:`with_graph_outputs` adds graph outputs to a model file's bytes by appending one small
``graph`` field: protobuf merges a message field that appears twice (repeated fields
concatenate), so the result parses as the model with the extra outputs, with no parse and no
re-serialization of the weights.

Field numbers come from the message descriptors, never from literals.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import onnx

__all__ = [
    "GraphOnly",
    "Payload",
    "encode_varint",
    "message_fields",
    "read_graph",
    "read_varint",
    "read_without_payloads",
    "with_graph_outputs",
]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

_MODEL = onnx.ModelProto.DESCRIPTOR
_GRAPH = onnx.GraphProto.DESCRIPTOR
_NODE = onnx.NodeProto.DESCRIPTOR
_ATTR = onnx.AttributeProto.DESCRIPTOR
_TENSOR = onnx.TensorProto.DESCRIPTOR
_MODEL_GRAPH = _MODEL.fields_by_name["graph"].number
_GRAPH_NODE = _GRAPH.fields_by_name["node"].number
_GRAPH_INITIALIZER = _GRAPH.fields_by_name["initializer"].number
_GRAPH_SPARSE = _GRAPH.fields_by_name["sparse_initializer"].number
_NODE_ATTRIBUTE = _NODE.fields_by_name["attribute"].number
_ATTR_T = _ATTR.fields_by_name["t"].number
_ATTR_G = _ATTR.fields_by_name["g"].number
_ATTR_TENSORS = _ATTR.fields_by_name["tensors"].number
_ATTR_GRAPHS = _ATTR.fields_by_name["graphs"].number
_SPARSE = onnx.SparseTensorProto.DESCRIPTOR
_SPARSE_VALUES = _SPARSE.fields_by_name["values"].number
_SPARSE_INDICES = _SPARSE.fields_by_name["indices"].number
_TENSOR_NAME = _TENSOR.fields_by_name["name"].number
_TENSOR_RAW_DATA = _TENSOR.fields_by_name["raw_data"].number
_NODE_OUTPUT = _NODE.fields_by_name["output"].number
_NODE_OP_TYPE = _NODE.fields_by_name["op_type"].number
_NODE_DOMAIN = _NODE.fields_by_name["domain"].number
_ATTR_NAME = _ATTR.fields_by_name["name"].number
#: The fields from a graph down to a Constant's raw_data: node, attribute, tensor.
_TO_CONSTANT_DATA = (_GRAPH_NODE, _NODE_ATTRIBUTE, _ATTR_T)
_TENSOR_SEGMENT = _TENSOR.fields_by_name["segment"].number
_TENSOR_EXTERNAL_DATA = _TENSOR.fields_by_name["external_data"].number
_TENSOR_DATA_LOCATION = _TENSOR.fields_by_name["data_location"].number
#: The payload fields of a TensorProto: what a skimmed tensor loses.
_TENSOR_DATA = frozenset(
    _TENSOR.fields_by_name[name].number
    for name in ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
)
#: Tensors up to this many encoded bytes keep their data: every small constant a graph reader
#: needs (shape targets, clip bounds: verify reads up to 4096 elements) stays readable.
KEEP_BYTES = 64 << 10


class GraphOnly:
    """A model read by :func:`read_graph`: the proto and the names of the tensors left without data."""

    def __init__(self, model: onnx.ModelProto, skimmed: set[str]) -> None:
        self.model = model
        #: Tensors (initializers, Constant values) whose data was not read.
        self.skimmed = skimmed


def read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    """The protobuf varint at ``position`` and the position after it (the wire readers' one decoder)."""
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
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def message_fields(buffer: memoryview, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """Every field of the protobuf message in ``buffer[start:end]`` (the wire readers' one walker).

    Each as (number, wire type, field start, payload start, field end); a varint's payload is
    the varint itself.

    Raises:
        ValueError: a field runs past ``end``, or a wire type ONNX never uses.
    """
    found = []
    position = start
    while position < end:
        field_start = position
        key, position = read_varint(buffer, position)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            payload = position
            _, position = read_varint(buffer, position)
        elif wire == _I64:
            payload, position = position, position + 8
        elif wire == _I32:
            payload, position = position, position + 4
        elif wire == _LEN:
            length, payload = read_varint(buffer, position)
            position = payload + length
        else:  # groups are deprecated and no ONNX message uses them
            raise ValueError(f"unsupported wire type {wire}")
        if position > end:
            raise ValueError("truncated message")
        found.append((number, wire, field_start, payload, position))
    return found


class _Skimmer:
    """Copies a message's bytes, dropping the data of large tensors (recursively)."""

    def __init__(self, buffer: memoryview, keep_bytes: int) -> None:
        self.buffer = buffer
        self.keep_bytes = keep_bytes
        self.skimmed: set[str] = set()

    def message(self, rules: dict[int, Callable[[int, int], bytes]], start: int, end: int) -> bytes:
        """The message in ``[start, end)`` with the fields ``rules`` names rewritten by their rule."""
        if end - start <= self.keep_bytes:  # small: nothing inside can be worth skimming
            return bytes(self.buffer[start:end])
        out = bytearray()
        for number, wire, field_start, payload, field_end in message_fields(self.buffer, start, end):
            rule = rules.get(number) if wire == _LEN else None
            if rule is None or field_end - payload <= self.keep_bytes:
                out += self.buffer[field_start:field_end]
                continue
            inner = rule(payload, field_end)
            out += encode_varint((number << 3) | _LEN) + encode_varint(len(inner)) + inner
        return bytes(out)

    def model(self, start: int, end: int) -> bytes:
        return self.message({_MODEL_GRAPH: self.graph}, start, end)

    def graph(self, start: int, end: int) -> bytes:
        return self.message(
            {_GRAPH_NODE: self.node, _GRAPH_INITIALIZER: self.tensor, _GRAPH_SPARSE: self.sparse}, start, end
        )

    def node(self, start: int, end: int) -> bytes:
        return self.message({_NODE_ATTRIBUTE: self.attribute}, start, end)

    def attribute(self, start: int, end: int) -> bytes:
        rules: dict[int, Callable[[int, int], bytes]] = {
            _ATTR_T: self.tensor, _ATTR_TENSORS: self.tensor, _ATTR_G: self.graph, _ATTR_GRAPHS: self.graph,
        }  # fmt: skip
        return self.message(rules, start, end)

    def sparse(self, start: int, end: int) -> bytes:
        return self.message({_SPARSE_VALUES: self.tensor, _SPARSE_INDICES: self.tensor}, start, end)

    def tensor(self, start: int, end: int) -> bytes:
        """A large tensor without its data fields (its name recorded in :attr:`skimmed`)."""
        out = bytearray()
        for number, wire, field_start, payload, field_end in message_fields(self.buffer, start, end):
            if number in _TENSOR_DATA:
                continue
            if number == _TENSOR_NAME and wire == _LEN:
                self.skimmed.add(bytes(self.buffer[payload:field_end]).decode("utf-8", "replace"))
            out += self.buffer[field_start:field_end]
        return bytes(out)


def read_graph(path: str | os.PathLike[str], *, keep_bytes: int = KEEP_BYTES) -> GraphOnly:
    """The model in ``path`` with the data of its large tensors left unread.

    Args:
        path: an ONNX file (its external data, if any, is not read either).
        keep_bytes: tensors whose encoding is at most this many bytes keep their data.

    Returns:
        The model (every node, input, output, value info, attribute and small constant as
        :func:`onnx.load` gives them) and the names of the tensors left without data.

    Raises:
        ValueError: the file is not a well-formed protobuf message.
        google.protobuf.message.DecodeError: protobuf rejects the skimmed bytes.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        model = onnx.ModelProto()
        if size == 0:
            return GraphOnly(model, set())
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                skimmer = _Skimmer(view, keep_bytes)
                model.ParseFromString(skimmer.model(0, size))
            finally:
                view.release()
    return GraphOnly(model, skimmer.skimmed)


def with_graph_outputs(model_bytes: bytes, names: Sequence[str]) -> bytes:
    """``model_bytes`` (a serialized ModelProto) with graph outputs ``names`` added (types left to the reader).

    The outputs are appended as a second ``graph`` field, which protobuf merges into the first:
    the weights are neither parsed nor copied, only the new tail is encoded.
    """
    if not names:
        return model_bytes
    extra = onnx.GraphProto()
    for name in names:
        extra.output.add().name = name
    payload = extra.SerializeToString()
    return model_bytes + encode_varint((_MODEL_GRAPH << 3) | _LEN) + encode_varint(len(payload)) + payload


# -- payloads left in the file ------------------------------------------------------------------
#: Graph fields are handed to protobuf in runs of about this many bytes (memory stays bounded).
_MERGE_CHUNK = 4 << 20


class Payload(NamedTuple):
    """The ``raw_data`` of a main-graph tensor that :func:`read_without_payloads` left in the file."""

    #: Its position in ``model.graph.initializer``, or -1 for a Constant node's value.
    initializer: int
    #: For a Constant's value: the node's position in ``model.graph.node`` (else -1).
    node: int
    #: For a Constant's value: the attribute's position in the node (else -1).
    attribute: int
    #: Where its bytes start in the file.
    offset: int
    #: How many bytes it holds.
    length: int


def _plain_raw_data(buffer: memoryview, start: int, end: int, min_bytes: int) -> tuple[int, int, int, int] | None:
    """The one ``raw_data`` field of the tensor in ``[start, end)``, when it may be left in the file.

    Only a tensor whose data is a single ``raw_data`` of at least ``min_bytes`` qualifies: no
    typed values, no segment, no external-data fields (an unusual tensor is read as it always was).

    Returns:
        (field start, payload start, field end, tensor end), or None.
    """
    found = None
    for number, wire, field_start, payload, field_end in message_fields(buffer, start, end):
        if number == _TENSOR_RAW_DATA and wire == _LEN and found is None:
            found = (field_start, payload, field_end, end)
        elif number in _TENSOR_DATA or number in (_TENSOR_SEGMENT, _TENSOR_EXTERNAL_DATA):
            return None  # a second raw_data, typed values, a segment, external data
        elif number == _TENSOR_DATA_LOCATION and (wire != _VARINT or read_varint(buffer, payload)[0] != 0):
            return None
    if found is None or found[2] - found[1] < min_bytes:
        return None
    return found


def _without(buffer: memoryview, number: int, start: int, cut_start: int, cut_end: int, end: int) -> bytearray:
    """Field ``number`` holding the message ``[start, end)`` less its bytes ``[cut_start, cut_end)``."""
    length = (cut_start - start) + (end - cut_end)
    out = bytearray(encode_varint((number << 3) | _LEN) + encode_varint(length))
    out += buffer[start:cut_start]
    out += buffer[cut_end:end]
    return out


class _Nested(NamedTuple):
    """A field (its start, payload start and end) holding the field ``inner``."""

    start: int
    payload: int
    end: int


def _constant_value(buffer: memoryview, start: int, end: int, min_bytes: int) -> tuple[int, list[_Nested]] | None:
    """The large plain ``value`` tensor of the main-graph Constant node in ``[start, end)``, if any.

    Only an ONNX-domain Constant with one output whose ``value`` attribute holds a tensor with
    a single large ``raw_data`` (see :func:`_plain_raw_data`) qualifies.

    Returns:
        The attribute's position in the node, and the fields from the attribute down to the
        ``raw_data`` (attribute, tensor, raw_data); or None.
    """
    op_type = domain = b""
    outputs = 0
    found = None
    attribute = 0
    for number, wire, field_start, payload, field_end in message_fields(buffer, start, end):
        if wire != _LEN:
            continue
        if number == _NODE_OP_TYPE:
            op_type = bytes(buffer[payload:field_end])
        elif number == _NODE_DOMAIN:
            domain = bytes(buffer[payload:field_end])
        elif number == _NODE_OUTPUT:
            outputs += 1
        elif number == _NODE_ATTRIBUTE:
            if field_end - payload >= min_bytes:
                value = _value_tensor(buffer, payload, field_end, min_bytes)
                if value is not None:
                    if found is not None:
                        return None  # two values: left to protobuf
                    found = (attribute, [_Nested(field_start, payload, field_end), *value])
            attribute += 1
    if op_type != b"Constant" or domain not in (b"", b"ai.onnx") or outputs != 1:
        return None
    return found


def _value_tensor(buffer: memoryview, start: int, end: int, min_bytes: int) -> list[_Nested] | None:
    """In the attribute ``[start, end)`` named ``value``: its tensor field and that tensor's ``raw_data`` field."""
    name = None
    tensor = None
    for number, wire, field_start, payload, field_end in message_fields(buffer, start, end):
        if wire != _LEN:
            continue
        if number == _ATTR_NAME:
            name = bytes(buffer[payload:field_end])
        elif number == _ATTR_T:
            raw = _plain_raw_data(buffer, payload, field_end, min_bytes) if tensor is None else None
            if raw is None:
                return None  # two tensors, or one that stays as it is
            tensor = [_Nested(field_start, payload, field_end), _Nested(raw[0], raw[1], raw[2])]
    return tensor if name == b"value" else None


def _cut(buffer: memoryview, numbers: Sequence[int], fields: list[_Nested]) -> bytearray:
    """Field ``numbers[0]`` (``fields[0]``) re-encoded without the innermost field (``fields[-1]``).

    Each field in between (numbered by ``numbers``) is re-encoded with its shorter length; the
    rest is copied.
    """
    outer, number = fields[0], numbers[0]
    if len(fields) == 2:
        return _without(buffer, number, outer.payload, fields[1].start, fields[1].end, outer.end)
    inner = fields[1]
    body = bytearray(buffer[outer.payload : inner.start])
    body += _cut(buffer, numbers[1:], fields[1:])
    body += buffer[inner.end : outer.end]
    return bytearray(encode_varint((number << 3) | _LEN) + encode_varint(len(body))) + body


def read_without_payloads(fileno: int, min_bytes: int) -> tuple[onnx.ModelProto, list[Payload]]:
    """The model in an open file, the ``raw_data`` of its large main-graph tensors left unread.

    Walks the wire format over a memory map of the file; protobuf parses everything else, in
    runs of graph fields (never the whole file at once). An initializer, or the ``value`` of a
    Constant node, whose single ``raw_data`` holds at least ``min_bytes`` is parsed without it,
    and its bytes' place is returned: its pages are never touched. Subgraphs and every other
    field are parsed as they are.

    Args:
        fileno: a file descriptor open for reading on the ONNX file.
        min_bytes: the smallest ``raw_data`` left in the file.

    Returns:
        The model (each initializer left in the file has no ``raw_data``) and where each
        such initializer's bytes are.

    Raises:
        ValueError: the file is not a well-formed protobuf message (truncated...).
        IndexError: a varint runs past the end of the file.
        google.protobuf.message.DecodeError: protobuf rejects the bytes.
    """
    size = os.fstat(fileno).st_size
    model = onnx.ModelProto()
    payloads: list[Payload] = []
    if size == 0:
        return model, payloads
    with mmap.mmap(fileno, 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            pending = bytearray()  # top-level fields not merged yet
            for number, wire, field_start, payload, field_end in message_fields(view, 0, size):
                if number == _MODEL_GRAPH and wire == _LEN:
                    if pending:
                        model.MergeFromString(pending)
                        pending = bytearray()
                    _merge_graph(model, view, payload, field_end, min_bytes, payloads)
                else:
                    pending += view[field_start:field_end]
            if pending:
                model.MergeFromString(pending)
        finally:
            view.release()
    return model, payloads


def _merge_graph(
    model: onnx.ModelProto, view: memoryview, start: int, end: int, min_bytes: int, payloads: list[Payload]
) -> None:
    """Merge the graph in ``[start, end)`` into ``model`` in runs, large payloads left out.

    protobuf merges a message field seen several times (repeated fields concatenate in order),
    so each run is parsed as a graph field of its own.
    """
    index = len(model.graph.initializer)  # a second graph field continues the lists
    node = len(model.graph.node)
    run = bytearray()
    copied = start  # the run goes on with bytes [copied, field start): copied in one go when needed

    def flush() -> None:
        model.MergeFromString(encode_varint((_MODEL_GRAPH << 3) | _LEN) + encode_varint(len(run)) + run)

    for number, wire, field_start, payload, field_end in message_fields(view, start, end):
        cut = None
        large = wire == _LEN and field_end - payload >= min_bytes
        if number == _GRAPH_INITIALIZER and wire == _LEN:
            found = _plain_raw_data(view, payload, field_end, min_bytes) if large else None
            if found is not None:
                raw_start, raw_payload, raw_end, _ = found
                cut = _without(view, _GRAPH_INITIALIZER, payload, raw_start, raw_end, field_end)
                payloads.append(Payload(index, -1, -1, raw_payload, raw_end - raw_payload))
            index += 1
        elif number == _GRAPH_NODE and wire == _LEN:
            constant = _constant_value(view, payload, field_end, min_bytes) if large else None
            if constant is not None:
                position, fields = constant
                # node > attribute > tensor > raw_data: each re-encoded shorter, the bytes left out.
                cut = _cut(view, _TO_CONSTANT_DATA, [_Nested(field_start, payload, field_end), *fields])
                raw = fields[-1]
                payloads.append(Payload(-1, node, position, raw.payload, raw.end - raw.payload))
            node += 1
        if cut is not None:
            run += view[copied:field_start]
            run += cut
            copied = field_end
        if len(run) + field_end - copied >= _MERGE_CHUNK:
            run += view[copied:field_end]
            copied = field_end
            flush()
            run = bytearray()
    run += view[copied:end]
    flush()  # always: an empty graph is still a present graph
