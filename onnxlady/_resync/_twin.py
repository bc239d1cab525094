"""Resync of a *twin* suspect: a node-for-node copy of the reference, its tensors found by use site.

The suspect's tensors are found by *use site* (the consumer node's output name and input slot),
so a suspect whose shared constants were untied into copies by ``permute`` still matches. The
groups are solved by :mod:`onnxlady._resync._solver`; the output is the suspect with its stored
elements moved bit for bit (structure, dtypes and storage untouched), with the key that does it.
A suspect that is no twin raises :class:`NotATwin`, and :func:`onnxlady._resync._entry.resync_model`
then matches it across conversions instead.
"""


from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx

from onnxlady._analysis._channels import ChannelAnalysis, TensorPermutation
from onnxlady._errors import OnnxladyError
from onnxlady._graph._functions import inlined_view
from onnxlady._graph._model_graph import ModelGraph, node_label
from onnxlady._io._external import drop_file_reference, has_mapped, is_mapped, load_mapped, mapped_bytes
from onnxlady._io._tensors import FloatConstants, all_finite, is_external, read_float, tensor_holders
from onnxlady._resync._mapped import AlignedArrays, MappedState, ReleasedArrays, ReleasingState, StoredArrays
from onnxlady._resync._solver import (
    PsiTally,
    ResyncOptions,
    ResyncResult,
    ResyncState,
    group_report,
    group_slices,
    key_group,
    percent,
    say,
    true_permutations,
)
from onnxlady._transforms._key import PermutationKey, expr_to_tree, graph_fingerprint
from onnxlady._transforms._permute import _PACKED_TYPES, SourceDigest, _element_dtype, _permute_tensor, _take_axes

__all__ = ["NotATwin", "resync_twin", "twin_leaves"]

