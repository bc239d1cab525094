"""``onnxlady.verify``: run two models in ONNX Runtime on the same inputs and compare their outputs."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxlady._api._checks import check_number, check_seed, check_whole
from onnxlady._api._results import Result
from onnxlady._api._sources import ModelSource, jsonable, path_text, source_path
from onnxlady._errors import OnnxladyError
from onnxlady._io._inputs import refuse_special_file
from onnxlady._verify._inputs import parse_value_ranges
from onnxlady._verify._report import OutputComparison, VerifyReport
from onnxlady._verify._shapes import parse_shape_overrides

#: Input shape overrides: ``["NAME:1x3x224x224", ...]`` as on the command line, or ``{NAME: dims}``.
ShapeOverrides = Sequence[str] | Mapping[str, Sequence[int]]
#: Value ranges of generated inputs: ``["NAME:[lo,hi]", "[lo,hi]"]`` as on the command line, or ``{NAME: (lo, hi)}``.
ValueRanges = str | Sequence[str] | Mapping[str, Sequence[float]]

PROVIDERS = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class VerifyResult(Result):
    """The outcome of :func:`verify`: one comparison per output, the settings used, and a three-valued verdict.

    The verdict (:attr:`verdict`) is ``"equivalent"`` only when no compared element fails and
    every compared tensor carries evidence (finite, not vanishing, not constant, not saturated);
    ``"inconclusive"`` when the outputs agree but some agreement proves nothing (the reasons are
    in ``report.reasons``); ``"not-equivalent"`` when an element fails. The exit code is 0 only
    for ``"equivalent"``.

    Attributes:
        report: the full comparison (provider used, tolerances, input shapes, per-output errors).
        reference: the reference model's path; ``None`` for a model given in memory.
        candidate: the candidate model's path; ``None`` for a model given in memory.
    """

    report: VerifyReport
    reference: Path | None = None
    candidate: Path | None = None

    @property
    def equivalent(self) -> bool:
        """True only for the ``"equivalent"`` verdict (False when ``"inconclusive"`` or ``"not-equivalent"``)."""
        return self.report.equivalent

    @property
    def outputs(self) -> tuple[OutputComparison, ...]:
        """One comparison per graph output (and per ``add_output`` tensor), in output order."""
        return self.report.outputs

    @property
    def provider_used(self) -> str:
        """The ONNX Runtime execution provider that ran both models."""
        return self.report.provider_used

    @property
    def max_abs_error(self) -> float:
        """The largest absolute error over all outputs."""
        return max((out.max_abs_error for out in self.report.outputs), default=0.0)

    @property
    def verdict(self) -> str:
        """``"equivalent"``, ``"not-equivalent"`` or ``"inconclusive"`` (the outputs agree but prove nothing)."""
        return self.report.verdict

    @property
    def exit_code(self) -> int:
        """0 for ``"equivalent"``; 1 for ``"not-equivalent"`` and for ``"inconclusive"`` (agreement that proves nothing)."""
        return 0 if self.equivalent else 1

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady verify --json`` prints (non-finite errors as strings)."""
        return jsonable(
            {"reference": path_text(self.reference), "candidate": path_text(self.candidate), **self.report.to_dict()}
        )

    def to_text(self) -> str:
        """The per-output table ``onnxlady verify`` prints, ending in EQUIVALENT, NOT EQUIVALENT or INCONCLUSIVE."""
        return verify_text(self.report)


