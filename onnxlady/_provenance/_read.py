"""Reading one model for the index: a local file, or a URL through ``fsspec``; never raising.

A registry holds anything: truncated downloads, files that are not ONNX, models whose external
data went missing. :func:`fingerprint_file` turns each into a :class:`FileFingerprint`, with
either a fingerprint or a one-line error, so a build lists the bad files and goes on.

A local file is read once: its bytes (memory-mapped from :data:`MAP_BYTES` on, so a large model
is not held twice) are parsed and, when asked (``digest``: an index build asks only for a file
whose time changed, see :mod:`onnxlady._provenance._index`), hashed from the same buffer; from
:data:`HASH_THREAD_BYTES` on, the hash runs in a second thread while the model is parsed and
fingerprinted. From :data:`SKIM_BYTES` on, the file is parsed by
:func:`~onnxlady._provenance._wire.read_weights`: protobuf gets the model without its
initializers' bytes and the weights are read as views of the file's own bytes, never copied.
The checks of :func:`onnxlady._io._files.load_model` that a fingerprint needs are made (a parse
failure, no graph, no opset import, a regular file); the structural validation of the whole
graph is not (a fingerprint reads only the producer weights and their neighbours, and any
inconsistency there ends as this file's error line, see :mod:`onnxlady._provenance._producers`).
A model with external data is read by :func:`~onnxlady._io._files.load_model` itself: external
data resolved against the model's own folder and refused outside it, tensor sizes checked.

:func:`fingerprint_files` is what a build's worker runs on a batch of files: each is read on its
own, then the statistics of all their layers are computed together (a small model's numpy
calls cost more than its arithmetic); each fingerprint is the one its file gets alone, bit for
bit.

A URL (``scheme://...``: ``file://``, ``s3://`` with ``s3fs``, ``gs://`` with ``gcsfs``,
``memory://``...) is read through ``fsspec`` (the ``scale`` extra): the file's bytes are hashed
and parsed, and each external tensor is read from ``location`` relative to the model's folder
URL (absolute locations and ``..`` are refused, as for local files).
"""

from __future__ import annotations

import datetime as _datetime
import functools
import hashlib
import mmap
import os
import stat as _stat
import threading
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxlady._errors import OnnxladyError
from onnxlady._io._files import load_model
from onnxlady._io._tensors import is_external
from onnxlady._provenance._fingerprint import (
    ModelFingerprint,
    ProducerWeight,
    fingerprint_model,
    fingerprints_of,
    model_producers,
    search_vector,
    search_vectors,
)
from onnxlady._provenance._wire import SkimmedModel, read_weights

__all__ = [
    "FileFingerprint",
    "OpenedModel",
    "fingerprint_file",
    "fingerprint_files",
    "is_url",
    "list_urls",
    "load_url",
    "open_local",
    "sha256_url",
    "stat_url",
]

_READ_CHUNK = 1 << 22
#: Files from this size on are memory-mapped rather than read into a bytes object: their pages
#: are the page cache's, not copied once more and held next to the parsed model (protobuf parses
#: a mapped 76 MB model in about half the time of reading it and parsing the bytes).
MAP_BYTES = 1 << 22
#: Files from this size on are read by :func:`~onnxlady._provenance._wire.read_weights` (weights
#: as views of the file's bytes, never copied); smaller ones are parsed whole, which costs less
#: than walking their wire format in Python.
SKIM_BYTES = 1 << 20
#: Files from this size on are hashed in a second thread while the model is parsed and
#: fingerprinted (hashlib releases the GIL): a single build worker then uses a second core.
HASH_THREAD_BYTES = 1 << 24
_TENSOR_ATTRIBUTES = (onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS)
_EXTERNAL = onnx.TensorProto.EXTERNAL
#: Standard operators holding a tensor attribute, and those holding graphs.
_TENSOR_HOLDERS = frozenset({"Constant", "ConstantOfShape"})
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_GRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


