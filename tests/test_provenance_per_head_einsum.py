"""Per-head Einsum weights are fingerprinted; ``permute_producer_only`` finds Einsum weights (session 16).

``bhsd,hdf->bhsf`` holds one ``[d, f]`` weight per head ``h`` (the letter ``h`` is on the data,
the weight and the output: a batch of weights). The fingerprint read no layer there (the
Einsum reader took only weights whose every letter is a neuron or an input letter), so a model
written with per-head weights had no layer and ``find`` could not call its permuted copy
derived. The weight is now read as the batched MatMul ``x[b,h,s,d] @ W[h,d,f]`` is: neurons
``f``, inputs ``(h, d)``. ``onnxlady.testing.permute_producer_only`` did not find an Einsum
weight (the rule's role names the letter: ``"einsum weight, letter 'f'"``) and raised; it
now swaps one such weight's rows, a wrong permutation verify catches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlady
from fixtures import FIXTURES
from fixtures.conversions import to_float16
from onnxlady import analyze, verify_models
from onnxlady._provenance._einsum import einsum_rows
from onnxlady._provenance._fingerprint import fingerprint_model
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

HEADS, SEQ, WIDTH, HIDDEN, OUT = 4, 6, 16, 32, 8


def build_per_head(seed: int) -> onnx.ModelProto:
    """Three per-head layers (``bhsd,hdf->bhsf`` and two more), a bias and two Relus; weights from ``seed``."""
    rng = np.random.default_rng(seed)
    shapes = {"w1": (HEADS, WIDTH, HIDDEN), "w2": (HEADS, HIDDEN, HIDDEN), "w3": (HEADS, HIDDEN, OUT)}
    initializers = [
        numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32), name)
        for name, shape in shapes.items()
    ]
    initializers.append(
        numpy_helper.from_array((0.1 * rng.standard_normal((HEADS, 1, HIDDEN))).astype(np.float32), "b1")
    )
    nodes = [
        helper.make_node("Einsum", ["x", "w1"], ["h1"], equation="bhsd,hdf->bhsf"),
        helper.make_node("Add", ["h1", "b1"], ["h1.bias"]),
        helper.make_node("Relu", ["h1.bias"], ["a1"]),
        helper.make_node("Einsum", ["a1", "w2"], ["h2"], equation="bhsf,hfg->bhsg"),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Einsum", ["a2", "w3"], ["y"], equation="bhsg,hge->bhse"),
    ]
    graph = helper.make_graph(
        nodes, "per_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HEADS, SEQ, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, HEADS, SEQ, OUT])], initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _permuted(model: onnx.ModelProto) -> onnx.ModelProto:
    permuted, _, perms, _ = permute_copy(model, 5)
    assert sorted(p.size for p in perms.values()) == [HIDDEN, HIDDEN], "the hidden units of both heads' layers move"
    return permuted


def test_a_per_head_weight_is_read_as_a_batched_matmul_weight() -> None:
    weight = np.random.default_rng(0).standard_normal((HEADS, WIDTH, HIDDEN)).astype(np.float32)
    node = helper.make_node("Einsum", ["x", "w"], ["y"], equation="bhsd,hdf->bhsf")
    # Rows: the neurons f; columns: (h, d), as _axis_matrix reads the MatMul weight [h, d, f].
    np.testing.assert_array_equal(einsum_rows(node, [None, weight]), np.moveaxis(weight, 2, 0).reshape(HIDDEN, -1))
    # A letter on the weight alone (summed over) or no neuron letter: still no layer.
    assert einsum_rows(helper.make_node("Einsum", ["x", "w"], ["y"], equation="bhsd,hdf->bhs"), [None, weight]) is None
    summed = helper.make_node("Einsum", ["x", "w"], ["y"], equation="bsd,kdf->bsf")
    assert einsum_rows(summed, [None, weight]) is None


def test_the_permuted_copy_is_equivalent_and_a_wrong_permutation_is_caught() -> None:
    source = build_per_head(0)
    assert verify_models(source, _permuted(source), provider="cpu").equivalent
    wrong = copy_model(source)
    assert permute_producer_only(wrong, analyze(wrong)) == "w1"  # raised "no permutable producer weight" before
    assert not verify_models(source, wrong, provider="cpu").equivalent


@pytest.fixture(scope="module")
def per_head_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of the per-head model (seed 0), the same architecture of two other seeds, and a VGG."""
    folder = tmp_path_factory.mktemp("per_head_registry")
    for seed in (0, 1, 2):
        onnx.save(build_per_head(seed), folder / f"seed{seed}.onnx")
    onnx.save(FIXTURES["vgg"](0), folder / "vgg.onnx")
    index = folder / "r.idx"
    onnxlady.build_index([folder], index, workers=1)
    return index


@pytest.mark.parametrize("convert", [_permuted, lambda m: to_float16(_permuted(m))], ids=["permuted", "float16"])
def test_find_ranks_the_true_reference_first(
    convert: Callable[[onnx.ModelProto], onnx.ModelProto], per_head_registry: Path, tmp_path: Path
) -> None:
    suspect = tmp_path / "suspect.onnx"
    onnx.save(convert(build_per_head(0)), suspect)
    assert fingerprint_model(onnx.load(suspect)).layers == 3
    candidates = onnxlady.find(suspect, per_head_registry, top=4).candidates
    first = candidates[0]
    assert Path(first.path).name == "seed0.onnx"
    assert (first.call, first.paired_layers, first.unpaired_layers) == ("derived", 3, (0, 0))
    others = {Path(c.path).name: c for c in candidates[1:]}
    for seed in ("seed1.onnx", "seed2.onnx"):  # the same architecture, other weights: compared, not derived
        assert others[seed].call == "unrelated" and others[seed].paired_layers == 3, others[seed]
