"""A model file's bytes without its weights, for ONNX Runtime to read the weights from the file itself.

When verify must compare intermediate tensors it hands ONNX Runtime bytes (the file with outputs
appended), not a path. ORT's Python binding keeps those bytes for the session's whole life and
copies them once more while it parses them: on a model of N bytes, three copies of the weights
before ORT even starts optimizing. :func:`weightless_bytes` walks the file's protobuf wire format
over a memory map and rewrites every large weight stored inline (``raw_data``) as
an external-data reference to the very bytes it occupies in the file (``location`` the file's
name, ``offset`` and ``length`` of its ``raw_data`` payload). ORT then reads each weight from the
file, the bytes it gets are the same, so the session and its results are the same; the buffer
handed over holds only the graph.

Only main-graph initializers and ONNX-domain ``Constant`` values with a ``raw_data`` payload of at
least :data:`WEIGHTLESS_MIN_BYTES` are rewritten; every other field (small tensors, subgraphs,
tensors already external) is copied byte for byte. The walk reads fields with
:mod:`onnxlady._io._skim`'s reader; it writes bytes for ORT, where ``_skim`` parses a model for
onnxlady, so the two keep their own small field tables.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import NamedTuple

import onnx

from onnxlady._io._skim import encode_varint, message_fields

__all__ = ["WEIGHTLESS_MIN_BYTES", "Weightless", "weightless_bytes"]

_LEN = 2
_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_GRAPH_NODE = onnx.GraphProto.DESCRIPTOR.fields_by_name["node"].number
_NODE = onnx.NodeProto.DESCRIPTOR
_NODE_OP_TYPE = _NODE.fields_by_name["op_type"].number
_NODE_DOMAIN = _NODE.fields_by_name["domain"].number
_NODE_ATTRIBUTE = _NODE.fields_by_name["attribute"].number
_ATTR = onnx.AttributeProto.DESCRIPTOR
_ATTR_NAME = _ATTR.fields_by_name["name"].number
_ATTR_T = _ATTR.fields_by_name["t"].number
_TENSOR = onnx.TensorProto.DESCRIPTOR
_TENSOR_RAW_DATA = _TENSOR.fields_by_name["raw_data"].number
_TENSOR_EXTERNAL_DATA = _TENSOR.fields_by_name["external_data"].number
_TENSOR_DATA_LOCATION = _TENSOR.fields_by_name["data_location"].number
_ENTRY = onnx.StringStringEntryProto.DESCRIPTOR
_ENTRY_KEY = _ENTRY.fields_by_name["key"].number
_ENTRY_VALUE = _ENTRY.fields_by_name["value"].number
#: Weights smaller than this stay inline: ORT reads each external tensor with its own file
#: access, and small ones cost nothing to copy.
WEIGHTLESS_MIN_BYTES = 64 << 10


class Weightless(NamedTuple):
    """A model file's bytes with its large inline weights pointing back into the file."""

    #: The model's bytes.
    data: bytes
    #: The resolved file's folder, where ORT must look for the weights (and any other external data).
    folder: str
    #: How many tensors now point into the file.
    moved: int
    #: Whether some tensor already lived in an external file (it was left as it was).
    had_external: bool


class _Walk:
    """What the walk over one file found: tensors moved, tensors already external."""

    def __init__(self) -> None:
        self.moved = 0
        self.had_external = False


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return encode_varint((number << 3) | _LEN) + encode_varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    """One ``external_data`` entry (a StringStringEntryProto field of a TensorProto)."""
    return _field(_TENSOR_EXTERNAL_DATA, _field(_ENTRY_KEY, key.encode()) + _field(_ENTRY_VALUE, value.encode()))


def _tensor(buffer: memoryview, start: int, end: int, location: str, min_bytes: int, walk: _Walk) -> bytes | None:
    """The TensorProto in ``buffer[start:end]`` pointing at its own ``raw_data`` in the file, or None to keep it."""
    kept = bytearray()
    payload: tuple[int, int] | None = None
    for number, wire, field_start, data_start, field_end in message_fields(buffer, start, end):
        if number == _TENSOR_EXTERNAL_DATA:  # already external (or malformed): left as it is
            walk.had_external = True
            return None
        if number == _TENSOR_RAW_DATA and wire == _LEN:
            payload = (data_start, field_end - data_start)  # protobuf keeps the last one: so do we
            continue
        kept += buffer[field_start:field_end]
    if payload is None or payload[1] < min_bytes:
        return None
    offset, length = payload
    kept += _entry("location", location) + _entry("offset", str(offset)) + _entry("length", str(length))
    # Appended last, so that it wins over a data_location the tensor may already state (protobuf's rule).
    kept += encode_varint(_TENSOR_DATA_LOCATION << 3) + encode_varint(onnx.TensorProto.EXTERNAL)
    walk.moved += 1
    return bytes(kept)


