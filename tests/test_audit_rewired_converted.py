"""An operator made to read another tensor in a converted copy is an edit (held-out round 13, F4).

Across forms (a float32 reference, a suspect stored in float16 or optimized by ONNX Runtime or
onnxslim), the audit compared weights and operators by kind, not the wiring: a residual ``Add``
made to read the tensor before the previous one kept every weight and every operator, and the
copy was audited ``converted`` (exit 0, "the suspect is the reference converted") while verify
said NOT EQUIVALENT. The operators a converter keeps keep their node names; what each reads is
now traced to its source (:func:`onnxlady._audit._graph_edits.rewired_operators`), through the
Casts float16 inserts, the operators a converter removes and the ones it merges. The converters'
own outputs, both ways round, are the test of the test; and where the wiring is compared only in
part, the verdict says so instead of claiming the suspect is the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from fixtures.contrib import ort_optimized
from fixtures.conversions import to_float16
from fixtures.deployment import convert
from onnxlady import analyze, audit, verify_models
from onnxlady._audit._graph_edits import rewired_operators
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

logging.getLogger("onnxruntime").setLevel(logging.ERROR)

CONVERTERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "float16": to_float16,
    "float16-all": lambda m: to_float16(m, keep_io_types=False),
    "ort-basic": lambda m: ort_optimized(m, "basic"),
    "ort-extended": lambda m: ort_optimized(m, "extended"),
    "onnxslim": lambda m: convert(m, "onnxslim"),
}


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _rewire(model: onnx.ModelProto) -> str:
    """A residual ``Add`` made to read the tensor before the operator it reads (tamper.py's rewire); its name.

    The operator it read (a ``LayerNormalization``, another residual ``Add``) keeps another reader,
    so every weight is still read: only the wiring changes.
    """
    constants = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1

    def through_casts(name: str) -> tuple[onnx.NodeProto | None, str]:
        node = producers.get(name)
        while node is not None and node.op_type == "Cast":
            name = node.input[0]
            node = producers.get(name)
        return node, name

    for node in model.graph.node:
        if node.op_type != "Add" or any(name in constants for name in node.input):
            continue
        for slot, name in enumerate(node.input):
            before, read = through_casts(name)
            if (before is not None and before.op_type in ("Add", "LayerNormalization") and readers.get(read, 0) >= 2
                    and not any(item in constants for item in before.input[:1 if before.op_type != "Add" else 2])):
                node.input[slot] = before.input[0]
                return node.name
    raise AssertionError("no residual Add reads another residual Add or a LayerNormalization")


@pytest.mark.parametrize(("name", "converter"), [
    ("bert_like", "float16"), ("bert_like", "onnxslim"), ("bert_like", "ort-basic"),
])
def test_a_rewired_operator_in_a_converted_copy_is_modified(tmp_path: Path, name: str, converter: str) -> None:
    source = FIXTURES[name](0)
    suspect = CONVERTERS[converter](source)
    reference = _saved(source, tmp_path / "reference.onnx")
    clean = audit(reference, _saved(suspect, tmp_path / "clean.onnx"))
    assert clean.verdict == "converted", clean.summary  # the converter's own output: no accusation
    rewired = _rewire(suspect)
    if converter in ("float16", "onnxslim"):  # (ONNX Runtime does not load its own optimized output again)
        assert not verify_models(source, suspect).equivalent  # the rewiring changes what the model computes
    result = audit(reference, _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified", result.summary
    assert result.exit_code == 1
    assert any(f"'{rewired}'" in line and "reads" in line for line in result.report.graph_edits), result.report.graph_edits


def test_a_rewired_operator_in_a_permuted_converted_copy_is_modified(tmp_path: Path) -> None:
    source = FIXTURES["bert_like"](0)
    permuted = permute_copy(source, seed=3)[0]
    suspect = to_float16(permuted)
    reference = _saved(source, tmp_path / "reference.onnx")
    assert audit(reference, _saved(suspect, tmp_path / "clean.onnx")).verdict == "permuted"
    _rewire(suspect)
    result = audit(reference, _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified", result.summary


@pytest.mark.parametrize("name", ["bert_like", "resnet", "mobilenet", "encoder_prenorm", "contrib_fused_conv", "lstm_head"])
@pytest.mark.parametrize("converter", sorted(CONVERTERS))
def test_what_converters_write_rewires_nothing(name: str, converter: str) -> None:
    """Both ways round: a converter's output read as the reference and as the suspect."""
    source = FIXTURES[name](0)
    converted = CONVERTERS[converter](source)
    assert rewired_operators(source, converted)[0] == []
    assert rewired_operators(converted, source)[0] == []


def test_merged_and_removed_operators_are_no_rewiring() -> None:
    """Two ``Sigmoid`` of one tensor merged into one, and an ``Identity`` dropped, as simplifiers do."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])

    def model(nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])

    reference = model([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["i"], name="identity"),
        helper.make_node("Sigmoid", ["r"], ["a1"], name="sigmoid_1"),
        helper.make_node("Sigmoid", ["r"], ["a2"], name="sigmoid_2"),
        helper.make_node("Mul", ["a1", "i"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "a2"], ["y"], name="add"),
    ])
    simplified = model([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["r"], ["a1"], name="sigmoid_1"),
        helper.make_node("Mul", ["a1", "r"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "a1"], ["y"], name="add"),
    ])
    assert rewired_operators(reference, simplified)[0] == []
    assert rewired_operators(simplified, reference)[0] == []
    edited = model([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["r"], ["a1"], name="sigmoid_1"),
        helper.make_node("Mul", ["a1", "r"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "m"], ["y"], name="add"),  # m + m, not m + sigmoid(r)
    ])
    lines, _ = rewired_operators(reference, edited)
    assert lines == ["Add 'add' input 1 reads 'mul' in the suspect, where the reference reads 'sigmoid_2'"]


def test_a_partly_compared_wiring_is_said_so(tmp_path: Path) -> None:
    """Where fusions leave few operators under their names, the verdict claims the weights only."""
    source = FIXTURES["bert_like"](0)
    suspect = ort_optimized(source, "extended")
    _, note = rewired_operators(source, suspect)
    assert note is not None and "compared only" in note
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "converted"
    assert "the suspect is the reference" not in result.summary
    assert "its wiring was compared only" in result.summary


def _swish_times_one(seed: int = 0) -> onnx.ModelProto:
    """Conv, BatchNorm, then Paddle2ONNX's swish ``x * sigmoid(x * 1)`` (PP-OCRv4's form), then a Conv head."""
    rng = np.random.default_rng(seed)

    def constant(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    initializers: list[onnx.TensorProto] = []
    nodes = [
        helper.make_node("Conv", ["x", constant("w1", rng.normal(0, 0.3, (8, 3, 3, 3)))], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c1", constant("g", rng.uniform(0.5, 1.5, 8)), constant("b", rng.normal(0, 0.1, 8)),
                                                 constant("m", rng.normal(0, 0.1, 8)), constant("v", rng.uniform(0.5, 1.5, 8))],
                         ["bn"], name="bn1"),
        helper.make_node("Mul", ["bn", constant("one", np.array(1.0))], ["scaled"], name="times_one"),
        helper.make_node("Sigmoid", ["scaled"], ["gate"], name="sigmoid"),
        helper.make_node("Mul", ["bn", "gate"], ["swish"], name="swish"),
        helper.make_node("Conv", ["swish", constant("w2", rng.normal(0, 0.3, (4, 8, 1, 1)))], ["y"], name="head"),
    ]  # fmt: skip
    graph = helper.make_graph(nodes, "swish_times_one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], initializers)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_dropped_neutral_operator_lending_its_name_is_no_rewiring(tmp_path: Path) -> None:
    """onnxslim drops swish's ``x * 1`` and names the BatchNorm-folded Conv's output after it (the PP-OCRv4 rec row).

    The swish ``Mul`` then reads a tensor named as the dropped ``Mul``'s output: that name stands
    for the Conv's output, which is what the reference's swish reads (session 15 read it as rewired:
    a false ``modified``). The same swish made to read the gate's input for real is still caught.
    """
    reference = _swish_times_one()
    slimmed = convert(reference, "onnxslim")
    swish = next(node for node in slimmed.graph.node if node.name == "swish")
    assert "times_one" not in {node.name for node in slimmed.graph.node} and swish.input[0] == "scaled"  # the test of the test
    assert rewired_operators(reference, slimmed)[0] == []
    permuted = convert(permute_copy(reference, seed=3)[0], "onnxslim")
    assert verify_models(reference, permuted).equivalent
    wrong = copy_model(reference)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(reference, wrong).equivalent  # a wrong permutation is caught
    report = audit(_saved(reference, tmp_path / "r.onnx"), _saved(permuted, tmp_path / "s.onnx"))
    assert report.verdict == "permuted", report.summary
    swish.input[1] = swish.input[0]  # x * sigmoid(x) -> x * x: the gate no longer read
    lines, _ = rewired_operators(reference, slimmed)
    assert any("'swish' input 1" in line for line in lines), lines
