"""A model's graph and its weights, read from the file's bytes without copying the weights.

``onnx.load`` (and ``ModelProto.ParseFromString``) copies every weight: protobuf hands each
``raw_data`` out as a new ``bytes`` object, and on a model of tens of megabytes the copy (and
the page faults of the fresh memory it goes to) costs more than the parse itself; reading a
tensor through ``onnx.numpy_helper.to_array`` then costs about 15 microseconds of Python per
tensor, which is most of what a small model costs. A fingerprint only reads the weights, so
:func:`read_weights` walks the protobuf wire format of the main graph's initializers, hands
protobuf the model without their ``raw_data`` fields (a *skeleton*: every node, input, output
and attribute, and every initializer's name, type and dimensions, as ``onnx.load`` gives
them) and returns each skimmed initializer as a read-only numpy view of the file's bytes (of
the memory map, for a large file: its pages are read once, by the arithmetic that reads them).

Only what a view gives exactly as :func:`onnx.numpy_helper.to_array` would is skimmed: a
main-graph initializer with one ``raw_data`` field of the right length, of a type numpy stores
one element per item (not the 2-, 4- or 6-bit packed types, not strings), not external, not a
segment, on a little-endian machine. Everything else (tensors in ``float_data``, ``Constant``
nodes, subgraphs) stays in the skeleton and is read the usual way. Field numbers come from the
message descriptors, never from literals.
"""

from __future__ import annotations

import mmap
import sys

import numpy as np
import onnx

from onnxlady._io._skim import encode_varint as _encode_varint
from onnxlady._io._skim import message_fields
from onnxlady._io._skim import read_varint as _varint

