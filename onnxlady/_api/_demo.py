"""``onnxlady.demo``: the main job end to end on a small model the package builds itself.

Every step goes through the public API. The reference is built once and held in memory: since
no public function changes the models it is given, it is used as it is from the first step to
the last (inspect, the equivalence checks, resync), beside its file (permute).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from onnxlady._api._checks import check_seed
from onnxlady._api._demo_model import build_demo_model
from onnxlady._api._inspect import inspect
from onnxlady._api._permute import permute
from onnxlady._api._perturb import perturb
from onnxlady._api._results import Result
from onnxlady._api._resync import resync
from onnxlady._api._sources import jsonable
from onnxlady._api._unpermute import unpermute
from onnxlady._api._verify import VerifyResult, verify
from onnxlady._errors import OnnxladyError
from onnxlady._io._files import copy_model, load_model, save_model
from onnxlady._io._tensors import read_array

#: The paper's noise level at which its classifiers still resynchronise fully (Omega = 1).
DEMO_NOISE = 1.0


@dataclass
class DemoResult(Result):
    """The outcome of :func:`demo`: the figures of every step and the lines ``onnxlady demo`` prints.

    Attributes:
        ok: every check came out as it should (equivalent, wrong permutation caught, bit-identical
            restore, resynced copy equivalent to the suspect).
        lines: one line per step, as printed.
        groups: channel groups of the demo model.
        permutable_groups: how many of them can move.
        permutable_fraction: fraction of producer neurons that can move.
        permuted_neurons: neurons the permutation moved.
        verify: the equivalence check of the permuted model.
        wrong_permutation_caught: the check failed a deliberately wrong permutation.
        unpermute_bit_identical: the key restored the weights bit for bit.
        noise: the noise level (Omega) of the perturbed copy.
        psi_hungarian: % of permuted neurons put back in place by Hungarian matching.
        psi_argmax: the same with the paper's argmax rule.
        resynced_equivalent_to_suspect: the resynchronized copy computes what the suspect computes.
        workdir: the folder holding the demo's files; ``None`` when a temporary one was used.
    """

    ok: bool
    lines: list[str]
    groups: int
    permutable_groups: int
    permutable_fraction: float
    permuted_neurons: int
    verify: VerifyResult
    wrong_permutation_caught: bool
    unpermute_bit_identical: bool
    noise: float
    psi_hungarian: float
    psi_argmax: float
    resynced_equivalent_to_suspect: bool
    workdir: Path | None = None

    @property
    def exit_code(self) -> int:
        """0 when every check came out as it should, else 1."""
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady demo --json`` prints."""
        return jsonable(
            {
                "ok": self.ok,
                "lines": self.lines,
                "groups": self.groups,
                "permutable_groups": self.permutable_groups,
                "permutable_fraction": self.permutable_fraction,
                "permuted_neurons": self.permuted_neurons,
                "verify": self.verify.report.to_dict(),
                "wrong_permutation_caught": self.wrong_permutation_caught,
                "unpermute_bit_identical": self.unpermute_bit_identical,
                "noise": self.noise,
                "psi_hungarian": self.psi_hungarian,
                "psi_argmax": self.psi_argmax,
                "resynced_equivalent_to_suspect": self.resynced_equivalent_to_suspect,
            }
        )

    def to_text(self) -> str:
        """The eight numbered lines ``onnxlady demo`` prints."""
        return "\n".join(self.lines)


