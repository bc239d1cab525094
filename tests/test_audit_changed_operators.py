"""Operators changed within their kind in a converted copy are an edit (session 13, h7 item 1).

Across forms (a float32 reference, a suspect optimized by ONNX Runtime or stored in float16), the
audit compared weights and counted nonlinear operators by kind: a ``Relu`` made a ``Clip(0, 6)``
or back, a ``Clip``'s bounds, a ``LeakyRelu``'s or ``HardSigmoid``'s slope, a normalization's
epsilon or a ``Softmax``'s axis edited kept every weight and every count, and the copy was
audited ``converted`` (exit 0) while verify said NOT EQUIVALENT. What each operator computes is
now compared (:func:`onnxlady._audit._added_operators.changed_operators`); the converters' own
outputs, both ways round, are the test of the test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures import FIXTURES
from fixtures.contrib import ort_optimized
from fixtures.conversions import to_float16
from onnxlady import audit, verify_models
from onnxlady._audit._added_operators import changed_operators
from onnxlady.testing import permute_copy

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op_type]


def _set(node: onnx.NodeProto, name: str, value: object) -> None:
    for index, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[index]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _constant(model: onnx.ModelProto, name: str, value: float, like: str | None = None) -> str:
    """A one-element initializer of the element type of the initializer ``like`` (float32 without it)."""
    dtype = np.float32
    if like is not None:
        dtype = next(numpy_helper.to_array(t).dtype for t in model.graph.initializer if t.name == like)
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


def _relu_to_clip(model: onnx.ModelProto) -> None:
    """The first ``Relu`` made a ``Clip(0, 0.5)``: every weight and every count of operators kept."""
    node = _nodes(model, "Relu")[0]
    node.op_type = "Clip"
    node.input.extend([_constant(model, "edit_low", 0.0), _constant(model, "edit_high", 0.5)])


def _clip_to_relu(model: onnx.ModelProto) -> None:
    node = _nodes(model, "Clip")[0]
    node.op_type = "Relu"
    del node.input[1:]


def _clipped_resnet(seed: int) -> onnx.ModelProto:
    """The resnet fixture with its first ``Relu`` a ``Clip(0, 0.5)``: a model whose clip bites."""
    model = FIXTURES["resnet"](seed)
    _relu_to_clip(model)
    return model


def _clip_bounds(model: onnx.ModelProto) -> None:
    node = _nodes(model, "Clip")[0]
    node.input[2] = _constant(model, "edit_high", 0.5, like=node.input[2])


def _hard_sigmoid_slope(model: onnx.ModelProto) -> None:
    _set(_nodes(model, "HardSigmoid")[0], "alpha", 2.0)


def _leaky_slope(model: onnx.ModelProto) -> None:
    node = next(node for node in _nodes(model, "FusedConv") if any(a.s == b"LeakyRelu" for a in node.attribute))
    _set(node, "activation_params", [0.9])


def _layer_norm_epsilon(model: onnx.ModelProto) -> None:
    _set(_nodes(model, "LayerNormalization")[0], "epsilon", 1.0)


def _batch_norm_epsilon(model: onnx.ModelProto) -> None:
    _set(_nodes(model, "BatchNormalization")[0], "epsilon", 10.0)


def _softmax_axis(model: onnx.ModelProto) -> None:
    _set(_nodes(model, "Softmax")[0], "axis", -2)


#: (fixture, converter of the suspect, edit): each edit keeps the operator counts by kind.
CASES: dict[str, tuple[Callable[[int], onnx.ModelProto], Callable[[onnx.ModelProto], onnx.ModelProto], Callable[[onnx.ModelProto], None]]] = {
    "relu-made-clip": (FIXTURES["resnet"], lambda m: ort_optimized(m, "basic"), _relu_to_clip),
    "clip-made-relu": (_clipped_resnet, lambda m: ort_optimized(m, "basic"), _clip_to_relu),
    "clip-bounds": (FIXTURES["mobilenet"], to_float16, _clip_bounds),
    "hardsigmoid-slope": (FIXTURES["mobilenet"], lambda m: ort_optimized(m, "basic"), _hard_sigmoid_slope),
    "fused-leakyrelu-slope": (FIXTURES["contrib_fused_conv"], to_float16, _leaky_slope),
    "layernorm-epsilon": (FIXTURES["encoder_prenorm"], lambda m: ort_optimized(m, "basic"), _layer_norm_epsilon),
    "batchnorm-epsilon": (FIXTURES["unfolded_bn"], to_float16, _batch_norm_epsilon),
    "softmax-axis": (FIXTURES["encoder_prenorm"], to_float16, _softmax_axis),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("permuted", [False, True], ids=["as-is", "permuted"])
def test_an_operator_changed_in_a_converted_copy_is_modified(tmp_path: Path, case: str, permuted: bool) -> None:
    build, convert, edit = CASES[case]
    source = build(0)
    suspect = convert(permute_copy(source, 3)[0] if permuted else source)
    clean = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "clean.onnx"))
    assert clean.verdict == ("permuted" if permuted else "converted"), clean.summary  # as the converter wrote it
    edit(suspect)
    assert not verify_models(source, suspect).equivalent  # the edit changes what the model computes
    result = audit(tmp_path / "reference.onnx", _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "operators changed with the weights kept" in result.summary, result.summary


def test_the_changed_operator_is_named() -> None:
    source = FIXTURES["mobilenet"](0)
    suspect = to_float16(source)
    _clip_bounds(suspect)
    label = _nodes(suspect, "Clip")[0].name
    assert changed_operators(source, suspect) == [
        f"Clip '{label}' computes relu (0, 0.5) in the suspect, which no relu operator of the reference computes"]


#: Converters whose outputs must read as the same operators, both ways round (the test of the test).
CONVERTERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "ort-basic": lambda m: ort_optimized(m, "basic"), "ort-extended": lambda m: ort_optimized(m, "extended"),
    "ort-all": lambda m: ort_optimized(m, "all"), "float16": to_float16,
}  # fmt: skip


@pytest.mark.parametrize("converter", sorted(CONVERTERS))
@pytest.mark.parametrize("name", ["mobilenet", "contrib_fused_conv", "encoder_prenorm", "unfolded_bn", "bert_like"])
def test_what_converters_write_changes_no_operator(name: str, converter: str) -> None:
    """Fused activations (``activation_params``), HardSwish fused from HardSigmoid, bounds in float16: no edit."""
    source = FIXTURES[name](0)
    converted = CONVERTERS[converter](source)
    assert changed_operators(source, converted) == [] and changed_operators(converted, source) == []


def _graph(*nodes: onnx.NodeProto, opset: int = 17) -> onnx.ModelProto:
    bounds = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), n) for n, v in (("zero", 0.0), ("six", 6.0), ("neg", -1.0))]
    return helper.make_model(helper.make_graph(list(nodes), "g", [], [], initializer=bounds),
                             opset_imports=[helper.make_opsetid("", opset)])


def test_operators_are_read_as_what_they_compute() -> None:
    """Spellings of one computation match; another computation of the same kind does not."""
    relu = _graph(helper.make_node("Relu", ["x"], ["y"], name="r"))
    clip_open = _graph(helper.make_node("Clip", ["x", "zero"], ["y"], name="c"))
    relu6 = _graph(helper.make_node("Clip", ["x", "zero", "six"], ["y"], name="c"))
    relu6_old = _graph(helper.make_node("Clip", ["x"], ["y"], name="c", min=0.0, max=6.0), opset=9)
    fused6 = _graph(helper.make_node("FusedConv", ["x", "w"], ["y"], name="f", domain="com.microsoft",
                                     activation="Clip", activation_params=[0.0, 6.0]))
    assert changed_operators(relu, clip_open) == [] and changed_operators(clip_open, relu) == []
    assert changed_operators(relu6, relu6_old) == [] and changed_operators(relu6, fused6) == []
    assert changed_operators(relu, relu6) and changed_operators(relu6, relu)
    # ONNX Runtime's ReluClipFusion: Relu then Clip(-1, 6) is Clip(0, 6)
    relu_clip = _graph(helper.make_node("Relu", ["x"], ["r"], name="r"), helper.make_node("Clip", ["r", "neg", "six"], ["y"], name="c"))
    assert changed_operators(relu_clip, relu6) == []
    leaky = _graph(helper.make_node("LeakyRelu", ["x"], ["y"], name="l"))
    for op_type, attributes in [("LeakyRelu", {"alpha": 0.2}), ("Elu", {"alpha": 0.5}), ("Selu", {"gamma": 2.0}),
                                ("HardSigmoid", {"beta": 0.1}), ("ThresholdedRelu", {"alpha": 2.0}), ("Celu", {"alpha": 3.0})]:
        plain = _graph(helper.make_node(op_type, ["x"], ["y"], name="a"))
        edited = _graph(helper.make_node(op_type, ["x"], ["y"], name="a", **attributes))
        assert changed_operators(plain, edited), op_type
        assert changed_operators(plain, _graph(helper.make_node(op_type, ["x"], ["y"], name="b"))) == []
    explicit = _graph(helper.make_node("LeakyRelu", ["x"], ["y"], name="l", alpha=0.01))
    assert changed_operators(leaky, explicit) == []
    # A HardSigmoid(1/6, 1/2) times x is the HardSwish ONNX Runtime fuses
    hard_sigmoid = _graph(helper.make_node("HardSigmoid", ["x"], ["h"], name="h", alpha=1 / 6, beta=0.5))
    assert changed_operators(hard_sigmoid, _graph(helper.make_node("HardSwish", ["x"], ["y"], name="s"))) == []
    # Softmax over the last axis, in opset 12's 2-D coercion and opset 13's axis
    legacy = _graph(helper.make_node("Softmax", ["x"], ["y"], name="s", axis=-1), opset=12)
    modern = _graph(helper.make_node("Softmax", ["x"], ["y"], name="s"))
    assert changed_operators(legacy, modern) == []
    assert changed_operators(modern, _graph(helper.make_node("Softmax", ["x"], ["y"], name="s", axis=-2)))
