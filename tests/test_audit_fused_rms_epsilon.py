"""A fused RMS / layer normalization's epsilon is compared with the arithmetic it was fused from (round 19, F3).

ONNX Runtime's transformer optimizer fuses a T5-style RMSNorm left as arithmetic
(``Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul``) into ``SimplifiedLayerNormalization``
and, after a residual ``Add``, ``SkipSimplifiedLayerNormalization``, each carrying ``eps`` as its
``epsilon`` attribute. The audit compared normalizations' epsilons only where both models had the
operator, so an epsilon edited in the fused copy (1e-6 -> 0.1: the output moves by several
standard deviations) kept every weight and read ``converted``, exit 0. The reference's
decomposed normalizations now count as normalizations with the epsilon their ``Add`` carries.
Every suspect here is the real optimizer's output.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.conversions import to_float16
from onnxlady import audit, verify_models
from onnxlady._audit._added_operators import changed_operators
from onnxlady.testing import permute_copy

optimizer = pytest.importorskip("onnxruntime.transformers.optimizer", reason="onnxruntime.transformers not installed")
logging.getLogger("onnxruntime").setLevel(logging.ERROR)
logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)

WIDTH, HIDDEN, EPSILON = 32, 64, 1e-6


def _rms(prefix: str, x: str, gamma: str, nodes: list[onnx.NodeProto], constants: list[onnx.TensorProto],
         root: str = "Sqrt") -> str:
    """T5's RMSNorm as arithmetic: ``gamma * x / sqrt(mean(x^2) + eps)`` (or ``x * (mean(x^2) + eps)^-0.5``)."""
    constants += [numpy_helper.from_array(np.asarray(2.0, np.float32), f"{prefix}two"),
                  numpy_helper.from_array(np.asarray(EPSILON, np.float32), f"{prefix}eps")]
    nodes += [helper.make_node("Pow", [x, f"{prefix}two"], [f"{prefix}sq"], name=f"{prefix}Pow"),
              helper.make_node("ReduceMean", [f"{prefix}sq"], [f"{prefix}var"], name=f"{prefix}ReduceMean", axes=[-1], keepdims=1),
              helper.make_node("Add", [f"{prefix}var", f"{prefix}eps"], [f"{prefix}ve"], name=f"{prefix}Add")]
    if root == "Sqrt":
        nodes += [helper.make_node("Sqrt", [f"{prefix}ve"], [f"{prefix}std"], name=f"{prefix}Sqrt"),
                  helper.make_node("Div", [x, f"{prefix}std"], [f"{prefix}n"], name=f"{prefix}Div")]
    else:
        constants.append(numpy_helper.from_array(np.asarray(-0.5, np.float32), f"{prefix}half"))
        nodes += [helper.make_node("Pow", [f"{prefix}ve", f"{prefix}half"], [f"{prefix}inv"], name=f"{prefix}Rsqrt"),
                  helper.make_node("Mul", [x, f"{prefix}inv"], [f"{prefix}n"], name=f"{prefix}Scale")]
    nodes.append(helper.make_node("Mul", [gamma, f"{prefix}n"], [f"{prefix}y"], name=f"{prefix}Mul"))
    return f"{prefix}y"


