"""``tools.memory_estimates`` prints a command's estimate against its measured peaks (issue 15, session 19)."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

from fixtures import FIXTURES
from tools import memory_estimates


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status (Linux only)")
def test_the_estimate_bounds_the_measured_peak(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(FIXTURES["resnet"](0), source)
    code = memory_estimates.main(["--", "permute", str(source), "-o", str(tmp_path / "out.onnx"), "--seed", "1"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split("|")
    estimate, anon, ratio = float(row[2]), float(row[3]), float(row[5])
    assert code == 0 and (tmp_path / "out.onnx").exists()
    assert anon > 0 and estimate >= anon and ratio >= 1.0, row


def test_a_command_without_an_estimate_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert memory_estimates.main(["--", "permute", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "no estimate" in capsys.readouterr().err
