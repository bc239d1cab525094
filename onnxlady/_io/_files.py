"""Loading and saving models safely.

Loading resolves external data against the model's own folder (whatever the working
directory), checks that every initializer holds as many bytes as its shape says (a truncated
file is reported, not half-used) and hashes the file. Saving keeps the input's ``ir_version``
and opsets, writes through a temporary file in the target folder and renames it into place,
so a failure never leaves a partial output; models over 2 GB, or loaded from external data,
are saved with external data next to the model.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxlady._errors import OnnxladyError
from onnxlady._io._stream import Override, read_model, write_model
from onnxlady._io._tensors import is_external, tensor_holders

_PROTOBUF_LIMIT = 2**31 - 1
#: Leave room under protobuf's 2 GB limit for the graph itself.
_EXTERNAL_DATA_THRESHOLD = 1_900_000_000


@dataclass
class LoadedModel:
    """A model and what is known about the file it came from."""

    model: onnx.ModelProto
    path: Path
    sha256: str
    size_bytes: int
    external_data: bool
    external_files: tuple[Path, ...] = ()  # the data files its tensors were read from


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Load an ONNX file with its external data, resolved against the model's own folder.

    Args:
        path: the ``.onnx`` file.

    Returns:
        The model with the file's sha256 and size, and the external data files it was read from.

    Raises:
        OnnxladyError: the file is missing, a folder, not an ONNX model, truncated, or points
            to external data outside its folder or missing.
    """
    path = Path(path)
    if not path.exists():
        raise OnnxladyError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxladyError(f"{path}: is a folder, not an ONNX file")
    # Parse in pieces (never the whole file and the model at once) while a second thread hashes
    # the file: hashlib releases the GIL on large buffers.
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(file_sha256, path)
        try:
            model = read_model(path, load_external_data=False)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise OnnxladyError(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from exc
        except OSError as exc:
            raise OnnxladyError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        try:
            digest = hashing.result()
        except OSError as exc:
            raise OnnxladyError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not model.graph.node and not model.graph.output:
        raise OnnxladyError(f"{path}: not an ONNX model (no graph)")
    if not model.opset_import:
        raise OnnxladyError(f"{path}: not an ONNX model (no opset import)")
    _check_opsets(model, path)
    external = _uses_external_data(model)
    files = _load_external_data(model, path) if external else ()
    _check_tensor_sizes(model, path)
    return LoadedModel(model, path, digest, path.stat().st_size, external, files)


def _check_opsets(model: onnx.ModelProto, path: Path) -> None:
    """Every operator domain needs an opset import; a missing one means a damaged file."""
    imported = {op.domain or "" for op in model.opset_import}
    imported |= {"ai.onnx"} if "" in imported else set()
    local = {(f.domain, f.name) for f in model.functions}

    def check(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if (node.domain or "") not in imported and (node.domain, node.op_type) not in local:
                raise OnnxladyError(
                    f"{path}: operator {node.domain}::{node.op_type} has no opset import (truncated or corrupt file)"
                )
            for attribute in node.attribute:
                for subgraph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs):
                    check(subgraph)

    check(model.graph)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model``, so that a caller can change it and leave the original as it was.

    Args:
        model: the model to copy (not changed).

    Returns:
        A new ``ModelProto`` equal to ``model`` that shares nothing with it.
    """
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in onnx.external_data_helper._get_all_tensors(model))


def _load_external_data(model: onnx.ModelProto, path: Path) -> tuple[Path, ...]:
    base = path.resolve().parent
    files: set[Path] = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not is_external(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or (base not in target.parents and target != base):
            raise OnnxladyError(f"{path}: tensor '{tensor.name}' points outside the model folder ({location!r})")
        if not target.is_file():
            raise OnnxladyError(
                f"{path}: external data file '{location}' for tensor '{tensor.name}' not found in {base}"
            )
        files.add(target)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError) as exc:
        raise OnnxladyError(f"{path}: cannot read external data ({exc})") from exc
    return tuple(sorted(files))


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """A tensor whose raw bytes disagree with its shape means a truncated or corrupt file."""
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not tensor.HasField("raw_data"):
            continue
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            expected = (count + 1) // 2
        else:
            expected = count * itemsize
        if tensor.data_type != onnx.TensorProto.STRING and len(tensor.raw_data) != expected:
            raise OnnxladyError(
                f"{path}: tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes, its shape "
                f"{list(tensor.dims)} needs {expected} (truncated or corrupt file)"
            )


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool = False,
    digest: bool = False,
    overrides: Mapping[str, Override] | None = None,
) -> str:
    """Write ``model`` atomically to ``path`` (a temporary file beside it, then a rename).

    Args:
        model: the model to write (not changed).
        path: the file to write.
        external_data: write the weights to ``<name>.data`` beside the model (always so when
            the model exceeds protobuf's 2 GB limit).
        digest: compute the sha256 of the written model file.
        overrides: tensor names mapped to their new ``raw_data`` (or to functions computing it,
            called as each tensor is written): the file is streamed without ever holding its
            whole encoding, and the model in memory is not changed.

    Returns:
        The sha256 of the model file when ``digest``, else ``""``.

    Raises:
        OnnxladyError: the folder does not exist, the path is a folder, or the file cannot be
            written (nothing is left behind).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxladyError(f"{path}: output folder '{folder}' does not exist")
    if path.is_dir():
        raise OnnxladyError(f"{path}: is a folder")
    if not external_data and _estimated_size(model) > _EXTERNAL_DATA_THRESHOLD:
        external_data = True
    if not external_data and overrides:
        return _stream_atomically(model, path, overrides, digest)
    if not external_data:
        # Protobuf's own encoding: a model that round-trips comes back as the same bytes.
        data = model.SerializeToString()
        write_atomically(path, data)
        return hashlib.sha256(data).hexdigest() if digest else ""
    if overrides:
        _apply_overrides(model, overrides)
    return _save_with_external_data(model, path, digest)


class _HashingWriter:
    """A file wrapper that hashes what passes through it."""

    def __init__(self, handle: Any, digest: bool) -> None:
        self._handle = handle
        self._digest = hashlib.sha256() if digest else None
        # Hash beside the writer: hashlib releases the GIL, and one worker keeps the order.
        self._pool = ThreadPoolExecutor(max_workers=1) if digest else None

    def write(self, data: Any) -> int:
        if self._pool is not None and self._digest is not None:
            self._pool.submit(self._digest.update, data)
        return self._handle.write(data)

    def hexdigest(self) -> str:
        if self._pool is None or self._digest is None:
            return ""
        self._pool.shutdown(wait=True)
        return self._digest.hexdigest()


def _stream_atomically(model: onnx.ModelProto, path: Path, overrides: Mapping[str, Override], digest: bool) -> str:
    temporary = None
    try:
        fd, temporary = _temporary_file(path)
        with os.fdopen(fd, "wb") as handle:
            writer = _HashingWriter(handle, digest)
            write_model(model, writer, overrides=overrides)
        # The rename is atomic: readers see the old file or the whole new one, never a part.
        os.replace(temporary, path)
        return writer.hexdigest()
    except OSError as exc:
        raise OnnxladyError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if temporary and os.path.exists(temporary):
            os.unlink(temporary)


def _apply_overrides(model: onnx.ModelProto, overrides: Mapping[str, Override]) -> None:
    """Write deferred tensor bytes into the model (for the external-data path)."""
    holders = tensor_holders(model)
    for name, value in overrides.items():
        data = value() if callable(value) else value
        holders[name].raw_data = bytes(memoryview(data).cast("B"))


def _estimated_size(model: onnx.ModelProto) -> int:
    """Bytes of tensor data, from shapes alone (``ByteSize`` walks every byte and is slow)."""
    total = 0
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 8
        total += (int(np.prod(tensor.dims)) if len(tensor.dims) else 1) * itemsize
    return total


def _temporary_file(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` with the permissions a plain ``open`` would give.

    ``mkstemp`` creates files readable by their owner only; the output must not be.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, temporary


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    temporary = None
    try:
        fd, temporary = _temporary_file(path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # The rename is atomic: readers see the old file or the whole new one, never a part.
        os.replace(temporary, path)
    except OSError as exc:
        raise OnnxladyError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if temporary and os.path.exists(temporary):
            os.unlink(temporary)


def _save_with_external_data(model: onnx.ModelProto, path: Path, digest: bool) -> str:
    data_name = f"{path.name}.data"
    target_data = path.parent / data_name
    try:
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        raise OnnxladyError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    moved_data = False
    try:
        staged = staging / path.name
        tensors = list(onnx.external_data_helper._get_all_tensors(model))
        layout = [(t.HasField("data_location"), t.data_location, list(t.external_data)) for t in tensors]
        onnx.save_model(
            model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_name, size_threshold=1024,
        )  # fmt: skip
        # save_model moved the weights out of the caller's model: read them back in, as they were.
        onnx.external_data_helper.load_external_data_for_model(model, str(staging))
        for tensor, (had_location, location, entries) in zip(tensors, layout):
            tensor.ClearField("data_location")
            if had_location:
                tensor.data_location = location
            del tensor.external_data[:]
            tensor.external_data.extend(entries)
        sha = file_sha256(staged) if digest else ""
        if (staging / data_name).exists():
            os.replace(staging / data_name, target_data)
            moved_data = True
        os.replace(staged, path)
        return sha
    except OSError as exc:
        if moved_data and not path.exists():
            target_data.unlink(missing_ok=True)
        raise OnnxladyError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, hashed from a memory map (no copy through read buffers)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()
