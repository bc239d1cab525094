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

import onnx

__all__ = ["GraphOnly", "encode_varint", "message_fields", "read_graph", "read_varint", "with_graph_outputs"]

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
