"""Unpermute's bit-identical verdict without a second pass over the weights (issue 15).

A streamed unpermute hashed every restored weight as it wrote it, although the written file's
sha256 (computed anyway) equal to the source's proves the same thing. Now the weights are hashed
only when the file is not the source's byte for byte (its encoding differs, or the key is wrong):
restored again from the model in memory, so the verdict and the refusal of a broken key stay.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import onnxlady
from fixtures.large import build_large_model
from onnxlady._errors import OnnxladyError
from onnxlady._transforms import _permute
from onnxlady._transforms._permute import _DEFER_BYTES


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sources whose restored bytes unpermute hashed after writing."""
    calls: list[str] = []
    original = _permute.SourceDigest.add_now

    def spy(self: _permute.SourceDigest, source: str, data: bytes | memoryview) -> None:
        calls.append(source)
        original(self, source, data)

    monkeypatch.setattr(_permute.SourceDigest, "add_now", spy)
    return calls


def _permuted(tmp_path: Path, source_bytes: bytes) -> tuple[Path, Path]:
    source = tmp_path / "source.onnx"
    source.write_bytes(source_bytes)
    result = onnxlady.permute(source, output=tmp_path / "p.onnx", seed=3)
    assert result.key_path is not None
    return tmp_path / "p.onnx", Path(result.key_path)


def test_a_file_identical_to_the_source_is_not_hashed_again(tmp_path: Path, hashed: list[str]) -> None:
    model = build_large_model(2)
    assert max(len(t.raw_data) for t in model.graph.initializer) >= _DEFER_BYTES  # streamed weights
    permuted, key = _permuted(tmp_path, model.SerializeToString())
    result = onnxlady.unpermute(permuted, key, output=tmp_path / "u.onnx")
    assert (tmp_path / "u.onnx").read_bytes() == (tmp_path / "source.onnx").read_bytes()
    assert result.output_identical_to_source_file and result.weights_identical_to_source
    assert hashed == []


def test_a_source_encoded_otherwise_is_judged_by_its_weights(tmp_path: Path, hashed: list[str]) -> None:
    """A source file protobuf would encode differently is restored to other bytes, same weights.

    The source repeats a field at its end (the last one counts): the restored file is protobuf's
    encoding, so the weights are hashed, and agree.
    """
    model = build_large_model(2)
    odd = model.SerializeToString() + bytes([0x08, model.ir_version])  # ir_version again, at the end
    assert onnx.load_from_string(odd) == model
    permuted, key = _permuted(tmp_path, odd)
    result = onnxlady.unpermute(permuted, key, output=tmp_path / "u.onnx")
    assert (tmp_path / "u.onnx").read_bytes() == model.SerializeToString()  # protobuf's encoding
    assert result.output_identical_to_source_file is False
    assert result.weights_identical_to_source is True
    assert hashed  # the streamed weights, restored again and hashed


def test_a_wrong_key_is_still_refused_when_the_file_differs(tmp_path: Path, hashed: list[str]) -> None:
    model = build_large_model(2)
    permuted, key = _permuted(tmp_path, model.SerializeToString())
    document = json.loads(key.read_text())
    group = next(g for g in document["groups"] if g["size"] > 2)
    group["perm"][0], group["perm"][1] = group["perm"][1], group["perm"][0]
    swapped = tmp_path / "swapped.key.json"
    swapped.write_text(json.dumps(document))
    with pytest.raises(OnnxladyError, match="edited or is corrupt"):
        onnxlady.unpermute(permuted, swapped, output=tmp_path / "u.onnx")
    assert not (tmp_path / "u.onnx").exists()
    assert hashed
    # Refused while still staged: an existing output is left as it was (it was replaced, then removed).
    (tmp_path / "u.onnx").write_bytes(b"earlier")
    with pytest.raises(OnnxladyError, match="edited or is corrupt"):
        onnxlady.unpermute(permuted, swapped, output=tmp_path / "u.onnx")
    assert (tmp_path / "u.onnx").read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "p.onnx", "p.onnx.key.json", "source.onnx", "swapped.key.json", "u.onnx"
    ]  # fmt: skip


def test_external_data_is_always_judged_by_its_weights(tmp_path: Path, hashed: list[str]) -> None:
    """The model file's sha256 does not cover weights kept in a data file: they are hashed."""
    source = tmp_path / "source.onnx"
    onnx.save(build_large_model(2), source)
    result = onnxlady.permute(source, output=tmp_path / "p.onnx", seed=3, external_data=True)
    assert result.key_path is not None
    restored = onnxlady.unpermute(tmp_path / "p.onnx", result.key_path, output=tmp_path / "u.onnx")
    assert restored.weights_identical_to_source is True
    assert hashed
