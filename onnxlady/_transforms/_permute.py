"""Permute and unpermute the constants of a model.

:func:`permute_model` applies one permutation per group to every constant the analysis bound
to it (after giving disagreeing uses of a shared constant their own copies) and returns the
key. :func:`unpermute_model` applies the inverse from a key alone and removes the copies; the
tensors come back bit for bit. Elements are moved as raw bytes in the tensor's own storage
field, so no value is ever converted.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from numpy.random import default_rng  # with the module: numpy loads it lazily, on a command's first draw

from onnxlady._errors import OnnxladyError
from onnxlady._graph._expr import Atom, Expr
from onnxlady._io._collector import collector_paused
from onnxlady._io._external import is_mapped, mapped_bytes
from onnxlady._io._progress import advance
from onnxlady._io._tensors import require_loaded
from onnxlady._io._tensors import tensor_holders as _tensor_holders  # the name callers of this module still import
from onnxlady._transforms._key import (
    PermutationKey,
    check_key_fits,
    evaluate_tree,
    expr_to_tree,
    graph_fingerprint,
)

if TYPE_CHECKING:  # annotations only: unpermute runs without the analysis (and its rules) imported
    from onnxlady._analysis._channels import ChannelAnalysis, TensorPermutation
    from onnxlady._io._node_table import NodeTable

#: Typed storage fields of TensorProto, by data type, for tensors not stored as raw bytes.
_TYPED_FIELDS: dict[int, tuple[str, type]] = {
    onnx.TensorProto.FLOAT: ("float_data", np.float32),
    onnx.TensorProto.COMPLEX64: ("float_data", np.float32),
    onnx.TensorProto.DOUBLE: ("double_data", np.float64),
    onnx.TensorProto.COMPLEX128: ("double_data", np.float64),
    onnx.TensorProto.INT64: ("int64_data", np.int64),
    onnx.TensorProto.UINT32: ("uint64_data", np.uint64),
    onnx.TensorProto.UINT64: ("uint64_data", np.uint64),
}
_PACKED_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
if hasattr(onnx.TensorProto, "FLOAT4E2M1"):
    _PACKED_TYPES.add(onnx.TensorProto.FLOAT4E2M1)


def draw_permutations(
    analysis: ChannelAnalysis, seed: int, group_ids: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """A random non-identity permutation for each permutable group (or each of ``group_ids``).

    Each group draws from its own stream seeded by (seed, group number), so choosing a subset
    of groups does not change the permutation any one group gets.
    """
    wanted = None if group_ids is None else list(group_ids)
    if wanted is not None:
        for gid in wanted:
            if gid not in {g.id for g in analysis.groups}:
                raise OnnxladyError(f"no group '{gid}' in this model (see 'onnxlady inspect')")
            group = analysis.group(gid)
            if not group.permutable:
                why = "; ".join(str(r) for r in group.reasons) or f"it has {group.size} neuron"
                raise OnnxladyError(f"group {gid} cannot be permuted ({why})")
    perms: dict[str, np.ndarray] = {}
    for group in analysis.permutable_groups:
        if wanted is not None and group.id not in wanted:
            continue
        rng = default_rng([seed, int(group.id[1:])])
        perm = rng.permutation(group.size)
        while np.array_equal(perm, np.arange(group.size)):
            perm = rng.permutation(group.size)
        perms[group.id] = perm
    return perms


#: Tensors below this many bytes are hashed in the thread that hands them over.
_HASH_INLINE_BYTES = 1 << 18


class SourceDigest:
    """sha256 of the permuted tensors as they were before permutation, in plan order.

    Each source tensor is hashed on its own (so hashing can happen in any order, for example
    while a streaming writer asks for tensors), then the per-tensor digests are combined in
    the order of the analysis' tensor plan.
    """

    def __init__(self) -> None:
        self._order: list[str] = []
        self._expected: set[str] = set()  # beside the list: a membership test per tensor stays O(1)
        self._digests: dict[str, bytes] = {}
        self._pool = ThreadPoolExecutor(max_workers=1)  # its thread starts with the first large tensor
        self._pending: dict[str, Future[bytes]] = {}

    def expect(self, source: str) -> bool:
        """Register ``source``; True the first time (that tensor's bytes must then be hashed)."""
        if source in self._expected or source in self._digests or source in self._pending:
            return False
        self._expected.add(source)
        self._order.append(source)
        return True

    def add(self, source: str, data: bytes | memoryview) -> None:
        """Hash ``data``: a large tensor on the worker thread, a small one in this thread.

        hashlib releases the GIL on large buffers, so their hashing runs beside numpy; for a small
        one the hand-off costs more than its hash (and the two threads' GIL hand-overs more still
        on a graph of thousands of small tensors).
        """
        if (data.nbytes if isinstance(data, memoryview) else len(data)) < _HASH_INLINE_BYTES:
            self._digests[source] = hashlib.sha256(data).digest()
            return
        self._pending[source] = self._pool.submit(lambda: hashlib.sha256(data).digest())

    def add_now(self, source: str, data: bytes | memoryview) -> None:
        """Hash ``data`` in this thread: nothing waits in a queue holding its bytes."""
        self._digests[source] = hashlib.sha256(data).digest()

    def close(self) -> None:
        """Stop the hashing worker without combining the digests (they are not needed)."""
        self._pool.shutdown(wait=True)

    def hexdigest(self) -> str:
        for source, future in self._pending.items():
            self._digests[source] = future.result()
        self._pending.clear()
        self._pool.shutdown()
        missing = [source for source in self._order if source not in self._digests]
        if missing:
            raise RuntimeError(f"tensor '{missing[0]}' was never computed (deferred tensors not written)")
        digests = self._digests
        combined = hashlib.sha256(b"".join(source.encode() + b"\0" + digests[source] for source in self._order))
        return combined.hexdigest()


class DeferredTensors:
    """Permuted tensors computed only when a streaming writer asks for them.

    ``overrides`` maps tensor names to functions returning the permuted array; pass it to
    :func:`onnxlady.save_model`, then complete the key with :meth:`finish`. The model in
    memory keeps its unpermuted bytes, so no second copy of the weights ever exists.
    """

    def __init__(self) -> None:
        self.overrides: dict[str, Callable[[], np.ndarray]] = {}
        self.digest = SourceDigest()
        self._work: dict[str, Callable[[], np.ndarray]] = {}
        self._file_order: Mapping[str, int] = {}
        self._next: dict[str, str] | None = None  # each tensor's follower in file order, once asked
        self._ready: dict[str, Future[np.ndarray]] = {}
        # One tensor is computed ahead while the writer writes the previous one.
        self._pool = ThreadPoolExecutor(max_workers=1)

    def add(self, name: str, work: Callable[[], np.ndarray], file_order: Mapping[str, int]) -> None:
        self._work[name] = work
        self._file_order = file_order
        self._next = None  # sorted once, when the writer first asks (not per tensor added)
        self.overrides[name] = lambda: self._take(name)

    def _take(self, name: str) -> np.ndarray:
        future = self._ready.pop(name, None)
        result = future.result() if future is not None else self._work[name]()
        if self._next is None:
            last = len(self._file_order)
            order = sorted(self._work, key=lambda n: self._file_order.get(n, last))
            self._next = dict(itertools.pairwise(order))
        following = self._next.get(name)
        if following is not None:
            if following not in self._ready:
                self._ready[following] = self._pool.submit(self._work[following])
        return result

    def close(self) -> None:
        """Stop the worker that computes tensors ahead (after the writer is done)."""
        self._pool.shutdown(wait=True)

    def finish(self, key: PermutationKey) -> PermutationKey:
        self._pool.shutdown(wait=True)
        key.source_weights_sha256 = self.digest.hexdigest()
        return key


#: Raw tensors at least this large are deferred when a DeferredTensors is given.
_DEFER_BYTES = 1 << 16


@collector_paused  # a few records per tensor, kept in the key: no walks of the analysis' objects over them
def permute_model(
    analysis: ChannelAnalysis,
    perms: Mapping[str, np.ndarray],
    *,
    source_sha256: str = "",
    source_file: str = "",
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
    deferred: DeferredTensors | None = None,
    fingerprint: str | None = None,
) -> PermutationKey:
    """Permute ``analysis.graph.model`` by ``perms`` (group id -> perm) and return the key.

    The model is changed in place, except that with ``deferred`` large tensors are left as
    they are and their permuted bytes are produced when ``save_model(overrides=
    deferred.overrides)`` writes them; call ``deferred.finish(key)`` after saving.
    ``fingerprint``: the model's :func:`graph_fingerprint`, when the caller took it already.
    """
    model = analysis.model  # the model as given (its local functions too), not an inlined view
    _check_perms(analysis, perms)
    source_fingerprint = graph_fingerprint(model) if fingerprint is None else fingerprint
    untied = _untie(analysis)
    # A streaming writer overrides main-graph tensors only (streamable): subgraphs' constants are permuted in place.
    holders, streamable = _holders(model)
    group_ids = {group.root: group.id for group in analysis.groups if group.id in perms}
    digest = deferred.digest if deferred is not None else SourceDigest()
    file_order = {name: position for position, name in enumerate(holders)}
    tensors: list[dict[str, object]] = []
    resolve = analysis.solver.resolve
    # An axis moved by one group (most) takes that group's index array, made once per group:
    # the expression is resolved once per axis, for the move and for the key's record.
    by_atom: dict[int, np.ndarray] = {}
    for number, plan in enumerate(analysis.tensors):
        advance(progress, "permuting tensors", number, len(analysis.tensors))
        tensor = holders[plan.tensor]
        resolved = [(axis, resolve(expr)) for axis, expr in plan.axes]
        axes = []
        for (axis, expr), (_, form) in zip(plan.axes, resolved):
            if type(form) is Atom:
                index = by_atom.get(form.id)
                if index is None:
                    index = by_atom[form.id] = analysis.index_array(expr, perms)
            else:
                index = analysis.index_array(expr, perms)
            axes.append((axis, index))
        first = digest.expect(plan.source)
        dims = tuple(tensor.dims)  # (read once: for the size below and the move)
        if deferred is not None and plan.tensor in streamable and _deferrable(tensor, dims):
            work = _deferred_take(tensor, axes, digest, plan.source if first else None)
            deferred.add(plan.tensor, work, file_order)
        else:
            before, _ = _permute_tensor(tensor, axes, dims)
            if first:
                digest.add(plan.source, before)
        tensors.append(_tensor_record(analysis, plan, group_ids, resolved))
    groups = _group_records(analysis, perms)
    states = _state_records(analysis, perms, group_ids)
    return PermutationKey(
        source_sha256=source_sha256,
        source_fingerprint=source_fingerprint,
        # Moving elements keeps every name, type and shape the fingerprint reads: only untying changes the graph.
        permuted_fingerprint=graph_fingerprint(model) if untied else source_fingerprint,
        groups=groups,
        tensors=tensors,
        untied=untied,
        source_weights_sha256="" if deferred is not None else digest.hexdigest(),
        seed=seed,
        source_file=source_file,
        extra={"kv_state": states} if states else {},
    )


def _tensor_record(
    analysis: ChannelAnalysis,
    plan: TensorPermutation,
    group_ids: Mapping[int, str],
    resolved: list[tuple[int, Expr]] | None = None,
) -> dict[str, object]:
    """The key's record of one permuted tensor: its name, source, and each axis's index map.

    ``resolved``: the plan's axes with their expressions resolved, when the caller has them.
    """
    find = analysis.solver.find
    if resolved is None:
        resolved = [(axis, analysis.solver.resolve(expr)) for axis, expr in plan.axes]
    return {
        "tensor": plan.tensor,
        "source": plan.source,
        "axes": [{"axis": axis, "expr": expr_to_tree(expr, group_ids, find)} for axis, expr in resolved],
    }


def _group_records(analysis: ChannelAnalysis, perms: Mapping[str, np.ndarray]) -> list[dict[str, object]]:
    """The key's record of each permuted group: its weight members and its permutation."""
    return [
        {
            "id": group.id,
            "size": group.size,
            "members": [
                {"tensor": m.tensor, "axis": m.axis, "role": m.role, "index_map": m.index_map}
                for m in group.members
                if m.is_weight
            ],
            "perm": [int(i) for i in perms[group.id]],
        }
        for group in analysis.groups
        if group.id in perms
    ]


def _state_records(
    analysis: ChannelAnalysis, perms: Mapping[str, np.ndarray], group_ids: Mapping[int, str]
) -> list[dict[str, Any]]:
    """The key's record of the KV-cache states that move: whoever feeds a cache must permute it alike.

    One record per state pair (``analyze(kv_state=True)``) with an axis governed by a permuted
    group: the past input and present output names, the sequence axis, and each moving axis's
    index map (as the tensors' maps are written). A cache made by the source model becomes the
    permuted model's by ``take(cache, evaluate(expr), axis)`` on each listed axis.
    """
    records = []
    for pair, axes in analysis.state_spaces():
        moving = {axis: expr for axis, expr in axes.items() if set(analysis.neuron_labels(expr)) & set(perms)}
        if not moving:
            continue
        records.append(
            {
                "input": pair.input,
                "output": pair.output,
                "sequence_axis": pair.sequence_axis,
                "axes": [
                    {"axis": axis, "expr": expr_to_tree(expr, group_ids, analysis.solver.find)}
                    for axis, expr in moving.items()
                ],
            }
        )
    return records


def _deferrable(tensor: onnx.TensorProto, dims: tuple[int, ...] | None = None) -> bool:
    """Whether ``tensor`` is large enough to be moved as the writer writes it (``dims``: its dims, when read already)."""
    # The size first, from the dims at hand: most tensors of a deep graph are small, and the
    # other questions each read the protobuf again.
    return (
        _raw_size(tensor, dims) >= _DEFER_BYTES
        and (tensor.HasField("raw_data") or is_mapped(tensor))  # mapped: still in its external file
        and tensor.data_type not in _PACKED_TYPES
        and tensor.data_type != onnx.TensorProto.STRING
    )


def _deferred_take(
    tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]], digest: SourceDigest, source: str | None
) -> Callable[[], np.ndarray]:
    def compute() -> np.ndarray:
        # A mapped tensor is read from its file as the writer asks for it (never loaded whole).
        raw = mapped_bytes(tensor) if is_mapped(tensor) else tensor.raw_data
        if source is not None:
            digest.add(source, raw)
        dims = tuple(int(d) for d in tensor.dims)
        itemsize = len(raw) // max(1, math.prod(dims))
        array = np.frombuffer(raw, dtype=_element_dtype(itemsize)).reshape(dims)
        return _take_axes(array, axes)

    return compute


