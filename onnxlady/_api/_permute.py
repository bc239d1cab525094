"""``onnxlady.permute``: shuffle the neurons of every permutable group, with a key that undoes it.

A model given as a path and written to an output path takes the streaming route the command
line uses: the model is loaded once, small tensors are permuted in place in that private copy,
large ones only as the writer streams them out, so peak memory stays near the model's size. A
model given as an ``onnx.ModelProto`` is copied first and the copy is permuted, so the caller's
model never changes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx

from onnxlady._analysis._channels import ChannelAnalysis, analyze, overridable_initializers
from onnxlady._api._checks import check_seed
from onnxlady._api._memory import check_memory
from onnxlady._api._results import Result, read_back
from onnxlady._api._sources import (
    ModelSource,
    OutputPath,
    check_external_inputs,
    check_outputs,
    jsonable,
    key_text,
    open_model,
    output_path,
    path_text,
    source_path,
)
from onnxlady._api._verify import ShapeOverrides, ValueRanges, VerifyResult, check_verify_options
from onnxlady._api._verify import (
    verify as _run_verify,  # ``verify`` is also permute's flag
)
from onnxlady._errors import OnnxladyError
from onnxlady._io._inputs import load_json
from onnxlady._io._outputs import OutputSet, external_data_path
from onnxlady._io._stream import Override
from onnxlady._transforms._key import PermutationKey, graph_fingerprint
from onnxlady._transforms._permute import (
    DeferredTensors,
    draw_permutations,
    permute_model,
)

if TYPE_CHECKING:
    from onnxlady._verify._reference_runs import CheckNotRunError

#: Permutations given instead of random ones: a JSON file ({group id: [..]} or a key file), a
#: mapping group id -> permutation, or a key.
PermsSource = str | os.PathLike[str] | Mapping[str, Sequence[int]] | PermutationKey


@dataclass
class PermuteResult(Result):
    """The outcome of :func:`permute`: the permuted model, its key and what moved.

    Attributes:
        key: restores the original bit for bit (:func:`unpermute`).
        source: the input model's path; ``None`` for a model given in memory.
        output: where the permuted model was written; ``None`` when it was kept in memory.
        key_path: where the key was written; ``None`` when it was not.
        permuted_groups: ids of the groups permuted.
        permuted_neurons: neurons moved, over those groups.
        permutable_groups: how many groups of the model could move.
        untied_constants: shared constants given one copy per use that needs its own permutation.
        verify: the equivalence check, when ``verify=True`` was given.
        overridable_permuted: permuted initializers that are also listed as graph inputs (a
            model listing every initializer so, as IR version 3 requires): a caller feeding
            its own values for them must permute those values with the key.
    """

    key: PermutationKey = field(repr=False)
    source: Path | None
    output: Path | None
    key_path: Path | None
    permuted_groups: list[str]
    permuted_neurons: int
    permutable_groups: int
    untied_constants: list[str]
    verify: VerifyResult | None = None
    overridable_permuted: list[str] = field(default_factory=list)
    _model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def model(self) -> onnx.ModelProto:
        """The permuted model.

        When it was streamed to :attr:`output`, it is read back from there on first use (the
        streaming route never holds it whole in memory).
        """
        if self._model is None:
            self._model = read_back(self.output, "permuted")
        return self._model

    @property
    def equivalent(self) -> bool | None:
        """Whether the check's verdict is ``equivalent`` (False for ``inconclusive`` too); ``None`` without a check."""
        return None if self.verify is None else self.verify.equivalent

    @property
    def exit_code(self) -> int:
        """1 when the equivalence check's verdict is ``not-equivalent`` or ``inconclusive``, else 0."""
        return 0 if self.verify is None or self.verify.equivalent else 1

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        key_out: str | os.PathLike[str] | None = None,
        external_data: bool = False,
    ) -> PermutationKey:
        """Write the permuted model and its key, each atomically.

        Args:
            path: the model file to write.
            key_out: the key file (default: ``PATH.key.json``).
            external_data: save the weights to ``PATH.data``.

        Returns:
            The key as written: :attr:`key` with the sha256 of the written model file.

        Raises:
            OnnxladyError: the key and the model would be the same file, a folder does not exist,
                or a file cannot be written.
        """
        target = Path(path)
        key_path = Path(key_out) if key_out is not None else target.with_name(target.name + ".key.json")
        check_outputs(target, [], [key_path], overwrite_input=True)
        key = dataclasses.replace(self.key)
        with OutputSet() as outputs:  # the model and its key: both or neither
            key.permuted_sha256 = outputs.write_model(target, self.model, external_data=external_data, digest=True)
            key.permuted_data_sha256 = outputs.digest_of(external_data_path(target)) if external_data else ""
            outputs.write_text(key_path, key_text(key))
        return key

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady permute --json`` prints."""
        return jsonable(
            {
                "model": path_text(self.source),
                "output": path_text(self.output),
                "key": path_text(self.key_path),
                "seed": self.key.seed,
                "permuted_groups": len(self.permuted_groups),
                "permuted_neurons": self.permuted_neurons,
                "permutable_groups": self.permutable_groups,
                "untied_constants": self.untied_constants,
                "verify": self.verify.report.to_dict() if self.verify is not None else None,
                # (only where there are some: every other document stays as it was)
                **({"overridable_permuted": self.overridable_permuted} if self.overridable_permuted else {}),
            }
        )

    def to_text(self) -> str:
        """What ``onnxlady permute`` prints: groups moved, files written, the check's table."""
        lines = [
            (
                f"permuted {len(self.permuted_groups)} of {self.permutable_groups} permutable groups "
                f"({self.permuted_neurons} neurons) -> {_place(self.output)}"
            ),
            f"key -> {_place(self.key_path)}",
        ]
        if self.untied_constants:
            lines.append(f"untied shared constants: {', '.join(self.untied_constants)}")
        if self.overridable_permuted:
            names = self.overridable_permuted
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            lines.append(
                f"note: {len(names)} permuted initializer{'s are' if len(names) != 1 else ' is'} also graph input"
                f"{'s' if len(names) != 1 else ''} (every initializer is listed, "
                f"as IR version 3 requires): a caller feeding its own values must permute them with the key: {shown}"
            )
        if self.verify is not None:
            lines.append(self.verify.to_text())
        return "\n".join(lines)