@dataclass(frozen=True)
class FileFingerprint:
    """What a worker returns for one file: its identity and fingerprint, or its error.

    Attributes:
        path: the absolute path or URL read.
        size: bytes of the model file.
        mtime_ns: its modification time (0 for a URL whose store has none).
        sha256: hex digest of the model file ("" on error).
        data_files: (path or URL, size, mtime_ns) of each external data file read.
        fingerprint: :meth:`ModelFingerprint.to_bytes` ("" on error).
        vector: the float32 search vector's bytes.
        layers: producer layers fingerprinted.
        parameters: their weight elements.
        error: one line saying why the file could not be fingerprinted ("" when it was).
    """

    path: str
    size: int
    mtime_ns: int
    sha256: str = ""
    data_files: tuple[tuple[str, int, int], ...] = ()
    fingerprint: bytes = b""
    vector: bytes = b""
    layers: int = 0
    parameters: int = 0
    error: str = ""


def is_url(path: str) -> bool:
    """Whether ``path`` names a URL read through fsspec (``scheme://...``)."""
    return "://" in path


def _result(
    path: str, size: int, mtime_ns: int, sha256: str, data_files: tuple[tuple[str, int, int], ...],
    fingerprint: ModelFingerprint, vector: np.ndarray | None = None,
) -> FileFingerprint:  # fmt: skip
    """The result of a file read; ``vector``: its search vector when computed already (in a batch)."""
    if vector is None:
        vector = search_vector(fingerprint)
    return FileFingerprint(
        path, size, mtime_ns, sha256, data_files, fingerprint.to_bytes(), vector.tobytes(),
        fingerprint.layers, fingerprint.parameters,
    )  # fmt: skip


@dataclass
class _Read:
    """A local file read and its producer weights taken, before the arithmetic."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    data_files: tuple[tuple[str, int, int], ...]
    weights: list[ProducerWeight]


def fingerprint_file(path: str, *, digest: bool = True) -> FileFingerprint:
    """Fingerprint one model file or URL (see the module docstring); never raises for a bad file.

    Args:
        path: a local path or a URL.
        digest: also compute the file's sha256 (an index build asks only when it needs one).

    Returns:
        The file's identity and fingerprint, or its identity and a one-line ``error``.
    """
    return fingerprint_files([path], digest=digest)[0]


def fingerprint_files(paths: Sequence[str], *, digest: bool | Sequence[bool] = True) -> list[FileFingerprint]:
    """Fingerprint several files or URLs, their layers reduced together; never raises for a bad file.

    What an index build's worker runs on a batch of files: each file is read on its own (see the
    module docstring), then the statistics of every file's layers are computed in one
    :func:`~onnxlady._provenance._fingerprint.fingerprints_of` call, which costs a small model a
    fraction of what it costs alone, and their search vectors in one
    :func:`~onnxlady._provenance._fingerprint.search_vectors` call; each fingerprint and vector is
    the one its file gets alone, bit for bit.

    Args:
        paths: local paths or URLs.
        digest: compute each file's sha256 (one flag for all, or one per path); without it the
            result's ``sha256`` is "".

    Returns:
        One result per path, in order: the file's identity and fingerprint, or its identity and
        a one-line ``error``.
    """
    _warm_allocator()
    flags = [digest] * len(paths) if isinstance(digest, bool) else list(digest)
    results: list[FileFingerprint | _Read] = [
        _fingerprint_url(path, hashed) if is_url(path) else _read_local(path, hashed) for path, hashed in zip(paths, flags)
    ]
    read = [item for item in results if isinstance(item, _Read)]
    try:
        fingerprints = fingerprints_of([item.weights for item in read])
    except Exception:  # one file's weights broke the batch: find which, file by file
        return [_finish_alone(item) if isinstance(item, _Read) else item for item in results]
    finished = iter(zip(fingerprints, search_vectors(fingerprints)))
    return [
        _result(item.path, item.size, item.mtime_ns, item.sha256, item.data_files, *next(finished))
        if isinstance(item, _Read)
        else item
        for item in results
    ]


#: Size of the block :func:`_warm_allocator` allocates and frees once per process: above the
#: largest temporary the layer arithmetic makes (a stack of :data:`~onnxlady._provenance.
#: _fingerprint._STACK_WEIGHTS` float32 weights, 16 MiB), under glibc's largest dynamic mmap
#: threshold (32 MiB on 64-bit), past which glibc leaves its thresholds as they are.
WARM_BYTES = 20 << 20
_WARMED: int | None = None


def _warm_allocator() -> None:
    """Allocate and free one :data:`WARM_BYTES` block, once per process.

    The arithmetic of a batch allocates and frees a few hundred numpy temporaries of up to a
    few megabytes (the squares of a stack of large layers: 16 MiB). glibc's allocator serves
    blocks above its mmap threshold (128 KB at start) from fresh mappings and returns the top of
    its heap to the system once more than twice that is free, so in a fresh process (a pool
    worker) every batch faulted the same pages in again, zero-filled by the kernel. Freeing one
    mapped 20 MiB block raises both thresholds as glibc itself does after any such block (to 20
    and 40 MiB): the temporaries then stay on the heap. The 4 MiB block of the first form left
    a batch's temporaries above the trim threshold (``tests/test_provenance_allocator.py``):
    ``python3 -m tools.registry_experiment --throughput-only --fresh``, one pass over the 12 real
    and exported models in a fresh process, took 141 ms of CPU and 12,100 page faults with it,
    122 ms and 7,000 with this one (medians of 3 runs at load 15 to 18). No allocator setting
    is changed, and the process keeps at most 40 MiB of free heap more; elsewhere than glibc this
    is one allocation more. Results do not change (only where memory comes from).
    """
    global _WARMED
    if os.getpid() == _WARMED:
        return
    _WARMED = os.getpid()
    block = np.empty(WARM_BYTES, dtype=np.uint8)
    del block


def _finish_alone(item: _Read) -> FileFingerprint:
    try:
        fingerprint = fingerprints_of([item.weights])[0]
    except Exception as exc:
        return FileFingerprint(
            item.path, item.size, item.mtime_ns, error=" ".join(f"{item.path}: {type(exc).__name__}: {exc}".split())
        )
    return _result(item.path, item.size, item.mtime_ns, item.sha256, item.data_files, fingerprint)


def _read_local(path: str, digest: bool) -> _Read | FileFingerprint:
    """A local file's identity and producer weights, or its error."""
    local = Path(path)
    try:
        info = local.stat()
    except (OSError, ValueError) as exc:
        return FileFingerprint(
            str(local), 0, 0, error=f"{local}: cannot read ({getattr(exc, 'strerror', None) or exc})"
        )
    if not _stat.S_ISREG(info.st_mode):
        kind = "a folder" if _stat.S_ISDIR(info.st_mode) else "not a regular file"
        return FileFingerprint(
            str(local), info.st_size, info.st_mtime_ns, error=f"{local}: is {kind}, not an ONNX file"
        )
    try:
        with open_local(local, digest=digest) as (opened, sha, data_files):
            weights = model_producers(opened.model, opened.arrays, opened.full_model)
            sha256 = sha()
    except OnnxladyError as exc:
        return FileFingerprint(str(local), info.st_size, info.st_mtime_ns, error=str(exc))
    except Exception as exc:
        return FileFingerprint(
            str(local), info.st_size, info.st_mtime_ns, error=" ".join(f"{local}: {type(exc).__name__}: {exc}".split())
        )
    return _Read(str(local), info.st_size, info.st_mtime_ns, sha256, data_files, weights)