def _shape_text(dims: Iterable[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in dims) + "]"


class NotATwin(OnnxladyError):  # ruff: ignore[error-suffix-on-exception-name] - a verdict that selects the across-architecture path, named as docs/design.md names it
    """The suspect is no node-for-node copy of the reference (the message says where)."""


class _SuspectMap:
    """The suspect's tensor behind each of the reference's constant use sites."""

    def __init__(self, reference: ModelGraph, suspect: onnx.ModelProto) -> None:
        self.reference = reference
        # Local functions inlined as the reference's analysis sees them (a function model and
        # its inlined form are twins: onnx's inliner names the inlined nodes alike).
        view = inlined_view(suspect)
        self.suspect = ModelGraph(view.model if view is not None else suspect)  # shapes: a Mul chain needs them
        self._check_nodes()

    def _check_nodes(self) -> None:
        """Every reference node exists in the suspect (by output name) with the same operator.

        And every constant it reads has the same shape (a constant forwarded by an
        Identity/Cast/Reshape chain is checked at its consumer).
        """
        for index, node in enumerate(self.reference.nodes):
            if not node.output or not node.output[0]:
                continue
            self._twin(index)
            for slot, name in enumerate(node.input):
                if (
                    name
                    and self.reference.is_constant(name)
                    and not (slot == 0 and self.reference.is_chain_node(index))
                ):
                    self.leaf_at(index, slot)

    def _twin(self, index: int) -> onnx.NodeProto:
        """The suspect's node with the same first output as reference node ``index``."""
        node = self.reference.nodes[index]
        label = node_label(node, index)
        produced = self.suspect.producer.get(node.output[0]) if node.output else None
        if produced is None:
            raise NotATwin(f"suspect differs from reference: node '{label}' missing")
        twin = self.suspect.nodes[produced[0]]
        if (twin.domain or "", twin.op_type) != (node.domain or "", node.op_type):
            raise NotATwin(
                f"suspect differs from reference: node '{label}' is {node.op_type} in the reference "
                f"but {twin.op_type} in the suspect"
            )
        return twin

    def leaf_at(self, index: int, slot: int) -> str:
        """Name of the suspect's constant leaf read by reference node ``index`` at ``slot``."""
        node = self.reference.nodes[index]
        label = node_label(node, index)
        twin = self._twin(index)
        name = twin.input[slot] if slot < len(twin.input) else ""
        leaf = self.suspect.constant_leaf(name) if name else None
        if leaf is None:
            raise NotATwin(f"suspect differs from reference: node '{label}' input {slot} is not a constant")
        ref_leaf = self.reference.constant_leaf(node.input[slot])
        assert ref_leaf is not None
        ref_dims = list(self.reference.leaf_tensor(ref_leaf).dims)
        sus_dims = list(self.suspect.leaf_tensor(leaf).dims)
        if ref_dims != sus_dims:
            where = "" if leaf.name == ref_leaf.name else f" (suspect tensor '{leaf.name}')"
            raise NotATwin(
                f"suspect differs from reference: tensor '{ref_leaf.name}'{where} has shape "
                f"{_shape_text(sus_dims)} in the suspect vs {_shape_text(ref_dims)} in the reference"
            )
        if self.reference.leaf_tensor(ref_leaf).data_type != self.suspect.leaf_tensor(leaf).data_type:
            raise NotATwin(f"suspect differs from reference: tensor '{ref_leaf.name}' is stored in another type")
        ref_chain = [self.reference.nodes[i].op_type for i in ref_leaf.chain]
        sus_chain = [self.suspect.nodes[i].op_type for i in leaf.chain]
        if ref_chain != sus_chain:
            raise NotATwin(f"suspect differs from reference: tensor '{ref_leaf.name}' is read through other operators")
        return leaf.name

    def plan_leaves(self, plan: TensorPermutation) -> list[str]:
        """The suspect tensors that play ``plan``'s role (one, unless the suspect untied more)."""
        leaves: list[str] = []
        for index, slot in plan.uses:
            if index < 0 or slot < 0:
                continue  # graph outputs and subgraph reads name no slot to match
            leaf = self.leaf_at(index, slot)
            if leaf not in leaves:
                leaves.append(leaf)
        if not leaves:
            raise NotATwin(f"suspect differs from reference: no use of tensor '{plan.source}' to match")
        return leaves


# -- output -----------------------------------------------------------------------------------
def _write_output(
    state: ResyncState, suspect: onnx.ModelProto, leaves: list[list[str]]
) -> tuple[onnx.ModelProto | None, dict[str, bytes | memoryview | Callable[[], np.ndarray]], PermutationKey]:
    """The suspect with its elements moved into the reference's order, and the key that does it.

    Returns ``(model, overrides, key)``. Where every moved tensor is an initializer whose
    elements are stored in ``raw_data`` (nearly always), ``model`` is None and ``overrides``
    maps each moved tensor to its new ``raw_data``: the output is the suspect with those bytes,
    which a streaming writer writes without any copy of the model being built (see
    :func:`build_output` for the model itself). Otherwise ``model`` is that copy, built here.
    """
    analysis = state.analysis
    by_leaf: dict[str, list[int]] = {}
    for number, names in enumerate(leaves):
        for name in names:
            by_leaf.setdefault(name, []).append(number)
    # Work arrays computed on demand (weights left in their files): the moved tensors are
    # computed from the stored ones, one at a time, when the writer asks for them.
    deferred = isinstance(state.work, AlignedArrays)
    fresh = {} if deferred else _fresh_initializers(state, suspect, by_leaf, leaves)
    initializers = {tensor.name for tensor in suspect.graph.initializer}
    holders = tensor_holders(suspect)
    streamed = all(
        name in initializers
        and (holders[name].HasField("raw_data") or (deferred and is_mapped(holders[name])))
        and (not is_external(holders[name]) or deferred)
        and holders[name].data_type not in _PACKED_TYPES  # refused by _permute_tensor, on the other path
        for name in by_leaf
    )
    output = None if streamed else _copy_model(suspect, {name: array.data.cast("B") for name, array in fresh.items()})
    if output is not None and has_mapped(output):
        load_mapped(output)  # _permute_tensor moves bytes in place: they must be in the model
    output_holders = tensor_holders(output) if output is not None else holders
    overrides: dict[str, bytes | memoryview | Callable[[], np.ndarray]] = {}
    fingerprint = graph_fingerprint(suspect)
    group_ids = {g.root: g.id for g in state.order}
    aligned = analysis.perms_from_match(state.match)
    digest = SourceDigest()  # what unpermute_model checks its result against
    moved = _MovedTensors(digest)
    entries = []
    for name, plans in by_leaf.items():
        plan = analysis.tensors[plans[0]]
        after: bytes | memoryview
        if deferred and output is None:
            axes = [(axis, analysis.index_array(expr, aligned)) for axis, expr in plan.axes]
            _check_shared(holders[name], axes, [analysis.tensors[p] for p in plans[1:]], state)
            # Hashed when first computed (by the writer or the audit), not computed once more here.
            overrides[name] = moved.later(name, holders[name], axes, hashed=digest.expect(name))
        elif name in fresh:
            after = fresh[name].data.cast("B")  # hashed as it is: no bytes copy
        else:
            axes = [(axis, analysis.index_array(expr, aligned)) for axis, expr in plan.axes]
            _check_shared(output_holders[name], axes, [analysis.tensors[p] for p in plans[1:]], state)
            # Permuted in the copy when there is one; else into new bytes, the suspect untouched.
            after = _permute_tensor(output_holders[name], axes)[1] if output is not None else _moved_bytes(holders[name], axes)
        if not (deferred and output is None):
            if output is None:
                overrides[name] = after
            if digest.expect(name):
                digest.add(name, after)
        trees = [
            {"axis": axis, "expr": expr_to_tree(analysis.solver.resolve(expr), group_ids, analysis.solver.find)}
            for axis, expr in plan.axes
        ]
        entries.append({"tensor": name, "source": name, "axes": trees})
    key = (_PendingDigestKey if moved.pending else PermutationKey)(
        source_sha256="",
        source_fingerprint=fingerprint,  # unpermuting gives the suspect's graph, re-ordered
        permuted_fingerprint=fingerprint,
        groups=[key_group(group, state.match[group.id]) for group in state.order],
        tensors=entries,
        untied=[],  # the output keeps the suspect's structure, copies included
        source_weights_sha256="" if moved.pending else digest.hexdigest(),
        extra={
            "resync": {
                "reference_fingerprint": graph_fingerprint(analysis.model),
                "method": state.options.method,
                "refine": state.options.refine,
            }
        },
    )
    if isinstance(key, _PendingDigestKey):
        key.pending_digest = moved.hexdigest
    return output, overrides, key


class _MovedTensors:
    """The deferred output's moved tensors, each hashed for the key's digest when first computed.

    Computing a moved tensor (a gather of a whole weight) only to hash it, then again when the
    writer or the audit reads it, moved every weight twice; the digest is now taken from the
    first computation, and :meth:`hexdigest` computes only those never asked for.
    """

    def __init__(self, digest: SourceDigest) -> None:
        self._digest = digest
        self.pending: dict[str, Callable[[], object]] = {}  # tensors still to hash, by name

    def later(
        self, name: str, tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]], *, hashed: bool
    ) -> MovedTensor:
        """The moved elements of ``tensor`` computed when asked for; hashed the first time if ``hashed``."""
        compute = MovedTensor(self, name, tensor, axes)
        if hashed:
            self.pending[name] = compute
        return compute

    def hexdigest(self) -> str:
        """The digest of every moved tensor, computing (hashed, then dropped) those never asked for."""
        for compute in list(self.pending.values()):
            compute()
        return self._digest.hexdigest()


