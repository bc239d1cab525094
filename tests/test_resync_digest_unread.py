"""A resync that writes no key does not hash its moved tensors for the key's digest (issue 15).

The recovered key's ``source_weights_sha256`` covers every tensor of the output; a resync that
writes no key left it to be computed when first read, yet hashed each moved tensor as the
writer computed it (and, across a conversion, every tensor that does not move while making the
key): for the command without ``--key-out``, work for nothing (about 6 % of an 11 MB twin resync).
The digest, when it is read, is the one the key file records.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import onnxlady
from fixtures import build_large_model
from fixtures.conversions import CONVERSIONS
from onnxlady._transforms import _permute


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("digest")
    model = build_large_model(1)
    suspect = onnxlady.perturb(onnxlady.permute(model, seed=1).model, noise=0.1, seed=1).model
    paths = folder / "ref.onnx", folder / "twin.onnx", folder / "f16.onnx"
    onnx.save(model, paths[0])
    onnx.save(suspect, paths[1])
    onnx.save(CONVERSIONS["float16"](onnxlady.permute(model, seed=2).model), paths[2])
    return paths


@pytest.mark.parametrize("which", [1, 2], ids=["twin", "across-float16"])
def test_no_key_no_digest(
    models: tuple[Path, Path, Path], which: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, suspect = models[0], models[which]
    keyed = onnxlady.resync(reference, suspect, output=tmp_path / "keyed.onnx", key_out=tmp_path / "keyed.key.json")
    recorded = json.loads((tmp_path / "keyed.key.json").read_text())["source"]["weights_sha256"]
    assert len(recorded) == 64
    hashed: list[str] = []
    add_now = _permute.SourceDigest.add_now

    def spy(self: _permute.SourceDigest, source: str, data: bytes | memoryview) -> None:
        hashed.append(source)
        add_now(self, source, data)

    monkeypatch.setattr(_permute.SourceDigest, "add_now", spy)
    result = onnxlady.resync(reference, suspect, output=tmp_path / "plain.onnx")
    assert hashed == []  # nothing hashed for a key no one reads
    assert (tmp_path / "plain.onnx").read_bytes() == (tmp_path / "keyed.onnx").read_bytes()
    # Read afterwards, the digest is computed then, and is the one the key file records.
    assert result.key.source_weights_sha256 == recorded
    assert hashed
    assert keyed.key.source_weights_sha256 == recorded