def _element_count(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)  # math.prod: no numpy call per tensor (1 for a scalar)


def _raw_size(tensor: onnx.TensorProto, dims: tuple[int, ...] | None = None) -> int:
    itemsize = _ITEMSIZES.get(tensor.data_type)
    if itemsize is None:
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 0
        _ITEMSIZES[tensor.data_type] = itemsize  # looked up once per data type, not per tensor
    if not itemsize:
        return 0
    return (_element_count(tensor) if dims is None else math.prod(dims)) * itemsize


_ITEMSIZES: dict[int, int] = {}


def _element_dtype(itemsize: int) -> np.dtype:
    """An opaque dtype of one element: permutation moves elements, never reads their values."""
    dtype = _ELEMENT_DTYPES.get(itemsize)
    if dtype is None:  # made once per size: a dtype from its name costs more than moving a small tensor
        dtype = np.dtype(f"u{itemsize}") if itemsize in (1, 2, 4, 8) else np.dtype(f"V{itemsize}")
        _ELEMENT_DTYPES[itemsize] = dtype
    return dtype


_ELEMENT_DTYPES: dict[int, np.dtype] = {}


def _check_perms(analysis: ChannelAnalysis, perms: Mapping[str, np.ndarray]) -> None:
    for gid, perm in perms.items():
        try:
            group = analysis.group(gid)
        except KeyError:
            raise OnnxladyError(f"no group '{gid}' in this model") from None
        perm = np.asarray(perm)
        if perm.shape != (group.size,) or not _is_permutation(perm):
            raise OnnxladyError(f"the permutation given for group {gid} is not a permutation of {group.size}")
        if group.frozen and not np.array_equal(perm, np.arange(group.size)):
            raise OnnxladyError(f"group {gid} is frozen and cannot be permuted")


