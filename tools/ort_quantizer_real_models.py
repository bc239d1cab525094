"""Resync and audit across ONNX Runtime's own quantizer on real models (issue 12, item 6).

Each model is permuted (every group, seed 4), then quantized by ``onnxruntime.quantization``:
``dynamic`` (``quantize_dynamic``: MatMulInteger / ConvInteger, quantized embedding tables) and
``qoperator`` (``quantize_static(..., quant_format=QuantFormat.QOperator)``: QLinearConv,
QLinearMatMul, com.microsoft QLinear activations; calibrated on four random batches). Resync
puts the quantized suspect back (Psi from the true key); the output must keep the suspect's
operators, compute what the suspect computes (verify, default tolerances) while a wrong
permutation of it (one producer's rows swapped) is caught; audit reads the verdict and the
conversions it names. Resync time: median of ``--repeat`` runs.

    python3 -m tools.ort_quantizer_real_models [--model PATH ...] [--form dynamic|qoperator ...] [--repeat N]

Default models: the BERT encoder of ``tools.zoo`` (``.cache/zoo/bert_encoder.onnx``) and the
PyPI models of ``tools.fetch_models`` (``.cache/models``). Where the quantizer itself fails on a
model (ONNX Runtime 1.31 refuses weights held by ``Constant`` nodes in some places), the row says
so.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnxlady import OnnxladyError, analyze, audit, load_model, permute, resync
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_producer_only

DEFAULT_MODELS = (
    ".cache/zoo/bert_encoder.onnx",
    ".cache/models/nudenet_yolov8n.onnx",
    ".cache/models/ppocr_cls.onnx",
    ".cache/models/magika.onnx",
    ".cache/models/ppocrv4_det.onnx",
    ".cache/models/ppocrv4_rec.onnx",
)
FORMS = ("dynamic", "qoperator")


def _calibration(model: onnx.ModelProto) -> object:
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):  # type: ignore[misc]
        """Four random batches: normal floats, integers (token ids, bytes) below 100, free image sizes 320."""

        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            batches = []
            for _ in range(4):
                feeds = {}
                for value in model.graph.input:
                    dims = value.type.tensor_type.shape.dim
                    shape = [d.dim_value if d.dim_value > 0 else (1 if k == 0 or len(dims) < 4 else 320) for k, d in enumerate(dims)]
                    elem_type = value.type.tensor_type.elem_type
                    if elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                        dtype = np.int64 if elem_type == onnx.TensorProto.INT64 else np.int32
                        feeds[value.name] = rng.integers(0, 100, shape).astype(dtype)
                    else:
                        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
                batches.append(feeds)
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    return Batches()


def quantize(model: onnx.ModelProto, form: str, folder: Path) -> onnx.ModelProto:
    """``model`` through ONNX Runtime's quantizer in ``form``."""
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    source, target = folder / "source.onnx", folder / f"{form}.onnx"
    onnx.save(model, str(source))
    if form == "dynamic":
        quantize_dynamic(str(source), str(target))
    else:
        quantize_static(str(source), str(target), _calibration(model), quant_format=QuantFormat.QOperator)
    return onnx.load(str(target))


def row(path: Path, form: str, repeat: int) -> str:
    """One Markdown row: model, form, integer operators, Psi, time, output check, wrong perm, audit."""
    reference = load_model(path).model
    permutation = permute(reference, seed=4)
    with tempfile.TemporaryDirectory() as folder:
        try:
            suspect = quantize(permutation.model, form, Path(folder))
        except Exception as exc:  # the quantizer's own failure is a row of the table
            return f"| {path.stem} | {form} | - | - | - | - | - | - | the quantizer fails: {str(exc).splitlines()[0][:120]} |"
    ops = sorted({n.op_type for n in suspect.graph.node if "Integer" in n.op_type or n.op_type.startswith(("QLinear", "QGemm"))})
    times = []
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = resync(reference, suspect, true_key=permutation.key)
        times.append(time.perf_counter() - start)
    assert result is not None
    same_ops = [n.op_type for n in result.model.graph.node] == [n.op_type for n in suspect.graph.node]
    equivalent = verify_models(suspect, result.model, provider="cpu").equivalent
    wrong = copy_model(result.model)
    try:
        permute_producer_only(wrong, analyze(wrong))
    except AssertionError:  # the quantized form's own analysis moves no producer (weights quantized at run time)
        caught_cell = "n/a (no producer moves in this form)"
    else:
        caught_cell = "yes" if not verify_models(suspect, wrong, provider="cpu").equivalent else "NO"
    report = audit(reference, suspect)
    found = "; ".join(f"{c.kind}: {c.detail}" for c in report.conversions if c.kind == "quantized")
    return (
        f"| {path.stem} | {form} | {', '.join(ops)} | {result.psi:.2f} | {statistics.median(times):.1f} "
        f"| {'yes' if same_ops and equivalent else 'NO'} | {caught_cell} | {report.verdict} | {found} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the Markdown table; 0 when every row is clean."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.ort_quantizer_real_models", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="an ONNX model (repeatable; default: the six listed above)")
    parser.add_argument("--form", action="append", choices=FORMS, help="quantizer form (repeatable; default both)")
    parser.add_argument("--repeat", type=int, default=3, help="resync runs timed (median)")
    args = parser.parse_args(argv)
    print("| model | form | integer operators | Psi % | resync s | output == suspect (same operators) | wrong perm caught | audit | quantization named |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for model in args.model or DEFAULT_MODELS:
        for form in args.form or FORMS:
            try:
                line = row(Path(model), form, max(args.repeat, 1))
            except OnnxladyError as exc:
                line = f"| {Path(model).stem} | {form} | - | - | - | NO | - | - | {exc} |"
            ok &= "| NO |" not in line and "| permuted |" in line
            print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
