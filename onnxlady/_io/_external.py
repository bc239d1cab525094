"""External data without loading it: weights read as memory maps, written streamed.

``onnx.load`` with external data reads every weight into the model's protobuf (the whole model
in memory), and ``onnx.save`` with external data writes them back from there. For a model of
10 GB that is 10 GB of memory before anything is done. This module keeps the weights in their
files instead:

- :func:`map_external_data` leaves a loaded model's large external tensors where they are and
  points each at its data file by absolute path (in memory only: such a location is never
  written to a file). Small ones (below :data:`INLINE_BYTES`) and those inside subgraphs are
  read into the model, so every reader of small constants (shape arithmetic, folding) and every
  in-place edit of a subgraph works as with a loaded model;
- :func:`is_mapped` tells such a tensor, :func:`mapped_array` gives its values as a read-only
  ``numpy.memmap`` (no copy: pages are read when touched and dropped when the array goes) and
  :func:`mapped_bytes` its raw bytes the same way;
- :func:`write_external` writes a model with its weights in one data file, one tensor at a
  time, from ``overrides`` (new bytes, or callables computing them as they are written), the
  tensors' own bytes, or their mapped files; the model in memory is not changed, and only the
  graph (without weights) is ever serialized as a whole.

Memory is then bounded by the graph and the few tensors in flight, not by the model's size.

Inline models get the same treatment (:func:`map_inline_payloads`): the large ``raw_data`` of
a main-graph initializer, left unread by :func:`onnxlady._io._skim.read_without_payloads`, is
mapped from the ``.onnx`` file itself at the payload's offset (a *view*). A view reads through
the file handle opened when the model was loaded, so the old content stays readable after the
file is replaced (an output written over its input is staged and renamed: the old inode
lives on); it remembers the tensor's own ``data_location`` so that a model written from it, or
read in, is the one a full load gives. A model holding views is written inline, streamed
(:func:`onnxlady._io._stream.write_model`), unless it is written with external data.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.external_data_helper
from onnx import numpy_helper

from onnxlady._errors import OnnxladyError
from onnxlady._io._skim import Payload

__all__ = [
    "INLINE_BYTES",
    "drop_file_reference",
    "has_mapped",
    "has_mapped_external",
    "is_mapped",
    "is_view",
    "load_mapped",
    "map_external_data",
    "map_inline_payloads",
    "view_header",
    "mapped_files",
    "mapped_array",
    "mapped_bytes",
    "release_pages",
    "write_external",
]

#: External tensors below this many bytes are read into the model when it is mapped.
INLINE_BYTES = 1 << 16
#: Tensors of at least this many bytes go to the data file (onnx.save's default threshold).
EXTERNAL_THRESHOLD = 1024
_WRITE_CHUNK = 16 << 20

BytesLike = bytes | bytearray | memoryview
Override = BytesLike | np.ndarray | Callable[[], Any]


def is_external(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor``'s bytes live in an external file (as :func:`onnxlady._io._tensors.is_external`)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _dtype(tensor: onnx.TensorProto) -> np.dtype[Any]:
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        raise OnnxladyError(f"tensor '{tensor.name}' holds strings or no type: it cannot be mapped")
    if tensor.data_type in _PACKED:
        raise OnnxladyError(f"tensor '{tensor.name}' packs several values per byte: it cannot be mapped")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


_PACKED = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
)


def _nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of the tensor's data from its shape and type (None when unknown: strings, packed)."""
    try:
        itemsize = _dtype(tensor).itemsize
    except (OnnxladyError, KeyError, TypeError, ValueError):
        return None
    return math.prod(int(d) for d in tensor.dims) * itemsize


