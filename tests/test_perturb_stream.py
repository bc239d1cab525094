"""``onnxlady.perturb`` to a file, streamed: each weight perturbed as the writer reaches it.

A model read from a file and written to one is never perturbed in memory as a whole
(:func:`onnxlady._transforms._perturb.perturb_streamed`): the written file must be byte for
byte what the in-memory route (:func:`perturb_model`, then a save) writes, with the same
report, whatever order the writer asks for the tensors in; external weights stay external.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlady
import onnxlady._api._perturb as api_module
from fixtures import FIXTURES
from onnxlady._errors import OnnxladyError
from onnxlady._io._files import load_model
from onnxlady._transforms._perturb import perturb_streamed

OPTIONS: list[dict[str, Any]] = [
    {"noise": 0.3, "seed": 5},
    {"prune": 30.0},
    {"quantize": 4},
    {"prune": 10.0, "quantize": 6, "noise": 0.1, "seed": 2},
]


def _in_memory(path: Path, output: Path, **options: Any) -> dict[str, Any]:
    """The in-memory route: the model loaded whole, perturbed in place, then saved."""
    external = bool(options.pop("external_data", False))
    result = onnxlady.perturb(onnx.load(path), **options)
    result.save(output, external_data=external or output.name.endswith("_ext.onnx"))
    return result.report.to_dict()


def _streamed(path: Path, output: Path, monkeypatch: pytest.MonkeyPatch, **options: Any) -> dict[str, Any]:
    """The file route, with the in-memory perturbation made to fail: it must not be used."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the file route perturbed the model in memory")

    with monkeypatch.context() as patch:
        if _raw_weights(path):  # else (typed fields) the in-memory route is the right one
            patch.setattr(api_module, "perturb_model", refuse)
        return onnxlady.perturb(path, output=output, **options).report.to_dict()


def _raw_weights(path: Path) -> bool:
    return perturb_streamed(load_model(path, map_external=True).model, noise=0.1) is not None


def _same_files(first: Path, second: Path) -> None:
    assert first.read_bytes() == second.read_bytes()
    data_first, data_second = Path(f"{first}.data"), Path(f"{second}.data")
    assert data_first.exists() == data_second.exists()
    if data_first.exists():
        assert data_first.read_bytes() == data_second.read_bytes()


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("name", ["resnet", "bert_like", "float16_convnet", "bfloat16_weights", "constant_weights"])
def test_streamed_file_is_the_in_memory_one(
    name: str, options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(FIXTURES[name](0), source)
    assert _raw_weights(source) == (name != "bfloat16_weights")  # it keeps bfloat16 in int32_data
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    expected = _in_memory(source, tmp_path / "a" / "out.onnx", **options)
    assert _streamed(source, tmp_path / "b" / "out.onnx", monkeypatch, **options) == expected
    _same_files(tmp_path / "a" / "out.onnx", tmp_path / "b" / "out.onnx")
    assert not (tmp_path / "b" / "out.onnx.data").exists()


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[3]])
@pytest.mark.parametrize("name", ["resnet", "bert_like", "float16_convnet"])
def test_external_data_stays_external(
    name: str, options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every tensor external in the input (``size_threshold=0``): the same files as a whole load gives."""
    source = tmp_path / "model.onnx"
    onnx.save(FIXTURES[name](0), source, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)  # fmt: skip
    assert _raw_weights(source)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    expected = _in_memory(source, tmp_path / "a" / "out.onnx", external_data=True, **options)
    assert _streamed(source, tmp_path / "b" / "out.onnx", monkeypatch, **options) == expected
    _same_files(tmp_path / "a" / "out.onnx", tmp_path / "b" / "out.onnx")
    written = onnx.load(tmp_path / "b" / "out.onnx", load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer)
    locations = {e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}  # never the input's file, never an absolute path


def _chain(weights: list[np.ndarray], reverse: bool) -> onnx.ModelProto:
    """X -> MatMul(W0) -> MatMul(W1) ...; initializers listed backwards when ``reverse``."""
    nodes, current = [], "x"
    for k in range(len(weights)):
        nodes.append(helper.make_node("MatMul", [current, f"W{k}"], [f"y{k}"]))
        current = f"y{k}"
    inits = [numpy_helper.from_array(w.astype(np.float32), f"W{k}") for k, w in enumerate(weights)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, weights[0].shape[0]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [2, weights[-1].shape[1]])],
        initializer=inits[::-1] if reverse else inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("external_data", [False, True])
def test_writer_order_other_than_graph_order(
    external_data: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Initializers listed backwards: the noise is still drawn in graph order (same bytes)."""
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(64, 64)) for _ in range(5)]
    source = tmp_path / "chain.onnx"
    onnx.save(_chain(weights, reverse=True), source)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    options = {"noise": 0.5, "seed": 7, "external_data": external_data}
    expected = _in_memory(source, tmp_path / "a" / "out.onnx", **options)
    assert _streamed(source, tmp_path / "b" / "out.onnx", monkeypatch, **options) == expected
    _same_files(tmp_path / "a" / "out.onnx", tmp_path / "b" / "out.onnx")
    # The order matters: drawing in the writer's order would give other values.
    forward = tmp_path / "forward.onnx"
    onnx.save(_chain(weights, reverse=False), forward)
    onnxlady.perturb(forward, output=tmp_path / "f.onnx", noise=0.5, seed=7)
    result = onnxlady.perturb(source, output=tmp_path / "r.onnx", noise=0.5, seed=7)
    values = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    forward_values = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "f.onnx").graph.initializer}
    assert all(np.array_equal(values[name], forward_values[name]) for name in values)


