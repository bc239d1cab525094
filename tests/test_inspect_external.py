"""``onnxlady.inspect`` of a model stored with external data: weights left in their files.

inspect needs shapes and a few small constants, never the weights: a file's external tensors
stay in their data files (:func:`onnxlady._io._external.map_external_data`) and a rule that
needs a value reads it from there. The analysis must be the one the same model saved inline
gives, word for word.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import onnxlady
import onnxlady._io._external as external_module
import onnxlady._io._files as files_module
from fixtures import FIXTURES, save_large_external_model

#: Convolutions, a transformer, Reshape targets, QDQ scales, a subgraph, a shared weight.
NAMES = ["resnet", "bert_like", "reshape_digits", "qdq_convnet", "if_branch", "shared_initializer", "tied_lm_head"]


def _save_both(name: str, folder: Path) -> tuple[Path, Path]:
    """The fixture saved inline and with every tensor external (``size_threshold=0``)."""
    model = FIXTURES[name](0)
    inline, outside = folder / f"{name}.onnx", folder / f"{name}_ext.onnx"
    onnx.save(model, inline)
    onnx.save(model, outside, save_as_external_data=True, all_tensors_to_one_file=True,
              location=outside.name + ".data", size_threshold=0)  # fmt: skip
    return inline, outside


def _documents(path: Path) -> tuple[str, str]:
    """The inspect JSON (without the file's path and hash) and its text with members, path blanked."""
    result = onnxlady.inspect(path, members=True)
    document = json.loads(result.to_json_text())
    del document["model"], document["sha256"]
    return json.dumps(document, indent=1), result.to_text().replace(str(path), "MODEL")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("inline_bytes", [external_module.INLINE_BYTES, 0])
def test_external_inspect_is_inline_inspect(
    name: str, inline_bytes: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same analysis; with ``INLINE_BYTES`` 0 every tensor stays in its file, small constants too."""
    inline, outside = _save_both(name, tmp_path)
    expected = _documents(inline)
    monkeypatch.setattr(external_module, "INLINE_BYTES", inline_bytes)
    assert _documents(outside) == expected


def test_external_inspect_reads_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-model reader of external data is never called, and the dot file is still written."""
    path = tmp_path / "big.onnx"
    save_large_external_model(path, 4)

    def refuse(*_: object) -> None:
        raise AssertionError("inspect read every external tensor")

    monkeypatch.setattr(files_module, "_load_external_data", refuse)
    result = onnxlady.inspect(path, dot=tmp_path / "groups.dot")
    assert result.summary["groups"] > 1 and (tmp_path / "groups.dot").read_text().startswith("digraph")
    monkeypatch.undo()
    loaded = onnx.load(path)  # the weights in memory: the same analysis
    assert onnxlady.inspect(loaded).to_json()["groups"] == result.to_json()["groups"]


def test_external_inspect_refuses_dot_over_its_data(tmp_path: Path) -> None:
    """The group graph must never replace the external data file the model reads."""
    _, outside = _save_both("resnet", tmp_path)
    with pytest.raises(onnxlady.OnnxladyError):
        onnxlady.inspect(outside, dot=tmp_path / (outside.name + ".data"))
