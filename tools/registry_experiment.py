"""Registry experiment: find the reference of every derivative among unrelated models, at scale.

Builds a registry and measures onnxlady's provenance search (:mod:`onnxlady._provenance`):

- *references*: :data:`REFERENCES` (16 fixtures, seed 0); every real model the project fetches
  (``python3 -m tools.fetch_models`` puts them in ``.cache/models``: trained PaddleOCR, YOLOv8,
  Magika networks); and, when the torch virtualenv exists (``--zoo-python``, default
  ``/tmp/zoo-venv/bin/python``), the *fine-tuning bases* of :data:`FINETUNE_MODELS`: the digits
  CNN of :mod:`tools.train_digits_cnn` trained on scikit-learn's digits (exported with its
  BatchNorm; the BatchNorm-folded export of the same training and its fine-tuned copies are
  derivatives of it, see :data:`FINETUNE_SAME_AS`), and torchvision networks (random weights
  given an O(1) activation spread by :func:`tools.zoo.reinitialise`);
- *derivatives*, 6 per reference, each made from a permuted copy (every permutable group
  moved): ``permuted``; ``noise`` (OMEGA = 0.1 on every weight); ``int8`` (QDQ, as ONNX
  Runtime's static quantizer writes it: ``fixtures.conversions.quantize_qdq``, after
  ``onnx.version_converter`` lifts a model below opset 13 to 13); ``pruned``
  (30 % magnitude pruning); ``float16`` (``fixtures.conversions.to_float16``); ``ort``
  (ONNX Runtime's offline optimizer at ``ORT_ENABLE_EXTENDED``: BatchNorm folding, FusedConv,
  MatMul+Add -> Gemm, reordered nodes); plus, for the fine-tuning bases, ``finetuned``: every
  copy :mod:`tools.forensics_finetune` trains from the base with real SGD steps (digits CNN:
  2, 6 and 10 % more steps of its own training; torchvision: 1, 5 and 20 steps of every
  parameter, 10 with BatchNorm frozen, 10 of the classifier only), then permuted;
- *distractors*: every runnable fixture at seeds 1..``--seeds`` (independent models of the same
  architectures: the hard case; other architectures), and the fine-tuning bases trained or
  initialised from seed 1. No distractor is built at seed 0: a fixture draws its weights from
  one random stream per seed, so fixtures of another name at seed 0 share layers with the
  references bit for bit (``bfloat16_weights`` holds ``vgg``'s convolutions, ``float16_convnet``
  ``resnet``'s): they are derived from the same draws, not unrelated.

The index holds references and distractors. Printed:

- top-1 accuracy: derivatives whose closest indexed model is their reference, called derived
  (overall and per kind of derivative);
- unrelated called derived: (suspect, indexed model) pairs called "derived" although the
  model is not the suspect's source, over every derivative's ranking and every distractor
  searched against an index of the references alone;
- the distance margin: the largest derivative distance and the smallest unrelated one;
- fingerprint throughput against ``onnx.load`` per core: CPU time of a pass over the fixture
  files, over the real and exported models, and over one large generated model, fingerprinted
  in the tasks of a build (:func:`throughput`), the fastest of ``--repeats`` rounds; with the
  ratio when the sha256 is computed too (a first build does not; a file whose time changed
  gets it), sha256 alone, and the wall-time ratio;
- index build time with 1 and 2 workers (fresh indexes, 3 alternating runs each, median) and
  the speed-up, with the load average before and after;
- ``find`` time against an index of ``--synthetic`` (100,000) synthetic fingerprints, the
  median of 3 runs.

``--calibrate`` also prints the constants of :mod:`onnxlady._provenance._fingerprint` and
:mod:`onnxlady._provenance._find` re-derived from this registry (field scales and weights,
the unrelated-gap law, the margin the threshold sits in).

    python3 -m tools.registry_experiment [--out DIR] [--seeds 3] [--synthetic 100000] [--calibrate] [--real-pairs] [--json]

``--stages`` also measures where fingerprinting's CPU time goes (:func:`stage_costs`): the
file read and the protobuf parse alone, then reading, walking the graph for the producer
weights, the layer arithmetic and the search vectors, each against ``onnx.load``, and the
floor of a fingerprint in Python (parse, every node's names, the arithmetic, the vectors);
with ``--throughput-only`` it replaces the throughput.

``--fresh`` also times one pass of ``onnx.load`` and one of fingerprinting over the same files,
each in a fresh process (:func:`fresh_pass`): what a build's pool worker pays on its first batch,
before its allocator has settled (with ``--throughput-only`` it replaces the throughput).

``--real-pairs`` also compares every pair of different real models that ``python3 -m
tools.match_real_models`` reads (:func:`real_pairs`): unrelated pairs the registry lacks (timm's
random-initialised tiny transformers share their layer shapes).

``--out DIR --reuse`` measures again on the registry an earlier ``--out DIR`` run built (its
``layout.json``), without building it again; ``--throughput-only --build-speedup`` then times
the fingerprint throughput and the 1 -> 2 worker build alone, with any round's onnxlady (to
compare two trees: run the same command from each).

The fine-tuned models are exported once into ``.cache/registry/finetune`` by the torch
virtualenv (``ZOO_PYTHON -m tools.registry_experiment --export-finetuned DIR``, about a minute)
and reused afterwards.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fixtures import FIXTURES, RUNNABLE, build_large_model
from fixtures.conversions import quantize_qdq, to_float16
from onnxlady._provenance._find import EVIDENCE, derived_threshold, find
from onnxlady._provenance._fingerprint import (
    CONTRAST_LIMIT,
    FIELDS,
    LAYER_WIDTH,
    ModelFingerprint,
    compare_fingerprints,
    field_gaps,
    fingerprint_model,
    is_derived,
    layer_distances,
)
from onnxlady._provenance._index import _batches, _scan, _Task, add_fingerprints, build_index
from onnxlady._provenance._read import fingerprint_files
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import copy_model, permute_copy

REPO = Path(__file__).resolve().parents[1]
#: The protected models: fixtures every derivative builds from (ORT runs them, QDQ and float16
#: convert them).
REFERENCES: tuple[str, ...] = (
    "vgg", "resnet", "mobilenet", "concat", "matmul_mlp", "grouped_conv", "conv_transpose", "split_concat",
    "shufflenet_v2", "encoder_prenorm", "encoder_postnorm", "tied_lm_head", "lstm_head", "depth_to_space",
    "reshape_maps", "unfolded_bn",
)  # fmt: skip
#: Real models (``python3 -m tools.fetch_models``), each a reference when present.
REAL_MODELS = REPO / ".cache" / "models"
#: Models fine-tuned in the torch virtualenv (names of :mod:`tools.forensics_finetune`).
FINETUNE_MODELS = ("digits_cnn", "digits_cnn_bn", "shufflenet_v2_x0_5", "mobilenet_v2")
#: Models exported from the very same training as another (the digits CNN with BatchNorm folded
#: into its convolutions): their base and fine-tuned copies are derivatives of that model, not
#: references of their own (the fingerprint folds BatchNorm, so they are the same neurons).
FINETUNE_SAME_AS = {"digits_cnn": "digits_cnn_bn"}
FINETUNE_CACHE = REPO / ".cache" / "registry" / "finetune"
ZOO_PYTHON = Path("/tmp/zoo-venv/bin/python")
NOISE_OMEGA = 0.1
PRUNE_PERCENT = 30.0
DERIVATIVES = ("permuted", "noise", "int8", "pruned", "float16", "ort")
KINDS = (*DERIVATIVES, "finetuned")


def _ort_optimized(model: onnx.ModelProto, folder: Path, name: str) -> onnx.ModelProto:
    """The model as ONNX Runtime's offline optimizer writes it (ORT_ENABLE_EXTENDED, CPU)."""
    import onnxruntime as ort

    source, target = folder / f"{name}.ort-in.onnx", folder / f"{name}.ort-out.onnx"
    onnx.save(model, source)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(target)
    source.unlink()
    target.unlink()
    return optimized


