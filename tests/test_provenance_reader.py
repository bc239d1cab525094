"""The fast paths of fingerprinting: the wire reader, batches of files, the hash only when needed.

Each fast path must give the fingerprint the plain one gives (``fingerprint_model`` of
``onnx.load``), bit for bit: an index built in batches, from skimmed files, holds what a suspect
read alone is compared against.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import FIXTURES, build_large_model
from fixtures.conversions import quantize_qdq, to_float16
from onnxlady._provenance._fingerprint import (
    LAYER_WIDTH,
    ModelFingerprint,
    fingerprint_model,
    fingerprints_of,
    model_producers,
    resample,
    search_vector,
    search_vectors,
    segment_resample,
)
from onnxlady._provenance._index import _batches, _Task, build_index, list_models
from onnxlady._provenance._read import SKIM_BYTES, fingerprint_file, fingerprint_files
from onnxlady._provenance._wire import read_weights


def _skim_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


@pytest.mark.parametrize("name", ["vgg", "resnet", "matmul_mlp", "tied_lm_head", "lstm_head", "grouped_conv"])
def test_wire_reader_gives_every_initializer_as_onnx_does(name: str) -> None:
    model = FIXTURES[name](0)
    data = _skim_bytes(model)
    skimmed = read_weights(data)
    assert skimmed.arrays, "raw float initializers are read as views"
    for tensor in model.graph.initializer:
        expected = onnx.numpy_helper.to_array(tensor)
        if tensor.name in skimmed.arrays:
            got = skimmed.arrays[tensor.name]
            assert got.dtype == expected.dtype and np.array_equal(got, expected), tensor.name
            assert not got.flags.writeable
    # The skeleton is the model without those bytes: same nodes, names, types and dimensions.
    assert skimmed.model.graph.node == model.graph.node
    for kept, original in zip(skimmed.model.graph.initializer, model.graph.initializer):
        assert (kept.name, kept.data_type, list(kept.dims)) == (original.name, original.data_type, list(original.dims))
        assert not kept.raw_data or kept.name not in skimmed.arrays


def test_wire_reader_leaves_other_storage_to_protobuf() -> None:
    """float_data, external data and packed types stay in the skeleton; a truncated file is refused."""
    model = FIXTURES["matmul_mlp"](0)
    typed = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(typed)
    typed.ClearField("raw_data")
    typed.float_data.extend(values.ravel().tolist())
    skimmed = read_weights(model.SerializeToString())
    assert typed.name not in skimmed.arrays
    kept = next(t for t in skimmed.model.graph.initializer if t.name == typed.name)
    assert np.array_equal(onnx.numpy_helper.to_array(kept), values)
    data = FIXTURES["vgg"](0).SerializeToString()
    with pytest.raises(ValueError, match="truncated"):
        read_weights(data[: len(data) // 2])


def test_an_initializer_named_twice_reads_as_the_last_one() -> None:
    """Graph readers keep the last of two initializers of one name; so do the views."""
    model = FIXTURES["matmul_mlp"](0)
    first = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(first)
    for copies in (1, 2):
        twice = onnx.ModelProto()
        twice.CopyFrom(model)
        for number in range(copies):
            twice.graph.initializer.append(
                onnx.numpy_helper.from_array((values * (number + 2.0)).astype(values.dtype), first.name)
            )
        skimmed = read_weights(twice.SerializeToString())
        last = {t.name: t for t in skimmed.model.graph.initializer}[first.name]
        read = skimmed.arrays.get(first.name)
        got = read if read is not None else onnx.numpy_helper.to_array(last)
        assert np.array_equal(got, values * (copies + 1.0))
        whole = functools.partial(copy.deepcopy, twice)  # the full model, should a ModelGraph need it
        assert fingerprint_model(twice).to_bytes() == fingerprints_of(
            [model_producers(skimmed.model, skimmed.arrays, whole)]
        )[0].to_bytes()


def test_a_wrong_reading_is_caught() -> None:
    """The comparison above can fail: a view one element off is not the initializer."""
    model = FIXTURES["vgg"](0)
    tensor = next(t for t in model.graph.initializer if len(t.raw_data) > 64)
    skimmed = read_weights(model.SerializeToString())
    shifted = np.frombuffer(tensor.raw_data[4:] + b"\0\0\0\0", dtype=np.float32).reshape(tuple(tensor.dims))
    assert not np.array_equal(shifted, skimmed.arrays[tensor.name])


@pytest.mark.parametrize(
    "make",
    [
        lambda: build_large_model(2),
        lambda: quantize_qdq(build_large_model(6)),
        lambda: to_float16(build_large_model(3)),
    ],
    ids=["float32", "qdq", "float16"],
)
def test_skimmed_large_file_fingerprints_as_loaded(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "large.onnx"
    onnx.save(make(), path)
    assert path.stat().st_size >= SKIM_BYTES  # read by the wire reader
    result = fingerprint_file(str(path))
    assert not result.error
    assert result.fingerprint == fingerprint_model(onnx.load(path)).to_bytes()
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fingerprint_file(str(path), digest=False).sha256 == ""


def test_batches_of_files_fingerprint_as_each_alone(tmp_path: Path) -> None:
    paths: list[str] = []
    for name in ("vgg", "resnet", "mobilenet", "encoder_prenorm", "conv_transpose", "shufflenet_v2"):
        onnx.save(FIXTURES[name](0), tmp_path / f"{name}.onnx")
        paths.append(str(tmp_path / f"{name}.onnx"))
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07 not a model" * 20)
    paths.insert(2, str(tmp_path / "broken.onnx"))
    together = fingerprint_files(paths, digest=[i % 2 == 0 for i in range(len(paths))])
    assert "not an ONNX model" in together[2].error
    for number, (name, result) in enumerate(zip(paths, together)):
        alone = fingerprint_file(name)
        assert result.path == name and result.error == alone.error
        assert result.fingerprint == alone.fingerprint and result.vector == alone.vector
        assert result.sha256 == (alone.sha256 if number % 2 == 0 else "")


def test_segment_resample_is_the_same_alone_and_in_a_batch() -> None:
    rng = np.random.default_rng(5)
    lengths = np.array([1, 3, 16, 17, 300, 2, 4096, 33])
    values = rng.standard_normal((int(lengths.sum()), 6)) * 100.0
    together = segment_resample(values, lengths)
    start = 0
    for number, length in enumerate(lengths.tolist()):
        block = values[start : start + length]
        assert np.array_equal(segment_resample(block, np.array([length]))[0], together[number])
        np.testing.assert_allclose(together[number], resample(block), rtol=1e-12, atol=1e-9)
        start += length


def test_models_reduced_together_keep_their_own_records() -> None:
    models = [FIXTURES[name](seed) for name in ("vgg", "resnet", "matmul_mlp") for seed in (0, 1)]
    together = fingerprints_of([model_producers(model) for model in models])
    for model, fingerprint in zip(models, together):
        assert fingerprint.to_bytes() == fingerprint_model(model).to_bytes()


def test_search_vectors_of_a_batch_are_those_of_each_alone() -> None:
    """An index stores batched search vectors; a suspect's is computed alone: they must be equal, bit for bit."""
    models = [FIXTURES[name](seed) for name in ("vgg", "resnet", "matmul_mlp", "encoder_prenorm") for seed in (0, 1)]
    fingerprints = fingerprints_of([model_producers(model) for model in models])
    fingerprints.insert(3, ModelFingerprint(np.zeros((0, LAYER_WIDTH), np.float32), np.zeros((0, 4), np.int64), (), ()))
    alone = np.stack([search_vector(fingerprint) for fingerprint in fingerprints])
    for size in (1, 3, len(fingerprints)):
        together = np.concatenate(
            [search_vectors(fingerprints[start : start + size]) for start in range(0, len(fingerprints), size)]
        )
        assert together.dtype == np.float32 and together.view(np.uint32).tolist() == alone.view(np.uint32).tolist()
    # The comparison can fail: the vectors of other models are not these.
    assert not np.array_equal(search_vectors(fingerprints[::-1]), alone)
    assert search_vectors([]).shape == (0, alone.shape[1])


