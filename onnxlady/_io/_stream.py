"""Streaming model I/O: write a model piece by piece, read one chunk by chunk.

Why: with the upb protobuf backend, assigning ``tensor.raw_data = new`` allocates the new bytes
in the model's arena and never frees the old ones, and ``SerializeToString()`` materialises the
whole output before a single byte is written. Permuting every tensor of a model and saving it
that way peaks above four times the model's size. This module avoids both costs:

* :func:`write_model` writes the protobuf encoding of a model straight to a file, one node or
  tensor at a time, with ``overrides`` replacing the ``raw_data`` of named tensors *without*
  touching the in-memory model. Only the containers that hold an overridden or large tensor
  (the ``ModelProto``, its main ``GraphProto``, a ``Constant`` node, its ``value`` attribute, the
  ``TensorProto`` itself) are encoded by hand; everything else is serialized by protobuf, one
  small message at a time. Lengths of length-delimited fields are summed from the pieces before
  anything is written; the only big bytes built are one tensor's at a time (a big tensor that
  is not overridden is measured by a transient copy of its ``raw_data``, upb offering nothing
  cheaper, and copied again when written).
* :func:`read_model` parses a file into a ``ModelProto`` equal to :func:`onnx.load`'s without
  ever holding the whole file in memory: the graph field is fed to protobuf in chunks, relying
  on protobuf's rule that a message field seen several times is merged (repeated fields
  concatenate in order, singular scalars take the last value).

Facts checked against protobuf 7.36 / upb (see ``tests/test_stream.py``): ``ParseFromString``
copies string and bytes fields out of the input buffer (it never aliases it), accepts ``bytes``
and ``bytearray`` without a copy, rejects an ``mmap`` and copies a ``memoryview`` into a
temporary ``bytes`` first; ``ByteSize()`` costs a full serialization. Parsing an ``mmap`` of the
file therefore buys nothing, and reading chunks into a ``bytearray`` is what saves memory.

Field numbers come from the message descriptors, never from literals.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from onnxlady._io._external import is_view, mapped_bytes, view_header
from onnxlady._io._tensors import is_external

__all__ = ["BytesLike", "Override", "read_model", "write_model"]

#: Bytes for a tensor's ``raw_data``: anything exposing a C-contiguous buffer (bytes,
#: bytearray, memoryview, a C-contiguous numpy array, mmap ...). It is written as its raw bytes.
BytesLike = bytes | bytearray | memoryview
#: An override is the new ``raw_data`` itself, or a callable producing it when the tensor is
#: written (so at most one permuted tensor needs to exist at a time). A callable's result must
#: be exactly as long as the tensor's shape and type say.
Override = BytesLike | Callable[[], BytesLike]


class BinaryWriter(Protocol):
    """A binary file object whose ``write`` writes all it is given (a buffered file, ``BytesIO``)."""

    def write(self, data: BytesLike, /) -> object: ...


# -- wire format ----------------------------------------------------------------------------
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5

_MODEL = onnx.ModelProto.DESCRIPTOR
_GRAPH = onnx.GraphProto.DESCRIPTOR
_NODE = onnx.NodeProto.DESCRIPTOR
_ATTR = onnx.AttributeProto.DESCRIPTOR
_TENSOR = onnx.TensorProto.DESCRIPTOR

_MODEL_GRAPH = _MODEL.fields_by_name["graph"].number  # 7
_GRAPH_NODE = _GRAPH.fields_by_name["node"].number  # 1
_GRAPH_INITIALIZER = _GRAPH.fields_by_name["initializer"].number  # 5
_NODE_ATTRIBUTE = _NODE.fields_by_name["attribute"].number  # 5
_ATTR_T = _ATTR.fields_by_name["t"].number  # 5
_TENSOR_RAW_DATA = _TENSOR.fields_by_name["raw_data"].number  # 9

#: The typed payload fields of a TensorProto: an override replaces them with ``raw_data``.
_TYPED_DATA = frozenset(
    name
    for name in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
    if name in _TENSOR.fields_by_name
)

#: A TensorProto's fields up to ``raw_data`` and after it: protobuf writes them in this order.
_UP_TO_RAW_DATA = frozenset(f.name for f in _TENSOR.fields if f.number <= _TENSOR_RAW_DATA)
_AFTER_RAW_DATA = frozenset(f.name for f in _TENSOR.fields if f.number > _TENSOR_RAW_DATA)

#: Bits per element of the tensor types stored packed in ``raw_data`` (6-bit floats and future
#: types are absent: their size is not checked, and they cannot take a callable override).
_BITS: dict[int, int] = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in {
        "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64,
        "BOOL": 8, "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64,
        "COMPLEX128": 128, "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8,
        "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "FLOAT8E8M0": 8, "UINT4": 4, "INT4": 4,
        "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2,
    }.items()
    if hasattr(onnx.TensorProto, name)
}  # fmt: skip

#: A tensor whose shape says at least this many bytes is written as header + raw bytes rather
#: than serialized whole, so that measuring it does not cost a second serialization.
_BIG_TENSOR = 1 << 20
#: Pieces below this size are gathered into one buffer; bigger ones get a ``write`` of their own.
_SMALL_PIECE = 256 << 10
_WRITE_BUFFER = 1 << 20
#: Small serialized messages are kept from planning to writing up to this many bytes in all;
#: beyond it they are serialized again when written (memory stays bounded for huge graphs).
_KEEP_BUDGET = 16 << 20
#: protobuf refuses to parse a message of 2 GiB or more; ``onnx.save`` refuses to write one.
_PROTOBUF_LIMIT = 2**31 - 1


def _varint(value: int) -> bytes:
    """The base-128 varint encoding of a non-negative integer (at most 10 bytes)."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    """A field's key: its number and wire type as one varint."""
    return _varint((number << 3) | wire_type)