class MovedTensor:
    """One moved tensor of the deferred output, computed when called (see :class:`_MovedTensors`)."""

    def __init__(self, owner: _MovedTensors, name: str, tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]]) -> None:
        self._owner, self._name, self._tensor, self._axes = owner, name, tensor, axes

    def __call__(self) -> np.ndarray:
        """The moved elements, hashed for the key's digest the first time they are computed."""
        array = self.unhashed()
        if self._owner.pending.pop(self._name, None) is not None:
            self._owner._digest.add_now(self._name, array.data)  # hashes as tobytes() would: contiguous
        return array

    def unhashed(self) -> np.ndarray:
        """The moved elements, not hashed: for a reader that never writes the key (the audit).

        The tensor stays pending: a key's digest read later hashes it then (computed again), so
        the digest is the same either way.
        """
        return _moved_array(self._tensor, self._axes)


class _PendingDigestKey(PermutationKey):
    """A key whose ``source_weights_sha256`` is computed when first read (see :class:`_MovedTensors`)."""

    pending_digest: Callable[[], str] | None = None

    @property  # type: ignore[override]
    def source_weights_sha256(self) -> str:
        if self.pending_digest is not None:
            self._source_weights_sha256 = self.pending_digest()
            self.pending_digest = None
        return self._source_weights_sha256

    @source_weights_sha256.setter
    def source_weights_sha256(self, value: str) -> None:
        self._source_weights_sha256 = value
        self.pending_digest = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PermutationKey) and dataclasses.asdict(self) == dataclasses.asdict(other)


