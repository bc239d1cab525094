"""Inline weights read as views of the .onnx file: never copied, written back byte for byte."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxlady
from fixtures.large import build_large_model
from onnxlady._io import _external
from onnxlady._io._external import INLINE_BYTES, has_mapped, is_mapped, is_view, load_mapped, mapped_array
from onnxlady._io._files import load_model, save_model
from onnxlady._io._tensors import read_array, tensor_holders
from onnxlady.cli import main
from onnxlady.testing import permute_producer_only


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {name: np.array(read_array(t, name)) for name, t in tensor_holders(model).items()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inline_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inline") / "big.onnx"
    onnx.save(build_large_model(2), path)
    return path


def _as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer moved into a Constant node (as Paddle exports weights)."""
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(constants + nodes)
    return model


@pytest.fixture(scope="module")
def constant_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("constants") / "constants.onnx"
    model = _as_constants(build_large_model(2))
    for node in model.graph.node[:2]:
        node.attribute[0].t.data_location = onnx.TensorProto.DEFAULT  # an explicit DEFAULT must survive
    onnx.save(model, path)
    return path


def _full_load(path: str | os.PathLike[str], **options: bool) -> object:
    """``load_model`` with no views whatever the caller asks: HEAD's way, the reference for outputs."""
    return load_model(path, **{**options, "map_inline": False})


def test_large_inline_tensors_are_views_not_copies(inline_model: Path) -> None:
    mapped = load_model(inline_model, map_external=True).model
    views = [t for t in mapped.graph.initializer if is_view(t)]
    assert views and all(not t.raw_data for t in views)  # nothing of them was read into the model
    assert all(len(t.raw_data) < INLINE_BYTES for t in mapped.graph.initializer if not is_view(t))
    assert has_mapped(mapped) and not _external.has_mapped_external(mapped)
    expected = _values(onnx.load(inline_model))
    got = _values(mapped)
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    array = mapped_array(views[0])
    assert isinstance(array, np.memmap) or isinstance(array.base, np.memmap)
    with pytest.raises(ValueError):  # read only: the source file can never be changed through it
        array[(0,) * array.ndim] = 1
    # Without map_external (or with map_inline=False) the model is what onnx.load gives.
    for plain in (load_model(inline_model).model, load_model(inline_model, map_external=True, map_inline=False).model):
        assert not has_mapped(plain) and plain.SerializeToString() == onnx.load(inline_model).SerializeToString()


def test_read_in_views_give_the_loaded_model(inline_model: Path, constant_model: Path) -> None:
    for path in (inline_model, constant_model):
        mapped = load_model(path, map_external=True).model
        assert any(is_view(t) for t in tensor_holders(mapped).values())
        assert load_mapped(mapped).SerializeToString() == onnx.load(path).SerializeToString()


def test_constant_values_are_views_and_written_back_identically(constant_model: Path, tmp_path: Path) -> None:
    mapped = load_model(constant_model, map_external=True).model
    values = [a.t for n in mapped.graph.node if n.op_type == "Constant" for a in n.attribute]
    assert sum(is_view(t) for t in values) >= 3
    out = tmp_path / "out.onnx"
    save_model(mapped, out)
    assert out.read_bytes() == onnx.load(constant_model).SerializeToString()


@pytest.mark.parametrize("external_data", [False, True])
def test_written_model_is_the_fully_loaded_ones(inline_model: Path, tmp_path: Path, external_data: bool) -> None:
    mapped = load_model(inline_model, map_external=True).model
    before = mapped.SerializeToString()
    (tmp_path / "views").mkdir()
    (tmp_path / "full").mkdir()
    viewed, full = tmp_path / "views" / "m.onnx", tmp_path / "full" / "m.onnx"
    sha = save_model(mapped, viewed, external_data=external_data, digest=True)
    save_model(onnx.load(inline_model), full, external_data=external_data)
    assert mapped.SerializeToString() == before  # the model in memory is not changed
    assert viewed.read_bytes() == full.read_bytes() and sha == _sha(full)
    if external_data:
        assert Path(f"{viewed}.data").read_bytes() == Path(f"{full}.data").read_bytes()
    else:
        assert viewed.read_bytes() == inline_model.read_bytes()  # inline, as the file held it
    stored = onnx.load(viewed, load_external_data=False)
    locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations <= {"m.onnx.data"}  # no absolute path of the source leaks out


def _run_commands(source: Path, twin: Path, folder: Path) -> None:
    folder.mkdir()
    permuted, key = folder / "p.onnx", folder / "p.key.json"
    onnxlady.permute(source, output=permuted, seed=5, key_out=key)
    onnxlady.unpermute(permuted, key, output=folder / "u.onnx")
    onnxlady.perturb(source, output=folder / "n.onnx", noise=0.05, seed=2)
    result = onnxlady.resync(source, twin, output=folder / "r.onnx", key_out=folder / "r.key.json")
    (folder / "resync.json").write_text(repr(result.to_json()).replace(str(folder), "<out>"))
    audit = onnxlady.audit(source, twin)
    (folder / "audit.json").write_text(repr(audit.to_json()).replace(str(folder), "<out>"))