def _constant(buffer: memoryview, start: int, end: int, location: str, min_bytes: int, walk: _Walk) -> bytes | None:
    """The NodeProto in ``buffer[start:end]`` with its tensor pointing into the file when it is a Constant, or None."""
    fields = message_fields(buffer, start, end)
    texts = {number: bytes(buffer[data:field_end]) for number, wire, _, data, field_end in fields if wire == _LEN}
    if texts.get(_NODE_OP_TYPE) != b"Constant" or texts.get(_NODE_DOMAIN, b"") not in (b"", b"ai.onnx"):
        return None
    out = bytearray()
    changed = False
    for number, wire, field_start, data_start, field_end in fields:
        attribute = None
        if number == _NODE_ATTRIBUTE and wire == _LEN:
            attribute = _value_attribute(buffer, data_start, field_end, location, min_bytes, walk)
        changed = changed or attribute is not None
        out += buffer[field_start:field_end] if attribute is None else _field(number, attribute)
    return bytes(out) if changed else None


def _value_attribute(
    buffer: memoryview, start: int, end: int, location: str, min_bytes: int, walk: _Walk
) -> bytes | None:
    """A Constant's ``value`` AttributeProto with its tensor pointing into the file, or None to keep it."""
    fields = message_fields(buffer, start, end)
    names = [bytes(buffer[data:field_end]) for number, wire, _, data, field_end in fields if number == _ATTR_NAME]
    if names != [b"value"]:
        return None
    out = bytearray()
    changed = False
    for number, wire, field_start, data_start, field_end in fields:
        tensor = None
        if number == _ATTR_T and wire == _LEN:
            tensor = _tensor(buffer, data_start, field_end, location, min_bytes, walk)
        changed = changed or tensor is not None
        out += buffer[field_start:field_end] if tensor is None else _field(number, tensor)
    return bytes(out) if changed else None


def _graph_rewrites(
    buffer: memoryview, start: int, end: int, location: str, min_bytes: int, walk: _Walk
) -> list[tuple[int, int, bytes]]:
    """The fields of the GraphProto in ``buffer[start:end]`` to rewrite: (field start, field end, new field)."""
    rewrites = []
    for number, wire, field_start, data_start, field_end in message_fields(buffer, start, end):
        rewritten = None
        if number == _GRAPH_INITIALIZER and wire == _LEN:
            rewritten = _tensor(buffer, data_start, field_end, location, min_bytes, walk)
        elif number == _GRAPH_NODE and wire == _LEN and field_end - data_start > min_bytes:
            rewritten = _constant(buffer, data_start, field_end, location, min_bytes, walk)
        if rewritten is not None:
            rewrites.append((field_start, field_end, _field(number, rewritten)))
    return rewrites


def weightless_bytes(path: str | os.PathLike[str], *, min_bytes: int = WEIGHTLESS_MIN_BYTES) -> Weightless:
    """The bytes of the model in ``path`` with its large inline weights pointing back into the file.

    Args:
        path: an ONNX file (symbolic links are resolved: ORT checks that external data stays in
            the model's folder).
        min_bytes: ``raw_data`` payloads smaller than this stay inline.

    Returns:
        The bytes (empty when no tensor moved: the file itself is the model), and the folder ORT
        must be told (the resolved file's folder, where its other external data lives too)
        through ``session.model_external_initializers_file_folder_path``.

    Raises:
        ValueError: the file is not a well-formed protobuf message.
        OSError: the file cannot be read.
    """
    resolved = Path(path).resolve()
    location = resolved.name
    walk = _Walk()
    with open(resolved, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return Weightless(b"", str(resolved.parent), 0, False)
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buffer = memoryview(mapped)
            try:
                # First the rewritten tensors alone (small): the model's bytes are copied only when some moved.
                fields = message_fields(buffer, 0, size)
                rewrites = {index: _graph_rewrites(buffer, start, end, location, min_bytes, walk)
                            for index, (number, wire, _, start, end) in enumerate(fields)
                            if number == _MODEL_GRAPH and wire == _LEN}  # fmt: skip
                if not walk.moved:
                    return Weightless(b"", str(resolved.parent), 0, walk.had_external)
                out = bytearray()
                for index, (number, _, field_start, start, end) in enumerate(fields):
                    if index not in rewrites:
                        out += buffer[field_start:end]
                        continue
                    graph = bytearray()
                    position = start
                    for inner_start, inner_end, rewritten in rewrites[index]:
                        graph += buffer[position:inner_start]
                        graph += rewritten
                        position = inner_end
                    graph += buffer[position:end]
                    out += _field(number, bytes(graph))
            finally:
                buffer.release()
    data = bytes(out)
    del out
    return Weightless(data, str(resolved.parent), walk.moved, walk.had_external)
