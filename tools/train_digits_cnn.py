"""Train a small digits CNN and export fine-tuned copies: the fine-tuning rows of Table 1.

The AAAI 2024 paper "Find the Lady" re-synchronizes a permuted model against a copy of the
original that was fine-tuned for theta % more epochs.  This benchmark tool produces such a
family of ONNX models on data that ships inside scikit-learn (no download):

1. ``sklearn.datasets.load_digits`` (1797 grey 8x8 images, 10 classes, pixel values 0..16,
   scaled to [0, 1]) is split into 75 % train / 25 % test, stratified, with ``--seed``.
2. A small CNN with BatchNorm and one residual block is trained (see :func:`build_model`):
   ``conv3x3(1->16)+BN+ReLU``, basic block ``[conv3x3(16->16)+BN+ReLU, conv3x3(16->16)+BN]``
   with identity ``Add`` then ReLU, ``conv3x3 stride 2 (16->32)+BN+ReLU``, global average
   pool, flatten, ``Linear(32->32)+ReLU``, ``Linear(32->10)``.
   Optimizer: SGD, learning rate 0.02 (constant, no schedule), momentum 0.9, weight decay
   5e-4, cross entropy, ``--epochs`` epochs (default 30) of ``floor(n_train / 64)`` full
   mini-batches of 64 (each epoch reshuffles and drops the 1347 % 64 = 3 left-over samples,
   whose tiny batch would make the BatchNorm running statistics noisy).  Torch runs on one
   thread with deterministic algorithms, so a seed gives the same weights every run.
3. The trained model (eval mode: BatchNorm uses its running statistics) is exported with the
   legacy TorchScript exporter (``dynamo=False``, opset 17, constant folding) as ``base.onnx``:
   input ``"input"`` of shape ``[batch, 1, 8, 8]`` (dynamic batch axis), output ``"logits"``
   of shape ``[batch, 10]``.  The legacy exporter in eval mode folds every BatchNorm into the
   preceding Conv, so the graph holds Conv/Relu/Add/GlobalAveragePool/Flatten/Gemm only;
   ``--keep-batchnorm`` exports with ``TrainingMode.PRESERVE`` instead, which leaves
   inference-mode ``BatchNormalization`` nodes in the graph.
4. Fine-tuning: training *resumes* from the end of the base run -- same weights, same BatchNorm
   running statistics, same SGD momentum buffers, same learning rate (0.02), and the same
   shuffled mini-batch stream (the data order continues where the base run stopped) -- for
   ``round(theta / 100 * base_steps)`` more optimizer steps (at least one), where
   ``base_steps = epochs * floor(n_train / 64)`` is the number of optimizer steps of the
   base run (30 * 21 = 630 by default: theta = 2, 6, 8, 10 give 13, 38, 50, 63 steps).
   That is theta % of the base number of optimizer steps, i.e. theta % more epochs measured
   in optimizer steps (2 % of 30 epochs is 0.6 epoch, so partial epochs are common).  The
   four values theta = 2, 6, 8, 10 are snapshots of one continued run, taken after the
   respective number of steps, so the theta = 2 copy lies on the path to the theta = 10
   copy.  Each snapshot is exported as ``finetune_theta{theta}.onnx``.
5. Every exported model is run with onnxruntime (CPU provider) on the test set and compared
   with torch in eval mode (max abs diff of the logits); ``manifest.json`` records, per file:
   theta, steps and epochs trained beyond the base, test accuracy, top-1 agreement with the
   base on the test set, the largest relative change ``||W - W_base||_2 / ||W_base||_2`` of
   a weight tensor (conv kernels and linear matrices, i.e. tensors of rank >= 2, of the torch
   state dict; also over all float tensors including biases and BatchNorm statistics, and
   over the ONNX initializers, where the folded BatchNorm lives), the onnxruntime check, and
   the scale of the logits.

Torch and scikit-learn are optional benchmark dependencies of onnxlady, never runtime ones;
they are imported lazily inside the functions, so importing this module does no work
(``tools.table1`` imports it and calls :func:`train_and_export`).

Usage, from the repository root::

    python3 -m tools.train_digits_cnn [--out DIR] [--seed N] [--epochs N] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import numpy as np
    import torch

REPO_ROOT: Path = Path(__file__).resolve().parents[1]
DEFAULT_OUT: Path = REPO_ROOT / ".cache" / "finetune"

THETAS: tuple[int, ...] = (2, 6, 8, 10)
DEFAULT_EPOCHS: int = 30
BATCH_SIZE: int = 64
LEARNING_RATE: float = 0.02
MOMENTUM: float = 0.9
WEIGHT_DECAY: float = 5e-4
TEST_FRACTION: float = 0.25
OPSET: int = 17
NUM_THREADS: int = 1
INPUT_NAME: str = "input"
OUTPUT_NAME: str = "logits"

_MISSING_MSG = (
    "tools.train_digits_cnn needs the optional benchmark dependencies torch and "
    "scikit-learn (not runtime dependencies of onnxlady): pip install torch scikit-learn"
)


def _import_torch() -> ModuleType:
    """Return the ``torch`` module, or exit with a clear message when it is not installed."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(f"{_MISSING_MSG} ({exc})") from exc
    return torch


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load scikit-learn's digits and split them 75/25, stratified, with ``seed``.

    Returns ``(x_train, y_train, x_test, y_test)``; images are float32 ``[N, 1, 8, 8]`` in
    [0, 1], labels int64 ``[N]``.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(f"{_MISSING_MSG} ({exc})") from exc
    import numpy as np

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )


