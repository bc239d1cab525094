"""A model that reads one layer's weights in several layers (ALBERT) is derived from its copies.

Held-out round 13, F10: ``find`` called ALBERT's permuted copy ``unrelated`` at distance 0.
The contrast (a pair's distance over its best alternative's) read 1.0: each layer's best
alternative is another reading of the same weights, as close as its own copy. Such pairs
measure nothing now; unrelated models of the architecture stay unrelated.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlady._provenance._find import _threshold_of
from onnxlady._provenance._fingerprint import compare_fingerprints, fingerprint_model, is_derived
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import permute_copy

WIDTH, INNER, REPEATS = 48, 96, 4


def _shared_block_model(seed: int) -> onnx.ModelProto:
    """An input projection, one residual MLP block applied ``REPEATS`` times with the same weights, a head."""
    rng = np.random.default_rng(seed)

    def weight(name: str, rows: int, columns: int) -> onnx.TensorProto:
        values = rng.standard_normal((rows, columns)) / np.sqrt(rows) * np.exp(0.3 * rng.standard_normal(columns))
        return numpy_helper.from_array(values.astype(np.float32), name)

    def bias(name: str, size: int) -> onnx.TensorProto:
        return numpy_helper.from_array((0.1 * rng.standard_normal(size)).astype(np.float32), name)

    initializers = [
        weight("in.w", 16, WIDTH), bias("in.b", WIDTH), weight("up.w", WIDTH, INNER), bias("up.b", INNER),
        weight("down.w", INNER, WIDTH), bias("down.b", WIDTH), weight("head.w", WIDTH, 10), bias("head.b", 10),
    ]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "in.w"], ["h0m"]), helper.make_node("Add", ["h0m", "in.b"], ["h0"])]
    hidden = "h0"
    for k in range(REPEATS):  # the same up/down weights in every block
        nodes += [
            helper.make_node("MatMul", [hidden, "up.w"], [f"u{k}m"]), helper.make_node("Add", [f"u{k}m", "up.b"], [f"u{k}"]),
            helper.make_node("Tanh", [f"u{k}"], [f"a{k}"]),
            helper.make_node("MatMul", [f"a{k}", "down.w"], [f"d{k}m"]), helper.make_node("Add", [f"d{k}m", "down.b"], [f"d{k}"]),
            helper.make_node("Add", [hidden, f"d{k}"], [f"h{k + 1}"]),
        ]  # fmt: skip
        hidden = f"h{k + 1}"
    nodes += [helper.make_node("MatMul", [hidden, "head.w"], ["ym"]), helper.make_node("Add", ["ym", "head.b"], ["y"])]
    graph = helper.make_graph(
        nodes, "shared_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _call(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> tuple[bool, float]:
    match = compare_fingerprints(fingerprint_model(reference), fingerprint_model(suspect))
    return is_derived(match, _threshold_of(match, None)), match.distance


def test_a_permuted_copy_of_a_model_with_repeated_layers_is_derived() -> None:
    reference = _shared_block_model(0)
    derived, distance = _call(reference, permute_copy(reference, 3)[0])
    assert distance < 1e-3 and derived


def test_a_noisy_copy_is_derived_and_other_seeds_are_not() -> None:
    reference = _shared_block_model(0)
    noisy = permute_copy(reference, 3)[0]
    perturb_model(noisy, noise=0.1, seed=4)
    assert _call(reference, noisy)[0]
    for seed in (1, 2, 3):
        derived, distance = _call(reference, _shared_block_model(seed))
        assert not derived, (seed, distance)
