"""A graph's order and its undefined names, checked in one scan when it is listed in order (issue 15).

A graph listed in topological order (what exporters write) reads only names defined before,
so its inputs are not checked a second time; any other graph has every input checked before
it is sorted. Each case here must still end as before: the same order, the same one-line error.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import ModelGraph


def _model(nodes: list[onnx.NodeProto], outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in outputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_graph_listed_in_order_keeps_its_order() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])]
    assert ModelGraph(_model(nodes)).order == [0, 1]


def test_a_graph_listed_out_of_order_is_sorted() -> None:
    nodes = [helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])]
    assert ModelGraph(_model(nodes)).order == [1, 0]


@pytest.mark.parametrize("first", [True, False], ids=["read-first", "read-last"])
def test_an_undefined_input_is_refused_in_either_order(first: bool) -> None:
    reader = helper.make_node("Add", ["a", "ghost"], ["y"], name="reader")
    nodes = [reader, helper.make_node("Relu", ["x"], ["a"])] if first else [helper.make_node("Relu", ["x"], ["a"]), reader]
    with pytest.raises(OnnxladyError, match="node 'reader' reads tensor 'ghost' that nothing defines"):
        ModelGraph(_model(nodes))


def test_an_undefined_graph_output_is_refused_in_a_graph_listed_in_order() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    with pytest.raises(OnnxladyError, match="graph output 'z' is not produced by any node"):
        ModelGraph(_model(nodes, ("y", "z")))


def test_a_cycle_is_refused() -> None:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Relu", ["a"], ["y"])]  # fmt: skip
    with pytest.raises(OnnxladyError, match="the graph has a cycle"):
        ModelGraph(_model(nodes))