def demo(
    *,
    seed: int = 0,
    workdir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Build a small CNN, then inspect, permute, verify, restore, perturb and resync it.

    The model (BatchNorm, residual and downsampling blocks, a MobileNetV2 block, squeeze-and-
    excitation, a channel Concat, Flatten into Gemm) is built from a seed in milliseconds, so the
    demo needs no download.

    Args:
        seed: seed of the permutation and of the noise.
        workdir: keep the demo's files (``demo.onnx``, ``demo.permuted.onnx``, its key, the
            suspect, the resynced copy) in this folder, created if missing; ``None`` uses a
            temporary folder removed afterwards.
        progress: called with one line per verify iteration.

    Returns:
        The figures of every step and the lines ``onnxlady demo`` prints.

    Raises:
        OnnxladyError: ``workdir`` cannot be created, or a step failed.
    """
    check_seed(seed, "--seed")
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="onnxlady-demo-") as temporary:
            return _run(Path(temporary), seed, progress, None)
    folder = Path(workdir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxladyError(f"{folder}: cannot create the demo folder ({exc.strerror or exc})") from exc
    return _run(folder, seed, progress, folder)


def _run(folder: Path, seed: int, progress: Callable[[str], None] | None, workdir: Path | None) -> DemoResult:
    lines: list[str] = []
    reference = build_demo_model(0)
    reference_path = folder / "demo.onnx"
    save_model(reference, reference_path)
    summary = inspect(reference).summary
    lines.append(
        f"1. built {reference_path.name}: {summary['groups']} channel groups, "
        f"{summary['permutable_groups']} permutable; "
        f"{summary['permutable_producer_neurons']}/{summary['producer_neurons']} producer neurons "
        f"({100 * summary['permutable_fraction']:.1f} %) can move, the rest feed the graph output"
    )

    permuted_path, key_path = folder / "demo.permuted.onnx", folder / "demo.key.json"
    # File to file (the streaming route), so the key names demo.onnx; the model in memory stays as built.
    permuted = permute(reference_path, output=permuted_path, key_out=key_path, seed=seed)
    moved = permuted.permuted_neurons
    lines.append(
        f"2. permuted {len(permuted.permuted_groups)} groups ({moved} neurons) with seed {seed} -> "
        f"{permuted_path.name}, key {key_path.name}"
    )

    check = verify(reference, permuted_path, provider="auto", progress=progress)
    scale = max(out.reference_max_abs for out in check.outputs)
    lines.append(
        f"3. verify on {check.provider_used}: {'EQUIVALENT' if check.equivalent else 'NOT EQUIVALENT'} "
        f"(max abs error {check.max_abs_error:.2e} on outputs up to {scale:.2f})"
    )

    wrong_path = folder / "demo.wrong.onnx"
    save_model(_swap_one_producer_row(load_model(permuted_path).model), wrong_path)
    caught = not verify(reference, wrong_path, provider="auto").equivalent
    lines.append(
        "4. a wrong permutation (two rows of one conv swapped, consumers left alone) is "
        + ("caught: NOT EQUIVALENT" if caught else "NOT caught")
    )

    identical = unpermute(permuted_path, key_path).weights_identical_to_source
    lines.append(f"5. unpermute with the key: weights bit-identical to the original: {identical}")

    suspect_path = folder / "demo.suspect.onnx"
    perturbed = perturb(permuted_path, output=suspect_path, noise=DEMO_NOISE, seed=seed)
    changed = max(change.relative_l2_change for change in perturbed.changes)
    lines.append(
        f"6. perturbed the permuted copy: Gaussian noise of {DEMO_NOISE:g} x std on all "
        f"{len(perturbed.changes)} weight tensors (relative change up to {changed:.2f}) -> {suspect_path.name}"
    )

    resynced_path = folder / "demo.resynced.onnx"
    argmax = resync(reference, perturbed.model, method="argmax", true_key=permuted.key)
    hungarian = resync(reference, perturbed.model, method="hungarian", true_key=permuted.key, output=resynced_path)
    margin = min(g.min_margin for g in hungarian.groups) if hungarian.groups else 1.0
    lines.append(
        f"7. resync to the original order: Psi = {hungarian.psi:.2f} % of the {moved} permuted neurons back in place "
        f"with Hungarian matching ({argmax.psi:.2f} % with the paper's argmax); {hungarian.ambiguous} ambiguous, "
        f"smallest margin {margin:.3f} -> {resynced_path.name}"
    )
    resynced_equivalent = verify(suspect_path, resynced_path, provider="auto").equivalent
    lines.append(
        "8. verify resynced vs suspect: "
        + ("EQUIVALENT (resync only reorders neurons)" if resynced_equivalent else "NOT EQUIVALENT")
    )
    summary_fraction = float(summary["permutable_fraction"])
    return DemoResult(
        ok=check.equivalent and caught and identical and resynced_equivalent,
        lines=lines,
        groups=int(summary["groups"]),
        permutable_groups=int(summary["permutable_groups"]),
        permutable_fraction=summary_fraction,
        permuted_neurons=moved,
        verify=check,
        wrong_permutation_caught=caught,
        unpermute_bit_identical=identical,
        noise=DEMO_NOISE,
        psi_hungarian=float(hungarian.psi or 0.0),
        psi_argmax=float(argmax.psi or 0.0),
        resynced_equivalent_to_suspect=resynced_equivalent,
        workdir=workdir,
    )


def _swap_one_producer_row(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with two rows of its first conv weight swapped: a wrong permutation.

    The conv's consumers are left alone, so the copy computes something else.
    """
    wrong = copy_model(model)
    for tensor in wrong.graph.initializer:
        if len(tensor.dims) == 4 and tensor.dims[0] > 1:
            array = read_array(tensor, f"tensor '{tensor.name}'").copy()
            array[[0, 1]] = array[[1, 0]]
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            return wrong
    raise OnnxladyError("the demo model has no conv weight to swap rows of")
