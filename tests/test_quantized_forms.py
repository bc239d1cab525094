"""Resync and audit across ONNX Runtime's own quantizer: its dynamic and its QOperator forms (issue 12).

``onnxruntime.quantization.quantize_dynamic`` writes MatMulInteger / ConvInteger with a Cast and a
scale Mul after them and a quantized embedding table dequantized after its Gather;
``quantize_static(..., quant_format=QuantFormat.QOperator)`` writes QLinearConv, QLinearMatMul,
QGemm and com.microsoft QLinear activations. The real quantizer runs on permuted fixtures here:
resync with the true key puts every neuron back (Psi 100), its output keeps the suspect's
quantized form and computes what the suspect computes (a wrong permutation is caught), audit
calls the pair ``permuted`` with the quantization named, and a real weight change is still seen.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from onnxlady import analyze, unpermute_model
from onnxlady._audit._verdicts import audit_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._entry import resync_model
from onnxlady._resync._quantized_forms import read_quantized
from onnxlady._verify._compare import verify_models
from onnxlady.testing import constant_bytes, copy_model, permute_copy, permute_producer_only

quantization = pytest.importorskip(
    "onnxruntime.quantization", reason="onnxruntime.quantization (ONNX Runtime's quantizer) is not installed"
)



def _silu_concat(seed: int) -> onnx.ModelProto:
    """Conv + SiLU (Sigmoid, Mul), two branches concatenated, a 1x1 Conv, pooled: YOLO's blocks.

    Quantized in QOperator form it holds QLinearSigmoid, QLinearMul and QLinearConcat, and a QLinearAdd
    holding one Conv's bias.
    """
    rng = np.random.default_rng(seed)
    weights = []

    def conv(name: str, source: str, out: int, inp: int, k: int) -> list[onnx.NodeProto]:
        std = np.sqrt(2.0 / (inp * k * k))
        weights.append(numpy_helper.from_array((rng.standard_normal((out, inp, k, k)) * std).astype(np.float32), f"{name}.w"))
        if name != "b":
            weights.append(numpy_helper.from_array((rng.standard_normal(out) * 0.1).astype(np.float32), f"{name}.b"))
            return [helper.make_node("Conv", [source, f"{name}.w", f"{name}.b"], [name], pads=[k // 2] * 4)]
        # The bias as an Add of [1, C, 1, 1] (Paddle's export): QOperator writes a QLinearAdd of it.
        weights.append(numpy_helper.from_array((rng.standard_normal((1, out, 1, 1)) * 0.1).astype(np.float32), f"{name}.b"))
        return [helper.make_node("Conv", [source, f"{name}.w"], [f"{name}.nobias"], pads=[k // 2] * 4),
                helper.make_node("Add", [f"{name}.nobias", f"{name}.b"], [name])]  # fmt: skip

    def silu(source: str) -> list[onnx.NodeProto]:
        return [helper.make_node("Sigmoid", [source], [f"{source}.sig"]),
                helper.make_node("Mul", [source, f"{source}.sig"], [f"{source}.silu"])]  # fmt: skip

    nodes = [*conv("c1", "input", 8, 3, 3), *silu("c1"), *conv("a", "c1.silu", 8, 8, 1), *silu("a"),
             *conv("b", "c1.silu", 8, 8, 3), *silu("b"),
             helper.make_node("Concat", ["a.silu", "b.silu"], ["cat"], axis=1), *conv("c", "cat", 4, 16, 1),
             helper.make_node("GlobalAveragePool", ["c"], ["pool"]), helper.make_node("Flatten", ["pool"], ["output"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "silu_concat", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])], weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


BUILDERS = {**FIXTURES, "silu_concat": _silu_concat}
#: (fixture, form): the dynamic form on MatMul, Gemm, Conv and embedding models; QOperator on
#: MatMul (QLinearMatMul + QLinearAdd), Conv (QLinearConv, QLinearAdd, QGemm) and SiLU/Concat
#: (QLinearSigmoid, QLinearMul, QLinearConcat) models, and transformers (QLinearMatMul of two
#: computed operands in attention, QLinearSoftmax, an integer embedding table read by QLinearAdd).
CASES = (
    ("matmul_mlp", "dynamic"),
    ("resnet", "dynamic"),
    ("bert_like", "dynamic"),
    ("encoder_prenorm", "dynamic"),
    ("matmul_mlp", "qoperator"),
    ("resnet", "qoperator"),
    ("silu_concat", "qoperator"),
    ("encoder_prenorm", "qoperator"),
    ("bert_like", "qoperator"),
    # The real QDQ form (not fixtures.conversions' imitation): ONNX Runtime rounds the activation
    # between a MatMul and its bias Add (MatMul -> Q -> DQ -> Add).
    ("matmul_mlp", "qdq"),
    ("encoder_prenorm", "qdq"),
    ("bert_like", "qdq"),
)
#: The operators that hold the weights in each form.
INTEGER_OPS = {
    "dynamic": {"MatMulInteger", "ConvInteger"},
    "qoperator": {"QLinearMatMul", "QLinearConv", "QGemm"},
    "qdq": {"DequantizeLinear"},
}
#: An int8 activation path moves outputs by a few quantization steps when neurons are re-ordered
#: (accumulation order does not change integer sums, but float steps between them may round
#: differently); a wrong permutation moves them by far more.
TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}


class _Calibration(quantization.CalibrationDataReader):  # type: ignore[misc, name-defined]
    """Four random batches for the static quantizer's calibration."""

    def __init__(self, model: onnx.ModelProto) -> None:
        rng = np.random.default_rng(0)
        batches = []
        for _ in range(4):
            feeds = {}
            for value in model.graph.input:
                shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
                if value.type.tensor_type.elem_type == TensorProto.INT64:  # token and position ids
                    feeds[value.name] = rng.integers(0, shape[-1], shape).astype(np.int64)
                else:
                    feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
            batches.append(feeds)
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize(model: onnx.ModelProto, form: str, folder: Path, stem: str) -> onnx.ModelProto:
    """``model`` through ONNX Runtime's quantizer (files ``stem``-* in ``folder``), loaded back."""
    source, target = folder / f"{stem}-{form}-source.onnx", folder / f"{stem}-{form}-quantized.onnx"
    onnx.save(model, str(source))
    if form == "dynamic":
        quantization.quantize_dynamic(str(source), str(target))
    else:
        quant_format = quantization.QuantFormat.QDQ if form == "qdq" else quantization.QuantFormat.QOperator
        quantization.quantize_static(str(source), str(target), _Calibration(model), quant_format=quant_format)
    return onnx.load(str(target))


