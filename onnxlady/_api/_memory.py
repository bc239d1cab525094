"""``max_memory``: a command's peak memory, estimated before any work, against the caller's budget.

The estimate is an upper bound of the memory the command allocates (its anonymous resident
memory, which the kernel cannot drop: what an out-of-memory kill counts). Pages of weight files
read through memory maps are the kernel's page cache, dropped under pressure, and not counted.
It models what the code holds, from the files alone (their graphs, read without weights, and
the sizes of their tensors), with factors measured on the bench, real and external-data models
(``docs/results.md``, "--max-memory estimates against measured peaks"), rounded up:

- every command holds its models' graphs as protobuf and Python objects (nodes, small constants,
  the analysis): :data:`GRAPH_FACTOR` times the bytes of each model file that are not large
  weights (large inline weights stay in the file as views, external ones in their files);
- ``permute`` and ``unpermute`` writing to a file read each large tensor from its file as they
  write it: a few tensors are in flight (the one read, the one moved, the one hashed and
  written), :data:`IN_FLIGHT_LARGEST` times the largest, and the I/O buffers; with
  no output (the API's in-memory result) the model is read in whole (:data:`INLINE_FACTOR`);
- ``resync`` and ``audit`` of a twin (the suspect has the reference's graph) read the weights
  one tensor (or one channel group's slices) at a time: :data:`TWIN_LARGEST` times the largest
  tensor (both models' copies, the moved copy, the centred blocks), and with ``--true-key`` the
  scoring's copies (:data:`TRUE_KEY_LARGEST`); the audit adds the moved tensors it keeps (one
  model's worth for inline weights) and its forensics' float64 temporaries
  (:data:`FORENSICS_LARGEST`);
- any other pair (across a conversion) reads the suspect's weights in, in their stored type or
  as the float32 a QDQ graph computes: :data:`ACROSS_FACTOR` times the larger model's weights
  as float32 (the audit's float64 copies with error bounds make it 16 times).

``resync`` and ``audit`` are estimated in two steps: the graphs (what the analysis needs) before
anything is read, then the whole once the reference is analysed and the suspect is known to be
a twin or not, before any weight is read. A budget below the estimate is refused up front
(exit 2), not discovered by the kernel halfway.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._io._skim import read_graph
from onnxlady._io._tensors import tensor_holders

if TYPE_CHECKING:  # annotations only: unpermute runs without the analysis (and its rules) imported
    from onnxlady._analysis._channels import ChannelAnalysis

#: Anonymous memory of the interpreter with onnxlady, numpy, onnx and scipy imported and the
#: modules a command imports as it runs (its rules, the solver, the forensics), before any
#: model's weights: measured 38-47 MB on a 1 MB model, and up to 50 MB more for the analysis of
#: real models' graphs (PaddleOCR's, 566-860 nodes), by command, rounded up.
BASELINE: dict[str, int] = {"permute": 64 << 20, "unpermute": 64 << 20, "resync": 80 << 20, "audit": 96 << 20}
#: The smallest of them (the interpreter alone, with margin).
BASELINE_BYTES = min(BASELINE.values())
#: Memory per byte of graph (a model file's bytes that are not large weights), by command:
#: protobuf messages, Python objects and the analysis (measured on 20 000-node graphs: 11.2,
#: 6.5, 7.6 and 17 times), rounded up.
GRAPH_FACTOR: dict[str, float] = {"permute": 14.0, "unpermute": 10.0, "resync": 10.0, "audit": 20.0}
#: Peak over the models' total size, by command, when permute or unpermute return the model in
#: memory (no output file: every weight is read in).
INLINE_FACTOR: dict[str, float] = {"permute": 2.5, "unpermute": 3.5}
#: Tensors in flight as permute and unpermute write, over the largest: the one moved, the one
#: hashed while the next is written, its encoding (3.0 measured on a 673 MB decoder whose
#: largest tensor is 125 MB, 2.5 on the 529 MB bench model), rounded up.
IN_FLIGHT_LARGEST = 3.5
#: The streamed reader's and writer's buffers: a file under 16 MiB is read whole, and up to
#: 16 MiB of serialized graph is kept (:mod:`onnxlady._io._stream`).
STREAM_BYTES = 16 << 20
#: A twin resync's working set: this many times the largest tensor (both models' copies, the
#: moved copy, the centred blocks) plus :data:`GROUP_SHARE` of the largest group's tensors.
TWIN_LARGEST = 4.0
GROUP_SHARE = 0.5
#: What ``--true-key`` adds over the largest tensor (the scoring's copies of both orders).
TRUE_KEY_LARGEST = 5.0
#: The audit forensics' float64 temporaries of one float32 tensor, over that tensor's bytes (4.6
#: measured: a noised twin of the 673 MB decoder, 125 MB largest tensor, peaks 572 MB above the
#: permuted twin's audit), rounded up.
FORENSICS_LARGEST = 6.0
#: Peak over the larger model's weights as float32 (a float16 or QDQ weight is read as the float32
#: the graph computes), by command, for a pair that is not a twin (across a conversion): resync
#: holds both models' weights and its work copies (1.3 to 1.6 measured on the 118 MB bench model
#: and its float16 and QDQ conversions), the audit float64 copies with error bounds (12 to 13).
ACROSS_FACTOR: dict[str, float] = {"resync": 2.0, "audit": 16.0}
#: Smallest inline weight left in the file as a view (:data:`onnxlady._io._external.INLINE_BYTES`).
_VIEW_BYTES = 1 << 16

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


@dataclass(frozen=True)
class Footprint:
    """What a model file weighs for the estimates, read from its graph without its weights."""

    graph: int  #: bytes of the file that are not large weights (held as protobuf and objects)
    sizes: tuple[int, ...]  #: every tensor's bytes, largest first
    external: bool  #: some tensor is stored as external data
    elements: int  #: every tensor's element count

    @property
    def weights(self) -> int:
        return sum(self.sizes)

    @property
    def largest(self) -> int:
        return self.sizes[0] if self.sizes else 0


def footprint(path: Path) -> Footprint:
    """The model file ``path``'s :class:`Footprint`.

    Raises:
        OSError, ValueError: the file cannot be read or parsed.
    """
    model = read_graph(path).model
    sizes, external, small, elements = [], False, 0, 0
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        sizes.append(_tensor_bytes(tensor))
        elements += math.prod(int(d) for d in tensor.dims)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external = True
            small += sizes[-1] if sizes[-1] < _VIEW_BYTES else 0  # read into the graph when loaded
    # Large inline weights of the main graph stay in the file, views read as needed.
    main = [*model.graph.initializer]
    main += [attribute.t for node in model.graph.node for attribute in node.attribute if attribute.HasField("t")]
    views = sum(
        size
        for size, tensor in ((_tensor_bytes(tensor), tensor) for tensor in main)
        if size >= _VIEW_BYTES and tensor.data_location != onnx.TensorProto.EXTERNAL
    )
    graph = max(os.stat(path).st_size - views, 0) + small
    return Footprint(graph, tuple(sorted(sizes, reverse=True)), external, elements)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    return math.prod(int(d) for d in tensor.dims) * itemsize


def _graphs(command: str, prints: Sequence[Footprint]) -> int:
    return BASELINE[command] + int(GRAPH_FACTOR[command] * sum(p.graph for p in prints))


def estimate_peak(command: str, paths: Sequence[Path], *, mapped: bool = False) -> tuple[int, bool]:
    """The estimated peak memory of ``permute`` or ``unpermute`` on the model file ``paths[0]``.

    Args:
        command: ``permute`` or ``unpermute`` (``resync`` and ``audit``: the graphs' part only,
            what they hold before the suspect is known to be a twin; see :func:`pair_peak`).
        paths: the model files the command reads.
        mapped: the command writes to a file, reading each large tensor as it is written.

    Returns:
        The estimate in bytes, and whether it is the streamed one (weights read one at a time).
    """
    prints = [footprint(path) for path in paths]
    if command in ("resync", "audit"):
        return _graphs(command, prints), True
    (model,) = prints
    if mapped:
        return _graphs(command, prints) + STREAM_BYTES + int(IN_FLIGHT_LARGEST * model.largest), True
    return _graphs(command, prints) + int(INLINE_FACTOR[command] * model.weights), False


def largest_group(analysis: ChannelAnalysis) -> int:
    """The bytes of the tensors the largest permutable channel group touches (the reference's)."""
    from onnxlady._resync._solver import group_slices  # (here: permute and unpermute run without the solver)

    holders = tensor_holders(analysis.graph.model)
    _, touched = group_slices(analysis, {group.id for group in analysis.permutable_groups})
    sizes = [_tensor_bytes(holders[plan.source]) for plan in analysis.tensors]
    return max((sum(sizes[number] for number in plans) for plans in touched.values()), default=0)


def pair_peak(
    command: str,
    paths: Sequence[Path],
    *,
    twin: bool,
    group: int | None = None,
    true_key: bool = False,
    inline_moved: bool | None = None,
) -> int:
    """The estimated peak of ``resync`` or ``audit`` on the model files ``paths`` (reference first).

    Args:
        command: ``resync`` or ``audit``.
        paths: the reference's and the suspect's files.
        twin: the suspect has the reference's graph (weights read one tensor or group at a time).
        group: the bytes the largest channel group touches (:func:`largest_group`); by default
            every weight of the reference (an upper bound).
        true_key: ``resync --true-key`` (its scoring holds copies of both orders).
        inline_moved: the audit keeps the moved tensors (inline weights); by default, whether
            the reference's weights are inline.
    """
    prints = [footprint(path) for path in paths]
    graphs = _graphs(command, prints)
    if not twin:
        return graphs + int(ACROSS_FACTOR[command] * 4 * max(p.elements for p in prints))
    largest = max((p.largest for p in prints), default=0)
    group = prints[0].weights if group is None else group
    estimate = graphs + int(TWIN_LARGEST * largest + GROUP_SHARE * group)
    if true_key and command == "resync":
        estimate += int(TRUE_KEY_LARGEST * largest)
    if command == "audit":
        keeps = not prints[0].external if inline_moved is None else inline_moved
        estimate += int(FORENSICS_LARGEST * largest) + (prints[0].weights if keeps else 0)
    return estimate


def _shown(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 1 << 30 else f"{size / 2**20:.0f} MiB"


def _refuse(command: str, estimate: int, limit: int, way: str) -> OnnxladyError:
    return OnnxladyError(
        f"{command} needs about {_shown(estimate)} of memory{way}, more than max_memory {_shown(limit)}: "
        "nothing was done"
    )


def check_memory(
    budget: str | int | None, command: str, paths: Sequence[Path | None], *, mapped: bool = False
) -> None:
    """Refuse to start ``command`` when its estimated peak exceeds ``budget``.

    For ``resync`` and ``audit`` this is the first step (the graphs); :func:`check_pair_memory`
    follows once the reference is analysed. Models given in memory (``None`` paths) are already
    in memory: only files are counted.

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
        if command in ("resync", "audit"):
            way = " for its models' graphs alone, before any weight is read"
        else:
            way = " (weights read from their files one tensor at a time)" if streamed else ""
        raise _refuse(command, estimate, limit, way)


def check_pair_memory(
    budget: str | int | None,
    analysis: ChannelAnalysis,
    suspect: onnx.ModelProto,
    paths: Sequence[Path | None],
    command: str = "resync",
    *,
    true_key: bool = False,
) -> None:
    """Refuse a resync (or audit) whose estimated peak (:func:`pair_peak`) exceeds ``budget``.

    Called once the reference is analysed, before any weight is read: the suspect is a twin
    (read one tensor or group at a time) or is matched across a conversion with its weights
    read in.

    Raises:
        OnnxladyError: ``budget`` is not a size, or the estimate exceeds it.
    """
    from onnxlady._resync._twin import NotATwin, twin_leaves  # (here: permute and unpermute run without it)

    limit = parse_memory(budget)
    files = [path for path in paths if path is not None]
    if limit is None or len(files) != 2:
        return
    try:
        twin_leaves(analysis, suspect)
        twin = True
    except NotATwin:
        twin = False
    try:
        group = largest_group(analysis) if twin else None
        estimate = pair_peak(command, files, twin=twin, group=group, true_key=true_key)
    except (OSError, ValueError):  # an unreadable file: the command itself reports it
        return
    if estimate > limit:
        way = " (weights read from their files one tensor at a time)" if twin else ""
        raise _refuse(command, estimate, limit, way)
