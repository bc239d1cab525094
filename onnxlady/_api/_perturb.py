"""``onnxlady.perturb``: add noise to, quantize or prune a model's weight tensors, reproducibly."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxlady._api._checks import check_seed
from onnxlady._api._results import Result, read_back
from onnxlady._api._sources import (
    ModelSource,
    OutputPath,
    check_external_inputs,
    check_outputs,
    jsonable,
    open_model,
    output_path,
    path_text,
    source_path,
)
from onnxlady._io._external import load_mapped
from onnxlady._io._files import save_model
from onnxlady._io._outputs import OutputSet
from onnxlady._io._progress import say
from onnxlady._transforms._perturb import PerturbReport, TensorChange, perturb_model, perturb_streamed


@dataclass
class PerturbResult(Result):
    """The outcome of :func:`perturb`: the perturbed model and every step applied to every weight.

    Attributes:
        model: the perturbed model.
        report: the parameters and, per weight tensor and step, the elements changed and the
            relative L2 change.
        source: the input model's path; ``None`` for a model given in memory.
        output: where the perturbed model was written; ``None`` when it was kept in memory.
    """

    report: PerturbReport
    source: Path | None = None
    output: Path | None = None
    _model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def model(self) -> onnx.ModelProto:
        """The perturbed model.

        When it was streamed to :attr:`output`, it is read back from there on first use (the
        streaming route never holds it whole in memory).
        """
        if self._model is None:
            self._model = read_back(self.output, "perturbed")
        return self._model

    @property
    def changes(self) -> list[TensorChange]:
        """Every step applied to every weight tensor, in the order applied."""
        return self.report.changes

    @property
    def tensors(self) -> list[str]:
        """The weight tensors processed, in graph order."""
        return self.report.tensors

    def save(self, path: str | os.PathLike[str], *, external_data: bool = False) -> None:
        """Write the perturbed model atomically.

        Args:
            path: the model file to write.
            external_data: save the weights to ``PATH.data``.

        Raises:
            OnnxladyError: the folder does not exist or the file cannot be written.
        """
        save_model(self.model, path, external_data=external_data)

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady perturb --json`` prints."""
        return jsonable({"model": path_text(self.source), "output": path_text(self.output), **self.report.to_dict()})

    def to_text(self) -> str:
        """What ``onnxlady perturb`` prints: one row per step and tensor."""
        place = str(self.output) if self.output is not None else "(kept in memory)"
        lines = [f"perturbed {len({c.tensor for c in self.report.changes})} weight tensors -> {place}"]
        lines.append(f"{'tensor':<40} {'op':<14} {'kind':<9} {'changed':>12} {'rel. L2 change':>15}")
        for change in self.report.changes:
            lines.append(
                f"{change.tensor[:40]:<40} {change.op_type:<14} {change.kind:<9} "
                f"{f'{change.changed_elements}/{change.elements}':>12} {change.relative_l2_change:>15.4f}"
            )
        return "\n".join(lines)


def perturb(
    model: ModelSource,
    *,
    output: OutputPath = None,
    noise: float | None = None,
    quantize: int | None = None,
    prune: float | None = None,
    seed: int = 0,
    only: str | Sequence[str] | None = None,
    external_data: bool = False,
    overwrite_input: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PerturbResult:
    """Perturb the weight tensors (Conv, ConvTranspose, Gemm, MatMul, Einsum) the way *Find the Lady* does.

    Each tensor goes through pruning, then quantization, then noise (those requested), each
    rounded back to the tensor's dtype. The input model is never modified (a ``ModelProto`` input
    is copied first).

    Args:
        model: a path to an ONNX file or an ``onnx.ModelProto``.
        output: write the perturbed model here (atomically); ``None`` keeps it in memory only.
        noise: OMEGA: add ``N(0, (OMEGA * std(t))^2)`` to each weight ``t``.
        quantize: BITS: uniform min-max quantization with ``2^BITS`` levels per tensor.
        prune: PERCENT: zero the PERCENT smallest-magnitude entries of each tensor.
        seed: seed of the noise.
        only: perturb only these groups' (``"g3"``) or tensors' weights.
        external_data: save the weights to ``OUTPUT.data`` (always so for a model read that way).
        overwrite_input: allow ``output`` to be the input file.
        progress: called with one line per 50 tensors.

    Returns:
        The perturbed model and what changed.

    Raises:
        OnnxladyError: no perturbation asked for, a parameter out of range, an unsupported
            weight dtype (integer weights), weights holding NaN or infinity, an unknown ``only``
            name, or an output that is an input.
    """
    check_seed(seed, "--seed")
    source = source_path(model)
    target = output_path(output)
    check_outputs(target, [source], overwrite_input=overwrite_input)
    # With an output file, external weights stay in their files: each is read as it is written.
    # (No sha256 of the input is recorded: its file is not read once more to be hashed.)
    opened = open_model(model, progress=progress, map_external=target is not None, as_loaded=True, digest=False)
    check_external_inputs(target, [opened], overwrite_input=overwrite_input)
    options: dict[str, Any] = {
        "noise": noise, "quantize_bits": quantize, "prune_percent": prune, "seed": seed,
        "only": [only] if isinstance(only, str) else only, "progress": progress,
    }  # fmt: skip
    written_external = external_data or opened.external_data
    # A file written from our own load is streamed: each weight perturbed as the writer reaches it.
    stream = perturb_streamed(opened.model, **options) if target is not None and opened.owned else None
    if stream is not None:
        assert target is not None
        with OutputSet() as outputs:
            say(progress, f"saving {target}")
            outputs.write_model(target, opened.model, external_data=written_external, overrides=stream.overrides)
            report = stream.finish()
        return PerturbResult(report, source, target)
    perturbed = load_mapped(opened.writable())  # changed in place: every weight in the model
    report = perturb_model(perturbed, **options)
    if target is not None:
        say(progress, f"saving {target}")
        save_model(perturbed, target, external_data=written_external)
    return PerturbResult(report, source, target, perturbed)
