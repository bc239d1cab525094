"""A graph's order and its undefined names, checked in one scan when it is listed in order (issue 15).

A graph listed in topological order (what exporters write) reads only names defined before,
so its inputs are not checked a second time; any other graph has every input checked before
it is sorted. Each case here must still end as before: the same order, the same one-line error.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from onnxlady._api._audit import audit
from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._validate import validate_model


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


def test_validation_refuses_a_cycle_in_a_graph_listed_out_of_order() -> None:
    """Every command validates: an audit of bit-identical weights, which builds no graph, refuses it too."""
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="loop_add"), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Relu", ["a"], ["y"])]  # fmt: skip
    with pytest.raises(OnnxladyError, match=r"m.onnx: the main graph has a cycle: node 'loop_add' \(Add\) depends on its own output"):
        validate_model(_model(nodes), "m.onnx")
    listed_late = [helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])]
    assert validate_model(_model(listed_late), "m.onnx") is None  # out of order, no cycle: sorted later


def test_the_audit_of_a_cyclic_copy_is_refused(tmp_path: Path) -> None:
    reference = _model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
                        helper.make_node("Add", ["a", "b"], ["y"])])  # fmt: skip
    cyclic = onnx.ModelProto()
    cyclic.CopyFrom(reference)
    cyclic.graph.node[0].input[0] = "y"  # the Relu reads the Add that reads it: weights untouched
    onnx.save(reference, tmp_path / "reference.onnx")
    onnx.save(cyclic, tmp_path / "cyclic.onnx")
    with pytest.raises(OnnxladyError, match="has a cycle"):
        audit(tmp_path / "reference.onnx", tmp_path / "cyclic.onnx")
