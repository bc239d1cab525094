"""Re-synchronization puts a permuted (and perturbed) copy back into the reference's neuron order."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from fixtures import FIXTURES, RUNNABLE
from onnxlady import (
    ChannelAnalysis,
    OnnxladyError,
    PermutationKey,
    analyze,
    draw_permutations,
    graph_fingerprint,
    permute_model,
    unpermute_model,
    verify_models,
)
from onnxlady._analysis._channels import COPY_SUFFIX
from onnxlady._io._tensors import tensor_holders
from onnxlady._resync._entry import resync_model
from onnxlady._resync._solver import AMBIGUITY_MARGIN, ResyncResult
from onnxlady._transforms._permute import _permute_tensor
from onnxlady.testing import GraphBuilder, copy_model, permute_copy

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


# -- helpers ----------------------------------------------------------------------------------
def _permuted(name: str, seed: int) -> tuple[onnx.ModelProto, onnx.ModelProto, PermutationKey]:
    """The fixture (seed 0), and a copy permuted with ``seed`` and its key."""
    reference = FIXTURES[name](0)
    suspect = copy_model(reference)
    analysis = analyze(suspect)
    key = permute_model(analysis, draw_permutations(analysis, seed))
    return reference, suspect, key


def _add_noise(model: onnx.ModelProto, key: PermutationKey, omega: float, seed: int) -> None:
    """Gaussian noise of ``omega * std`` on every permuted tensor (biases and BatchNorm too)."""
    rng = np.random.default_rng(seed)
    permuted = {entry["tensor"] for entry in key.tensors}
    for name, tensor in sorted(tensor_holders(model).items()):
        values = numpy_helper.to_array(tensor)
        if name not in permuted or tensor.data_type not in _FLOAT_TYPES or float(values.std()) == 0.0:
            continue
        noisy = values + rng.normal(0.0, omega * float(values.astype(np.float64).std()), values.shape)
        tensor.CopyFrom(numpy_helper.from_array(noisy.astype(values.dtype), name))


def _values(model: onnx.ModelProto) -> dict[str, tuple[str, bytes]]:
    """Every constant's dtype and element bytes, by name."""
    result = {}
    for name, tensor in tensor_holders(model).items():
        array = numpy_helper.to_array(tensor)
        result[name] = (str(array.dtype), np.ascontiguousarray(array).tobytes())
    return result


def _assert_restored(reference: onnx.ModelProto, restored: onnx.ModelProto) -> None:
    """Every constant of ``restored`` equals the reference's bit for bit (copies: their source's)."""
    expected, got = _values(reference), _values(restored)
    assert set(expected) <= set(got)
    for name, value in got.items():
        source = name.split(COPY_SUFFIX)[0]
        assert value == expected[source], name


def _first_producer_row(analysis: ChannelAnalysis, model: onnx.ModelProto) -> tuple[str, int, int]:
    """(tensor, axis, size) of the first weight that carries a permutable group's neurons on axis 0."""
    for plan in analysis.tensors:
        for axis, expr in plan.axes:
            groups = analysis.neuron_labels(expr)
            if axis == 0 and any(analysis.group(g).permutable for g in groups):
                return plan.tensor, axis, int(tensor_holders(model)[plan.tensor].dims[axis])
    raise AssertionError("no producer weight")


PERMUTABLE = sorted(name for name in FIXTURES if analyze(FIXTURES[name](0)).permutable_groups)


# -- exact recovery -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_noiseless_resync_restores_the_reference(name: str) -> None:
    reference, suspect, key = _permuted(name, seed=1)
    before = (reference.SerializeToString(), suspect.SerializeToString())
    result = resync_model(reference, suspect, true_key=key)
    assert (reference.SerializeToString(), suspect.SerializeToString()) == before  # inputs untouched
    if name in PERMUTABLE:
        assert result.psi == 100.0 and result.psi_distinguishable == 100.0
        assert all(g.psi == 100.0 and g.ambiguous == 0 for g in result.groups)
    else:
        assert result.groups == [] and result.psi is None
    _assert_restored(reference, result.model)
    # The recovered key applied to the suspect gives the same tensors, and says so.
    again = copy_model(suspect)
    assert unpermute_model(again, result.key) is True
    assert _values(again) == _values(result.model)
    assert graph_fingerprint(result.model) == graph_fingerprint(suspect)  # structure untouched


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**31 - 1), name=st.sampled_from(["resnet", "concat"]))
def test_any_permutation_is_recovered(seed: int, name: str) -> None:
    reference, suspect, key = _permuted(name, seed)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == 100.0
    _assert_restored(reference, result.model)


