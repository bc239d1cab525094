"""A build with N workers is this process and N - 1 pool processes (issue 17, session 13).

The calling process used to wait on a pool of N: one fork and one cold worker more, and an idle
process, for the same work (1 -> 2 workers gave 1.58). It now fingerprints too; what a build
writes must not depend on who computed it.
"""

from __future__ import annotations

import sqlite3
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import onnx
import pytest

from fixtures import FIXTURES
from onnxlady._provenance import _index
from onnxlady._provenance._index import build_index


def _registry(folder: Path) -> list[str]:
    folder.mkdir()
    names = ["vgg", "resnet", "matmul_mlp", "tied_lm_head", "encoder_postnorm"]
    for seed in range(3):
        for name in names:
            onnx.save(FIXTURES[name](seed), folder / f"{name}.{seed}.onnx")
    (folder / "broken.onnx").write_bytes(b"not a model")
    return [str(folder)]


def _rows(index: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(index) as connection:
        models = connection.execute(
            "SELECT path, size, sha256, layers, parameters, fingerprint, vector FROM models ORDER BY path"
        )
        errors = connection.execute("SELECT path, error FROM errors ORDER BY path")
        return [*models.fetchall(), *errors.fetchall()]


def test_the_calling_process_is_one_of_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _registry(tmp_path / "registry")
    pools: list[int] = []

    class Recorded(ProcessPoolExecutor):
        def __init__(self, max_workers: int | None = None, **kwargs: Any) -> None:
            pools.append(max_workers or 0)
            super().__init__(max_workers, **kwargs)

    monkeypatch.setattr(_index, "ProcessPoolExecutor", Recorded)
    monkeypatch.setattr(_index, "_TASK_FILES", 2)  # several tasks, so that a pool is started at all
    alone = build_index(paths, tmp_path / "one.idx", workers=1)
    two = build_index(paths, tmp_path / "two.idx", workers=2)
    three = build_index(paths, tmp_path / "three.idx", workers=3)
    assert pools == [1, 2]  # 2 workers: this process and one pool process; 3: and two
    assert len(alone.indexed) == len(two.indexed) == len(three.indexed) == 15 and len(two.errors) == 1
    # Byte for byte the same index rows, whoever fingerprinted which file.
    assert _rows(tmp_path / "one.idx") == _rows(tmp_path / "two.idx") == _rows(tmp_path / "three.idx")
