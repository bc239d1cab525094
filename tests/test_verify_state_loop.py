"""Verify on a streaming model: the state each model writes is fed back over several steps (issue 13).

The fixture accumulates a small update into its state, ``stateN = state + 5e-3 tanh(relu(x W1 + b1) W2)``,
and its output reads the state it is given, ``y = state W3 + b3``. A wrong permutation of the hidden
layer moves ``stateN`` by less than ``atol`` on one step and ``y`` not at all: compared once, it
passes. Fed back, the difference accumulates and shows (the real Silero VAD, two rows of one conv
swapped, behaved so). A correct permutation moves nothing but rounding and stays EQUIVALENT.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxlady
from onnxlady import analyze
from onnxlady._verify._state_loop import STATE_STEPS, plan_state_loop
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

_IN, _HIDDEN, _STATE, _OUT = 16, 32, 24, 8


def _streaming_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def constant(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value.astype(np.float32), name)

    initializers = [
        constant("w1", rng.normal(0, _IN**-0.5, (_IN, _HIDDEN))),
        constant("b1", rng.normal(0, 0.1, _HIDDEN)),
        constant("w2", rng.normal(0, _HIDDEN**-0.5, (_HIDDEN, _STATE))),
        constant("step", np.array(5e-3)),
        constant("w3", rng.normal(0, _STATE**-0.5, (_STATE, _OUT))),
        constant("b3", rng.normal(0, 0.1, _OUT)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
        helper.make_node("Tanh", ["m2"], ["t2"]),
        helper.make_node("Mul", ["t2", "step"], ["update"]),
        helper.make_node("Add", ["state", "update"], ["stateN"]),
        helper.make_node("MatMul", ["state", "w3"], ["m3"]),
        helper.make_node("Add", ["m3", "b3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "streaming",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _IN]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, _STATE]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, _OUT]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, ["batch", "width"]),  # named anew, as exporters do
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _wrong(model: onnx.ModelProto) -> onnx.ModelProto:
    wrong = copy_model(permute_copy(model, seed=1)[0])
    permute_producer_only(wrong, analyze(wrong))
    return wrong


def test_the_outputs_carry_signal() -> None:
    model = _streaming_model()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    y, state = session.run(None, {"x": rng.uniform(-1, 1, (1, _IN)).astype(np.float32),
                                  "state": rng.uniform(-1, 1, (1, _STATE)).astype(np.float32)})  # fmt: skip
    assert 0.1 < float(np.std(y)) < 10.0 and 0.1 < float(np.std(state)) < 10.0


def test_the_state_pair_is_found() -> None:
    loop = plan_state_loop(_streaming_model(), ["x", "state"])
    assert loop is not None and loop.pairs == (("state", "stateN"),) and loop.steps == STATE_STEPS
    assert plan_state_loop(_streaming_model(), ["x"]) is None  # the state is not fed: nothing to loop


def test_one_step_misses_what_the_loop_catches(monkeypatch) -> None:
    model = _streaming_model()
    wrong = _wrong(model)
    # Compared once (the loop off), the wrong permutation passes: the premise of this test.
    monkeypatch.setattr("onnxlady._verify._compare.plan_state_loop", lambda *args: None)
    assert onnxlady.verify(model, wrong).to_json()["verdict"] == "equivalent"
    monkeypatch.undo()
    report = onnxlady.verify(model, wrong).to_json()
    assert report["verdict"] == "not-equivalent", report
    assert any("recurrent state" in note for note in report["notes"])


def test_a_correct_permutation_stays_equivalent_over_the_loop() -> None:
    model = _streaming_model()
    for seed in (1, 2):
        report = onnxlady.verify(model, permute_copy(model, seed=seed)[0]).to_json()
        assert report["verdict"] == "equivalent", report
        assert report["outputs"][1]["total_elements"] == STATE_STEPS * _STATE  # every step compared
