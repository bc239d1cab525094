"""Operators added to a converted copy are an edit (held-out round 12, finding F5).

A suspect matched across a conversion is compared on its weights; a ``Neg`` or ``Softmax``
appended behind its output (``onnx.compose.merge_models``), or a ``Relu`` made an ``Abs`` in an
optimised graph, kept every weight and was audited ``converted`` (exit 0) while verify said NOT
EQUIVALENT. Converters fuse and drop nonlinear operators but never add them: a kind the suspect
has more of is now an edit. The suspects are written by ONNX Runtime's own optimizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest
from onnx import helper

from fixtures import FIXTURES
from fixtures.contrib import ort_optimized
from onnxlady import audit, verify_models
from onnxlady._audit._added_operators import added_operators
from onnxlady.testing import copy_model, permute_copy

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _append(model: onnx.ModelProto, op_type: str, **attributes: object) -> None:
    """``op_type`` behind the first output, which keeps its name (what ``merge_models`` writes)."""
    output = model.graph.output[0].name
    producer = next(node for node in model.graph.node if output in node.output)
    producer.output[list(producer.output).index(output)] = f"{output}_pre"
    model.graph.node.append(helper.make_node(op_type, [f"{output}_pre"], [output], name=f"appended_{op_type}", **attributes))


def _relu_to_abs(model: onnx.ModelProto) -> None:
    node = [node for node in model.graph.node if node.op_type == "Relu"][-1]
    node.op_type = "Abs"


@pytest.fixture(scope="module")
def converted() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    source = FIXTURES["resnet"](0)
    return source, ort_optimized(source, "basic")


@pytest.mark.parametrize(
    "edit", [lambda m: _append(m, "Neg"), lambda m: _append(m, "Softmax", axis=-1), _relu_to_abs],
    ids=["neg-appended", "softmax-appended", "relu-to-abs"],
)
@pytest.mark.parametrize("permuted", [False, True], ids=["as-is", "permuted"])
def test_an_operator_added_to_a_converted_copy_is_modified(
    tmp_path: Path, converted: tuple[onnx.ModelProto, onnx.ModelProto], edit, permuted: bool  # type: ignore[no-untyped-def]
) -> None:
    source, _ = converted
    suspect = ort_optimized(permute_copy(source, 3)[0], "basic") if permuted else copy_model(converted[1])
    edit(suspect)
    onnx.checker.check_model(suspect)
    assert not verify_models(source, suspect).equivalent
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "operators added with the weights kept" in result.summary


@pytest.mark.parametrize("level", ["basic", "extended", "all"])
def test_what_the_optimizer_writes_adds_no_operator(tmp_path: Path, level: str) -> None:
    """ONNX Runtime's own output, both ways round (the test of the test): fusions carry their activations."""
    source = FIXTURES["resnet"](0)
    optimized = ort_optimized(source, level)
    assert added_operators(source, optimized) == [] and added_operators(optimized, source) == []
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(optimized, tmp_path / "suspect.onnx"))
    assert result.verdict == "converted", result.summary


def test_fused_and_quantized_forms_count_as_their_activation() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    relu = helper.make_node("Relu", ["c"], ["y"], name="relu")
    fused = helper.make_node("FusedConv", ["x", "w"], ["y"], name="fused", domain="com.microsoft", activation="Relu")
    plain = helper.make_model(helper.make_graph([conv, relu], "plain", [], []))
    fusion = helper.make_model(helper.make_graph([fused], "fused", [], []))
    assert added_operators(plain, fusion) == [] and added_operators(fusion, plain) == []
    quantized = helper.make_model(helper.make_graph(
        [helper.make_node("QLinearConv", ["x", "s", "z", "w", "ws", "wz", "ys", "yz"], ["y"], name="q")], "q", [], []))
    assert added_operators(quantized, plain) == []  # a quantized reference absorbed its Relu into a range
    sigmoid = helper.make_model(helper.make_graph(
        [conv, helper.make_node("QLinearSigmoid", ["c", "s", "z", "ys", "yz"], ["y"], name="qs", domain="com.microsoft")],
        "qs", [], []))  # fmt: skip
    assert added_operators(plain, sigmoid) == ["1 more sigmoid operator in the suspect than in the reference ('qs')"]


def _softmax_to(op_type: str):  # type: ignore[no-untyped-def]
    def edit(model: onnx.ModelProto) -> None:
        node = [node for node in model.graph.node if node.op_type == "Softmax"][-1]
        node.op_type = op_type

    return edit


@pytest.mark.parametrize("op_type", ["LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("level", ["basic", "extended"])
def test_a_softmax_made_another_of_its_family_in_a_converted_copy_is_modified(
    tmp_path: Path, op_type: str, level: str
) -> None:
    """Held-out round 13, F3: ``Softmax`` -> ``LogSoftmax``/``Hardmax`` kept one "softmax" kind count.

    No converter makes a ``Softmax`` either (a ``LogSoftmax`` only fuses ``Log(Softmax)``): each is
    its own kind now, the reference's ``Log`` of a ``Softmax`` counting as a log-softmax.
    """
    source = FIXTURES["encoder_prenorm"](0)
    suspect = ort_optimized(source, level)
    _softmax_to(op_type)(suspect)
    assert not verify_models(source, suspect).equivalent
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert f"more {op_type.lower()} operator" in result.summary


def test_log_of_a_softmax_fused_into_log_softmax_adds_nothing() -> None:
    softmax = helper.make_node("Softmax", ["x"], ["s"], name="softmax", axis=-1)
    log = helper.make_node("Log", ["s"], ["y"], name="log")
    fused = helper.make_node("LogSoftmax", ["x"], ["y"], name="log_softmax", axis=-1)
    plain = helper.make_model(helper.make_graph([softmax, log], "plain", [], []))
    fusion = helper.make_model(helper.make_graph([fused], "fused", [], []))
    assert added_operators(plain, fusion) == [] and added_operators(fusion, plain) == []
    swapped = helper.make_model(helper.make_graph([helper.make_node("LogSoftmax", ["x"], ["y"], name="ls", axis=-1)], "s", [], []))
    only_softmax = helper.make_model(helper.make_graph([softmax], "o", [], []))
    assert added_operators(only_softmax, swapped) == ["1 more logsoftmax operator in the suspect than in the reference ('ls')"]
    argmin = helper.make_model(helper.make_graph([helper.make_node("ArgMin", ["x"], ["y"], name="am")], "a", [], []))
    argmax = helper.make_model(helper.make_graph([helper.make_node("ArgMax", ["x"], ["y"], name="aM")], "b", [], []))
    assert added_operators(argmax, argmin) == ["1 more argmin operator in the suspect than in the reference ('am')"]
