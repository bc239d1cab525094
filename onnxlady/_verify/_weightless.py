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

Only main-graph initializers and ONNX-domain ``Constant`` values whose values are one ``raw_data``
payload (:func:`~onnxlady._io._wire.describe_tensor`'s *plain*) of at least
:data:`WEIGHTLESS_MIN_BYTES` are rewritten; every other field (small tensors, subgraphs, tensors
already external, typed values) is copied byte for byte. The walk is :mod:`onnxlady._io._wire`'s (the
tensors :func:`~onnxlady._io._wire.tensor_spans` finds, the bytes :func:`~onnxlady._io._wire.splice`
gives); this module only says how a moved tensor points into the file.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import NamedTuple

import onnx

from onnxlady._io._wire import (
    ENTRY_KEY,
    ENTRY_VALUE,
    TENSOR_DATA_LOCATION,
    TENSOR_EXTERNAL_DATA,
    Field,
    describe_tensor,
    encode_varint,
    length_field,
    message_fields,
    splice,
    tensor_spans,
)

__all__ = ["WEIGHTLESS_MIN_BYTES", "Weightless", "weightless_bytes"]

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


def _entry(key: str, value: str) -> bytes:
    """One ``external_data`` entry (a StringStringEntryProto field of a TensorProto)."""
    return length_field(
        TENSOR_EXTERNAL_DATA, length_field(ENTRY_KEY, key.encode()) + length_field(ENTRY_VALUE, value.encode())
    )


def _pointing_into_file(buffer: memoryview, tensor: Field, raw: Field, location: str) -> bytes:
    """The TensorProto ``tensor`` less its ``raw_data`` field ``raw``, pointing at that field's payload in the file."""
    kept = bytearray(buffer[tensor.payload : raw.start])
    kept += buffer[raw.end : tensor.end]
    offset, length = raw.payload, raw.end - raw.payload
    kept += _entry("location", location) + _entry("offset", str(offset)) + _entry("length", str(length))
    # Appended last, so that it wins over a data_location the tensor may already state (protobuf's rule).
    kept += encode_varint(TENSOR_DATA_LOCATION << 3) + encode_varint(onnx.TensorProto.EXTERNAL)
    return bytes(kept)


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
    moved = 0
    had_external = False
    with open(resolved, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return Weightless(b"", str(resolved.parent), 0, False)
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buffer = memoryview(mapped)
            try:
                # First the rewritten tensors alone (small): the model's bytes are copied only when some moved.
                edits: list[tuple[tuple[Field, ...], bytes | None]] = []
                for span in tensor_spans(buffer, 0, size, min_bytes=min_bytes):
                    tensor = span.tensor
                    if tensor.end - tensor.payload < min_bytes:  # stays: only whether it names external data
                        fields = message_fields(buffer, tensor.payload, tensor.end)
                        had_external = had_external or any(field[0] == TENSOR_EXTERNAL_DATA for field in fields)
                        continue
                    layout = describe_tensor(buffer, tensor.payload, tensor.end)
                    had_external = had_external or layout.external
                    raw = layout.raw
                    if layout.plain and raw is not None and raw.end - raw.payload >= min_bytes:
                        edits.append((span.path, _pointing_into_file(buffer, tensor, raw, location)))
                        moved += 1
                if not moved:
                    return Weightless(b"", str(resolved.parent), 0, had_external)
                data = b"".join(splice(buffer, 0, size, edits))  # the views of the map gone before it closes
            finally:
                buffer.release()
    return Weightless(data, str(resolved.parent), moved, had_external)
