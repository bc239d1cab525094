"""``onnxlady demo``: the main job end to end on a small model the package builds itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import onnx

from onnxlady._analysis._channels import analyze
from onnxlady._api._demo_model import build_demo_model
from onnxlady._io._files import load_model, save_model
from onnxlady._transforms._permute import draw_permutations, permute_model, unpermute_model
from onnxlady._transforms._perturb import perturb_model
from onnxlady._resync._entry import resync_model
from onnxlady._verify._compare import verify_models

#: The paper's noise level at which its classifiers still resynchronise fully (Omega = 1).
DEMO_NOISE = 1.0


def run_demo(folder: Path, seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build, inspect, permute, verify, restore, perturb and resync the demo model.

    Returns the figures and the lines ``onnxlady demo`` prints.
    """
    lines: list[str] = []
    reference_path = folder / "demo.onnx"
    save_model(build_demo_model(0), reference_path)
    reference = load_model(reference_path)
    analysis = analyze(reference.model)
    summary = analysis.summary()
    lines.append(
        f"1. built {reference_path.name}: {summary['groups']} channel groups, {summary['permutable_groups']} permutable; "
        f"{summary['permutable_producer_neurons']}/{summary['producer_neurons']} producer neurons "
        f"({100 * summary['permutable_fraction']:.1f} %) can move, the rest feed the graph output"
    )

    permuted_path = folder / "demo.permuted.onnx"
    perms = draw_permutations(analysis, seed)
    key = permute_model(analysis, perms, source_sha256=reference.sha256, source_file=reference_path.name, seed=seed)
    key.permuted_sha256 = save_model(analysis.graph.model, permuted_path, digest=True)
    key_path = folder / "demo.key.json"
    key_path.write_text(json.dumps(key.to_json(), indent=1))
    moved = sum(analysis.group(gid).size for gid in perms)
    lines.append(f"2. permuted {len(perms)} groups ({moved} neurons) with seed {seed} -> {permuted_path.name}, key {key_path.name}")

    report = verify_models(str(reference_path), str(permuted_path), provider="auto", progress=progress)
    worst = max(out.max_abs_error for out in report.outputs)
    scale = max(out.reference_max_abs for out in report.outputs)
    lines.append(
        f"3. verify on {report.provider_used}: {'EQUIVALENT' if report.equivalent else 'NOT EQUIVALENT'} "
        f"(max abs error {worst:.2e} on outputs up to {scale:.2f})"
    )

    wrong = load_model(permuted_path).model
    _swap_one_producer_row(wrong)
    wrong_path = folder / "demo.wrong.onnx"
    save_model(wrong, wrong_path)
    caught = verify_models(str(reference_path), str(wrong_path), provider="auto")
    lines.append(
        "4. a wrong permutation (two rows of one conv swapped, consumers left alone) is "
        + ("caught: NOT EQUIVALENT" if not caught.equivalent else "NOT caught")
    )

    restored = load_model(permuted_path).model
    identical = unpermute_model(restored, key)
    lines.append(f"5. unpermute with the key: weights bit-identical to the original: {identical}")

    suspect = load_model(permuted_path).model
    perturbation = perturb_model(suspect, noise=DEMO_NOISE, seed=seed)
    suspect_path = folder / "demo.suspect.onnx"
    save_model(suspect, suspect_path)
    changed = max(change.relative_l2_change for change in perturbation.changes)
    lines.append(
        f"6. perturbed the permuted copy: Gaussian noise of {DEMO_NOISE:g} x std on all "
        f"{len(perturbation.changes)} weight tensors (relative change up to {changed:.2f}) -> {suspect_path.name}"
    )
    original = load_model(reference_path).model  # reference.model was permuted in place above
    psi = {}
    for method in ("argmax", "hungarian"):
        result = resync_model(original, suspect, method=method, true_key=key)
        psi[method] = result.psi
        if method == "hungarian":
            resynced_path = folder / "demo.resynced.onnx"
            save_model(result.model, resynced_path)
            ambiguous = sum(g.ambiguous for g in result.groups)
            margin = min(g.min_margin for g in result.groups) if result.groups else 1.0
    lines.append(
        f"7. resync to the original order: Psi = {psi['hungarian']:.2f} % of the {moved} permuted neurons back in place "
        f"with Hungarian matching ({psi['argmax']:.2f} % with the paper's argmax); {ambiguous} ambiguous, "
        f"smallest margin {margin:.3f} -> {resynced_path.name}"
    )
    resynced_check = verify_models(str(suspect_path), str(resynced_path), provider="auto")
    lines.append(
        "8. verify resynced vs suspect: "
        + ("EQUIVALENT (resync only reorders neurons)" if resynced_check.equivalent else "NOT EQUIVALENT")
    )
    ok = report.equivalent and not caught.equivalent and identical and resynced_check.equivalent
    return {
        "ok": ok,
        "lines": lines,
        "groups": summary["groups"],
        "permutable_groups": summary["permutable_groups"],
        "permutable_fraction": summary["permutable_fraction"],
        "permuted_neurons": moved,
        "verify": report.to_dict(),
        "wrong_permutation_caught": not caught.equivalent,
        "unpermute_bit_identical": identical,
        "noise": DEMO_NOISE,
        "psi_hungarian": psi["hungarian"],
        "psi_argmax": psi["argmax"],
        "resynced_equivalent_to_suspect": resynced_check.equivalent,
    }


def _swap_one_producer_row(model: onnx.ModelProto) -> None:
    """Swap two output rows of the first conv weight only: what a wrong permutation looks like."""
    from onnx import numpy_helper

    for tensor in model.graph.initializer:
        if len(tensor.dims) == 4 and tensor.dims[0] > 1:
            array = numpy_helper.to_array(tensor).copy()
            array[[0, 1]] = array[[1, 0]]
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            return