def permute(
    model: ModelSource,
    *,
    output: OutputPath = None,
    seed: int = 0,
    key_out: OutputPath = None,
    group: str | Sequence[str] | None = None,
    perms: PermsSource | None = None,
    verify: bool = False,
    provider: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    iterations: int = 1,
    input_seed: int = 0,
    shape: ShapeOverrides = (),
    add_output: str | Sequence[str] = (),
    val_range: ValueRanges = (),
    load_inputs: str | os.PathLike[str] | None = None,
    data_loader_script: str | None = None,
    squash_inputs: bool = True,
    external_data: bool = False,
    overwrite_input: bool = False,
    progress: Callable[[str], None] | None = None,
    max_memory: str | int | None = None,
    kv_state: bool = False,
) -> PermuteResult:
    """Permute the neurons of every permutable group (or of some), keeping the function.

    The input model is never modified. With a path in and ``output`` given, large tensors are
    permuted while the file is streamed out (peak memory about the model's size); otherwise the
    permuted model is built in memory (a ``ModelProto`` input is copied first).

    Args:
        model: a path to an ONNX file or an ``onnx.ModelProto``.
        output: write the permuted model here (atomically); ``None`` keeps it in memory only.
        seed: seed of the random permutations (each group draws from its own stream).
        key_out: where to write the key (default ``OUTPUT.key.json`` when ``output`` is given;
            no key file when neither is given).
        group: permute only this group or these groups (ids as :func:`inspect` reports them).
        perms: the permutations to apply instead of random ones: a JSON file ({group id:
            permutation} or a key file), a mapping, or a :class:`PermutationKey`.
        verify: check the result with ONNX Runtime (the options below apply).
        provider: ``"auto"``, ``"cuda"`` or ``"cpu"`` for the check.
        atol: absolute tolerance of the check (``None``: as :func:`verify` chooses it).
        rtol: relative tolerance of the check (``None``: as :func:`verify` chooses it).
        iterations: random input batches of the check.
        input_seed: seed of the check's inputs.
        shape: input shapes for dynamic dimensions (see :func:`verify`).
        add_output: intermediate tensors the check compares too.
        val_range: value ranges of the check's generated inputs (see :func:`verify`).
        load_inputs: feeds for the check instead of generated ones (see :func:`verify`).
        data_loader_script: ``"file.py:function"`` returning the check's feeds (see :func:`verify`).
        squash_inputs: the check also compares the inputs of squashing ops making outputs (see :func:`verify`).
        external_data: save the weights to ``OUTPUT.data`` (always so for a model read that way).
        overwrite_input: allow ``output`` to be the input file.
        progress: called with one line per step.
        max_memory: refuse to start when the estimated peak memory exceeds this (bytes, or a
            size such as ``"2G"``); see :mod:`onnxlady._api._memory`.
        kv_state: treat each KV cache (a ``past_key_values.*`` input and its ``present.*``
            output) as one recurrent state and permute it with the attention's heads and head
            dims, instead of pinning them as graph interface. The permuted model then expects its
            own cache (decoding from an empty cache is unchanged); the key lists the moved states
            under ``kv_state``, and the check runs two decoding steps.

    Returns:
        The permuted model (:attr:`PermuteResult.model`), its key and what moved.

    Raises:
        OnnxladyError: bad input or options (an unknown or frozen group, permutations that are
            not permutations, an output that is an input...), a model with nothing permutable
            (the message says why: every group's freeze reasons by kind, bodies left closed),
            or a failed write. Files are checked before any work and nothing is left behind on
            failure.
    """
    source = source_path(model)
    target = output_path(output)
    key_path = output_path(key_out)
    if key_path is None and target is not None:
        key_path = target.with_name(target.name + ".key.json")
        if len(os.fsencode(key_path.name)) > 255:
            raise OnnxladyError(f"{target.name[:40]}...: the key's default name would be too long (pass --key-out)")
    extra = [key_path] if key_path is not None else []
    # Every file read is an input no output may replace: the model, a perms file, the check's feeds.
    read = [source, source_path(perms), source_path(load_inputs)]
    if isinstance(data_loader_script, str) and data_loader_script:
        read.append(Path(data_loader_script.rsplit(":", 1)[0] if ":" in data_loader_script else data_loader_script))
    check_outputs(target, read, extra, overwrite_input=overwrite_input)
    check_memory(max_memory, "permute", [source], mapped=target is not None)
    _check_seed(seed)
    # The check's options are checked even without ``verify``: a bad value is refused, never ignored.
    check_verify_options(
        atol=atol, rtol=rtol, iterations=iterations, shape=shape, provider=provider, val_range=val_range,
        input_seed=input_seed,
    )  # fmt: skip
    # With an output file, external weights stay in their files: each is read as it is written.
    # The key records the file's sha256: hashed beside the load and the analysis, awaited below.
    # (The nodes as the check read them go to the analysis's graph: read once, as inspect does.)
    opened = open_model(model, progress=progress, map_external=target is not None, hash_later=True, node_table=True)
    check_external_inputs(target, [opened], extra, overwrite_input=overwrite_input)
    # Our own load may be rewritten in place; a caller's ModelProto is copied first (a copy's
    # graph is another: the graph then reads the copy's nodes itself, see NodeTable.take).
    working = opened.writable()
    nodes, opened.nodes = opened.nodes, None
    if perms is not None and not kv_state and _made_with_kv_state(perms):
        # Its group ids number the groups of an analysis with the caches as state.
        raise OnnxladyError("the permutations come from a key made with the KV caches as state: pass kv_state too")
    # The key's source fingerprint, from the nodes as the check read them (before the analysis takes them).
    fingerprint = graph_fingerprint(working, nodes)
    analysis = analyze(working, progress=progress, kv_state=bool(kv_state), nodes=nodes)
    if not analysis.permutable_groups:  # an unchanged copy would pass for a permuted one
        raise OnnxladyError(nothing_permutable(analysis, source.name if source else "the model"))
    # Large tensors are permuted as the writer streams them out: one copy of the weights at a time.
    deferred = DeferredTensors() if target is not None and opened.owned else None
    try:
        chosen = _choose_permutations(analysis, seed, _group_ids(group), perms)
        key = permute_model(
            analysis, chosen, source_sha256=opened.content_sha256(), source_file=source.name if source else "",
            seed=None if perms is not None else seed, progress=progress, deferred=deferred,
            fingerprint=fingerprint,
        )  # fmt: skip
    except OnnxladyError as exc:
        made_for = _key_fingerprint(perms) if perms is not None else None
        if made_for is not None and made_for != graph_fingerprint(working):
            origin = source_path(perms) or "the key"
            raise OnnxladyError(f"{origin} was made for another model (its graph fingerprint is not this model's): {exc}") from exc
        raise
    summary = analysis.summary()
    result = PermuteResult(
        key=key,
        source=source,
        output=target,
        key_path=key_path,
        permuted_groups=list(chosen),
        permuted_neurons=sum(analysis.group(gid).size for gid in chosen),
        permutable_groups=int(summary["permutable_groups"]),  # type: ignore[call-overload]
        untied_constants=list(summary["untied_constants"]),  # type: ignore[call-overload]
        overridable_permuted=_overridable_permuted(analysis, key),
        _model=None if deferred is not None else working,
    )
    del analysis, summary
    not_run: CheckNotRunError | None = None
    # The model, its data file and its key are one output set: all are written, or none is.
    with OutputSet() as outputs:
        if target is not None:
            if progress:
                progress(f"saving {target}")
            written_external = external_data or opened.external_data
            key.permuted_sha256 = outputs.write_model(
                target, working, external_data=written_external, digest=True,
                overrides=cast("dict[str, Override]", deferred.overrides) if deferred is not None else None,
            )  # fmt: skip
            key.permuted_data_sha256 = outputs.digest_of(external_data_path(target)) if written_external else ""
        if deferred is not None:
            deferred.finish(key)
        del working, opened
        if key_path is not None:
            outputs.write_text(key_path, key_text(key))
        if verify:
            from onnxlady._verify._reference_runs import CheckNotRunError  # (here: only a check imports it)

            # The staged model is checked before it is committed: a failed check leaves nothing behind.
            candidate = outputs.staged(target) if target is not None else result.model
            try:
                result.verify = _run_verify(
                    model, candidate, provider=provider, atol=atol, rtol=rtol, iterations=iterations,
                    input_seed=input_seed, shape=shape, add_output=add_output, val_range=val_range,
                    load_inputs=load_inputs, data_loader_script=data_loader_script,
                    squash_inputs=squash_inputs, progress=progress,
                )  # fmt: skip
            except CheckNotRunError as exc:
                # The check says nothing about the permuted model (the reference itself does not
                # run on these inputs): the permutation succeeded, so its files are kept.
                not_run = exc
            except OnnxladyError as exc:
                raise OnnxladyError(f"{exc} (the permuted model failed its check: nothing was written)") from exc
            else:
                if target is not None:  # the report names the file as committed, not as staged
                    result.verify = dataclasses.replace(result.verify, candidate=target)
    if not_run is not None:
        raise OnnxladyError(_unchecked(result, not_run)) from not_run
    return result


