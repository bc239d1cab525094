"""How resync builds and writes its output, and reads operands, without copies it does not need.

- a twin's output is the suspect with new bytes for the tensors that move: it is streamed to
  its file (no model copy), the file being byte for byte the built model's serialization, and
  ``ResyncResult.model`` builds it only when asked;
- :func:`stored_operand` gives what :func:`place_operand` writes into zeroed arrays, without
  them, for every whole operand of every fixture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import FIXTURES
from onnxlady import analyze, draw_permutations, permute_model, resync
from onnxlady._resync._entry import resync_model
from onnxlady._resync._sites import find_sites, place_operand, read_operand, stored_operand
from onnxlady._resync._values import Approx
from onnxlady.testing import copy_model


def _twin(name: str, seed: int = 3) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    reference = FIXTURES[name](0)
    suspect = copy_model(reference)
    analysis = analyze(suspect)
    permute_model(analysis, draw_permutations(analysis, seed))
    return reference, suspect


@pytest.mark.parametrize("name", ["vgg", "resnet", "matmul_mlp", "float16_convnet", "shared_initializer"])
def test_twin_output_is_streamed_and_built_only_when_asked(name: str) -> None:
    reference, suspect = _twin(name)
    before = suspect.SerializeToString()
    result = resync_model(reference, suspect)
    assert result.built is None and result.unbuilt is not None  # nothing copied yet
    source, overrides = result.unbuilt
    assert source is suspect and overrides
    built = result.model
    assert result.model is built and result.unbuilt is None  # built once
    assert suspect.SerializeToString() == before  # the suspect is never changed
    moved = {t.name: t.raw_data for t in built.graph.initializer if t.name in overrides}
    assert moved == {name: bytes(data) for name, data in overrides.items()}


@pytest.mark.parametrize("name", ["vgg", "resnet", "matmul_mlp", "float16_convnet"])
def test_streamed_file_is_the_built_models_bytes(name: str, tmp_path: Path) -> None:
    reference, suspect = _twin(name)
    paths = [tmp_path / "reference.onnx", tmp_path / "suspect.onnx"]
    for model, path in zip((reference, suspect), paths):
        onnx.save(model, path)
    streamed = resync(paths[0], paths[1], output=tmp_path / "streamed.onnx")
    assert streamed.details.unbuilt is not None  # written from the suspect, not from a copy
    expected = resync_model(reference, suspect).model.SerializeToString()
    assert (tmp_path / "streamed.onnx").read_bytes() == expected
    # Saved again after the model was built: the same file.
    streamed.save(tmp_path / "saved.onnx")
    assert (tmp_path / "saved.onnx").read_bytes() == expected


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_stored_operand_is_what_place_operand_writes(name: str) -> None:
    model = FIXTURES[name](0)
    analysis = analyze(model)
    graph = analysis.graph
    checked = 0
    for site in find_sites(graph, {plan.source for plan in analysis.tensors}):
        for operand in site.operands:
            value = read_operand(graph, operand)
            if value is None or value.value.shape != operand.shape:
                continue
            scaled = Approx(value.value * 3.0, np.broadcast_to(value.error, value.value.shape) * 3.0)
            for canonical in (value, scaled):
                whole = stored_operand(operand, canonical)
                if operand.nbits or operand.block is not None:
                    assert whole is None
                    continue
                assert whole is not None
                placed = [np.zeros(operand.read_shape), np.zeros(operand.read_shape)]
                place_operand(operand, canonical, placed[0], placed[1])
                for got, want in zip((whole.value, whole.error), placed):
                    assert got.dtype == np.float64 and got.flags.c_contiguous and got.flags.writeable
                    assert got.tobytes() == want.tobytes()  # bit for bit, signed zeros included
                checked += 1
    if name in ("vgg", "matmul_mlp", "resnet"):
        assert checked
