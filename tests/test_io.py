"""onnxlady._io._files: loading refuses anything that is not a whole ONNX model, saving is atomic.

Every failure must be an :class:`OnnxladyError` (never a silently different model), external
data is resolved against the model's own folder, and a failed save leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxlady._io._files as io_module
from onnxlady import analyze, draw_permutations, permute_model
from onnxlady._errors import OnnxladyError
from onnxlady._io._files import load_model, save_model
from onnxlady.cli import main


# -- helpers ------------------------------------------------------------------------------
def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and wa[name].tobytes() == wb[name].tobytes(), name


def no_external_left(model: onnx.ModelProto) -> bool:
    return all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def save_external(model: onnx.ModelProto, path: Path, location: str = "w.data") -> Path:
    """Save with every initializer in one external file ``location`` beside ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path.parent / location


def top_level_field_ends(data: bytes) -> list[int]:
    """Byte offsets at which each top-level protobuf field of a serialised message ends."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    ends, pos = [], 0
    while pos < len(data):
        tag, pos = varint(pos)
        wire = tag & 7
        if wire == 0:
            _, pos = varint(pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = varint(pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:  # pragma: no cover - groups are not used by ONNX
            raise AssertionError(f"unexpected wire type {wire}")
        ends.append(pos)
    return ends


#: save_model returns the file's sha256 (newer versions only when asked with ``digest=True``).
WITH_DIGEST = {"digest": True} if "digest" in inspect.signature(save_model).parameters else {}


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# -- not ONNX at all ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    [
        pytest.param(np.random.default_rng(0).bytes(4096), id="random-bytes"),
        pytest.param(json.dumps({"format": "onnx", "graph": {"node": [1, 2, 3]}}).encode(), id="json"),
        pytest.param(b"", id="empty"),
        pytest.param(b"ir_version: 8\nproducer_name: 'x'\n", id="text-proto"),
    ],
)
def test_load_rejects_files_that_are_not_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxladyError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_load_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(OnnxladyError, match="no such file"):
        load_model(tmp_path / "absent.onnx")
    with pytest.raises(OnnxladyError, match="folder"):
        load_model(tmp_path)


def test_load_reports_hash_size_and_no_external_data(model_file) -> None:
    path = model_file("vgg")
    loaded = load_model(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.size_bytes == path.stat().st_size
    assert loaded.external_data is False
    assert_same_weights(loaded.model, onnx.load(str(path)))


# -- truncated model files ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["vgg", "matmul_mlp", "custom_op"])
@pytest.mark.parametrize("cut", ["10%", "50%", "90%", "-1 byte"])
def test_truncated_model_is_refused(model_file, tmp_path: Path, name: str, cut: str) -> None:
    data = model_file(name).read_bytes()
    size = len(data) - 1 if cut == "-1 byte" else len(data) * int(cut[:-1]) // 100
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:size])
    with pytest.raises(OnnxladyError):
        load_model(path)


def test_truncated_at_every_top_level_field_boundary_is_refused(model_file, tmp_path: Path) -> None:
    """A cut that falls exactly between two fields still parses as protobuf; it must be caught."""
    data = model_file("vgg").read_bytes()
    path = tmp_path / "cut.onnx"
    for end in top_level_field_ends(data)[:-1]:
        path.write_bytes(data[:end])
        with pytest.raises(OnnxladyError):
            load_model(path)
            pytest.fail(f"a file cut at byte {end} of {len(data)} loaded as a model")


def test_truncation_dropping_an_opset_import_is_refused(model_file, tmp_path: Path) -> None:
    data = model_file("custom_op").read_bytes()
    model = onnx.load_from_string(data)
    assert len(model.opset_import) == 2
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: top_level_field_ends(data)[-2]])
    with pytest.raises(OnnxladyError):
        loaded = load_model(path)
        pytest.fail(f"loaded with opsets {[(o.domain, o.version) for o in loaded.model.opset_import]}")


# -- external data ------------------------------------------------------------------------
@pytest.fixture
def external_model(saved_models, tmp_path: Path) -> tuple[Path, Path, onnx.ModelProto]:
    """Vgg saved as ext/m.onnx + ext/w.data; returns (model path, data path, original model)."""
    original = onnx.load(str(saved_models["vgg"]))
    model_path = tmp_path / "ext" / "m.onnx"
    data_path = save_external(onnx.load(str(saved_models["vgg"])), model_path)
    return model_path, data_path, original


def test_load_external_data(external_model) -> None:
    model_path, data_path, original = external_model
    assert data_path.stat().st_size > model_path.stat().st_size
    loaded = load_model(model_path)
    assert loaded.external_data is True
    assert no_external_left(loaded.model)
    assert_same_weights(loaded.model, original)


def test_external_data_resolved_against_model_folder(external_model, tmp_path: Path, monkeypatch) -> None:
    model_path, _, original = external_model
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "w.data").write_bytes(b"decoy: must never be read")
    monkeypatch.chdir(elsewhere)
    for given in (model_path, Path(os.path.relpath(model_path, elsewhere))):
        loaded = load_model(given)
        assert_same_weights(loaded.model, original)


def test_external_data_file_missing(external_model) -> None:
    model_path, data_path, _ = external_model
    data_path.unlink()
    with pytest.raises(OnnxladyError, match=r"w.data"):
        load_model(model_path)


@pytest.mark.parametrize("keep", ["-1 byte", "half", "empty"])
def test_external_data_file_truncated(external_model, keep: str) -> None:
    model_path, data_path, _ = external_model
    data = data_path.read_bytes()
    data_path.write_bytes({"-1 byte": data[:-1], "half": data[: len(data) // 2], "empty": b""}[keep])
    with pytest.raises(OnnxladyError) as info:
        load_model(model_path)
    assert "\n" not in str(info.value)


def test_external_data_outside_model_folder_refused(saved_models, tmp_path: Path) -> None:
    model = onnx.load(str(saved_models["vgg"]))
    model_path = tmp_path / "inner" / "m.onnx"
    save_external(model, model_path)
    raw = onnx.load(str(model_path), load_external_data=False)
    for tensor in raw.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.data"
    shutil.move(str(model_path.parent / "w.data"), str(tmp_path / "w.data"))
    model_path.write_bytes(raw.SerializeToString())
    with pytest.raises(OnnxladyError, match="outside"):
        load_model(model_path)


# -- saving -------------------------------------------------------------------------------
def test_save_into_missing_folder(model_file, tmp_path: Path) -> None:
    model = load_model(model_file("vgg")).model
    for external in (False, True):
        with pytest.raises(OnnxladyError, match="does not exist"):
            save_model(model, tmp_path / "missing" / "out.onnx", external_data=external)
    assert not (tmp_path / "missing").exists()


def test_save_returns_sha_of_written_file(model_file, out_dir: Path) -> None:
    model = load_model(model_file("vgg")).model
    target = out_dir / "out.onnx"
    digest = save_model(model, target, **WITH_DIGEST)
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest()
    assert listing(out_dir) == ["out.onnx"]
    assert_same_weights(load_model(target).model, model)


def test_atomic_write_failure_leaves_nothing(model_file, out_dir: Path, request) -> None:
    model = load_model(model_file("vgg")).model
    request.getfixturevalue("disk_full")
    with pytest.raises((OSError, OnnxladyError)):
        save_model(model, out_dir / "out.onnx")
    assert listing(out_dir) == []


def test_atomic_write_failure_keeps_previous_output(model_file, out_dir: Path, request) -> None:
    model = load_model(model_file("vgg")).model
    target = out_dir / "out.onnx"
    target.write_bytes(b"previous content")
    request.getfixturevalue("disk_full")
    with pytest.raises((OSError, OnnxladyError)):
        save_model(model, target)
    assert listing(out_dir) == ["out.onnx"]
    assert target.read_bytes() == b"previous content"


def test_external_save_failure_leaves_nothing(model_file, out_dir: Path, monkeypatch) -> None:
    import onnxlady._io._outputs as outputs_module  # the writer the output set calls

    model = load_model(model_file("vgg")).model
    real_write = outputs_module.write_external

    def write_then_fail(proto, path, data_path, *args, **kwargs):
        real_write(proto, path, data_path, *args, **kwargs)
        with open(path, "r+b") as handle:  # half a model file, and its data file, then the disk is full
            handle.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs_module, "write_external", write_then_fail)
    with pytest.raises((OSError, OnnxladyError)):
        save_model(model, out_dir / "out.onnx", external_data=True)
    assert listing(out_dir) == []


def test_external_save_failure_at_final_rename_leaves_nothing(model_file, out_dir: Path, monkeypatch) -> None:
    model = load_model(model_file("vgg")).model
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", replace)
    with pytest.raises((OSError, OnnxladyError)):
        save_model(model, out_dir / "out.onnx", external_data=True)
    assert listing(out_dir) == []


def test_permute_and_save_preserve_ir_version_and_opsets(model_file, out_dir: Path) -> None:
    path = model_file("vgg")
    source = onnx.load(str(path))
    source.ir_version = 9  # not the builder's default, so a reset to any default shows
    source.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 3))
    path.write_bytes(source.SerializeToString())
    loaded = load_model(path)
    analysis = analyze(loaded.model)
    permute_model(analysis, draw_permutations(analysis, 1))
    for external in (False, True):
        target = out_dir / f"out_{external}.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(loaded.model)
        save_model(copy, target, external_data=external)
        saved = onnx.load(str(target), load_external_data=False)
        assert saved.ir_version == 9
        assert sorted((o.domain, o.version) for o in saved.opset_import) == [("", 17), ("ai.onnx.ml", 3)]


def test_external_data_save_round_trip(model_file, out_dir: Path) -> None:
    original = load_model(model_file("vgg")).model
    target = out_dir / "out.onnx"
    digest = save_model(onnx.load(str(model_file("vgg"))), target, external_data=True, **WITH_DIGEST)
    assert listing(out_dir) == ["out.onnx", "out.onnx.data"]
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest()
    assert target.stat().st_size < (out_dir / "out.onnx.data").stat().st_size
    loaded = load_model(target)
    assert loaded.external_data is True
    assert_same_weights(loaded.model, original)


def test_external_save_leaves_the_in_memory_model_alone(model_file, out_dir: Path) -> None:
    model = load_model(model_file("vgg")).model
    before = model.SerializeToString()
    save_model(model, out_dir / "out.onnx", external_data=True)
    assert no_external_left(model)
    assert model.SerializeToString() == before


def test_cli_external_data_output_round_trip(model_file, out_dir: Path, capsys) -> None:
    source = model_file("vgg")
    original = onnx.load(str(source))
    permuted = out_dir / "p.onnx"
    assert main(["permute", str(source), "-o", str(permuted), "--external-data", "--seed", "3"]) == 0
    assert listing(out_dir) == ["p.onnx", "p.onnx.data", "p.onnx.key.json"]
    raw = onnx.load(str(permuted), load_external_data=False)
    assert not no_external_left(raw)
    assert load_model(permuted).external_data is True
    restored = out_dir / "u.onnx"
    assert main(["unpermute", str(permuted), "--key", str(out_dir / "p.onnx.key.json"), "-o", str(restored)]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert (out_dir / "u.onnx.data").exists()  # loaded from external data: saved with external data
    assert_same_weights(load_model(restored).model, original)


def test_cli_model_loaded_from_external_data_is_saved_with_external_data(
    external_model, out_dir: Path, capsys
) -> None:
    model_path, data_path, original = external_model
    before = (model_path.read_bytes(), data_path.read_bytes())
    target = out_dir / "p.onnx"
    assert main(["permute", str(model_path), "-o", str(target), "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert listing(out_dir) == ["p.onnx", "p.onnx.data", "p.onnx.key.json"]
    raw = onnx.load(str(target), load_external_data=False)
    locations = {e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"p.onnx.data"}
    assert (model_path.read_bytes(), data_path.read_bytes()) == before
    restored = out_dir / "u.onnx"
    assert main(["unpermute", str(target), "--key", str(out_dir / "p.onnx.key.json"), "-o", str(restored)]) == 0
    assert_same_weights(load_model(restored).model, original)