def rms_block(seed: int = 0, root: str = "Sqrt") -> onnx.ModelProto:
    """RMSNorm -> MLP -> residual -> RMSNorm -> head, with random weights (outputs of unit scale)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []

    def weight(name: str, shape: list[int], scale: float) -> str:
        constants.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    weight("g1", [WIDTH], 0.1)
    constants[-1] = numpy_helper.from_array(numpy_helper.to_array(constants[-1]) + np.float32(1), "g1")
    normed = _rms("n1/", "x", "g1", nodes, constants, root)
    nodes += [helper.make_node("MatMul", [normed, weight("w1", [WIDTH, HIDDEN], WIDTH ** -0.5)], ["h"], name="mm1"),
              helper.make_node("Relu", ["h"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", weight("w2", [HIDDEN, WIDTH], HIDDEN ** -0.5)], ["o"], name="mm2"),
              helper.make_node("Add", ["x", "o"], ["res"], name="residual")]
    weight("g2", [WIDTH], 0.1)
    constants[-1] = numpy_helper.from_array(numpy_helper.to_array(constants[-1]) + np.float32(1), "g2")
    normed = _rms("n2/", "res", "g2", nodes, constants, root)
    nodes.append(helper.make_node("MatMul", [normed, weight("w3", [WIDTH, 16], WIDTH ** -0.5)], ["out"], name="head"))
    graph = helper.make_graph(nodes, "rms_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, WIDTH])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16])], initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _fused(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    """``model`` through ``onnxruntime.transformers.optimizer`` (model type t5: the RMSNorm fusions)."""
    source = tmp_path / "unfused.onnx"
    onnx.save(model, source)
    optimizer.optimize_model(str(source), model_type="t5", num_heads=0, hidden_size=0, opt_level=0).save_model_to_file(
        str(tmp_path / "fused.onnx"))  # as pipelines save it (the contrib domain's opset import added)
    fused = onnx.load(tmp_path / "fused.onnx")
    kinds = {node.op_type for node in fused.graph.node}
    assert {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"} <= kinds, kinds
    return fused


def _set_epsilon(model: onnx.ModelProto, op_type: str, value: float) -> None:
    node = next(node for node in model.graph.node if node.op_type == op_type)
    kept = [a for a in node.attribute if a.name != "epsilon"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("epsilon", value)])


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def test_outputs_neither_vanish_nor_explode() -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(rms_block(0).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 8, WIDTH)).astype(np.float32)
    output = session.run(None, {"x": x})[0]
    assert np.all(np.isfinite(output)) and 0.1 < float(output.std()) < 10.0


@pytest.mark.parametrize("op_type", ["SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"])
@pytest.mark.parametrize("permuted", [False, True], ids=["as-is", "permuted"])
def test_an_epsilon_edited_in_the_fused_copy_is_modified(tmp_path: Path, op_type: str, permuted: bool) -> None:
    source = rms_block(0)
    suspect = _fused(permute_copy(source, 3)[0] if permuted else source, tmp_path)
    reference = _saved(source, tmp_path / "reference.onnx")
    clean = audit(reference, _saved(suspect, tmp_path / "clean.onnx"))
    assert clean.verdict == ("permuted" if permuted else "converted") and clean.exit_code == 0, clean.summary
    _set_epsilon(suspect, op_type, 0.1)
    assert not verify_models(source, suspect).equivalent  # the edit changes what the model computes
    result = audit(reference, _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "operators changed with the weights kept" in result.summary and "(0.1)" in result.summary, result.summary


def test_a_wrong_permutation_of_the_fused_copy_is_caught(tmp_path: Path) -> None:
    source = rms_block(0)
    permuted = permute_copy(source, 3)[0]
    fused = _fused(permuted, tmp_path)
    verdict = verify_models(source, fused)
    assert verdict.equivalent
    wrong = onnx.ModelProto()
    wrong.CopyFrom(fused)
    head = next(t for t in wrong.graph.initializer if t.name == "w3")
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head)[::-1].copy(), "w3"))  # rows of one side only
    assert not verify_models(source, wrong).equivalent


@pytest.mark.parametrize("root", ["Sqrt", "Pow"])
def test_decomposed_epsilons_are_read_both_ways(tmp_path: Path, root: str) -> None:
    """The decomposed form reads its ``Add``'s epsilon; the fused one its attribute; float16 storage is a wildcard."""
    source = rms_block(0, root)
    fused = _fused(source, tmp_path) if root == "Sqrt" else None
    if fused is not None:
        assert changed_operators(source, fused) == [] and changed_operators(fused, source) == []
        _set_epsilon(fused, "SimplifiedLayerNormalization", 1e-3)
        assert changed_operators(source, fused) and changed_operators(fused, source)
    edited = onnx.ModelProto()
    edited.CopyFrom(source)
    eps = next(t for t in edited.graph.initializer if t.name == "n1/eps")
    eps.CopyFrom(numpy_helper.from_array(np.asarray(0.1, np.float32), "n1/eps"))
    assert changed_operators(source, edited) and changed_operators(edited, source)
    half = to_float16(source)  # 1e-6 in float16 rounds by 1.3 %: read as unknown, never as an edit
    assert changed_operators(source, half) == [] and changed_operators(half, source) == []
