"""Resync and audit across conversions on the real models (issue 6's figures).

Each model is permuted (every group, seed 1), then converted by each conversion of
``fixtures/conversions.py``; resync puts the converted suspect back in the reference's order
(Psi from the true key), verify checks the output against the suspect, and audit reads the
verdict. ``--both`` also converts the *reference* instead and resyncs the plain permuted copy.

    python tools/conversions_real_models.py [--both] [--only NAME]     (prints a Markdown table)

Models come from tools/fetch_models.py (PyPI wheels). A conversion that does not apply to a
model (no Conv -> BatchNorm to fold, an operator the converter refuses) is reported as such.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


#: Conversions that need opset 13 (Cast from bfloat16, per-axis DequantizeLinear).
NEEDS_OPSET_13 = ("bfloat16", "qdq")


#: Verify tolerances fitting each converted model's own arithmetic. A float16 graph rounds its
#: outputs to float16. A QDQ graph runs each layer in float on dequantized values and quantizes
#: the next activation: re-ordering input channels changes the float sum's rounding, which flips
#: some activations by one quantization step, and the flips add up over the layers (resnet18:
#: up to 8e-3 on outputs up to 3.3; the QDQ copies of resnet18 and of a permuted resnet18
#: differ by 2e-2).
TOLERANCES = {"float16": {"atol": 1e-3, "rtol": 4e-3}, "qdq": {"atol": 3e-2, "rtol": 1e-2}}


def _opset(model) -> int:  # noqa: ANN001 - a model
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert(model, name: str):  # noqa: ANN001, ANN201 - a model in, (model or None, label, why) out
    """Apply conversion ``name`` as a pipeline would (upgrading to opset 17 first where the
    conversion needs opset 13). Returns (converted, label, "") or (None, label, why not)."""
    from fixtures.conversions import CONVERSIONS, upgrade_opset

    label = name
    try:
        if name in NEEDS_OPSET_13 and _opset(model) < 13:
            model, label = upgrade_opset(model, 17), f"opset 17 + {name}"
        converted = CONVERSIONS[name](model)
    except (ValueError, RuntimeError) as exc:
        return None, label, f"not applicable: {exc}"
    if converted.SerializeToString() == model.SerializeToString():
        return None, label, "nothing to convert"
    return converted, label, ""


def _row(reference, suspect, key, conversion: str) -> dict[str, object]:  # noqa: ANN001 - models
    from onnxlady._audit import audit_models
    from onnxlady._resync import resync_model
    from onnxlady._verify import verify_models

    tolerance = TOLERANCES.get(conversion, {})
    start = time.perf_counter()
    result = resync_model(reference, suspect, true_key=key)
    seconds = time.perf_counter() - start
    verify = verify_models(suspect, result.model, provider="cpu", **tolerance)
    report = audit_models(reference, suspect)
    found = sorted({c.kind for c in report.conversions})
    return {
        "psi": result.psi,
        "psi_distinguishable": result.psi_distinguishable,
        "across": result.across is not None,
        "equivalent": verify.equivalent,
        "verdict": report.verdict,
        "conversions": found,
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--both", action="store_true", help="also convert the reference instead of the suspect")
    parser.add_argument("--only", action="append", help="only this model (repeatable)")
    args = parser.parse_args()

    from fetch_models import fetch_models
    from fixtures.conversions import CONVERSIONS
    from onnxlady import analyze, draw_permutations, load_model, permute_model
    from onnxlady._errors import OnnxladyError

    ok = True
    print(
        "| model | conversion | converted | Psi % | Psi % distinguishable | resync s | output == suspect | audit "
        "| conversions found |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for entry in fetch_models(REPO / ".cache" / "models"):
        if args.only and entry["name"] not in args.only:
            continue
        path = Path(str(entry["path"]))
        reference = load_model(path).model
        permuted = load_model(path).model
        analysis = analyze(permuted)
        key = permute_model(analysis, draw_permutations(analysis, 1))
        for name in CONVERSIONS:
            sides = [("suspect", reference, permuted)] + ([("reference", permuted, reference)] if args.both else [])
            for side, keep, change in sides:
                converted, label, why = convert(change, name)
                if converted is None:
                    print(f"| {entry['name']} | {label} | {side} | - | - | - | - | - | {why} |")
                    continue
                pair = (keep, converted) if side == "suspect" else (converted, keep)
                try:
                    row = _row(pair[0], pair[1], key, name)
                except OnnxladyError as exc:
                    ok = False
                    print(f"| {entry['name']} | {label} | {side} | - | - | - | - | - | FAILED: {exc} |", flush=True)
                    continue
                ok &= row["psi_distinguishable"] == 100.0 and bool(row["equivalent"]) and row["verdict"] == "permuted"
                print(
                    f"| {entry['name']} | {label} | {side} | {row['psi']:.2f} | {row['psi_distinguishable']:.2f} | "
                    f"{row['seconds']:.2f} | "
                    f"{'yes' if row['equivalent'] else 'NO'} | {row['verdict']} | {', '.join(row['conversions'])} |",
                    flush=True,
                )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
