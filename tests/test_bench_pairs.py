"""The bench's floor: paired with its command, order alternating, inputs read first (issue 15).

The floor of one 118 MB model read 0.37 s in one row and 0.72 s in another: a floor run always
first in its pair, a cold first read landing on it, and wall time that counts waiting for a
core. Each pair's ratio is its own, wall and CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from tools import bench


def test_pairs_alternate_and_warm_the_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x" * 100)
    calls: list[str] = []
    warmed: list[list[object]] = []
    timings = iter([(2.0, 1.0, 10.0), (3.0, 4.0, 20.0), (5.0, 8.0, 30.0), (4.0, 2.0, 40.0)])

    def measure(script: str, prelude: str, arguments: Sequence[object], output: Path | None) -> tuple[float, float, float]:
        calls.append("floor" if prelude == bench._PRELUDE_ONNX else "command")
        return next(timings)

    monkeypatch.setattr(bench, "_measure", measure)
    monkeypatch.setattr(bench, "_warm", lambda arguments: warmed.append(list(arguments)))
    runner = bench.Bench(tmp_path, repeats=2, only=None, floor_limit=3000)
    floor = ("load+save", bench._FLOOR_ONE, [model, "inline"], tmp_path / "floor.onnx")
    runner.pair("m", "permute", 100, floor, ["permute", model, "-o"], tmp_path / "out.onnx")
    assert calls == ["floor", "command", "command", "floor"]
    assert warmed and model in warmed[0]
    row = runner.rows[0]
    # Pair 1: floor (2 s, 1 s CPU), command (3 s, 4 s CPU); pair 2: command (5 s, 8 s), floor (4 s, 2 s).
    assert row.ratios == [1.5, 1.25]
    assert row.cpu_ratios == [4.0, 4.0]
    line = bench._table(runner.rows)[-1]
    assert "| 4.00 |" in line  # the CPU ratio column


def test_warm_reads_existing_files_and_their_data(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"a")
    (tmp_path / "m.onnx.data").write_bytes(b"b")
    bench._warm([model, "inline", tmp_path / "missing.onnx", 3])  # no error for the rest
