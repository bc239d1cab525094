"""Calibrate the audit's forensics on real changes: a labelled set and its confusion matrix.

Every suspect below is made from a reference by one known change, then audited
(:func:`onnxlady.audit`) in three forms: as made (``plain``), permuted (``permuted``, every
group, seed 1) and permuted then converted to float16 (``float16``,
:func:`fixtures.conversions.to_float16`). The audit's answer is mapped to a predicted kind and
compared with the truth:

==================  ============================================================  ==========================
true kind           how the suspect is made                                        a right answer
==================  ============================================================  ==========================
unchanged           a copy: only the variant's permutation (and conversion)        ``identical``,
                                                                                    ``permuted`` or
                                                                                    ``converted``
noise               ``perturb(noise=Omega)``, Omega in 0.01, 0.1, 0.5, 1, 2          ``perturbed``, noise
quantization        ``perturb(quantize_bits=B)``, B in 2, 4, 6, 8 (per-tensor       ``perturbed``, quantization
                    min-max); int8 QDQ (:func:`fixtures.conversions.quantize_qdq`)  (QDQ: conversion
                                                                                    ``quantized`` listed)
pruning             ``perturb(prune_percent=T)``, T in 10, 50, 90, 99               ``perturbed``, pruning
fine-tuning         real SGD steps (:mod:`tools.forensics_finetune`: the digits CNN  ``perturbed``, fine-tuning
                    trained 2/6/10 % more, BatchNorm folded or kept; torchvision
                    models fine-tuned 1/5/20 steps, BatchNorm frozen, head only)
scaled              5 neurons of one layer x 1.5, no compensation (the attack)     ``scaled``, those 5
rescaled            every neuron of a group x s in [0.5, 2], undone by the next     ``permuted-rescaled``
                    layer's columns or absorbed by the BatchNorm after it
scaled+noise        the attack, then ``perturb(noise=Omega)``, Omega in 0.05, 0.2   ``scaled``, those 5, and
                                                                                    noise
rescaled+noise      the rescale, then ``perturb(noise=Omega)``, Omega in 0.05, 0.2  ``perturbed``, noise, and
                                                                                    the rescaled neurons
==================  ============================================================  ==========================

Models: the real PyPI models of ``.cache/models`` (:mod:`tools.fetch_models`), the zoo exports
``regnet_y_400mf`` and ``shufflenet_v2_x1_0`` of ``.cache/zoo`` (:mod:`tools.zoo`), the ``vgg``,
``resnet`` and ``nhwc_convnet`` fixtures, and the bases of :mod:`tools.forensics_finetune`
(``.cache/forensics/finetune``; made with ``--python`` (default ``/tmp/zoo-venv/bin/python``,
torch and torchvision) when missing; without torch the fine-tuning rows are left out, said on
stderr). Rescales need a group whose producer is followed by positively homogeneous
operators (ReLU...) or by a BatchNorm: models without one have no ``rescaled`` row.

Prints the confusion matrix (true kind x predicted kind, counts), the accuracy, the cases
that went wrong and the machine load; ``--json FILE`` writes every case with the evidence the
audit saw (the input of the decision rules, so that they can be chosen from it), and
``FILE.partial.jsonl`` as the jobs end (one job per reference and kind; ``--jobs`` in
parallel)::

    python3 -m tools.forensics_calibration [--models NAME ...] [--kinds KIND ...] [--jobs N] [--json FILE]
    python3 -m tools.forensics_calibration --merge FILE ... [--json FILE]   # runs done in parts

Exit status: 0 when the goal holds (>= 95 % right, no noise/quantization/pruning suspect called
fine-tuning), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

import onnxlady
from fixtures import FIXTURES
from fixtures.conversions import quantize_qdq, to_float16, upgrade_opset
from onnxlady._analysis._channels import analyze
from onnxlady._audit._verdicts import _bn_after, _group_uses, _homogeneous_path
from onnxlady.testing import copy_model, tensor_holders
from tools.forensics_finetune import DEFAULT_OUT as FINETUNE_OUT
from tools.forensics_finetune import MODELS as FINETUNE_MODELS

REPO = Path(__file__).resolve().parents[1]
REAL = ("ppocrv4_det", "ppocrv4_rec", "ppocr_cls", "nudenet_yolov8n", "magika")
#: Zoo exports (:mod:`tools.zoo`, ``.cache/zoo``), audited when present.
ZOO = ("regnet_y_400mf", "shufflenet_v2_x1_0")
FIXTURE_MODELS = ("vgg", "resnet", "nhwc_convnet")
#: Bases of tools.forensics_finetune audited for the non-fine-tuning kinds as well.
FINETUNE_BASES = ("digits_cnn", "resnet18")
NOISE = (0.01, 0.1, 0.5, 1.0, 2.0)
BITS = (2, 4, 6, 8)
PRUNE = (10.0, 50.0, 90.0, 99.0)
MIXED_NOISE = (0.05, 0.2)
SCALED = (0, 2, 3, 5, 7)
SCALE_FACTOR = 1.5
VARIANTS = ("plain", "permuted", "float16")
KINDS = (
    "unchanged", "noise", "quantization", "pruning", "fine-tuning", "scaled", "rescaled", "scaled+noise",
    "rescaled+noise",
)  # fmt: skip
PREDICTIONS = (*KINDS, "uncertain", "error")
#: Kinds that must never be called fine-tuning.
NEVER_TUNING = ("noise", "quantization", "pruning")


@dataclass
class Case:
    """One labelled suspect."""

    model: str
    kind: str
    parameter: str
    variant: str
    make: Callable[[], onnx.ModelProto] = field(repr=False)
    reference: onnx.ModelProto = field(repr=False)
    expected_neurons: list[tuple[str, int]] = field(default_factory=list)


# -- references -------------------------------------------------------------------------------
def _load(path: Path) -> onnx.ModelProto:
    return onnxlady.load_model(path).model


def references(names: list[str]) -> dict[str, onnx.ModelProto]:
    """The reference models by name (those that can be had)."""
    out: dict[str, onnx.ModelProto] = {}
    for name in names:
        if name in REAL:
            path = REPO / ".cache" / "models" / f"{name}.onnx"
            if path.exists():
                out[name] = _load(path)
            else:
                print(f"{name}: missing, run python3 -m tools.fetch_models", file=sys.stderr)
        elif name in ZOO:
            path = REPO / ".cache" / "zoo" / f"{name}.onnx"
            if path.exists():
                out[name] = _load(path)
            else:
                print(f"{name}: missing, run the zoo export (tools.zoo)", file=sys.stderr)
        elif name in FIXTURES:
            out[name] = FIXTURES[name](0)
        elif name in FINETUNE_MODELS:
            path = FINETUNE_OUT / name / "base.onnx"
            if path.exists():
                out[name] = _load(path)
    return out


def ensure_finetuned(python: str) -> bool:
    """Make the fine-tuned models with torch's interpreter when missing; whether they exist."""
    if all((FINETUNE_OUT / name / "forensics.json").exists() for name in FINETUNE_MODELS):
        return True
    if not Path(python).exists():
        print(f"no fine-tuned models and no torch interpreter at {python}: fine-tuning rows left out", file=sys.stderr)
        return False
    done = subprocess.run([python, "-m", "tools.forensics_finetune"], cwd=REPO, check=False)
    return done.returncode == 0