@pytest.mark.parametrize("name", PERMUTABLE)
def test_small_noise_is_recovered(name: str) -> None:
    reference, suspect, key = _permuted(name, seed=2)
    _add_noise(suspect, key, 0.01, seed=2)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == 100.0
    assert all(0.9 < g.mean_similarity <= 1.0 + 1e-6 for g in result.groups)


@pytest.mark.parametrize("method", ["hungarian", "argmax"])
@pytest.mark.parametrize("refine", [False, True])
def test_methods_and_refinement_run(method: str, refine: bool) -> None:
    reference, suspect, key = _permuted("mobilenet", seed=3)
    result = resync_model(reference, suspect, method=method, refine=refine, true_key=key)
    assert result.psi == 100.0 and result.method == method
    assert result.refined_rounds == (1 if refine else 0)  # nothing left to change after pass one
    assert all(g.duplicate_claims == 0 for g in result.groups)
    json.dumps(result.to_dict())


# -- perturbed suspects -------------------------------------------------------------------------
def _mean_psi(name: str, omega: float, seeds: range, **options: object) -> float:
    values = []
    for seed in seeds:
        reference, suspect, key = _permuted(name, seed)
        _add_noise(suspect, key, omega, seed)
        values.append(resync_model(reference, suspect, true_key=key, **options).psi)
    return float(np.mean(values))


def test_hungarian_beats_argmax_under_strong_noise() -> None:
    hungarian = _mean_psi("vgg", 2.0, range(1, 5))
    argmax = _mean_psi("vgg", 2.0, range(1, 5), method="argmax")
    assert hungarian >= argmax
    reference, suspect, key = _permuted("vgg", 1)
    _add_noise(suspect, key, 2.0, 1)
    claims = resync_model(reference, suspect, method="argmax", true_key=key)
    assert sum(g.duplicate_claims for g in claims.groups) > 0


@pytest.mark.parametrize("name", ["vgg", "resnet", "concat"])
def test_refinement_never_lowers_psi(name: str) -> None:
    reference, suspect, key = _permuted(name, 4)
    _add_noise(suspect, key, 1.0, 4)
    first = resync_model(reference, suspect, true_key=key)
    refined = resync_model(reference, suspect, refine=True, true_key=key)
    assert refined.psi >= first.psi
    assert refined.refined_rounds >= 1


def test_statistics_are_consistent() -> None:
    reference, suspect, key = _permuted("resnet", 5)
    _add_noise(suspect, key, 0.5, 5)
    result = resync_model(reference, suspect, true_key=key)
    for group in result.groups:
        assert 0.0 <= group.min_margin <= group.mean_margin
        assert group.ambiguous <= group.size and group.zero_neurons == 0
        assert math.isfinite(group.mean_similarity)
    assert result.to_dict()["ambiguity_margin"] == AMBIGUITY_MARGIN
    assert json.loads(json.dumps(result.to_dict()))["groups"][0]["id"] == result.groups[0].id


def test_pruned_neuron_is_reported_not_nan() -> None:
    reference, suspect, key = _permuted("vgg", 6)
    holders = tensor_holders(suspect)
    for name in ("features.block1.conv.weight", "features.block1.conv.bias"):
        values = numpy_helper.to_array(holders[name]).copy()
        values[3] = 0.0
        holders[name].CopyFrom(numpy_helper.from_array(values, name))
    result = resync_model(reference, suspect, true_key=key)
    first = result.groups[0]
    assert first.zero_neurons == 1
    assert all(math.isfinite(v) for g in result.groups for v in (g.mean_margin, g.min_margin, g.mean_similarity))
    assert sorted(np.argsort(np.asarray(result.key.groups[0]["perm"]))) == list(range(first.size))
    assert result.psi is not None and result.psi >= 90.0


def test_duplicated_neurons_count_as_interchangeable() -> None:
    reference = FIXTURES["vgg"](0)
    holders = tensor_holders(reference)
    # Neuron 1 of block1 becomes an exact copy of neuron 0 (its weights, bias and next-layer columns).
    for name, axis in (
        ("features.block1.conv.weight", 0),
        ("features.block1.conv.bias", 0),
        ("features.block2.conv.weight", 1),
    ):
        values = numpy_helper.to_array(holders[name]).copy()
        np.moveaxis(values, axis, 0)[1] = np.moveaxis(values, axis, 0)[0]
        holders[name].CopyFrom(numpy_helper.from_array(values, name))
    suspect = copy_model(reference)
    analysis = analyze(suspect)
    key = permute_model(analysis, draw_permutations(analysis, 7))
    result = resync_model(reference, suspect, true_key=key)
    assert result.groups[0].psi_distinguishable == 100.0
    assert result.psi_distinguishable == 100.0
    _assert_restored(reference, result.model)  # either order of the twins gives the same bytes


