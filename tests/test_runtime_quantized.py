"""``quantize_dynamic`` on weights held by ``Constant`` nodes: quantized at run time, read as the floats.

Paddle's exporter writes weights as ``Constant`` nodes (PP-OCR's classifier); ONNX Runtime's
dynamic quantizer then leaves each weight float and quantizes it at run time through a
``DynamicQuantizeLinear`` feeding ``ConvInteger`` (its scale enters the scale ``Mul``). The
suspects here are written by the real quantizer.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._resync._entry import resync_model
from onnxlady._resync._match import check_same_model, match_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer's advice to pre-process


def constant_weight_convnet(seed: int = 0) -> onnx.ModelProto:
    """Two convolutions (no bias, as Paddle writes a Conv before its BatchNorm) with weights in Constant nodes."""
    rng = np.random.default_rng(seed)
    nodes = []

    def constant(name: str, shape: tuple[int, ...]) -> str:
        value = numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        nodes.append(helper.make_node("Constant", [], [name], name=f"{name}.node", value=value))
        return name

    w1, w2 = constant("c1.w", (16, 3, 3, 3)), constant("c2.w", (24, 16, 3, 3))
    head = constant("fc.w", (24, 10))
    nodes += [
        helper.make_node("Conv", ["x", w1], ["c1"], name="c1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", w2], ["c2"], name="c2", pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node("MatMul", ["flat", head], ["y"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "constant_weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    quantization = pytest.importorskip("onnxruntime.quantization")
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "source.onnx", Path(folder) / "dynamic.onnx"
        onnx.save(model, source)
        quantization.quantize_dynamic(str(source), str(target))
        quantized = onnx.load(str(target))
    # The form under test: ConvInteger reading a DynamicQuantizeLinear of a float Constant.
    producer = {name: node for node in quantized.graph.node for name in node.output}
    convs = [node for node in quantized.graph.node if node.op_type == "ConvInteger"]
    assert convs and all(producer[node.input[1]].op_type == "DynamicQuantizeLinear" for node in convs)
    return quantized


def test_resync_and_audit_across_run_time_quantized_weights() -> None:
    reference = constant_weight_convnet()
    model, _, _, key = permute_copy(reference, 3)
    suspect = _dynamic(model)
    match = match_models(reference, suspect)
    check_same_model(match)
    assert match.confidence == pytest.approx(1.0)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    # Solved in the reference's form: suspect neuron matches[gid][j] is reference neuron j.
    for gid, perm in key.permutations().items():
        assert np.array_equal(np.argsort(result.across.matches[gid]), perm), gid
    assert verify_models(suspect, result.model, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0
    assert "quantized" in {finding.kind for finding in report.conversions}
    report = audit_models(reference, _dynamic(reference))
    assert report.verdict == "converted" and report.exit_code == 0


def test_a_wrong_permutation_or_a_changed_weight_is_caught() -> None:
    """The checks above can fail: a producer-only permutation, or one changed float weight, is `modified`."""
    reference = constant_weight_convnet()
    model, _, _, _ = permute_copy(reference, 3)
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent
    report = audit_models(reference, _dynamic(wrong))
    assert report.verdict == "modified" and report.exit_code == 1
    changed = _dynamic(model)
    node = next(n for n in changed.graph.node if n.op_type == "Constant" and n.output[0] == "c2.w")
    value = numpy_helper.to_array(node.attribute[0].t).copy()
    value[0, 0, 0, 0] += 0.5
    node.attribute[0].t.CopyFrom(numpy_helper.from_array(value, "c2.w"))
    report = audit_models(reference, changed)
    assert report.verdict == "modified" and report.exit_code == 1