# -- helpers ------------------------------------------------------------------------------
def read_perms(perms: PermsSource) -> dict[str, np.ndarray]:
    """Permutations by group id from a JSON file ({group id: [..]} or a key file), a mapping or a key.

    Raises:
        OnnxladyError: the file is missing or not JSON, or a permutation is not a list of integers.
    """
    if isinstance(perms, PermutationKey):
        return perms.permutations()
    if isinstance(perms, Mapping):
        return _perm_arrays(perms, "perms")
    if not isinstance(perms, (str, os.PathLike)):
        raise OnnxladyError(f"perms: expected a path, a mapping or a PermutationKey, got {type(perms).__name__}")
    path = Path(perms)
    data = load_json(path, "JSON permutation file")  # a regular file, bounded nesting, finite numbers
    if isinstance(data, dict) and "groups" in data:
        try:
            data = {str(g["id"]): g["perm"] for g in data["groups"]}
        except (KeyError, TypeError) as exc:
            raise OnnxladyError(f"{path}: malformed key (each group needs 'id' and 'perm')") from exc
    if not isinstance(data, dict):
        raise OnnxladyError(f"{path}: expected a JSON object {{group id: permutation}}")
    return _perm_arrays(data, str(path))


def _made_with_kv_state(perms: PermsSource) -> bool:
    """Whether ``perms`` is a key (in memory or a key file) that moved KV-cache states."""
    if isinstance(perms, PermutationKey):
        return bool(perms.extra.get("kv_state"))
    if isinstance(perms, (str, os.PathLike)):
        data = load_json(Path(perms), "JSON permutation file")
        return isinstance(data, dict) and bool(data.get("kv_state"))
    return False


