"""The zoo report: coverage of onnxlady's rules on a zoo of real architectures.

Exports torchvision architectures (resnet18, resnet50, vgg16_bn, mobilenet_v2,
mobilenet_v3_large, efficientnet_b0, densenet121, shufflenet_v2_x1_0, regnet_y_400mf,
convnext_tiny, vit_b_32, swin_t, deeplabv3_mobilenet_v3_large, googlenet) and a small
BERT-style encoder (token + position embeddings, 4 layers, hidden 128, 4 heads, GELU MLP,
LayerNorm, pooler and classifier; int64 token ids [1, 32]) to ONNX with the legacy TorchScript
exporter (``dynamo=False``, opset 17, input [1, 3, 224, 224], eval mode), then for each model:

- ``inspect``: groups, permutable groups, producer neurons (outputs of Conv, ConvTranspose,
  Gemm, MatMul), the permutable fraction, the neurons pinned by graph outputs and the
  fraction excluding them, and which operators froze which groups;
- ``permute`` with seed 1, then ``verify`` (CPU, 2 iterations): max absolute error against
  the largest reference value;
- a wrong permutation (one producer's rows swapped, its consumers left alone) must be caught.

The weights are not the default initialisation but re-initialised so that every activation
has an O(1) spread: default initialisation (BatchNorm running statistics 0/1 with small
weights, ConvNeXt's layer scale of 1e-6, zero class tokens...) makes many outputs vanish,
which would hide errors. Conv and Linear weights are drawn N(0, 1/fan_in) with random biases
and then rescaled, layer by layer on a calibration batch, so that their outputs have unit
standard deviation; BatchNorm gets random positive scales, random shifts and running
statistics close to (but not equal to) the real ones; LayerNorm and GroupNorm random positive
scales and random shifts; layer scales U(0.5, 1.5); class tokens, position embeddings and
relative position biases N(0, 0.5..1). The output's standard deviation on a fresh input must
lie in [0.1, 100] (it is printed; a model outside is flagged and the exit status is 1).

torch and torchvision are an optional *tools* dependency, never a runtime one of onnxlady::

    python3 -m venv /tmp/zoo-venv
    /tmp/zoo-venv/bin/pip install -r tools/zoo_requirements.txt -e .
    /tmp/zoo-venv/bin/python -m tools.zoo [--models NAME ...] [--markdown | --json]

(from the repository root, as every tool).

Exported models are cached under ``.cache/zoo/`` (``NAME.onnx`` and ``NAME.json`` with the
export time and output statistics); ``--force`` re-exports. Models already cached do not need
torch. Exit status: 0 all equivalent and every wrong permutation caught, 1 otherwise, 2 when
torch/torchvision are needed but missing or the arguments are wrong.

Runtime on 2 CPU cores: about 5 minutes for all 15 models from scratch (build, re-initialise
and export included), under 2 minutes with the cache; vgg16_bn (550 MB), swin_t and vit_b_32
take the longest.
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

from tools import _report

REPO = Path(__file__).resolve().parents[1]

#: Bump when the export or the re-initialisation changes: cached exports are then redone.
RECIPE = 1
OPSET = 17
IMAGE_SHAPE = (1, 3, 224, 224)
BERT = {"vocab": 1000, "seq": 32, "hidden": 128, "heads": 4, "layers": 4, "intermediate": 512, "labels": 4}
#: Accepted range for the standard deviation of the exported model's output on a fresh input.
OUTPUT_STD_RANGE = (0.1, 100.0)

TORCHVISION_MODELS = (
    "resnet18",
    "resnet50",
    "vgg16_bn",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
    "convnext_tiny",
    "vit_b_32",
    "swin_t",
    "deeplabv3_mobilenet_v3_large",
    "googlenet",
)
MODELS = (*TORCHVISION_MODELS, "bert_encoder")

MISSING_TORCH = (
    "tools.zoo needs torch and torchvision to export the zoo (an optional tools dependency, "
    "not one of onnxlady):\n"
    "    python3 -m venv /tmp/zoo-venv\n"
    "    /tmp/zoo-venv/bin/pip install -r tools/zoo_requirements.txt -e .\n"
    "    /tmp/zoo-venv/bin/python -m tools.zoo"
)


# --------------------------------------------------------------------------------------------
# Building and exporting (torch is imported here only)
# --------------------------------------------------------------------------------------------
def _bert_class() -> Any:
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
            super().__init__()
            self.heads, self.head_dim = heads, hidden // heads
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)
            self.attention_output = nn.Linear(hidden, hidden)
            self.attention_norm = nn.LayerNorm(hidden, eps=1e-12)
            self.intermediate = nn.Linear(hidden, intermediate)
            self.output = nn.Linear(intermediate, hidden)
            self.output_norm = nn.LayerNorm(hidden, eps=1e-12)

        def split(self, x: torch.Tensor) -> torch.Tensor:
            batch, seq = x.shape[0], x.shape[1]
            return x.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            q, k, v = self.split(self.query(h)), self.split(self.key(h)), self.split(self.value(h))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            context = torch.matmul(torch.softmax(scores, dim=-1), v)
            context = context.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
            h = self.attention_norm(h + self.attention_output(context))
            mlp = self.output(nn.functional.gelu(self.intermediate(h)))
            return self.output_norm(h + mlp)

    class TinyBert(nn.Module):
        """BERT for sequence classification, small: embeddings, encoder, pooler, classifier."""

        def __init__(self, vocab: int, seq: int, hidden: int, heads: int, layers: int, intermediate: int, labels: int):
            super().__init__()
            self.word_embeddings = nn.Embedding(vocab, hidden)
            self.position_embeddings = nn.Embedding(seq, hidden)
            self.register_buffer("position_ids", torch.arange(seq).unsqueeze(0), persistent=False)
            self.embedding_norm = nn.LayerNorm(hidden, eps=1e-12)
            self.layers = nn.ModuleList(Layer(hidden, heads, intermediate) for _ in range(layers))
            self.pooler = nn.Linear(hidden, hidden)
            self.classifier = nn.Linear(hidden, labels)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            positions = self.position_ids[:, : input_ids.shape[1]]
            h = self.embedding_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
            for layer in self.layers:
                h = layer(h)
            return self.classifier(torch.tanh(self.pooler(h[:, 0])))

    return TinyBert


def build(name: str) -> tuple[Any, Any, Any, str]:
    """The eval-mode module, a calibration input, an export input and the input name."""
    import torch
    import torchvision

    if name == "bert_encoder":
        model = _bert_class()(**BERT)
        generator = torch.Generator().manual_seed(1)
        calibration = torch.randint(0, BERT["vocab"], (4, BERT["seq"]), generator=generator)
        example = torch.randint(0, BERT["vocab"], (1, BERT["seq"]), generator=generator)
        return model.eval(), calibration, example, "input_ids"
    kwargs: dict[str, Any] = {"weights": None}
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=False)
    if name.startswith("deeplabv3"):
        kwargs.update(weights_backbone=None, aux_loss=False)
    if name.startswith("deeplabv3"):
        model = _out_only(getattr(torchvision.models.segmentation, name)(**kwargs))
    else:
        model = getattr(torchvision.models, name)(**kwargs)
    generator = torch.Generator().manual_seed(1)
    calibration = torch.rand((4, *IMAGE_SHAPE[1:]), generator=generator) * 2 - 1
    example = torch.rand(IMAGE_SHAPE, generator=generator) * 2 - 1
    return model.eval(), calibration, example, "input"


def _out_only(inner: Any) -> Any:
    """Wrap a segmentation model, which returns a dict, to return its ``out`` tensor."""
    from torch import nn

    class OutOnly(nn.Module):
        """Segmentation models return a dict: export its ``out`` entry."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner(x)["out"]

    return OutOnly(inner)