def verify(
    reference: ModelSource,
    candidate: ModelSource,
    *,
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
    progress: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Run ``reference`` and ``candidate`` on the same inputs and compare every output.

    An element fails only where its absolute error exceeds ``atol`` and its relative error
    exceeds ``rtol`` (Polygraphy's rule); integer and boolean outputs must match exactly. The
    verdict is ``equivalent`` only when every compared tensor also carries evidence (finite, not
    vanishing, not constant, not saturated: the input of a Sigmoid or Softmax making an output is
    compared too), ``inconclusive`` when agreement proves nothing. Neither model is modified.

    Args:
        reference: the model whose outputs are taken as right: a path or an ``onnx.ModelProto``.
        candidate: the model checked against it (a permuted copy, say).
        provider: ``"auto"`` (CUDA when it loads, CPU otherwise), ``"cuda"`` or ``"cpu"``.
        atol: absolute tolerance; ``None``: 1e-4, or wider for models that compute in float16
            (4e-3) or bfloat16 (3e-2), said in a note.
        rtol: relative tolerance; ``None``: 1e-3, or 1e-2 for float16 and 8e-2 for bfloat16.
        iterations: number of random input batches.
        input_seed: seed of the random inputs.
        shape: input shapes for dynamic dimensions, ``["input:1x3x224x224"]`` or ``{"input": (1, 3, 224, 224)}``.
        add_output: intermediate tensors to compare as well (logits before a saturating
            activation, say).
        val_range: value ranges of generated inputs, as Polygraphy writes them:
            ``["input_ids:[0,99]"]`` for one input, ``["[0,1]"]`` for every other one; or
            ``{"input_ids": (0, 99)}``.
        load_inputs: feeds to run instead of generated ones: a Polygraphy JSON file
            (``polygraphy run --save-inputs``) or an ``.npz`` archive with one array per input.
        data_loader_script: ``"file.py:function"`` (``load_data`` when omitted), returning an
            iterable of ``{input name: array}`` feeds.
        squash_inputs: also compare the input of each squashing op (Sigmoid, Softmax, Tanh,
            Clip...) that makes an output, and judge a saturated output on it; ``False``
            compares the graph outputs (and ``add_output``) only, so a saturated output is
            inconclusive.
        progress: called with one line per feed.

    Returns:
        The comparison; :attr:`VerifyResult.verdict` is ``equivalent``, ``not-equivalent`` or
        ``inconclusive``.

    Raises:
        OnnxladyError: a bad option, a model that cannot be read or run, models with different
            inputs or outputs, or a CUDA provider that was asked for and does not load.
    """
    parsed = check_verify_options(
        atol=atol, rtol=rtol, iterations=iterations, shape=shape, provider=provider, val_range=val_range,
        input_seed=input_seed,
    )  # fmt: skip
    _refuse_special_inputs(load_inputs, data_loader_script)
    # Imported here: permute checks these options without running the check (nor importing it).
    from onnxlady._verify._compare import verify_models

    report = verify_models(
        _model_argument(reference), _model_argument(candidate), provider=provider, atol=atol, rtol=rtol,
        iterations=iterations, seed=input_seed, progress=progress, extra_outputs=_names(add_output),
        load_inputs=load_inputs, data_loader_script=data_loader_script,
        compare_squash_inputs=bool(squash_inputs), **parsed,
    )  # fmt: skip
    return VerifyResult(report, source_path(reference), source_path(candidate))


def check_verify_options(
    *,
    atol: float | None,
    rtol: float | None,
    iterations: int,
    shape: ShapeOverrides,
    provider: str = "auto",
    val_range: ValueRanges = (),
    input_seed: int = 0,
) -> dict[str, Any]:
    """Reject bad check options before any file is written.

    Returns:
        The parsed options as :func:`~onnxlady._verify._compare.verify_models` takes them
        (``shapes``, ``value_ranges`` and, when ``[lo,hi]`` is given for every input, ``input_range``).

    Raises:
        OnnxladyError: iterations below 1, a negative, infinite or non-numeric tolerance, an
            unknown provider, a seed out of range, or a malformed shape override or value range.
    """
    check_whole(iterations, "--iterations", 1)
    if atol is not None:
        check_number(atol, "--atol")
    if rtol is not None:
        check_number(rtol, "--rtol")
    check_seed(input_seed, "--input-seed")
    if provider not in PROVIDERS:
        raise OnnxladyError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    parsed: dict[str, Any] = {"shapes": shape_overrides(shape)}
    if isinstance(val_range, Mapping):
        try:
            specs = [f"{name}:[{low},{high}]" for name, (low, high) in val_range.items()]
        except (TypeError, ValueError) as exc:
            raise OnnxladyError(f"val_range: expected {{input name: (low, high)}}, got {val_range!r}") from exc
    else:
        specs = [val_range] if isinstance(val_range, str) else [str(spec) for spec in val_range]
    parsed["value_ranges"], every_input = parse_value_ranges(specs)
    if every_input is not None:
        parsed["input_range"] = every_input
    return parsed


def shape_overrides(shape: ShapeOverrides) -> dict[str, tuple[int, ...]]:
    """Parse shape overrides given as the command line's strings or as a mapping.

    Raises:
        OnnxladyError: a malformed override.
    """
    if isinstance(shape, Mapping):
        specs = [f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shape.items()]
    elif isinstance(shape, str):
        specs = [shape]
    else:
        specs = [str(spec) for spec in shape]
    return parse_shape_overrides(specs)


def _names(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else [str(name) for name in names]


def _refuse_special_inputs(load_inputs: str | os.PathLike[str] | None, data_loader_script: str | None) -> None:
    """A FIFO or a device given as feeds or as a loader script would block the reader: refuse it first."""
    if isinstance(load_inputs, (str, os.PathLike)):
        refuse_special_file(load_inputs, "input file")
    if isinstance(data_loader_script, str) and data_loader_script:
        script, separator, _ = data_loader_script.rpartition(":")
        refuse_special_file(script if separator and script.endswith(".py") else data_loader_script, "script")


def _model_argument(model: ModelSource) -> str | ModelSource:
    """A path as the text the command line passes (so messages name it the same way), else as given."""
    path = source_path(model)
    if path is not None:
        refuse_special_file(path, "ONNX file")  # a FIFO would block the session's reader
    return str(path) if path is not None else model


def verify_text(report: VerifyReport) -> str:
    """The text form of a comparison: settings, one row per compared tensor, why, then the verdict."""
    lines = [
        f"execution provider: {report.provider_used}"
        + (f" (fell back: {report.fallback_reason})" if report.fallback_reason else ""),
        (
            f"inputs: {', '.join(f'{k}{list(v)}' for k, v in report.input_shapes.items())}; "
            f"{report.iterations} iteration(s), seed {report.seed}; atol {report.atol:g}, rtol {report.rtol:g}"
        ),
        f"{'output':<24} {'max abs err':>12} {'max rel err':>12} {'max |ref|':>10} {'mismatched':>14}  result",
    ]
    for out in (*report.outputs, *report.squash_inputs):
        result = "PASS" if out.passed else ("ROUNDING" if out.within_rounding else "FAIL")
        lines.append(
            f"{out.name:<24} {out.max_abs_error:>12.3e} {out.max_rel_error:>12.3e} {out.reference_max_abs:>10.3g} "
            f"{f'{out.mismatched_elements}/{out.total_elements}':>14}  {result}"
        )
        if out.kind == "squash-input":
            lines.append(f"{'':<24} the input of {out.op}, which makes output '{out.stands_for}'")
        if out.degenerate:
            lines.append(f"{'':<24} warning: {out.degenerate}: this comparison proves nothing")
    lines.extend(f"note: {note}" for note in report.notes)
    lines.extend(f"why: {reason}" for reason in report.reasons)
    lines.append(_VERDICT_LINES.get(report.verdict, report.verdict.upper()))
    return "\n".join(lines)


#: The last line of the text report, per verdict.
_VERDICT_LINES = {"equivalent": "EQUIVALENT", "not-equivalent": "NOT EQUIVALENT", "inconclusive": "INCONCLUSIVE"}