# -- the changes ------------------------------------------------------------------------------
def _producers(model: onnx.ModelProto) -> list[tuple[str, Any, dict[str, list[Any]]]]:
    """(group id, size, uses) of every permutable group with one producer weight (audit's view)."""
    analysis = analyze(model)
    uses = _group_uses(analysis, set(tensor_holders(model)))
    out = []
    for group in analysis.permutable_groups:
        kinds = uses.get(group.id)
        if kinds and len(kinds["producer"]) == 1 and group.size >= 16:
            out.append((group.id, group, kinds))
    return out


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    holder = tensor_holders(model)[name]
    old = numpy_helper.to_array(holder)
    holder.CopyFrom(numpy_helper.from_array(value.astype(old.dtype), name))


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(tensor_holders(model)[name]).astype(np.float64)


def _scale_slices(model: onnx.ModelProto, use: Any, neurons: list[int], factors: np.ndarray) -> None:
    array = _array(model, use.tensor)
    for j, factor in zip(neurons, factors):
        index = [slice(None)] * array.ndim
        index[use.axis] = use.positions[j]
        array[tuple(index)] *= factor
    _set(model, use.tensor, array)


def attack(reference: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, int]]] | None:
    """5 neurons of the first conv/gemm group of 16 neurons or more scaled by 1.5, nothing compensated.

    The 5 are taken among the neurons whose row norm is at least half the median: scaling an
    all-zero row (a dead filter, as trained models have) changes nothing, and no audit can see
    it; under noise Omega = 0.2 a scale of 1.5 on a weak row of 27 weights (a first conv) is
    within the noise.
    """
    for gid, group, kinds in _producers(reference):
        prod = kinds["producer"][0]
        if prod.tensor not in tensor_holders(reference):
            continue
        array = _array(reference, prod.tensor)
        norms = np.array([np.linalg.norm(np.take(array, prod.positions[j], axis=prod.axis)) for j in range(group.size)])
        live = [j for j in range(group.size) if norms[j] >= 0.5 * float(np.median(norms)) and norms[j] > 0]
        if len(live) <= max(SCALED):
            continue
        neurons = [live[i] for i in SCALED]
        model = copy_model(reference)
        _scale_slices(model, prod, neurons, np.full(len(neurons), SCALE_FACTOR))
        return model, [(gid, j) for j in neurons]
    return None


