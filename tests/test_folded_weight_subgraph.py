"""Weights computed in the graph from constants, folded into stored weights by the deployment converter.

Held-out round 17, F1: NFNet's ScaledStdConv standardizes each Conv weight in the graph (``V ->
BatchNormalization(training_mode=1) -> Reshape -> Conv``, :func:`fixtures.models.build_std_conv`)
and a weight-norm export computes ``w = g * v / ReduceL2(v)``. A constant-folding converter
(onnxslim, ONNX Runtime's extended optimizer, onnxsim, polygraphy) writes these as plain stored
weights. audit and resync refused the untouched converted copy ("different models: 3.5 % of them
pair"), listing the same Conv on both sides. The resync now reads such a weight as the value its
subgraph computes (:mod:`onnxlady._resync._statistics`), and solves the stored constants it is
made of through that value, so the folded copy pairs: converted, permuted, tampers modified.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from fixtures.deployment import CONVERTERS, unavailable
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._computed import read_computed
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only
from tests.test_deployment import check_resync_across

CONVERTER_NAMES = ("onnxslim", "ort-extended")
MODELS = ("std_conv", "weight_norm")


def build_weight_norm(seed: int = 0) -> onnx.ModelProto:
    """``torch.nn.utils.parametrizations.weight_norm`` exported without constant folding.

    Two Conv1d and a Linear whose weights are ``g * v / ReduceL2(v)`` (the norm over every axis
    but the output channels), a residual Add between the convs, a plain Linear head.
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def param(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def normed(name: str, shape: tuple[int, ...]) -> str:
        v = param(f"{name}.v", rng.standard_normal(shape))
        g = param(f"{name}.g", rng.uniform(0.5, 1.5, (shape[0],) + (1,) * (len(shape) - 1)))
        axes = list(range(1, len(shape)))
        nodes.append(
            helper.make_node("ReduceL2", [v], [f"{name}.norm"], name=f"{name}.ReduceL2", axes=axes, keepdims=1)
        )
        nodes.append(helper.make_node("Div", [v, f"{name}.norm"], [f"{name}.direction"], name=f"{name}.Div"))
        nodes.append(helper.make_node("Mul", [f"{name}.direction", g], [f"{name}.weight"], name=f"{name}.Mul"))
        return f"{name}.weight"

    nodes.append(helper.make_node("Conv", ["seq", normed("c1", (24, 8, 3)), param("c1.bias", rng.standard_normal(24) * 0.1)],
                                  ["c1.out"], name="c1.Conv", pads=[1, 1], kernel_shape=[3]))  # fmt: skip
    nodes.append(helper.make_node("LeakyRelu", ["c1.out"], ["a1"], name="act1", alpha=0.1))
    nodes.append(helper.make_node("Conv", ["a1", normed("c2", (24, 24, 3)), param("c2.bias", rng.standard_normal(24) * 0.1)],
                                  ["c2.out"], name="c2.Conv", pads=[1, 1], kernel_shape=[3]))  # fmt: skip
    nodes.append(helper.make_node("LeakyRelu", ["c2.out"], ["a2"], name="act2", alpha=0.1))
    nodes.append(helper.make_node("Add", ["a2", "a1"], ["res"], name="residual"))
    nodes.append(helper.make_node("ReduceMean", ["res"], ["pooled"], name="pool", axes=[-1], keepdims=0))
    nodes.append(helper.make_node("Gemm", ["pooled", normed("l1", (32, 24)), param("l1.bias", rng.standard_normal(32) * 0.1)],
                                  ["l1.out"], name="l1.Gemm", transB=1))  # fmt: skip
    nodes.append(helper.make_node("Tanh", ["l1.out"], ["t"], name="tanh"))
    nodes.append(helper.make_node("Gemm", ["t", param("l2.weight", rng.standard_normal((6, 32)) * 0.3),
                                           param("l2.bias", rng.standard_normal(6) * 0.1)], ["out"], name="l2.Gemm", transB=1))  # fmt: skip
    graph = helper.make_graph(
        nodes, "weight_norm",
        [helper.make_tensor_value_info("seq", TensorProto.FLOAT, [1, 8, 40])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _reference(name: str) -> onnx.ModelProto:
    return build_weight_norm(0) if name == "weight_norm" else FIXTURES[name](0)


def _convert(model: onnx.ModelProto, converter: str) -> onnx.ModelProto:
    reason = unavailable(converter)
    if reason is not None:
        pytest.skip(reason)
    converted = CONVERTERS[converter](model)
    stored = {t.name for t in converted.graph.initializer}
    layers = [node for node in converted.graph.node if node.op_type in ("Conv", "FusedConv", "Gemm", "FusedGemm")]
    assert layers and all(node.input[1] in stored for node in layers), "the converter folded the weights"
    return converted


_CONVERTED: dict[tuple[str, str], onnx.ModelProto] = {}


def _converted(name: str, converter: str) -> onnx.ModelProto:
    """The untouched reference ``name`` through ``converter``, converted once for the file's tests."""
    if (name, converter) not in _CONVERTED:
        _CONVERTED[name, converter] = _convert(_reference(name), converter)
    return _CONVERTED[name, converter]


def _set(model: onnx.ModelProto, name: str, change) -> onnx.ModelProto:
    """A copy with initializer ``name`` replaced by ``change(its values)``."""
    changed = copy_model(model)
    tensor = next(t for t in changed.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()).astype(np.float32), name))
    return changed


def _noise(values: np.ndarray, row: tuple, size: float = 0.5) -> np.ndarray:
    values[row] += size * values[row].std() * np.random.default_rng(0).standard_normal(values[row].shape)
    return values


def _swap(values: np.ndarray, axis: int) -> np.ndarray:
    index = [slice(None)] * values.ndim
    index[axis] = [0, 1]
    swapped = [slice(None)] * values.ndim
    swapped[axis] = [1, 0]
    values[tuple(index)] = values[tuple(swapped)]
    return values


#: Edits made to the reference before the conversion, each a change of function.
TAMPERS = {
    ("std_conv", "raw-noise"): lambda m: _set(m, "block.conv1.weight", lambda a: _noise(a, (0, 3))),
    ("std_conv", "raw-rows-swapped"): lambda m: _set(m, "block.conv2.weight", lambda a: _swap(a, 1)),
    ("std_conv", "gain"): lambda m: _set(
        m, "block.conv1.gain", lambda a: a * np.where(np.arange(a.size) == 3, 1.5, 1.0)
    ),
    ("weight_norm", "g"): lambda m: _set(
        m, "c2.g", lambda a: a * np.where(np.arange(a.size) == 5, 1.5, 1.0).reshape(a.shape)
    ),
    ("weight_norm", "v-noise"): lambda m: _set(m, "c2.v", lambda a: _noise(a, (5,))),
    ("weight_norm", "gemm-v-noise"): lambda m: _set(m, "l1.v", lambda a: _noise(a, (7,), 3.0)),
}


@pytest.mark.parametrize("converter", CONVERTER_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_the_untouched_folded_copy_is_converted(name: str, converter: str) -> None:
    reference = _reference(name)
    report = audit_models(reference, _converted(name, converter))
    assert report.verdict == "converted" and report.exit_code == 0
    assert "constants-folded" in {finding.kind for finding in report.conversions}


@pytest.mark.parametrize("converter", CONVERTER_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_a_permuted_folded_copy_is_permuted_and_resyncs(name: str, converter: str) -> None:
    reference = _reference(name)
    model, _, _, key = permute_copy(reference, 3)
    suspect = _convert(model, converter)
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0
    check_resync_across(reference, suspect, key)  # Psi 100, equivalent, a wrong permutation caught


@pytest.mark.parametrize(("name", "tamper"), sorted(TAMPERS))
def test_a_tamper_before_the_fold_is_modified(name: str, tamper: str) -> None:
    reference = _reference(name)
    tampered = TAMPERS[name, tamper](reference)
    assert not verify_models(reference, tampered, provider="cpu").equivalent  # a change of function
    report = audit_models(reference, _convert(tampered, "onnxslim"))
    assert report.verdict == "modified" and report.exit_code == 1
    assert "weights modified" in report.summary


@pytest.mark.parametrize("name", MODELS)
def test_a_folded_row_scaled_is_modified(name: str) -> None:
    """The converted copy's folded weight: one row x1.5 (the tester's ``t_row``)."""
    converted = _converted(name, "onnxslim")
    conv = next(
        node
        for node in converted.graph.node
        if node.op_type == "Conv" and node.input[1] in {t.name for t in converted.graph.initializer}
    )
    tampered = _set(
        converted,
        conv.input[1],
        lambda a: a * np.where(np.arange(a.shape[0]) == 2, 1.5, 1.0).reshape((-1,) + (1,) * (a.ndim - 1)),
    )
    report = audit_models(_reference(name), tampered)
    assert report.verdict == "modified" and report.exit_code == 1


@pytest.mark.parametrize("name", MODELS)
def test_the_evaluated_weights_are_the_folded_ones_within_a_tight_bound(name: str) -> None:
    """The value read (float64) and the converter's float32 fold agree within the bound read with it, a small one."""
    reference = _reference(name)
    converted = _converted(name, "onnxslim")
    graph = ModelGraph(reference)
    folded = {t.name: numpy_helper.to_array(t) for t in converted.graph.initializer}
    initial = {t.name for t in reference.graph.initializer}
    computed = [
        node for node in reference.graph.node if node.op_type in ("Conv", "Gemm") and node.input[1] not in initial
    ]
    stored = [node for node in converted.graph.node if node.op_type in ("Conv", "Gemm")]
    assert len(computed) == (4 if name == "std_conv" else 3)
    by_name = {node.name: node for node in stored}
    for node in computed:
        read = read_computed(graph, node.input[1])
        assert read is not None, node.name
        value = folded[by_name[node.name].input[1]].astype(np.float64)
        assert np.all(np.abs(read.value - value) <= read.error + 2.0**-24 * np.abs(value))
        assert read.error.max() <= 1e-4 * np.abs(read.value).max()  # a bound that still tells a change


def test_weight_norm_moves_through_its_norm_and_keeps_the_function() -> None:
    """The analysis carries a permutation through ``g * v / ReduceL2(v)`` (a norm over the other axes is unchanged by it)."""
    assert analyze(build_weight_norm(0)).untied == []  # every use of v moves alike: no copy in stored order
    reference = build_weight_norm(0)
    analysis = analyze(reference)
    assert {g.size for g in analysis.permutable_groups} == {24, 32}
    model, _, _, _ = permute_copy(reference, 7)
    assert verify_models(reference, model, provider="cpu").equivalent
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(reference, wrong, provider="cpu").equivalent


def test_a_refusal_names_what_differs() -> None:
    """A weight computed by an operator not evaluated (Tanh) beside its folded copy: the refusal says how each holds it."""
    reference = _reference("weight_norm")
    for node in reference.graph.node:
        if node.name == "c1.Mul":
            node.op_type, node.input[:] = "Tanh", [node.input[0]]
    converted = _convert(reference, "onnxslim")
    with pytest.raises(OnnxladyError) as raised:
        audit_models(reference, converted)
    message = str(raised.value)
    assert "Conv 'c1.Conv'" in message
    assert "computed in the graph by operators not evaluated here" in message and "stored weights" in message