def test_tasks_are_batched_by_count_and_size() -> None:
    todo = [_Task(f"m{i}.onnx", 1000) for i in range(100)] + [_Task("big.onnx", 40 << 20), _Task("m.onnx", 10)]
    batches = _batches(todo, 2)
    assert [t.path for batch in batches for t in batch] == [t.path for t in todo]  # order kept
    assert max(len(batch) for batch in batches) <= 13  # 102 files over 2 workers x 4 tasks
    assert [t.path for t in next(b for b in batches if any(t.path == "big.onnx" for t in b))] == ["big.onnx"]
    assert len(_batches(todo[:3], 2)) == 3  # few files: one per task


def test_hash_only_once_a_file_is_touched(tmp_path: Path) -> None:
    """A first build stores no sha256; a touch re-reads the file once and keeps its hash."""
    registry = tmp_path / "registry"
    registry.mkdir()
    for name in ("vgg", "resnet"):
        onnx.save(FIXTURES[name](0), registry / f"{name}.onnx")
    index = tmp_path / "r.idx"
    build_index([registry], index, workers=1)
    assert {m.sha256 for m in list_models(index)} == {""}
    vgg = registry / "vgg.onnx"
    for step in (1, 2):  # first by fingerprint (no hash yet), then by hash
        os.utime(vgg, ns=(vgg.stat().st_atime_ns, vgg.stat().st_mtime_ns + step * 10**9))
        report = build_index([registry], index, workers=1)
        assert report.touched == [str(vgg)] and report.indexed == []
        row = next(m for m in list_models(index) if m.path == str(vgg))
        assert row.sha256 == hashlib.sha256(vgg.read_bytes()).hexdigest()
        assert row.mtime_ns == vgg.stat().st_mtime_ns
    # Same size, new bytes, no hash stored: fingerprinted again, called indexed.
    resnet = registry / "resnet.onnx"
    model = onnx.load(resnet)
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.raw_data = (onnx.numpy_helper.to_array(tensor) * 2.0).astype(np.float32).tobytes()
    size = resnet.stat().st_size
    onnx.save(model, resnet)
    assert resnet.stat().st_size == size
    report = build_index([registry], index, workers=1)
    assert report.indexed == [str(resnet)] and report.touched == []
