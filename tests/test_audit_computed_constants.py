"""Graph edits inside arithmetic on constants: the values both models compute are compared.

The graph-edit check reads a tensor computed from constants as "a constant" (a converter folds
such arithmetic into a stored value, which is no edit), so a Reshape target computed by a
``Concat`` and ``Mul`` of constants, changed in the suspect, was audited ``identical`` while the
suspect computes something else (a softmax over other groups). Where both models compute an
input from constants alone, both values are now computed and compared; a folded copy (ONNX
Runtime's optimizer) is still a conversion, and a value computed from ``Shape`` (which depends
on the input) stays "a constant".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.contrib import ort_optimized
from onnxlady import analyze, audit, verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

WIDTH, GROUPS = 64, 8


def _computed_target_model() -> onnx.ModelProto:
    """The input -> MatMul -> Mul(scale) -> Reshape([1, 2*4, -1]) -> Softmax -> Reshape([1, 64]) -> MatMul.

    The Reshape target is ``Concat(1, Mul(2, 4), -1)`` and the scale ``Mul(0.5, 2.0)``, computed
    from Constant nodes.
    """
    rng = np.random.default_rng(0)

    def constant(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=f"{name}.node", value=numpy_helper.from_array(value, name))

    nodes = [
        constant("one", np.array([1], np.int64)),
        constant("two", np.array([2], np.int64)),
        constant("four", np.array([4], np.int64)),
        constant("rest", np.array([-1], np.int64)),
        helper.make_node("Mul", ["two", "four"], ["groups"], name="groups.mul"),
        helper.make_node("Concat", ["one", "groups", "rest"], ["target"], name="target.concat", axis=0),
        constant("half", np.array(0.5, np.float32)),
        constant("gain", np.array(2.0, np.float32)),
        helper.make_node("Mul", ["half", "gain"], ["scale"], name="scale.mul"),
        helper.make_node("MatMul", ["input", "w1"], ["h"], name="fc1"),
        helper.make_node("Mul", ["h", "scale"], ["scaled"], name="scaled"),
        helper.make_node("Reshape", ["scaled", "target"], ["grouped"], name="grouped"),
        helper.make_node("Softmax", ["grouped"], ["probs"], name="probs", axis=-1),
        helper.make_node("Reshape", ["probs", "flat"], ["flat_probs"], name="flatten"),
        helper.make_node("MatMul", ["flat_probs", "w2"], ["output"], name="fc2"),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((WIDTH, 10)) * 4).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([1, WIDTH], np.int64), "flat"),
    ]
    graph = helper.make_graph(
        nodes, "computed_target", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxlady-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _with_op(model: onnx.ModelProto, node_name: str, op_type: str) -> onnx.ModelProto:
    """``model`` with one node's operator changed: an edit inside the arithmetic, every stored constant kept."""
    changed = copy_model(model)
    next(node for node in changed.graph.node if node.name == node_name).op_type = op_type
    return changed


def _audit(tmp_path: Path, reference: onnx.ModelProto, suspect: onnx.ModelProto) -> tuple[str, int, list[str], str]:
    onnx.save(reference, tmp_path / "reference.onnx")
    onnx.save(suspect, tmp_path / "suspect.onnx")
    result = audit(tmp_path / "reference.onnx", tmp_path / "suspect.onnx")
    return result.verdict, result.exit_code, list(result.to_json().get("graph_edits", [])), result.summary


@pytest.mark.parametrize(
    ("node", "op_type", "reader"),
    [("groups.mul", "Max", "Reshape 'grouped'"), ("scale.mul", "Add", "Mul 'scaled'")],
    ids=["reshape-target", "float-scale"],
)
def test_an_edit_inside_arithmetic_on_constants_is_a_graph_edit(tmp_path: Path, node: str, op_type: str, reader: str) -> None:
    """``Mul(2, 4)`` made ``Max(2, 4)`` (softmax over 4 groups of 16, not 8 of 8); ``Mul(0.5, 2)`` made ``Add``."""
    source = _computed_target_model()
    edited = _with_op(source, node, op_type)
    onnx.checker.check_model(edited)
    assert not verify_models(source, edited).equivalent
    verdict, code, edits, summary = _audit(tmp_path, source, edited)
    assert (verdict, code) == ("modified", 1), summary
    assert any(edit.startswith(reader) and "computed from constants" in edit for edit in edits), edits


def test_an_untouched_copy_a_permuted_copy_and_a_folded_copy_are_not_accused(tmp_path: Path) -> None:
    source = _computed_target_model()
    assert _audit(tmp_path, source, copy_model(source))[:2] == ("identical", 0)
    permuted, _, perms, _ = permute_copy(source, 2)
    assert perms and verify_models(source, permuted).equivalent
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent
    verdict, code, edits, summary = _audit(tmp_path, source, permuted)
    assert (verdict, code, edits) == ("permuted", 0, []), summary
    folded = ort_optimized(source, "basic")
    assert not any(node.op_type == "Concat" for node in folded.graph.node), "ORT no longer folds the target"
    verdict, code, edits, summary = _audit(tmp_path, source, folded)
    assert code == 0 and verdict in ("converted", "identical") and not edits, summary


def test_a_value_computed_from_shape_stays_a_constant() -> None:
    """What depends on the input's shape is not computed here: the check leaves it alone."""
    from onnxlady._audit._graph_edits import folded_tensors, graph_constants

    model = _computed_target_model()
    shape = helper.make_node("Shape", ["input"], ["input_shape"], name="input.shape")
    model.graph.node.insert(0, shape)
    computed, pure = folded_tensors(model.graph, graph_constants(model.graph))
    assert "input_shape" in computed and "input_shape" not in pure
    assert {"target", "scale"} <= pure
