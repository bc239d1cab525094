"""Registry experiment: find the reference of every derivative among unrelated models, at scale.

Builds a registry from the fixtures and measures onnxlady's provenance search
(:mod:`onnxlady._provenance`):

- *references*: :data:`REFERENCES` (at least 10 fixtures, seed 0);
- *derivatives*, 6 per reference, each made from a permuted copy (every permutable group
  moved): ``permuted``; ``noise`` (OMEGA = 0.1 on every weight); ``int8`` (QDQ, as ONNX
  Runtime's static quantizer writes it: ``fixtures.conversions.quantize_qdq``); ``pruned``
  (30 % magnitude pruning); ``float16`` (``fixtures.conversions.to_float16``); ``ort``
  (ONNX Runtime's offline optimizer at ``ORT_ENABLE_EXTENDED``: BatchNorm folding, FusedConv,
  MatMul+Add -> Gemm, reordered nodes);
- *distractors*: every runnable fixture at seeds 1..``--seeds`` (independent models of the same
  architectures: the hard case) and every fixture that is not a reference at seed 0.

The index holds references and distractors. Printed:

- top-1 accuracy: derivatives whose closest indexed model is their reference, called derived;
- unrelated called derived: (suspect, indexed model) pairs called "derived" although the
  model is not the suspect's source, over every derivative's ranking and every distractor
  searched against an index of the references alone;
- the distance margin: the largest derivative distance and the smallest unrelated one;
- fingerprint throughput against ``onnx.load`` on one core, on the registry and on one large
  generated model (weights dominate there);
- index build time with 1 and 2 workers and the speed-up;
- ``find`` time against an index of ``--synthetic`` (100,000) synthetic fingerprints, the
  median of 3 runs.

``--calibrate`` also prints the constants of :mod:`onnxlady._provenance._fingerprint` and
:mod:`onnxlady._provenance._find` re-derived from this registry (field scales and weights,
the unrelated-gap law, the margin the threshold sits in).

    python3 -m tools.registry_experiment [--out DIR] [--seeds 3] [--synthetic 100000] [--calibrate] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from onnxlady._provenance._find import DERIVED_THRESHOLD, find
from onnxlady._provenance._fingerprint import (
    FIELDS,
    LAYER_WIDTH,
    ModelFingerprint,
    compare_fingerprints,
    field_gaps,
    fingerprint_model,
    layer_distances,
)
from onnxlady._provenance._index import add_fingerprints, build_index
from onnxlady._provenance._read import fingerprint_file
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import copy_model, permute_copy

#: The protected models: fixtures every derivative builds from (ORT runs them, QDQ and float16
#: convert them).
REFERENCES: tuple[str, ...] = (
    "vgg", "resnet", "mobilenet", "concat", "matmul_mlp", "grouped_conv", "conv_transpose", "split_concat",
    "shufflenet_v2", "encoder_prenorm", "encoder_postnorm", "tied_lm_head", "lstm_head", "depth_to_space",
    "reshape_maps", "unfolded_bn",
)  # fmt: skip
NOISE_OMEGA = 0.1
PRUNE_PERCENT = 30.0
DERIVATIVES = ("permuted", "noise", "int8", "pruned", "float16", "ort")


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


def _perturbed(model: onnx.ModelProto, **kwargs: Any) -> onnx.ModelProto:
    copy = copy_model(model)
    perturb_model(copy, **kwargs)
    return copy


def _derivatives(reference: onnx.ModelProto, seed: int, scratch: Path, name: str) -> dict[str, onnx.ModelProto]:
    permuted = permute_copy(reference, seed)[0]
    makers: dict[str, Callable[[], onnx.ModelProto]] = {
        "permuted": lambda: permuted,
        "noise": lambda: _perturbed(permuted, noise=NOISE_OMEGA, seed=seed),
        "int8": lambda: quantize_qdq(permuted),
        "pruned": lambda: _perturbed(permuted, prune_percent=PRUNE_PERCENT),
        "float16": lambda: to_float16(permuted),
        "ort": lambda: _ort_optimized(permuted, scratch, name),
    }
    return {kind: make() for kind, make in makers.items()}


def build_registry(root: Path, seeds: int) -> dict[str, Any]:
    """Write references, derivatives and distractors under ``root``; return what is where."""
    layout: dict[str, Any] = {"references": {}, "derivatives": [], "distractors": []}
    for folder in ("registry/references", "registry/distractors", "suspects", "scratch"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for number, name in enumerate(REFERENCES):
        reference = FIXTURES[name](0)
        path = root / "registry/references" / f"{name}.onnx"
        onnx.save(reference, path)
        layout["references"][name] = str(path)
        for kind, model in _derivatives(reference, 100 + number, root / "scratch", name).items():
            suspect = root / "suspects" / f"{name}.{kind}.onnx"
            onnx.save(model, suspect)
            layout["derivatives"].append({"path": str(suspect), "reference": str(path), "kind": kind, "name": name})
    for name in sorted(RUNNABLE):
        for seed in range(0 if name not in REFERENCES else 1, seeds + 1):
            path = root / "registry/distractors" / f"{name}.seed{seed}.onnx"
            onnx.save(FIXTURES[name](seed), path)
            layout["distractors"].append(str(path))
    return layout


# -- measurements -----------------------------------------------------------------------------
def search_accuracy(layout: dict[str, Any], index: Path, references_index: Path) -> dict[str, Any]:
    """Top-1 accuracy and unrelated-called-derived counts (see the module docstring)."""
    top1 = called = 0
    false_derived: list[dict[str, Any]] = []
    worst_derivative = 0.0
    closest_unrelated = float("inf")
    per_kind: dict[str, list[float]] = {kind: [] for kind in DERIVATIVES}
    misses: list[dict[str, Any]] = []
    for item in layout["derivatives"]:
        report = find(item["path"], index, top=10)
        best = report.candidates[0]
        per_kind[item["kind"]].append(_true_distance(report, item["reference"]))
        if best.path == item["reference"]:
            top1 += 1
            called += best.call == "derived"
        else:
            misses.append({"suspect": item["path"], "found": best.path, "distance": best.distance})
        worst_derivative = max(worst_derivative, _true_distance(report, item["reference"]))
        for candidate in report.candidates:
            if candidate.path != item["reference"]:
                closest_unrelated = min(closest_unrelated, candidate.distance)
                if candidate.call == "derived":
                    false_derived.append({"suspect": item["path"], "model": candidate.path, "distance": candidate.distance})
    for path in layout["distractors"]:
        report = find(path, references_index, top=5)
        for candidate in report.candidates:
            closest_unrelated = min(closest_unrelated, candidate.distance)
            if candidate.call == "derived":
                false_derived.append({"suspect": path, "model": candidate.path, "distance": candidate.distance})
    total = len(layout["derivatives"])
    return {
        "derivatives": total,
        "top1": top1,
        "top1_called_derived": called,
        "top1_accuracy": top1 / total,
        "unrelated_called_derived": len(false_derived),
        "false_derived": false_derived,
        "misses": misses,
        "largest_derivative_distance": worst_derivative,
        "smallest_unrelated_distance": closest_unrelated,
        "largest_distance_by_kind": {kind: max(values) for kind, values in per_kind.items() if values},
        "distractor_queries": len(layout["distractors"]),
    }


def _true_distance(report: Any, reference: str) -> float:
    for candidate in report.candidates:
        if candidate.path == reference:
            return candidate.distance
    return float("inf")


def throughput(files: list[str]) -> dict[str, float]:
    """Files per second and MB/s of ``onnx.load`` and of fingerprinting, on this core."""
    size = sum(os.path.getsize(f) for f in files)

    def timed(run: Callable[[str], Any]) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for path in files:
                run(path)
            best = min(best, time.perf_counter() - start)
        return best

    load = timed(onnx.load)
    fingerprint = timed(fingerprint_file)
    return {
        "files": len(files),
        "megabytes": size / 1e6,
        "load_seconds": load,
        "fingerprint_seconds": fingerprint,
        "load_mb_per_s": size / 1e6 / load,
        "fingerprint_mb_per_s": size / 1e6 / fingerprint,
        "ratio": fingerprint / load,
    }


def build_speedup(paths: list[str], folder: Path) -> dict[str, float]:
    """Index build time with 1 and 2 workers on fresh indexes (best of 2 each)."""
    times = {}
    for workers in (1, 2):
        best = float("inf")
        for attempt in range(2):
            index = folder / f"speed.{workers}.{attempt}.idx"
            start = time.perf_counter()
            build_index(paths, index, workers=workers)
            best = min(best, time.perf_counter() - start)
        times[workers] = best
    return {"one_worker_seconds": times[1], "two_workers_seconds": times[2], "speedup": times[1] / times[2]}


def synthetic_fingerprints(count: int, seed: int = 0) -> list[tuple[str, ModelFingerprint]]:
    """``count`` synthetic fingerprints: 500 random architectures (5 to 60 layers of random
    shapes), each model a random draw of records around its architecture's.
    """
    rng = np.random.default_rng(seed)
    architectures = []
    for _ in range(500):
        layers = int(rng.integers(5, 61))
        shapes = np.stack(
            [2 ** rng.integers(3, 11, layers), 2 ** rng.integers(3, 13, layers), rng.choice([1, 9], layers), np.ones(layers, int)],
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


def find_speed(count: int, folder: Path) -> dict[str, float]:
    """Median of 3 ``find`` runs (index opening, coarse and exact stages) against ``count``
    synthetic fingerprints.
    """
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
            np.median([min(unrelated_gaps[p][field]) / max(derivative_gaps[p][field]) for p in unrelated_gaps])
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
def _table(results: dict[str, Any]) -> str:
    accuracy, speed, large, build, search = (
        results["accuracy"], results["throughput"], results["throughput_large"], results["build"], results["find"],
    )  # fmt: skip
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in accuracy["largest_distance_by_kind"].items())
    lines = [
        "| measure | result | goal |",
        "| --- | --- | --- |",
        (
            f"| references / derivatives / distractors | {len(results['layout']['references'])} / "
            f"{accuracy['derivatives']} / {len(results['layout']['distractors'])} | >= 10 references x 6 |"
        ),
        (
            f"| top-1 = true reference (called derived) | {accuracy['top1']}/{accuracy['derivatives']} "
            f"({100 * accuracy['top1_accuracy']:.1f} %; {accuracy['top1_called_derived']} derived) | >= 99 % |"
        ),
        (
            f"| unrelated called derived | {accuracy['unrelated_called_derived']} "
            f"(over every derivative's top 10 and {accuracy['distractor_queries']} distractor searches) | 0 |"
        ),
        (
            f"| largest derivative distance / smallest unrelated | {accuracy['largest_derivative_distance']:.3f} / "
            f"{accuracy['smallest_unrelated_distance']:.3f} (threshold {DERIVED_THRESHOLD}) | separated |"
        ),
        f"| largest distance by derivative | {kinds} | |",
        (
            f"| fingerprint vs onnx.load, registry ({speed['files']} files, {speed['megabytes']:.1f} MB), one core | "
            f"{speed['ratio']:.1f}x the load time ({speed['fingerprint_mb_per_s']:.1f} vs "
            f"{speed['load_mb_per_s']:.1f} MB/s) | <= 2x |"
        ),
        (
            f"| fingerprint vs onnx.load, one {large['megabytes']:.0f} MB model, one core | "
            f"{large['ratio']:.2f}x the load time ({large['fingerprint_mb_per_s']:.0f} vs "
            f"{large['load_mb_per_s']:.0f} MB/s) | <= 2x |"
        ),
        (
            f"| index build, 1 -> 2 workers | {build['one_worker_seconds']:.2f} s -> "
            f"{build['two_workers_seconds']:.2f} s (speed-up {build['speedup']:.2f}) | near 2 |"
        ),
        (
            f"| find, {search['models']:,} synthetic fingerprints (median of 3) | "
            f"{search['find_seconds_median']:.3f} s | < 1 s |"
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.registry_experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the registry and indexes (default: a temporary one)")
    parser.add_argument("--seeds", type=int, default=3, help="distractor seeds per architecture (default 3)")
    parser.add_argument("--synthetic", type=int, default=100_000, help="synthetic fingerprints for the find timing")
    parser.add_argument("--large-megabytes", type=int, default=64, help="size of the large model for throughput")
    parser.add_argument("--calibrate", action="store_true", help="also print the calibrated constants")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxlady-registry-") as temporary:
        root = args.out or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        print("building the registry...", file=sys.stderr)
        layout = build_registry(root, args.seeds)
        registry = [root / "registry"]
        index, references_index = root / "registry.idx", root / "references.idx"
        for stale in (index, references_index):
            stale.unlink(missing_ok=True)
        build_index(registry, index, workers=2)
        build_index([root / "registry/references"], references_index, workers=2)
        print("searching...", file=sys.stderr)
        results: dict[str, Any] = {"layout": layout}
        results["accuracy"] = search_accuracy(layout, index, references_index)
        print("measuring throughput...", file=sys.stderr)
        files = sorted(str(p) for p in (root / "registry").rglob("*.onnx"))
        results["throughput"] = throughput(files)
        large = root / "large.onnx"
        onnx.save(build_large_model(args.large_megabytes), large)
        results["throughput_large"] = throughput([str(large)])
        results["build"] = build_speedup([str(p) for p in registry], root)
        print("timing find on synthetic fingerprints...", file=sys.stderr)
        results["find"] = find_speed(args.synthetic, root)
        if args.calibrate:
            results["calibration"] = calibrate(layout)
    if args.json:
        print(json.dumps({k: v for k, v in results.items() if k != "layout"}, indent=2, default=str))
    else:
        print(_table(results))
        if results["accuracy"]["misses"] or results["accuracy"]["false_derived"]:
            print(json.dumps({"misses": results["accuracy"]["misses"], "false_derived": results["accuracy"]["false_derived"]}, indent=1))
        if args.calibrate:
            print(json.dumps(results["calibration"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
