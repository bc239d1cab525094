"""Real fine-tuning for the audit's forensics calibration: ONNX exports before and after training.

``tools.forensics_calibration`` needs suspects that were *really* fine-tuned (gradient steps of
a loss), not a synthetic imitation, to choose and check the audit's rules. This tool writes,
under ``OUT/<model>/``, a ``base.onnx`` and one ONNX file per fine-tuning regime, plus a
``forensics.json`` that lists them with what was done:

- ``digits_cnn`` and ``digits_cnn_bn``: the digits CNN of :mod:`tools.train_digits_cnn` (its
  base run, then theta = 2, 6, 10 % more SGD steps, resumed with the same optimizer state),
  exported with BatchNorm folded into the convolutions and with BatchNorm kept;
- torchvision ``resnet18``, ``mobilenet_v2``, ``squeezenet1_1`` and ``shufflenet_v2_x0_5``
  (10 classes, no pretrained weights): :func:`tools.zoo.reinitialise` gives every activation
  an O(1) spread, then the base is trained 40 SGD steps (lr 0.01) on a synthetic 10-class task
  A (each class a fixed random 3x64x64 prototype plus Gaussian noise, batch 16) and its
  BatchNorm statistics are re-estimated on 8 batches (so that the base is a trained model
  whose eval-mode outputs are sane). Each regime then fine-tunes that base on a new task B
  (other prototypes) with SGD (lr 0.003, momentum 0.9, weight decay 1e-4, cross entropy,
  gradient norm clipped at 5): ``full1``, ``full5``, ``full20`` (every parameter, BatchNorm
  in train mode so its running statistics follow the data, 1/5/20 steps), ``frozen_bn10``
  (BatchNorm in eval mode, its statistics frozen, 10 steps) and ``head10`` (only the
  classifier, the usual transfer-learning recipe, 10 steps).

Every model is exported with the legacy exporter (``dynamo=False``, opset 17, eval mode,
constant folding: BatchNorm folded into the preceding convolution), input ``[1, 3, 64, 64]``.

torch, torchvision and scikit-learn (the digits data) are optional tools dependencies, in their
own virtualenv (see ``docs/results.md``)::

    /tmp/zoo-venv/bin/python -m tools.forensics_finetune [--out DIR] [--models NAME ...]

Models already in ``OUT`` (their ``forensics.json`` present) are kept; ``--force`` redoes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".cache" / "forensics" / "finetune"
TORCHVISION = ("resnet18", "mobilenet_v2", "squeezenet1_1", "shufflenet_v2_x0_5")
DIGITS = ("digits_cnn", "digits_cnn_bn")
MODELS = DIGITS + TORCHVISION
#: Fine-tuning regimes of the torchvision models: (name, steps, what trains, BatchNorm mode).
REGIMES: tuple[tuple[str, int, str, str], ...] = (
    ("full1", 1, "all", "train"),
    ("full5", 5, "all", "train"),
    ("full20", 20, "all", "train"),
    ("frozen_bn10", 10, "all", "eval"),
    ("head10", 10, "head", "eval"),
)
DIGITS_THETAS = (2, 6, 10)
CLASSES = 10
IMAGE = (3, 64, 64)
BATCH = 16
LR, MOMENTUM, WEIGHT_DECAY = 0.003, 0.9, 1e-4
PRETRAIN_STEPS, PRETRAIN_LR = 40, 0.01
CLIP = 5.0
OPSET = 17


def _synthetic_batches(seed: int) -> Any:
    """An endless stream of (images, labels): class prototypes plus noise, labels uniform."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn((CLASSES, *IMAGE), generator=g)
    while True:
        labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
        images = prototypes[labels] + 0.5 * torch.randn((BATCH, *IMAGE), generator=g)
        yield images, labels


def _head(model: Any) -> list[Any]:
    """The parameters of the classifier (the last Linear or 1x1 classifier conv)."""
    from torch import nn

    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:  # squeezenet: a 1x1 conv classifier
        last = model.classifier[1]
    return list(last.parameters())


