"""Graph edits inside subgraphs and local functions (held-out round 12, findings F1 and F2).

An ``If``'s two branches swapped, or an operator inside a branch rewired to read the other
branch's weight, and an ONNX local function's body edited (one edit changes every call site):
every constant still bit-identical, the main graph untouched, audited ``identical`` (exit 0)
while verify said NOT EQUIVALENT. Operators inside subgraphs and functions are now compared like
the main graph's, keyed by where they sit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures.recurrent import FIXTURES
from onnxlady import audit, verify_models
from onnxlady.testing import copy_model, permute_copy


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _audit(tmp_path: Path, reference: onnx.ModelProto, suspect: onnx.ModelProto):  # type: ignore[no-untyped-def]
    return audit(_saved(reference, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))


def _branches(model: onnx.ModelProto) -> dict[str, onnx.GraphProto]:
    node = next(node for node in model.graph.node if node.op_type == "If")
    return {attribute.name: attribute.g for attribute in node.attribute}


def _swap_branches(model: onnx.ModelProto) -> None:
    node = next(node for node in model.graph.node if node.op_type == "If")
    then_graph, else_graph = (onnx.GraphProto(), onnx.GraphProto())
    for attribute in node.attribute:
        (then_graph if attribute.name == "then_branch" else else_graph).CopyFrom(attribute.g)
    for attribute in node.attribute:
        attribute.g.CopyFrom(else_graph if attribute.name == "then_branch" else then_graph)


def _rewire_branch(model: onnx.ModelProto) -> None:
    """The ``then`` branch's conv2 reads the ``else`` branch's conv2 weight (same shape)."""
    then_conv = next(node for node in _branches(model)["then_branch"].node if node.op_type == "Conv" and "conv2" in node.input[1])
    else_conv = next(node for node in _branches(model)["else_branch"].node if node.op_type == "Conv" and "conv2" in node.input[1])
    then_weight = next(t for t in _branches(model)["then_branch"].initializer if t.name == then_conv.input[1])
    else_weight = next(t for t in _branches(model)["else_branch"].initializer if t.name == else_conv.input[1])
    # Both branches' weights must be visible to the then branch: move the else weight to the main graph.
    _branches(model)["else_branch"].initializer.remove(else_weight)
    model.graph.initializer.append(else_weight)
    assert then_weight.dims == else_weight.dims
    then_conv.input[1] = else_conv.input[1]


@pytest.mark.parametrize("edit", [_swap_branches, _rewire_branch], ids=["branches-swapped", "branch-rewired"])
def test_edits_inside_if_branches_are_modified(tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    source = FIXTURES["if_body"](0)
    suspect = copy_model(source)
    edit(suspect)
    onnx.checker.check_model(suspect)
    assert not verify_models(source, suspect, input_range=(0.0, 1.0)).equivalent  # takes the then branch
    result = _audit(tmp_path, source, suspect)
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "graph edited with the weights kept" in result.summary
    assert any("then_branch" in line or "else_branch" in line for line in result.report.graph_edits), result.report.graph_edits


def test_untouched_and_permuted_control_flow_copies_have_no_edits(tmp_path: Path) -> None:
    """The check reads nothing into copies that only move constants (the test of the tests)."""
    for name in ("if_body", "loop_body"):
        source = FIXTURES[name](0)
        assert not _audit(tmp_path, source, copy_model(source)).report.graph_edits
        permuted = _audit(tmp_path, source, permute_copy(source, 3)[0])
        assert permuted.verdict == "permuted" and not permuted.report.graph_edits, permuted.summary


def _block_function() -> onnx.FunctionProto:
    """``Block(x, w, b) = x + Gelu-free MLP``: Relu(x @ w + b) added to x, with a LayerNormalization first."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["normed"], epsilon=1e-5, axis=-1),
        helper.make_node("MatMul", ["normed", "w"], ["mixed"]),
        helper.make_node("Add", ["mixed", "b"], ["biased"]),
        helper.make_node("Relu", ["biased"], ["activated"]),
        helper.make_node("Add", ["x", "activated"], ["y"]),
    ]
    return helper.make_function(
        "local", "Block", ["x", "gamma", "beta", "w", "b"], ["y"], nodes, [helper.make_opsetid("", 17)]
    )


def _function_model(seed: int = 0) -> onnx.ModelProto:
    """Two calls of one local function ``local::Block`` on [2, 8] activations, then a MatMul head."""
    rng = np.random.default_rng(seed)
    weights = []
    nodes = []
    current = "input"
    for index in range(2):
        names = [f"block{index}.{part}" for part in ("gamma", "beta", "w", "b")]
        weights += [
            numpy_helper.from_array((1 + 0.1 * rng.standard_normal(8)).astype(np.float32), names[0]),
            numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(np.float32), names[1]),
            numpy_helper.from_array((rng.standard_normal((8, 8)) / np.sqrt(8)).astype(np.float32), names[2]),
            numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(np.float32), names[3]),
        ]
        nodes.append(helper.make_node("Block", [current, *names], [f"block{index}.out"], domain="local", name=f"block{index}"))
        current = f"block{index}.out"
    weights.append(numpy_helper.from_array((rng.standard_normal((8, 4)) / np.sqrt(8)).astype(np.float32), "head.w"))
    nodes.append(helper.make_node("MatMul", [current, "head.w"], ["logits"], name="head"))
    graph = helper.make_graph(
        nodes, "blocks",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2, 4])],
        weights,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[_block_function()]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _relu_to_sigmoid(model: onnx.ModelProto) -> None:
    next(node for node in model.functions[0].node if node.op_type == "Relu").op_type = "Sigmoid"


def _epsilon(model: onnx.ModelProto) -> None:
    node = next(node for node in model.functions[0].node if node.op_type == "LayerNormalization")
    next(attribute for attribute in node.attribute if attribute.name == "epsilon").f = 1.0


@pytest.mark.parametrize("edit", [_relu_to_sigmoid, _epsilon], ids=["op-type", "attribute"])
def test_edits_inside_a_local_function_are_modified(tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    source = _function_model()
    suspect = copy_model(source)
    edit(suspect)
    onnx.checker.check_model(suspect)
    assert not verify_models(source, suspect).equivalent
    result = _audit(tmp_path, source, suspect)
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert any("function local::Block" in line for line in result.report.graph_edits), result.report.graph_edits


def test_an_untouched_function_model_has_no_edits(tmp_path: Path) -> None:
    source = _function_model()
    result = _audit(tmp_path, source, copy_model(source))
    assert result.verdict == "identical" and not result.report.graph_edits, result.summary