def _key_fingerprint(perms: PermsSource) -> str | None:
    """The graph fingerprint of the model a key (in memory or a key file) was made with, if it is a key."""
    if isinstance(perms, PermutationKey):
        return perms.source_fingerprint
    if isinstance(perms, (str, os.PathLike)):
        data = load_json(Path(perms), "JSON permutation file")
        source = data.get("source") if isinstance(data, dict) else None
        fingerprint = source.get("graph_fingerprint") if isinstance(source, dict) else None
        return fingerprint if isinstance(fingerprint, str) else None
    return None


def _perm_arrays(data: Mapping[Any, Any], origin: str) -> dict[str, np.ndarray]:
    perms = {}
    for gid, given in data.items():
        values = given
        if isinstance(given, np.ndarray) and given.ndim == 1 and np.issubdtype(given.dtype, np.integer):
            values = given.tolist()
        elif isinstance(given, tuple):
            values = list(given)
        if not isinstance(values, list) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
        ):
            raise OnnxladyError(f"{origin}: the permutation of group {gid} must be a list of integers")
        if any(not 0 <= int(v) < len(values) for v in values):  # also keeps 2**63 out of int64
            raise OnnxladyError(f"{origin}: the permutation of group {gid} is not a permutation of {len(values)}")
        perms[str(gid)] = np.asarray(values, dtype=np.int64)
    return perms


