"""``tools.permute_phases`` times the bare parts any permute and unpermute pay on deep graphs (issue 15).

The floor is ``onnx.load`` + ``onnx.save``; the parts are one numpy move of every initializer,
their sha256 and a bare ``json.loads`` of the key. The table's last rows are sums of each run's
own parts over its own floor, so they can never fall below 1; every initializer is moved.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
from test_inspect_floor_parts import _rows

import onnxlady
from fixtures import build_deep_model
from tools import permute_phases


def _least(rows: dict[str, list[str]], name: str) -> float:
    found = re.fullmatch(r"([\d.]+) / ([\d.]+)", rows[f"least ratio of {name} (CPU, min / median)"][3])
    assert found is not None
    return float(found.group(1))


def test_the_parts_and_the_commands_are_timed_on_a_small_deep_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The files the tool would build in children of their own, made here (faster).
    onnx.save(build_deep_model(60), tmp_path / "deep60.onnx")
    onnxlady.permute(tmp_path / "deep60.onnx", output=tmp_path / "deepperm60.onnx", seed=1)
    assert permute_phases.main(["--nodes", "60", "--repeats", "1", "--workdir", str(tmp_path)]) == 0
    rows = _rows(capsys.readouterr().out)
    for name in (permute_phases.LOAD, permute_phases.SAVE, permute_phases.MOVES, permute_phases.DIGESTS,
                 permute_phases.KEY, permute_phases.FLOOR, permute_phases.PERMUTE, permute_phases.UNPERMUTE):  # fmt: skip
        assert float(rows[name][1]) >= 0.0, name  # its CPU seconds
    assert rows[permute_phases.FLOOR][3] == "1.00"
    # Every initializer of the model is moved; the key names the tensors permute moved.
    counts = rows["tensors moved / initializers / key's tensors"][0]
    moved, initializers, key_tensors = (int(n) for n in counts.split(" / "))
    assert moved == initializers == len(onnx.load(tmp_path / "deep60.onnx").graph.initializer)
    assert 0 < key_tensors <= initializers
    # Sums of a run's own parts: never under its floor, and the key read only adds.
    assert _least(rows, permute_phases.LEAST_PERMUTE) >= 1.0
    assert _least(rows, permute_phases.LEAST_UNPERMUTE) >= _least(rows, permute_phases.LEAST_PERMUTE)
    assert not list(tmp_path.glob("permute_phases.out.onnx*"))  # the commands' outputs are removed