def reinitialise(model: Any, calibration: Any, seed: int) -> None:
    """Random weights with O(1) activations everywhere (see the module docstring)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (*convs, nn.Linear)):
                w = module.weight
                if isinstance(module, nn.modules.conv._ConvTransposeNd):
                    fan_in = w.shape[0] // module.groups * math.prod(w.shape[2:])
                else:
                    fan_in = math.prod(w.shape[1:])
                w.normal_(0.0, 1.0 / math.sqrt(max(1, fan_in)), generator=g)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.2, generator=g)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0.0, 0.5, generator=g)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                if module.weight is not None:
                    module.weight.uniform_(0.5, 1.5, generator=g)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.3, generator=g)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=g)
            elif isinstance(module, nn.MultiheadAttention):
                if module.in_proj_weight is not None:
                    module.in_proj_weight.normal_(0.0, 1.0 / math.sqrt(module.embed_dim), generator=g)
                else:
                    for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight):
                        w.normal_(0.0, 1.0 / math.sqrt(w.shape[1]), generator=g)
                if module.in_proj_bias is not None:
                    module.in_proj_bias.normal_(0.0, 0.1, generator=g)
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "layer_scale":
                param.uniform_(0.5, 1.5, generator=g)
            elif leaf in ("class_token", "pos_embedding", "cls_token"):
                param.normal_(0.0, 0.5, generator=g)
            elif leaf == "relative_position_bias_table":
                param.normal_(0.0, 1.0, generator=g)

    # Calibration: one forward pass in execution order. Every Conv/Linear divides its weight and
    # bias by the standard deviation of its output (and passes the rescaled output on), every
    # BatchNorm takes running statistics near those of its actual input.
    done: set[int] = set()

    def rescale(module: Any, args: Any, output: Any) -> Any:
        if id(module) in done or not isinstance(output, torch.Tensor):
            return None
        done.add(id(module))
        std = float(output.std())
        if not math.isfinite(std) or std < 1e-12:
            return None
        module.weight.div_(std)
        if getattr(module, "bias", None) is not None:
            module.bias.div_(std)
        return output / std

    def batchnorm_stats(module: Any, args: Any) -> None:
        if id(module) in done:
            return
        done.add(id(module))
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dim=dims), x.var(dim=dims)
        noise = torch.randn(mean.shape, generator=g)
        module.running_mean.copy_(mean + 0.1 * noise * var.sqrt())
        module.running_var.copy_(var * torch.empty(var.shape).uniform_(0.5, 2.0, generator=g) + module.eps)

    handles = []
    for module in model.modules():
        if isinstance(module, (*convs, nn.Linear)):
            handles.append(module.register_forward_hook(rescale))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            handles.append(module.register_forward_pre_hook(batchnorm_stats))
    try:
        with torch.no_grad():
            model(calibration)
    finally:
        for handle in handles:
            handle.remove()


def export(name: str, path: Path) -> dict[str, Any]:
    """Build, re-initialise and export one model to ``path``; returns its metadata."""
    import torch

    torch.manual_seed(0)
    model, calibration, example, input_name = build(name)
    reinitialise(model, calibration, seed=0)
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
            input_names=[input_name], output_names=["output"], do_constant_folding=True,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    partial.replace(path)
    import torchvision

    meta = {
        "model": name,
        "recipe": RECIPE,
        "opset": OPSET,
        "input": [input_name, list(example.shape), str(example.dtype).replace("torch.", "")],
        "output_shape": list(output.shape),
        "output_std": std,
        "output_max_abs": float(output.abs().max()),
        "export_seconds": round(seconds, 2),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    del model
    gc.collect()
    return meta


def cached(name: str, cache: Path, force: bool) -> dict[str, Any] | None:
    onnx_path, meta_path = cache / f"{name}.onnx", cache / f"{name}.json"
    if force or not onnx_path.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("recipe") == RECIPE else None


def ensure_exported(name: str, cache: Path, force: bool) -> tuple[Path, dict[str, Any], bool]:
    meta = cached(name, cache, force)
    path = cache / f"{name}.onnx"
    if meta is not None:
        return path, meta, True
    meta = export(name, path)
    (cache / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path, meta, False


# --------------------------------------------------------------------------------------------
# The report (onnxlady only; the pipeline is tools._report's)
# --------------------------------------------------------------------------------------------
#: How verify runs on every zoo model: CPU, 2 seeded random inputs.
VERIFY_OPTIONS: dict[str, Any] = {"provider": "cpu", "iterations": 2, "input_seed": 0}


def report_model(name: str, path: Path, meta: dict[str, Any], work: Path) -> dict[str, Any]:
    """tools._report's row for one exported model, with its export time and output spread."""
    row = _report.report_model(name, path, work, VERIFY_OPTIONS)
    low, high = OUTPUT_STD_RANGE
    std = meta.get("output_std", float("nan"))
    row.update(
        export_seconds=meta.get("export_seconds"),
        output_std=std,
        output_std_ok=bool(math.isfinite(std) and low <= std <= high),
    )
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """The zoo table: tools._report's columns, with the export time and the report's own time."""
    header = ["model", "MB", "export s", *_report.COLUMNS, "report s"]
    lines = []
    for row in rows:
        if "error" in row:
            lines.append([row["model"], f"ERROR: {row['error']}", *[""] * (len(header) - 2)])
            continue
        std_flag = "" if row["output_std_ok"] else f" (output std {row['output_std']:.2g}!)"
        lines.append([
            f"{row['model']}{std_flag}", str(row["size_mb"]), str(row["export_seconds"]), *_report.cells(row),
            f"{sum(row['seconds'].values()):.0f}",
        ])  # fmt: skip
    return _report.markdown(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="NAME", choices=MODELS, help=f"a subset of: {' '.join(MODELS)}")
    parser.add_argument(
        "--cache", type=Path, default=REPO / ".cache" / "zoo", help="exported models (default .cache/zoo)"
    )
    parser.add_argument("--force", action="store_true", help="re-export even when cached")
    parser.add_argument("--export-only", action="store_true", help="export (or check the cache) and stop")
    parser.add_argument("--markdown", action="store_true", help="print only the markdown table")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(args.models or MODELS))

    if args.force or any(cached(name, args.cache, False) is None for name in names):
        try:
            import torch  # ruff: ignore[unused-import]
            import torchvision  # ruff: ignore[unused-import]
        except ImportError as exc:
            print(f"error: {exc}\n{MISSING_TORCH}", file=sys.stderr)
            return 2

    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="onnxlady-zoo-") as folder:
        for name in names:
            t0 = time.perf_counter()
            try:
                path, meta, hit = ensure_exported(name, args.cache, args.force)
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
    return 0 if all(_report.passed(row) and row["output_std_ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
