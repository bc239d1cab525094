"""``onnxlady.resync``: put a permuted (and perturbed, or converted) copy back in a reference's order."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import onnx

from onnxlady._api._memory import check_memory, check_pair_memory
from onnxlady._api._results import Result
from onnxlady._api._sources import (
    KeySource,
    ModelSource,
    OutputPath,
    check_external_inputs,
    check_outputs,
    jsonable,
    key_text,
    open_key,
    open_model,
    output_path,
    path_text,
    source_path,
)
from onnxlady._errors import OnnxladyError
from onnxlady._io._external import load_mapped, mapped_files
from onnxlady._io._outputs import OutputSet, external_data_path
from onnxlady._io._progress import say
from onnxlady._io._stream import Override
from onnxlady._resync._entry import resync_model
from onnxlady._resync._solver import GroupResync
from onnxlady._resync._solver import ResyncResult as _Resynced
from onnxlady._resync._state_analysis import analyze_with_state
from onnxlady._resync._twin import MovedTensor
from onnxlady._resync._wiring import check_wiring
from onnxlady._transforms._key import PermutationKey

METHODS = ("hungarian", "argmax")


@dataclass
class ResyncResult(Result):
    """The outcome of :func:`resync`: the suspect in the reference's order, and how sure each match is.

    Attributes:
        details: the solver's full result (the model, the recovered key, per-group margins,
            Psi, and for a converted suspect what matching across conversions found).
        reference: the reference's path; ``None`` for a model given in memory.
        suspect: the suspect's path; ``None`` for a model given in memory.
        output: where the re-ordered suspect was written; ``None`` when it was kept in memory.
        key_path: where the recovered key was written; ``None`` when it was not.
    """

    details: _Resynced = field(repr=False)
    reference: Path | None = None
    suspect: Path | None = None
    output: Path | None = None
    key_path: Path | None = None

    @property
    def model(self) -> onnx.ModelProto:
        """The suspect with its neurons in the reference's order (in its own form, if converted)."""
        # Weights read from external files on demand are read into the model handed out here.
        return load_mapped(self.details.model)

    @property
    def key(self) -> PermutationKey:
        """The recovered key: the suspect is the output permuted by it, so ``unpermute(suspect, key)`` is the output."""
        return self.details.key

    @property
    def groups(self) -> list[GroupResync]:
        """Per group: margins, ambiguous neurons, pruned neurons and (with a true key) Psi."""
        return self.details.groups

    @property
    def psi(self) -> float | None:
        """% of the permuted neurons put back in place (only with a true key); the paper's Psi."""
        return self.details.psi

    @property
    def method(self) -> str:
        """``"hungarian"`` or ``"argmax"``."""
        return self.details.method

    @property
    def ambiguous(self) -> int:
        """Reference neurons whose best match beats the second best by less than the ambiguity margin."""
        return sum(group.ambiguous for group in self.details.groups)

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        key_out: str | os.PathLike[str] | None = None,
        external_data: bool = False,
    ) -> None:
        """Write the re-ordered suspect atomically, and the recovered key with it when asked.

        Args:
            path: the model file to write.
            key_out: also write the recovered key here.
            external_data: save the weights to ``PATH.data``.

        Raises:
            OnnxladyError: the key and the model would be the same file, a folder does not
                exist, or a file cannot be written.
        """
        target = Path(path)
        extra = [Path(key_out)] if key_out is not None else []
        check_outputs(target, [], extra, overwrite_input=True)
        with OutputSet() as outputs:  # the model and its key: both or neither
            _write_output(outputs, target, self.details, external_data=external_data, digest=False, keyed=bool(extra))
            for key_path in extra:
                outputs.write_text(key_path, key_text(self.details.key))

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady resync --json`` prints."""
        return jsonable(
            {
                "reference": path_text(self.reference),
                "suspect": path_text(self.suspect),
                "output": path_text(self.output),
                "key": path_text(self.key_path),
                **self.details.to_dict(),
            }
        )

    def to_text(self) -> str:
        """What ``onnxlady resync`` prints: one row per group, Psi, conversions found."""
        result = self.details
        reference = self.reference if self.reference is not None else "the reference"
        suspect = self.suspect if self.suspect is not None else "the suspect"
        place = self.output if self.output is not None else "(kept in memory)"
        lines = [f"re-synchronized {suspect} to {reference} ({result.method}) -> {place}"]
        lines.append(
            f"{'group':>6} {'size':>6} {'mean margin':>12} {'min margin':>11} {'ambiguous':>10} "
            f"{'zeroed':>7} {'Psi %':>7}"
        )
        for group in result.groups:
            psi = "" if group.psi is None else f"{group.psi:.1f}"
            lines.append(
                f"{group.id:>6} {group.size:>6} {group.mean_margin:>12.3f} {group.min_margin:>11.3f} "
                f"{group.ambiguous:>10} {group.zero_neurons:>7} {psi:>7}"
            )
        if result.psi is not None:
            lines.append(
                f"Psi over all permuted neurons: {result.psi:.2f} %"
                + (
                    f" ({result.psi_distinguishable:.2f} % over distinguishable ones)"
                    if result.psi_distinguishable is not None
                    else ""
                )
            )
        lines.append(f"{self.ambiguous} ambiguous neurons (margin below the ambiguity threshold)")
        if result.across is not None:
            lines.append("the suspect is no node-for-node copy of the reference: matched across conversions")
            for finding in result.across.match.conversions:
                lines.append(f"conversion ({finding.kind}) in the {finding.model}: {finding.detail}")
            for item in result.across.match.unmatched:
                lines.append(f"unmatched: {item.model} group {item.group} ({item.size}): {item.reason}")
            if result.across.unwritten:
                lines.append(
                    "matched but left in place in the output (frozen in the suspect's own form): "
                    + ", ".join(result.across.unwritten)
                )
        return "\n".join(lines)


def resync(
    reference: ModelSource,
    suspect: ModelSource,
    *,
    output: OutputPath = None,
    key_out: OutputPath = None,
    true_key: KeySource | None = None,
    method: str = "hungarian",
    refine: bool = False,
    external_data: bool = False,
    overwrite_input: bool = False,
    progress: Callable[[str], None] | None = None,
    max_memory: str | int | None = None,
) -> ResyncResult:
    """Re-order a suspect's neurons into the reference's order by matching their weights.

    A suspect that is a node-for-node copy of the reference is solved on its tensors as stored;
    a converted one (float16, folded BatchNorm, QDQ, simplified, another opset) is first paired
    with the reference (see :func:`match`) and keeps its converted form. Neither model is modified.

    Args:
        reference: the model whose neuron order is wanted: a path or an ``onnx.ModelProto``.
        suspect: a permuted (and possibly perturbed or converted) copy of it.
        output: write the re-ordered suspect here (atomically); ``None`` keeps it in memory only.
        key_out: write the recovered key here.
        true_key: the key that made the suspect (path or :class:`PermutationKey`), to measure Psi.
        method: ``"hungarian"`` (best bijection) or ``"argmax"`` (the paper's rule).
        refine: re-solve every group with all its slices aligned until no group changes.
        external_data: save the weights to ``OUTPUT.data`` (always so for a suspect read that way).
        overwrite_input: allow an output to be an input file.
        progress: called with one line per step.
        max_memory: refuse to start when the estimated peak memory exceeds this (bytes, or a
            size such as ``"2G"``); see :mod:`onnxlady._api._memory`.

    Returns:
        The re-ordered suspect, the recovered key and per-group statistics.

    Raises:
        OnnxladyError: the architectures differ beyond a conversion, a compared weight holds NaN
            or infinity, the true key does not fit the reference, an unknown method, or an output
            that is an input.
    """
    if method not in METHODS:
        raise OnnxladyError(f"unknown resync method {method!r}: choose one of {', '.join(METHODS)}")
    reference_path, suspect_path = source_path(reference), source_path(suspect)
    target, key_path = output_path(output), output_path(key_out)
    extra = [key_path] if key_path is not None else []
    true_key_path = source_path(true_key) if true_key is not None else None
    check_outputs(target, [reference_path, suspect_path, true_key_path], extra, overwrite_input=overwrite_input)
    # The graphs are estimated before anything is read, the weights once the reference is
    # analysed and the suspect known to be a twin or not (below).
    check_memory(max_memory, "resync", [reference_path, suspect_path])
    key = open_key(true_key) if true_key is not None else None
    # External weights stay in their files, read as the resync needs them: memory does not
    # grow with the models (the output is written tensor by tensor from them).
    # Only the suspect's sha256 is recorded (in the key, when one is written): the reference's
    # file, and the suspect's without a key, are not read once more to be hashed. The suspect's is
    # hashed beside the resync, awaited only when the key is written.
    opened_reference = open_model(reference, "reference", progress, map_external=True, digest=False)
    opened_suspect = open_model(
        suspect, "suspect", progress, map_external=True, digest=key_path is not None, hash_later=True
    )
    check_external_inputs(target, [opened_reference, opened_suspect], extra, overwrite_input=overwrite_input)
    say(progress, "resync: analysing the reference")
    analysis = analyze_with_state(opened_reference.model, key)  # what resync_model would compute
    check_pair_memory(
        max_memory, analysis, opened_suspect.model, [reference_path, suspect_path], true_key=key is not None
    )
    details = resync_model(
        opened_reference.model, opened_suspect.model, method=method, refine=refine, true_key=key, progress=progress,
        analysis=analysis,
    )
    if details.across is None:
        check_wiring(analysis, opened_suspect.model, details.key, suspect_path or "the suspect")
    if target is not None:
        say(progress, f"saving {target}")
    # The re-ordered suspect and the recovered key are one output set: both are written, or neither.
    with OutputSet() as outputs:
        if target is not None:
            written = _write_output(
                outputs, target, details, external_data=external_data or opened_suspect.external_data, digest=True,
                keyed=key_path is not None,
            )  # fmt: skip
            # unpermute(suspect, key) gives this output: the key names both files by their sha256.
            details.key.source_sha256 = written
        if key_path is not None:
            details.key.permuted_sha256 = opened_suspect.content_sha256() if opened_suspect.path is not None else ""
            outputs.write_text(key_path, key_text(details.key))
    return ResyncResult(details, reference_path, suspect_path, target, key_path)


_Value = TypeVar("_Value")


def _write_output(
    outputs: OutputSet, target: Path, details: _Resynced, *, external_data: bool, digest: bool, keyed: bool
) -> str:
    """Stage the re-ordered suspect; a twin's is streamed from the suspect and its moved tensors.

    A twin's output is the suspect with new bytes for the tensors that move: the streaming
    writer writes those in place of the old ones, so the output is never built in memory
    (the same file as serializing the built model). Each moved tensor is hashed for the key's
    digest as it is computed only when the key is written (``keyed``): without, the digest is
    left to be computed if it is ever read (hashing for nothing cost about 6 % of an 11 MB twin
    resync's CPU time).
    """
    if details.unbuilt is not None:
        suspect, overrides = details.unbuilt
        if not keyed:
            overrides = {name: _unhashed(value) for name, value in overrides.items()}
        written = {path.resolve() for path in (target, external_data_path(target))}
        if written & mapped_files(suspect):
            # The output replaces the data file the suspect's weights are still read from: they
            # are read in first (the result's model must not read the new file's bytes later).
            load_mapped(suspect)
        return outputs.write_model(
            # Functions return arrays, which the writer takes as it takes bytes.
            target, suspect, external_data=external_data, digest=digest,
            overrides=cast("dict[str, Override]", dict(overrides)),
        )
    return outputs.write_model(target, details.model, external_data=external_data, digest=digest)


def _unhashed(value: _Value) -> _Value:
    """A moved tensor's computation that leaves its digest to the key (:meth:`MovedTensor.unhashed`)."""
    return cast("_Value", value.unhashed) if isinstance(value, MovedTensor) else value