def _moved_bytes(tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]]) -> bytes:
    """The ``raw_data`` that :func:`_permute_tensor` would store in ``tensor``, which is left as it is."""
    return _moved_array(tensor, axes).tobytes()


def _moved_array(tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """:func:`_moved_bytes` as an array of opaque elements (read from its file when mapped)."""
    raw = mapped_bytes(tensor) if is_mapped(tensor) else tensor.raw_data
    dims = tuple(int(d) for d in tensor.dims)
    itemsize = len(raw) // max(1, int(np.prod(dims)))
    return np.ascontiguousarray(_take_axes(np.frombuffer(raw, dtype=_element_dtype(itemsize)).reshape(dims), axes))


def _moved_later(tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]]) -> Callable[[], np.ndarray]:
    """The moved elements of ``tensor``, computed when a streaming writer asks for them."""
    return lambda: _moved_array(tensor, axes)


def build_output(
    suspect: onnx.ModelProto, overrides: dict[str, bytes | memoryview | Callable[[], np.ndarray]]
) -> onnx.ModelProto:
    """The output model itself: a copy of the suspect whose ``overrides`` tensors hold those bytes.

    Tensors still in their external files stay there (see :func:`onnxlady._io._external.load_mapped`).
    """
    return _copy_model(suspect, {name: value() if callable(value) else value for name, value in overrides.items()})


def _fresh_initializers(
    state: ResyncState, suspect: onnx.ModelProto, by_leaf: dict[str, list[int]], leaves: list[list[str]]
) -> dict[str, np.ndarray]:
    """New contents of the float32 raw initializers: the aligned working arrays themselves.

    The working arrays were read from those bytes and only ever moved (``np.take``), so they
    hold the re-ordered elements bit for bit; this saves permuting the stored tensor again.
    They are turned into bytes one tensor at a time, as the output is built (never all at once).
    """
    if sys.byteorder != "little":
        return {}
    initializers = {tensor.name: tensor for tensor in suspect.graph.initializer}
    fresh = {}
    for name, plans in by_leaf.items():
        tensor = initializers.get(name)
        work = state.work[plans[0]]
        if (
            tensor is not None
            and len(plans) == 1
            and leaves[plans[0]][0] == name
            and tensor.data_type == onnx.TensorProto.FLOAT
            and tensor.HasField("raw_data")
            and work.dtype == np.float32
            and work.shape == tuple(tensor.dims)
        ):
            fresh[name] = np.ascontiguousarray(work)
    return fresh