def _is_permutation(perm: np.ndarray) -> bool:
    """Whether the 1-D ``perm`` holds each of ``0 .. len(perm) - 1`` once.

    A short one is compared as a Python list: three numpy calls cost more than its sort (a
    deep graph has thousands of groups of a few dozen neurons).
    """
    if perm.size <= 256 and perm.dtype.kind in "iu":
        return sorted(perm.tolist()) == list(range(perm.size))
    return bool(np.array_equal(np.sort(perm), np.arange(perm.size)))


def unpermute_model(model: onnx.ModelProto, key: PermutationKey, nodes: NodeTable | None = None) -> bool:
    """Undo ``key`` on ``model`` in place; True when the weights match the source bit for bit.

    ``nodes``: the main graph's nodes as the load's check read them, for the graph fingerprint
    (see :func:`~onnxlady._transforms._key.graph_fingerprint`).
    """
    return _unpermute(model, key, None, nodes=nodes).hexdigest() == key.source_weights_sha256


def unpermute_model_streamed(
    model: onnx.ModelProto, key: PermutationKey, deferred: DeferredTensors, nodes: NodeTable | None = None
) -> Callable[[str], bool]:
    """Undo ``key`` on ``model``, its large tensors restored only as the writer writes them.

    Those tensors (main-graph tensors of at least 64 KiB, or still in their external files: see
    :func:`onnxlady._io._external.is_mapped`) become ``deferred.overrides``: pass them to the
    writer. The model in memory keeps their permuted bytes; the small ones are restored in place.
    Not for keys that untied constants (their copies are removed, not written): use
    :func:`unpermute_model` for those.

    Returns:
        A function to call after writing, given the sha256 of the file written when it holds
        every weight (``""`` otherwise: external data, or unknown): True when the weights matched
        the source bit for bit. A file whose sha256 is the one the key recorded for the source
        file holds the source's weights, byte for byte: the restored tensors are then not hashed
        (a pass over every weight saved). Otherwise they are restored again from the model in
        memory and hashed, and their digest decides, as for :func:`unpermute_model`.
    """
    if key.untied:
        raise ValueError("a key that untied constants is undone in place (unpermute_model)")
    later: list[tuple[str, Callable[[], np.ndarray | bytes]]] = []
    digest = _unpermute(model, key, deferred, later, nodes=nodes)

    def verdict(written_sha256: str = "") -> bool:
        deferred.close()
        if written_sha256 and key.source_weights_sha256 and written_sha256 == key.source_sha256:
            digest.close()
            return True
        for source, restore in later:
            restored = restore()
            digest.add_now(source, restored if isinstance(restored, bytes) else restored.reshape(-1).view(np.uint8).data)
        return digest.hexdigest() == key.source_weights_sha256

    return verdict


