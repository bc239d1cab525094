"""A twin resynced with its weights left in their files moves each tensor once (issue 15).

The deferred output's key digest is taken from the moved tensors as the writer (or the audit)
computes them, instead of from a computation of its own; a digest read before any tensor was
asked for computes the missing ones. Either way it is the digest of the loaded models' resync.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import onnxlady
import onnxlady._resync._twin as twin_module
from fixtures import save_large_external_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("moved_once")
    reference = folder / "ref.onnx"
    save_large_external_model(reference, 4)
    permuted = folder / "permuted.onnx"
    onnxlady.permute(reference, output=permuted, seed=4, external_data=True)
    noisy = folder / "noisy.onnx"
    onnxlady.perturb(permuted, output=noisy, noise=0.5, seed=1, external_data=True)
    return reference, noisy


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls: dict[str, int] = {}
    real = twin_module._moved_array

    def counted(tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]]) -> np.ndarray:
        calls[tensor.name] = calls.get(tensor.name, 0) + 1
        return real(tensor, axes)

    monkeypatch.setattr(twin_module, "_moved_array", counted)
    return calls


def test_written_twin_moves_each_tensor_once_and_keeps_the_digest(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, suspect = pair
    loaded = onnxlady.resync(onnx.load(reference), onnx.load(suspect))
    calls = _counting(monkeypatch)
    mapped = onnxlady.resync(reference, suspect, output=tmp_path / "o.onnx", key_out=tmp_path / "o.key.json")
    assert calls and set(calls.values()) == {1}, calls  # hashed for the key as the writer computed it
    assert mapped.key.source_weights_sha256 == loaded.key.source_weights_sha256 != ""
    written: dict[str, Any] = json.loads((tmp_path / "o.key.json").read_text())
    assert written["source"]["weights_sha256"] == loaded.key.source_weights_sha256


def test_digest_read_before_any_tensor_computes_them(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    reference, suspect = pair
    loaded = onnxlady.resync(onnx.load(reference), onnx.load(suspect))
    calls = _counting(monkeypatch)
    mapped = onnxlady.resync(reference, suspect)
    assert not calls  # nothing moved until something asks
    assert mapped.key.source_weights_sha256 == loaded.key.source_weights_sha256
    assert calls and set(calls.values()) == {1}


def test_audit_of_inline_twin_moves_each_tensor_once_per_pass(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inline files are read as views (weights left in the file): the audit keeps each moved
    # tensor it computes for its comparisons, so the key's digest must not have computed any of
    # them before. The last classification of the change computes each once more: the kept
    # arrays are released before it, so its work arrays do not come on top of them (peak memory).
    reference, suspect = (tmp_path / "ref.onnx", tmp_path / "sus.onnx")
    for source, target in zip(pair, (reference, suspect)):
        onnx.save(onnx.load(source), target)
    calls = _counting(monkeypatch)
    report = onnxlady.audit(reference, suspect)
    assert report.verdict == "perturbed"
    assert calls and max(calls.values()) == 2, calls