@pytest.fixture(scope="module")
def twin(inline_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("twin") / "twin.onnx"
    onnxlady.permute(inline_model, output=path, seed=11, key_out=path.with_name("twin.key.json"))
    return path


def test_command_outputs_are_byte_identical_to_a_full_load(
    inline_model: Path, twin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run_commands(inline_model, twin, tmp_path / "views")
    import onnxlady._api._sources as sources

    with monkeypatch.context() as patch:
        patch.setattr(sources, "load_model", _full_load)
        _run_commands(inline_model, twin, tmp_path / "full")
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "views").iterdir()) and len(names) == 8
    for name in names:
        assert (tmp_path / "views" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    # unpermute gives back the source file itself.
    assert (tmp_path / "views" / "u.onnx").read_bytes() == inline_model.read_bytes()


def test_permuted_model_is_equivalent_and_a_wrong_permutation_is_caught(inline_model: Path, tmp_path: Path) -> None:
    permuted = tmp_path / "p.onnx"
    assert main(["permute", str(inline_model), "-o", str(permuted), "--seed", "3", "--quiet", "--json"]) == 0
    assert permuted.read_bytes() != inline_model.read_bytes()
    outputs = _run(inline_model), _run(permuted)
    assert 1e-3 < float(np.abs(outputs[0]).max()) < 1e6  # outputs neither vanish nor explode
    assert main(["verify", str(inline_model), str(permuted), "--provider", "cpu", "--quiet", "--json"]) == 0
    wrong = onnx.load(inline_model)
    permute_producer_only(wrong, onnxlady.analyze(wrong))
    onnx.save(wrong, tmp_path / "wrong.onnx")
    assert main(["verify", str(inline_model), str(tmp_path / "wrong.onnx"), "--provider", "cpu", "--quiet", "--json"]) == 1


def _run(path: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    return np.asarray(session.run(None, {"input": feed})[0])


def test_output_written_over_its_input(inline_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(inline_model.read_bytes())
    expected = tmp_path / "expected.onnx"
    onnxlady.perturb(inline_model, output=expected, noise=0.1, seed=4)
    mapped = load_model(path, map_external=True).model
    before = _values(mapped)
    result = onnxlady.perturb(path, output=path, noise=0.1, seed=4, overwrite_input=True)
    assert result.output == path and path.read_bytes() == expected.read_bytes()
    # A model read from the file before it was replaced still reads the old bytes (the old inode).
    after = _values(mapped)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert load_mapped(mapped).SerializeToString() == onnx.load(inline_model).SerializeToString()


def test_a_replaced_file_is_never_read_for_an_old_view(
    inline_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(inline_model.read_bytes())
    mapped = load_model(path, map_external=True).model
    monkeypatch.setattr(_external, "_OPEN_VIEWS", 1)
    other = tmp_path / "other.onnx"
    other.write_bytes(inline_model.read_bytes())
    load_model(other, map_external=True)  # its views push the first file's handle out
    view = next(t for t in mapped.graph.initializer if is_view(t))
    expected = numpy_helper.to_array(next(t for t in onnx.load(inline_model).graph.initializer if t.name == view.name))
    assert np.array_equal(mapped_array(view), expected)  # reopened by path: the same file, so readable
    load_model(other, map_external=True)
    save_model(onnx.load(other), tmp_path / "new.onnx")
    os.replace(tmp_path / "new.onnx", path)  # now another file (inode) at the path
    with pytest.raises(onnxlady.OnnxladyError, match="changed since"):
        mapped_array(view)


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_file_refused_in_one_line(
    inline_model: Path, tmp_path: Path, cut: float, capsys: pytest.CaptureFixture[str]
) -> None:
    data = inline_model.read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(onnxlady.OnnxladyError) as mapped_error:
        load_model(broken, map_external=True)
    with pytest.raises(onnxlady.OnnxladyError) as full_error:
        load_model(broken)
    assert str(mapped_error.value) == str(full_error.value)  # the same refusal, the same words
    for command in (["inspect", str(broken)], ["resync", str(inline_model), str(broken), "-o", str(tmp_path / "o.onnx")]):
        assert main([*command, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_payload_shorter_than_its_shape_is_refused(inline_model: Path, tmp_path: Path) -> None:
    model = onnx.load(inline_model)
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    big.raw_data = big.raw_data[: len(big.raw_data) - 4]  # one float short: a damaged file
    broken = tmp_path / "short.onnx"
    onnx.save(model, broken)
    with pytest.raises(onnxlady.OnnxladyError, match="truncated or corrupt") as mapped_error:
        load_model(broken, map_external=True)
    with pytest.raises(onnxlady.OnnxladyError) as full_error:
        load_model(broken)
    assert str(mapped_error.value) == str(full_error.value)


def test_float_data_and_subgraph_tensors_stay_in_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((128, 256)).astype(np.float32)  # 128 KiB: large enough for a view
    typed = helper.make_tensor("typed", onnx.TensorProto.FLOAT, weight.shape, weight.reshape(-1).tolist())
    raw = numpy_helper.from_array(weight[::-1].copy(), "raw")
    inner = numpy_helper.from_array(weight * 2, "inner")
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "inner"], ["b"])], "branch", [],
        [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1, 256])], [inner],
    )  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "typed"], ["t"]),
            helper.make_node("MatMul", ["x", "raw"], ["r"]),
            helper.make_node("If", ["cond"], ["i"], then_branch=branch, else_branch=branch),
            helper.make_node("Sum", ["t", "r", "i"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 128]),
         helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256])],
        [typed, raw],
    )  # fmt: skip
    path = tmp_path / "mixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    mapped = load_model(path, map_external=True).model
    holders = {t.name: t for t in mapped.graph.initializer}
    assert is_view(holders["raw"]) and not is_mapped(holders["typed"]) and len(holders["typed"].float_data)
    subgraph = mapped.graph.node[2].attribute[0].g.initializer[0]
    assert not is_mapped(subgraph) and subgraph.raw_data
    out = tmp_path / "out.onnx"
    save_model(mapped, out)
    assert out.read_bytes() == path.read_bytes()
    assert np.array_equal(mapped_array(holders["raw"]), weight[::-1])
