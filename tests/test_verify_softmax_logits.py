"""Verify: a Softmax's large logits failing within the rounding noise do not outvote its output (F13).

Held-out finding F13 of session 9: a Whisper encoder with ``Mul(1000) -> Softmax`` appended. The
Softmax output itself passed and carried evidence (not every value on 0 or 1), but its input,
compared as well, holds values up to 4.4e3; one of them near zero was off by 1.6e-3 (a few
rounding steps of its neighbours times 1000), within four times what the reference alone moves
when only its rounding changes, so verify said INCONCLUSIVE on a correct permutation. The input
of a squashing op is compared to lend evidence to an output that has none; where the output
passes with evidence of its own, such a failure of its input decides nothing, and the output
judges. A failure beyond the margin, or an output with no evidence of its own (saturated),
decides as before, and a wrong permutation stays NOT EQUIVALENT.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlady import analyze, verify_models
from onnxlady._verify._noise_floor import NOISE_MARGIN, ReferenceNoise, judge_with_noise
from onnxlady._verify._report import OutputComparison
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

TOKENS, FEATURES, HIDDEN, CLASSES = 50, 20, 64, 64


def _sharp_softmax(seed: int, factor: float) -> onnx.ModelProto:
    """Input x [1, 50, 20] -> three MatMul+Tanh (64) -> MatMul 64 -> Mul(factor) -> Softmax: logits in the thousands."""
    rng = np.random.default_rng(seed)
    initializers, nodes, current, width = [], [], "x", FEATURES
    for layer in range(3):
        weight = (rng.standard_normal((width, HIDDEN)) / np.sqrt(width)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{layer}"))
        nodes += [
            helper.make_node("MatMul", [current, f"w{layer}"], [f"m{layer}"]),
            helper.make_node("Tanh", [f"m{layer}"], [f"t{layer}"]),
        ]
        current, width = f"t{layer}", HIDDEN
    initializers.append(numpy_helper.from_array((rng.standard_normal((HIDDEN, CLASSES)) / 8.0).astype(np.float32), "head"))
    initializers.append(numpy_helper.from_array(np.array(factor, np.float32), "factor"))
    nodes += [
        helper.make_node("MatMul", [current, "head"], ["logits"]),
        helper.make_node("Mul", ["logits", "factor"], ["big"]),
        helper.make_node("Softmax", ["big"], ["prob"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "sharp_softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, FEATURES])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, TOKENS, CLASSES])],
        initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_correct_permutation_of_a_sharp_softmax_is_equivalent_and_a_wrong_one_is_not() -> None:
    model = _sharp_softmax(6, 1000.0)
    permuted = permute_copy(model, 7)[0]
    report = verify_models(model, permuted, provider="cpu")
    (output,), (logits,) = report.outputs, report.squash_inputs
    assert output.carries_evidence  # the Softmax output passes and is not saturated
    assert logits.reference_max_abs > 1000.0
    if not logits.passed:  # the premise of F13 (as ONNX Runtime's CPU kernels round here)
        assert logits.reference_noise is not None
        assert logits.max_abs_error > logits.reference_noise  # beyond the noise itself: inconclusive before
        assert any("judged on that output" in note for note in report.notes), report.notes
    assert report.verdict == "equivalent", report.reasons
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong))
    assert verify_models(model, wrong, provider="cpu").verdict == "not-equivalent"


def _comparison(
    name: str,
    error: float,
    *,
    passed: bool,
    degenerate: str | None = None,
    kind: str = "output",
    op: str | None = None,
    stands_for: str | None = None,
) -> OutputComparison:
    return OutputComparison(
        name, (4,), "float32", error, 1.0, error, 4000.0, 0 if passed else 1, 4, passed, degenerate,
        kind=kind, op=op, stands_for=stands_for,
    )  # fmt: skip


def test_a_squash_input_within_the_margin_defers_to_an_output_with_evidence() -> None:
    noise = ReferenceNoise({"big": 0.001})
    logits = _comparison("big", 2 * 0.001, passed=False, kind="squash-input", op="Softmax", stands_for="prob")
    output = _comparison("prob", 1e-7, passed=True, kind="output", op="Softmax")
    judged = judge_with_noise([output], [logits], noise)
    assert judged is not None and judged[0] == "equivalent" and "judged on that output" in judged[2][-1]


def test_a_saturated_output_still_needs_its_input() -> None:
    noise = ReferenceNoise({"big": 0.001})
    logits = _comparison("big", 2 * 0.001, passed=False, kind="squash-input", op="Softmax", stands_for="prob")
    saturated = _comparison("prob", 0.0, passed=True, degenerate="saturated", kind="output", op="Softmax")
    judged = judge_with_noise([saturated], [logits], noise)
    assert judged is not None and judged[0] == "inconclusive"


def test_beyond_the_margin_the_input_still_fails_the_pair() -> None:
    noise = ReferenceNoise({"big": 0.001})
    logits = _comparison("big", 1.01 * NOISE_MARGIN * 0.001, passed=False, kind="squash-input", op="Softmax", stands_for="prob")
    output = _comparison("prob", 1e-7, passed=True, kind="output", op="Softmax")
    assert judge_with_noise([output], [logits], noise) is None  # not-equivalent stays


def test_a_plain_output_within_the_margin_stays_inconclusive() -> None:
    noise = ReferenceNoise({"y": 0.001})
    judged = judge_with_noise([_comparison("y", 2 * 0.001, passed=False)], [], noise)
    assert judged is not None and judged[0] == "inconclusive"