@collector_paused  # as permute_model: the collector would walk the key's records again and again
def _unpermute(
    model: onnx.ModelProto,
    key: PermutationKey,
    deferred: DeferredTensors | None,
    later: list[tuple[str, Callable[[], np.ndarray | bytes]]] | None = None,
    *,
    nodes: NodeTable | None = None,
) -> SourceDigest:
    """Undo ``key`` (mapped tensors through ``deferred``); the digest of the restored weights.

    The deferred tensors are not hashed as they are written: each source among them is listed in
    ``later`` with the function that restores it, for the caller to hash when it needs to. So
    are, with ``later``, the small ones restored in place as raw bytes (listed with a function
    reading them back): a file that is the source's byte for byte needs none of them hashed.
    """
    if deferred is not None and later is None:
        raise ValueError("deferred tensors need a list to record their restoring functions in")
    fingerprint = graph_fingerprint(model, nodes)
    if fingerprint != key.permuted_fingerprint:
        if fingerprint == key.source_fingerprint and key.untied:
            raise OnnxladyError("this model has the source's graph, not the permuted one: the key does not apply")
        raise OnnxladyError("the key was made for a different model (graph fingerprints differ)")
    holders, streamable = _holders(model, nodes)
    check_key_fits(key, model, holders)  # every name, rank and axis length, before any tensor is touched
    perms = key.permutations()
    sizes = {g["id"]: int(g["size"]) for g in key.groups}
    digest = deferred.digest if deferred is not None else SourceDigest()
    file_order = {name: position for position, name in enumerate(holders)}
    inverses: dict[str, np.ndarray] = {}  # a group's inverse, shared by the tensors it moves alone
    for entry in key.tensors:
        name = entry["tensor"]
        tensor = holders[name]
        axes = []
        for item in entry["axes"]:
            tree = item["expr"]
            gid = tree.get("group") if len(tree) == 1 else None
            if gid is None:
                axes.append((int(item["axis"]), np.argsort(evaluate_tree(tree, perms, sizes))))
                continue
            inverse = inverses.get(gid)
            if inverse is None:
                inverse = inverses[gid] = np.argsort(evaluate_tree(tree, perms, sizes))
            axes.append((int(item["axis"]), inverse))
        first = digest.expect(entry["source"])
        dims = tuple(tensor.dims)  # (read once: for the size below and the move)
        if deferred is not None and name in streamable and _deferrable(tensor, dims):
            restore = _restored_take(tensor, axes)
            deferred.add(name, restore, file_order)
            if first and later is not None:
                later.append((entry["source"], restore))
            continue
        _, after = _permute_tensor(tensor, axes, dims)
        if first:
            if later is not None and tensor.HasField("raw_data"):  # (its raw_data is now ``after``)
                later.append((entry["source"], _raw_bytes(tensor)))
            else:
                digest.add(entry["source"], after)
    _retie(model, key.untied)
    return digest


