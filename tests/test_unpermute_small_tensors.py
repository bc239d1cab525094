"""Unpermute hashes a deep graph's small restored tensors only when its verdict needs them (issue 15).

A streamed unpermute restores tensors under 64 KiB in place and hashed each as it went (25,000
sha256 calls at 50,000 nodes), although a written file whose sha256 is the source's proves the
weights are too. They are now listed and hashed after writing only when the file is not the
source's byte for byte (external data, a changed model, a broken key): the verdicts and the
refusal of an edited key stay.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import onnxlady
from fixtures import build_deep_model
from onnxlady._errors import OnnxladyError
from onnxlady._transforms import _permute


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sources whose bytes a SourceDigest hashed (as they were restored, or after writing)."""
    calls: list[str] = []
    for method in ("add", "add_now"):
        original = getattr(_permute.SourceDigest, method)

        def spy(self: _permute.SourceDigest, source: str, data: bytes | memoryview, original=original) -> None:  # type: ignore[no-untyped-def]
            calls.append(source)
            original(self, source, data)

        monkeypatch.setattr(_permute.SourceDigest, method, spy)
    return calls


def _permuted(tmp_path: Path, **options: object) -> tuple[Path, Path, Path]:
    source = tmp_path / "source.onnx"
    onnx.save(build_deep_model(60), source)
    result = onnxlady.permute(source, output=tmp_path / "p.onnx", seed=2, **options)  # type: ignore[arg-type]
    assert result.key_path is not None
    return source, tmp_path / "p.onnx", Path(result.key_path)


def test_a_file_identical_to_the_source_hashes_no_tensor(tmp_path: Path, hashed: list[str]) -> None:
    source, permuted, key = _permuted(tmp_path)
    hashed.clear()  # (permute hashes the source's tensors for its key)
    result = onnxlady.unpermute(permuted, key, output=tmp_path / "u.onnx")
    assert (tmp_path / "u.onnx").read_bytes() == source.read_bytes()
    assert result.output_identical_to_source_file and result.weights_identical_to_source
    assert hashed == []


def test_an_edited_key_of_small_tensors_is_refused(tmp_path: Path, hashed: list[str]) -> None:
    _, permuted, key = _permuted(tmp_path)
    document = json.loads(key.read_text())
    group = next(g for g in document["groups"] if g["size"] > 2)
    group["perm"][0], group["perm"][1] = group["perm"][1], group["perm"][0]
    swapped = tmp_path / "swapped.key.json"
    swapped.write_text(json.dumps(document))
    hashed.clear()
    with pytest.raises(OnnxladyError, match="edited or is corrupt"):
        onnxlady.unpermute(permuted, swapped, output=tmp_path / "u.onnx")
    assert not (tmp_path / "u.onnx").exists()
    assert len(set(hashed)) == len(document["tensors"])  # every restored tensor, once the file differed


@pytest.mark.parametrize("changed", [False, True])
def test_weights_are_judged_by_their_hashes_when_the_file_cannot_tell(
    tmp_path: Path, hashed: list[str], changed: bool
) -> None:
    """External data (the model file's sha256 misses the weights), or a model changed after permuting."""
    source, permuted, key = _permuted(tmp_path)
    if changed:  # the source itself, given as the permuted model: its weights are not the source's once "restored"
        permuted = source
    hashed.clear()
    result = onnxlady.unpermute(
        permuted, key, output=tmp_path / "u.onnx", external_data=not changed, allow_changed_model=changed
    )
    assert result.weights_identical_to_source is not changed
    assert len(set(hashed)) == len(json.loads(key.read_text())["tensors"])
