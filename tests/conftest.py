"""Shared fixtures: the test models saved once per session, copied into each test's own folder."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from fixtures import FIXTURES

#: The fixtures the CLI and I/O tests use: small, fast to analyse.
SAVED_FIXTURES = ("vgg", "resnet", "matmul_mlp", "custom_op")


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fixture_models")
    paths = {}
    for name in SAVED_FIXTURES:
        paths[name] = folder / f"{name}.onnx"
        onnx.save_model(FIXTURES[name](0), str(paths[name]))
    return paths


@pytest.fixture
def model_file(saved_models: dict[str, Path], tmp_path: Path) -> Callable[..., Path]:
    """``model_file("vgg")`` -> a fresh copy of the fixture in ``tmp_path/in/``."""

    def copy(name: str, as_name: str | None = None) -> Path:
        target = tmp_path / "in" / (as_name or f"{name}.onnx")
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(saved_models[name], target)
        return target

    return copy


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An empty output folder of its own, so leftovers (temp files included) are easy to see."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def disk_full(monkeypatch) -> None:
    """Every file written through ``os.fdopen`` gets half its bytes, then the disk is full."""
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, handle) -> None:
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> bool:
            self.handle.close()
            return False

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k)))
