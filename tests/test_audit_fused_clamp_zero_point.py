"""Audit of a static quantization whose fused ReLU no longer clamps (held-out round 19, F2).

ONNX Runtime's ``quantize_static`` (asymmetric activations) drops a ``Relu`` after a layer: the
calibrated range of the clamped result starts at 0, so its zero point is the integer type's
lowest value and the integer output clamps at zero by itself. The output zero point of a
``QLinearConv`` (QOperator) or of the ``QuantizeLinear`` after a ``Conv`` (QDQ) raised by 7, on
the initializer both the layer and its reader share, keeps every weight and every scale, yet lets
negative values through: the reference's ReLU is gone. It read ``converted``; activation zero
points are otherwise calibrated on data the reference does not hold and are not compared.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady._audit._verdicts import audit_models
from onnxlady.testing import permute_copy

quantization = pytest.importorskip("onnxruntime.quantization")


def _convnet() -> onnx.ModelProto:
    """Conv-ReLU, Conv-ReLU, pooled, a Gemm: ``x [1, 3, 12, 12] -> y [1, 5]``."""
    rng = np.random.default_rng(11)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "c1.w"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "c1.b"),
        numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.15).astype(np.float32), "c2.w"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "c2.b"),
        numpy_helper.from_array((rng.standard_normal((5, 8)) * 0.4).astype(np.float32), "fc.w"),
        numpy_helper.from_array((rng.standard_normal(5) * 0.1).astype(np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1] * 4, name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1] * 4, name="c2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


class _Calibration(quantization.CalibrationDataReader):  # type: ignore[misc, name-defined]
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self._batches = iter([{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize(model: onnx.ModelProto, form: str, folder: Path) -> onnx.ModelProto:
    source, target = folder / "source.onnx", folder / "quantized.onnx"
    onnx.save(model, str(source))
    quant_format = quantization.QuantFormat.QDQ if form == "qdq" else quantization.QuantFormat.QOperator
    quantization.quantize_static(str(source), str(target), _Calibration(), quant_format=quant_format)
    return onnx.load(str(target))


@functools.cache
def _models(form: str, folder: str) -> tuple[bytes, bytes, bytes]:
    """(float reference, its quantized copy, a permuted copy quantized), serialized."""
    reference = _convnet()
    quantized = _quantize(reference, form, Path(folder) / "clean")
    permuted = _quantize(permute_copy(reference, 3)[0], form, Path(folder) / "permuted")
    return reference.SerializeToString(), quantized.SerializeToString(), permuted.SerializeToString()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("fused-clamp")
    for name in ("clean", "permuted"):
        (root / name).mkdir()
    return str(root)


def _model(form: str, folder: str, which: int) -> onnx.ModelProto:
    return onnx.load_from_string(_models(form, folder)[which])


def _first_output_zero_point(model: onnx.ModelProto) -> onnx.TensorProto:
    """The initializer of the first layer's output zero point (QLinearConv's, or the QuantizeLinear's after the Conv)."""
    inits = {t.name: t for t in model.graph.initializer}
    conv = next(node for node in model.graph.node if node.op_type in ("Conv", "QLinearConv"))
    if conv.op_type == "QLinearConv":
        return inits[conv.input[7]]
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == conv.output[0]:
            return inits[node.input[2]]
    raise AssertionError("no quantized first layer")


def _raised_zero_point(model: onnx.ModelProto, step: int = 7) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    tensor = _first_output_zero_point(changed)
    value = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array((value.astype(np.int32) + step).astype(value.dtype), tensor.name))
    return changed


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_the_fixture_fuses_the_relu_at_the_lowest_zero_point(form: str, folder: str) -> None:
    """What the tests claim: no Relu left, the first output's zero point the type's lowest, and raising it changes the outputs."""
    quantized = _model(form, folder, 1)
    assert "Relu" not in {node.op_type for node in quantized.graph.node}
    zero = numpy_helper.to_array(_first_output_zero_point(quantized))
    assert int(zero) == np.iinfo(zero.dtype).min
    x = np.random.default_rng(5).standard_normal((8, 1, 3, 12, 12)).astype(np.float32)
    reference = np.concatenate([_run(_model(form, folder, 0), b) for b in x])
    clean = np.concatenate([_run(quantized, b) for b in x])
    raised = np.concatenate([_run(_raised_zero_point(quantized), b) for b in x])
    assert np.std(reference) > 0.1  # outputs neither vanish nor explode
    assert np.abs(raised - reference).max() > 2 * np.abs(clean - reference).max()


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_the_clean_quantized_copy_is_converted(form: str, folder: str) -> None:
    report = audit_models(_model(form, folder, 0), _model(form, folder, 1))
    assert report.verdict == "converted" and report.exit_code == 0, report.summary


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_a_permuted_quantized_copy_is_permuted(form: str, folder: str) -> None:
    report = audit_models(_model(form, folder, 0), _model(form, folder, 2))
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary


@pytest.mark.parametrize("which", [1, 2])
@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_a_raised_output_zero_point_is_modified(form: str, folder: str, which: int) -> None:
    report = audit_models(_model(form, folder, 0), _raised_zero_point(_model(form, folder, which)))
    assert report.verdict == "modified" and report.exit_code == 1, report.summary
    assert "clamps at zero" in report.summary


def _reader_given_its_own_zero_point(model: onnx.ModelProto, step: int = 7) -> onnx.ModelProto:
    """The second QLinearConv reads the first's output with a zero point of its own (raised), the writer's kept."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    second = [node for node in changed.graph.node if node.op_type == "QLinearConv"][1]
    shared = next(t for t in changed.graph.initializer if t.name == second.input[2])
    value = numpy_helper.to_array(shared)
    own = numpy_helper.from_array((value.astype(np.int32) + step).astype(value.dtype), f"{shared.name}.read")
    changed.graph.initializer.append(own)
    second.input[2] = own.name
    return changed


@pytest.mark.parametrize("which", [1, 2])
def test_a_qoperator_reader_with_another_zero_point_is_modified(folder: str, which: int) -> None:
    """QOperator's counterpart of a QDQ pair whose halves disagree: the writer's and the reader's zero points."""
    changed = _reader_given_its_own_zero_point(_model("qoperator", folder, which))
    x = np.random.default_rng(6).standard_normal((1, 3, 12, 12)).astype(np.float32)
    assert np.abs(_run(changed, x) - _run(_model("qoperator", folder, which), x)).max() > 1e-3  # it computes otherwise
    report = audit_models(_model("qoperator", folder, 0), changed)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary
    assert "activation quantization changed" in report.summary