def rescale(reference: onnx.ModelProto) -> onnx.ModelProto | None:
    """Every neuron of one group scaled by s in [0.5, 2], compensated.

    The compensation is one the audit knows: the next layer's input columns through positively
    homogeneous operators, or the BatchNorm right after the producer.
    """
    analysis = analyze(reference)
    holders = tensor_holders(reference)
    uses = _group_uses(analysis, set(holders))
    for group in analysis.permutable_groups:
        kinds = uses.get(group.id)
        if not kinds or len(kinds["producer"]) != 1 or group.size < 8:
            continue
        prod = kinds["producer"][0]
        scales = np.random.default_rng(7).uniform(0.5, 2.0, group.size)
        neurons = list(range(group.size))
        bn_node = _bn_after(analysis, prod.node)
        bn = [b for b in kinds["bn"] if b.node == bn_node] if bn_node is not None else []
        model = copy_model(reference)
        if bn:
            _scale_slices(model, prod, neurons, scales)
            for b in bn:
                _scale_slices(model, b, neurons, scales if b.slot == 3 else scales * scales)
        elif kinds["consumer"] and _homogeneous_path(analysis, prod.node):
            _scale_slices(model, prod, neurons, scales)
            for b in kinds["bias"]:
                if b.node == prod.node:
                    _scale_slices(model, b, neurons, scales)
            for c in kinds["consumer"]:
                _scale_slices(model, c, neurons, 1 / scales)
        else:
            continue
        return model
    return None


def _perturb(model: onnx.ModelProto, seed: int = 3, **kwargs: Any) -> onnx.ModelProto:
    return onnxlady.perturb(model, seed=seed, **kwargs).model


def _qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """int8 QDQ, after an opset upgrade to 13 where the model is older (QDQ per channel needs 13)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    return quantize_qdq(upgrade_opset(model, 13) if opset < 13 else model)


def _made(make: Callable[[], onnx.ModelProto], variant: str) -> onnx.ModelProto:
    return _variant(make(), variant)


def _variant(suspect: onnx.ModelProto, variant: str) -> onnx.ModelProto:
    if variant == "plain":
        return suspect
    permuted = onnxlady.permute(suspect, seed=1).model
    return permuted if variant == "permuted" else to_float16(permuted)


def cases(name: str, tuned: bool) -> list[Case]:
    """The labelled suspects of one reference, made lazily.

    The fine-tuned copies of a :mod:`tools.forensics_finetune` model when ``tuned``, else every
    other kind.
    """
    out: list[Case] = []

    def add(kind: str, parameter: str, reference: onnx.ModelProto, make: Callable[[], onnx.ModelProto],
            neurons: list[tuple[str, int]] | None = None) -> None:  # fmt: skip
        for variant in VARIANTS:
            out.append(
                Case(name, kind, parameter, variant, partial(_made, make, variant), reference, neurons or [])
            )

    if tuned:
        folder = FINETUNE_OUT / name
        manifest = json.loads((folder / "forensics.json").read_text())
        ref = _load(folder / "base.onnx")
        for regime in manifest["regimes"]:
            add("fine-tuning", regime["regime"], ref, partial(_load, folder / regime["file"]))
        return out
    for ref in references([name]).values():
        add("unchanged", "copy", ref, partial(copy_model, ref))
        for number, omega in enumerate(NOISE):  # a fresh draw of the noise for each Omega
            add("noise", f"Omega {omega:g}", ref, partial(_perturb, ref, 10 + number, noise=omega))
        for bits in BITS:
            add("quantization", f"{bits} bits", ref, partial(_perturb, ref, quantize=bits))
        add("quantization", "int8 QDQ", ref, partial(_qdq, ref))
        for percent in PRUNE:
            add("pruning", f"{percent:g} %", ref, partial(_perturb, ref, prune=percent))
        attacked = attack(ref)
        if attacked is not None:
            model, neurons = attacked
            add("scaled", f"{len(SCALED)} x {SCALE_FACTOR}", ref, partial(copy_model, model), neurons)
            for number, omega in enumerate(MIXED_NOISE):
                add("scaled+noise", f"Omega {omega:g}", ref, partial(_perturb, model, 20 + number, noise=omega), neurons)
        rescaled = rescale(ref)
        if rescaled is not None:
            add("rescaled", "s in [0.5, 2]", ref, partial(copy_model, rescaled))
            for number, omega in enumerate(MIXED_NOISE):
                add("rescaled+noise", f"Omega {omega:g}", ref, partial(_perturb, rescaled, 30 + number, noise=omega))
    return out


def job(spec: tuple[str, bool, tuple[str, ...], tuple[str, ...], bool]) -> list[dict[str, Any]]:
    """Audit the cases of one reference (``spec``: name, fine-tuned, kinds, variants, progress)."""
    name, tuned, kinds, variants, progress = spec
    return run([c for c in cases(name, tuned) if c.kind in kinds and c.variant in variants], progress)


# -- judging ----------------------------------------------------------------------------------
def predicted(result: onnxlady.AuditResult | None) -> str:
    """The kind the audit's answer names (see the module docstring)."""
    if result is None:
        return "error"
    report = result.report
    verdict = report.verdict
    if verdict in ("identical", "permuted", "converted"):
        kinds = {c.kind for c in report.conversions}
        return "quantization" if "quantized" in kinds else "unchanged"
    if verdict == "permuted-rescaled":
        return "rescaled"
    kind = report.perturbation["kind"] if report.perturbation else None
    if verdict == "scaled":
        return "scaled+noise" if kind == "noise" else "scaled" if kind is None else f"scaled+{kind}"
    if verdict == "modified" or kind == "uncertain":
        return "uncertain"
    if report.rescaled:  # compensated rescales read through the change: both findings
        return f"rescaled+{kind}"
    return str(kind)