def _export(model: Any, path: Path) -> None:
    import torch

    model.eval()
    example = torch.zeros((1, *IMAGE))
    partial = path.with_suffix(".partial.onnx")
    with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(partial), opset_version=OPSET, dynamo=False,
            input_names=["input"], output_names=["logits"], do_constant_folding=True,
        )  # fmt: skip
    partial.replace(path)


def finetune_torchvision(name: str, out: Path, seed: int = 0) -> dict[str, Any]:
    """Export ``name``'s base and one copy per regime of :data:`REGIMES` into ``out``."""
    import copy

    import torch
    import torchvision

    from tools.zoo import reinitialise

    torch.manual_seed(seed)
    base = getattr(torchvision.models, name)(weights=None, num_classes=CLASSES)
    calibration = next(_synthetic_batches(seed + 100))[0][:4]
    reinitialise(base.eval(), calibration, seed=seed)
    pretrain = _train(base, list(base.parameters()), PRETRAIN_STEPS, PRETRAIN_LR, True, _synthetic_batches(seed + 200))
    _recalibrate(base, _synthetic_batches(seed + 300))
    out.mkdir(parents=True, exist_ok=True)
    _export(base, out / "base.onnx")
    entries = []
    for regime, steps, what, bn_mode in REGIMES:
        model = copy.deepcopy(base)
        params = _head(model) if what == "head" else list(model.parameters())
        losses = _train(model, params, steps, LR, bn_mode == "train", _synthetic_batches(seed + 1))
        file = f"{regime}.onnx"
        _export(model, out / file)
        entries.append(
            {"file": file, "regime": regime, "steps": steps, "trains": what, "batchnorm": bn_mode, "losses": losses}
        )
    return {
        "model": name,
        "source": "torchvision (weights=None, tools.zoo.reinitialise, 40 steps on task A)",
        "pretrain_losses": pretrain,
        "regimes": entries,
    }


def _train(model: Any, params: list[Any], steps: int, lr: float, bn_train: bool, batches: Any) -> list[float]:
    """``steps`` SGD steps of cross entropy on ``params`` only; the losses."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train(bn_train)
    losses = []
    for _ in range(steps):
        images, labels = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        losses.append(float(loss.detach()))
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


def _recalibrate(model: Any, batches: Any, count: int = 8) -> None:
    """Re-estimate every BatchNorm's running statistics as the mean over ``count`` batches."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(count):
            model(next(batches)[0])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


def finetune_digits(name: str, out: Path, seed: int = 0) -> dict[str, Any]:
    """The digits CNN's base and theta % more training, BatchNorm folded or kept."""
    from tools.train_digits_cnn import train_and_export

    manifest = train_and_export(out, seed=seed, thetas=DIGITS_THETAS, keep_batchnorm=name.endswith("_bn"))
    entries = [
        {"file": m["file"], "regime": f"theta{m['theta']}", "steps": m["extra_steps"], "trains": "all", "batchnorm": "train"}
        for m in manifest["models"]
        if m["theta"]
    ]
    return {"model": name, "source": "tools.train_digits_cnn", "regimes": entries}


def main(argv: list[str] | None = None) -> int:
    """Export every requested model's base and fine-tuned copies; 0 on success, 2 without torch."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.forensics_finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--force", action="store_true", help="redo models already exported")
    args = parser.parse_args(argv)
    try:
        import torch  # ruff: ignore[unused-import]
        import torchvision  # ruff: ignore[unused-import]
    except ImportError as exc:
        print(f"tools.forensics_finetune needs torch and torchvision (see tools/zoo_requirements.txt): {exc}", file=sys.stderr)
        return 2
    for name in args.models:
        folder = args.out / name
        manifest_path = folder / "forensics.json"
        if manifest_path.exists() and not args.force:
            print(f"{name}: cached in {folder}")
            continue
        start = time.perf_counter()
        maker = finetune_digits if name in DIGITS else finetune_torchvision
        manifest = maker(name, folder)
        manifest["seconds"] = round(time.perf_counter() - start, 1)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"{name}: {len(manifest['regimes'])} fine-tuned copies in {folder} ({manifest['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