def _holders(
    model: onnx.ModelProto, nodes: NodeTable | None = None
) -> tuple[dict[str, onnx.TensorProto], dict[str, onnx.TensorProto]]:
    """Every constant by name (:func:`tensor_holders`), and the main graph's (those a streaming writer overrides).

    One walk of the graph where it has no subgraph (the two are then the same). ``nodes``: the
    main graph's nodes as the load's check read them; while it describes the graph, only the
    nodes it says hold attributes are read (a Constant's value, a subgraph), in the same order.
    """
    graph = model.graph
    graph_kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if nodes is None or not nodes.describes(graph):
        main = _tensor_holders(model, subgraphs=False)
        if any(attribute.type in graph_kinds for node in graph.node if node.attribute for attribute in node.attribute):
            return _tensor_holders(model), main
        return main, main
    attributed = [graph.node[index] for index, flag in enumerate(nodes.attributed) if flag]
    main = {}
    for tensor in graph.initializer:  # as tensor_holders lists them: initializers, then Constant values
        main.setdefault(tensor.name, tensor)
    for node in attributed:  # (a Constant without attributes holds no value)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value":
                    main.setdefault(node.output[0], attribute.t)
    if any(attribute.type in graph_kinds for node in attributed for attribute in node.attribute):
        return _tensor_holders(model), main
    return main, main