def right(case: Case, result: onnxlady.AuditResult | None, guess: str) -> bool:
    """Whether the answer is the right one (for scaled kinds: exactly the attacked neurons)."""
    if guess != case.kind:
        return False
    if case.kind in ("scaled", "scaled+noise") and result is not None:
        found = sorted((s.group, s.neuron) for s in result.report.scaled_neurons)
        # Under noise k is an estimate: its error grows with Omega / sqrt(row length).
        slack = 0.01 if case.kind == "scaled" else 0.2
        return found == sorted(case.expected_neurons) and all(
            abs(s.k - SCALE_FACTOR) < slack for s in result.report.scaled_neurons
        )
    return True


def _evidence(result: onnxlady.AuditResult | None) -> dict[str, Any] | None:
    if result is None or not result.report.perturbation:
        return None
    evidence = dict(result.report.perturbation["evidence"])
    evidence["per_tensor"] = [
        {k: v for k, v in t.items() if k != "tensor"} for t in evidence["per_tensor"]
    ]
    return evidence


def run(all_cases: list[Case], progress: bool) -> list[dict[str, Any]]:
    """Audit every case; one record per case."""
    records = []
    for number, case in enumerate(all_cases, 1):
        start = time.perf_counter()
        error = None
        try:
            suspect = case.make()
        except Exception as exc:  # a converter that cannot handle the model: no case, said on stderr
            print(f"skipped {case.model} {case.kind} {case.parameter} {case.variant}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)  # fmt: skip
            continue
        try:
            result: onnxlady.AuditResult | None = onnxlady.audit(case.reference, suspect)
        except onnxlady.OnnxladyError as exc:
            result, error = None, str(exc)
        guess = predicted(result)
        ok = right(case, result, guess)
        record = {
            "model": case.model,
            "kind": case.kind,
            "parameter": case.parameter,
            "variant": case.variant,
            "verdict": result.verdict if result is not None else "error",
            "predicted": guess,
            "right": ok,
            "summary": result.summary if result is not None else error,
            "scaled_neurons": (
                [[s.group, s.neuron, s.k] for s in result.report.scaled_neurons] if result is not None else []
            ),
            "evidence": _evidence(result),
            "seconds": round(time.perf_counter() - start, 2),
        }
        records.append(record)
        if progress:
            mark = "ok " if ok else "BAD"
            print(
                f"[{number}/{len(all_cases)}] {mark} {case.model} {case.kind} {case.parameter} {case.variant}: "
                f"{guess} ({record['seconds']} s)",
                file=sys.stderr,
                flush=True,
            )
    return records


def confusion(records: list[dict[str, Any]]) -> str:
    """The confusion matrix as a Markdown table (rows: true kind, columns: predicted kind)."""
    counts = Counter((r["kind"], r["predicted"]) for r in records)
    columns = [p for p in PREDICTIONS if any(counts[(k, p)] for k in KINDS)]
    columns += sorted({r["predicted"] for r in records} - set(columns))
    lines = ["| true \\ predicted | " + " | ".join(columns) + " | cases | right |", "|---" * (len(columns) + 3) + "|"]
    for kind in KINDS:
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        cells = [str(counts[(kind, p)]) if counts[(kind, p)] else "." for p in columns]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {len(rows)} | {sum(r['right'] for r in rows)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the labelled set, audit it, print the confusion matrix; 0 when the goal holds."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.forensics_calibration", description=__doc__.splitlines()[0])
    default_models = list(REAL + ZOO + FIXTURE_MODELS + FINETUNE_BASES)
    parser.add_argument("--models", nargs="+", default=default_models, help="reference models (default: %(default)s)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--no-finetune", action="store_true", help="leave the fine-tuning rows out")
    parser.add_argument("--python", default="/tmp/zoo-venv/bin/python", help="interpreter with torch (fine-tuning)")
    parser.add_argument("--json", type=Path, help="write every case and its evidence to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--jobs", type=int, default=1, help="references audited in parallel processes")
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="FILE",
        help="audit nothing: the matrix of the cases recorded by earlier runs (--json files or their "
        ".partial.jsonl); a case recorded twice keeps its last record",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.merge:
        merged: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for path in args.merge:
            text = path.read_text()
            found = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]
            for record in found:
                merged[(record["model"], record["kind"], record["parameter"], record["variant"])] = record
        records = list(merged.values())
        return summarize(records, sum(r["seconds"] for r in records), args.json)
    tuned = "fine-tuning" in args.kinds and not args.no_finetune and ensure_finetuned(args.python)
    kinds, variants = tuple(args.kinds), tuple(args.variants)
    # One job per reference and kind: the references' sizes differ by 100x, kinds balance the pool.
    specs = [
        (name, False, (kind,), variants, not args.quiet)
        for name in args.models
        for kind in kinds
        if kind != "fine-tuning"
    ]
    # The fine-tuned models first: the torchvision ones are the slowest audits.
    specs = [(name, True, kinds, variants, not args.quiet) for name in FINETUNE_MODELS if tuned] + specs
    start = time.perf_counter()
    # Every finished job is appended to FILE.partial.jsonl at once: a long run stopped early
    # keeps what it measured.
    partial = args.json.with_suffix(".partial.jsonl") if args.json else None
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("")
    parts: list[list[dict[str, Any]]] = []

    def keep(part: list[dict[str, Any]]) -> None:
        parts.append(part)
        if partial is not None:
            with partial.open("a") as stream:
                stream.writelines(json.dumps(record) + "\n" for record in part)

    if args.jobs == 1:
        for spec in specs:
            keep(job(spec))
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for future in as_completed([pool.submit(job, spec) for spec in specs]):
                keep(future.result())
    records = [record for part in parts for record in part]
    return summarize(records, time.perf_counter() - start, args.json)


