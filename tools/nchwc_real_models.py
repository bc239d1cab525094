"""ONNX Runtime's ``ORT_ENABLE_ALL`` (NCHWc layout on x86) on the real convolutional models (issue 12).

Per model: the reference through the optimizer at ``ORT_ENABLE_ALL`` (``optimized_model_filepath``,
CPU provider), as is and permuted (every group, seed 7):

- NCHWc: the optimizer's ``com.microsoft.nchwc`` nodes and the block size they are read with;
- as is: ``match`` confidence and the ``audit`` verdict (``converted`` expected);
- permuted: ``match`` confidence, resync Psi (true key), whether the resync output computes what
  the suspect computes (``verify``), the ``audit`` verdict (``permuted`` expected) and whether it
  names the ``nchwc`` conversion; resync time, median of ``--repeat`` runs.

    python3 -m tools.nchwc_real_models [--model PATH ...] [--repeat 3]

Rows say ``no NCHWc`` where this CPU makes ONNX Runtime write none (no AVX2). ``--level extended``
runs the same checks through ``ORT_ENABLE_EXTENDED`` instead (no NCHWc; ``nchwc`` is then not
expected among the conversions): the held-out case of ConViT, whose gating ONNX Runtime folds.

    python3 -m tools.nchwc_real_models --level extended --model .cache/zoo_timm/convit_tiny.onnx
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from fixtures.contrib import ort_optimized
from onnxlady import OnnxladyError, audit, load_model, match, permute, resync
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._nchwc_forms import NCHWC, nchwc_block
from onnxlady._verify._compare import verify_models

DEFAULT_MODELS = (
    ".cache/deployment/resnet18.onnx",
    ".cache/models/ppocr_cls.onnx",
    ".cache/models/nudenet_yolov8n.onnx",
    ".cache/models/ppocrv4_det.onnx",
    ".cache/models/ppocrv4_rec.onnx",
)


def row(path: Path, repeat: int, level: str = "all") -> tuple[str, bool]:
    """One Markdown row and whether it is clean."""
    reference = load_model(path).model
    converted = ort_optimized(reference, level)
    nodes = sum(node.domain == NCHWC for node in converted.graph.node)
    if not nodes and level == "all":
        return f"| {path.stem} | no NCHWc | - | - | - | - | - | - | - |", True
    block = nchwc_block(ModelGraph(converted)) if nodes else 0
    try:
        as_is = f"{100 * match(reference, converted).confidence:.1f}", audit(reference, converted).verdict
        permutation = permute(reference, seed=7)
        suspect = ort_optimized(permutation.model, level)
        confidence = f"{100 * match(reference, suspect).confidence:.1f}"
        times, result = [], None
        for _ in range(repeat):
            begin = time.perf_counter()
            result = resync(reference, suspect, true_key=permutation.key)
            times.append(time.perf_counter() - begin)
        assert result is not None
        equivalent = verify_models(suspect, result.model, provider="cpu").equivalent
        report = audit(reference, suspect)
    except OnnxladyError as exc:
        return f"| {path.stem} | {nodes}, blocks of {block} | refused: {str(exc)[:200]} | - | - | - | - | - | - |", False
    named = "nchwc" in {finding.kind for finding in report.conversions} or level != "all"
    psi = "-" if result.psi is None else f"{result.psi:.2f}"
    clean = (as_is[1] == "converted" and report.verdict == "permuted" and named and equivalent
             and result.psi is not None and result.psi >= 99.0)  # fmt: skip
    return (
        f"| {path.stem} | {f'{nodes}, blocks of {block}' if nodes else '-'} | {as_is[0]} | {as_is[1]} | {confidence} | {psi} "
        f"| {'equivalent' if equivalent else 'NO'} | {report.verdict}{' (nchwc named)' if named and nodes else ''} "
        f"| {statistics.median(times):.2f} |"
    ), clean


def main(argv: list[str] | None = None) -> int:
    """Print the table; 0 when every row is clean."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.nchwc_real_models", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="an ONNX model (repeatable; default: the five listed above)")
    parser.add_argument("--repeat", type=int, default=3, help="resync runs timed (median)")
    parser.add_argument("--level", choices=("all", "extended"), default="all", help="ONNX Runtime's optimization level")
    args = parser.parse_args(argv)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    print("| model | NCHWc nodes | confidence % as is | audit as is | confidence % permuted | Psi % | output == suspect "
          "| audit permuted | resync s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for model in args.model or DEFAULT_MODELS:
        line, clean = row(Path(model), max(args.repeat, 1), args.level)
        ok &= clean
        print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
