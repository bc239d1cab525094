"""Shortcuts of ``inspect`` at scale (issue 15) give what the general walks give.

``model_tensors`` lists the tensors onnx's ``_get_all_tensors`` yields, in its order (subgraph
initializers, Constant values, tensors of local functions); the size check it feeds still
refuses a truncated tensor whatever the other tensors' types; the group graph's shortcut for a
node writing one group gives the edges of the plain definition.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES, build_deep_model
from onnxlady import inspect
from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._errors import OnnxladyError
from onnxlady._io._files import load_model, model_tensors


def _constant(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array([value], np.float32)))


def _nested_model() -> onnx.ModelProto:
    """Initializers and Constant values in the main graph, in both branches of an If, and in a function."""

    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph(
            [_constant(f"{tag}_c", 2.0), helper.make_node("Add", ["x", f"{tag}_w"], [f"{tag}_y"])],
            tag,
            [],
            [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, [1])],
            [numpy_helper.from_array(np.array([1.0], np.float32), f"{tag}_w")],
        )

    nodes = [
        _constant("c0", 1.0),
        helper.make_node("If", ["cond"], ["z"], then_branch=branch("then"), else_branch=branch("else")),
        helper.make_node("Scale", ["z"], ["out"], domain="local"),
    ]
    graph = helper.make_graph(
        nodes,
        "nested",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.array([3.0], np.float32), "w0")],
    )
    function = helper.make_function(
        "local", "Scale", ["a"], ["b"], [_constant("k", 4.0), helper.make_node("Mul", ["a", "k"], ["b"])],
        [helper.make_opsetid("", 17)],
    )  # fmt: skip
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[function]
    )


@pytest.mark.parametrize("name", ["nested", "if_branch", "lstm_head", "qdq_convnet", "constant_weights", "bert_like"])
def test_model_tensors_are_onnx_tensors_in_order(name: str) -> None:
    model = _nested_model() if name == "nested" else FIXTURES[name](0)
    expected = list(onnx.external_data_helper._get_all_tensors(model))
    found = model_tensors(model)
    assert len(found) == len(expected) and all(a == b for a, b in zip(found, expected))
    assert found  # (not an empty comparison)


def test_model_tensors_visit_function_constants() -> None:
    values = [float(numpy_helper.to_array(t)[0]) for t in model_tensors(_nested_model())]
    assert values == [3.0, 1.0, 1.0, 1.0, 2.0, 2.0, 4.0]


def test_a_truncated_tensor_is_refused_after_tensors_of_other_types(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def save(short: bool) -> str:
        tensors = [
            numpy_helper.from_array(np.ones(4, np.float32), "a"),
            numpy_helper.from_array(np.ones(3, np.int64), "b"),
            numpy_helper.from_array(np.ones(5, np.float32), "c"),
            numpy_helper.from_array(np.ones(2, np.float16), "d"),
        ]
        if short:
            tensors[3].raw_data = tensors[3].raw_data[:-1]  # one byte short
        graph = helper.make_graph(
            [helper.make_node("Identity", [t.name], [f"{t.name}_out"]) for t in tensors],
            "g",
            [],
            [helper.make_tensor_value_info(f"{t.name}_out", t.data_type, None) for t in tensors],
            tensors,
        )
        path = str(tmp_path / f"m{int(short)}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    with pytest.raises(OnnxladyError, match="tensor 'd' holds 3 bytes, its shape \\[2\\] needs 4"):
        load_model(save(short=True))
    load_model(save(short=False))  # whole: accepted


def _plain_edges(analysis: ChannelAnalysis) -> dict[tuple[str, str], set[str]]:
    """The group graph by its definition: every node, the groups its inputs and its outputs carry."""
    graph, edges = analysis.graph, {}
    for index in range(len(graph.nodes)):
        ins = analysis._groups_in(e for name in graph.input_names(index) for e in analysis._spaces_of(name))
        outs = analysis._groups_in(e for name in graph.output_names(index) for e in analysis._spaces_of(name))
        for a in ins:
            for b in outs - {a}:
                edges.setdefault((a, b), set()).add(graph.op_of(index)[0])
    return edges


@pytest.mark.parametrize("name", ["deep", "resnet", "bert_like", "channel_shuffle", "if_branch", "tied_lm_head"])
def test_group_edges_are_those_of_the_definition(name: str) -> None:
    analysis = inspect(build_deep_model(60) if name == "deep" else FIXTURES[name](0)).analysis
    edges = analysis.group_edges()
    assert edges == _plain_edges(analysis)
    if name == "deep":
        assert edges  # the residual stream feeds the hidden groups and back: not an empty comparison
