"""Resync and audit across conversions on the torchvision/BERT zoo (``tools.zoo``'s exports).

The same experiment as ``tools.conversions_real_models``, on the zoo: each model is permuted
(every group, seed 1), the permuted copy is converted by each conversion of
``fixtures/conversions.py`` (upgraded to opset 17 first where a conversion needs opset 13),
resync puts the converted suspect back in the reference's order (Psi from the true key), verify
checks the output against the suspect (float16: within twice the re-ordering floor; QDQ: both
in float; see ``ORDER_SENSITIVE`` and ``ACTIVATIONS_QUANTIZED`` in ``tools._conversions``) while a wrong
permutation of the output (one producer's rows swapped) must be caught, and audit reads the
verdict, which should be ``permuted``.

    /tmp/zoo-venv/bin/python -m tools.conversions_zoo [--models NAME ...] [--conversions NAME ...]
        [--large-mb 150] [--large-skip float16 qdq]          (prints a Markdown table)

Models come from ``tools.zoo``'s cache (``.cache/zoo``; exported there, with torch, when
missing). Models over ``--large-mb`` MB skip the ``--large-skip`` conversions (the float16 and
QDQ copies of vgg16_bn and vit_b_32 would take most of the run on 2 cores); the table says so.
A conversion that does not apply (nothing to fold, an operator the converter refuses) is
reported as such; an exception from onnxlady is a row of its own (``FAILED``). Exit status 0
when every row is Psi-distinguishable 100 %, equivalent, catches the wrong permutation and
reads ``permuted``; 1 otherwise.

Runtime on 2 CPU cores with the cache: about 28 minutes for the 15 models with the defaults.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

from fixtures.conversions import CONVERSIONS
from onnxlady import load_model, permute
from tools._conversions import clean, conversion_row, convert, output_cell
from tools.zoo import MODELS, REPO, ensure_exported

HEADER = (
    "| model | MB | conversion | Psi % | Psi % distinguishable | resync s | output == suspect | wrong perm caught "
    "| audit | conversions found | row s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _line(name: str, mb: float, label: str, rest: str) -> str:
    return f"| {name} | {mb:.0f} | {label} | {rest} |"


def _skipped(name: str, mb: float, label: str, why: str) -> str:
    return _line(name, mb, label, "- | - | - | - | - | - | " + why + " | -")


def main(argv: list[str] | None = None) -> int:
    """Print one row per model and conversion; 0 when every row is clean."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.conversions_zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="NAME", choices=MODELS, help=f"a subset of: {' '.join(MODELS)}")
    parser.add_argument("--conversions", nargs="+", metavar="NAME", choices=list(CONVERSIONS), help="a subset")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "zoo", help="exported models (.cache/zoo)")
    parser.add_argument("--large-mb", type=float, default=150.0, help="models over this size skip --large-skip")
    parser.add_argument(
        "--large-skip", nargs="*", default=["float16", "qdq"], help="conversions skipped on large models"
    )
    parser.add_argument("--traceback", action="store_true", help="print the traceback of a failed row to stderr")
    args = parser.parse_args(argv)

    names = list(dict.fromkeys(args.models or MODELS))
    conversions = [k for k in CONVERSIONS if not args.conversions or k in args.conversions]
    ok = True
    began = time.perf_counter()
    print(HEADER, flush=True)
    for name in names:
        try:
            path, _, _ = ensure_exported(name, args.cache, False)
        except Exception as exc:
            ok = False
            print(_skipped(name, 0.0, "-", f"export FAILED: {type(exc).__name__}: {exc}"[:300]), flush=True)
            continue
        mb = path.stat().st_size / 1e6
        reference = load_model(path).model
        permutation = permute(reference, seed=1)
        permuted, key = permutation.model, permutation.key
        del permutation
        for conversion in conversions:
            if mb > args.large_mb and conversion in args.large_skip:
                print(_skipped(name, mb, conversion, f"skipped: {mb:.0f} MB > {args.large_mb:.0f} MB (run time)"), flush=True)
                continue
            start = time.perf_counter()
            converted, label, why = convert(permuted, conversion)
            if converted is None:
                print(_skipped(name, mb, label, why), flush=True)
                continue
            try:
                row = conversion_row(reference, converted, key, conversion)
            except Exception as exc:
                ok = False
                if args.traceback:
                    traceback.print_exc()
                what = f"FAILED: {type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:400]
                print(_line(name, mb, label, f"- | - | - | - | - | - | {what} | {time.perf_counter() - start:.0f}"), flush=True)
                continue
            finally:
                del converted
                gc.collect()
            ok &= clean(row)
            print(
                _line(
                    name,
                    mb,
                    label,
                    f"{row['psi']:.2f} | {row['psi_distinguishable']:.2f} | {row['seconds']:.1f} | "
                    f"{output_cell(row)} | {'yes' if row['wrong_caught'] else 'NO'} | {row['verdict']} | "
                    f"{', '.join(row['conversions'])} | "
                    f"{time.perf_counter() - start:.0f}",
                ),
                flush=True,
            )
        del reference, permuted
        gc.collect()
    print(f"\nruntime: {time.perf_counter() - began:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