def _raw_bytes(tensor: onnx.TensorProto) -> Callable[[], bytes]:
    """A function reading ``tensor``'s raw bytes back (as the writer wrote them)."""
    return lambda: tensor.raw_data


def _restored_take(tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]]) -> Callable[[], np.ndarray]:
    """The restored elements of a tensor, computed when called (by the writer; again to hash them)."""

    def compute() -> np.ndarray:
        raw = mapped_bytes(tensor) if is_mapped(tensor) else tensor.raw_data
        dims = tuple(int(d) for d in tensor.dims)
        itemsize = len(raw) // max(1, math.prod(dims))
        return np.ascontiguousarray(_take_axes(np.frombuffer(raw, dtype=_element_dtype(itemsize)).reshape(dims), axes))

    return compute


# -- tensors ------------------------------------------------------------------------------
def _permute_tensor(
    tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]], dims: tuple[int, ...] | None = None
) -> tuple[bytes, bytes]:
    """Move whole elements of ``tensor`` (``new = take(old, idx, axis)`` per axis), in its own storage.

    ``dims``: the tensor's dims, when the caller read them already. Returns the element bytes
    before and after, for the key's digests.
    """
    if tensor.data_type in _PACKED_TYPES:
        raise OnnxladyError(f"tensor '{tensor.name}' packs two values per byte and cannot be permuted")
    if tensor.data_location == onnx.TensorProto.EXTERNAL:  # (the check's label costs more than a small move)
        require_loaded(tensor, f"tensor '{tensor.name}'")
    if dims is None:
        dims = tuple(tensor.dims)  # (Python ints already)
    if tensor.HasField("raw_data"):
        raw = tensor.raw_data
        itemsize = len(raw) // max(1, math.prod(dims))
        array = np.frombuffer(raw, dtype=_element_dtype(itemsize))
        after = _take_axes(array.reshape(dims), axes).tobytes()
        tensor.raw_data = after
        return raw, after
    field_name, dtype = _TYPED_FIELDS.get(tensor.data_type, ("int32_data", np.int32))
    if tensor.data_type == onnx.TensorProto.STRING:
        field_name, dtype = "string_data", object
    values = getattr(tensor, field_name)
    flat: np.ndarray = np.array(list(values), dtype=dtype)
    per_element = flat.size // max(1, math.prod(dims)) if dims else 1
    array = flat.reshape(dims + ((per_element,) if per_element > 1 else ()))
    before = array.tobytes() if dtype is not object else repr(array.tolist()).encode()
    array = _take_axes(array, axes)
    del values[:]
    values.extend(array.reshape(-1).tolist())
    after = array.tobytes() if dtype is not object else repr(array.tolist()).encode()
    return before, after