def build_model() -> torch.nn.Module:
    """Build the digits CNN (parameters drawn from torch's global RNG).

    Layout: ``conv3x3(1->16)+BN+ReLU``; residual basic block
    ``relu(x + BN(conv3x3(relu(BN(conv3x3(x))))))`` at 16 channels; ``conv3x3 stride 2
    (16->32)+BN+ReLU``; global average pool; flatten; ``Linear(32->32)+ReLU``;
    ``Linear(32->10)``.  Convolutions have no bias (BatchNorm follows each of them).
    """
    _import_torch()  # exits with a clear message when torch is missing
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        """Two conv3x3+BN with an identity shortcut, ResNet style."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + x)

    class DigitsCNN(nn.Module):
        """Small residual CNN for 8x8 digits."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
            )
            self.block = BasicBlock(16)
            self.down = nn.Sequential(
                nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU(),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Linear(32, 32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.down(self.block(self.stem(x)))
            x = torch.flatten(self.pool(x), 1)
            return self.fc2(torch.relu(self.fc1(x)))

    return DigitsCNN()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield full index batches forever: one fresh ``randperm`` per epoch.

    The ``n % batch_size`` samples left over at the end of an epoch are dropped for that
    epoch (a tiny last batch would make the BatchNorm statistics of its step very noisy).
    """
    torch = _import_torch()
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def _train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
) -> float:
    """Run ``steps`` SGD steps in train mode; return the mean loss of the last <=20 steps."""
    torch = _import_torch()
    model.train()
    losses: list[float] = []
    for _ in range(steps):
        idx = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    tail = losses[-20:]
    return sum(tail) / len(tail) if tail else float("nan")


def _logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Eval-mode logits of ``model`` on ``x`` as a float32 numpy array."""
    torch = _import_torch()
    model.eval()
    with torch.no_grad():
        return model(x).numpy()


def export_onnx(model: torch.nn.Module, path: Path, keep_batchnorm: bool = False) -> None:
    """Export ``model`` (in eval mode) with the legacy exporter, opset 17, dynamic batch.

    With ``keep_batchnorm=False`` (the exporter's default ``TrainingMode.EVAL``) every
    BatchNorm is folded into its Conv; with ``True`` (``TrainingMode.PRESERVE`` on an eval
    model) inference-mode ``BatchNormalization`` nodes stay in the graph.
    """
    torch = _import_torch()
    import warnings

    model.eval()
    dummy = torch.zeros(1, 1, 8, 8)
    training = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated; that is the one we want here.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # PRESERVE on an eval-mode model exports inference BatchNorm; folding stays correct.
        warnings.filterwarnings("ignore", message="It is recommended that constant folding")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            training=training,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits of the ONNX model at ``path`` on ``x`` with onnxruntime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = NUM_THREADS
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _onnx_initializers(path: Path) -> dict[str, np.ndarray]:
    """Initializers of the ONNX model at ``path`` by name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _max_rel_change(
    base: dict[str, np.ndarray], other: dict[str, np.ndarray], min_ndim: int = 0
) -> tuple[float | None, str | None]:
    """Largest ``||other - base||_2 / ||base||_2`` over float tensors of rank >= ``min_ndim``.

    Returns ``(None, None)`` when the two sets of tensors do not match name for name and
    shape for shape.
    """
    import numpy as np

    if base.keys() != other.keys():
        return None, None
    best, best_name = 0.0, None
    for name, b in base.items():
        o = other[name]
        if b.shape != o.shape:
            return None, None
        if not np.issubdtype(b.dtype, np.floating) or b.size == 0 or b.ndim < min_ndim:
            continue
        b64, o64 = b.astype(np.float64), o.astype(np.float64)
        denom = float(np.linalg.norm(b64))
        rel = float(np.linalg.norm(o64 - b64)) / denom if denom > 0 else float(np.linalg.norm(o64))
        if rel > best:
            best, best_name = rel, name
    return best, best_name


def _state_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Float tensors of the state dict (parameters and BatchNorm running stats) as numpy."""
    return {
        k: v.detach().clone().numpy()
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }


def _sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_and_export(
    out_dir: Path,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    thetas: tuple[int, ...] = THETAS,
    keep_batchnorm: bool = False,
) -> dict[str, Any]:
    """Train the base CNN, fine-tune it for each theta, export all to ONNX, write the manifest.

    Parameters
    ----------
    out_dir:
        Folder for ``base.onnx``, ``finetune_theta{theta}.onnx`` and ``manifest.json``;
        created if missing.
    seed:
        Seeds the train/test split, the initial weights and the mini-batch order.
    epochs:
        Epochs of the base run; fine-tuning adds ``max(1, round(theta/100 * base_steps))``
        optimizer steps per theta (see the module docstring).
    thetas:
        Fine-tuning percentages, snapshots of one continued run (sorted ascending).
    keep_batchnorm:
        Keep ``BatchNormalization`` nodes in the exported graphs instead of folding them.

    Returns:
    -------
    The manifest (also written to ``out_dir / "manifest.json"``).

    Torch's global RNG is reseeded with ``seed``; its thread count and deterministic-algorithms
    flag are set to 1 / on for the run and restored afterwards.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if any(t <= 0 for t in thetas):
        raise ValueError(f"thetas must be positive, got {thetas}")
    torch = _import_torch()
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(NUM_THREADS)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(seed)
        return _train_and_export(Path(out_dir), seed, epochs, thetas, keep_batchnorm)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train_and_export(
    out_dir: Path, seed: int, epochs: int, thetas: tuple[int, ...], keep_batchnorm: bool
) -> dict[str, Any]:
    """Body of :func:`train_and_export`, run with torch's global settings already fixed."""
    torch = _import_torch()
    import numpy as np

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    x_train_np, y_train_np, x_test_np, y_test_np = load_data(seed)
    x_train, y_train = torch.from_numpy(x_train_np), torch.from_numpy(y_train_np)
    x_test = torch.from_numpy(x_test_np)

    model = build_model()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(x_train), BATCH_SIZE, generator)
    steps_per_epoch = len(x_train) // BATCH_SIZE
    base_steps = epochs * steps_per_epoch

    final_loss = _train_steps(model, optimizer, batches, x_train, y_train, base_steps)
    train_time = time.perf_counter() - t0

    base_logits = _logits(model, x_test)
    base_pred = base_logits.argmax(axis=1)
    base_state = _state_arrays(model)

    entries: list[dict[str, Any]] = []
    base_onnx_init: dict[str, np.ndarray] | None = None

    def record(file: str, theta: int, extra_steps: int, loss: float) -> None:
        nonlocal base_onnx_init
        path = out_dir / file
        export_onnx(model, path, keep_batchnorm=keep_batchnorm)
        logits = _logits(model, x_test)
        pred = logits.argmax(axis=1)
        ort_logits = _ort_logits(path, x_test_np)
        inits = _onnx_initializers(path)
        if base_onnx_init is None:
            base_onnx_init = inits
        state = _state_arrays(model)
        rel_weight, rel_weight_name = _max_rel_change(base_state, state, min_ndim=2)
        rel_param, rel_param_name = _max_rel_change(base_state, state)
        rel_onnx, rel_onnx_name = _max_rel_change(base_onnx_init, inits)
        entries.append(
            {
                "file": file,
                "theta": theta,
                "extra_steps": extra_steps,
                "extra_epochs": round(extra_steps / steps_per_epoch, 4),
                "total_steps": base_steps + extra_steps,
                "train_loss_tail": round(loss, 6),
                "test_accuracy": float((pred == y_test_np).mean()),
                "top1_agreement_with_base": float((pred == base_pred).mean()),
                "max_rel_weight_change": rel_weight,
                "max_rel_weight_change_tensor": rel_weight_name,
                "max_rel_param_change": rel_param,
                "max_rel_param_change_tensor": rel_param_name,
                "max_rel_onnx_initializer_change": rel_onnx,
                "max_rel_onnx_initializer_change_tensor": rel_onnx_name,
                "ort_max_abs_diff": float(np.abs(ort_logits - logits).max()),
                "ort_top1_agreement_with_torch": float((ort_logits.argmax(axis=1) == pred).mean()),
                "logits_abs_mean": float(np.abs(ort_logits).mean()),
                "logits_std": float(ort_logits.std()),
                "sha256": _sha256(path),
            }
        )

    record("base.onnx", 0, 0, final_loss)

    done = 0
    for theta in sorted(thetas):
        target = max(1, round(theta / 100.0 * base_steps))
        loss = float("nan")
        if target > done:
            loss = _train_steps(model, optimizer, batches, x_train, y_train, target - done)
            done = target
        record(f"finetune_theta{theta}.onnx", theta, done, loss)

    import onnx
    import onnxruntime

    manifest: dict[str, Any] = {
        "tool": "tools.train_digits_cnn",
        "dataset": "sklearn.datasets.load_digits (8x8, 10 classes), pixels / 16",
        "seed": seed,
        "train_size": len(x_train_np),
        "test_size": len(x_test_np),
        "base_epochs": epochs,
        "batch_size": BATCH_SIZE,
        "steps_per_epoch": steps_per_epoch,
        "base_steps": base_steps,
        "optimizer": {
            "type": "SGD",
            "lr": LEARNING_RATE,
            "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY,
            "schedule": "constant",
        },
        "finetune": (
            "resumed from the base run (weights, BN running stats, SGD momentum, data order) "
            "for max(1, round(theta/100 * base_steps)) more optimizer steps at the same lr; "
            "thetas are snapshots of one continued run"
        ),
        "export": {
            "exporter": "torch.onnx.export(dynamo=False)",
            "opset": OPSET,
            "do_constant_folding": True,
            "batchnorm": "kept" if keep_batchnorm else "folded into Conv",
            "input": {"name": INPUT_NAME, "shape": ["batch", 1, 8, 8]},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", 10]},
        },
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
        "base_train_seconds": round(train_time, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "models": entries,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def format_table(manifest: dict[str, Any]) -> str:
    """Render the manifest's models as a fixed-width text table."""
    header = (
        f"{'file':<26} {'theta':>5} {'+steps':>6} {'+epochs':>7} {'acc':>7} "
        f"{'agree':>7} {'max_rel_dw':>10} {'ort_diff':>9} {'|logit|':>7}"
    )
    lines = [header, "-" * len(header)]
    for m in manifest["models"]:
        rel = m["max_rel_weight_change"]
        lines.append(
            f"{m['file']:<26} {m['theta']:>5} {m['extra_steps']:>6} {m['extra_epochs']:>7.2f} "
            f"{m['test_accuracy']:>7.4f} {m['top1_agreement_with_base']:>7.4f} "
            f"{(rel if rel is not None else float('nan')):>10.4f} "
            f"{m['ort_max_abs_diff']:>9.2e} {m['logits_abs_mean']:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python3 -m tools.train_digits_cnn",
        description="Train a small digits CNN, export base + fine-tuned (theta = 2, 6, 8, 10 %) "
        "copies to ONNX and write manifest.json.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"epochs of the base training (default: {DEFAULT_EPOCHS})",
    )
    parser.add_argument(
        "--keep-batchnorm",
        action="store_true",
        help="keep BatchNormalization nodes in the ONNX graphs instead of folding them into Conv",
    )
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")

    manifest = train_and_export(
        args.out, seed=args.seed, epochs=args.epochs, keep_batchnorm=args.keep_batchnorm
    )
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(format_table(manifest))
        print(
            f"\nwrote {len(manifest['models'])} models + manifest.json to {args.out} "
            f"(base: {manifest['base_epochs']} epochs = {manifest['base_steps']} steps, "
            f"{manifest['total_seconds']:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
