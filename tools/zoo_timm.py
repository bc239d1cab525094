"""The timm zoo report: coverage of onnxlady's rules on timm architectures.

The companion of :mod:`tools.zoo` (torchvision) for architectures only timm has: attention
variants (ViT, DeiT with a distillation token, Swin, ConViT, LeViT, EfficientViT in both its MIT
form with multi-scale linear attention and its MSRA form with cascaded group attention, PiT,
CaiT, XCiT, TinyViT, MobileViT, EdgeNeXt...) and grouped convolutions (ResNeXt, RegNetX/Y, DPN,
SKNet, ResNeSt, DLA-X, MixNet, GhostNet...). Each model is built with ``pretrained=False``
and 100 classes, re-initialised like :mod:`tools.zoo` does (weights N(0, 1/fan_in) rescaled layer by
layer on a calibration batch, here of 16 images, to unit output spread, BatchNorm statistics
near those of the batch, and here also
the timm-only parameters: position embeddings, class and distillation tokens, layer scales,
attention biases), exported with the legacy TorchScript exporter (``dynamo=False``, opset 17,
input [1, 3, 224, 224], eval mode; timm's attention calls torch's scaled_dot_product_attention,
which the exporter writes out as MatMul, Softmax and a scale computed from the shape), then
reported exactly like the torchvision zoo:
coverage of producer neurons, those pinned by graph outputs, permute with seed 1 -> verify
(CPU, 2 inputs), and a wrong permutation that must be caught.

timm, torch and torchvision are an optional *tools* dependency, never a runtime one::

    /tmp/zoo-venv/bin/pip install -r tools/zoo_requirements.txt -e .
    /tmp/zoo-venv/bin/python -m tools.zoo_timm [--models NAME ...] [--markdown | --json]

Exports are cached under ``.cache/zoo_timm/`` (``NAME.onnx`` and ``NAME.json``); ``--force``
re-exports. A model that cannot be exported is listed with the exporter's error, not skipped.
Exit status: 0 when every exported model is equivalent after permuting and every wrong
permutation is caught, 1 otherwise, 2 when timm is needed but missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from tools import _report, zoo

REPO = Path(__file__).resolve().parents[1]

#: Bump when the export or the re-initialisation changes: cached exports are then redone.
RECIPE = 2
OPSET = 17
IMAGE_SHAPE = (1, 3, 224, 224)
NUM_CLASSES = 100
#: Images in the calibration batch. BatchNorm statistics are taken from it: with 4 (tools.zoo's)
#: the head BatchNorm of LeViT sees 4 pooled vectors, its variance is far too small, the output
#: spread reaches 42 and float32 rounding alone moves the outputs by 1 (against float64).
CALIBRATION_BATCH = 16

#: Attention variants first, then grouped and split convolutions.
ATTENTION_MODELS = (
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
    "convit_tiny",
    "levit_128s",
    "efficientvit_b0",
    "efficientvit_m0",
    "pit_ti_224",
    "cait_xxs24_224",
    "xcit_nano_12_p16_224",
    "tiny_vit_5m_224",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "edgenext_xx_small",
    "poolformer_s12",
)
GROUPED_MODELS = (
    "resnext26ts",
    "regnetx_002",
    "regnety_002",
    "dpn48b",
    "skresnet18",
    "resnest14d",
    "dla46x_c",
    "mixnet_s",
    "ghostnet_050",
)
MODELS = ATTENTION_MODELS + GROUPED_MODELS

MISSING_TIMM = (
    "tools.zoo_timm needs torch, torchvision and timm (an optional tools dependency, not one of "
    "onnxlady):\n"
    "    /tmp/zoo-venv/bin/pip install -r tools/zoo_requirements.txt -e .\n"
    "    /tmp/zoo-venv/bin/python -m tools.zoo_timm"
)


def _timm_parameters(model: Any, seed: int) -> None:
    """Give timm's own parameters an O(1) spread (their defaults are zeros, ones or 1e-5 scales)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("pos_embed", "cls_token", "dist_token", "reg_token", "pos_embed_cls"):
                param.normal_(0.0, 0.5, generator=g)
            elif leaf in ("gamma", "gamma1", "gamma2", "gamma_1", "gamma_2", "layer_scale", "scale") and param.dim() <= 1:
                param.uniform_(0.5, 1.5, generator=g)
            elif leaf in ("attention_biases", "relative_position_bias_table", "rel_pos", "attention_bias_idxs_table"):
                param.normal_(0.0, 1.0, generator=g)