def test_result_model_is_read_back_from_the_file(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(FIXTURES["resnet"](0), source)
    result = onnxlady.perturb(source, output=tmp_path / "out.onnx", noise=0.2)
    assert result.model.SerializeToString() == onnx.load(tmp_path / "out.onnx").SerializeToString()
    assert json.loads(json.dumps(result.to_json()))["output"] == str(tmp_path / "out.onnx")


def test_non_finite_weight_writes_nothing(tmp_path: Path) -> None:
    """A NaN found while streaming: the in-memory route's error, and no output file at all."""
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=(8, 8)) for _ in range(3)]
    weights[1][2, 3] = np.nan
    source = tmp_path / "chain.onnx"
    onnx.save(_chain(weights, reverse=False), source)
    with pytest.raises(OnnxladyError) as in_memory:
        onnxlady.perturb(onnx.load(source), noise=0.1)
    with pytest.raises(OnnxladyError) as streamed:
        onnxlady.perturb(source, output=tmp_path / "out.onnx", noise=0.1)
    assert str(streamed.value) == str(in_memory.value) and "NaN" in str(streamed.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.onnx"]


def test_first_error_in_graph_order(tmp_path: Path) -> None:
    """A NaN weight before an integer one: both routes name the NaN weight first."""
    rng = np.random.default_rng(2)
    model = _chain([rng.normal(size=(8, 8)) for _ in range(3)], reverse=False)
    first = numpy_helper.to_array(model.graph.initializer[0]).copy()
    first[0, 0] = np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(first, "W0"))
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.ones((8, 8), np.int32), "W2"))
    source = tmp_path / "chain.onnx"
    onnx.save(model, source)
    with pytest.raises(OnnxladyError) as in_memory:
        onnxlady.perturb(onnx.load(source), noise=0.1)
    with pytest.raises(OnnxladyError) as streamed:
        onnxlady.perturb(source, output=tmp_path / "out.onnx", noise=0.1)
    assert str(streamed.value) == str(in_memory.value) and "'W0'" in str(streamed.value)


def test_typed_field_weights_take_the_in_memory_route(tmp_path: Path) -> None:
    """``float_data`` weights cannot be overridden as ``raw_data``: no stream, same file as before."""
    rng = np.random.default_rng(3)
    model = _chain([rng.normal(size=(8, 8)) for _ in range(2)], reverse=False)
    typed = helper.make_tensor("W1", TensorProto.FLOAT, [8, 8], rng.normal(size=64).tolist(), raw=False)
    model.graph.initializer[1].CopyFrom(typed)
    assert perturb_streamed(model, noise=0.1) is None
    source = tmp_path / "chain.onnx"
    onnx.save(model, source)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _in_memory(source, tmp_path / "a" / "out.onnx", noise=0.1)
    onnxlady.perturb(source, output=tmp_path / "b" / "out.onnx", noise=0.1)
    _same_files(tmp_path / "a" / "out.onnx", tmp_path / "b" / "out.onnx")
    assert onnx.load(tmp_path / "b" / "out.onnx").graph.initializer[1].float_data