def _is_repeated(field: FieldDescriptor) -> bool:
    """``field.is_repeated`` on recent protobuf, the label on older ones."""
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _is_set(message: Message, field: FieldDescriptor) -> bool:
    """Whether a singular field would be serialized: present, or (no presence) not default."""
    if getattr(field, "has_presence", True):
        return message.HasField(field.name)
    return bool(getattr(message, field.name) != field.default_value)


def _encode_unknown(fields: UnknownFieldSet, out: bytearray) -> None:
    """Re-encode a message's unknown fields (fields newer than this onnx) so they survive."""
    for field in fields:
        number, wire, data = field.field_number, field.wire_type, field.data
        out += _key(number, wire)
        if wire == _VARINT:
            out += _varint(data)
        elif wire == _I64:
            out += data.to_bytes(8, "little")
        elif wire == _I32:
            out += data.to_bytes(4, "little")
        elif wire == _LEN:
            out += _varint(len(data))
            out += data
        elif wire == _SGROUP:
            _encode_unknown(data, out)
            out += _key(number, _EGROUP)
        else:  # pragma: no cover - upb never reports a lone end-group
            raise ValueError(f"unknown field {number} has wire type {wire}")


def _shell(message: Message, skip: frozenset[str], *, unknown: bool = True) -> bytes:
    """``message`` serialized without the fields named in ``skip``, unknown fields included.

    ``unknown=False`` leaves the unknown fields out (they are written after the last field).

    Built by copying the other fields one by one into a new message: the skipped fields (the
    big payloads) are never read, so never copied.
    """
    shell = type(message)()
    for field in message.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        if _is_repeated(field):
            if len(getattr(message, field.name)):
                getattr(shell, field.name).MergeFrom(getattr(message, field.name))
        elif _is_set(message, field):
            if field.message_type is not None:
                getattr(shell, field.name).CopyFrom(getattr(message, field.name))
            else:
                setattr(shell, field.name, getattr(message, field.name))
    out = bytearray(shell.SerializeToString())
    unknown_fields = UnknownFieldSet(message) if unknown else ()
    if len(unknown_fields):
        _encode_unknown(unknown_fields, out)  # type: ignore[arg-type]
    return bytes(out)


