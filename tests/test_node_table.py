"""The nodes as the structural check read them, handed to the analysis's graph (issue 15).

``validate_model(..., node_table=True)`` keeps each main-graph node's input and output names,
operator and whether it has attributes, and whether the graph is listed in order; ``inspect``
passes them to its ``ModelGraph`` instead of reading the protobuf a second time. A graph built
from a table must be the graph built from the protobuf, for every kind of graph: in order, out
of order, with a node reading its own output (a cycle), with Constants and empty names; graphs
with subgraphs or sparse initializers get no table (the graph reads those itself).
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import onnxlady
from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._validate import validate_model


def _model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:  # type: ignore[assignment]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight(name: str) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [4, 4], [0.5] * 16)


_IN_ORDER = [
    helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [4], [1, 2, 3, 4])),
    helper.make_node("MatMul", ["x", "w"], ["a"]),
    helper.make_node("Add", ["a", "c"], ["b"]),
    helper.make_node("Clip", ["b", "", "c"], ["d"]),  # an empty optional input
    helper.make_node("Relu", ["d"], ["y"]),
]
_OUT_OF_ORDER = [_IN_ORDER[4], _IN_ORDER[2], _IN_ORDER[0], _IN_ORDER[1], _IN_ORDER[3]]


def _structure(graph: ModelGraph) -> tuple[object, ...]:
    return (
        graph._node_inputs, graph._node_outputs, graph._node_ops, graph._node_attributed, graph.producer,
        {name: list(uses) for name, uses in graph.consumers.items()}, graph.constant_nodes, graph.implicit_inputs,
        graph.order, graph.shapes, graph.dtypes, graph.main_count,
    )  # fmt: skip


@pytest.mark.parametrize("nodes", [_IN_ORDER, _OUT_OF_ORDER], ids=["in-order", "out-of-order"])
def test_a_graph_from_the_table_is_the_graph_from_the_protobuf(nodes: list[onnx.NodeProto]) -> None:
    model = _model(nodes, [_weight("w")])
    table = validate_model(model, "m", node_table=True)
    assert table is not None and table.listed_in_order == (nodes is _IN_ORDER)
    assert _structure(ModelGraph(model, nodes=table)) == _structure(ModelGraph(model))


def test_a_node_reading_its_own_output_is_no_graph_in_order() -> None:
    # Its input is looked up before its output is defined: listed in order, it would skip the
    # check that finds the cycle (validation's, and the graph's own sort).
    model = _model([helper.make_node("Add", ["x", "y"], ["y"])])
    with pytest.raises(OnnxladyError, match="m: the main graph has a cycle"):
        validate_model(model, "m", node_table=True)
    with pytest.raises(OnnxladyError, match="the graph has a cycle"):
        ModelGraph(model)


def test_a_table_is_taken_once_and_only_by_its_own_graph() -> None:
    model = _model(_IN_ORDER, [_weight("w")])
    other = _model(_IN_ORDER, [_weight("w")])
    table = validate_model(model, "m", node_table=True)
    assert table is not None
    assert table.take(other.graph) is None  # another graph, however alike
    grown = _model(_IN_ORDER, [_weight("w")])
    grown_table = validate_model(grown, "m", node_table=True)
    grown.graph.node.append(helper.make_node("Neg", ["y"], ["z"]))
    assert grown_table is not None and grown_table.take(grown.graph) is None  # a node added since
    assert table.take(model.graph) is table
    assert table.take(model.graph) is None  # taken already


def test_graphs_the_table_cannot_describe_get_none() -> None:
    body = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"])], "body", [], [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)]
    )
    with_subgraph = _model([helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)])
    with_subgraph.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    assert validate_model(with_subgraph, "m", node_table=True) is None
    sparse = _model([helper.make_node("MatMul", ["x", "s"], ["y"])])
    values = helper.make_tensor("s", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    sparse.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4, 4]))
    assert validate_model(sparse, "m", node_table=True) is None
    assert validate_model(_model(_IN_ORDER, [_weight("w")]), "m") is None  # not asked for


@pytest.mark.parametrize(
    "nodes, message",
    [
        ([helper.make_node("Add", ["x", "ghost"], ["y"], name="n")], "node 'n' (Add) in the main graph reads 'ghost'"),
        ([helper.make_node("Neg", ["a"], ["y"], name="n"), helper.make_node("Relu", ["ghost"], ["a"], name="m")],
         "node 'm' (Relu) in the main graph reads 'ghost'"),
    ],
    ids=["late-input", "read-before-its-producer-then-undefined"],
)  # fmt: skip
def test_undefined_inputs_are_still_refused(nodes: list[onnx.NodeProto], message: str) -> None:
    with pytest.raises(OnnxladyError, match=re.escape(message)):
        validate_model(_model(nodes), "m", node_table=True)


def test_inspect_hands_the_table_to_its_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(_IN_ORDER, [_weight("w")]), path)
    taken = []
    original = ModelGraph._register_nodes

    def register(self: ModelGraph, nodes: list[onnx.NodeProto], table: object = None) -> None:
        taken.append(table is not None)
        original(self, nodes, table)  # type: ignore[arg-type]

    monkeypatch.setattr(ModelGraph, "_register_nodes", register)
    with_table = onnxlady.inspect(path).to_json_text()
    assert taken[:1] == [True]
    monkeypatch.setattr(
        "onnxlady._analysis._channels.ModelGraph", lambda model, nodes=None: ModelGraph(model), raising=True
    )
    assert onnxlady.inspect(path).to_json_text() == with_table
