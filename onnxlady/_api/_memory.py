"""``max_memory``: a command's peak memory, estimated before any work, against the caller's budget.

The estimate comes from the files alone (their sizes, and for weights stored as external data
the largest tensor, read from the graph without its weights), with the factors ``python3 -m
tools.bench`` measures (peak resident memory above the interpreter over the model's size, the
worst case seen, rounded up; see docs/results.md, Performance):

- ``permute`` and ``unpermute`` hold about 2 to 3.5 x the model (the model, the tensor being
  written, the restored model's encoding); with external data the weights stay in their files
  and memory is a few of the largest tensors;
- ``resync`` and ``audit`` hold both models, the suspect's moved copy, the output and, across a
  conversion or in the audit, float64 work copies with error bounds: up to 10 x both models;
- ``resync`` of a twin whose weights are all stored as external data reads them from their
  files one channel group at a time (:mod:`onnxlady._resync._mapped`): memory is then a few
  times the tensors the largest group touches (:func:`check_twin_memory`, once the reference
  is analysed and the suspect known to be a twin; before any weight is read); the ``audit`` of
  such a twin reads its constants the same way (:mod:`onnxlady._audit._lazy`) and adds the
  forensics' float64 temporaries of one tensor (:data:`FORENSICS_TENSORS`).

A budget below the estimate is refused up front (exit 2), not discovered by the kernel halfway.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._io._skim import read_graph
from onnxlady._io._tensors import tensor_holders

if TYPE_CHECKING:  # annotations only: unpermute runs without the analysis (and its rules) imported
    from onnxlady._analysis._channels import ChannelAnalysis

#: What the interpreter with onnxlady, numpy, onnx and scipy loaded holds before any model.
BASELINE_BYTES = 200 << 20
#: Peak over the models' total size, by command, for weights stored inside the model file.
INLINE_FACTOR: dict[str, float] = {"permute": 2.5, "unpermute": 3.5, "resync": 10.0, "audit": 10.0}
#: Peak over the largest tensor, for permute/unpermute of weights kept in external files.
EXTERNAL_TENSORS = 6
#: Peak over the bytes of the tensors one channel group touches (both models' copies, the
#: moved copy, the centred blocks), for a twin resync of weights kept in external files;
#: 3.7 measured on the generated 0.23 GB external model (``python3 -m tools.bench --external
#: 200 --only resync``: 236 MB peak, its largest group 63 MB), rounded up.
GROUP_FACTOR = 5
#: Peak over the largest tensor's bytes that the audit's forensics add (about nine float64
#: temporaries of one float32 tensor: 18 times its bytes; the 0.23 GB external model's noised
#: twin peaks at 472 MB, its largest tensor 31.6 MB, the twin resync alone at 240 MB).
FORENSICS_TENSORS = 18

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(value: str | int | None) -> int | None:
    """A memory size in bytes: an int, or a string such as ``"2G"``, ``"512M"``, ``"1.5GiB"``.

    Raises:
        OnnxladyError: the value is not a positive size.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OnnxladyError(f"max_memory: expected bytes or a size such as '2G', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE)
        if match is None:
            raise OnnxladyError(f"max_memory: {value!r} is not a size (examples: 2G, 512M, 1.5GiB, 1000000)")
        size = int(float(match[1]) * _UNITS[match[2].upper()])
    if size <= 0:
        raise OnnxladyError(f"max_memory: {value!r} is not a positive size")
    return size


def _files_size(path: Path) -> int:
    """The model file's size plus every external data file it names (each once)."""
    graph = read_graph(path).model
    files = {path.resolve()}
    for tensor in _tensors(graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if location:
                files.add((path.parent / location).resolve())
    return sum(os.stat(f).st_size for f in files if f.is_file())


def _largest_external(path: Path) -> int | None:
    """The largest tensor stored as external data (bytes), or None when none is."""
    largest = None
    for tensor in _tensors(read_graph(path).model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            except (KeyError, TypeError, ValueError):
                itemsize = 8
            size = math.prod(int(d) for d in tensor.dims) * itemsize
            largest = size if largest is None else max(largest, size)
    return largest


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return list(onnx.external_data_helper._get_all_tensors(model))


def estimate_peak(command: str, paths: Sequence[Path], *, mapped: bool = False) -> tuple[int, bool]:
    """The estimated peak resident memory of ``command`` on the model files ``paths``.

    Args:
        command: ``permute``, ``unpermute``, ``resync`` or ``audit``.
        paths: the model files the command reads.
        mapped: the command leaves external weights in their files (permute and unpermute
            writing to a file): memory then follows the largest tensor, not the model.

    Returns:
        The estimate in bytes, and whether it is the external-data one (the weights stay in
        their files).
    """
    if mapped and len(paths) == 1:
        largest = _largest_external(paths[0])
        if largest is not None:
            graph = os.stat(paths[0]).st_size
            return BASELINE_BYTES + 2 * graph + EXTERNAL_TENSORS * largest, True
    total = sum(_files_size(path) for path in paths)
    return BASELINE_BYTES + int(INLINE_FACTOR[command] * total), False


def check_memory(
    budget: str | int | None, command: str, paths: Sequence[Path | None], *, mapped: bool = False
) -> None:
    """Refuse to start ``command`` when its estimated peak exceeds ``budget``.

    Models given in memory (``None`` paths) are already in memory: only files are counted.

    Raises:
        OnnxladyError: ``budget`` is not a size, or the estimate exceeds it.
    """
    limit = parse_memory(budget)
    files = [path for path in paths if path is not None]
    if limit is None or not files:
        return
    try:
        estimate, streamed = estimate_peak(command, files, mapped=mapped)
    except (OSError, ValueError):  # an unreadable file: the command itself reports it
        return
    if estimate > limit:
        way = " (weights read from their external files one at a time)" if streamed else ""
        raise OnnxladyError(
            f"{command} needs about {estimate / 2**30:.2f} GiB of memory{way}, more than max_memory "
            f"{limit / 2**30:.2f} GiB: nothing was done"
        )


def has_external_weights(path: Path | None) -> bool:
    """Whether the model file ``path`` stores some of its tensors as external data."""
    if path is None:
        return False
    try:
        return _largest_external(path) is not None
    except (OSError, ValueError, OnnxladyError):  # an unreadable file: the command itself reports it
        return False


def twin_peak(analysis: ChannelAnalysis, paths: Sequence[Path], command: str = "resync") -> int:
    """The estimated peak of a twin resync (or audit) whose weights stay in their external files.

    Args:
        analysis: the reference's analysis (as resync computes it).
        paths: the two model files (their graphs' sizes count: the graphs are held whole).
        command: ``resync``, or ``audit`` (which adds :data:`FORENSICS_TENSORS` of the largest).
    """
    from onnxlady._resync._solver import group_slices  # (here: permute and unpermute run without the solver)

    holders = tensor_holders(analysis.graph.model)
    permutable = {group.id for group in analysis.permutable_groups}
    _, touched = group_slices(analysis, permutable)
    sizes = [_tensor_bytes(holders[plan.source]) for plan in analysis.tensors]
    group = max((sum(sizes[number] for number in plans) for plans in touched.values()), default=0)
    graphs = sum(os.stat(path).st_size for path in paths)
    largest = max(sizes, default=0)
    forensics = FORENSICS_TENSORS * largest if command == "audit" else 0
    return BASELINE_BYTES + 2 * graphs + GROUP_FACTOR * group + 2 * largest + forensics


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    return math.prod(int(d) for d in tensor.dims) * itemsize


def check_twin_memory(
    budget: str | int | None,
    analysis: ChannelAnalysis,
    suspect: onnx.ModelProto,
    paths: Sequence[Path],
    command: str = "resync",
) -> None:
    """Refuse a resync (or audit) of external-data models whose estimated peak exceeds ``budget``.

    A twin suspect is estimated by :func:`twin_peak`; any other is matched across conversions
    with its weights read in, and estimated as inline models are (:func:`estimate_peak`).

    Raises:
        OnnxladyError: ``budget`` is not a size, or the estimate exceeds it.
    """
    from onnxlady._resync._twin import NotATwin, twin_leaves  # (here: permute and unpermute run without it)

    limit = parse_memory(budget)
    if limit is None:
        return
    try:
        twin_leaves(analysis, suspect)
    except NotATwin:
        check_memory(budget, command, list(paths))
        return
    estimate = twin_peak(analysis, paths, command)
    if estimate > limit:
        raise OnnxladyError(
            f"{command} needs about {estimate / 2**30:.2f} GiB of memory (weights read from their external files "
            f"one channel group at a time), more than max_memory {limit / 2**30:.2f} GiB: nothing was done"
        )