def _around(message: Message, number: int) -> tuple[bytes, bytes]:
    """``message``'s fields before field ``number`` and those after it (unknown fields last).

    What goes on either side of a field written by hand, in protobuf's own field order.
    """
    fields = message.DESCRIPTOR.fields
    before = _shell(message, frozenset(f.name for f in fields if f.number >= number), unknown=False)
    after = _shell(message, frozenset(f.name for f in fields if f.number <= number))
    return before, after


def _element_count(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count


def _expected_raw_size(tensor: onnx.TensorProto) -> int | None:
    """The byte size of the tensor's data by its shape and type; None where not knowable."""
    bits = _BITS.get(tensor.data_type)
    if bits is None or tensor.HasField("segment"):
        return None
    return (_element_count(tensor) * bits + 7) // 8


# -- planning ---------------------------------------------------------------------------------
@dataclass
class _Deferred:
    """A message serialized again when written (it was too big to keep since planning)."""

    message: Message
    size: int


@dataclass
class _RawData:
    """A tensor's own ``raw_data``, read from the model when written."""

    tensor: onnx.TensorProto
    size: int


@dataclass
class _ViewData:
    """A view's bytes (:func:`onnxlady._io._external.is_view`), read from its file when written."""

    tensor: onnx.TensorProto
    size: int


@dataclass
class _Computed:
    """A callable override, called when written."""

    produce: Callable[[], BytesLike]
    size: int
    name: str


_Piece = bytes | memoryview | _Deferred | _RawData | _ViewData | _Computed


class _Pieces:
    """A message's encoding as a list of pieces, and its total length."""

    def __init__(self) -> None:
        self.items: list[_Piece] = []
        self.size = 0

    def add(self, piece: _Piece, size: int) -> None:
        self.items.append(piece)
        self.size += size

    def add_bytes(self, data: bytes) -> None:
        if data:
            self.add(data, len(data))

    def add_field(self, number: int, body: _Pieces) -> None:
        """``body`` as length-delimited field ``number``."""
        self.add_bytes(_key(number, _LEN) + _varint(body.size))
        self.items.extend(body.items)
        self.size += body.size


class _Planner:
    """Turns a model into pieces; resolves overrides and records which were used."""

    def __init__(self, overrides: Mapping[str, Override]) -> None:
        self.overrides = overrides
        self.used: set[str] = set()
        self.kept = 0

    # A message serialized by protobuf: kept when small, else measured now and redone later.
    def message(self, out: _Pieces, number: int, message: Message) -> None:
        data = message.SerializeToString()
        head = _key(number, _LEN) + _varint(len(data))
        if len(data) < _SMALL_PIECE and self.kept + len(data) <= _KEEP_BUDGET:
            self.kept += len(data)
            out.add_bytes(head + data)
        else:
            out.add_bytes(head)
            out.add(_Deferred(message, len(data)), len(data))

    def model(self, model: onnx.ModelProto) -> _Pieces:
        return self._container(model, {_MODEL_GRAPH: self.graph})

    def graph(self, graph: onnx.GraphProto) -> _Pieces:
        return self._container(graph, {_GRAPH_NODE: self.node, _GRAPH_INITIALIZER: self.tensor})

    def _container(self, message: Message, special: dict[int, Callable[[Any], _Pieces | None]]) -> _Pieces:
        """Every field in field order (scalars as they are, messages item by item), then unknowns.

        Items of the ``special`` fields go through their handler (None: serialize normally).
        The order is protobuf's own, so the file is byte for byte ``SerializeToString()``'s.
        """
        every = frozenset(f.name for f in message.DESCRIPTOR.fields)
        out = _Pieces()
        for field in sorted(message.DESCRIPTOR.fields, key=lambda f: f.number):
            if field.message_type is None:
                out.add_bytes(_shell(message, every - {field.name}, unknown=False))
                continue
            handler = special.get(field.number)
            if _is_repeated(field):
                items = list(getattr(message, field.name))
            else:
                items = [getattr(message, field.name)] if message.HasField(field.name) else []
            for item in items:
                body = handler(item) if handler is not None else None
                if body is None:
                    self.message(out, field.number, item)
                else:
                    out.add_field(field.number, body)
        out.add_bytes(_shell(message, every))  # the unknown fields alone
        return out

    def node(self, node: onnx.NodeProto) -> _Pieces | None:
        """A Constant node whose value is overridden or big is encoded by hand, else None."""
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            return None
        attributes = list(node.attribute)
        if not any(a.name == "value" and a.HasField("t") for a in attributes):
            return None
        values = [a.t for a in attributes if a.name == "value" and a.HasField("t")]
        name = node.output[0]
        views = any(is_view(t) for t in values)
        if name not in self.overrides and not views and not all(self._is_big(t) for t in values):
            return None
        out = _Pieces()
        before, after = _around(node, _NODE_ATTRIBUTE)
        out.add_bytes(before)
        for attribute in attributes:
            if attribute.name == "value" and attribute.HasField("t"):
                body = _Pieces()
                head, tail = _around(attribute, _ATTR_T)
                body.add_bytes(head)
                tensor = attribute.t
                body.add_field(_ATTR_T, self._view_body(tensor, name) if is_view(tensor) else self._tensor_body(tensor, name))
                body.add_bytes(tail)
                out.add_field(_NODE_ATTRIBUTE, body)
            else:
                self.message(out, _NODE_ATTRIBUTE, attribute)
        out.add_bytes(after)
        return out

    def tensor(self, tensor: onnx.TensorProto) -> _Pieces | None:
        """An initializer that is overridden, big or a view of its file is encoded by hand, else None."""
        if is_view(tensor):
            return self._view_body(tensor, tensor.name)
        if tensor.name not in self.overrides and not self._is_big(tensor):
            return None
        return self._tensor_body(tensor, tensor.name)

    def _view_body(self, tensor: onnx.TensorProto, name: str) -> _Pieces:
        """A view written inline as the file held it: its header around its (overridden) bytes."""
        header = view_header(tensor)
        if name in self.overrides:
            return self._tensor_body(header, name)
        size = sum(int(entry.value) for entry in tensor.external_data if entry.key == "length")
        out = _Pieces()
        out.add_bytes(_shell(header, frozenset({"raw_data"}) | _AFTER_RAW_DATA, unknown=False))
        out.add_bytes(_key(_TENSOR_RAW_DATA, _LEN) + _varint(size))
        out.add(_ViewData(tensor, size), size)
        out.add_bytes(_shell(header, _UP_TO_RAW_DATA))
        return out

    @staticmethod
    def _is_big(tensor: onnx.TensorProto) -> bool:
        size = _expected_raw_size(tensor)
        return (
            size is not None and size >= _BIG_TENSOR and tensor.HasField("raw_data")
            and not is_external(tensor)
        )  # fmt: skip

    def _tensor_body(self, tensor: onnx.TensorProto, name: str) -> _Pieces:
        """Header (every field but the payload) + ``raw_data`` from the override or the tensor."""
        out = _Pieces()
        if name not in self.overrides:
            out.add_bytes(_shell(tensor, frozenset({"raw_data"}) | _AFTER_RAW_DATA, unknown=False))
            size = len(tensor.raw_data)  # a transient copy: upb has no cheaper way to measure
            out.add_bytes(_key(_TENSOR_RAW_DATA, _LEN) + _varint(size))
            out.add(_RawData(tensor, size), size)
            out.add_bytes(_shell(tensor, _UP_TO_RAW_DATA))
            return out
        self.used.add(name)
        override = self.overrides[name]
        if is_external(tensor):
            raise ValueError(f"tensor {name!r} keeps its data in an external file: it cannot be overridden")
        if tensor.data_type == onnx.TensorProto.STRING:
            raise ValueError(f"tensor {name!r} holds strings: it has no raw_data to override")
        expected = _expected_raw_size(tensor)
        if callable(override):
            if expected is None:
                raise ValueError(f"tensor {name!r}: a callable override needs a known size (type, no segment)")
            piece: _Piece = _Computed(override, expected, name)
            size = expected
        else:
            piece = _as_bytes(override, name)
            size = piece.nbytes
            if expected is not None and size != expected:
                raise ValueError(f"override for tensor {name!r} has {size} bytes, its shape and type say {expected}")
        out.add_bytes(_shell(tensor, _TYPED_DATA | {"raw_data"} | _AFTER_RAW_DATA, unknown=False))
        out.add_bytes(_key(_TENSOR_RAW_DATA, _LEN) + _varint(size))
        out.add(piece, size)
        out.add_bytes(_shell(tensor, _TYPED_DATA | _UP_TO_RAW_DATA))
        return out


def _as_bytes(value: object, name: str) -> memoryview:
    """A flat byte view of a bytes-like override (numpy arrays must be C-contiguous)."""
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError(f"override for tensor {name!r} is {type(value).__name__}, not bytes-like") from exc
    if not view.c_contiguous:
        raise ValueError(f"override for tensor {name!r} is not C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


# -- writing ------------------------------------------------------------------------------------
def _materialise(piece: _Piece) -> BytesLike:
    """The bytes of a piece, produced now for the deferred kinds (their size is checked)."""
    if isinstance(piece, (bytes, memoryview)):
        return piece
    if isinstance(piece, _Deferred):
        data: BytesLike = piece.message.SerializeToString()
        what = "a message"
    elif isinstance(piece, _RawData):
        data = piece.tensor.raw_data
        what = f"tensor {piece.tensor.name!r}"
    elif isinstance(piece, _ViewData):
        data = mapped_bytes(piece.tensor)  # pages read as written, dropped with the view
        what = f"tensor {piece.tensor.name!r}"
    else:
        data = _as_bytes(piece.produce(), piece.name)
        what = f"the override of tensor {piece.name!r}"
    size = memoryview(data).nbytes
    if size != piece.size:
        raise RuntimeError(f"{what} is {size} bytes when written, {piece.size} when planned")
    return data


def _write_pieces(pieces: Iterator[_Piece], write: Callable[[BytesLike], object]) -> int:
    """Write all pieces: small ones gathered in a buffer, big ones with a ``write`` each."""
    buffer = bytearray()
    written = 0
    for piece in pieces:
        data = _materialise(piece)
        size = memoryview(data).nbytes
        written += size
        if size < _SMALL_PIECE:
            buffer += data
            if len(buffer) >= _WRITE_BUFFER:
                write(buffer)
                buffer = bytearray()
        else:
            if buffer:
                write(buffer)
                buffer = bytearray()
            write(data)
        del data
    if buffer:
        write(buffer)
    return written


def _write_all(raw: io.FileIO) -> Callable[[BytesLike], None]:
    """A ``write`` for an unbuffered file that loops over short writes."""

    def write(data: BytesLike) -> None:
        view = memoryview(data)
        while view.nbytes:
            count = raw.write(view)
            if not count:
                raise OSError(f"{raw.name}: write made no progress")
            view = view[count:]

    return write


def write_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str] | BinaryWriter,
    *,
    overrides: Mapping[str, Override] | None = None,
) -> None:
    """Write ``model`` to ``path`` without ever building its whole encoding.

    ``path`` is a file name, or a binary file object whose ``write`` writes all it is given, such
    as a buffered file or ``BytesIO``; ``overrides[name]`` is written as the ``raw_data`` of tensor
    ``name``.

    ``name`` is an initializer of the main graph, or the output of a main-graph ``Constant``
    node whose ``value`` tensor is replaced. An override is bytes-like (written as is) or a
    callable returning bytes-like, called when that tensor is written so that permuted tensors
    need not all exist at once. Its length must match the tensor's shape and type (checked:
    callables need a type of known size). An overridden tensor's typed payload fields
    (``float_data`` ...) are dropped: the file holds ``raw_data`` only. ``model`` itself is
    never modified; ``onnx.load`` of the file gives ``model`` with the overrides applied.

    Subgraphs, functions, training info and every tensor not overridden are serialized by
    protobuf as they are (external-data tensors stay external), except views of an inline file
    (:func:`onnxlady._io._external.is_view`): written inline as that file held them, their
    bytes read from it as they are written. Protobuf may order fields
    differently from ``SerializeToString``; the parsed message is the same.

    Raises ``KeyError`` for an override naming no such tensor, ``ValueError`` for one that
    cannot apply (external data, strings, wrong size) or for an output of 2 GiB or more
    (protobuf cannot read it back: use external data); nothing is written in those cases. If
    writing a file name fails, the partial file is removed.
    """
    overrides = {} if overrides is None else overrides
    planner = _Planner(overrides)
    pieces = planner.model(model)
    missing = sorted(set(overrides) - planner.used)
    if missing:
        raise KeyError(
            f"no initializer or Constant node of the main graph is called {', '.join(map(repr, missing))}"
        )
    if pieces.size > _PROTOBUF_LIMIT:
        raise ValueError(f"the model would be {pieces.size} bytes: protobuf cannot parse 2 GiB or more")
    if hasattr(path, "write"):
        written = _write_pieces(iter(pieces.items), path.write)  # type: ignore[union-attr]
    else:
        target = os.fspath(path)  # type: ignore[arg-type]
        raw = open(target, "wb", buffering=0)  # ruff: ignore[open-file-with-context-handler] - closed below, removed on failure
        try:
            with raw:
                written = _write_pieces(iter(pieces.items), _write_all(raw))
        except BaseException:
            os.unlink(target)  # only a file this call created (or truncated) is removed
            raise
    if written != pieces.size:  # pragma: no cover - _materialise checks every piece
        raise RuntimeError(f"wrote {written} bytes, planned {pieces.size}")