@dataclass
class OpenedModel:
    """A model read by :func:`open_local`.

    Attributes:
        model: the model; without external data, the skeleton of
            :func:`~onnxlady._provenance._wire.read_weights` (its initializers' bytes in ``arrays``).
        arrays: initializer values read as views of the file's bytes.
        full_model: parses the whole model (for readers that need every tensor's bytes).
    """

    model: onnx.ModelProto
    arrays: dict[str, np.ndarray]
    full_model: Callable[[], onnx.ModelProto]


@contextmanager
def open_local(
    path: Path, *, digest: bool = True
) -> Generator[tuple[OpenedModel, Callable[[], str], tuple[tuple[str, int, int], ...]], None, None]:
    """A local model, its sha256 and its external data files (path, size, mtime).

    The sha256 comes as a callable ("" without ``digest``): from :data:`HASH_THREAD_BYTES` on it
    is computed in a second thread while the caller fingerprints. The file is read once (see the
    module docstring); the weights are views of its bytes, which live as long as they do.

    Raises:
        OnnxladyError: the file cannot be read, is not an ONNX model, or its external data is
            missing or outside its folder.
    """
    with ExitStack() as stack:
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                buffer: bytes | mmap.mmap
                if size < MAP_BYTES:
                    buffer = handle.read()
                else:  # not closed here: the weights' views keep it alive, and it goes with them
                    buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            digest_of: Callable[[], str]
            if not digest:
                digest_of = str
            elif size >= HASH_THREAD_BYTES:
                hashing = _hasher().submit(_sha256_of, buffer)
                stack.callback(hashing.result)  # the buffer outlives the hash, whatever happens
                digest_of = hashing.result
            else:
                digest_of = functools.partial(str, _sha256_of(buffer))
            skimmed = _skim(buffer, path) if size >= SKIM_BYTES else SkimmedModel(_parse_whole(buffer, path), {})
        except OSError as exc:
            raise OnnxladyError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        model = skimmed.model
        if not model.graph.node and not model.graph.output:
            raise OnnxladyError(f"{path}: not an ONNX model (no graph)")
        if not model.opset_import:
            raise OnnxladyError(f"{path}: not an ONNX model (no opset import)")
        if _uses_external_data(model):
            loaded = load_model(path)  # external data: resolved, confined and checked by the loader
            files = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in loaded.external_files)
            whole = loaded.model
            yield OpenedModel(whole, {}, lambda: whole), functools.partial(str, loaded.sha256), files
            return
        yield OpenedModel(model, skimmed.arrays, functools.partial(_parse_whole, buffer, path)), digest_of, ()


