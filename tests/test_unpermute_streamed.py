"""Unpermute to a file restores each weight as the writer writes it (issue 15).

Before, an inline model was restored in place and serialized whole (about 4x the model in memory);
the streaming writer writes protobuf's own bytes, so each large weight is restored as it is written
and the file is still the source's byte for byte. A model stored inline stays inline: the streamed
path once wrote its weights to an external data file.
"""

from __future__ import annotations

from pathlib import Path

import onnx

import onnxlady
from fixtures.large import build_large_model
from onnxlady._transforms._permute import _DEFER_BYTES


def test_an_inline_model_is_restored_streamed_byte_for_byte(tmp_path: Path) -> None:
    source = tmp_path / "source.onnx"
    onnx.save(build_large_model(2), source)
    sizes = [t.raw_data and len(t.raw_data) for t in onnx.load(source).graph.initializer]
    assert max(sizes) >= _DEFER_BYTES  # some weights take the streamed path
    permuted = onnxlady.permute(source, output=tmp_path / "p.onnx", seed=3)
    assert (tmp_path / "p.onnx").read_bytes() != source.read_bytes()
    restored = onnxlady.unpermute(tmp_path / "p.onnx", permuted.key_path, output=tmp_path / "u.onnx")
    assert (tmp_path / "u.onnx").read_bytes() == source.read_bytes()
    assert restored.to_json()["output_identical_to_source_file"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.onnx", "p.onnx.key.json", "source.onnx", "u.onnx"]
