"""``onnxlady.audit``: is the suspect the reference up to permutation, and if not, what was done to it?"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxlady._analysis._channels import analyze
from onnxlady._api._checks import check_number
from onnxlady._api._memory import check_memory, check_pair_memory
from onnxlady._api._results import Result
from onnxlady._api._resync import METHODS
from onnxlady._api._sources import (
    ModelSource,
    jsonable,
    open_model,
    output_path,
    path_text,
    source_path,
    write_text,
)
from onnxlady._audit._render import render_html, render_markdown
from onnxlady._audit._verdicts import AUDIT_RTOL, AuditReport, audit_models
from onnxlady._audit._verdicts import canonicalize as _canonicalize
from onnxlady._errors import OnnxladyError
from onnxlady._io._external import load_mapped
from onnxlady._io._files import save_model
from onnxlady._io._outputs import OutputSet, check_output_paths, external_data_path
from onnxlady._io._progress import say
from onnxlady._resync._match import ConversionFinding, analyze_with_state


@dataclass
class AuditResult(Result):
    """The outcome of :func:`audit`: a verdict, the evidence per tensor and neuron, and reports.

    Verdicts: ``identical``, ``permuted``, ``permuted-rescaled`` (function-preserving scales),
    ``converted`` (a converter's change of form only): exit code 0; ``scaled`` (neurons scaled
    without compensation) and ``perturbed`` (noise, quantization or pruning, with the kind
    found): exit code 1.

    Attributes:
        report: everything the audit measured (per-tensor cosines and norm ratios, rescaled and
            scaled neurons, the perturbation's statistics, the resync it used).
        reference: the reference's path; ``None`` for a model given in memory.
        suspect: the suspect's path; ``None`` for a model given in memory.
    """

    report: AuditReport = field(repr=False)
    reference: Path | None = None
    suspect: Path | None = None
    _reference_model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def verdict(self) -> str:
        """One of ``identical``, ``permuted``, ``permuted-rescaled``, ``converted``, ``scaled``, ``perturbed``."""
        return self.report.verdict

    @property
    def summary(self) -> str:
        """One sentence saying what was found."""
        return self.report.summary

    @property
    def conversions(self) -> list[ConversionFinding]:
        """What a converter did to either model: differences of form, not of function."""
        return self.report.conversions

    @property
    def exit_code(self) -> int:
        """0 for a function-preserving verdict, 1 for ``scaled`` or ``perturbed``."""
        return self.report.exit_code

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady audit --json`` prints."""
        return jsonable(
            {"reference": path_text(self.reference), "suspect": path_text(self.suspect), **self.report.to_dict()}
        )

    def to_text(self) -> str:
        """What ``onnxlady audit`` prints: the Markdown report."""
        return self.to_markdown()

    def to_markdown(self) -> str:
        """The report in Markdown: verdict, conversions, per-group and per-tensor tables."""
        return render_markdown(self.report)

    def to_html(self) -> str:
        """A self-contained HTML report (similarity heat maps, norm-ratio plots, the group graph)."""
        analysis = self.report.analysis  # the audit's own: the reference is not analysed again
        if analysis is None and self._reference_model is not None:
            analysis = analyze(self._reference_model)
        return render_html(self.report, analysis)

    def write_markdown(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_markdown` to ``path`` atomically.

        Args:
            path: the Markdown file to write (replaced if it exists).

        Raises:
            OnnxladyError: the folder does not exist or the file cannot be written.
        """
        write_text(path, self.to_markdown())

    def write_html(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_html` to ``path`` atomically.

        Args:
            path: the HTML file to write (replaced if it exists).

        Raises:
            OnnxladyError: the folder does not exist or the file cannot be written.
        """
        write_text(path, self.to_html())

    def canonical_model(self) -> onnx.ModelProto:
        """The re-synchronized suspect with its function-preserving rescaling undone (a new model).

        Raises:
            OnnxladyError: the suspect is identical to the reference (nothing was re-synchronized).
        """
        if self.report.resync is None:
            raise OnnxladyError("the suspect is identical to the reference: nothing to canonicalize")
        # Weights still in their external files are read in: the model is the caller's to save.
        return load_mapped(_canonicalize(self.report.resync.model, self.report, self._reference_model))

    def save_canonical(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`canonical_model` to ``path`` atomically.

        Args:
            path: the model file to write.

        Raises:
            OnnxladyError: nothing to canonicalize, or the file cannot be written.
        """
        save_model(self.canonical_model(), path)


def audit(
    reference: ModelSource,
    suspect: ModelSource,
    *,
    rtol: float = AUDIT_RTOL,
    method: str = "hungarian",
    refine: bool = False,
    html: str | os.PathLike[str] | None = None,
    markdown: str | os.PathLike[str] | None = None,
    canonicalize: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    max_memory: str | int | None = None,
) -> AuditResult:
    """Compare a suspect with a reference neuron by neuron, after putting it back in order.

    Says whether the suspect is the reference up to permutation (and function-preserving
    rescaling, or a converter's change of form), or was changed: neurons scaled, or weights
    perturbed (noise, quantization, pruning, told apart). Neither model is modified.

    Args:
        reference: the original model: a path or an ``onnx.ModelProto``.
        suspect: the model to audit.
        rtol: relative tolerance for float rounding.
        method: ``"hungarian"`` or ``"argmax"`` for the resync the audit runs first.
        refine: refine that resync before comparing.
        html: also write a self-contained HTML report here.
        markdown: also write the Markdown report here.
        canonicalize: also write the re-synchronized suspect with function-preserving
            rescaling undone here.
        progress: called with one line per step.
        max_memory: refuse to start when the estimated peak memory exceeds this (bytes, or a
            size such as ``"2G"``); see :mod:`onnxlady._api._memory`.

    Returns:
        The verdict and its evidence; :attr:`AuditResult.exit_code` is 1 for a suspect that was
        changed.

    Raises:
        OnnxladyError: a model cannot be read, the architectures differ beyond a conversion, a
            report path is an input or its folder does not exist, a negative ``rtol``, an
            unknown method, or ``canonicalize`` for a suspect identical to the reference.
    """
    inputs = [source_path(reference), source_path(suspect)]
    targets = [output_path(path) for path in (html, markdown, canonicalize)]
    canonical_target = targets[2]
    check_output_paths(
        [target for target in targets if target is not None], inputs,
        companions=[external_data_path(canonical_target)] if canonical_target is not None else [],
    )  # fmt: skip
    check_number(rtol, "--rtol")
    # The graphs are estimated before anything is read, the weights once the reference is
    # analysed and the suspect known to be a twin or not (below).
    check_memory(max_memory, "audit", inputs)
    if method not in METHODS:
        raise OnnxladyError(f"unknown resync method {method!r}: choose one of {', '.join(METHODS)}")
    # External weights stay in their files, read as the audit needs them.
    opened_reference = open_model(reference, "reference", progress, map_external=True, digest=False)
    opened_suspect = open_model(suspect, "suspect", progress, map_external=True, digest=False)
    external_inputs = [path for opened in (opened_reference, opened_suspect) for path in opened.external_files]
    check_output_paths([target for target in targets if target is not None], external_inputs)
    if max_memory is not None and inputs[0] is not None and inputs[1] is not None:
        say(progress, "audit: analysing the reference")
        analysis = analyze_with_state(opened_reference.model)  # as the audit analyses it
        check_pair_memory(max_memory, analysis, opened_suspect.model, [inputs[0], inputs[1]], "audit")
    report = audit_models(
        opened_reference.model, opened_suspect.model, rtol=rtol, method=method, refine=refine, progress=progress
    )
    result = AuditResult(report, opened_reference.path, opened_suspect.path, opened_reference.model)
    html_path, markdown_path, canonical_path = targets
    canonical = result.canonical_model() if canonical_path is not None else None  # fails before any file is written
    # The reports and the canonical model are one output set: all are written, or none is.
    with OutputSet() as outputs:
        if markdown_path is not None:
            outputs.write_text(markdown_path, result.to_markdown())
        if html_path is not None:
            say(progress, f"writing {html_path}")
            outputs.write_text(html_path, result.to_html())
        if canonical is not None and canonical_path is not None:
            outputs.write_model(canonical_path, canonical)
    return result