def _opset_13(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 13 or later: QDQ per channel needs it (PaddleOCR exports opset 11-12).

    ``onnx.version_converter`` rewrites the operators whose signature changed (Split, Squeeze,
    ReduceSum... take their axes as inputs); the weights are kept as they are.
    """
    version = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    return model if version >= 13 else onnx.version_converter.convert_version(model, 13)


def _perturbed(model: onnx.ModelProto, **kwargs: Any) -> onnx.ModelProto:
    copy = copy_model(model)
    perturb_model(copy, **kwargs)
    return copy


def _derivatives(
    reference: onnx.ModelProto, seed: int, scratch: Path, name: str
) -> tuple[dict[str, onnx.ModelProto], dict[str, str]]:
    """The 6 derivatives of a reference, and why any could not be made.

    A converter may refuse a real model's operators: that is a line of the report, not a crash.
    """
    permuted = permute_copy(reference, seed)[0]
    makers: dict[str, Callable[[], onnx.ModelProto]] = {
        "permuted": lambda: permuted,
        "noise": lambda: _perturbed(permuted, noise=NOISE_OMEGA, seed=seed),
        "int8": lambda: quantize_qdq(_opset_13(permuted)),
        "pruned": lambda: _perturbed(permuted, prune_percent=PRUNE_PERCENT),
        "float16": lambda: to_float16(permuted),
        "ort": lambda: _ort_optimized(permuted, scratch, name),
    }
    made, failed = {}, {}
    for kind, make in makers.items():
        try:
            made[kind] = make()
        except Exception as exc:  # any converter failure is a line of the report
            failed[kind] = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    return made, failed


# -- fine-tuned models (torch virtualenv) -----------------------------------------------------
def export_finetuned(out: Path) -> None:
    """Run in the torch virtualenv: every model of :data:`FINETUNE_MODELS`.

    Seed 0: its base and fine-tuned copies (:mod:`tools.forensics_finetune`); seed 1: its base
    only (a distractor). Each in ``out/<model>.seed<k>/`` with ``forensics.json``.
    """
    from tools.forensics_finetune import DIGITS, finetune_digits, finetune_torchvision

    for name in FINETUNE_MODELS:
        for seed in (0, 1):
            folder = out / f"{name}.seed{seed}"
            if (folder / "forensics.json").exists():
                continue
            start = time.perf_counter()
            if seed == 0:
                maker = finetune_digits if name in DIGITS else finetune_torchvision
                manifest = maker(name, folder, seed=seed)
            else:
                manifest = _export_base(name, folder, seed)
            manifest["seed"] = seed
            manifest["seconds"] = round(time.perf_counter() - start, 1)
            (folder / "forensics.json").write_text(json.dumps(manifest, indent=2) + "\n")
            print(
                f"{name} seed {seed}: {len(manifest['regimes'])} fine-tuned copies ({manifest['seconds']} s)",
                flush=True,
            )


def _export_base(name: str, folder: Path, seed: int) -> dict[str, Any]:
    """The base of :mod:`tools.forensics_finetune` for ``seed``, without its fine-tuned copies."""
    from tools.forensics_finetune import CLASSES, DIGITS, _export, _synthetic_batches

    if name in DIGITS:
        from tools.train_digits_cnn import train_and_export

        train_and_export(folder, seed=seed, thetas=(2,), keep_batchnorm=name.endswith("_bn"))
    else:
        import torch
        import torchvision

        from tools.zoo import reinitialise

        torch.manual_seed(seed)
        base = getattr(torchvision.models, name)(weights=None, num_classes=CLASSES)
        reinitialise(base.eval(), next(_synthetic_batches(seed + 100))[0][:4], seed=seed)
        folder.mkdir(parents=True, exist_ok=True)
        _export(base, folder / "base.onnx")
    return {"model": name, "regimes": []}


def finetuned_models(cache: Path, zoo_python: Path) -> tuple[dict[str, Any], str]:
    """The fine-tuned exports, made by ``zoo_python`` when missing.

    Returns per model its seed-0 base, fine-tuned copies and seed-1 base; and a note when torch
    is not available.
    """
    missing = [n for n in FINETUNE_MODELS for s in (0, 1) if not (cache / f"{n}.seed{s}" / "forensics.json").exists()]
    if missing:
        if not zoo_python.exists():
            return {}, f"no fine-tuned derivatives: {zoo_python} (torch virtualenv) not found"
        print(f"exporting fine-tuned models with {zoo_python}...", file=sys.stderr)
        command = [str(zoo_python), "-m", "tools.registry_experiment", "--export-finetuned", str(cache)]
        done = subprocess.run(command, cwd=REPO, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            return {}, f"no fine-tuned derivatives: the export failed ({done.stderr.strip().splitlines()[-1:]})"
    models = {}
    for name in FINETUNE_MODELS:
        base, other = cache / f"{name}.seed0", cache / f"{name}.seed1"
        manifest = json.loads((base / "forensics.json").read_text())
        models[name] = {
            "base": base / "base.onnx",
            "other": other / "base.onnx",
            "regimes": [
                (entry["regime"], base / entry["file"], entry["steps"], entry.get("trains", "all"))
                for entry in manifest["regimes"]
            ],
        }
    return models, ""


# -- the registry -----------------------------------------------------------------------------
def build_registry(root: Path, seeds: int, finetuned: dict[str, Any], real: list[Path]) -> dict[str, Any]:
    """Write references, derivatives and distractors under ``root``; return what is where."""
    layout: dict[str, Any] = {"references": {}, "derivatives": [], "distractors": [], "skipped": [], "sources": {}}
    for folder in ("registry/references", "registry/distractors", "suspects", "scratch"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    references: list[tuple[str, str, Callable[[], onnx.ModelProto]]] = [
        (name, "fixture", functools.partial(FIXTURES[name], 0)) for name in REFERENCES
    ]
    references += [(f"real.{path.stem}", "real", functools.partial(onnx.load, path)) for path in real]
    references += [
        (f"torch.{name}", "torch", functools.partial(onnx.load, item["base"]))
        for name, item in finetuned.items()
        if name not in FINETUNE_SAME_AS
    ]
    for number, (name, source, load) in enumerate(references):
        reference = load()
        path = root / "registry/references" / f"{name}.onnx"
        onnx.save(reference, path)
        layout["references"][name] = str(path)
        layout["sources"][str(path)] = source
        made, failed = _derivatives(reference, 100 + number, root / "scratch", name)
        for kind, error in failed.items():
            layout["skipped"].append({"reference": name, "kind": kind, "error": error})
        for kind, model in made.items():
            suspect = root / "suspects" / f"{name}.{kind}.onnx"
            onnx.save(model, suspect)
            layout["derivatives"].append({"path": str(suspect), "reference": str(path), "kind": kind, "name": name})
        short = name.removeprefix("torch.")
        copies: list[tuple[str, Path, int, str]] = []
        if source == "torch":
            copies += finetuned[short]["regimes"]
            for alias, same in FINETUNE_SAME_AS.items():
                if same == short and alias in finetuned:  # the same training, exported BatchNorm-folded
                    copies.append(("base, BN folded", finetuned[alias]["base"], 0, "-"))
                    copies += [(f"{r}, BN folded", f, s, w) for r, f, s, w in finetuned[alias]["regimes"]]
        for regime, file, steps, trains in copies:
            suspect = root / "suspects" / f"{name}.finetuned-{regime.replace(', ', '-').replace(' ', '-')}.onnx"
            onnx.save(permute_copy(onnx.load(file), 200 + number)[0], suspect)
            layout["derivatives"].append(
                {"path": str(suspect), "reference": str(path), "kind": "finetuned", "name": name,
                 "regime": regime, "steps": steps, "trains": trains}
            )  # fmt: skip
    for name in sorted(RUNNABLE):
        for seed in range(1, seeds + 1):  # never seed 0: the references' random stream (see the docstring)
            path = root / "registry/distractors" / f"{name}.seed{seed}.onnx"
            onnx.save(FIXTURES[name](seed), path)
            layout["distractors"].append(str(path))
            layout["sources"][str(path)] = "fixture"
    for name, item in finetuned.items():
        path = root / "registry/distractors" / f"torch.{name}.seed1.onnx"
        onnx.save(onnx.load(item["other"]), path)
        layout["distractors"].append(str(path))
        layout["sources"][str(path)] = "torch"
    (root / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))  # for --reuse
    return layout


#: Where :func:`build_registry` records its layout under ``--out`` (read back by ``--reuse``).
LAYOUT_FILE = "layout.json"


def reused_layout(root: Path) -> dict[str, Any]:
    """The layout of the registry an earlier run built under ``root`` (``--reuse``).

    Raises:
        SystemExit: no registry there, or its files changed since (a file gone).
    """
    try:
        layout: dict[str, Any] = json.loads((root / LAYOUT_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--reuse: no registry under {root} ({exc}); run once with --out {root} first") from exc
    missing = [path for path in layout["sources"] if not Path(path).is_file()]
    missing += [item["path"] for item in layout["derivatives"] if not Path(item["path"]).is_file()]
    if missing:
        raise SystemExit(f"--reuse: {len(missing)} registry files are gone (first: {missing[0]}); build it again")
    return layout


# -- measurements -----------------------------------------------------------------------------
def search_accuracy(layout: dict[str, Any], index: Path, references_index: Path) -> dict[str, Any]:
    """Top-1 accuracy and unrelated-called-derived counts (see the module docstring)."""
    top1 = called = 0
    false_derived: list[dict[str, Any]] = []
    worst_derivative = 0.0
    closest_unrelated = float("inf")
    per_kind: dict[str, dict[str, Any]] = {
        kind: {"count": 0, "top1": 0, "derived": 0, "distances": []} for kind in KINDS
    }
    misses: list[dict[str, Any]] = []
    not_derived: list[dict[str, Any]] = []
    finetuned: list[dict[str, Any]] = []
    # The evidence constant (1 - distance^2) * sqrt(layer slots) of every true pair (lowest kept)
    # and every unrelated pair (highest kept): EVIDENCE must sit between them (see _find.py).
    evidence: dict[str, Any] = {
        "derivative_lowest": float("inf"), "unrelated_highest": float("-inf"), "lowest_pair": "", "highest_pair": "",
        "derivatives": [],
    }  # fmt: skip

    def note(candidate: Any, suspect: str, related: bool) -> None:
        if not candidate.paired_layers:
            return
        slots = candidate.paired_layers + sum(candidate.unpaired_layers)
        value = (1.0 - candidate.distance**2) * slots**0.5
        label = f"{Path(suspect).name} / {Path(candidate.path).name}"
        if related:
            evidence["derivatives"].append((value, label))
        if related and value < evidence["derivative_lowest"]:
            evidence["derivative_lowest"], evidence["lowest_pair"] = value, label
        if not related and value > evidence["unrelated_highest"]:
            evidence["unrelated_highest"], evidence["highest_pair"] = value, label

    for item in layout["derivatives"]:
        report = find(item["path"], index, top=10)
        best = report.candidates[0]
        distance = _true_distance(report, item["reference"])
        kind = per_kind[item["kind"]]
        kind["count"] += 1
        kind["distances"].append(distance)
        hit = best.path == item["reference"]
        if hit and best.call != "derived":
            not_derived.append({"suspect": Path(item["path"]).name, "distance": best.distance})
        if hit:
            top1 += 1
            called += best.call == "derived"
            kind["top1"] += 1
            kind["derived"] += best.call == "derived"
        else:
            misses.append({"suspect": item["path"], "found": best.path, "distance": best.distance, "true": distance})
        if item["kind"] == "finetuned":
            finetuned.append(
                {"reference": item["name"], "regime": item["regime"], "steps": item["steps"], "trains": item["trains"],
                 "top1": hit, "call": best.call if hit else "missed", "distance": distance}
            )  # fmt: skip
        worst_derivative = max(worst_derivative, distance)
        for candidate in report.candidates:
            note(candidate, item["path"], candidate.path == item["reference"])
            if candidate.path != item["reference"]:
                closest_unrelated = min(closest_unrelated, candidate.distance)
                if candidate.call == "derived":
                    false_derived.append(
                        {"suspect": item["path"], "model": candidate.path, "distance": candidate.distance}
                    )
    for path in layout["distractors"]:
        report = find(path, references_index, top=5)
        for candidate in report.candidates:
            note(candidate, path, False)
            closest_unrelated = min(closest_unrelated, candidate.distance)
            if candidate.call == "derived":
                false_derived.append({"suspect": path, "model": candidate.path, "distance": candidate.distance})
    total = len(layout["derivatives"])
    return {
        "contrast": contrast_ranges(layout),
        "derivatives": total,
        "top1": top1,
        "top1_called_derived": called,
        "top1_accuracy": top1 / total,
        "unrelated_called_derived": len(false_derived),
        "false_derived": false_derived,
        "misses": misses,
        "largest_derivative_distance": worst_derivative,
        "smallest_unrelated_distance": closest_unrelated,
        "by_kind": {
            kind: {
                "count": v["count"],
                "top1": v["top1"],
                "derived": v["derived"],
                "largest_distance": max(v["distances"]),
            }
            for kind, v in per_kind.items()
            if v["count"]
        },
        "finetuned": finetuned,
        "distractor_queries": len(layout["distractors"]),
        "evidence": evidence,
        "not_derived": not_derived,
    }


def contrast_ranges(layout: dict[str, Any]) -> dict[str, Any]:
    """The ratio test's margins (``LayerMatch.contrast``, see ``_fingerprint.CONTRAST_LIMIT``).

    Every derivative against its reference, and every distractor against the reference of its
    own architecture (``NAME.seedK.onnx`` against ``NAME``: the hardest unrelated pair), where
    the contrast is measurable (enough pairs with same-shape alternatives).
    """
    cache: dict[str, ModelFingerprint] = {}

    def fingerprint(path: str) -> ModelFingerprint:
        if path not in cache:
            cache[path] = fingerprint_model(onnx.load(path))
        return cache[path]

    derived = [
        compare_fingerprints(fingerprint(item["path"]), fingerprint(item["reference"])).contrast
        for item in layout["derivatives"]
    ]
    unrelated = []
    for path in layout["distractors"]:
        reference = layout["references"].get(Path(path).name.split(".seed")[0])
        if reference is not None:
            unrelated.append(compare_fingerprints(fingerprint(path), fingerprint(reference)).contrast)
    measured = [c for c in derived if c is not None]
    others = [c for c in unrelated if c is not None]
    return {
        "derivatives_measured": len(measured), "derivatives": len(derived),
        "derivative_highest": max(measured, default=None),
        "same_architecture_measured": len(others), "same_architecture": len(unrelated),
        "same_architecture_lowest": min(others, default=None),
    }  # fmt: skip


def _contrast_row(contrast: dict[str, Any]) -> str:
    def value(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    return (
        f"| contrast (ratio test, limit {CONTRAST_LIMIT}): highest derivative / lowest same-architecture distractor | "
        f"{value(contrast['derivative_highest'])} ({contrast['derivatives_measured']} of {contrast['derivatives']} "
        f"measurable) / {value(contrast['same_architecture_lowest'])} ({contrast['same_architecture_measured']} of "
        f"{contrast['same_architecture']}) | between |"
    )


def _true_distance(report: Any, reference: str) -> float:
    for candidate in report.candidates:
        if candidate.path == reference:
            return candidate.distance
    return float("inf")


def throughput(files: list[str], repeats: int = 5) -> dict[str, float]:
    """``onnx.load`` against fingerprinting as an index build's worker does it, per core.

    Each of ``repeats`` rounds times, one after the other, a pass of ``onnx.load`` over every
    file, a pass of fingerprinting them in the tasks a one-worker build makes
    (:func:`onnxlady._provenance._index._batches`, each task one
    :func:`~onnxlady._provenance._read.fingerprint_files` call, without the sha256 a first build
    does not compute), the same with the sha256 (what a file whose time changed costs), and
    sha256 alone of each file's bytes read from disk; per method the fastest round counts. Per
    core: CPU time of the process (``time.process_time``, every thread included), which other
    work on a shared machine inflates far less than wall time; wall time is reported too.
    """
    size = sum(os.path.getsize(f) for f in files)
    tasks = [_Task(f, os.path.getsize(f)) for f in files]
    batches = [[t.path for t in batch] for batch in _batches(tasks, 1)]

    def load() -> None:
        for path in files:
            onnx.load(path)

    def fingerprint(digest: bool) -> None:
        for batch in batches:
            for result in fingerprint_files(batch, digest=digest):
                assert not result.error, result.error

    def sha256() -> None:
        for path in files:
            hashlib.sha256(Path(path).read_bytes()).hexdigest()

    runs: dict[str, Callable[[], Any]] = {
        "load": load,
        "fingerprint": functools.partial(fingerprint, False),
        "fingerprint_sha256": functools.partial(fingerprint, True),
        "sha256": sha256,
    }
    best = {(name, clock): float("inf") for name in runs for clock in ("cpu", "wall")}
    for _ in range(repeats):
        for name, run in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            run()
            spent = {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}
            for clock, seconds in spent.items():
                best[name, clock] = min(best[name, clock], seconds)
    return {
        "files": len(files),
        "megabytes": size / 1e6,
        "tasks": len(batches),
        "load_seconds": best["load", "cpu"],
        "fingerprint_seconds": best["fingerprint", "cpu"],
        "sha256_seconds": best["sha256", "cpu"],
        "load_mb_per_s": size / 1e6 / best["load", "cpu"],
        "fingerprint_mb_per_s": size / 1e6 / best["fingerprint", "cpu"],
        "ratio": best["fingerprint", "cpu"] / best["load", "cpu"],
        "ratio_with_sha256": best["fingerprint_sha256", "cpu"] / best["load", "cpu"],
        "sha256_ratio": best["sha256", "cpu"] / best["load", "cpu"],
        "wall_ratio": best["fingerprint", "wall"] / best["load", "wall"],
    }


#: One pass in a fresh interpreter (:func:`fresh_pass`): argv[1] the method, argv[2] a JSON file of
#: the tasks; prints the CPU time (every thread) and the page faults of the pass alone.
_FRESH_PASS = """
import json, resource, sys, time
import onnx
from onnxlady._provenance._read import fingerprint_files
method, tasks = sys.argv[1], json.load(open(sys.argv[2]))
before, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
for task in tasks:
    if method == "load":
        for path in task:
            onnx.load(path)
    else:
        for result in fingerprint_files(task, digest=False):
            assert not result.error, result.error
print(json.dumps([time.process_time() - cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before]))
"""


def fresh_pass(files: list[str], repeats: int = 5) -> dict[str, Any]:
    """One pass of ``onnx.load`` and one of fingerprinting, each in a fresh process (``--fresh``).

    What a build's pool worker pays: it starts fresh and reads each file once, so its allocator
    has not settled yet (the in-process :func:`throughput` takes the fastest of several rounds in
    one long-lived process, where earlier passes, ``onnx.load``'s included, have raised glibc's
    mmap and trim thresholds for every later one). Per method, the CPU time and page faults of
    the pass alone (imports excluded), ``repeats`` alternating runs, medians. The child imports
    the onnxlady this process imported, so the command compares trees like ``--throughput-only``.
    """
    import onnxlady

    tasks = [[t.path for t in batch] for batch in _batches([_Task(f, os.path.getsize(f)) for f in files], 1)]
    env = dict(os.environ, PYTHONPATH=str(Path(onnxlady.__file__).resolve().parents[1]))
    runs: dict[str, list[tuple[float, int]]] = {"load": [], "fingerprint": []}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as listing:
        json.dump(tasks, listing)
        listing.flush()
        for _ in range(repeats):
            for method, done in runs.items():
                child = subprocess.run(
                    [sys.executable, "-c", _FRESH_PASS, method, listing.name],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
                cpu, faults = json.loads(child.stdout)
                done.append((float(cpu), int(faults)))
    load = statistics.median(cpu for cpu, _ in runs["load"])
    fingerprint = statistics.median(cpu for cpu, _ in runs["fingerprint"])
    return {
        "files": len(files),
        "megabytes": sum(os.path.getsize(f) for f in files) / 1e6,
        "runs": repeats,
        "load_seconds": load,
        "fingerprint_seconds": fingerprint,
        "ratio": fingerprint / load,
        "load_faults": statistics.median(faults for _, faults in runs["load"]),
        "fingerprint_faults": statistics.median(faults for _, faults in runs["fingerprint"]),
        "ratios": sorted(mine / theirs for (mine, _), (theirs, _) in zip(runs["fingerprint"], runs["load"])),
    }


def _print_fresh(results: dict[str, Any]) -> None:
    for label, key in (("fixture files", "fresh_fixtures"), ("real and exported models", "fresh_models")):
        if results.get(key):
            print(_fresh_row(label, results[key]))


def _fresh_row(label: str, fresh: dict[str, Any]) -> str:
    return (
        f"| fingerprint vs onnx.load, {label} ({fresh['files']} files, {fresh['megabytes']:.1f} MB), one pass in a "
        f"fresh process, CPU time (median of {fresh['runs']}) | {fresh['ratio']:.2f}x ("
        f"{fresh['fingerprint_seconds'] * 1e3:.1f} vs {fresh['load_seconds'] * 1e3:.1f} ms; runs "
        f"{fresh['ratios'][0]:.2f}x to {fresh['ratios'][-1]:.2f}x; page faults {fresh['fingerprint_faults']:.0f} vs "
        f"{fresh['load_faults']:.0f}) | <= 2x |"
    )


def stage_costs(files: list[str], repeats: int = 5) -> dict[str, Any]:
    """Where fingerprinting's CPU time goes, stage by stage, against ``onnx.load`` (``--stages``).

    Per stage, the CPU time (``time.process_time``) of one pass over ``files``, the fastest of
    ``repeats`` interleaved rounds: ``onnx.load``; ``read`` (each file's bytes read, nothing
    else); ``parse`` (the bytes read and ``ParseFromString``: what any reader pays); then the
    stages of :func:`~onnxlady._provenance._read.fingerprint_files`, each on the previous
    stage's output: ``open`` (read, parse or skim, the checks), ``graph walk`` (the producer
    weights, :func:`~onnxlady._provenance._producers.model_producers`), ``layer arithmetic``
    (:func:`~onnxlady._provenance._fingerprint.fingerprints_of` over the tasks of a one-worker
    build) and ``vectors and bytes`` (search vectors and serialization); ``whole`` is
    ``fingerprint_files`` itself, called as an index build calls it. ``node names`` is no stage
    but a floor under the graph walk: every node's operator, input and output names read off
    the opened models, the least any walk of the graph in Python pays (protobuf makes a new
    object per field read). ``floor`` adds up the least a fingerprint of these bits pays in
    Python: ``parse`` + ``node names`` + ``layer arithmetic`` (its numpy passes are fixed by the
    bits the index holds) + ``vectors and bytes``. Each stage starts after a full garbage
    collection. Runs with any round's onnxlady (the search vectors one by one where it has no
    batched form).
    """
    import gc

    from onnxlady._provenance import _fingerprint as fingerprint_module
    from onnxlady._provenance._producers import model_producers
    from onnxlady._provenance._read import open_local

    tasks = [[t.path for t in batch] for batch in _batches([_Task(f, os.path.getsize(f)) for f in files], 1)]
    batched = getattr(fingerprint_module, "search_vectors", None)

    def read() -> None:
        for path in files:
            Path(path).read_bytes()

    def parse() -> None:
        for path in files:
            onnx.ModelProto().ParseFromString(Path(path).read_bytes())

    def opened() -> list[list[Any]]:
        models = []
        for batch in tasks:
            group = []
            for path in batch:
                with open_local(Path(path), digest=False) as (model, _, _):
                    group.append(model)
            models.append(group)
        return models

    state: dict[str, Any] = {}

    def vectors_and_bytes() -> list[Any]:
        done = []
        for group in state["layer arithmetic"]:
            vectors = batched(group) if batched else [fingerprint_module.search_vector(f) for f in group]
            done.append((vectors, [f.to_bytes() for f in group]))
        return done

    def whole() -> list[Any]:
        return [fingerprint_files(batch, digest=False) for batch in tasks]

    stages: dict[str, Callable[[], Any]] = {
        "onnx.load": lambda: [onnx.load(path) for path in files],
        "read": read,
        "parse": parse,
        "open": opened,
        # The least any reader of the graph in Python pays (every node's operator, input and
        # output names from the parsed protobuf): a floor under the graph walk.
        "node names": lambda: [
            [[(n.op_type, n.input[:], n.output[:]) for n in m.model.graph.node] for m in group]
            for group in state["open"]
        ],
        "graph walk": lambda: [
            [model_producers(m.model, m.arrays, m.full_model) for m in group] for group in state["open"]
        ],
        "layer arithmetic": lambda: [fingerprint_module.fingerprints_of(group) for group in state["graph walk"]],
        "vectors and bytes": vectors_and_bytes,
        "whole": whole,
    }
    best = dict.fromkeys(stages, float("inf"))
    for _ in range(repeats):
        for name, run in stages.items():
            gc.collect()  # each stage starts without the garbage of the one before
            cpu = time.process_time()
            state[name] = run()
            best[name] = min(best[name], time.process_time() - cpu)
    state.clear()
    best["floor"] = best["parse"] + best["node names"] + best["layer arithmetic"] + best["vectors and bytes"]
    return {"files": len(files), "seconds": best, "per_file_us": {k: v / len(files) * 1e6 for k, v in best.items()}}


def _stages_table(results: dict[str, Any]) -> str:
    groups = [(label, results[key]) for label, key in (("fixture files", "stages_fixtures"),
              ("real and exported models", "stages_models")) if results.get(key)]  # fmt: skip
    lines = [
        "| stage (CPU time of a pass, fastest of the rounds) | "
        + " | ".join(f"{label} ({group['files']} files)" for label, group in groups) + " |",
        "| --- |" + " --- |" * len(groups),
    ]
    labels = {"floor": "floor: parse + node names + layer arithmetic + vectors and bytes"}
    for stage in groups[0][1]["seconds"]:
        cells = []
        for _, group in groups:
            seconds, load = group["seconds"].get(stage), group["seconds"]["onnx.load"]
            if seconds is None:
                cells.append("-")
                continue
            cells.append(f"{seconds * 1e3:.1f} ms ({group['per_file_us'][stage]:.0f} us/file, {seconds / load:.2f}x load)")
        lines.append(f"| {labels.get(stage, stage)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: One index build in a fresh interpreter (:func:`build_speedup`): argv[1] the worker count,
#: argv[2] the index, argv[3:] the paths; prints wall seconds and the CPU seconds of this process
#: and of its pool processes (imports excluded, as a user's ``index build`` pays them once).
_FRESH_BUILD = """
import json, multiprocessing.util, os, resource, sys, tempfile, time
from onnxlady._provenance import _index
started = []
spent = tempfile.mkdtemp()
def cpu(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime
def account():  # in each pool process: its CPU time, written as it exits
    write = lambda: open(os.path.join(spent, str(os.getpid())), "w").write(str(cpu(resource.RUSAGE_SELF)))
    multiprocessing.util.Finalize(None, write, exitpriority=100)
class Counted(_index.ProcessPoolExecutor):  # how many pool processes the build starts, and their CPU
    def __init__(self, max_workers=None, **kwargs):
        started.append(max_workers)
        super().__init__(max_workers, initializer=account, **kwargs)
_index.ProcessPoolExecutor = Counted
own, pool, start = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
_index.build_index(sys.argv[3:], sys.argv[2], workers=int(sys.argv[1]))
wall = time.perf_counter() - start
each = [float(open(os.path.join(spent, name)).read()) for name in os.listdir(spent)]
print(json.dumps([wall, cpu(resource.RUSAGE_SELF) - own, cpu(resource.RUSAGE_CHILDREN) - pool, sum(started), each]))
"""


def build_speedup(paths: list[str], folder: Path, runs: int = 3) -> dict[str, Any]:
    """Index build time with 1 and 2 workers on fresh indexes: ``runs`` alternating runs each, medians.

    Each build runs in a fresh process, as ``onnxlady index build`` does (imports excluded): a
    build forked from this long-lived process would copy its pages into every pool process
    (the registry's models, every result so far) and time that instead. The child imports the
    onnxlady this process imported, so the command compares trees like ``--throughput-only``.
    The load average (``os.getloadavg``) before and after says how many other processes
    competed for the cores; where they did, wall times say little and the CPU time of the
    busiest process says what two free cores would give: ``cpu_bound_speedup`` is the one-worker
    build's CPU time over that of the busiest process of the two-worker build (the calling one
    or a pool process, each of which reports its own as it exits), the speed-up of a build
    whose processes never wait for a core. Where the calling process fingerprints too, tasks go
    to whichever process is free, so under load the split follows which one got a core and this
    figure reads low; the total CPU time is the work itself.
    """
    import onnxlady

    env = dict(os.environ, PYTHONPATH=str(Path(onnxlady.__file__).resolve().parents[1]))
    times: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    own: dict[int, list[float]] = {1: [], 2: []}
    pool: dict[int, list[float]] = {1: [], 2: []}
    pool_processes = 0
    busiest: dict[int, list[float]] = {1: [], 2: []}
    load_before = os.getloadavg()
    for attempt in range(runs):
        for workers in (1, 2):
            index = folder / f"speed.{workers}.{attempt}.idx"
            for stale in (index, index.with_name(index.name + "-wal"), index.with_name(index.name + "-shm")):
                stale.unlink(missing_ok=True)  # a reused --out folder holds the last run's: a build must start empty
            child = subprocess.run(
                [sys.executable, "-c", _FRESH_BUILD, str(workers), str(index), *paths],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            wall, mine, theirs, processes, each = json.loads(child.stdout.splitlines()[-1])
            pool_processes = max(pool_processes, int(processes)) if workers == 2 else pool_processes
            busiest[workers].append(max([mine, *each]))
            times[workers].append(wall)
            cpu[workers].append(mine + theirs)
            own[workers].append(mine)
            pool[workers].append(theirs)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    own_two, pool_two = statistics.median(own[2]), statistics.median(pool[2])
    return {
        "files": len(_scan(paths)[0]),
        "one_worker_seconds": one,
        "two_workers_seconds": two,
        "speedup": one / two,
        "runs": times,
        # CPU seconds of the build's process and its pool processes: the work itself, whatever the load.
        "one_worker_cpu_seconds": statistics.median(cpu[1]),
        "two_workers_cpu_seconds": statistics.median(cpu[2]),
        "two_workers_own_cpu_seconds": own_two,
        "two_workers_pool_cpu_seconds": pool_two,
        "pool_processes": pool_processes,
        "busiest_process_cpu_seconds": statistics.median(busiest[2]),
        "cpu_bound_speedup": statistics.median(cpu[1]) / statistics.median(busiest[2]),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def synthetic_fingerprints(count: int, seed: int = 0) -> list[tuple[str, ModelFingerprint]]:
    """``count`` synthetic fingerprints around 500 random architectures.

    Each architecture has 5 to 60 layers of random shapes; each model is a random draw of
    records around its architecture's.
    """
    rng = np.random.default_rng(seed)
    architectures = []
    for _ in range(500):
        layers = int(rng.integers(5, 61))
        shapes = np.stack(
            [
                2 ** rng.integers(3, 11, layers),
                2 ** rng.integers(3, 13, layers),
                rng.choice([1, 9], layers),
                np.ones(layers, int),
            ],
            axis=1,
        )
        architectures.append((shapes.astype(np.int64), rng.normal(0.0, 0.5, (layers, LAYER_WIDTH))))
    out = []
    for number in range(count):
        shapes, centre = architectures[number % len(architectures)]
        records = (centre + rng.normal(0.0, 0.05, centre.shape)).astype(np.float32)
        names = tuple(f"layer{i}" for i in range(len(shapes)))
        out.append((f"synthetic://{number}", ModelFingerprint(records, shapes, ("Conv",) * len(shapes), names)))
    return out


def find_speed(count: int, folder: Path) -> dict[str, Any]:
    """Median of 3 ``find`` runs (index opening, coarse and exact stages) against ``count`` synthetic fingerprints."""
    index = folder / f"synthetic.{count}.idx"
    entries = synthetic_fingerprints(count)
    start = time.perf_counter()
    add_fingerprints(index, entries)
    added = time.perf_counter() - start
    query = entries[count // 2][1]
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        report = find(query, index, top=10)
        runs.append(time.perf_counter() - start)
    assert report.candidates[0].path == entries[count // 2][0]
    return {"models": count, "index_seconds": added, "find_seconds_median": statistics.median(runs), "runs": runs}


def real_pairs() -> dict[str, Any]:
    """Every ordered pair of different real models of :mod:`tools.match_real_models` compared exactly.

    Its models (PyPI models, torchvision and timm zoo exports, deployment builds) are another
    source of unrelated pairs: many share layer shapes (timm's tiny transformers all hold
    192-wide layers, random-initialised by one law), which the registry's distractors do not.
    Pairs of one model in two forms (``same_model``) are left out. Returns the pairs called
    derived and the closest pairs, as distance over threshold.
    """
    from tools.match_real_models import DEFAULT_FOLDERS, find_models, same_model

    fingerprints: dict[str, ModelFingerprint] = {}
    errors = []
    for name, path in find_models(list(DEFAULT_FOLDERS)):
        result = fingerprint_files([str(path)], digest=False)[0]
        if result.error:
            errors.append(result.error)
        else:
            fingerprints[name] = ModelFingerprint.from_bytes(result.fingerprint)
    rows = []
    for a, first in fingerprints.items():
        for b, second in fingerprints.items():
            if same_model(a, b):
                continue
            match = compare_fingerprints(first, second)
            if not match.weighed_pairs:
                continue
            # The rule find applies: degenerate layers are no slots, the limit follows the pair's
            # own unrelated gap where it can measure one.
            slots = match.slots
            limit = derived_threshold(slots) * match.unrelated_scale
            rows.append((match.distance / limit, a, b, match.distance, len(match.pairs), slots, is_derived(match, limit)))
    rows.sort()
    return {
        "models": len(fingerprints),
        "errors": errors,
        "pairs_sharing_a_layer": len(rows),
        "called_derived": [row[1:4] for row in rows if row[6]],
        # Closest of the rest: a ratio under 1 is a pair within the limit that the contrast test refused.
        "closest": [(round(r[0], 3), r[1], r[2], round(r[3], 3), r[4], r[5]) for r in rows if not r[6]][:5],
    }


# -- calibration ------------------------------------------------------------------------------
def calibrate(layout: dict[str, Any]) -> dict[str, Any]:
    """The constants of the fingerprint's distance, re-derived from this registry."""
    fingerprints: dict[str, ModelFingerprint] = {}

    def fingerprint(path: str) -> ModelFingerprint:
        if path not in fingerprints:
            fingerprints[path] = fingerprint_model(onnx.load(path))
        return fingerprints[path]

    derivative_gaps: dict[str, dict[str, list[float]]] = {}
    for item in layout["derivatives"]:
        if layout["sources"].get(item["reference"]) != "fixture":
            continue  # the constants are fitted on the fixtures; the rest checks them
        reference, suspect = fingerprint(item["reference"]), fingerprint(item["path"])
        pairs = compare_fingerprints(reference, suspect).pairs
        gaps = field_gaps(reference.records[[i for i, _, _ in pairs]], suspect.records[[j for _, j, _ in pairs]])
        for name, value in gaps.items():
            derivative_gaps.setdefault(item["reference"], {}).setdefault(name, []).append(value)
    unrelated_gaps: dict[str, dict[str, list[float]]] = {}
    layer_rows: list[tuple[int, int, float]] = []
    for name, path in layout["references"].items():
        reference = fingerprint(path)
        for other in layout["distractors"]:
            if Path(other).name.startswith(f"{name}.seed"):
                twin = fingerprint(other)
                if not np.array_equal(twin.shapes, reference.shapes):
                    continue
                for field, value in field_gaps(reference.records, twin.records).items():
                    unrelated_gaps.setdefault(path, {}).setdefault(field, []).append(value)
                raw = np.sqrt(np.diag(layer_distances(reference.records, twin.records)))
                layer_rows.extend((int(s[0]), int(s[1]), float(d)) for s, d in zip(reference.shapes, raw))
    from onnxlady._provenance._fingerprint import FIELD_SCALES

    scales, ratios = {}, {}
    for field, _ in FIELDS:
        worst = [max(gaps[field]) for gaps in derivative_gaps.values()]
        scales[field] = float(np.median(worst)) * FIELD_SCALES[field]
        ratios[field] = float(
            np.median(
                [
                    min(unrelated_gaps[p][field]) / max(derivative_gaps[p][field])
                    for p in unrelated_gaps
                    if p in derivative_gaps
                ]
            )
        )
    rows = np.array(layer_rows)
    design = np.stack([np.ones(len(rows)), np.log(rows[:, 0]), np.log(rows[:, 1])], axis=1)
    law, *_ = np.linalg.lstsq(design, np.log(rows[:, 2]), rcond=None)
    return {
        "FIELD_SCALES": {k: round(v, 4) for k, v in scales.items()},
        "FIELD_WEIGHTS (ratio^2)": {k: round(v * v, 1) for k, v in ratios.items()},
        "UNRELATED_GAP": (round(float(np.exp(law[0])), 1), round(float(-law[1]), 3), round(float(-law[2]), 3)),
    }


# -- report -----------------------------------------------------------------------------------
def _speed_row(label: str, speed: dict[str, float]) -> str:
    return (
        f"| fingerprint vs onnx.load, {label} ({speed['files']} files, {speed['megabytes']:.1f} MB), CPU time | "
        f"{speed['ratio']:.2f}x ({speed['fingerprint_mb_per_s']:.0f} vs {speed['load_mb_per_s']:.0f} MB/s; "
        f"with sha256 {speed['ratio_with_sha256']:.2f}x; sha256 alone {speed['sha256_ratio']:.2f}x; "
        f"wall time {speed['wall_ratio']:.2f}x) | <= 2x |"
    )


def _build_row(build: dict[str, Any]) -> str:
    return (
        f"| index build of {build['files']} files, 1 -> 2 workers (median of {len(build['runs'][1])}) | "
        f"{build['one_worker_seconds']:.2f} s -> "
        f"{build['two_workers_seconds']:.2f} s (speed-up {build['speedup']:.2f}; CPU time "
        f"{build['one_worker_cpu_seconds']:.2f} s -> {build['two_workers_cpu_seconds']:.2f} s, of which the "
        f"calling process {build.get('two_workers_own_cpu_seconds', 0.0):.2f} s and "
        f"{build.get('pool_processes', 2)} pool process(es) {build.get('two_workers_pool_cpu_seconds', 0.0):.2f} s: "
        f"CPU-bound speed-up {build.get('cpu_bound_speedup', 0.0):.2f}; load average "
        f"{build['load_before'][0]:.1f} before, {build['load_after'][0]:.1f} after) | near 2 |"
    )


def _table(results: dict[str, Any]) -> str:
    accuracy, build, search = results["accuracy"], results["build"], results["find"]
    layout = results["layout"]
    sources = [layout["sources"][p] for p in layout["references"].values()]
    kinds = ", ".join(
        f"{k} {v['top1']}/{v['count']} ({v['largest_distance']:.3f})" for k, v in accuracy["by_kind"].items()
    )
    lines = [
        "| measure | result | goal |",
        "| --- | --- | --- |",
        (
            f"| references (fixtures / real / torch) / derivatives / distractors | {len(sources)} "
            f"({sources.count('fixture')} / {sources.count('real')} / {sources.count('torch')}) / "
            f"{accuracy['derivatives']} / {len(layout['distractors'])} | >= 10 references x 6 |"
        ),
        (
            f"| top-1 = true reference (called derived) | {accuracy['top1']}/{accuracy['derivatives']} "
            f"({100 * accuracy['top1_accuracy']:.1f} %; {accuracy['top1_called_derived']} derived) | >= 99 % |"
        ),
        f"| top-1 by derivative (largest distance to the reference) | {kinds} | |",
        (
            f"| unrelated called derived | {accuracy['unrelated_called_derived']} "
            f"(over every derivative's top 10 and {accuracy['distractor_queries']} distractor searches) | 0 |"
        ),
        (
            f"| largest derivative distance / smallest unrelated | {accuracy['largest_derivative_distance']:.3f} / "
            f"{accuracy['smallest_unrelated_distance']:.3f} | |"
        ),
        (
            f"| evidence (1 - d^2) sqrt(n): lowest derivative / highest unrelated | "
            f"{accuracy['evidence']['derivative_lowest']:.2f} ({accuracy['evidence']['lowest_pair']}) / "
            f"{accuracy['evidence']['unrelated_highest']:.2f} ({accuracy['evidence']['highest_pair']}); "
            f"EVIDENCE = {EVIDENCE}; the 4 lowest derivatives: "
            + ", ".join(f"{v:.2f} ({label})" for v, label in sorted(accuracy["evidence"]["derivatives"])[:4])
            + " | between |"
        ),
        _contrast_row(accuracy["contrast"]),
        (
            "| top-1 derivatives called unrelated | "
            + (", ".join(f"{row['suspect']} ({row['distance']:.3f})" for row in accuracy["not_derived"]) or "none")
            + " | none |"
        ),
    ]
    for label, key in (("fixture files", "throughput_fixtures"), ("real and exported models", "throughput_models"),
                       ("one large generated model", "throughput_large")):  # fmt: skip
        if results.get(key):
            lines.append(_speed_row(label, results[key]))
    lines += [
        _build_row(build),
        (
            f"| find, {search['models']:,} synthetic fingerprints (median of 3) | "
            f"{search['find_seconds_median']:.3f} s | < 1 s |"
        ),
    ]
    if accuracy["finetuned"]:
        lines += ["", "| fine-tuned derivative (permuted after training) | steps | trains | top-1 | call | distance |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for row in accuracy["finetuned"]:
            lines.append(
                f"| {row['reference']} {row['regime']} | {row['steps']} | {row['trains']} | "
                f"{'yes' if row['top1'] else 'no'} | {row['call']} | {row['distance']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.registry_experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the registry and indexes (default: a temporary one)")
    parser.add_argument("--seeds", type=int, default=3, help="distractor seeds per architecture (default 3)")
    parser.add_argument("--synthetic", type=int, default=100_000, help="synthetic fingerprints for the find timing")
    parser.add_argument("--large-megabytes", type=int, default=64, help="size of the large model for throughput")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per file for the throughput")
    parser.add_argument("--zoo-python", type=Path, default=ZOO_PYTHON, help="python of the torch virtualenv")
    parser.add_argument(
        "--finetune-cache", type=Path, default=FINETUNE_CACHE, help="where the fine-tuned exports are kept"
    )
    parser.add_argument("--no-finetune", action="store_true", help="leave the fine-tuned derivatives out")
    parser.add_argument("--no-real", action="store_true", help="leave the real models of .cache/models out")
    parser.add_argument(
        "--throughput-only", action="store_true",
        help="build the registry and measure only the fingerprint throughput (runs with any round's onnxlady)",
    )  # fmt: skip
    parser.add_argument("--export-finetuned", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument(
        "--reuse", action="store_true",
        help="with --out: reuse the registry an earlier run built there instead of building it again "
        "(the fine-tuned exports are not needed then)",
    )  # fmt: skip
    parser.add_argument(
        "--build-speedup", action="store_true",
        help="with --throughput-only: also time the index build with 1 and 2 workers (runs with any round's onnxlady)",
    )  # fmt: skip
    parser.add_argument(
        "--stages", action="store_true",
        help="also measure where fingerprinting's CPU time goes, stage by stage, against onnx.load "
        "(with --throughput-only: instead of the throughput; runs with any round's onnxlady)",
    )  # fmt: skip
    parser.add_argument(
        "--fresh", action="store_true",
        help="also time one pass of onnx.load and of fingerprinting, each in a fresh process (a build worker's "
        "first batch), median of --repeats alternating runs (runs with any round's onnxlady)",
    )  # fmt: skip
    parser.add_argument("--calibrate", action="store_true", help="also print the calibrated constants")
    parser.add_argument(
        "--real-pairs", action="store_true",
        help="also compare every pair of different real models of tools.match_real_models (unrelated pairs)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--save", type=Path, metavar="FILE.json", help="also write every result (layout included) here")
    args = parser.parse_args(argv)
    if args.export_finetuned:  # the torch virtualenv's part
        export_finetuned(args.export_finetuned)
        return 0
    if args.reuse and not args.out:
        parser.error("--reuse needs --out DIR (the folder of an earlier run)")
    finetuned, note = (
        ({}, "fine-tuned derivatives left out (--no-finetune)")
        if args.no_finetune or args.reuse
        else finetuned_models(args.finetune_cache, args.zoo_python)
    )
    if args.reuse:
        note = f"registry reused from {args.out} (--reuse)"
    real = [] if args.no_real else sorted(REAL_MODELS.glob("*.onnx"))
    with tempfile.TemporaryDirectory(prefix="onnxlady-registry-") as temporary:
        root = args.out or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        if args.reuse:
            layout = reused_layout(root)
        else:
            print("building the registry...", file=sys.stderr)
            layout = build_registry(root, args.seeds, finetuned, real)
        registry = [root / "registry"]
        index, references_index = root / "registry.idx", root / "references.idx"
        for stale in (index, references_index):
            stale.unlink(missing_ok=True)
        results: dict[str, Any] = {"layout": layout, "notes": [note] if note else []}
        if not args.throughput_only:
            build_index(registry, index, workers=2)
            build_index([root / "registry/references"], references_index, workers=2)
            print("searching...", file=sys.stderr)
            results["accuracy"] = search_accuracy(layout, index, references_index)
        files = sorted(str(p) for p in (root / "registry").rglob("*.onnx"))
        fixture_files = [f for f in files if layout["sources"][f] == "fixture"]
        models = [f for f in files if layout["sources"][f] != "fixture"]
        if args.stages:
            print("measuring the stages...", file=sys.stderr)
            results["stages_fixtures"] = stage_costs(fixture_files, args.repeats)
            results["stages_models"] = stage_costs(models, args.repeats) if models else None
        if args.fresh:
            print("measuring one pass in fresh processes...", file=sys.stderr)
            results["fresh_fixtures"] = fresh_pass(fixture_files, args.repeats)
            results["fresh_models"] = fresh_pass(models, args.repeats) if models else None
        if not ((args.stages or args.fresh) and args.throughput_only):
            print("measuring throughput...", file=sys.stderr)
            results["throughput_fixtures"] = throughput(fixture_files, args.repeats)
            results["throughput_models"] = throughput(models, args.repeats) if models else None
            large = root / "large.onnx"
            onnx.save(build_large_model(args.large_megabytes), large)
            results["throughput_large"] = throughput([str(large)], args.repeats)
            large.unlink()
        if not args.throughput_only or args.build_speedup:
            # The registry and the suspects: a longer build than the registry alone.
            results["build"] = build_speedup([str(p) for p in registry] + [str(root / "suspects")], root)
        if not args.throughput_only:
            print("timing find on synthetic fingerprints...", file=sys.stderr)
            results["find"] = find_speed(args.synthetic, root)
        if args.calibrate:
            results["calibration"] = calibrate(layout)
        if args.real_pairs:
            print("comparing the real models of tools.match_real_models pairwise...", file=sys.stderr)
            results["real_pairs"] = real_pairs()
    if args.save:
        args.save.write_text(json.dumps(results, indent=1, default=str))
    if args.json:
        print(
            json.dumps(
                {k: v for k, v in results.items() if k != "layout"} | {"skipped": layout["skipped"]},
                indent=2,
                default=str,
            )
        )
    elif args.throughput_only:
        for label, key in (("fixture files", "throughput_fixtures"), ("real and exported models", "throughput_models"),
                           ("one large generated model", "throughput_large")):  # fmt: skip
            if results.get(key):
                print(_speed_row(label, results[key]))
        if results.get("build"):
            print(_build_row(results["build"]))
        if args.stages:
            print(_stages_table(results))
        _print_fresh(results)
    else:
        print(_table(results))
        _print_fresh(results)
        if args.stages:
            print(_stages_table(results))
        for line in results["notes"]:
            print(f"note: {line}")
        for item in layout["skipped"]:
            print(f"not made: {item['reference']} {item['kind']}: {item['error']}")
        if not args.throughput_only and (results["accuracy"]["misses"] or results["accuracy"]["false_derived"]):
            print(
                json.dumps(
                    {"misses": results["accuracy"]["misses"], "false_derived": results["accuracy"]["false_derived"]},
                    indent=1,
                )
            )
        if args.calibrate:
            print(json.dumps(results["calibration"], indent=1))
        if args.real_pairs:
            pairs = results["real_pairs"]
            print(
                f"real models of tools.match_real_models: {pairs['models']}, {pairs['pairs_sharing_a_layer']} ordered "
                f"pairs of different models sharing a layer shape, called derived: {len(pairs['called_derived'])} "
                f"{pairs['called_derived']}; closest others (distance / threshold): {pairs['closest']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
