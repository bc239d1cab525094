"""External data kept in its files: memory-mapped reads, streamed writes, bounded memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxlady
from fixtures import FIXTURES, save_large_external_model
from onnxlady._io._external import INLINE_BYTES, has_mapped, is_mapped, mapped_array, write_external
from onnxlady._io._files import load_model
from onnxlady._io._tensors import read_array, tensor_holders
from onnxlady.cli import main
from onnxlady.testing import permute_producer_only


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {name: np.array(read_array(t, name)) for name, t in tensor_holders(model).items()}


@pytest.fixture(scope="module")
def external_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("external") / "big.onnx"
    save_large_external_model(path, 8)
    return path


def test_mapped_tensors_read_the_same_values(external_model: Path) -> None:
    loaded = onnx.load(external_model)
    mapped = load_model(external_model, map_external=True).model
    assert has_mapped(mapped)
    big = [t for t in mapped.graph.initializer if is_mapped(t)]
    assert big and all(not t.raw_data for t in big)  # nothing of them was read into the model
    small = [t for t in mapped.graph.initializer if not is_mapped(t)]
    assert small and all(len(t.raw_data) < INLINE_BYTES for t in small)
    expected = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    for name, values in _values(mapped).items():
        assert np.array_equal(values, expected[name]), name
    array = mapped_array(big[0])
    assert isinstance(array.base, np.memmap) or isinstance(array, np.memmap)
    with pytest.raises(ValueError):  # read only: the source file can never be changed through it
        array[(0,) * array.ndim] = 1


def test_truncated_data_file_is_refused(external_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "big.onnx"
    copy.write_bytes(external_model.read_bytes())
    data = external_model.with_name("big.onnx.data").read_bytes()
    (tmp_path / "big.onnx.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(onnxlady.OnnxladyError, match=r"truncated|beyond the end|needs"):
        load_model(copy, map_external=True)


@pytest.mark.parametrize("source", ["mapped", "inline"])
def test_streamed_external_write_round_trips(external_model: Path, tmp_path: Path, source: str) -> None:
    model = load_model(external_model, map_external=True).model if source == "mapped" else onnx.load(external_model)
    before = model.SerializeToString()
    first = model.graph.initializer[0]
    replaced = -numpy_helper.to_array(onnx.load(external_model).graph.initializer[0])
    write_external(model, tmp_path / "out.onnx", tmp_path / "out.onnx.data", {first.name: replaced})
    assert model.SerializeToString() == before  # the model in memory is not changed
    written = onnx.load(tmp_path / "out.onnx")
    expected = {t.name: numpy_helper.to_array(t) for t in onnx.load(external_model).graph.initializer}
    expected[first.name] = replaced
    got = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    stored = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}  # relative: no absolute path of a mapped source leaks out


def test_permute_and_unpermute_of_external_data_stream(external_model: Path, tmp_path: Path) -> None:
    permuted, restored = tmp_path / "p.onnx", tmp_path / "u.onnx"
    assert main(["permute", str(external_model), "-o", str(permuted), "--seed", "3", "--quiet", "--json"]) == 0
    assert main(["verify", str(external_model), str(permuted), "--provider", "cpu", "--quiet", "--json"]) == 0
    # The eager route (weights loaded) gives the same file contents as the mapped one.
    eager = onnxlady.permute(onnx.load(external_model), seed=3).model
    streamed = onnx.load(permuted)
    assert {k: v.tobytes() for k, v in _values(eager).items()} == {k: v.tobytes() for k, v in _values(streamed).items()}
    key = f"{permuted}.key.json"
    assert main(["unpermute", str(permuted), "--key", key, "-o", str(restored), "--quiet", "--json"]) == 0
    result = onnxlady.unpermute(permuted, key, output=tmp_path / "u2.onnx")
    assert result.weights_identical_to_source and has_mapped(result.model)
    original, back = _values(onnx.load(external_model)), _values(onnx.load(restored))
    assert all(np.array_equal(original[k], back[k]) for k in original)
    # A wrong permutation (one producer's rows only) is caught by the same check.
    wrong = onnx.load(external_model)
    permute_producer_only(wrong, onnxlady.analyze(wrong))
    onnx.save(wrong, tmp_path / "wrong.onnx")
    assert main(["verify", str(external_model), str(tmp_path / "wrong.onnx"), "--provider", "cpu", "--quiet", "--json"]) == 1


def test_max_memory_refused_up_front(external_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inline = tmp_path / "inline.onnx"
    onnx.save(FIXTURES["vgg"](0), inline)
    out = tmp_path / "out.onnx"
    assert main(["permute", str(inline), "-o", str(out), "--max-memory", "1M", "--quiet"]) == 2
    assert "max_memory" in capsys.readouterr().err and not out.exists()
    assert main(["audit", str(inline), str(inline), "--max-memory", "10M", "--quiet"]) == 2
    assert main(["permute", str(inline), "-o", str(out), "--max-memory", "8G", "--quiet", "--json"]) == 0
    assert main(["permute", str(inline), "-o", str(out), "--max-memory", "lots", "--quiet"]) == 2
    # External weights stay in their files: the budget follows the largest tensor, not the model.
    budget = str(256 << 20)
    assert main(["permute", str(external_model), "-o", str(tmp_path / "e.onnx"), "--max-memory", budget, "--quiet", "--json"]) == 0
    with pytest.raises(onnxlady.OnnxladyError, match="max_memory"):
        onnxlady.resync(external_model, tmp_path / "e.onnx", max_memory=1 << 20)


@pytest.mark.parametrize("name", ["vgg", "resnet", "bert_like", "if_branch"])
def test_streamed_write_is_onnx_save_byte_for_byte(name: str, tmp_path: Path) -> None:
    """Same files as onnx.save with external data (so a round trip can give the source's bytes)."""
    onnx.save(
        FIXTURES[name](0), tmp_path / "a.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
        location="a.onnx.data", size_threshold=1024,
    )  # fmt: skip
    write_external(FIXTURES[name](0), tmp_path / "b.onnx", tmp_path / "b.onnx.data", location="a.onnx.data")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()