# -- the output computes what the suspect computes ----------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n in RUNNABLE if n in PERMUTABLE))
def test_output_is_equivalent_and_a_wrong_permutation_is_caught(name: str) -> None:
    reference, suspect, key = _permuted(name, seed=8)
    _add_noise(suspect, key, 0.05, seed=8)
    result = resync_model(reference, suspect)
    assert verify_models(suspect, result.model, provider="cpu").equivalent
    wrong = copy_model(result.model)
    tensor, axis, size = _first_producer_row(analyze(copy_model(reference)), wrong)
    swap = np.arange(size)
    swap[[0, size - 1]] = swap[[size - 1, 0]]
    _permute_tensor(tensor_holders(wrong)[tensor], [(axis, swap)])
    assert not verify_models(suspect, wrong, provider="cpu").equivalent


# -- refusals -----------------------------------------------------------------------------------
def test_another_architecture_is_refused() -> None:
    with pytest.raises(OnnxladyError, match="suspect differs from reference beyond a conversion: after Conv"):
        resync_model(FIXTURES["vgg"](0), FIXTURES["resnet"](0))


def _narrow_vgg() -> onnx.ModelProto:
    """The vgg fixture with its first conv 8 wide instead of 16 (same names)."""
    b = GraphBuilder("vgg", 0)
    x = b.input("input", (1, 3, 32, 32))
    for i, width in enumerate((8, 32, 32), start=1):
        with b.scope(f"features.block{i}"):
            x = b.maxpool(b.relu(b.conv(x, width, 3, name="conv"), name="relu"), 2, name="pool")
    with b.scope("classifier"):
        x = b.relu(b.gemm(b.flatten(x, axis=1, name="flatten"), 64, trans_b=1, name="fc1"), name="relu")
    return b.build(b.gemm(x, 10, trans_b=0, name="logits", gain=1.0))


def test_a_changed_layer_width_is_refused() -> None:
    with pytest.raises(OnnxladyError, match=r"reference has Conv 'features.block1.conv' \[16,3,3,3\].* suspect has Conv 'features.block1.conv' \[8,3,3,3\]"):
        resync_model(FIXTURES["vgg"](0), _narrow_vgg())


@pytest.mark.parametrize("which", ["reference", "suspect"])
def test_nan_weights_are_refused(which: str) -> None:
    reference, suspect, _ = _permuted("vgg", 9)
    target = reference if which == "reference" else suspect
    tensor = tensor_holders(target)["features.block2.conv.weight"]
    values = numpy_helper.to_array(tensor).copy()
    values[0, 0, 0, 0] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    with pytest.raises(OnnxladyError, match=f"of the {which} holds NaN"):
        resync_model(reference, suspect)


def test_bad_method_and_bad_true_key_are_refused() -> None:
    reference, suspect, key = _permuted("vgg", 10)
    with pytest.raises(OnnxladyError, match="unknown resync method"):
        resync_model(reference, suspect, method="greedy")
    frozen = next(g for g in analyze(reference).groups if g.frozen)
    key.groups.append({"id": frozen.id, "size": frozen.size, "perm": list(range(frozen.size))})
    with pytest.raises(OnnxladyError, match=f"group {frozen.id}, which is frozen"):
        resync_model(reference, suspect, true_key=key)


def test_result_type() -> None:
    reference, suspect, _ = _permuted("matmul_mlp", 11)
    result = resync_model(reference, suspect, progress=lambda _: None)
    assert isinstance(result, ResyncResult) and result.psi is None
    assert [g.id for g in result.groups] == [g.id for g in analyze(reference).permutable_groups]


# -- shared constants ---------------------------------------------------------------------------
def test_an_unpermuted_copy_comes_back_unchanged() -> None:
    # The suspect still shares one bias among three groups (nothing untied it): all three
    # groups come out as the identity, so that bias is left as it is.
    reference = FIXTURES["shared_initializer"](0)
    result = resync_model(reference, copy_model(reference))
    assert all(group["perm"] == list(range(group["size"])) for group in result.key.groups)
    assert _values(result.model) == _values(reference)


def test_layers_sharing_their_weights_are_resynced_as_one() -> None:
    """ALBERT-style layers read one block's weights: one joined permutation, no copies, in the
    permuted suspect and in the output (issue 12); resync puts every neuron back."""
    from fixtures.deployment import build_shared_layers

    reference = build_shared_layers(0)
    suspect, _, _, key = permute_copy(reference, 6)
    assert sorted(t.name for t in suspect.graph.initializer) == sorted(t.name for t in reference.graph.initializer)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert _values(result.model) == _values(reference)
