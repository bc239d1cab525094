"""An MLP behind an ai.onnx.ml operator (skl2onnx: Scaler -> MatMul -> Add -> Relu -> MatMul).

ONNX's shape inference types an ai.onnx.ml operator's output but gives it no shape, so every
tensor after it had no rank and the MLP's hidden layers made no group ("no operator makes
neurons ... no MatMul with a constant weight", while the MatMuls are there). The shapes of the
element-wise ai.onnx.ml operators (Scaler, Normalizer, Binarizer, Imputer) are now told, so the
MLP permutes; the ai.onnx.ml operator itself has no rule and still freezes what crosses it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlady
from onnxlady import OnnxladyError

ML = "ai.onnx.ml"


def _mlp(*, scaler_between: bool = False, shaped_input: bool = True) -> onnx.ModelProto:
    """X[N, 12] -> Scaler -> MatMul 12x16 -> Add -> Relu -> MatMul 16x3 -> Y (skl2onnx's MLPRegressor).

    ``scaler_between``: a first MatMul 12x8 before the Scaler (PCA, then a scaler, as skl2onnx writes).
    """
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    features = 12
    x = "X"
    if scaler_between:
        nodes.append(helper.make_node("MatMul", [x, const("pca", rng.standard_normal((12, 8)))], ["pca_out"]))
        x, features = "pca_out", 8
    nodes.append(
        helper.make_node("Scaler", [x], ["scaled"], domain=ML, offset=[0.1] * features, scale=[1.5] * features)
    )
    nodes.append(helper.make_node("MatMul", ["scaled", const("w1", rng.standard_normal((features, 16)))], ["h"]))
    nodes.append(helper.make_node("Add", ["h", const("b1", rng.standard_normal(16))], ["hb"]))
    nodes.append(helper.make_node("Relu", ["hb"], ["a"]))
    nodes.append(helper.make_node("MatMul", ["a", const("w2", rng.standard_normal((16, 3)))], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 12] if shaped_input else None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)])
    model.ir_version = 8
    return model


def test_mlp_after_scaler_permutes_and_verifies() -> None:
    model = _mlp()
    groups = onnxlady.inspect(model).analysis.groups
    hidden = [g for g in groups if g.size == 16]
    assert len(hidden) == 1 and hidden[0].permutable  # HEAD: no group at all
    result = onnxlady.permute(model, seed=1, verify=True)
    assert result.permuted_neurons == 16
    assert result.verify is not None and result.verify.verdict == "equivalent"
    w1 = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "w1"))
    assert not np.array_equal(w1, numpy_helper.to_array(model.graph.initializer[0]))  # the neurons moved


def test_wrong_permutation_is_caught() -> None:
    model = _mlp()
    permuted = onnxlady.permute(model, seed=1).model
    wrong = onnx.ModelProto()
    wrong.CopyFrom(permuted)
    # The hidden layer's columns moved, but w2's rows put back in the original order: a broken model.
    for index, tensor in enumerate(wrong.graph.initializer):
        if tensor.name == "w2":
            original = next(t for t in model.graph.initializer if t.name == "w2")
            wrong.graph.initializer[index].CopyFrom(original)
    assert onnxlady.verify(model, wrong).verdict == "not-equivalent"


def test_unpermute_restores_bit_for_bit() -> None:
    model = _mlp()
    result = onnxlady.permute(model, seed=1)
    restored = onnxlady.unpermute(result.model, result.key).model
    assert restored.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)


def test_scaler_between_layers_freezes_with_its_reason() -> None:
    """The group crossing the Scaler (no rule) stays frozen; the MLP after it permutes."""
    groups = onnxlady.inspect(_mlp(scaler_between=True)).analysis.groups
    by_size = {g.size: g for g in groups}
    assert by_size[8].frozen
    assert any(r.kind == "no-rule" and "ai.onnx.ml::Scaler" in r.message for r in by_size[8].reasons)
    assert by_size[16].permutable


def test_unknown_rank_names_the_real_reason() -> None:
    """A MatMul with a constant weight and an input of unknown rank: the message says so, not "no MatMul"."""
    with pytest.raises(OnnxladyError) as caught:
        onnxlady.permute(_mlp(shaped_input=False), seed=1)
    message = str(caught.value)
    assert "the rank of 'scaled' is unknown" in message
    assert "no Conv, Gemm or MatMul with a constant weight" not in message
