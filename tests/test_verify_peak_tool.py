"""``python3 -m tools.verify_peak``: its rows, its pair syntax and its exit status when two trees disagree."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path
from typing import Any

import onnx
import pytest

from fixtures import FIXTURES
from onnxlady import analyze
from onnxlady.testing import copy_model, permute_copy, permute_producer_only
from tools import verify_peak
from tools._bench import REPO


def _pairs(tmp_path: Path) -> tuple[str, str]:
    model = FIXTURES["vgg"](0)
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    paths = {}
    for name, saved in (("reference", model), ("permuted", permute_copy(model, seed=1)[0]), ("wrong", wrong)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(saved, str(paths[name]))
    return f"{paths['reference']}:{paths['permuted']}", f"{paths['reference']}:{paths['wrong']}"


def test_rows_and_verdicts(tmp_path: Path) -> None:
    right, wrong = _pairs(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = verify_peak.main([right, wrong, "--repeats", "1"])
    rows = [line.split(" | ") for line in out.getvalue().splitlines()[2:]]
    assert code == 0
    assert [(row[2], row[3]) for row in rows] == [("working tree", "equivalent"), ("working tree", "not-equivalent")]
    for row in rows:
        peak, most = (float(value) for value in row[4].split(" / "))
        assert 0 < peak <= most  # ONNX Runtime's session at least: never nothing


def _fake_runs(monkeypatch: pytest.MonkeyPatch, verdicts: dict[str, str]) -> list[str]:
    """Replace the children: each run gets the verdict of its tree; returns the trees in the order run."""
    order: list[str] = []

    def run(reference: Path, candidate: Path, tree: Path | None) -> dict[str, Any]:
        label = "baseline" if tree is not None else "working tree"
        order.append(label)
        return {"verdict": verdicts[label], "peak": 1e6, "seconds": 0.1, "cpu": 0.1}

    monkeypatch.setattr(verify_peak, "_run", run)
    return order


def test_the_trees_alternate_and_must_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    right, _ = _pairs(tmp_path)
    order = _fake_runs(monkeypatch, {"baseline": "equivalent", "working tree": "equivalent"})
    with contextlib.redirect_stdout(io.StringIO()):
        assert verify_peak.main([right, "--repeats", "3", "--baseline", str(REPO)]) == 0
    assert order == ["baseline", "working tree", "working tree", "baseline", "baseline", "working tree"]
    _fake_runs(monkeypatch, {"baseline": "equivalent", "working tree": "not-equivalent"})
    with contextlib.redirect_stdout(io.StringIO()):
        assert verify_peak.main([right, "--repeats", "1", "--baseline", str(REPO)]) == 1


def test_a_pair_needs_both_paths() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        verify_peak._pair("reference.onnx")
