"""Loading a model runs with the cyclic garbage collector paused, and restores it (issue 15).

Reading and validating a model makes a few containers per node and keeps them until it is
read; the collector's walks over them were a tenth of ``load_model``'s time at 50,000 nodes.
"""

from __future__ import annotations

import gc
from pathlib import Path

import onnx
import pytest

from fixtures import build_deep_model
from onnxlady._errors import OnnxladyError
from onnxlady._io import _files
from onnxlady._io._files import load_model


def test_the_collector_is_paused_while_a_model_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "deep.onnx"
    onnx.save(build_deep_model(30), path)
    seen: list[bool] = []
    validate = _files.validate_model

    def recording(*args: object, **kwargs: object) -> None:
        seen.append(gc.isenabled())
        validate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_files, "validate_model", recording)
    assert gc.isenabled()
    loaded = load_model(path)
    assert seen == [False] and gc.isenabled()
    assert len(loaded.model.graph.node) == len(build_deep_model(30).graph.node)


def test_the_collector_is_restored_when_loading_fails(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x0a\xff\xff\xff not a model")
    assert gc.isenabled()
    with pytest.raises(OnnxladyError):
        load_model(path)
    assert gc.isenabled()
