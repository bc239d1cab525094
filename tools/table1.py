"""The paper's Table 1, measured here: Psi after permutation plus perturbation.

Rows (as in "Find the Lady", AAAI 2024): Gaussian noise OMEGA in {0, 1, 2, 7, 10}; fine-tuning
THETA in {2, 6, 8, 10} % more training (the digits CNN only: real models come without their
training data); B-bit quantization B in {16, 8, 6, 4, 2}; magnitude pruning T in {0, 91, 95,
98, 99} %. Columns: the real trained models of ``tools.fetch_models`` and the CNN of
``tools.train_digits_cnn`` (torch needed only to train it).

Two protocols:

- ``paper``: permute one layer, the deepest permutable one (the penultimate layer of a
  classifier), and perturb that layer's own weights;
- ``whole``: permute every permutable group and perturb every weight tensor.

Each cell: Psi (% of permuted neurons put back in place) with ``argmax`` (the paper's rule)
and ``hungarian`` (onnxlady's default), and how much the perturbation changed the outputs:
relative L2 error of the outputs and, for classifiers, top-1 agreement with the reference.

    python3 -m tools.table1 [--models NAME ...] [--protocols paper whole] [--out .cache/table1]

Writes ``table1.md`` (the README table), ``table1.csv`` and, when matplotlib is installed,
``table1.png`` (Psi against perturbation strength, one panel per perturbation).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxlady import inspect, load_model, permute, perturb, resync
from onnxlady._verify._compare import generate_inputs, parse_shape_overrides  # verify's own random inputs
from onnxlady.testing import copy_model
from tools.fetch_models import DEFAULT_OUT, fetch_models
from tools.real_models import EXTRA_OUTPUTS, SHAPES
from tools.train_digits_cnn import DEFAULT_OUT as FINETUNE_OUT
from tools.train_digits_cnn import train_and_export

NOISE = (0, 1, 2, 7, 10)
FINETUNE = (2, 6, 8, 10)
QUANTIZE = (16, 8, 6, 4, 2)
PRUNE = (0, 91, 95, 98, 99)
PRODUCER_ROLES = {"conv weight", "conv-transpose weight", "gemm weight", "matmul weight"}
#: Models whose last output is a class score (top-1 agreement is reported for them).
CLASSIFIERS = {"digits_cnn", "ppocr_cls", "magika"}


@dataclass
class Cell:
    model: str
    protocol: str
    perturbation: str
    strength: float
    permuted_neurons: int
    psi_argmax: float | None
    psi_hungarian: float | None
    psi_hungarian_distinguishable: float | None
    output_rel_error: float | None
    top1_agreement: float | None
    seconds: float


def _models(names: list[str] | None, out: Path) -> dict[str, dict[str, Any]]:
    """Name -> {"path", "finetuned": {theta: path}, "inputs": callable}."""
    models: dict[str, dict[str, Any]] = {}
    for entry in fetch_models(DEFAULT_OUT):
        models[str(entry["name"])] = {"path": Path(str(entry["path"])), "finetuned": {}}
    cnn_dir = FINETUNE_OUT
    if not (cnn_dir / "base.onnx").exists():
        try:
            train_and_export(cnn_dir, seed=0)
        except SystemExit as exc:  # torch or scikit-learn missing
            print(f"skipping digits_cnn: {exc}", file=sys.stderr)
    if (cnn_dir / "base.onnx").exists():
        models["digits_cnn"] = {
            "path": cnn_dir / "base.onnx",
            "finetuned": {t: cnn_dir / f"finetune_theta{t}.onnx" for t in FINETUNE},
        }
    if names:
        missing = [n for n in names if n not in models]
        if missing:
            raise SystemExit(f"unknown model {missing[0]}: choose from {', '.join(models)}")
        models = {n: models[n] for n in names}
    return models


def _inputs(name: str, model: Any) -> list[dict[str, np.ndarray]]:
    """Evaluation inputs: the digits test set for the CNN, seeded random batches otherwise."""
    if name == "digits_cnn":
        from sklearn.datasets import load_digits

        images = load_digits().images.astype(np.float32)[:, None] / 16.0
        return [{model.graph.input[0].name: images[i : i + 64]} for i in range(0, 448, 64)]
    shapes = parse_shape_overrides(SHAPES.get(name, []))
    rng = np.random.default_rng(0)
    return [generate_inputs(model, shapes, rng, (-1.0, 1.0)) for _ in range(3)]


def _run(model: Any, feeds: list[dict[str, np.ndarray]], extra: list[str]) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort

    proto = copy_model(model)
    for name in extra:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [extra[0]] if extra else [session.get_outputs()[0].name]
    return [session.run(names, feed)[0] for feed in feeds]


def _output_change(name: str, reference: list[np.ndarray], suspect: list[np.ndarray]) -> tuple[float, float | None]:
    ref, sus = np.concatenate([r.reshape(r.shape[0], -1) for r in reference]), np.concatenate(
        [s.reshape(s.shape[0], -1) for s in suspect]
    )
    rel = float(np.linalg.norm(sus - ref) / max(np.linalg.norm(ref), 1e-30))
    top1 = float(np.mean(ref.argmax(-1) == sus.argmax(-1))) if name in CLASSIFIERS else None
    return rel, top1


def _deepest_group(analysis: Any) -> str:
    """The permutable group of the last producer whose outputs can move (the penultimate layer)."""
    for _, _, expr in reversed(analysis.producers):
        for gid in analysis.neuron_labels(expr):
            if analysis.group(gid).permutable:
                return gid
    raise SystemExit("no permutable layer")


def _producer_weights(analysis: Any, gid: str) -> list[str]:
    names = []
    for member in analysis.group(gid).members:
        roles = set(member.role.split(", "))
        if member.is_weight and roles & PRODUCER_ROLES and member.tensor not in names:
            names.append(member.tensor.split(".onnxlady_copy")[0])
    return names or [gid]  # no producer weight (e.g. an embedding): the group's weights


def measure(name: str, info: dict[str, Any], protocol: str, seed: int, say: Callable[[str], None]) -> list[Cell]:
    reference = load_model(info["path"]).model
    analysis = inspect(reference).analysis
    # Each group draws its permutation from its own stream (seed, group): permuting one group
    # gives it the permutation it gets when every group is permuted.
    if protocol == "paper":
        gid = _deepest_group(analysis)
        groups, only = [gid], _producer_weights(analysis, gid)
    else:
        groups, only = None, None
    feeds = _inputs(name, reference)
    extra = EXTRA_OUTPUTS.get(name, [])
    reference_out = _run(reference, feeds, extra)
    rows: list[tuple[str, float, Callable[[Any], Any] | None]] = []
    rows += [("noise", w, lambda m, w=w: perturb(m, noise=float(w), seed=seed, only=only).model) for w in NOISE]
    if info["finetuned"]:
        rows += [("finetune", t, None) for t in FINETUNE]
    rows += [("quantize", b, lambda m, b=b: perturb(m, quantize=int(b), only=only).model) for b in QUANTIZE]
    rows += [("prune", t, lambda m, t=t: perturb(m, prune=float(t), only=only).model) for t in PRUNE]
    cells = []
    for kind, strength, perturbed in rows:
        start = time.perf_counter()
        source = load_model(info["finetuned"][strength]).model if kind == "finetune" else reference
        permuted = permute(source, seed=seed, group=groups)
        neurons, key = permuted.permuted_neurons, permuted.key
        suspect = permuted.model if perturbed is None else perturbed(permuted.model)
        rel, top1 = _output_change(name, reference_out, _run(suspect, feeds, extra))
        psi = {}
        for method in ("argmax", "hungarian"):
            result = resync(reference, suspect, method=method, true_key=key)
            psi[method] = (result.psi, result.details.psi_distinguishable)
        cells.append(Cell(
            name, protocol, kind, float(strength), neurons, psi["argmax"][0], psi["hungarian"][0],
            psi["hungarian"][1], rel, top1, round(time.perf_counter() - start, 2),
        ))  # fmt: skip
        say(f"{name} {protocol} {kind} {strength}: Psi argmax {psi['argmax'][0]}, hungarian {psi['hungarian'][0]}")
    return cells


def markdown(cells: list[Cell]) -> str:
    models = list(dict.fromkeys(c.model for c in cells))
    lines = []
    for protocol in dict.fromkeys(c.protocol for c in cells):
        lines.append(f"\n**Protocol `{protocol}`** — each cell: Psi argmax / Psi Hungarian (output change)\n")
        lines.append("| perturbation | " + " | ".join(models) + " |")
        lines.append("|---|" + "---|" * len(models))
        keys = list(dict.fromkeys((c.perturbation, c.strength) for c in cells if c.protocol == protocol))
        for kind, strength in keys:
            row = [f"{_label(kind, strength)}"]
            for model in models:
                found = [c for c in cells if (c.model, c.protocol, c.perturbation, c.strength) == (model, protocol, kind, strength)]
                row.append(_cell_text(found[0]) if found else "—")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _label(kind: str, strength: float) -> str:
    return {"noise": "Ω = {:g}", "finetune": "Θ = {:g} %", "quantize": "B = {:g}", "prune": "T = {:g} %"}[kind].format(strength)


def _cell_text(cell: Cell) -> str:
    change = f"top-1 {100 * cell.top1_agreement:.0f} %" if cell.top1_agreement is not None else f"Δ {cell.output_rel_error:.2g}"
    return f"{_fmt(cell.psi_argmax)} / {_fmt(cell.psi_hungarian)} ({change})"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def plot(cells: list[Cell], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = [k for k in ("noise", "finetune", "quantize", "prune") if any(c.perturbation == k for c in cells)]
    figure, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for (model, protocol) in dict.fromkeys((c.model, c.protocol) for c in cells):
            chosen = sorted((c for c in cells if (c.model, c.protocol, c.perturbation) == (model, protocol, kind)), key=lambda c: c.strength)
            if chosen:
                axis.plot([c.strength for c in chosen], [c.psi_hungarian for c in chosen], marker="o",
                          linestyle="-" if protocol == "whole" else "--", label=f"{model} ({protocol})")  # fmt: skip
        axis.set_title(kind)
        axis.set_xlabel({"noise": "Ω", "finetune": "Θ (%)", "quantize": "bits B", "prune": "T (%)"}[kind])
        axis.set_ylabel("Psi, Hungarian (%)")
        axis.set_ylim(-2, 102)
        if kind == "quantize":
            axis.invert_xaxis()
    axes[0][-1].legend(fontsize=6, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.table1", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="default: every fetched model and the digits CNN")
    parser.add_argument("--protocols", nargs="*", default=["paper", "whole"], choices=["paper", "whole"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT.parent / "table1", help="default .cache/table1")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cells: list[Cell] = []

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for name, info in _models(args.models, args.out).items():
        for protocol in args.protocols:
            cells += measure(name, info, protocol, args.seed, say)
    table = markdown(cells)
    (args.out / "table1.md").write_text(table + "\n")
    with open(args.out / "table1.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(cells[0])))
        writer.writeheader()
        writer.writerows(asdict(c) for c in cells)
    plotted = plot(cells, args.out / "table1.png")
    if args.json:
        print(json.dumps([asdict(c) for c in cells], indent=1))
    else:
        print(table)
        print(f"\nwritten: {args.out / 'table1.md'}, {args.out / 'table1.csv'}" + (f", {args.out / 'table1.png'}" if plotted else " (no PNG: matplotlib not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