def _skim(buffer: bytes | mmap.mmap, path: Path) -> SkimmedModel:
    try:
        return read_weights(buffer)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OnnxladyError(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from exc


def _parse_whole(buffer: bytes | mmap.mmap, path: Path) -> onnx.ModelProto:
    model = onnx.ModelProto()
    if isinstance(buffer, mmap.mmap):
        with memoryview(buffer) as view:
            _parse(model, view, path)
    else:
        _parse(model, buffer, path)
    return model


def _sha256_of(buffer: bytes | mmap.mmap) -> str:
    return hashlib.sha256(buffer).hexdigest()


_HASHER: tuple[int, ThreadPoolExecutor] | None = None
_HASHER_LOCK = threading.Lock()


def _hasher() -> ThreadPoolExecutor:
    """This process's hashing thread (one per process: a forked pool worker starts its own)."""
    global _HASHER
    with _HASHER_LOCK:
        if _HASHER is None or _HASHER[0] != os.getpid():
            _HASHER = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxlady-sha256"))
        return _HASHER[1]


def _uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of the model lives in an external file.

    The main graph's initializers are checked, then the attributes of the nodes that can hold a
    tensor (``Constant``, ``ConstantOfShape``, operators of other domains); a subgraph sends
    the question to onnx's walk over every tensor. Other standard operators hold no tensor, and
    skipping their attributes is what keeps this check cheap on large graphs.
    """
    graph = model.graph
    # is_external's test, without a call per tensor (a small model's initializers are most of its fields).
    if _EXTERNAL in [tensor.data_location for tensor in graph.initializer]:
        return True
    for node in graph.node:
        op_type = node.op_type
        if op_type in _SUBGRAPH_OPS:
            return any(is_external(t) for t in onnx.external_data_helper._get_all_tensors(model))
        if op_type not in _TENSOR_HOLDERS and node.domain in ("", "ai.onnx"):
            continue
        for attribute in node.attribute:
            if attribute.type in _GRAPH_ATTRIBUTES:
                return any(is_external(t) for t in onnx.external_data_helper._get_all_tensors(model))
            if attribute.type in _TENSOR_ATTRIBUTES and any(is_external(t) for t in (attribute.t, *attribute.tensors)):
                return True
    return False


def _parse(model: onnx.ModelProto, data: bytes | memoryview, path: Path) -> None:
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OnnxladyError(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from exc


# -- URLs -------------------------------------------------------------------------------------
def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as exc:
        raise OnnxladyError(f"{url}: reading URLs needs fsspec: pip install 'onnxlady[scale]'") from exc
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing
        raise OnnxladyError(f"{url}: cannot open ({exc})") from exc


def _mtime_ns(info: dict[str, Any]) -> int:
    """A modification time from an fsspec ``info`` (each store names it its own way)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return int(value * 1e9)
        if isinstance(value, _datetime.datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, str):
            try:
                return int(_datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return 0


def list_urls(url: str) -> tuple[list[str], str]:
    """The ``*.onnx`` files under a folder URL, and the folder's URL.

    The files are listed recursively, or the URL itself when it names a file; the folder's URL is
    "" for a file.

    Raises:
        OnnxladyError: fsspec missing, an unknown protocol, or nothing there.
    """
    fs, root = _filesystem(url)
    try:
        if fs.isdir(root):
            found = sorted(p for p in fs.find(root) if p.lower().endswith(".onnx"))
            return [fs.unstrip_protocol(p) for p in found], fs.unstrip_protocol(root)
        if fs.isfile(root):
            return [fs.unstrip_protocol(root)], ""
    except OSError as exc:
        raise OnnxladyError(f"{url}: cannot list ({exc})") from exc
    raise OnnxladyError(f"{url}: no such file or folder")


def stat_url(url: str) -> tuple[int, int] | None:
    """(size, modification time in ns) of a URL, or None when it cannot be read."""
    try:
        fs, path = _filesystem(url)
        info = fs.info(path)
    except (OnnxladyError, OSError):
        return None
    return int(info.get("size") or 0), _mtime_ns(info)


def sha256_url(url: str) -> str | None:
    """The sha256 of a URL's bytes, streamed, or None when it cannot be read."""
    try:
        fs, path = _filesystem(url)
        digest = hashlib.sha256()
        with fs.open(path, "rb") as stream:
            while chunk := stream.read(_READ_CHUNK):
                digest.update(chunk)
    except (OnnxladyError, OSError):
        return None
    return digest.hexdigest()


def _load_url_external_data(model: onnx.ModelProto, fs: Any, folder: str, url: str) -> tuple[tuple[str, int, int], ...]:
    """Read every external tensor from its file next to the model into ``raw_data``.

    Any path that leaves the model's folder is refused.
    """
    files: dict[str, tuple[str, int, int]] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not is_external(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        relative = PurePosixPath(location)
        if not location or relative.is_absolute() or ".." in relative.parts:
            raise OnnxladyError(f"{url}: tensor '{tensor.name}' points outside the model folder ({location!r})")
        target = f"{folder}/{relative}" if folder else str(relative)
        offset, length = int(info.get("offset", 0) or 0), info.get("length")
        try:
            with fs.open(target, "rb") as stream:
                stream.seek(offset)
                data = stream.read(int(length)) if length is not None else stream.read()
            if target not in files:
                meta = fs.info(target)
                files[target] = (fs.unstrip_protocol(target), int(meta.get("size") or 0), _mtime_ns(meta))
        except (OSError, ValueError) as exc:
            raise OnnxladyError(
                f"{url}: external data file '{location}' for tensor '{tensor.name}' unreadable ({exc})"
            ) from exc
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return tuple(files.values())


def _parse_url_model(
    data: bytes, fs: Any, path: str, name: str
) -> tuple[onnx.ModelProto, tuple[tuple[str, int, int], ...]]:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OnnxladyError(f"{name}: not an ONNX model (protobuf parse failed: {exc})") from exc
    if not model.graph.node and not model.graph.output:
        raise OnnxladyError(f"{name}: not an ONNX model (no graph)")
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    return model, _load_url_external_data(model, fs, folder, name)


def load_url(url: str) -> onnx.ModelProto:
    """A model read from a URL through fsspec, external data included.

    Raises:
        OnnxladyError: fsspec missing, the URL unreadable, or not an ONNX model.
    """
    fs, path = _filesystem(url)
    name = fs.unstrip_protocol(path)
    try:
        with fs.open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise OnnxladyError(f"{name}: cannot read ({exc})") from exc
    return _parse_url_model(data, fs, path, name)[0]


def _fingerprint_url(url: str, digest: bool = True) -> FileFingerprint:
    try:
        fs, path = _filesystem(url)
    except OnnxladyError as exc:
        return FileFingerprint(url, 0, 0, error=str(exc))
    name = fs.unstrip_protocol(path)
    try:
        info = fs.info(path)
        with fs.open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        return FileFingerprint(name, 0, 0, error=f"{name}: cannot read ({exc})")
    size, mtime_ns = len(data), _mtime_ns(info)
    try:
        model, data_files = _parse_url_model(data, fs, path, name)
        fingerprint = fingerprint_model(model)
    except OnnxladyError as exc:
        return FileFingerprint(name, size, mtime_ns, error=str(exc))
    except Exception as exc:
        return FileFingerprint(name, size, mtime_ns, error=" ".join(f"{name}: {type(exc).__name__}: {exc}".split()))
    return _result(name, size, mtime_ns, hashlib.sha256(data).hexdigest() if digest else "", data_files, fingerprint)
