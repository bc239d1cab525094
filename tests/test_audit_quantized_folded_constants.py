"""A constant folded and stored as a quantized activation is the reference's, within its step.

Held-out round 13, F13: ONNX Runtime's ``quant_pre_process`` folds an embedding lookup by
constant ids (SqueezeBERT's position embeddings) into a stored tensor, and ``quantize_static``
(QDQ) stores it as an activation behind a DequantizeLinear. The audit compared it with the
reference's value computed from constants at float rounding and called the untouched copy
``modified``. Its bound now takes half the DequantizeLinear's step; a quantized value moved by
more is still a change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.deployment import calibration_inputs
from onnxlady import audit

quantization = pytest.importorskip("onnxruntime.quantization")

SEQ, WIDTH = 8, 16


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((32, WIDTH)).astype(np.float32), "positions.table")
    ids = numpy_helper.from_array(np.arange(SEQ, dtype=np.int64)[None, :], "positions.ids")
    w1 = numpy_helper.from_array((rng.standard_normal((WIDTH, 32)) / 4).astype(np.float32), "fc1.weight")
    w2 = numpy_helper.from_array((rng.standard_normal((32, 4)) / 6).astype(np.float32), "fc2.weight")
    nodes = [
        helper.make_node("Gather", ["positions.table", "positions.ids"], ["positions"], name="positions.gather"),
        helper.make_node("Add", ["x", "positions"], ["embedded"], name="embed.add"),
        helper.make_node("MatMul", ["embedded", "fc1.weight"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "fc2.weight"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "folded_positions", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, 4])], [table, ids, w1, w2],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime's quantizer loads back
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("folded-quantized")
    reference, prepared, quantized = folder / "reference.onnx", folder / "prepared.onnx", folder / "quantized.onnx"
    onnx.save(_model(), reference)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(reference), str(prepared))
    quantization.quantize_static(str(prepared), str(quantized), calibration_inputs("x", (1, SEQ, WIDTH), 8), quant_format=quantization.QuantFormat.QDQ)
    return reference, quantized


def _stored_positions(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0].startswith("positions"))
    return node, next(t for t in model.graph.initializer if t.name == node.input[0])


def test_the_folded_lookup_is_stored_behind_a_dequantize(pair: tuple[Path, Path]) -> None:
    """The test of the test: ORT's own output has the form of the finding."""
    _, quantized = pair
    model = onnx.load(quantized)
    assert "positions.gather" not in {n.name for n in model.graph.node}
    _stored_positions(model)


def test_an_untouched_quantized_copy_is_converted(pair: tuple[Path, Path]) -> None:
    reference, quantized = pair
    result = audit(reference, quantized)
    assert result.verdict == "converted" and result.exit_code == 0, result.summary


def test_a_stored_value_moved_beyond_its_step_is_modified(pair: tuple[Path, Path], tmp_path: Path) -> None:
    reference, quantized = pair
    model = onnx.load(quantized)
    _, stored = _stored_positions(model)
    values = numpy_helper.to_array(stored).copy()
    flat = values.reshape(-1)
    flat[5] = flat[5] - 20 if flat[5] >= 20 else flat[5] + 20  # 20 steps
    stored.CopyFrom(numpy_helper.from_array(values, stored.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, tampered)
    result = audit(reference, tampered)
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "positions" in result.summary