__all__ = ["PLAIN_TYPES", "SkimmedModel", "read_weights"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_TENSOR_FIELDS = onnx.TensorProto.DESCRIPTOR.fields_by_name
_DIMS = _TENSOR_FIELDS["dims"].number
_DATA_TYPE = _TENSOR_FIELDS["data_type"].number
_NAME = _TENSOR_FIELDS["name"].number
_RAW_DATA = _TENSOR_FIELDS["raw_data"].number
#: Fields that make a tensor something other than "values in raw_data": it is kept whole.
_KEEP_WHOLE = frozenset(
    _TENSOR_FIELDS[name].number
    for name in ("segment", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data",
                 "external_data", "data_location")
)  # fmt: skip
#: Element types whose raw bytes numpy reads one item per element, as ``to_array`` does (none on
#: a big-endian machine: raw_data is little-endian, a view would read it wrong).
PLAIN_TYPES: dict[int, np.dtype] = {
    data_type: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    for data_type in (
        onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
        onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL,
        onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
        onnx.TensorProto.BFLOAT16,
    )
    if sys.byteorder == "little"
}  # fmt: skip


class SkimmedModel:
    """A model read by :func:`read_weights`.

    Attributes:
        model: the skeleton: the model without the ``raw_data`` of the tensors in ``arrays``.
        arrays: initializer name -> its values, a read-only view of the file's bytes.
    """

    def __init__(self, model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> None:
        self.model = model
        self.arrays = arrays


class _Reader:
    def __init__(self, buffer: bytes | mmap.mmap) -> None:
        self.buffer = buffer
        self.view = memoryview(buffer)
        self.arrays: dict[str, np.ndarray] = {}

    def close(self) -> None:
        self.view.release()

    def model(self, end: int) -> bytes:
        """The model's bytes with the graph's skimmable initializers' ``raw_data`` left out."""
        view = self.view
        parts: list[bytes | memoryview] = []
        copied = 0
        for number, wire, field_start, payload, position in message_fields(view, 0, end):
            if number == _MODEL_GRAPH and wire == _LEN:
                graph = self.graph(payload, position)
                if graph is not None:
                    parts += [view[copied:field_start], _key_and_length(_MODEL_GRAPH, len(graph)), graph]
                    copied = position
        parts.append(view[copied:end])
        return b"".join(parts)

    def graph(self, start: int, end: int) -> bytes | None:
        """The graph's bytes without the skimmed ``raw_data``; None when nothing was skimmed.

        The walk of :func:`~onnxlady._io._skim.message_fields` (same fields, same errors), inlined
        for one-byte keys and lengths: a graph holds a field per node, and a real network's
        thousands of nodes made the generic walk a fifth of its fingerprint's time.
        """
        view = self.view
        parts: list[bytes | memoryview] = []
        copied = start
        position = start
        while position < end:
            field_start = position
            key = view[position]
            position += 1
            if key >= 0x80:
                key, position = _varint(view, field_start)
            wire = key & 7
            if wire == _LEN:
                length = view[position]
                if length < 0x80:
                    position += 1
                else:
                    length, position = _varint(view, position)
                payload = position
                position += length
            elif wire == _VARINT:
                payload = position
                position = _varint(view, position)[1]
            elif wire == _I64:
                payload, position = position, position + 8
            elif wire == _I32:
                payload, position = position, position + 4
            else:  # groups are deprecated and no ONNX message uses them
                raise ValueError(f"unsupported wire type {wire}")
            if position > end:
                raise ValueError("truncated message")
            if key >> 3 == _GRAPH_INITIALIZER and wire == _LEN:
                tensor = self.tensor(payload, position)
                if tensor is not None:
                    before, after = tensor
                    parts += [
                        view[copied:field_start],
                        _key_and_length(_GRAPH_INITIALIZER, len(before) + len(after)),
                        before,
                        after,
                    ]
                    copied = position
        if copied == start:
            return None
        parts.append(view[copied:end])
        return b"".join(parts)

    def tensor(self, start: int, end: int) -> tuple[memoryview, memoryview] | None:
        """The tensor's bytes before and after its ``raw_data`` (its values kept in :attr:`arrays`), or None.

        Two views, not joined: the graph's one join copies them.
        """
        view = self.view
        dims: list[int] = []
        data_type = name = raw = None
        try:
            fields = message_fields(view, start, end)
        except ValueError:
            return None  # damaged: protobuf's own parse says how
        for number, wire, field_start, payload, position in fields:
            if number == _RAW_DATA and wire == _LEN and raw is None:
                raw = (field_start, payload, position)
            elif number == _DIMS and wire == _VARINT:
                dims.append(_varint(view, payload)[0])
            elif number == _DIMS and wire == _LEN:
                at = payload
                while at < position:
                    dim, at = _varint(view, at)
                    dims.append(dim)
            elif number == _DATA_TYPE and wire == _VARINT and data_type is None:
                data_type = _varint(view, payload)[0]
            elif number == _NAME and wire == _LEN and name is None:
                name = bytes(view[payload:position]).decode("utf-8")
            elif number in _KEEP_WHOLE or number in (_RAW_DATA, _DATA_TYPE, _NAME):
                return None  # another storage, or a field repeated: protobuf's reading, not ours
        if raw is None or name is None or data_type not in PLAIN_TYPES:
            return None
        if name in self.arrays:  # a name given twice: the last tensor is the one readers take
            del self.arrays[name]
            return None
        if any(dim >= 1 << 62 for dim in dims):
            return None
        dtype = PLAIN_TYPES[data_type]
        count = 1
        for dim in dims:
            count *= dim
        field_start, payload, field_end = raw
        if count * dtype.itemsize != field_end - payload:
            return None  # to_array's own error (or reading) is the one to give
        self.arrays[name] = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=payload).reshape(dims)
        return view[start:field_start], view[field_end:end]


def _key_and_length(number: int, length: int) -> bytes:
    return _encode_varint((number << 3) | _LEN) + _encode_varint(length)


def read_weights(buffer: bytes | mmap.mmap) -> SkimmedModel:
    """The model serialized in ``buffer``, its initializers' values as views of ``buffer``.

    See the module docstring. ``buffer`` must stay unchanged while the views are used; a view
    keeps it alive (a memory map cannot be closed while one exists).

    Args:
        buffer: a serialized ModelProto.

    Returns:
        The skeleton and the views.

    Raises:
        ValueError: the bytes are not a well-formed protobuf message.
        google.protobuf.message.DecodeError: protobuf rejects the skeleton.
    """
    model = onnx.ModelProto()
    reader = _Reader(buffer)
    try:
        skeleton = reader.model(len(buffer))
    except IndexError as exc:
        raise ValueError("truncated message") from exc
    finally:
        reader.close()
    model.ParseFromString(skeleton)
    return SkimmedModel(model, reader.arrays)
