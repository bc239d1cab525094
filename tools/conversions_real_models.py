"""Resync and audit across conversions on the real models (issue 6's figures).

Each model is permuted (every group, seed 1), then converted by each conversion of
``fixtures/conversions.py``; resync puts the converted suspect back in the reference's order
(Psi from the true key), verify checks the output against the suspect (float16: within twice
the re-ordering floor, see ``ORDER_SENSITIVE``; QDQ: both in float, see
``ACTIVATIONS_QUANTIZED``, both in ``tools._conversions``) while a wrong permutation of the
output (one producer's rows swapped) must be caught, and audit reads the verdict. ``--both``
also converts the *reference* instead and resyncs the plain permuted copy.

    python3 -m tools.conversions_real_models [--both] [--only NAME]     (prints a Markdown table)

Models come from ``tools.fetch_models`` (PyPI wheels). A conversion that does not apply to a
model (no Conv -> BatchNorm to fold, an operator the converter refuses) is reported as such.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fixtures.conversions import CONVERSIONS
from onnxlady import OnnxladyError, load_model, permute
from tools._conversions import clean, conversion_row, convert, output_cell
from tools.fetch_models import DEFAULT_OUT, fetch_models


def main(argv: list[str] | None = None) -> int:
    """Print one row per model, conversion and converted side; 0 when every row is clean."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.conversions_real_models", description=__doc__.splitlines()[0])
    parser.add_argument("--both", action="store_true", help="also convert the reference instead of the suspect")
    parser.add_argument("--only", action="append", help="only this model (repeatable)")
    args = parser.parse_args(argv)

    ok = True
    print(
        "| model | conversion | converted | Psi % | Psi % distinguishable | resync s | output == suspect "
        "| wrong perm caught | audit | conversions found |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for entry in fetch_models(DEFAULT_OUT):
        if args.only and entry["name"] not in args.only:
            continue
        path = Path(str(entry["path"]))
        reference = load_model(path).model
        permutation = permute(reference, seed=1)
        permuted, key = permutation.model, permutation.key
        for name in CONVERSIONS:
            sides = [("suspect", reference, permuted)] + ([("reference", permuted, reference)] if args.both else [])
            for side, keep, change in sides:
                converted, label, why = convert(change, name)
                if converted is None:
                    print(f"| {entry['name']} | {label} | {side} | - | - | - | - | - | - | {why} |")
                    continue
                pair = (keep, converted) if side == "suspect" else (converted, keep)
                try:
                    row = conversion_row(pair[0], pair[1], key, name, suspect_converted=side == "suspect")
                except OnnxladyError as exc:
                    ok = False
                    print(f"| {entry['name']} | {label} | {side} | - | - | - | - | - | - | FAILED: {exc} |", flush=True)
                    continue
                ok &= clean(row)
                print(
                    f"| {entry['name']} | {label} | {side} | {row['psi']:.2f} | {row['psi_distinguishable']:.2f} | "
                    f"{row['seconds']:.2f} | {output_cell(row)} | {'yes' if row['wrong_caught'] else 'NO'} | "
                    f"{row['verdict']} | {', '.join(row['conversions'])} |",
                    flush=True,
                )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
