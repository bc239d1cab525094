"""Reading a graph without its weights, and adding outputs to a model file without parsing it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import FIXTURES
from onnxlady._io._skim import read_graph, with_graph_outputs
from onnxlady.testing import GraphBuilder

_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _without_data(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``model`` with the data of the tensors ``names`` cleared, as read_graph should give it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)

    def graph(g: onnx.GraphProto) -> None:
        for tensor in g.initializer:
            if tensor.name in names:
                for field in _DATA_FIELDS:
                    tensor.ClearField(field)
        for node in g.node:
            for attribute in node.attribute:
                if attribute.HasField("t") and attribute.t.name in names:
                    for field in _DATA_FIELDS:
                        attribute.t.ClearField(field)
                if attribute.HasField("g"):
                    graph(attribute.g)

    graph(copy.graph)
    return copy


@pytest.mark.parametrize("name", ["resnet", "constant_weights", "if_branch", "bert_like", "lstm_head"])
@pytest.mark.parametrize("keep_bytes", [0, 256, 1 << 20])
def test_the_graph_is_onnx_load_less_the_large_tensors(name: str, keep_bytes: int, tmp_path: Path) -> None:
    model = FIXTURES[name](0)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    read = read_graph(path, keep_bytes=keep_bytes)
    loaded = onnx.load(path)
    if keep_bytes >= path.stat().st_size:
        assert read.skimmed == set()
    else:
        assert read.skimmed  # every fixture has a tensor above 256 bytes
    assert read.model.SerializeToString() == _without_data(loaded, read.skimmed).SerializeToString()


def test_weights_are_never_read(tmp_path: Path) -> None:
    """The weights' bytes can be anything: they are not read (nor copied)."""
    b = GraphBuilder("big", 0)
    x = b.input("x", (1, 256))
    model = b.build(b.matmul(x, 512, name="fc"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = bytearray(path.read_bytes())
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0]).tobytes()
    start = data.find(weight)
    assert start > 0
    data[start : start + len(weight)] = np.full(len(weight), 0xFF, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    read = read_graph(path)
    assert read.skimmed == {"fc.weight"}
    assert read.model.graph.initializer[0].dims == [256, 512] and not read.model.graph.initializer[0].raw_data
    assert onnx.numpy_helper.to_array(read.model.graph.initializer[1]).shape == (512,)  # small: kept


def test_not_a_model_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "x.onnx"
    path.write_bytes(b"\x08\x07 not a model" * 20)
    with pytest.raises(Exception):  # ruff: ignore[assert-raises-exception] - ValueError or DecodeError, both mean "not a model"
        read_graph(path)


def test_outputs_appended_without_parsing(tmp_path: Path) -> None:
    model = FIXTURES["resnet"](0)
    extended = onnx.ModelProto()
    extended.ParseFromString(with_graph_outputs(model.SerializeToString(), ["stem.relu", "x1"]))
    assert [o.name for o in extended.graph.output] == [o.name for o in model.graph.output] + ["stem.relu", "x1"]
    extended.graph.ClearField("output")
    original = onnx.ModelProto()
    original.CopyFrom(model)
    original.graph.ClearField("output")
    assert extended.SerializeToString() == original.SerializeToString()
    assert with_graph_outputs(b"abc", []) == b"abc"
