"""What the graph reads once and answers from its own tables (issue 15: inspect of deep graphs).

- The main graph's initializer names come from the graph's table, not from the protobuf again:
  with an If or Loop body opened, its initializers join :attr:`ModelGraph.initializers` but not
  :meth:`ModelGraph.main_initializer_names` (the plan copies main-graph constants only), and a
  body constant shared by uses that need different permutations is frozen, never copied.
- A MatMul's constant operands are checked without a helper per node: a scalar weight and
  operands that do not multiply are refused with the same one line as before (exit 2 from the
  command line, no traceback).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import recurrent as recurrent_fixtures
from onnxlady import analyze
from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._validate import validate_model


@pytest.mark.parametrize("name", ["if_body", "loop_body"])
def test_main_initializer_names_leave_out_opened_bodies(name: str) -> None:
    model = recurrent_fixtures.FIXTURES[name](0)
    main = {tensor.name for tensor in model.graph.initializer}
    body = {
        tensor.name
        for node in model.graph.node
        for attribute in node.attribute
        if attribute.type == onnx.AttributeProto.GRAPH
        for tensor in attribute.g.initializer
    }
    graph = ModelGraph(model)
    assert body and body <= set(graph.initializers)  # the bodies were opened
    assert set(graph.main_initializer_names()) == main
    assert body.isdisjoint(graph.main_initializer_names())
    # The plan makes copies of main-graph constants only: no tensor it writes is a body's copy.
    analysis = analyze(model)
    assert not [plan.tensor for plan in analysis.tensors if plan.copy > 0 and plan.source in body]


def test_main_initializer_names_without_bodies_are_the_initializers() -> None:
    model = recurrent_fixtures.FIXTURES["lstm"](0)
    graph = ModelGraph(model)
    assert list(graph.main_initializer_names()) == [tensor.name for tensor in model.graph.initializer]


def _matmul(a_shape: list[int] | None, b_shape: list[int]) -> onnx.ModelProto:
    """``Y = A @ B`` with B a constant of ``b_shape`` and A a constant of ``a_shape`` (None: a graph input)."""
    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.standard_normal(b_shape).astype(np.float32), "B")]
    inputs = []
    if a_shape is None:
        inputs.append(helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, 4]))
    else:
        initializers.append(numpy_helper.from_array(rng.standard_normal(a_shape).astype(np.float32), "A"))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"], name="mm")],
        "g",
        inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "message"),
    [
        (None, [], "node 'mm' (MatMul): operand 'B' is a scalar; MatMul needs rank 1 or more"),
        ([2, 3], [4, 5], "node 'mm' (MatMul): operands 'A' [2, 3] and 'B' [4, 5] do not multiply"),
        ([2, 4], [4], None),  # a vector B multiplies a matrix A of as many columns
        ([3, 2, 4], [5, 4, 6], None),
    ],
)
def test_matmul_constants_are_checked(a_shape: list[int] | None, b_shape: list[int], message: str | None) -> None:
    model = _matmul(a_shape, b_shape)
    if message is None:
        validate_model(model, "m.onnx")
        return
    with pytest.raises(OnnxladyError) as raised:
        validate_model(model, "m.onnx")
    assert str(raised.value) == f"m.onnx: {message}"


def test_matmul_refusal_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_matmul([2, 3], [4, 5]), path)
    done = subprocess.run(
        [sys.executable, "-m", "onnxlady", "inspect", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"onnxlady: error: {path}: node 'mm' (MatMul): operands 'A' [2, 3] and 'B' [4, 5] do not multiply"
    ]
    assert "Traceback" not in done.stderr
