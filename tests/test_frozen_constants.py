"""Audit across a conversion compares the constants no permutation moves, too (issue 13).

A bias on a residual stream pinned by the graph input, or a head whose both axes are pinned, has
no plan: resync never reads it. Before, the audit across a conversion compared only constants
of permutable groups, so a real change to such a constant made before the conversion read
``converted`` (exit 0): a verdict without its evidence. Each conversion here is the real tool's
output (ONNX Runtime's float16 converter and offline optimizer), each skipped with the reason
where it does not import.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlady
from onnxlady import analyze
from onnxlady.testing import copy_model, permute_copy

_DIM, _HIDDEN, _TOKENS = 16, 32, 8
_FROZEN = ("block1_b2", "block0_b2", "head_w", "head_b")


def _residual_model() -> onnx.ModelProto:
    """Two residual MLP blocks ``x + (relu(x W1 + b1) W2 + b2)`` and a head; x is the graph input.

    A second output is causal attention of the input on itself: its mask holds float32's lowest
    value above the diagonal, which a float16 converter clamps to -65504.
    """
    rng = np.random.default_rng(0)
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def constant(name: str, shape: tuple[int, ...], std: float) -> str:
        initializers.append(numpy_helper.from_array(rng.normal(0.0, std, shape).astype(np.float32), name))
        return name

    x = "x"
    for block in range(2):
        p = f"block{block}_"
        nodes += [
            helper.make_node("MatMul", [x, constant(p + "w1", (_DIM, _HIDDEN), 0.3)], [p + "mm1"]),
            helper.make_node("Add", [p + "mm1", constant(p + "b1", (_HIDDEN,), 0.1)], [p + "add1"]),
            helper.make_node("Relu", [p + "add1"], [p + "relu"]),
            helper.make_node("MatMul", [p + "relu", constant(p + "w2", (_HIDDEN, _DIM), 0.3)], [p + "mm2"]),
            helper.make_node("Add", [p + "mm2", constant(p + "b2", (_DIM,), 0.1)], [p + "add2"]),
            helper.make_node("Add", [x, p + "add2"], [p + "out"]),
        ]
        x = p + "out"
    nodes += [
        helper.make_node("MatMul", [x, constant("head_w", (_DIM, 4), 0.3)], ["head_mm"]),
        helper.make_node("Add", ["head_mm", constant("head_b", (4,), 0.1)], ["y"]),
    ]
    mask = np.triu(np.full((_TOKENS, _TOKENS), np.finfo(np.float32).min, dtype=np.float32), 1)
    initializers.append(numpy_helper.from_array(mask, "causal_mask"))
    nodes += [
        helper.make_node("Transpose", ["x"], ["x_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "x_t"], ["scores"]),
        helper.make_node("Add", ["scores", "causal_mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["attention"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _TOKENS, _DIM])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, _TOKENS, 4]),
            helper.make_tensor_value_info("attention", TensorProto.FLOAT, [1, _TOKENS, _TOKENS]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _float16(model: onnx.ModelProto) -> onnx.ModelProto:
    float16 = pytest.importorskip("onnxruntime.transformers.float16", reason="onnxruntime.transformers not installed")
    return float16.convert_float_to_float16(copy_model(model), keep_io_types=True)


def _ort_extended(model: onnx.ModelProto) -> onnx.ModelProto:
    import os
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


_CONVERTERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "float16": _float16,
    "ort-extended": _ort_extended,
}


def _changed(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy with a few values of ``name`` moved by 20 %, far above any storage error."""
    changed = copy_model(model)
    for index, tensor in enumerate(changed.graph.initializer):
        if tensor.name == name:
            value = numpy_helper.to_array(tensor).copy()
            value.reshape(-1)[:3] *= 1.2
            changed.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, name))
            return changed
    raise KeyError(name)


def test_the_constants_are_frozen() -> None:
    """The premise: no permutation moves these constants, so resync never reads them."""
    analysis = analyze(_residual_model())
    planned = {plan.source for plan in analysis.tensors}
    assert planned  # the hidden layers do move
    assert not planned & set(_FROZEN)


@pytest.mark.parametrize("converter", sorted(_CONVERTERS))
def test_unchanged_copies_keep_their_verdicts(converter: str) -> None:
    reference = _residual_model()
    convert = _CONVERTERS[converter]
    report = onnxlady.audit(reference, convert(reference)).to_json()
    assert report["verdict"] == "converted", report["summary"]
    permuted, _, _, _ = permute_copy(reference, seed=3)
    report = onnxlady.audit(reference, convert(permuted)).to_json()
    assert report["verdict"] == "permuted", report["summary"]


@pytest.mark.parametrize("converter", sorted(_CONVERTERS))
@pytest.mark.parametrize("tensor", _FROZEN)
def test_a_change_to_a_frozen_constant_before_the_conversion_is_a_change(converter: str, tensor: str) -> None:
    reference = _residual_model()
    convert = _CONVERTERS[converter]
    for seed in (None, 3):  # in order, and permuted as well
        source = reference if seed is None else permute_copy(reference, seed=seed)[0]
        result = onnxlady.audit(reference, convert(_changed(source, tensor)))
        report = result.to_json()
        assert report["verdict"] not in ("converted", "permuted", "identical"), report["summary"]
        assert result.exit_code == 1
        assert tensor in report["differing_tensors"], report["differing_tensors"]


def test_a_clamped_mask_is_the_conversion_not_a_change() -> None:
    """float16 clamps the mask's -3.4e38 to -65504: storage, named neither a change nor a changed bias."""
    reference = _residual_model()
    suspect = _float16(reference)
    stored = next(numpy_helper.to_array(t) for t in suspect.graph.initializer if t.name == "causal_mask")
    assert stored.dtype == np.float16 and float(stored.min()) == -65504.0  # the converter clamped
    assert onnxlady.audit(reference, suspect).to_json()["verdict"] == "converted"
    report = onnxlady.audit(reference, _float16(_changed(reference, "block0_w1"))).to_json()
    assert report["verdict"] == "modified"
    assert report["differing_tensors"] == ["block0_w1"]
    assert report["perturbation"]["evidence"]["non_weight_constants_changed"] == []