def _packed_weights(analysis: ChannelAnalysis) -> list[str]:
    """The Conv/Gemm/MatMul weights stored as int4 or uint4 (a QDQ int4 quantizer's), as ``Op 'node' reads 'leaf'``.

    Their producers make no neurons (the rules refuse to move half bytes): without this, a model
    whose every weight is int4 read "no Conv, Gemm or MatMul with a constant weight".
    """
    graph = analysis.graph
    found = []
    for index, node in enumerate(graph.nodes[: graph.main_count]):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        leaf = graph.constant_leaf(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if leaf is not None and graph.dtypes.get(leaf.name) in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            found.append(f"{node.op_type} '{node.name or index}' reads '{leaf.name}'")
    return found


def nothing_permutable(analysis: ChannelAnalysis, name: str = "the model") -> str:
    """Why no group of ``analysis`` can move, in one line (for ``permute``'s refusal and ``inspect``).

    Args:
        analysis: a model's analysis with no permutable group.
        name: how to call the model.

    Returns:
        ``nothing to permute in NAME: ...`` with the freeze reasons by kind (one example of
        each, the most frequent first) and the If/Loop/Scan bodies left closed, or, where no
        operator makes neurons at all, that.
    """
    frozen = [group for group in analysis.groups if group.frozen and group.size > 1]
    parts = []
    if frozen:
        examples: dict[str, str] = {}
        counts: dict[str, int] = {}
        for group in frozen:
            for reason in group.reasons:
                counts[reason.kind] = counts.get(reason.kind, 0) + 1
                examples.setdefault(reason.kind, reason.message)
        listing = "; ".join(
            f"{kind} x{counts[kind]} (e.g. {examples[kind]})" for kind in sorted(counts, key=lambda k: -counts[k])
        )
        parts.append(f"all {len(frozen)} groups of two or more neurons are frozen: {listing}")
    elif analysis.groups:
        parts.append("no group has two or more neurons")
    elif packed := _packed_weights(analysis):
        parts.append(f"no operator makes neurons that can move: {len(packed)} weights pack two values per byte "
                     f"(int4/uint4, moving them would split bytes and blocks; e.g. {packed[0]})")
    elif stopped := _stopped_producers(analysis):
        parts.append(f"no operator makes neurons: {len(stopped)} Conv/Gemm/MatMul with a constant weight could not "
                     f"apply its rule (e.g. {stopped[0]})")
    else:
        parts.append("no operator makes neurons (no Conv, Gemm or MatMul with a constant weight, no embedding table)")
    if analysis.closed_subgraphs:
        parts.append("bodies not analysed: " + "; ".join(analysis.closed_subgraphs))
    return f"nothing to permute in {name}: " + "; ".join(parts)


def _overridable_permuted(analysis: ChannelAnalysis, key: PermutationKey) -> list[str]:
    """The permuted initializers listed as graph inputs (the analysis froze any listed alone)."""
    listed = overridable_initializers(analysis.graph)
    if not listed:
        return []
    return sorted({str(t["source"]) for t in key.tensors if t["source"] in listed and _moves(t["axes"])})


def _moves(expr: object) -> bool:
    """Whether a key's expression (or list of them) names a group: an identity one moves nothing."""
    if isinstance(expr, dict):
        return "group" in expr or any(_moves(value) for value in expr.values())
    return isinstance(expr, list) and any(_moves(value) for value in expr)


def _stopped_producers(analysis: ChannelAnalysis) -> list[str]:
    """The reasons the Conv/Gemm/MatMul with a constant weight gave for making no neurons.

    A producer whose rule does not apply (most often: its input's rank is unknown, behind an
    operator no shape inference knows) marks its output with the reason; without this, such a
    model read "no Conv, Gemm or MatMul with a constant weight" while it has them.
    """
    graph, untracked = analysis.graph, analysis.state.untracked_reason
    found = []
    for node in graph.nodes[: graph.main_count]:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        if not any(name and graph.is_constant(name) for name in node.input[:2]) or not node.output:
            continue
        reason = untracked.get(node.output[0])
        if reason is not None:
            found.append(reason.message)
    return found


def _choose_permutations(
    analysis: ChannelAnalysis, seed: int, groups: list[str] | None, perms: PermsSource | None
) -> dict[str, np.ndarray]:
    """The permutations to apply: given ones (restricted to ``groups``) or random ones."""
    if perms is None:
        return draw_permutations(analysis, seed, groups)
    chosen = read_perms(perms)
    if groups:
        draw_permutations(analysis, 0, groups)  # checks that the groups exist and can move
        missing = [gid for gid in groups if gid not in chosen]
        if missing:
            origin = source_path(perms) or "perms"
            raise OnnxladyError(f"{origin}: no permutation for group {missing[0]}")
        chosen = {gid: p for gid, p in chosen.items() if gid in groups}
    return chosen


def _group_ids(group: str | Sequence[str] | None) -> list[str] | None:
    if group is None:
        return None
    return [group] if isinstance(group, str) else [str(gid) for gid in group]


def _check_seed(seed: int) -> None:
    check_seed(seed, "--seed")


def _unchecked(result: PermuteResult, exc: CheckNotRunError) -> str:
    """The one line ``permute --verify`` ends with when the check could not run: what was kept, and why."""
    if result.output is None:
        kept = "the permutation succeeded (kept in memory)"
        if result.key_path is not None:
            kept += f", key -> {result.key_path}"
        return f"{kept}, but the equivalence check could not run: {exc}"
    data = f" (weights in {external_data_path(result.output)})" if result.key.permuted_data_sha256 else ""
    return (
        f"permuted {len(result.permuted_groups)} group(s) -> {result.output}{data} and key -> {result.key_path} "
        f"(kept: the permutation succeeded), but the equivalence check could not run, so nothing was verified: {exc}; "
        f"then check the kept model with 'onnxlady verify {result.source or 'MODEL'} {result.output}' and that option"
    )


def _place(path: Path | None) -> str:
    return str(path) if path is not None else "(kept in memory)"
