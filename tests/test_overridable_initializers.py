"""Initializers also listed as graph inputs: defaults a caller may override (round 19, F5).

From IR version 4 an initializer need not be a graph input; one listed anyway is part of the
interface (ONNX Runtime does not treat it as a constant): a caller feeding the original values
to a permuted model would get other outputs, so its groups freeze ("graph-input: overridable").
A model listing *every* initializer so (IR version 3's rule, kept by exporters such as torch's
``keep_initializers_as_inputs``) means no interface: its weights permute, and ``permute`` names
them; ``verify`` says which such inputs it left to their stored defaults.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxlady


def _mlp(listed: tuple[str, ...], ir_version: int = 8) -> onnx.ModelProto:
    """X[2, 12] -> MatMul w0 (8) -> Relu -> MatMul w1 (16) -> Relu -> MatMul w2 (4) -> Y, ``listed`` as inputs too."""
    rng = np.random.default_rng(0)
    weights = {
        "w0": rng.standard_normal((12, 8)),
        "w1": rng.standard_normal((8, 16)),
        "w2": rng.standard_normal((16, 4)),
    }
    inits = [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()]
    nodes = [
        helper.make_node("MatMul", ["X", "w0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["a0"]),
        helper.make_node("MatMul", ["a0", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["Y"]),
    ]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 12])]
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(weights[name].shape)) for name in listed]
    graph = helper.make_graph(nodes, "mlp", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ("appears in graph inputs and will not be treated as constant")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_a_listed_initializer_freezes_its_groups() -> None:
    model = _mlp(("w2",))
    groups = {g.size: g for g in onnxlady.inspect(model).analysis.groups}
    assert groups[16].frozen  # HEAD: permutable
    assert any(r.kind == "graph-input" and "overridable" in r.message and "'w2'" in r.message for r in groups[16].reasons)
    assert groups[8].permutable
    result = onnxlady.permute(model, seed=1, verify=True)
    assert result.verify is not None and result.verify.verdict == "equivalent"
    assert np.array_equal(_weight(result.model, "w2"), _weight(model, "w2"))
    assert result.overridable_permuted == []
    # A caller feeding its own w2 gets the same outputs from both models.
    x = np.random.default_rng(1).standard_normal((2, 12)).astype(np.float32)
    own = np.random.default_rng(2).standard_normal((16, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, {"X": x, "w2": own}), _run(model, {"X": x, "w2": own}), rtol=1e-5, atol=1e-5)


def test_every_initializer_listed_permutes_and_says_so() -> None:
    model = _mlp(("w0", "w1", "w2"))
    result = onnxlady.permute(model, seed=1, verify=True)
    assert result.permuted_neurons == 24
    assert result.overridable_permuted == ["w0", "w1", "w2"]
    assert result.to_json()["overridable_permuted"] == ["w0", "w1", "w2"]
    assert "3 permuted initializers are also graph inputs" in result.to_text()
    assert result.verify is not None and result.verify.verdict == "equivalent"
    assert any("3 initializers also listed as graph inputs were not fed" in n for n in result.verify.report.notes)
    # A wrong use is caught: the original w2 fed to the permuted model gives other outputs.
    x = np.random.default_rng(1).standard_normal((2, 12)).astype(np.float32)
    fed = {"X": x, "w2": _weight(model, "w2")}
    assert not np.allclose(_run(result.model, fed), _run(model, fed), rtol=1e-3, atol=1e-3)


def test_ir3_permutes_every_group() -> None:
    model = _mlp(("w0", "w1", "w2"), ir_version=3)
    inspected = onnxlady.inspect(model)
    assert sorted(g.size for g in inspected.analysis.permutable_groups) == [8, 16]
    assert "every initializer (3) is also listed as a graph input" in inspected.to_text()
    assert onnxlady.permute(model, seed=1).overridable_permuted == ["w0", "w1", "w2"]


def test_nothing_listed_is_unchanged() -> None:
    model = _mlp(())
    assert "also listed as a graph input" not in onnxlady.inspect(model).to_text()
    result = onnxlady.permute(model, seed=1, verify=True)
    assert result.permuted_neurons == 24 and result.overridable_permuted == []
    assert "overridable_permuted" not in result.to_json()
    assert result.verify is not None
    assert not any("listed as graph inputs" in n for n in result.verify.report.notes)
