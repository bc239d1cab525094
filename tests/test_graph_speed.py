"""The shortcuts that make the analysis cheaper keep its answers: lazy constant values, memos, messages."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady._errors import OnnxladyError
from onnxlady._graph._fold import FOLD_LIMIT
from onnxlady._graph._model_graph import ModelGraph, _InitializerValues
from onnxlady._io._validate import validate_model


def test_initializer_values_convert_on_first_use_like_the_eager_mapping() -> None:
    small = numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(2, 3), "small")
    big = numpy_helper.from_array(np.zeros(FOLD_LIMIT + 1, dtype=np.float32), "big")
    broken = TensorProto(name="broken", data_type=TensorProto.FLOAT, dims=[4], raw_data=b"\x00" * 3)
    values = _InitializerValues({"small": small, "big": big, "broken": broken})
    assert dict.__len__(values) == 0  # nothing converted up front
    assert "small" in values and dict.__len__(values) == 1
    np.testing.assert_array_equal(values["small"], np.arange(6).reshape(2, 3))
    assert values.get("small") is values["small"]
    # Over the fold limit or unreadable: absent, as the eager conversion left them.
    assert "big" not in values and values.get("big") is None
    assert "broken" not in values
    with pytest.raises(KeyError):
        values["missing"]
    assert values.get("missing", None) is None
    values["folded"] = np.ones(2)
    assert "folded" in values


def _mlp_with_shape_arithmetic() -> onnx.ModelProto:
    """x [2, 8] -> MatMul W -> Reshape to a target computed from Shape/Gather/Concat -> out."""
    w = numpy_helper.from_array(np.ones((8, 4), dtype=np.float32), "W")
    minus_one = numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one")
    index = numpy_helper.from_array(np.array([0], dtype=np.int64), "index")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Shape", ["h"], ["h_shape"], name="shape"),
        helper.make_node("Gather", ["h_shape", "index"], ["batch"], name="gather", axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["h", "target"], ["out"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w, minus_one, index],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_folding_reads_the_small_initializers_it_needs() -> None:
    graph = ModelGraph(_mlp_with_shape_arithmetic())
    np.testing.assert_array_equal(graph.folded["target"], [2, -1])
    assert graph.shape("out") == (2, 4)
    # Memoised answers are the computed ones, asked twice.
    assert graph.constant_shape("W") == (8, 4) == graph.constant_shape("W")
    assert graph.constant_shape("h") is None and graph.constant_shape("h") is None
    assert list(graph.inputs_of(4)) == [(0, "h"), (1, "target")]
    assert graph.constant_uses("W") == [(0, 1)]


def test_a_name_defined_twice_by_nodes_is_named_with_both_nodes() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="first"),
        helper.make_node("Relu", ["x"], ["y"], name="second"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OnnxladyError) as caught:
        validate_model(model, "m.onnx")
    assert str(caught.value) == (
        "m.onnx: name 'y' is defined twice in the main graph "
        "(an output of node 'first' (Relu) and an output of node 'second' (Relu))"
    )
    model.graph.node[1].output[0] = "x"  # a node output shadowing a graph input
    with pytest.raises(OnnxladyError, match=r"\(a graph input and an output of node 'second' \(Relu\)\)"):
        validate_model(model, "m.onnx")
