"""Permute -> verify -> unpermute on every fixture, and the wrong permutation that must be caught."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import FIXTURES, RUNNABLE
from onnxlady import analyze, graph_fingerprint, unpermute_model, verify_models
from onnxlady.testing import constant_bytes, copy_model, permute_copy, permute_producer_only

FIXTURE_NAMES = sorted(FIXTURES)
_SOURCES = {name: FIXTURES[name](0) for name in FIXTURE_NAMES}


def _permuted(name: str, seed: int):
    source = _SOURCES[name]
    return (source, *permute_copy(source, seed))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_permutation_is_non_identity_and_changes_weights(name: str) -> None:
    source, model, analysis, perms, _ = _permuted(name, seed=3)
    assert set(perms) == {g.id for g in analysis.permutable_groups}
    for gid, perm in perms.items():
        assert not np.array_equal(perm, np.arange(perm.size)), gid
    if perms:
        assert constant_bytes(model) != constant_bytes(source)
    else:
        assert name in ("custom_op",), "every other fixture has something to permute"


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_permuted_model_is_equivalent(name: str) -> None:
    source, model, _, perms, _ = _permuted(name, seed=1)
    assert perms, "nothing was permuted: the test would prove nothing"
    report = verify_models(source, model, provider="cpu", iterations=2)
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_wrong_permutation_is_caught(name: str) -> None:
    source = _SOURCES[name]
    model = copy_model(source)
    analysis = analyze(model)
    permute_producer_only(model, analysis)
    report = verify_models(source, model, provider="cpu")
    assert not report.equivalent


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_unpermute_restores_the_source_bit_for_bit(name: str) -> None:
    source, model, _, _, key = _permuted(name, seed=2)
    assert unpermute_model(model, key) is True
    assert constant_bytes(model) == constant_bytes(source)
    assert model.SerializeToString() == source.SerializeToString()


@pytest.mark.parametrize("name", ["vgg", "concat", "mobilenet", "shared_initializer"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_any_seed_keeps_the_function_and_restores(name: str, seed: int) -> None:
    source, model, _, _, key = _permuted(name, seed)
    assert verify_models(source, model, provider="cpu").equivalent
    assert unpermute_model(model, key)
    assert constant_bytes(model) == constant_bytes(source)


def test_seeds_are_reproducible_and_distinct() -> None:
    _, first, _, perms_a, _ = _permuted("resnet", seed=7)
    _, second, _, perms_b, _ = _permuted("resnet", seed=7)
    _, third, _, _, _ = _permuted("resnet", seed=8)
    assert first.SerializeToString() == second.SerializeToString()
    assert first.SerializeToString() != third.SerializeToString()
    assert all(np.array_equal(perms_a[g], perms_b[g]) for g in perms_a)


def test_a_key_does_not_apply_to_another_model() -> None:
    _, _, _, _, key = _permuted("vgg", seed=1)
    _, other, _, _, _ = _permuted("resnet", seed=1)
    from onnxlady import OnnxladyError

    with pytest.raises(OnnxladyError, match="different model"):
        unpermute_model(other, key)


def test_key_records_sources_and_fingerprints() -> None:
    source, model, analysis, perms, key = _permuted("concat", seed=1)
    document = key.to_json()
    assert document["source"]["graph_fingerprint"] == graph_fingerprint(source)
    assert document["permuted"]["graph_fingerprint"] == graph_fingerprint(model)
    for group in document["groups"]:
        assert group["perm"] == [int(i) for i in perms[group["id"]]]
        assert group["size"] == analysis.group(group["id"]).size
        assert group["members"], "a permuted group names the weights it moved"