def _copy_model(model: onnx.ModelProto, fresh: dict[str, bytes | memoryview | np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``fresh`` hold those bytes instead.

    Their old bytes are never copied, and each new tensor's bytes exist twice only while it
    is stored (protobuf copies what it is given).
    """
    output = onnx.ModelProto()
    _copy_fields(model, output, skip="graph")
    _copy_fields(model.graph, output.graph, skip="initializer")
    for tensor in model.graph.initializer:
        target = output.graph.initializer.add()
        if tensor.name in fresh:
            _copy_fields(tensor, target, skip="raw_data")
            target.raw_data = bytes(fresh[tensor.name])
            if is_mapped(target):  # its new bytes are in the model now, not in the file
                drop_file_reference(target)
        else:
            target.CopyFrom(tensor)
    return output


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    """Copy every field of a protobuf message but ``skip`` (whose value is never read)."""
    for descriptor in source.DESCRIPTOR.fields:
        name = descriptor.name
        if name == skip:
            continue
        repeated = descriptor.is_repeated if hasattr(descriptor, "is_repeated") else descriptor.label == 3
        if repeated:
            values = getattr(source, name)
            if len(values):
                getattr(target, name).extend(values)
        elif source.HasField(name):
            if descriptor.message_type is not None:
                getattr(target, name).CopyFrom(getattr(source, name))
            else:
                setattr(target, name, getattr(source, name))


def _check_shared(
    tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]], others: list[TensorPermutation], state: ResyncState
) -> None:
    """A suspect tensor shared by uses that need different orders must come out the same."""
    if not others:
        return
    wanted = _moved_copy(tensor, axes)
    for plan in others:
        other_axes = [(axis, state.analysis.index_array(expr, state.analysis.perms_from_match(state.match))) for axis, expr in plan.axes]
        if _moved_copy(tensor, other_axes) != wanted:
            raise OnnxladyError(
                f"suspect tensor '{tensor.name}' is shared by uses that were matched with different "
                "permutations; give each use its own copy and resync again"
            )


def _moved_copy(tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]]) -> bytes:
    if is_mapped(tensor):
        return _moved_bytes(tensor, axes)
    clone = onnx.TensorProto()
    clone.CopyFrom(tensor)
    return _permute_tensor(clone, axes)[1]



# -- reading the reference without keeping it -------------------------------------------------
def _read_unkept(values: FloatConstants, name: str) -> np.ndarray:
    """``values.array(name)`` read anew and not kept in ``values``'s cache."""
    return read_float(values.holders[name], f"tensor '{name}' of the {values.which}")


def _check_finite_unkept(values: FloatConstants, names: Iterable[str]) -> None:
    """:meth:`FloatConstants.check_finite`, keeping none of the arrays it reads.

    Raises:
        OnnxladyError: one of them holds NaN or Inf (the message names it), or cannot be read.
    """
    for name in names:
        if not all_finite(_read_unkept(values, name)):
            raise OnnxladyError(f"tensor '{name}' of the {values.which} holds NaN or Inf values")


def _unchanged(
    analysis: ChannelAnalysis, leaves: list[list[str]], reference: FloatConstants, suspect: FloatConstants, released: bool
) -> frozenset[str]:
    """The planned tensors the suspect stores bit for bit as the reference does, under the same name.

    The groups they carry are kept in the stored order unless a move agrees with the reference
    on more elements (:meth:`~onnxlady._resync._solver.ResyncState.keep_stored_orders`). A
    leading run of elements is compared first: a moved or perturbed tensor differs there and
    is not compared whole. ``released``: the reference is read without being kept.
    """
    found: set[str] = set()
    for plan, names in zip(analysis.tensors, leaves):
        if names != [plan.source] or plan.source in found:
            continue  # (a tensor the suspect untied into copies is not known unchanged)
        ref = _read_unkept(reference, plan.source) if released else reference.array(plan.source)
        sus = suspect.array(plan.source)
        head = min(ref.size, 64)
        if ref.shape == sus.shape and np.array_equal(ref.reshape(-1)[:head], sus.reshape(-1)[:head]):
            if np.array_equal(ref, sus):
                found.add(plan.source)
    return frozenset(found)


# -- entry point ------------------------------------------------------------------------------
def twin_leaves(analysis: ChannelAnalysis, suspect: onnx.ModelProto) -> list[list[str]]:
    """The suspect's tensors behind each of the reference's planned tensors.

    Raises:
        NotATwin: the suspect is no node-for-node copy of the analysed reference.
    """
    site_map = _SuspectMap(analysis.graph, suspect)
    leaves = [site_map.plan_leaves(plan) for plan in analysis.tensors]
    if site_map.suspect.opsets != analysis.graph.opsets:
        raise NotATwin("suspect differs from reference: other opsets")
    if site_map.suspect.model is not suspect:  # an inlined view: only the suspect's own tensors can be written
        held = tensor_holders(suspect)
        inside = next((name for names in leaves for name in names if name not in held), None)
        if inside is not None:
            raise NotATwin(f"suspect's tensor '{inside}' lives inside a local function")
    return leaves


def resync_twin(
    reference: onnx.ModelProto,
    suspect: onnx.ModelProto,
    analysis: ChannelAnalysis,
    leaves: list[list[str]],
    options: ResyncOptions,
    true_key: PermutationKey | None,
    progress: Callable[[str], None] | None,
    constants: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
) -> ResyncResult:
    """Resync a twin suspect whose tensors :func:`twin_leaves` found.

    ``constants``: the reference's and the suspect's constants as the caller read them
    (:func:`~onnxlady._io._tensors.read_constants`, the audit's), reused instead of read again.

    Raises:
        OnnxladyError: a compared weight holds NaN or Inf, or the true key does not fit.
    """
    true_perms = true_permutations(analysis, true_key)
    # Only the compared tensors are read, and checked finite (see FloatConstants.check_finite).
    known_reference, known_suspect = constants if constants is not None else (None, None)
    ref_values = FloatConstants(reference, "reference", known_reference)
    sus_values = FloatConstants(suspect, "suspect", known_suspect)
    mapped = has_mapped(reference) or has_mapped(suspect)
    # An inline reference the caller did not read is read group by group and released
    # (ReleasingState); its check here keeps nothing.
    released = not mapped and constants is None
    if released:
        _check_finite_unkept(ref_values, (plan.source for plan in analysis.tensors))
    else:
        ref_values.check_finite(plan.source for plan in analysis.tensors)
    sus_values.check_finite(name for names in leaves for name in names)
    unchanged = _unchanged(analysis, leaves, ref_values, sus_values, released)
    order = analysis.permutable_groups
    slices, touched = group_slices(analysis, {g.id for g in order})
    if mapped:
        # Weights left in their files: read per group as the solver asks, never all at once.
        plans = analysis.tensors
        state: ResyncState = MappedState(
            analysis=analysis,
            order=order,
            slices=slices,
            touched=touched,
            reference=StoredArrays(len(plans), lambda number: ref_values.array(plans[number].source)),
            work=AlignedArrays(len(leaves), lambda number: sus_values.array(leaves[number][0]), analysis),
            options=options,
        )
    elif released:
        plans = analysis.tensors
        state = ReleasingState(
            analysis=analysis,
            order=order,
            slices=slices,
            touched=touched,
            reference=ReleasedArrays(len(plans), lambda number: _read_unkept(ref_values, plans[number].source)),
            work=[sus_values.array(names[0]) for names in leaves],
            options=options,
        )
        del sus_values  # as below
    else:
        state = ResyncState(
            analysis=analysis,
            order=order,
            slices=slices,
            touched=touched,
            reference=[ref_values.array(plan.source) for plan in analysis.tensors],
            work=[sus_values.array(names[0]) for names in leaves],
            options=options,
        )
        # From here state.work alone holds the suspect's arrays as read: each one goes as the
        # solver moves its tensor, instead of the cache keeping every weight twice to the end.
        del sus_values
    rounds = state.run(progress)
    state.keep_stored_orders(unchanged)  # the stored order is kept where it explains as much (see there)
    tally = PsiTally()
    groups = [group_report(state, group, tally, true_perms.get(group.id)) for group in order]
    say(progress, "resync: writing the re-ordered suspect")
    model, overrides, key = _write_output(state, suspect, leaves)
    return ResyncResult(
        built=model,
        unbuilt=(suspect, overrides) if model is None else None,
        builder=build_output,
        key=key,
        groups=groups,
        method=options.method,
        refined_rounds=rounds,
        psi=percent(tally.hits, tally.total) if true_perms else None,
        psi_distinguishable=percent(tally.hits_distinguishable, tally.total_distinguishable) if true_perms else None,
    )
