"""Loading and saving models safely.

Loading resolves external data against the model's own folder (whatever the working
directory), checks that every initializer holds as many bytes as its shape says (a truncated
file is reported, not half-used) and hashes the file. Loading refuses anything but a regular
file (a FIFO would block) and checks the model's structure (:mod:`onnxlady._io._validate`).
Saving keeps the input's ``ir_version`` and opsets and goes through an output set
(:mod:`onnxlady._io._outputs`): staged beside the target and renamed into place, so a failure
never leaves a partial output; models over 2 GB, or loaded from external data, are saved with
external data next to the model.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxlady._errors import OnnxladyError
from onnxlady._io._collector import collector_paused
from onnxlady._io._external import INLINE_BYTES, map_external_data, map_inline_payloads, model_tensors, read_payloads_in
from onnxlady._io._inputs import require_regular_file
from onnxlady._io._node_table import NodeTable
from onnxlady._io._outputs import OutputSet
from onnxlady._io._skim import Payload, read_without_payloads
from onnxlady._io._stream import Override, read_model
from onnxlady._io._tensors import is_external
from onnxlady._io._validate import external_data_target, validate_model


@dataclass
class LoadedModel:
    """A model and what is known about the file it came from."""

    model: onnx.ModelProto
    path: Path
    sha256: str | None  # None when loaded without its digest
    size_bytes: int
    external_data: bool
    external_files: tuple[Path, ...] = ()  # the data files its tensors were read from
    #: The main graph's nodes as the check read them (asked for with ``node_table``), for the
    #: graph built next (see :mod:`onnxlady._io._node_table`).
    nodes: NodeTable | None = None


@collector_paused  # a few containers per node, none of them garbage until it is read
def load_model(
    path: str | os.PathLike[str],
    *,
    map_external: bool = False,
    as_loaded: bool = False,
    map_inline: bool = True,
    digest: bool = True,
    node_table: bool = False,
) -> LoadedModel:
    """Load an ONNX file with its external data, resolved against the model's own folder.

    Args:
        path: the ``.onnx`` file.
        map_external: leave large external tensors in their files, read as memory maps when
            used (:func:`onnxlady._io._external.map_external_data`): memory then does not grow
            with the model. Only for callers that write such tensors through
            :meth:`OutputSet.write_model` (they cannot be changed in place).
        as_loaded: with ``map_external``, the tensors read in keep the fields ``onnx.load``
            gives them (see :func:`onnxlady._io._external.map_external_data`).
        map_inline: with ``map_external``, the large weights of a model without external data
            are left in the ``.onnx`` file the same way, as views of it
            (:func:`onnxlady._io._external.map_inline_payloads`): neither parsed nor copied.
        digest: hash the file (its sha256). A caller that records no sha256 (a resync writing
            no key, a match) passes False: hashing reads every byte of the file once more.
        node_table: keep the main graph's nodes as the check read them
            (:attr:`LoadedModel.nodes`), for a caller that builds its graph next.

    Returns:
        The model with the file's sha256 (``None`` without ``digest``) and size, and the
        external data files it was read from.

    Raises:
        OnnxladyError: the file is missing, a folder, not an ONNX model, truncated, or points
            to external data outside its folder or missing.
    """
    path = Path(path)
    # Checked before opening: a FIFO or a device would block the reader, or never end.
    info = require_regular_file(path, "ONNX file")
    # Parse in pieces (never the whole file and the model at once) while a second thread hashes
    # the file: hashlib releases the GIL on large buffers.
    with ThreadPoolExecutor(max_workers=1) as pool:  # (no thread starts without a digest)
        hashing = pool.submit(file_sha256, path) if digest else None
        viewed: _Viewed | None = None
        try:
            if map_external and map_inline and info.st_size >= INLINE_BYTES:
                viewed = _read_views(path)
            model = viewed.model if viewed is not None else read_model(path, load_external_data=False)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise OnnxladyError(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from exc
        except OSError as exc:
            raise OnnxladyError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        try:
            sha256 = hashing.result() if hashing is not None else None
        except OSError as exc:
            if viewed is not None:
                viewed.handle.close()
            raise OnnxladyError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        _check_model(model, path)
        # Every tensor, listed once: the size check below walks the same list for a model
        # without external data (inline views fill its tensors in place, never replace them).
        tensors = model_tensors(model)
        external = _uses_external_data(model, tensors)
    except BaseException:
        if viewed is not None:
            viewed.handle.close()
        raise
    if viewed is not None:
        if external:  # its weights are mapped from their data files: the inline ones read in, as before
            read_payloads_in(model, viewed.handle, viewed.payloads)
        else:
            map_inline_payloads(model, path, viewed.handle, viewed.payloads)
    targets = _external_targets(model, path) if external else ()
    capacity = info.st_size + sum(os.stat(target).st_size for target in set(targets))
    nodes = validate_model(model, str(path), capacity=capacity, node_table=node_table)
    if external and map_external:
        base = path.resolve().parent
        located = {
            tensor.name: external_data_target(tensor, base, str(path))
            for tensor in onnx.external_data_helper._get_all_tensors(model)
            if is_external(tensor)
        }
        map_external_data(model, path, located, as_loaded=as_loaded)
        files: tuple[Path, ...] = tuple(sorted(set(located.values())))
    else:
        files = _load_external_data(model, path) if external else ()
    _check_tensor_sizes(model, path, None if external else tensors)
    return LoadedModel(model, path, sha256, info.st_size, external, files, nodes)


@dataclass
class _Viewed:
    """A model read with its large inline payloads left in the file, and the file it was read from."""

    model: onnx.ModelProto
    handle: Any  # the open file (kept by the views, closed otherwise)
    payloads: list[Payload]


def _read_views(path: Path) -> _Viewed | None:
    """``path`` read by :func:`onnxlady._io._skim.read_without_payloads`; None when its walker gives up.

    A file the walker cannot read (truncated, damaged) is read again by :func:`read_model`,
    so that what is refused, and the message, are what a full load gives.

    Raises:
        OSError: the file cannot be opened or mapped.
    """
    handle = open(path, "rb")  # ruff: ignore[open-file-with-context-handler] - kept open by the views, or closed below
    try:
        model, payloads = read_without_payloads(handle.fileno(), INLINE_BYTES)
    except (DecodeError, ValueError, IndexError):
        handle.close()
        return None
    except BaseException:
        handle.close()
        raise
    return _Viewed(model, handle, payloads)


def _check_model(model: onnx.ModelProto, path: Path) -> None:
    """A parsed file with no graph, no opset import or an operator of no imported domain is not a model."""
    if not model.graph.node and not model.graph.output:
        raise OnnxladyError(f"{path}: not an ONNX model (no graph)")
    if not model.opset_import:
        raise OnnxladyError(f"{path}: not an ONNX model (no opset import)")
    _check_opsets(model, path)


def _check_opsets(model: onnx.ModelProto, path: Path) -> None:
    """Every operator domain needs an opset import; a missing one means a damaged file."""
    imported = {op.domain or "" for op in model.opset_import}
    imported |= {"ai.onnx"} if "" in imported else set()
    local = {(f.domain, f.name) for f in model.functions}

    def check(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain  # (each protobuf read makes a new string: read once)
            if (domain or "") not in imported and (domain, node.op_type) not in local:
                raise OnnxladyError(
                    f"{path}: operator {domain}::{node.op_type} has no opset import (truncated or corrupt file)"
                )
            if not len(node.attribute):
                continue  # (most nodes: no iterator made over no attributes)
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


def _uses_external_data(model: onnx.ModelProto, tensors: list[onnx.TensorProto] | None = None) -> bool:
    """Whether a tensor of ``model`` (``tensors``: its :func:`model_tensors`, when listed already) is external."""
    external = onnx.TensorProto.EXTERNAL  # (is_external, inlined: asked of every tensor)
    return any(tensor.data_location == external for tensor in (model_tensors(model) if tensors is None else tensors))


def _external_targets(model: onnx.ModelProto, path: Path) -> list[Path]:
    """The data files of the external tensors, each checked (inside the folder, a regular file)."""
    base = path.resolve().parent
    return [
        external_data_target(tensor, base, str(path))
        for tensor in onnx.external_data_helper._get_all_tensors(model)
        if is_external(tensor)
    ]


def _load_external_data(model: onnx.ModelProto, path: Path) -> tuple[Path, ...]:
    base = path.resolve().parent
    files = set(_external_targets(model, path))
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError) as exc:
        raise OnnxladyError(f"{path}: cannot read external data ({exc})") from exc
    return tuple(sorted(files))


def _check_tensor_sizes(model: onnx.ModelProto, path: Path, tensors: list[onnx.TensorProto] | None = None) -> None:
    """A tensor whose raw bytes disagree with its shape means a truncated or corrupt file.

    ``tensors``: the model's :func:`model_tensors`, when listed already.
    """
    itemsizes: dict[int, int | None] = {}  # by data type: numpy's dtype is asked once per type
    for tensor in model_tensors(model) if tensors is None else tensors:
        if not tensor.HasField("raw_data"):
            continue
        data_type = tensor.data_type
        itemsize = itemsizes.get(data_type, -1)
        if itemsize == -1:
            try:
                itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
            except (KeyError, TypeError, ValueError):
                itemsize = None
            itemsizes[data_type] = itemsize
        if itemsize is None:
            continue
        count = math.prod(tensor.dims[:])  # exact (Python ints): numpy's product wraps around on huge shapes
        if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            expected = (count + 1) // 2
        else:
            expected = count * itemsize
        if data_type != onnx.TensorProto.STRING and len(tensor.raw_data) != expected:
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
    with OutputSet() as outputs:
        return outputs.write_model(path, model, external_data=external_data, digest=digest, overrides=overrides)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: staged beside it, then renamed into place.

    Raises:
        OnnxladyError: the folder does not exist or the file cannot be written (nothing is left).
    """
    with OutputSet() as outputs:
        outputs.write_bytes(path, data)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in 8 MiB blocks into one reused buffer.

    Not a memory map of the whole file: every page of a map counts in the process's resident
    memory until it is unmapped, which for a 10 GB data file would be 10 GB.
    """
    digest = hashlib.sha256()
    block = bytearray(8 << 20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(block):
            digest.update(view[:count])
    return digest.hexdigest()
