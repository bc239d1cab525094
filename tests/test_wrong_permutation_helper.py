"""``onnxlady.testing.permute_producer_only`` on a model whose first producer weight is untied.

Held-out note of session 9: a weight read by two convolutions whose neurons cannot share one
order (one feeds a layer, the other is a graph output) is untied into a copy when the model is
permuted; the analysis plans that copy (``shared.weight.onnxlady_copy1``) first, and the helper
asked the model for it before it existed (KeyError). It now passes over a tensor the model
does not hold and moves the next producer's rows alone, which verify must catch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlady import analyze, verify_models
from onnxlady.testing import constant_bytes, copy_model, permute_copy, permute_producer_only


def _shared_weight_model() -> onnx.ModelProto:
    """Input x [1, 4, 8, 8] -> conv1 (shared weight) -> Relu -> conv2 -> y1; head (the same weight) -> y2."""
    rng = np.random.default_rng(0)
    shared = numpy_helper.from_array((rng.standard_normal((6, 4, 3, 3)) / 6).astype(np.float32), "shared.weight")
    second = numpy_helper.from_array((rng.standard_normal((5, 6, 1, 1)) / 2.5).astype(np.float32), "conv2.weight")
    nodes = [
        helper.make_node("Conv", ["x", "shared.weight"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight"], ["y1"], name="conv2"),
        helper.make_node("Conv", ["x", "shared.weight"], ["y2"], name="head", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "shared_weight",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 5, 8, 8]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 6, 8, 8])],
        [shared, second],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_an_untied_copy_first_in_the_plan_is_passed_over() -> None:
    source = _shared_weight_model()
    analysis = analyze(source)
    assert analysis.tensors[0].copy > 0  # the premise: the plan starts with a copy the model lacks
    wrong = copy_model(source)
    changed = permute_producer_only(wrong, analyze(wrong))
    assert changed == "conv2.weight"
    assert {n for n, b in constant_bytes(wrong).items() if b != constant_bytes(source)[n]} == {"conv2.weight"}
    assert not verify_models(source, wrong, provider="cpu").equivalent
    # A correct permutation of the same model (the copy made, conv1's neurons moved) is equivalent.
    permuted = permute_copy(source, 3)[0]
    assert "shared.weight.onnxlady_copy1" in constant_bytes(permuted)
    assert verify_models(source, permuted, provider="cpu").equivalent