@functools.cache
def _case(name: str, form: str, folder: str) -> tuple[onnx.ModelProto, onnx.ModelProto, object]:
    """(reference, permuted and quantized suspect, true key), built once per case."""
    reference = BUILDERS[name](0)
    permuted, _, _, key = permute_copy(reference, 7)
    return reference, _quantize(permuted, form, Path(folder), f"{name}-permuted"), key


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("quantized-forms"))


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize(("name", "form"), CASES)
def test_resync_across_ort_quantizer(folder: str, name: str, form: str) -> None:
    reference, suspect, key = _case(name, form, folder)
    assert INTEGER_OPS[form] & set(_ops(suspect)), "the quantizer wrote none of the integer forms"
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    # The output keeps the suspect's quantized form and computes what the suspect computes...
    assert _ops(result.model) == _ops(suspect)
    assert sorted(t.data_type for t in result.model.graph.initializer) == sorted(
        t.data_type for t in suspect.graph.initializer
    )
    assert verify_models(suspect, result.model, provider="cpu", **TOLERANCE).equivalent
    # ...which a wrong permutation would not.
    wrong = copy_model(result.model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(suspect, wrong, provider="cpu", **TOLERANCE).equivalent
    # The recovered key turns the suspect into the output, bit for bit.
    restored = copy_model(suspect)
    unpermute_model(restored, result.key)
    assert constant_bytes(restored) == constant_bytes(result.model)


@pytest.mark.parametrize(("name", "form"), CASES)
def test_audit_calls_a_permuted_ort_quantized_model_permuted(folder: str, name: str, form: str) -> None:
    reference, suspect, _ = _case(name, form, folder)
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary
    quantized = [c for c in report.conversions if c.kind == "quantized"]
    assert quantized and quantized[0].model == "suspect"
    assert any(op in quantized[0].detail for op in INTEGER_OPS[form])


def _change_one_weight(model: onnx.ModelProto) -> onnx.ModelProto:
    """The first integer weight of an integer layer with one value moved by 60 quantization steps."""
    changed = copy_model(model)
    graph = ModelGraph(changed)
    slots = {"MatMulInteger": 1, "ConvInteger": 1, "QLinearMatMul": 3, "QLinearConv": 3, "QGemm": 3}
    slots |= {"DequantizeLinear": 0}  # QDQ: the int8 weight a DequantizeLinear reads
    for node in changed.graph.node:
        if node.op_type not in slots:
            continue
        name = node.input[slots[node.op_type]]
        tensor = graph.initializers.get(name)
        if tensor is None:
            continue
        values = numpy_helper.to_array(tensor).copy()
        flat = values.reshape(-1)
        limits = np.iinfo(values.dtype)
        flat[0] = flat[0] - 60 if int(flat[0]) - 60 >= limits.min else flat[0] + 60
        tensor.CopyFrom(numpy_helper.from_array(values, name))
        return changed
    raise AssertionError("no integer weight found")


@pytest.mark.parametrize(("name", "form"), (("matmul_mlp", "dynamic"), ("resnet", "qoperator"), ("matmul_mlp", "qdq")))
def test_audit_sees_a_real_weight_change_through_the_quantizer(folder: str, name: str, form: str) -> None:
    reference, suspect, _ = _case(name, form, folder)
    report = audit_models(reference, _change_one_weight(suspect))
    assert report.verdict not in ("permuted", "converted", "identical") and report.exit_code == 1, report.summary


@pytest.mark.parametrize(("name", "form"), [case for case in CASES if case[1] != "qdq"])  # QDQ: test_across.py
def test_dequantized_weights_are_within_half_a_step_of_the_float_ones(folder: str, name: str, form: str) -> None:
    """Read unpermuted: every dequantized weight lies within its bound of the float weight it came from."""
    reference = BUILDERS[name](0)
    quantized = _quantize(reference, form, Path(folder), f"{name}-plain")
    floats = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in reference.graph.initializer}
    graph = ModelGraph(quantized)
    checked = 0
    for index, node in enumerate(quantized.graph.node):
        slot = {"MatMulInteger": 1, "ConvInteger": 1, "QLinearMatMul": 3, "QLinearConv": 3}.get(node.op_type)
        if slot is None or node.input[slot] not in graph.initializers:  # attention: two computed operands
            continue
        read = read_quantized(graph, index, slot)
        assert read is not None, node.name
        original = floats[node.input[slot].removesuffix("_quantized")]
        if original.ndim == 2 and original.shape != read.value.shape:  # a Gemm's transB weight, stored as [K, N]
            original = original.T
        assert read.value.shape == original.shape
        assert np.all(np.abs(read.value - original) <= read.error), node.name
        assert np.all(read.error > 0)
        checked += 1
    assert checked
