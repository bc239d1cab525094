"""ONNX Runtime's ``FusedConv`` with a sum input ``Z``: a Conv and the residual Add after it fused.

``convert_onnx_models_to_ort --optimization_style Fixed`` (the ORT-mobile path) optimizes at
``ORT_ENABLE_ALL`` with the ``NchwcTransformer`` disabled; its ``ConvAddActivationFusion`` then
writes ``Add(Conv(x), z)`` (and a Relu after it) as ``com.microsoft FusedConv(x, W, B, z)``. The
residual ``z`` flows past the convolution to its output, as through the Add it was, so the
layers that feed ``z`` still feed the layers after the Add (held-out round 16, F1: GhostNet's
shortcut convolutions, refused as "different models" before). Every suspect here is written by
ONNX Runtime itself, the way that tool calls it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._resync._entry import resync_model
from onnxlady._resync._match import check_same_model, match_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def residual_cnn(seed: int = 0, *, stem: int = 8, blocks: int = 4) -> onnx.ModelProto:
    """A small CNN with GhostNet-like residuals: Conv + Add(+Relu) and a 1x1 shortcut Conv.

    Block 1 adds a 1x1 shortcut convolution of the block input (``stem`` channels wide) to the
    main branch (the shape round 16 found refused); blocks 2 to ``blocks`` add the block input
    itself and a Relu after the sum.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name: str, x: str, out: int, inp: int, k: int) -> str:
        weight = (rng.standard_normal((out, inp, k, k)) / np.sqrt(inp * k * k)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"{name}.w"))
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(out)).astype(np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, pads=[k // 2] * 4))
        return name

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"], name=f"{x}.relu"))
        return f"{x}.relu"

    stem_out = relu(conv("stem", "x", stem, 3, 3))
    main = conv("b1.c2", relu(conv("b1.c1", stem_out, 12, stem, 3)), 16, 12, 3)
    short = conv("b1.short", stem_out, 16, stem, 1)
    nodes.append(helper.make_node("Add", [short, main], ["b1.sum"], name="b1.sum"))
    x = "b1.sum"
    for block in range(2, blocks + 1):
        inner = conv(f"b{block}.c1", x, 16, 16, 3)
        nodes.append(helper.make_node("Add", [inner, x], [f"b{block}.sum"], name=f"b{block}.sum"))
        x = relu(f"b{block}.sum")
    head = conv("head", x, 10, 16, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [head], ["out"], name="pool"))
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def ort_mobile(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as ``convert_onnx_models_to_ort --optimization_style Fixed --save_optimized_onnx_model`` writes it."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "model.optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["NchwcTransformer"])  # fmt: skip
        return onnx.load(path)


def _summed(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "FusedConv" and len(n.input) > 3 and n.input[3]]


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_the_optimizer_writes_fused_convolutions_with_a_sum_input() -> None:
    """What the tests below read: every residual Add fused into a FusedConv's Z (this can fail)."""
    suspect = ort_mobile(residual_cnn())
    assert len(_summed(suspect)) == 4
    assert not [n for n in suspect.graph.node if n.op_type == "Add"]


#: The test CNN, and the ResNet fixture (a BatchNorm between each Conv and the residual Add,
#: folded; the shortcut Conv's output keeps the BatchNorm's name).
BUILDERS = {"residual": residual_cnn, "resnet": FIXTURES["resnet"]}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_untouched_optimized_copy_is_converted_with_the_fusion_named(name: str) -> None:
    reference = BUILDERS[name](0)
    assert _summed(ort_mobile(reference))
    report = audit_models(reference, ort_mobile(reference))
    assert report.verdict == "converted" and report.exit_code == 0, report.summary
    fused = " ".join(f.detail for f in report.conversions if f.kind == "fused")
    assert "residual Add" in fused and "FusedConv" in fused, fused


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_resync_of_the_permuted_optimized_copy_recovers_the_key(name: str) -> None:
    """REF vs ORT-mobile(permuted REF): Psi 100, audit `permuted`; a wrong permutation is caught."""
    reference = BUILDERS[name](0)
    model, _, _, key = permute_copy(reference, 3)
    assert key.permutations()
    suspect = ort_mobile(model)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert verify_models(suspect, result.model, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent
    report = audit_models(reference, ort_mobile(wrong))
    assert report.verdict == "modified" and report.exit_code == 1, report.summary


def _scaled_row(suspect: onnx.ModelProto) -> None:
    tensor = _initializer(suspect, _summed(suspect)[0].input[1])
    value = numpy_helper.to_array(tensor).copy()
    value[1] *= 1.5
    tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))


def _rewired_sum(suspect: onnx.ModelProto) -> None:
    # Block 4's residual reads block 2's output (same shape) instead of block 3's.
    node = _summed(suspect)[-1]
    assert node.input[3] == "b3.sum.relu"
    node.input[3] = "b2.sum.relu"


def _activation_changed(suspect: onnx.ModelProto) -> None:
    node = next(n for n in _summed(suspect) if any(a.name == "activation" for a in n.attribute))
    attribute = next(a for a in node.attribute if a.name == "activation")
    attribute.s = b"Sigmoid"


@pytest.mark.parametrize("tamper", [_scaled_row, _rewired_sum, _activation_changed])
def test_a_tampered_fused_convolution_is_caught(tamper) -> None:  # type: ignore[no-untyped-def]
    reference = residual_cnn()
    suspect = ort_mobile(reference)
    tamper(suspect)
    assert not verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.exit_code == 1 and report.verdict not in ("converted", "permuted", "identical"), report.summary


def test_another_model_through_the_same_path_is_still_refused() -> None:
    match = match_models(FIXTURES["resnet"](0), ort_mobile(residual_cnn()))
    with pytest.raises(OnnxladyError, match="different models"):
        check_same_model(match)
