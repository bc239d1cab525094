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
nodes, subgraphs) stays in the skeleton and is read the usual way. The walk is
:mod:`onnxlady._io._wire`'s (:func:`~onnxlady._io._wire.tensor_spans`,
:func:`~onnxlady._io._wire.describe_tensor`, :func:`~onnxlady._io._wire.splice`); this module says
which initializers become views.
"""

from __future__ import annotations

import mmap
import sys

import numpy as np
import onnx

from onnxlady._io._wire import INITIALIZER, Field, describe_tensor, splice, tensor_spans

__all__ = ["PLAIN_TYPES", "SkimmedModel", "read_weights"]

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


def _view(buffer: bytes | mmap.mmap, view: memoryview, tensor: Field, arrays: dict[str, np.ndarray]) -> Field | None:
    """The ``raw_data`` field of the initializer ``tensor`` when it becomes a view (kept in ``arrays``), or None.

    Raises:
        UnicodeDecodeError: the tensor's name is not UTF-8.
    """
    try:
        layout = describe_tensor(view, tensor.payload, tensor.end)
    except ValueError:
        return None  # damaged: protobuf's own parse says how
    raw, span = layout.raw, layout.name
    if not layout.plain or raw is None or span is None or layout.data_type not in PLAIN_TYPES:
        return None
    name = bytes(view[span[0] : span[1]]).decode("utf-8")
    if name in arrays:  # a name given twice: the last tensor is the one readers take
        del arrays[name]
        return None
    dims = layout.dims
    if any(dim >= 1 << 62 for dim in dims):
        return None
    dtype = PLAIN_TYPES[layout.data_type]
    count = 1
    for dim in dims:
        count *= dim
    if count * dtype.itemsize != raw.end - raw.payload:
        return None  # to_array's own error (or reading) is the one to give
    arrays[name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=raw.payload).reshape(dims)
    return raw


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
    arrays: dict[str, np.ndarray] = {}
    view = memoryview(buffer)
    try:
        edits: list[tuple[tuple[Field, ...], bytes | None]] = []
        for span in tensor_spans(view, 0, len(buffer), constants=False):
            if span.where == INITIALIZER:
                raw = _view(buffer, view, span.tensor, arrays)
                if raw is not None:
                    edits.append(((*span.path, raw), None))
        skeleton = b"".join(splice(view, 0, len(buffer), edits))
    finally:
        view.release()
    model.ParseFromString(skeleton)
    return SkimmedModel(model, arrays)