# -- reading --------------------------------------------------------------------------------------
#: Files smaller than this are parsed in one go (chunking would only add overhead).
_WHOLE_FILE_BELOW = 16 << 20
#: Consecutive graph fields are parsed together up to this many bytes.
_READ_CHUNK = 4 << 20
_WINDOW = 64 << 10


class _Unsupported(Exception):  # ruff: ignore[error-suffix-on-exception-name] - a signal to fall back to onnx.load, not an error
    """The chunked reader met something it does not split (groups, malformed data)."""


class _Reader:
    """Random access to a file through a small read-ahead window, plus exact range reads."""

    def __init__(self, handle: io.FileIO, size: int) -> None:
        self.handle = handle
        self.size = size
        self.base = 0
        self.window = b""

    def varint(self, pos: int) -> tuple[int, int]:
        """Decode the varint at ``pos``: (value, position after it)."""
        end = self.base + len(self.window)
        if pos < self.base or (pos + 10 > end and end < self.size):
            self.handle.seek(pos)
            self.base, self.window = pos, self.handle.read(_WINDOW)
        value, shift, i = 0, 0, pos - self.base
        window = self.window
        while True:
            if i >= len(window) or shift >= 70:
                raise _Unsupported("truncated or overlong varint")
            byte = window[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, self.base + i
            shift += 7

    def field_end(self, pos: int) -> tuple[int, int, int]:
        """The field at ``pos``: (number, wire type, end position)."""
        key, pos = self.varint(pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, end = self.varint(pos)
        elif wire == _I64:
            end = pos + 8
        elif wire == _I32:
            end = pos + 4
        elif wire == _LEN:
            length, pos = self.varint(pos)
            end = pos + length
        else:
            raise _Unsupported(f"wire type {wire}")
        if number == 0 or end > self.size:
            raise _Unsupported("bad field")
        return number, wire, end

    def read_into(self, buffer: bytearray, offset: int, start: int, end: int) -> None:
        """Fill ``buffer[offset:]`` with file bytes ``[start, end)``."""
        view = memoryview(buffer)[offset : offset + end - start]
        self.handle.seek(start)
        while view.nbytes:
            count = self.handle.readinto(view)
            if not count:
                raise _Unsupported("file shrank while reading")
            view = view[count:]


def _merge_range(model: onnx.ModelProto, reader: _Reader, start: int, end: int, prefix: bytes = b"") -> None:
    """Parse ``prefix`` + file bytes ``[start, end)`` into ``model`` (merging)."""
    buffer = bytearray(len(prefix) + end - start)
    buffer[: len(prefix)] = prefix
    reader.read_into(buffer, len(prefix), start, end)
    model.MergeFromString(buffer)  # a bytearray is parsed in place, and never aliased


def _read_chunked(path: str | os.PathLike[str], chunk: int = _READ_CHUNK) -> onnx.ModelProto:
    """Parse the file field by field.

    Top-level fields in runs, the graph in ``chunk``-sized runs of its own fields, each run wrapped
    as a graph field of its own and merged.
    """
    model = onnx.ModelProto()
    with open(path, "rb", buffering=0) as handle:
        reader = _Reader(handle, os.fstat(handle.fileno()).st_size)
        pos, run = 0, 0  # run: start of the pending top-level fields
        while pos < reader.size:
            number, wire, end = reader.field_end(pos)
            if number != _MODEL_GRAPH or wire != _LEN:
                pos = end
                continue
            if run < pos:
                _merge_range(model, reader, run, pos)
            _, body = reader.varint(reader.varint(pos)[1])  # skip key and length
            _merge_graph(model, reader, body, end, chunk)
            pos = run = end
        if run < pos:
            _merge_range(model, reader, run, pos)
    return model


def _merge_graph(model: onnx.ModelProto, reader: _Reader, start: int, end: int, chunk: int) -> None:
    def flush(a: int, b: int) -> None:
        _merge_range(model, reader, a, b, _key(_MODEL_GRAPH, _LEN) + _varint(b - a))

    if start == end:
        flush(start, end)  # an empty graph is still a present graph
        return
    pos = run = start
    while pos < end:
        _, _, field_end = reader.field_end(pos)
        if field_end > end:
            raise _Unsupported("graph field overruns the graph")
        if field_end - run > chunk and pos > run:
            flush(run, pos)
            run = pos
        pos = field_end
    flush(run, end)


def read_model(path: str | os.PathLike[str], *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file like :func:`onnx.load`, peaking near the parsed model's size.

    The peak stays near the parsed model's size instead of the file's size plus the parsed model
    (the file's bytes are never all in memory at once).

    Big files are read in chunks (a run of graph fields, or a single big tensor) and merged
    into the model; small files, and anything the chunked reader does not split (protobuf
    groups, damaged data), are parsed whole, so errors are protobuf's own ``DecodeError``.
    External data is loaded from the model's folder unless ``load_external_data`` is False.
    """
    model: onnx.ModelProto | None = None
    if os.path.getsize(path) >= _WHOLE_FILE_BELOW:
        try:
            model = _read_chunked(path)
        except _Unsupported:
            model = None
        except DecodeError:
            model = None  # parse the whole file for protobuf's own, complete message
    if model is None:
        model = onnx.ModelProto()
        with open(path, "rb") as handle:
            model.ParseFromString(handle.read())
    if load_external_data:  # as onnx.load does: tensors' files are next to the model
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, os.path.dirname(os.path.abspath(os.fspath(path))))
    return model
