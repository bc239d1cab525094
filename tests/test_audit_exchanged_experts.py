"""A mixture of experts with two experts exchanged: the audit says what it sees, never `permuted`.

Held-out round 17, F5: swapping experts 0 and 1 of a top-2 MoE together with their router's
columns (router MatMul -> Softmax -> TopK -> ScatterElements gate -> per-expert Mul) keeps the
function, but an order of whole layers is no permutation onnxlady models: the audit said
``modified`` with "kind uncertain" and the dense-change figures only, no hint that every
changed constant holds another's values. It still says ``modified`` (it cannot prove the
function kept), and now names the exchange: which constant holds which one's values, and that
whole layers were exchanged outside the permutations onnxlady models (``verify`` tells whether
the function is kept).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model

_D, _H, _E = 8, 12, 4


def build_moe(seed: int = 0) -> onnx.ModelProto:
    """A pre-LN top-2 MoE block over ``x [1, 6, 8]``: router, dense gate, four Relu MLP experts, residual, head."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def param(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def ints(name: str, values: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    nodes.append(helper.make_node("LayerNormalization", ["x", param("ln.scale", rng.uniform(0.5, 1.5, _D)),
                                                         param("ln.bias", rng.normal(0, 0.1, _D))], ["h"], name="ln", axis=-1))  # fmt: skip
    nodes.append(helper.make_node("MatMul", ["h", param("router", rng.normal(0, 1.0, (_D, _E)))], ["logits_r"], name="router"))
    nodes.append(helper.make_node("Softmax", ["logits_r"], ["p"], name="softmax", axis=-1))
    nodes.append(helper.make_node("TopK", ["p", ints("k", [2])], ["top", "idx"], name="topk", axis=-1))
    nodes.append(helper.make_node("ReduceSum", ["top", ints("last", [-1])], ["top_sum"], name="top_sum", keepdims=1))
    nodes.append(helper.make_node("Div", ["top", "top_sum"], ["top_norm"], name="top_norm"))
    nodes.append(helper.make_node("Shape", ["p"], ["p_shape"], name="p_shape"))
    nodes.append(helper.make_node("ConstantOfShape", ["p_shape"], ["zeros"], name="zeros",
                                  value=numpy_helper.from_array(np.zeros(1, np.float32))))  # fmt: skip
    nodes.append(helper.make_node("ScatterElements", ["zeros", "idx", "top_norm"], ["gate"], name="scatter", axis=-1))
    outs = []
    for e in range(_E):
        w1 = param(f"e{e}.w1", rng.normal(0, 1 / np.sqrt(_D), (_D, _H)))
        nodes.append(helper.make_node("MatMul", ["h", w1], [f"e{e}.m1"], name=f"e{e}.mm1"))
        nodes.append(helper.make_node("Add", [f"e{e}.m1", param(f"e{e}.b1", rng.normal(0, 0.1, _H))], [f"e{e}.a1"], name=f"e{e}.add1"))
        nodes.append(helper.make_node("Relu", [f"e{e}.a1"], [f"e{e}.r"], name=f"e{e}.relu"))
        w2 = param(f"e{e}.w2", rng.normal(0, 1 / np.sqrt(_H), (_H, _D)))
        nodes.append(helper.make_node("MatMul", [f"e{e}.r", w2], [f"e{e}.m2"], name=f"e{e}.mm2"))
        nodes.append(helper.make_node("Add", [f"e{e}.m2", param(f"e{e}.b2", rng.normal(0, 0.1, _D))], [f"e{e}.a2"], name=f"e{e}.add2"))
        nodes.append(helper.make_node("Unsqueeze", [f"e{e}.a2", "last"], [f"e{e}.out"], name=f"e{e}.unsqueeze"))
        outs.append(f"e{e}.out")
    nodes.append(helper.make_node("Concat", outs, ["stacked"], name="stack", axis=-1))
    nodes.append(helper.make_node("Unsqueeze", ["gate", ints("second_last", [-2])], ["gate4"], name="gate_unsqueeze"))
    nodes.append(helper.make_node("Mul", ["stacked", "gate4"], ["gated"], name="gate_mul"))
    nodes.append(helper.make_node("ReduceSum", ["gated", "last"], ["mixed"], name="mix", keepdims=0))
    nodes.append(helper.make_node("Add", ["x", "mixed"], ["res"], name="residual"))
    nodes.append(helper.make_node("MatMul", ["res", param("head.w", rng.normal(0, 0.3, (_D, 5)))], ["head_m"], name="head"))
    nodes.append(helper.make_node("Add", ["head_m", param("head.b", rng.normal(0, 0.1, 5))], ["y"], name="head_add"))
    graph = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, _D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _edited(model: onnx.ModelProto, change) -> onnx.ModelProto:
    """A copy with ``change({name: values})`` applied to its initializers (a dict it edits in place)."""
    edited = copy_model(model)
    values = {t.name: numpy_helper.to_array(t).copy() for t in edited.graph.initializer}
    change(values)
    del edited.graph.initializer[:]
    edited.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in values.items())
    return edited


def _swap_experts(values: dict[str, np.ndarray], router: bool = True) -> None:
    for part in ("w1", "b1", "w2", "b2"):
        values[f"e0.{part}"], values[f"e1.{part}"] = values[f"e1.{part}"], values[f"e0.{part}"]
    if router:
        values["router"] = values["router"][:, [1, 0, 2, 3]].copy()


_REFERENCE = build_moe(0)


def test_experts_exchanged_with_their_router_columns_are_named() -> None:
    suspect = _edited(_REFERENCE, _swap_experts)
    assert verify_models(_REFERENCE, suspect, provider="cpu").equivalent  # the function is kept
    report = audit_models(_REFERENCE, suspect)
    assert report.verdict == "modified" and report.exit_code == 1  # no claim beyond the evidence
    summary = report.summary
    assert "every changed constant holds reference values: 8 hold another constant's of their shape" in summary
    assert "'e0.w1' holds the values of 'e1.w1'" in summary
    assert "the other 1 changed weights hold their own values in other places" in summary  # the router's columns
    assert "whole layers exchanged" in summary and "verify tells whether it keeps the function" in summary


def test_experts_exchanged_without_their_router_columns_are_named_too() -> None:
    """Another function (the router still sends tokens by the old order): the same facts, the same verdict."""
    suspect = _edited(_REFERENCE, lambda values: _swap_experts(values, router=False))
    assert not verify_models(_REFERENCE, suspect, provider="cpu").equivalent
    report = audit_models(_REFERENCE, suspect)
    assert report.verdict == "modified" and report.exit_code == 1
    assert "every changed constant holds reference values: 8 hold another constant's of their shape" in report.summary
    assert "their own values in other places" not in report.summary  # nothing else moved


def test_an_expert_changed_otherwise_is_not_called_an_exchange() -> None:
    """Noise on one expert and a second expert's rows re-ordered: no constant holds another's values."""

    def change(values: dict[str, np.ndarray]) -> None:
        rng = np.random.default_rng(1)
        values["e0.w1"] = (values["e0.w1"] + 0.3 * rng.standard_normal(values["e0.w1"].shape)).astype(np.float32)
        values["e2.w2"] = values["e2.w2"][::-1].copy()

    report = audit_models(_REFERENCE, _edited(_REFERENCE, change))
    assert report.verdict == "modified"
    assert "holds the values of" not in report.summary and "whole layers exchanged" not in report.summary
