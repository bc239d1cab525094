"""``index build`` of a registry path that does not exist (held-out round 10, F5).

It built an empty index with exit 0, and every ``find`` against it then answered "nothing
derived": a typo read as "no copy found". A path given that is not there is bad input.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from fixtures import FIXTURES
from onnxlady import OnnxladyError, build_index


def test_a_missing_path_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    index = tmp_path / "registry.idx"
    with pytest.raises(OnnxladyError, match="no such file or folder"):
        build_index([tmp_path / "typo"], index, workers=1)
    assert not index.exists()


def test_the_command_line_says_it_in_one_line_with_exit_2(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    onnx.save(FIXTURES["vgg"](0), models / "vgg.onnx")
    index = tmp_path / "registry.idx"
    done = subprocess.run(
        [sys.executable, "-m", "onnxlady", "index", "build", str(models), str(tmp_path / "typo"), "-o", str(index)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "typo: no such file or folder" in done.stderr
    assert not index.exists()
    # The existing folder alone builds.
    assert build_index([models], index, workers=1).models == 1
