"""Verify on an ill-conditioned model: rounding noise is no failure, a wrong permutation still fails (issue 13).

The model ends in a logistic map ``x <- 4 x (1 - x)``, which doubles any rounding difference
at each step: a correct permutation (its re-ordered sums round differently) moves the outputs
above the default tolerance, exactly as one ulp on the input does. Verify must not call that
``not-equivalent``: within the reference's own noise it is rounding (``equivalent``, with a note),
within four times it ``inconclusive``, naming the noise. A wrong permutation moves the outputs by
orders of magnitude more and must stay ``not-equivalent``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlady
from onnxlady import analyze
from onnxlady._verify._noise_floor import NOISE_MARGIN, ReferenceNoise, judge_with_noise
from onnxlady._verify._report import OutputComparison
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

_WIDTH, _HIDDEN, _OUT = 64, 128, 16


def _chaotic_model(steps: int) -> onnx.ModelProto:
    """An MLP, a Sigmoid into (0, 1), then ``steps`` steps of the logistic map."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.normal(0, _WIDTH**-0.5, (_WIDTH, _HIDDEN)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, _HIDDEN).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, _HIDDEN**-0.5, (_HIDDEN, _OUT)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, _OUT).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array(4.0, np.float32), "four"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Tanh", ["a1"], ["r1"]),  # every hidden neuron live, so a wrong swap shows
        helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["a2"]),
        helper.make_node("Sigmoid", ["a2"], ["s0"]),
    ]
    current = "s0"
    for step in range(steps):
        nodes += [
            helper.make_node("Sub", ["one", current], [f"c{step}"]),
            helper.make_node("Mul", [current, f"c{step}"], [f"p{step}"]),
            helper.make_node("Mul", ["four", f"p{step}"], [f"s{step + 1}"]),
        ]
        current = f"s{step + 1}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "logistic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, _OUT])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _wrong(permuted: onnx.ModelProto) -> onnx.ModelProto:
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong))
    return wrong


def test_the_outputs_carry_signal() -> None:
    model = _chaotic_model(14)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    output = session.run(None, {"x": np.random.default_rng(0).uniform(-1, 1, (1, _WIDTH)).astype(np.float32)})[0]
    assert 0.1 < float(np.std(output)) and float(np.abs(output).max()) <= 1.0


def test_a_well_conditioned_permutation_is_equivalent_and_a_wrong_one_is_not() -> None:
    model = _chaotic_model(0)  # no chaotic steps: the ordinary case, untouched by the noise floor
    permuted = permute_copy(model, seed=1)[0]
    assert onnxlady.verify(model, permuted).to_json()["verdict"] == "equivalent"
    assert onnxlady.verify(model, _wrong(permuted)).to_json()["verdict"] == "not-equivalent"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rounding_noise_is_no_failure_and_a_wrong_permutation_still_fails(seed: int) -> None:
    model = _chaotic_model(14)
    permuted = permute_copy(model, seed=seed)[0]
    report = onnxlady.verify(model, permuted)
    result = report.to_json()
    assert not all(output["passed"] for output in result["outputs"])  # beyond the tolerance: the premise
    said = " ".join(result["reasons"] + result["notes"])
    assert result["verdict"] in ("equivalent", "inconclusive"), result
    assert "only its rounding changes" in said
    assert report.exit_code == (0 if result["verdict"] == "equivalent" else 1)
    failing = [o for o in result["outputs"] if not o["passed"]]
    assert all(o["reference_noise"] is not None for o in failing)  # the report says what the reference moves
    if result["verdict"] == "equivalent":
        assert "ROUNDING" in report.to_text() and "FAIL" not in report.to_text()
    assert onnxlady.verify(model, model).to_json()["verdict"] == "equivalent"  # identical runs still pass

    wrong = onnxlady.verify(model, _wrong(permuted)).to_json()
    assert wrong["verdict"] == "not-equivalent", wrong


def _failed(name: str, error: float) -> OutputComparison:
    return OutputComparison(name, (4,), "float32", error, 1.0, error, 1.0, 4, 4, False, None)


def test_every_failure_must_lie_within_the_noise() -> None:
    noise = ReferenceNoise({"a": 0.1, "b": 0.1})
    rounding = judge_with_noise([_failed("a", 0.1)], [], noise)
    assert rounding is not None and rounding[0] == "equivalent" and "judged as rounding" in rounding[2][0]
    unsure = judge_with_noise([_failed("a", 0.1 * NOISE_MARGIN)], [], noise)
    assert unsure is not None and unsure[0] == "inconclusive"
    assert judge_with_noise([_failed("a", 0.1 * NOISE_MARGIN * 1.01)], [], noise) is None  # beyond the margin
    assert judge_with_noise([_failed("a", 0.05), _failed("b", 1.0)], [], noise) is None  # one real failure decides
    assert judge_with_noise([_failed("integer", 0.05)], [], noise) is None  # no noise known for it
    hollow = OutputComparison("a", (4,), "float32", 0.05, 1.0, 0.05, 1.0, 4, 4, False, "constant")
    assert judge_with_noise([hollow], [], noise)[0] == "inconclusive"  # rounding, but no evidence either