#: Tensors of at most this many elements are moved one axis at a time (see :func:`_take_axes`).
_CHAINED_ELEMENTS = 1 << 16


def _take_axes(array: np.ndarray, axes: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """``take`` along several axes; a large tensor in one gather.

    For a large tensor the axes after the last permuted one are folded into one opaque element
    and the permuted leading axes into one flat index, so a weight [M, C, k, k] permuted on M
    and C moves M*C blocks of k*k values in a single pass. A small one (at most 65,536
    elements) takes one ``take`` per axis: a few numpy calls where the folded gather costs a
    dozen (a 16 x 16 weight moved in 3 us instead of 20; a deep graph's thousands of small
    tensors made up most of its permute). Each index must hold one entry per element of its
    axis (``ValueError`` otherwise, either way).
    """
    if not axes:
        return array
    if array.dtype == object:
        for axis, idx in axes:
            array = np.take(array, idx, axis=axis)
        return array
    if 0 < array.size <= _CHAINED_ELEMENTS:
        shape = array.shape
        for axis, idx in axes:
            array = array.take(idx, axis=axis)  # the method: np.take's dispatch costs more than the move
        if array.shape != shape:  # as the folded gather's reshape refuses it: never a shorter tensor
            raise ValueError(f"an index of {len(idx)} positions does not fit an axis of shape {shape}")
        return array
    last = max(axis for axis, _ in axes)
    lead_shape = array.shape[: last + 1]
    tail = math.prod(array.shape[last + 1 :])
    if tail == 0 or array.size == 0:
        return array
    element = np.dtype((np.void, array.dtype.itemsize * tail))
    blocks = np.ascontiguousarray(array).reshape(-1).view(element)
    by_axis = dict(axes)
    index = np.zeros(1, dtype=np.int64)
    for axis, dim in enumerate(lead_shape):
        order = by_axis.get(axis)
        digit = np.arange(dim, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
        index = (index[:, None] * dim + digit[None, :]).reshape(-1)
    return np.take(blocks, index).view(array.dtype).reshape(array.shape)


# -- untying shared constants -------------------------------------------------------------
def _untie(analysis: ChannelAnalysis) -> list[dict[str, Any]]:
    """Give each disagreeing use of a shared constant its own copy; returns the key's records."""
    graph = analysis.graph
    model = graph.model
    copies = [plan for plan in analysis.tensors if plan.copy > 0]
    if not copies:
        return []
    inserted: dict[int, list[onnx.NodeProto]] = {}
    records = []
    for plan in copies:
        suffix = plan.tensor[len(plan.source) :]
        leaf = graph.constant_leaf(plan.source)
        assert leaf is not None
        created_nodes: list[str] = []
        if leaf.constant_node is None:
            clone = onnx.TensorProto()
            clone.CopyFrom(graph.initializers[plan.source])
            clone.name = plan.tensor
            model.graph.initializer.append(clone)
        else:
            clone_node = _clone_node(graph.nodes[leaf.constant_node], suffix, {})
            inserted.setdefault(leaf.constant_node, []).append(clone_node)
            created_nodes.append(clone_node.output[0])
        renamed = {plan.source: plan.tensor}
        rewired = []
        for node_index, slot in plan.uses:
            node = model.graph.node[node_index]
            original = node.input[slot]
            chain = graph.constant_leaf(original)
            assert chain is not None
            for chain_index in chain.chain:
                chain_node = graph.nodes[chain_index]
                if chain_node.output[0] not in renamed:
                    clone_node = _clone_node(chain_node, suffix, renamed)
                    inserted.setdefault(chain_index, []).append(clone_node)
                    created_nodes.append(clone_node.output[0])
                    renamed[chain_node.output[0]] = clone_node.output[0]
            node.input[slot] = renamed[original]
            rewired.append({"slot": slot, "from": renamed[original], "to": original, "node_output": node.output[0]})
        records.append({"source": plan.source, "copy": plan.tensor, "nodes": created_nodes, "rewired": rewired})
    if inserted:
        nodes = list(model.graph.node)
        del model.graph.node[:]
        for index, node in enumerate(nodes):
            model.graph.node.append(node)
            model.graph.node.extend(inserted.get(index, []))
    return records


def _clone_node(node: onnx.NodeProto, suffix: str, renamed: Mapping[str, str]) -> onnx.NodeProto:
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    if clone.name:
        clone.name += suffix
    for position, name in enumerate(clone.input):
        clone.input[position] = renamed.get(name, name)
    clone.output[0] = clone.output[0] + suffix
    return clone


def _retie(model: onnx.ModelProto, records: list[dict[str, Any]]) -> None:
    """Remove the copies a key's untying made and point their uses back at the originals."""
    if not records:  # nothing to remove: the graph's nodes are not rewritten
        return
    back = {}
    removed_nodes: set[str] = set()
    removed_tensors: set[str] = set()
    for record in records:
        for rewire in record["rewired"]:
            back[rewire["from"]] = rewire["to"]
        removed_nodes.update(record["nodes"])
        removed_tensors.add(str(record["copy"]))
    kept = [node for node in model.graph.node if not (node.output and node.output[0] in removed_nodes)]
    for node in kept:
        for position, name in enumerate(node.input):
            if name in back:
                node.input[position] = back[name]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    initializers = [t for t in model.graph.initializer if t.name not in removed_tensors]
    if len(initializers) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(initializers)
