"""``--max-memory`` estimates: upper bounds of what the commands allocate, and not refusals of what fits.

Each estimate, less the interpreter's baseline, is at least the command's peak of Python and
numpy allocations (tracemalloc) on a conv net with inline weights and its noised, permuted twin
(the audit's forensics run on it). Session 18's estimates started at 200 MB and counted 2.5 to 10
times the models: a budget of a few times the largest tensor, which the commands fit in, was
refused (held-out round 18, F6).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

import onnxlady
from fixtures import build_large_model
from onnxlady._api._memory import BASELINE, BASELINE_BYTES, estimate_peak, largest_group, pair_peak
from onnxlady._io._files import load_model
from onnxlady._resync._state_analysis import analyze_with_state
from onnxlady.cli import main


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("memory")
    paths = {name: folder / f"{name}.onnx" for name in ("reference", "permuted", "noisy")}
    onnx.save(build_large_model(12, seed=3), paths["reference"])
    onnxlady.permute(paths["reference"], output=paths["permuted"], seed=1)
    onnxlady.perturb(paths["permuted"], output=paths["noisy"], noise=0.1, seed=2)
    return paths


def _peak(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_each_estimate_bounds_the_commands_allocations(pair: dict[str, Path], tmp_path: Path) -> None:
    reference, permuted, noisy = pair["reference"], pair["permuted"], pair["noisy"]
    key = Path(f"{permuted}.key.json")
    group = largest_group(analyze_with_state(load_model(reference, map_external=True).model))
    cases: dict[str, tuple[int, Callable[[], object]]] = {
        "permute": (
            estimate_peak("permute", [reference], mapped=True)[0],
            lambda: onnxlady.permute(reference, output=tmp_path / "p.onnx", seed=5),
        ),
        "unpermute": (
            estimate_peak("unpermute", [permuted], mapped=True)[0],
            lambda: onnxlady.unpermute(permuted, key, output=tmp_path / "u.onnx"),
        ),
        "resync": (
            pair_peak("resync", [reference, noisy], twin=True, group=group),
            lambda: onnxlady.resync(reference, noisy, output=tmp_path / "r.onnx"),
        ),
        "resync --true-key": (
            pair_peak("resync", [reference, permuted], twin=True, group=group, true_key=True),
            lambda: onnxlady.resync(reference, permuted, output=tmp_path / "t.onnx", true_key=key),
        ),
        "audit": (
            pair_peak("audit", [reference, noisy], twin=True, group=group),
            lambda: onnxlady.audit(reference, noisy),
        ),
    }
    measured = {name: _peak(run) for name, (_, run) in cases.items()}
    for name, (estimate, _) in cases.items():
        assert estimate - BASELINE_BYTES >= measured[name], (name, estimate >> 20, measured[name] >> 20)
    # Permute and resync follow the tensors, not the models (the largest is 1.3 MiB of 12).
    for name, command in (("permute", "permute"), ("unpermute", "unpermute"), ("resync", "resync")):
        assert cases[name][0] - BASELINE[command] < 24 << 20, name


def test_a_budget_the_command_fits_in_is_not_refused(pair: dict[str, Path], tmp_path: Path) -> None:
    """Budgets session 18 refused (its estimates: 0.26 GiB for permute, 0.66 GiB for resync)."""
    reference, noisy = pair["reference"], pair["noisy"]
    out = tmp_path / "p.onnx"
    assert main(["permute", str(reference), "-o", str(out), "--max-memory", "200M", "--quiet"]) == 0
    assert out.is_file()
    resynced = tmp_path / "r.onnx"
    assert main(["resync", str(reference), str(noisy), "-o", str(resynced), "--max-memory", "250M", "--quiet"]) == 0
    assert resynced.is_file()
    assert main(["audit", str(reference), str(noisy), "--max-memory", "300M", "--quiet"]) == 1  # perturbed
    # Still refused when the budget is below what the graphs and tensors need.
    assert main(["permute", str(reference), "-o", str(tmp_path / "x.onnx"), "--max-memory", "64M", "--quiet"]) == 2
    assert main(["resync", str(reference), str(noisy), "-o", str(tmp_path / "y.onnx"), "--max-memory", "70M"]) == 2
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_an_across_pair_is_estimated_with_its_weights_read_in(pair: dict[str, Path]) -> None:
    reference, noisy = pair["reference"], pair["noisy"]
    twin = pair_peak("resync", [reference, noisy], twin=True)
    across = pair_peak("resync", [reference, noisy], twin=False)
    weights, baseline = 12 << 20, BASELINE["resync"]
    assert across - baseline >= 2 * weights > twin - baseline
    # The audit across a conversion holds float64 copies with error bounds (12-13 times measured).
    assert pair_peak("audit", [reference, noisy], twin=False) - BASELINE["audit"] >= 13 * weights