def build(name: str) -> tuple[Any, Any, Any]:
    """The eval-mode timm module, a calibration batch and the export input."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    generator = torch.Generator().manual_seed(1)
    calibration = torch.rand((CALIBRATION_BATCH, *IMAGE_SHAPE[1:]), generator=generator) * 2 - 1
    example = torch.rand(IMAGE_SHAPE, generator=generator) * 2 - 1
    return model.eval(), calibration, example


def export(name: str, path: Path) -> dict[str, Any]:
    """Build, re-initialise and export one model to ``path``; returns its metadata."""
    import timm
    import torch

    torch.manual_seed(0)
    model, calibration, example = build(name)
    _timm_parameters(model, seed=0)
    zoo.reinitialise(model, calibration, seed=0)
    with torch.no_grad():
        output = model(example)
    std = float(output.float().std())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.onnx")
    start = time.perf_counter()
    with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(partial), opset_version=OPSET, dynamo=False,
            input_names=["input"], output_names=["output"], do_constant_folding=True,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    partial.replace(path)
    meta = {
        "model": name,
        "recipe": RECIPE,
        "opset": OPSET,
        "input": ["input", list(example.shape), "float32"],
        "output_shape": list(output.shape),
        "output_std": std,
        "output_max_abs": float(output.abs().max()),
        "export_seconds": round(seconds, 2),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    del model
    gc.collect()
    return meta


def ensure_exported(name: str, cache: Path, force: bool) -> tuple[Path, dict[str, Any], bool]:
    """The cached export of ``name`` (made now if missing or of another recipe)."""
    path, meta_path = cache / f"{name}.onnx", cache / f"{name}.json"
    if not force and path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("recipe") == RECIPE:
            return path, meta, True
    meta = export(name, path)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return path, meta, False


def own_spread(path: Path, iterations: int = 2) -> float:
    """How far the *unpermuted* model's outputs move when only ONNX Runtime's graph optimisations change.

    ``ORT_ENABLE_ALL`` against ``ORT_DISABLE_ALL`` (fused kernels sum in another order), on
    ``iterations`` inputs uniform in [-1, 1] (seeds 0, 1...): the largest absolute difference.
    A permuted model whose verify error is of this order differs by rounding, not by a wrong
    permutation; it is the yardstick for a model whose re-initialised weights amplify rounding.
    """
    import numpy as np
    import onnxruntime as ort

    sessions = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    name = sessions[0].get_inputs()[0].name
    worst = 0.0
    for seed in range(iterations):
        x = np.random.default_rng(seed).uniform(-1.0, 1.0, IMAGE_SHAPE).astype(np.float32)
        first, second = (session.run(None, {name: x})[0] for session in sessions)
        worst = max(worst, float(np.abs(first - second).max()))
    return worst


def report_model(name: str, path: Path, meta: dict[str, Any], work: Path) -> dict[str, Any]:
    """tools._report's row for one exported model, with its export time, output spread and own spread."""
    row = _report.report_model(name, path, work, zoo.VERIFY_OPTIONS)
    row["own_spread"] = own_spread(path)
    low, high = zoo.OUTPUT_STD_RANGE
    std = meta.get("output_std", float("nan"))
    row.update(
        export_seconds=meta.get("export_seconds"),
        parameters=meta.get("parameters"),
        output_std=std,
        output_std_ok=bool(math.isfinite(std) and low <= std <= high),
    )
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """The timm table: tools._report's columns after the model's name, family and size.

    No timings: the figures here are counts and errors, the same on every run.
    """
    header = ["model", "kind", "parameters (M)", *_report.COLUMNS, "unpermuted, 2 ORT opt levels: max abs diff"]
    lines = []
    for row in rows:
        kind = "attention" if row["model"] in ATTENTION_MODELS else "grouped conv"
        if "error" in row:
            lines.append([row["model"], kind, f"ERROR: {row['error']}", *[""] * (len(header) - 3)])
            continue
        std_flag = "" if row["output_std_ok"] else f" (output std {row['output_std']:.2g}!)"
        parameters = row.get("parameters")
        size = f"{parameters / 1e6:.1f}" if isinstance(parameters, int) else "?"
        lines.append([f"{row['model']}{std_flag}", kind, size, *_report.cells(row), f"{row['own_spread']:.1e}"])
    return _report.markdown(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.zoo_timm", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="NAME", help=f"a subset (default: {' '.join(MODELS)})")
    parser.add_argument(
        "--cache", type=Path, default=REPO / ".cache" / "zoo_timm", help="exported models (default .cache/zoo_timm)"
    )
    parser.add_argument("--force", action="store_true", help="re-export even when cached")
    parser.add_argument("--export-only", action="store_true", help="export (or check the cache) and stop")
    parser.add_argument("--markdown", action="store_true", help="print only the markdown table")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(args.models or MODELS))

    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="onnxlady-zoo-timm-") as folder:
        for name in names:
            t0 = time.perf_counter()
            try:
                path, meta, hit = ensure_exported(name, args.cache, args.force)
            except ImportError as exc:
                print(f"error: {exc}\n{MISSING_TIMM}", file=sys.stderr)
                return 2
            except Exception as exc:
                rows.append({"model": name, "error": f"export failed: {type(exc).__name__}: {exc}"[:300]})
                print(f"{name}: export FAILED: {exc}", file=sys.stderr)
                continue
            print(
                f"{name}: {'cached' if hit else 'exported in ' + str(meta['export_seconds']) + ' s'}, "
                f"output std {meta['output_std']:.3g}",
                file=sys.stderr,
            )
            if args.export_only:
                continue
            row = report_model(name, path, meta, Path(folder))
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(
                f"{name}: {_report.percent(row['permutable_fraction_excluding_outputs'])} excl. outputs, "
                f"{'EQUIVALENT' if row['equivalent'] else 'NOT EQUIVALENT'}, wrong caught: "
                f"{row['wrong_permutation_caught']}, {row['wall_seconds']} s",
                file=sys.stderr,
            )
    runtime = time.perf_counter() - began
    if args.export_only:
        return 0
    if args.json:
        print(json.dumps({"runtime_seconds": round(runtime, 1), "models": rows}, indent=2))
    else:
        print(markdown(rows))
        if not args.markdown:
            print()
            print(_report.frozen_text(rows))
            print(f"\nruntime: {runtime:.0f} s for {len(rows)} models")
    exported = [row for row in rows if "error" not in row]
    return 0 if all(_report.passed(row) and row["output_std_ok"] for row in exported) else 1


if __name__ == "__main__":
    sys.exit(main())
