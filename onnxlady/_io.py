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
import os
from concurrent.futures import ThreadPoolExecutor
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxlady._errors import OnnxladyError

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


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Load an ONNX file with its external data; bad input raises :class:`OnnxladyError`."""
    path = Path(path)
    if not path.exists():
        raise OnnxladyError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxladyError(f"{path}: is a folder, not an ONNX file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OnnxladyError(f"{path}: cannot read ({exc.strerror})") from exc
    # Hash beside the parse: hashlib releases the GIL on large buffers.
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise OnnxladyError(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from exc
        digest = hashing.result()
    del data
    if not model.graph.node and not model.graph.output:
        raise OnnxladyError(f"{path}: not an ONNX model (no graph)")
    if not model.opset_import:
        raise OnnxladyError(f"{path}: not an ONNX model (no opset import)")
    _check_opsets(model, path)
    external = _uses_external_data(model)
    if external:
        _load_external_data(model, path)
    _check_tensor_sizes(model, path)
    return LoadedModel(model, path, digest, path.stat().st_size, external)


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


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model)
    )


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base = path.resolve().parent
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or base not in target.parents and target != base:
            raise OnnxladyError(f"{path}: tensor '{tensor.name}' points outside the model folder ({location!r})")
        if not target.is_file():
            raise OnnxladyError(
                f"{path}: external data file '{location}' for tensor '{tensor.name}' not found in {base}"
            )
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError) as exc:
        raise OnnxladyError(f"{path}: cannot read external data ({exc})") from exc


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
    model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool = False, digest: bool = False
) -> str:
    """Write ``model`` atomically to ``path``; returns the sha256 of the model file if ``digest``.

    With ``external_data`` (or when the model exceeds protobuf's 2 GB limit) the weights go to
    ``<name>.data`` beside the model.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxladyError(f"{path}: output folder '{folder}' does not exist")
    if path.is_dir():
        raise OnnxladyError(f"{path}: is a folder")
    if not external_data and _estimated_size(model) > _EXTERNAL_DATA_THRESHOLD:
        external_data = True
    if not external_data:
        data = model.SerializeToString()
        _atomic_write(path, data)
        return hashlib.sha256(data).hexdigest() if digest else ""
    return _save_with_external_data(model, path, digest)


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


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