def is_mapped(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is an external tensor :func:`map_external_data` left in its file."""
    return is_external(tensor) and os.path.isabs(_info(tensor).get("location", ""))


def has_mapped(model: onnx.ModelProto, tensors: Sequence[onnx.TensorProto] | None = None) -> bool:
    """Whether any tensor of ``model`` (``tensors``: its :func:`model_tensors`, when listed already) is still in its file.

    See :func:`map_external_data`.
    """
    external = onnx.TensorProto.EXTERNAL  # (asked of every tensor: only an external one is looked at further)
    listed = model_tensors(model) if tensors is None else tensors
    return any(is_mapped(tensor) for tensor in listed if tensor.data_location == external)


def is_view(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is mapped from the ``.onnx`` file it was inline in (:func:`map_inline_payloads`)."""
    return is_external(tensor) and any(entry.key == _VIEW_KEY for entry in tensor.external_data)


def has_mapped_external(model: onnx.ModelProto, tensors: Sequence[onnx.TensorProto] | None = None) -> bool:
    """Whether any tensor of ``model`` is still in an external data file (mapped, not a view).

    ``tensors``: the model's :func:`model_tensors`, when listed already.
    """
    external = onnx.TensorProto.EXTERNAL
    listed = model_tensors(model) if tensors is None else tensors
    return any(is_mapped(tensor) and not is_view(tensor) for tensor in listed if tensor.data_location == external)


def model_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of ``model``, in the order of ``onnx.external_data_helper._get_all_tensors``.

    The same walk as a list: onnx's nested generators resume once per tensor and visit every
    node's attributes twice (a tenth of a second at 50,000 nodes); here a graph's nodes are
    read once and only those with attributes are visited.
    """
    graph_type, graphs_type = onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS

    def attributed(graph: onnx.GraphProto | onnx.FunctionProto) -> list[onnx.AttributeProto]:
        return [attribute for node in graph.node if len(node.attribute) for attribute in node.attribute]

    def subgraphs(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
        kind = attribute.type
        return [attribute.g] if kind == graph_type else list(attribute.graphs) if kind == graphs_type else []

    def initializers(
        graph: onnx.GraphProto, found: list[onnx.TensorProto], attributes: list[onnx.AttributeProto] | None = None
    ) -> None:
        found.extend(graph.initializer)
        for attribute in attributed(graph) if attributes is None else attributes:
            for subgraph in subgraphs(attribute):
                initializers(subgraph, found)

    def attribute_tensors(
        graph: onnx.GraphProto | onnx.FunctionProto,
        found: list[onnx.TensorProto],
        attributes: list[onnx.AttributeProto] | None = None,
    ) -> None:
        for attribute in attributed(graph) if attributes is None else attributes:
            if attribute.HasField("t"):
                found.append(attribute.t)
            found.extend(attribute.tensors)
            for subgraph in subgraphs(attribute):
                attribute_tensors(subgraph, found)

    found: list[onnx.TensorProto] = []
    main = attributed(model.graph)  # the main graph's nodes read once, for both walks
    initializers(model.graph, found, main)
    attribute_tensors(model.graph, found, main)
    for function in model.functions:
        attribute_tensors(function, found)
    return found


def mapped_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of a mapped tensor as a read-only memory map of its file (no copy).

    Raises:
        OnnxladyError: the tensor is not mapped, holds strings or packed values, or its file is
            shorter than its shape says.
    """
    if not is_mapped(tensor):
        raise OnnxladyError(f"tensor '{tensor.name}' is not a mapped external tensor")
    dtype = _dtype(tensor)
    dims = tuple(int(d) for d in tensor.dims)
    count = math.prod(dims)
    if count == 0:
        return np.zeros(dims, dtype=dtype)
    info = _info(tensor)
    offset = int(info.get("offset", "0"))
    view = info.get(_VIEW_KEY)
    source: Any = _view_handle(view) if view is not None else info["location"]
    values = np.memmap(source, dtype=dtype, mode="r", offset=offset, shape=(count,))
    return values.reshape(dims)


def release_pages(array: object) -> None:
    """Take the pages of the file map under ``array`` (if any) out of this process's memory.

    A read-only map keeps every page it touched resident until it is unmapped: a reader that
    holds a map for later (resync across conversions reads each weight for the signatures, then
    for the solver) would otherwise hold each model's whole file. ``MADV_DONTNEED`` on a shared,
    read-only file map only unmaps its pages: the next touch maps them again from the page cache,
    with the same bytes. Anything that is not a view of a read-only file map is left alone (a
    copy-on-write map would lose what was written into it).
    """
    while array is not None and not isinstance(array, mmap.mmap):
        array = getattr(array, "base", None)
    if not isinstance(array, mmap.mmap) or array.closed or not hasattr(mmap, "MADV_DONTNEED"):  # (not on Windows)
        return
    with memoryview(array) as view:
        if not view.readonly:
            return
    array.madvise(mmap.MADV_DONTNEED)


def mapped_bytes(tensor: onnx.TensorProto) -> memoryview:
    """The raw bytes of a mapped tensor, as a read-only view of its file."""
    return np.ascontiguousarray(mapped_array(tensor)).reshape(-1).view(np.uint8).data


def view_header(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of a view (:func:`is_view`) as the file holds it, without its ``raw_data``.

    Every field but the data, unknown fields included, with the file reference dropped and the
    tensor's own ``data_location`` back: what goes around the bytes when it is written inline.
    """
    header = onnx.TensorProto()
    header.CopyFrom(tensor)  # no raw_data to copy: a view's bytes are in the file
    drop_file_reference(header)
    return header


def drop_file_reference(tensor: onnx.TensorProto) -> None:
    """Forget where a mapped tensor's bytes are (its new bytes are being put in the model).

    A view gets its own ``data_location`` back (set or absent, as in its file); any other
    tensor has the field cleared.
    """
    original = _info(tensor).get(_LOCATION_KEY) if is_view(tensor) else None
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    if original:  # a view is made only of an inline tensor: DEFAULT is all it can have had
        tensor.data_location = onnx.TensorProto.DEFAULT


def mapped_files(model: onnx.ModelProto) -> set[Path]:
    """The data files (resolved) that ``model``'s mapped tensors are read from."""
    return {
        Path(_info(tensor)["location"]).resolve()
        for tensor in onnx.external_data_helper._get_all_tensors(model)
        if is_mapped(tensor)
    }


def load_mapped(model: onnx.ModelProto) -> onnx.ModelProto:
    """Read every tensor of ``model`` still in its file (:func:`is_mapped`) into the model, in place.

    For a model about to be handed to code that changes tensors in place or to a caller (an
    absolute ``location`` must never reach a file written by ``onnx.save``).

    Returns:
        ``model`` itself.
    """
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        _read_in(tensor)
    return model


def _read_in(tensor: onnx.TensorProto) -> None:
    """A mapped tensor's bytes copied into its ``raw_data``, its file reference dropped."""
    if is_mapped(tensor):
        raw = bytes(mapped_bytes(tensor))
        drop_file_reference(tensor)
        tensor.raw_data = raw


def map_external_data(
    model: onnx.ModelProto, path: str | os.PathLike[str], targets: Mapping[str, Path], *, as_loaded: bool = False
) -> None:
    """Leave ``model``'s large external tensors in their files (see the module docstring).

    Args:
        model: a model loaded without its external data (changed in place).
        path: the model file (for messages).
        targets: each external tensor's data file by tensor name, already checked to be a
            regular file inside the model's folder.
        as_loaded: a tensor read in keeps ``data_location`` set to ``DEFAULT``, as
            ``onnx.load`` leaves it (a model written from it is then byte for byte what the
            loaded one gives); otherwise the field is cleared.

    The names of the tensors read in are remembered by data file, so that
    :func:`write_external` puts them back in the data file whatever their size.

    Raises:
        OnnxladyError: a tensor's data lies beyond the end of its file, or its length does not
            match its shape.
    """
    read_in: dict[str, set[str]] = {_file_key(target): set() for target in targets.values()}
    for tensor in _main_tensors(model):
        if is_external(tensor):
            target = targets[tensor.name]
            if not _map_or_read(tensor, path, target, subgraph=False, as_loaded=as_loaded) and tensor.name:
                read_in[_file_key(target)].add(tensor.name)
    for node in model.graph.node:
        for tensor in _subgraph_tensors(node):
            if is_external(tensor):
                _map_or_read(tensor, path, targets[tensor.name], subgraph=True, as_loaded=as_loaded)
    _READ_IN.update(read_in)


#: By data file (resolved path): the names of the main-graph tensors :func:`map_external_data`
#: read in from it (external in their file, though no longer mapped). A few names per file read.
_READ_IN: dict[str, set[str]] = {}


def _file_key(target: str | os.PathLike[str]) -> str:
    return str(Path(target).resolve())


def _read_in_names(model: onnx.ModelProto) -> set[str]:
    """The tensors of ``model`` read in from the data files it still maps (external in the file it came from)."""
    files = {
        _file_key(_info(tensor)["location"])
        for tensor in onnx.external_data_helper._get_all_tensors(model)
        if is_mapped(tensor) and not is_view(tensor)
    }
    return set().union(*(_READ_IN.get(file, set()) for file in files))


# -- views of inline files --------------------------------------------------------------------
#: external_data keys of a view: the load it comes from, and its own data_location ("" if unset).
_VIEW_KEY = "onnxlady-view"
_LOCATION_KEY = "onnxlady-data-location"
#: Views keep at most this many files open; an older one is reopened by path when used, and
#: refused if the file there is no longer the one it was read from.
_OPEN_VIEWS = 64


@dataclass
class _ViewSource:
    """The file a load's views read: its path, identity, and the handle opened when loading."""

    path: str
    identity: tuple[int, int, int, int]  # device, inode, size, modification time (ns)
    handle: Any | None


_VIEWS: OrderedDict[str, _ViewSource] = OrderedDict()
_VIEWS_LOCK = threading.Lock()
_VIEW_IDS = itertools.count()


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _view_handle(view: str) -> Any:
    """The open file a view reads (reopened by path when it was closed, if the file is unchanged)."""
    with _VIEWS_LOCK:
        source = _VIEWS.get(view)
        if source is None:
            raise OnnxladyError(f"internal: no file is known for view {view!r}")
        _VIEWS.move_to_end(view)
        if source.handle is None:
            handle = open(source.path, "rb")  # ruff: ignore[open-file-with-context-handler] - kept open for the views
            if _identity(os.fstat(handle.fileno())) != source.identity:
                handle.close()
                raise OnnxladyError(
                    f"{source.path}: the file changed since the model was read from it; its weights "
                    "cannot be read any more (load the model again)"
                )
            source.handle = handle
            _close_old_views()
        return source.handle


def _close_old_views() -> None:
    """Close the least recently used handles beyond :data:`_OPEN_VIEWS` (under the lock)."""
    open_views = [source for source in _VIEWS.values() if source.handle is not None]
    for source in open_views[: max(0, len(open_views) - _OPEN_VIEWS)]:
        if source.handle is not None:
            source.handle.close()
            source.handle = None


def map_inline_payloads(
    model: onnx.ModelProto, path: str | os.PathLike[str], handle: Any, payloads: Sequence[Payload]
) -> bool:
    """Make the initializers whose ``raw_data`` was left in the file views of it (see the module docstring).

    Args:
        model: the model :func:`onnxlady._io._skim.read_without_payloads` read (changed in place).
        path: the ``.onnx`` file.
        handle: a binary file object open on it, the one the model was read from: kept open
            for the views (closed here when none is made).
        payloads: where each left-out ``raw_data`` is.

    A tensor that cannot be mapped (strings, packed values, bytes that do not match its shape)
    gets its bytes read in, as a full load would hold it (a size mismatch is then reported by
    the loader's own check).

    Returns:
        True when at least one view was made.
    """
    stat = os.fstat(handle.fileno())
    location = str(Path(path).resolve())
    view = f"{next(_VIEW_IDS)}"
    made = False
    for payload in payloads:
        tensor = _payload_tensor(model, payload)
        if _nbytes(tensor) != payload.length or payload.offset + payload.length > stat.st_size:
            tensor.raw_data = os.pread(handle.fileno(), payload.length, payload.offset)
            continue
        original = str(tensor.data_location) if tensor.HasField("data_location") else ""
        _set_external(tensor, location, payload.offset, payload.length)
        for key, value in ((_VIEW_KEY, view), (_LOCATION_KEY, original)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        made = True
    if not made:
        handle.close()
        return False
    with _VIEWS_LOCK:
        _VIEWS[view] = _ViewSource(location, _identity(stat), handle)
        _close_old_views()
    return True


def read_payloads_in(model: onnx.ModelProto, handle: Any, payloads: Sequence[Payload]) -> None:
    """Read the left-out ``raw_data`` into the model (a full load's model), then close ``handle``."""
    try:
        for payload in payloads:
            _payload_tensor(model, payload).raw_data = os.pread(handle.fileno(), payload.length, payload.offset)
    finally:
        handle.close()


def _payload_tensor(model: onnx.ModelProto, payload: Payload) -> onnx.TensorProto:
    """The main-graph tensor (initializer or Constant value) whose bytes ``payload`` locates."""
    if payload.initializer >= 0:
        return model.graph.initializer[payload.initializer]
    return model.graph.node[payload.node].attribute[payload.attribute].t


def _map_or_read(
    tensor: onnx.TensorProto, path: str | os.PathLike[str], target: Path, *, subgraph: bool, as_loaded: bool = False
) -> bool:
    """Point ``tensor`` at its data file by absolute path, or read it in (small, unmappable, in a subgraph).

    Returns:
        True when the tensor was mapped, False when it was read in.
    """
    info = _info(tensor)
    offset = int(info.get("offset", "0"))
    size = os.stat(target).st_size
    expected = _nbytes(tensor)
    length = int(info["length"]) if "length" in info else (expected if expected is not None else size - offset)
    if expected is not None and length != expected:
        raise OnnxladyError(f"{path}: tensor '{tensor.name}' has {length} bytes of external data, its shape needs {expected}")
    if offset + length > size:
        raise OnnxladyError(f"{path}: tensor '{tensor.name}' lies beyond the end of {target.name} (truncated file)")
    if length < INLINE_BYTES or expected is None or subgraph:
        with open(target, "rb") as handle:
            handle.seek(offset)
            raw = handle.read(length)
        del tensor.external_data[:]
        if as_loaded:
            tensor.data_location = onnx.TensorProto.DEFAULT
        else:
            tensor.ClearField("data_location")
        tensor.raw_data = raw
        return False
    _set_external(tensor, str(target), offset, length)
    return True


def _subgraph_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    """Every tensor inside the subgraphs a node holds (at any depth)."""
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.HasField("g") else []
        for graph in [*graphs, *attribute.graphs]:
            yield from graph.initializer
            for inner in graph.node:
                yield from _node_tensors(inner)


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _main_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The main graph's initializers and Constant node values."""
    yield from model.graph.initializer
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    yield attribute.t


# -- writing ----------------------------------------------------------------------------------
class _DataFile:
    """The data file being written: appends tensors' bytes and says where each one went."""

    def __init__(self, handle: Any, location: str) -> None:
        self.handle = handle
        self.location = location
        self.offset = 0

    def append(self, data: Any) -> tuple[int, int]:
        view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else None
        if view is None:
            view = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        start = self.offset
        # Written in chunks: a memory-mapped source is read (and its pages released) piece by piece.
        for position in range(0, len(view), _WRITE_CHUNK):
            self.handle.write(view[position : position + _WRITE_CHUNK])
        self.offset += len(view)
        return start, len(view)


def _tensor_data(tensor: onnx.TensorProto, override: Override | None) -> Any:
    """The bytes (or array) to store for ``tensor``: its override, its own data, or its mapped file."""
    if override is not None:
        return override() if callable(override) else override
    if is_mapped(tensor):
        return mapped_array(tensor)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor)  # typed fields (float_data...): stored raw


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).tobytes()
    return bytes(memoryview(data).cast("B"))


def _header(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of ``tensor`` without its data (nor any external data reference)."""
    header = onnx.TensorProto()
    for descriptor in tensor.DESCRIPTOR.fields:
        name = descriptor.name
        if name in _DATA_FIELDS:
            continue
        if _repeated(descriptor):
            values = getattr(tensor, name)
            if len(values):
                getattr(header, name).extend(values)
        elif tensor.HasField(name):
            if descriptor.message_type is not None:
                getattr(header, name).CopyFrom(getattr(tensor, name))
            else:
                setattr(header, name, getattr(tensor, name))
    return header


_DATA_FIELDS = frozenset(
    {"raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data",
     "external_data", "data_location"}
)  # fmt: skip


def _stored(
    tensor: onnx.TensorProto, override: Override | None, data: _DataFile, read_in: set[str] | None = None
) -> onnx.TensorProto:
    """The tensor as the written model holds it: a header pointing into the data file, or inline.

    ``read_in`` is given for a model read from a file with external data (its large tensors
    left mapped): each tensor goes back where that file kept it. Mapped ones and those read in
    (named in ``read_in``) go to the data file whatever their size; the others, inline in that
    file, stay inline (a Constant's value ``onnx.save`` never moves out, an initializer below the
    threshold the file was saved with). Otherwise tensors from :data:`EXTERNAL_THRESHOLD` bytes
    go to the data file.
    """
    size = _nbytes(tensor)
    if tensor.data_type == onnx.TensorProto.STRING or size is None:
        if override is not None or is_mapped(tensor):
            raise OnnxladyError(f"tensor '{tensor.name}' cannot be written with external data (strings or packed)")
        return tensor  # kept as it is (onnx.save keeps strings inline too)
    external = (is_mapped(tensor) or tensor.name in read_in) if read_in is not None else size >= EXTERNAL_THRESHOLD
    if not external and read_in is not None:  # inline in the file the model was read from
        if override is None:
            return tensor
        inline = _header(tensor)
        inline.raw_data = _as_bytes(_tensor_data(tensor, override))
        if tensor.HasField("data_location"):
            inline.data_location = tensor.data_location
        return inline
    if not external:
        if override is None and not is_mapped(tensor):
            return tensor
        small = _header(tensor)
        small.raw_data = _as_bytes(_tensor_data(tensor, override))
        if tensor.HasField("data_location") and not is_mapped(tensor):  # DEFAULT, as onnx.load marks it: kept
            small.data_location = tensor.data_location
        return small
    header = _header(tensor)
    offset, length = data.append(_tensor_data(tensor, override))
    if length != size:
        raise OnnxladyError(f"tensor '{tensor.name}': {length} bytes to write, its shape and type say {size}")
    _set_external(header, data.location, offset, length)
    return header


def _inline_subgraph_tensors(node: onnx.NodeProto) -> onnx.NodeProto:
    """``node``, or a copy whose subgraphs hold their mapped tensors' bytes inline."""
    if not any(is_mapped(tensor) for tensor in _node_tensors(node)):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for tensor in _node_tensors(copy):
        _read_in(tensor)
    return copy


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a node holds in its attributes, subgraphs included (the protos themselves)."""
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        graphs = [attribute.g] if attribute.HasField("g") else []
        for graph in [*graphs, *attribute.graphs]:
            yield from graph.initializer
            for inner in graph.node:
                yield from _node_tensors(inner)


def write_external(
    model: onnx.ModelProto,
    path: Path,
    data_path: Path,
    overrides: Mapping[str, Override] | None = None,
    *,
    location: str | None = None,
    digest: bool = False,
) -> str:
    """Write ``model`` to ``path`` with its weights in ``data_path``, one tensor at a time.

    Args:
        model: the model (not changed); its tensors may be mapped (:func:`map_external_data`).
        path: the model file to write.
        data_path: the data file to write.
        overrides: main-graph tensor names mapped to their new data (bytes, a C-contiguous
            array, or a callable returning either, called when that tensor is written).
        location: the data file's name as the model names it (default ``data_path.name``).
        digest: return the sha256 of the model file.

    Returns:
        The model file's sha256 when ``digest``, else ``""``.

    Raises:
        OnnxladyError: a tensor's data does not match its shape, or strings would have to be
            stored externally.
        OSError: a file cannot be written.
    """
    overrides = overrides or {}
    # Read from a file with external data: each tensor goes back where that file kept it.
    read_in = _read_in_names(model) if has_mapped_external(model) else None
    shell = onnx.ModelProto()
    for descriptor in model.DESCRIPTOR.fields:
        if descriptor.name != "graph":
            _copy_field(model, shell, descriptor)
    graph = model.graph
    for descriptor in graph.DESCRIPTOR.fields:
        if descriptor.name not in ("initializer", "node"):
            _copy_field(graph, shell.graph, descriptor)
    with open(data_path, "wb") as handle:
        data = _DataFile(handle, location or data_path.name)
        # Initializers first, then Constant values: the order onnx.save writes the data file in.
        for tensor in graph.initializer:
            shell.graph.initializer.append(_stored(tensor, overrides.get(tensor.name), data, read_in))
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                copy = onnx.NodeProto()
                for descriptor in node.DESCRIPTOR.fields:
                    if descriptor.name != "attribute":
                        _copy_field(node, copy, descriptor)
                for attribute in node.attribute:
                    if attribute.name == "value" and attribute.HasField("t"):
                        value = onnx.AttributeProto()
                        for descriptor in attribute.DESCRIPTOR.fields:
                            if descriptor.name != "t":
                                _copy_field(attribute, value, descriptor)
                        value.t.CopyFrom(_stored(attribute.t, overrides.get(node.output[0]), data, read_in))
                        copy.attribute.append(value)
                    else:
                        copy.attribute.append(attribute)
                shell.graph.node.append(copy)
            else:
                shell.graph.node.append(_inline_subgraph_tensors(node))
        handle.flush()
        os.fsync(handle.fileno())
    encoded = shell.SerializeToString()
    with open(path, "wb") as handle:
        handle.write(encoded)
        handle.flush()
        os.fsync(handle.fileno())
    return hashlib.sha256(encoded).hexdigest() if digest else ""


def _copy_field(source: Any, target: Any, descriptor: Any) -> None:
    name = descriptor.name
    if _repeated(descriptor):
        values = getattr(source, name)
        if len(values):
            getattr(target, name).extend(values)
    elif source.HasField(name):
        if descriptor.message_type is not None:
            getattr(target, name).CopyFrom(getattr(source, name))
        else:
            setattr(target, name, getattr(source, name))


def _repeated(descriptor: Any) -> bool:
    # protobuf 5+ has is_repeated; older versions only the label (3: LABEL_REPEATED).
    return bool(descriptor.is_repeated) if hasattr(descriptor, "is_repeated") else descriptor.label == 3