def summarize(records: list[dict[str, Any]], seconds: float, path: Path | None) -> int:
    """Print the matrix, the accuracy and the wrong cases; write ``path``; 0 when the goal holds."""
    total = len(records)
    good = sum(r["right"] for r in records)
    wrong_tuning = [r for r in records if r["kind"] in NEVER_TUNING and r["predicted"] == "fine-tuning"]
    print(confusion(records))
    print()
    print(f"right: {good}/{total} ({100 * good / max(total, 1):.1f} %); noise/quantization/pruning called fine-tuning: {len(wrong_tuning)}")
    for label, key in (("variant", "variant"), ("model", "model")):
        parts = sorted({r[key] for r in records}, key=lambda v: (VARIANTS.index(v) if v in VARIANTS else 9, v))
        print(f"by {label}: " + ", ".join(
            f"{v} {sum(r['right'] for r in records if r[key] == v)}/{sum(1 for r in records if r[key] == v)}" for v in parts
        ))  # fmt: skip
    for r in records:
        if not r["right"]:
            print(f"- wrong: {r['model']} {r['kind']} {r['parameter']} {r['variant']}: {r['verdict']}: {r['summary'][:300]}")
    load = os.getloadavg()
    print(f"{total} audits in {seconds:.0f} s; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1) + "\n")
    return 0 if total and good >= 0.95 * total and not wrong_tuning else 1


if __name__ == "__main__":
    sys.exit(main())
