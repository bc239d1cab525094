"""Audit forensics (onnxlady/_audit/_forensics.py): each kind of change is named on clear evidence.

A weak change is "kind uncertain"; a scaling attack under noise gets both findings.

Fine-tuning here is real training: SGD steps of cross entropy, computed in numpy on a small
Gemm/ReLU classifier (no torch), written back into the ONNX model.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from onnxlady import analyze, draw_permutations, permute_model
from onnxlady._audit._forensics import classify_change, weight_infos
from onnxlady._audit._verdicts import VERDICTS, AuditReport, audit_models
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import GraphBuilder, copy_model, tensor_holders

LAYERS = ("fc1", "fc2", "head")


def _permute(model: onnx.ModelProto, seed: int = 1) -> onnx.ModelProto:
    analysis = analyze(model)
    permute_model(analysis, draw_permutations(analysis, seed))
    return model


def _get(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(tensor_holders(model)[name]).astype(np.float64)


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    tensor_holders(model)[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _mlp() -> onnx.ModelProto:
    """Input [32, 24] -> Gemm 96 + Relu -> Gemm 96 + Relu -> Gemm 10 (PyTorch Linear layout)."""
    b = GraphBuilder("forensics_mlp", 3)
    x = b.input("input", (32, 24))
    x = b.relu(b.gemm(x, 96, name="fc1"), name="relu1")
    x = b.relu(b.gemm(x, 96, name="fc2"), name="relu2")
    return b.build(b.gemm(x, 10, name="head", gain=1.0))


def _fine_tune(model: onnx.ModelProto, steps: int = 30, lr: float = 0.05, seed: int = 0) -> onnx.ModelProto:
    """A copy of the MLP after ``steps`` real SGD steps.

    Momentum 0.9, weight decay 1e-4, cross entropy on a synthetic 10-class task (class
    prototypes plus noise), gradients by backpropagation in numpy.
    """
    rng = np.random.default_rng(seed)
    params = {f"{n}.{p}": _get(model, f"{n}.{p}") for n in LAYERS for p in ("weight", "bias")}
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    prototypes = rng.standard_normal((10, 24))
    for _ in range(steps):
        labels = rng.integers(0, 10, 32)
        x = prototypes[labels] + 0.5 * rng.standard_normal((32, 24))
        acts, pre = [x], []
        for i, n in enumerate(LAYERS):
            z = acts[-1] @ params[f"{n}.weight"].T + params[f"{n}.bias"]
            pre.append(z)
            acts.append(np.maximum(z, 0) if i < 2 else z)
        logits = acts[-1] - acts[-1].max(axis=1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        grad = probs
        grad[np.arange(32), labels] -= 1
        grad /= 32
        grads = {}
        for i in reversed(range(3)):
            n = LAYERS[i]
            grads[f"{n}.weight"] = grad.T @ acts[i]
            grads[f"{n}.bias"] = grad.sum(axis=0)
            if i:
                grad = (grad @ params[f"{n}.weight"]) * (pre[i - 1] > 0)
        for k in params:
            velocity[k] = 0.9 * velocity[k] + grads[k] + 1e-4 * params[k]
            params[k] = params[k] - lr * velocity[k]
    tuned = copy_model(model)
    for k, v in params.items():
        _set(tuned, k, v)
    return tuned


def _evidence(report: AuditReport) -> dict[str, Any]:
    assert report.perturbation is not None
    return dict(report.perturbation["evidence"])


def _check(report: AuditReport, verdict: str, kind: str | None) -> None:
    assert report.verdict == verdict, report.summary
    assert verdict in VERDICTS
    assert report.exit_code == 1
    json.dumps(report.to_dict())
    if kind is not None:
        assert report.perturbation is not None and report.perturbation["kind"] == kind, report.summary


@pytest.mark.parametrize("omega", [0.05, 1.0, 2.0])
@pytest.mark.parametrize("name", ["vgg", "nhwc_convnet"])
def test_noise_is_noise_never_fine_tuning(name: str, omega: float) -> None:
    """The reported bug: perturb --noise 1 read as fine-tuning. i.i.d. noise of any level is noise."""
    reference = FIXTURES[name](0)
    suspect = _permute(copy_model(reference))
    perturb_model(suspect, noise=omega, seed=5)
    report = audit_models(reference, suspect)
    _check(report, "perturbed", "noise")
    assert "likely noise" in report.summary
    evidence = _evidence(report)
    assert evidence["non_weight_constants_changed"] == []
    assert evidence["relative_change_median"] == pytest.approx(omega, rel=0.1)


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [({"quantize_bits": 2}, "quantization"), ({"quantize_bits": 8}, "quantization"),
     ({"prune_percent": 10}, "pruning"), ({"prune_percent": 99}, "pruning")],
)  # fmt: skip
def test_quantization_and_pruning_extremes(kwargs: dict, kind: str) -> None:
    reference = FIXTURES["resnet"](0)
    suspect = _permute(copy_model(reference))
    perturb_model(suspect, seed=2, **kwargs)
    _check(audit_models(reference, suspect), "perturbed", kind)


def test_real_fine_tuning_is_fine_tuning() -> None:
    reference = _mlp()
    tuned = _fine_tune(reference)
    report = audit_models(reference, _permute(copy_model(tuned)))
    _check(report, "perturbed", "fine-tuning")
    evidence = _evidence(report)
    assert set(evidence["non_weight_constants_changed"]) >= {"fc1.bias", "fc2.bias", "head.bias"}


def test_noise_on_the_same_mlp_is_noise() -> None:
    """The fine-tuning test's model is not fine-tuning whatever changes: noise there reads noise."""
    reference = _mlp()
    suspect = _permute(copy_model(reference))
    perturb_model(suspect, noise=0.3, seed=1)
    _check(audit_models(reference, suspect), "perturbed", "noise")


def test_fine_tuning_needs_both_weights_and_biases() -> None:
    """Only the biases of a fine-tuned copy (weights put back): no dense weight change, kind uncertain."""
    reference = _mlp()
    tuned = _fine_tune(reference)
    for n in LAYERS:
        _set(tuned, f"{n}.weight", _get(reference, f"{n}.weight"))
    report = audit_models(reference, _permute(tuned))
    _check(report, "modified", "uncertain")
    assert report.summary.startswith("weights modified, kind uncertain")


def test_weak_change_is_kind_uncertain() -> None:
    """Three weights nudged: no kind has clear evidence; the verdict says what was seen."""
    reference = FIXTURES["vgg"](0)
    suspect = copy_model(reference)
    weight = _get(suspect, "features.block2.conv.weight")
    weight.reshape(-1)[[5, 200, 3000]] += 0.01
    _set(suspect, "features.block2.conv.weight", weight)
    report = audit_models(reference, _permute(suspect))
    _check(report, "modified", "uncertain")
    assert report.perturbation is not None
    assert "kind uncertain" in report.perturbation["reason"]
    assert "1/5 weight tensors changed" in report.perturbation["reason"]
    assert not report.scaled_neurons


@pytest.mark.parametrize("omega", [0.05, 0.2])
def test_scaling_attack_under_noise_gets_both_findings(omega: float) -> None:
    reference = FIXTURES["vgg"](0)
    suspect = copy_model(reference)
    neurons = [2, 5, 11, 17, 30]
    weight = _get(suspect, "features.block2.conv.weight")
    weight[neurons] *= 1.5
    _set(suspect, "features.block2.conv.weight", weight)
    perturb_model(suspect, noise=omega, seed=4)
    report = audit_models(reference, _permute(suspect))
    _check(report, "scaled", "noise")
    assert sorted((s.group, s.neuron) for s in report.scaled_neurons) == [("g1", j) for j in neurons]
    assert all(abs(s.k - 1.5) < 0.1 and s.compensated_by is None for s in report.scaled_neurons)
    assert "scaled with no compensation" in report.summary and "likely noise" in report.summary


def test_noise_alone_flags_no_neuron() -> None:
    """The attack detector under noise must not fire on noise alone (z-scores of 1000s of rows)."""
    reference = FIXTURES["resnet"](0)
    suspect = _permute(copy_model(reference))
    perturb_model(suspect, noise=0.5, seed=9)
    report = audit_models(reference, suspect)
    _check(report, "perturbed", "noise")
    assert not report.scaled_neurons


def test_classify_change_reads_biases_as_multisets() -> None:
    """A bias the resync mis-paired (values swapped) is not a changed bias: noise stays noise."""
    reference = FIXTURES["vgg"](0)
    ref = {n: _get(reference, n) for n in tensor_holders(reference)}
    sus = {n: v.copy() for n, v in ref.items()}
    rng = np.random.default_rng(0)
    infos = weight_infos(analyze(reference))
    for name in infos:
        sus[name] = ref[name] + 0.3 * ref[name].std() * rng.standard_normal(ref[name].shape)
    sus["features.block2.conv.bias"] = ref["features.block2.conv.bias"][::-1].copy()
    result = classify_change(ref, sus, infos, 1e-5)
    assert result["kind"] == "noise", result["reason"]
    assert result["evidence"]["non_weight_constants_reordered"] == ["features.block2.conv.bias"]
    sus["features.block2.conv.bias"] = ref["features.block2.conv.bias"] + 0.01
    assert classify_change(ref, sus, infos, 1e-5)["kind"] != "noise"


def test_noise_across_a_conversion_tolerates_a_few_other_constants() -> None:
    """Across a conversion one bias past its storage bound next to noisy weights is still noise; many are not."""
    reference = FIXTURES["resnet"](0)  # 25 biases and BatchNorm constants
    ref = {n: _get(reference, n) for n in tensor_holders(reference)}
    sus = {n: v.copy() for n, v in ref.items()}
    rng = np.random.default_rng(0)
    infos = weight_infos(analyze(reference))
    for name in infos:
        sus[name] = ref[name] + 0.3 * ref[name].std() * rng.standard_normal(ref[name].shape)
    allowed = {name: np.zeros_like(ref[name]) for name in ref}  # a conversion with exact storage
    others = sorted(n for n in ref if n not in infos)
    sus[others[0]] = ref[others[0]] + 0.01
    result = classify_change(ref, sus, infos, 1e-5, allowed)
    assert len(others) >= 10 and result["kind"] == "noise", result["reason"]
    assert f"1 of {len(others)} other constants differ" in result["reason"]
    assert classify_change(ref, sus, infos, 1e-5)["kind"] != "noise"  # no conversion: no tolerance
    for name in others:
        sus[name] = ref[name] + 0.01
    assert classify_change(ref, sus, infos, 1e-5, allowed)["kind"] != "noise"


def test_structured_change_of_few_tensors_is_not_fine_tuning() -> None:
    """Low-rank, uneven changes with no bias change read fine-tuning only when most layers moved."""
    reference = FIXTURES["vgg"](0)
    ref = {n: _get(reference, n) for n in tensor_holders(reference)}
    infos = weight_infos(analyze(reference))
    rng = np.random.default_rng(0)

    def structured(name: str) -> np.ndarray:
        w = ref[name]
        rows = w.shape[infos[name].row_axis]
        matrix = np.outer(np.exp(2 * rng.standard_normal(rows)), rng.standard_normal(w.size // rows))
        change = np.moveaxis(matrix.reshape((rows, *np.delete(w.shape, infos[name].row_axis))), 0, infos[name].row_axis)
        return w + 0.05 * w.std() * change / change.std()

    names = sorted(infos)
    few = {n: v.copy() for n, v in ref.items()} | {names[0]: structured(names[0])}
    result = classify_change(ref, few, infos, 1e-5)
    assert result["kind"] == "uncertain", result["reason"]
    assert result["evidence"]["spectral_excess_median"] >= 5 and result["evidence"]["row_dispersion_median"] >= 5
    every = {n: v.copy() for n, v in ref.items()} | {n: structured(n) for n in names}
    assert classify_change(ref, every, infos, 1e-5)["kind"] == "fine-tuning"


# -- the statistics' fast forms equal the plain ones ----------------------------------------------
_DISTINCT_CASES = [
    np.zeros(0, np.float32),
    np.zeros(0),
    np.array([np.nan]),
    np.array([np.nan, np.nan, 1.0]),
    np.array([np.nan, -np.nan, 2.0, 2.0], np.float32),
    np.array([-0.0, 0.0], np.float32),
    np.array([-0.0, 0.0, 0.0]),
    np.array([np.inf, -np.inf, np.inf, np.nan, 0.0]),
    np.array([1e300, 1.0]),  # float64 beyond float32's range
    np.array([1.0, 1.0 + 2.0**-40]),  # float64 values float32 cannot tell apart
    np.array([1, 2, 2, 3], np.int8),
    np.array([True, False, True]),
    np.array([1 + 1j, 1 + 1j, np.nan + 0j]),
    np.random.default_rng(0).standard_normal(1000).astype(np.float32).astype(np.float64),  # widened float32
    np.round(np.random.default_rng(1).standard_normal((30, 40)) * 4) / 4,  # a quantization grid
    np.random.default_rng(2).standard_normal(500).astype(np.float16),
    np.random.default_rng(3).standard_normal((7, 9))[:, ::2],  # not contiguous
]


@pytest.mark.parametrize("values", _DISTINCT_CASES, ids=range(len(_DISTINCT_CASES)))
def test_distinct_counts_as_numpy_unique_and_leaves_the_array(values: np.ndarray) -> None:
    from onnxlady._audit._forensics import _distinct

    kept = values.copy()
    assert _distinct(values) == np.unique(values).size
    assert np.array_equal(values, kept, equal_nan=True) and values.dtype == kept.dtype


def test_chi2_quartile_ratio_is_scipy_stats_bit_for_bit() -> None:
    import math

    from scipy import stats

    from onnxlady._audit._forensics import _chi2_log_iqr

    for width in (2, 3, 7, 16, 63, 64, 1000, 5760, 3686400):
        assert _chi2_log_iqr(width) == math.log(stats.chi2.ppf(0.75, width) / stats.chi2.ppf(0.25, width))


def test_correlation_is_numpy_corrcoef() -> None:
    from onnxlady._audit._forensics import _correlation

    rng = np.random.default_rng(4)
    x = rng.standard_normal(10_000) + 3.0  # a mean to take out
    for y in (rng.standard_normal(10_000), 0.3 * x + rng.standard_normal(10_000), -2 * x):
        scratch = np.empty_like(y)
        assert _correlation(x, y, scratch) == pytest.approx(float(np.corrcoef(x, y)[0, 1]), rel=1e-12, abs=1e-15)


def test_rows_are_the_moveaxis_slices() -> None:
    from onnxlady._audit._verdicts import _rows

    rng = np.random.default_rng(5)
    for shape in [(5,), (4, 3), (6, 3, 2, 2), (2, 3, 4)]:
        array = rng.standard_normal(shape)
        for axis in range(array.ndim):
            for pos in (np.array([0]), np.arange(array.shape[axis])[::-1]):
                expected = np.moveaxis(np.take(array, pos, axis=axis), axis, 0).reshape(-1)
                assert np.array_equal(_rows(array, axis, pos), expected)


# -- distinct counts: capped, exact where the quantization vote needs them ----------------------
def _exact_distinct(values: np.ndarray) -> int:
    """Distinct values (NaNs once, -0 equal to 0) counted through Python floats: no numpy sort."""
    flat = [float(v) for v in np.ravel(values)]
    return len({v for v in flat if v == v}) + any(v != v for v in flat)


def test_float16_distinct_counts_every_value_once() -> None:
    from onnxlady._audit._forensics import _distinct

    nan_payload = np.array([0x7E01], np.uint16).view(np.float16)  # a NaN of another payload
    cases = [
        np.array([-0.0, 0.0, 1.0, np.inf, -np.inf, np.nan], np.float16),
        np.concatenate([np.array([np.nan], np.float16), nan_payload, np.array([2.0], np.float16)]),
        np.zeros(0, np.float16),
        np.array([-0.0], np.float16),
        # A few million values: numpy's own float16 sort leaves some out of order here (numpy
        # 2.4 on AVX-512), and np.unique over-counted them.
        (np.random.default_rng(6).standard_normal(3_000_000) * 0.05).astype(np.float16),
    ]
    for values in cases:
        assert _distinct(values) == _exact_distinct(values.astype(np.float32))


def test_distinct_lower_bound_never_exceeds_the_count() -> None:
    from onnxlady._audit._forensics import _distinct, _distinct_at_least

    rng = np.random.default_rng(7)
    cases = [
        rng.standard_normal(100_000).astype(np.float32),
        rng.standard_normal(100_000).astype(np.float32).astype(np.float64),
        np.array([-0.0, 0.0, -0.0], np.float32),
        np.array([-0.0, 0.0, 3.0]),
        np.round(rng.standard_normal(50_000) * 8) / 8,
        np.array([np.nan, 1.0, 2.0], np.float32),  # no bound: 0
    ]
    for values in cases:
        bound = _distinct_at_least(values)
        assert 0 <= bound <= _distinct(values)
        assert _distinct_at_least(values, 1000) <= bound
    assert _distinct_at_least(np.array([np.nan, 1.0])) == 0
    noise = cases[0]
    assert _distinct_at_least(noise) > 0.25 * noise.size  # the bound settles the vote for noise


@pytest.mark.parametrize(
    "sus_levels, ref_levels, size",
    [
        (16, None, 200_000),  # a quantized suspect of a float reference
        (None, None, 200_000),  # noise: both beyond the cap
        (20_000, 100_000, 400_000),  # 20000 <= 100000 / 4: few, both needed exactly
        (20_000, 70_000, 400_000),  # 20000 > 70000 / 4: not few
        (70_000, None, 1_000_000),  # 70000 <= 1000000 / 4 though both pass the cap
        (100, 50, 10_000),  # both small
        (None, 300, 200_000),  # the suspect beyond the cap, the reference not
    ],
)
def test_capped_distinct_counts_decide_as_the_exact_ones(
    sus_levels: int | None, ref_levels: int | None, size: int
) -> None:
    from onnxlady._audit._forensics import DISTINCT_CAP, QUANT_RATIO, _distinct, _distinct_counts

    rng = np.random.default_rng(8)

    def values(levels: int | None) -> np.ndarray:
        if levels is None:
            return rng.standard_normal(size).astype(np.float32)
        grid = rng.standard_normal(levels).astype(np.float32)
        return grid[np.concatenate([np.arange(levels), rng.integers(0, levels, size - levels)])]

    sus, ref = values(sus_levels), values(ref_levels)
    exact_sus, exact_ref = _distinct(sus), _distinct(ref)
    sus_count, ref_count, few = _distinct_counts(ref, sus, same=False)
    assert few == (exact_sus <= QUANT_RATIO * exact_ref)
    for count, exact in ((sus_count, exact_sus), (ref_count, exact_ref)):
        assert count == exact if count is not None else exact > DISTINCT_CAP
        if exact <= DISTINCT_CAP:
            assert count == exact
    same_count, other_count, same_few = _distinct_counts(ref, ref, same=True)
    assert same_count == other_count and not same_few
    assert same_count == exact_ref if same_count is not None else exact_ref > DISTINCT_CAP


def test_sorted_is_numpy_sort() -> None:
    from onnxlady._audit._forensics import _sorted

    rng = np.random.default_rng(9)
    for values in (
        rng.standard_normal(10_000).astype(np.float32).astype(np.float64),
        rng.standard_normal(10_000),  # not float32 values: sorted in float64
        np.array([1e300, -1e300, 0.0]),
        np.array([np.nan, 1.0, -0.0, 0.0]),
        np.zeros(0),
    ):
        assert np.array_equal(_sorted(values), np.sort(values), equal_nan=True)
        assert _sorted(values).dtype == np.float64


def test_chunked_close_is_the_whole_tensor_comparison() -> None:
    from onnxlady._audit._verdicts import _CHUNK, _close

    def whole(a: np.ndarray, b: np.ndarray, rtol: float, allowed: np.ndarray | None) -> bool:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if not np.all(np.isfinite(a64)) or not np.all(np.isfinite(b64)):
            return bool(np.array_equal(a64, b64, equal_nan=True))
        scale = float(np.abs(a64).max()) if a64.size else 0.0
        return bool(np.all(np.abs(a64 - b64) <= rtol * scale + (0.0 if allowed is None else allowed) + 1e-30))

    rng = np.random.default_rng(10)
    a = rng.standard_normal((3, _CHUNK + 5)).astype(np.float32)
    for b, allowed in [
        (a.copy(), None),
        (a + np.float32(1e-7), None),
        (a + np.float32(1e-3), None),
        (np.where(np.arange(a.size).reshape(a.shape) == a.size - 1, a + 1, a), None),  # last element only
        (a.astype(np.float16), np.full(a.shape, 1e-3)),
        (a.astype(np.float16), np.full(a.shape, 1e-6)),
        (np.where(a > 2, np.inf, a), None),
        (a.astype(np.float64) + 1e-12, None),
    ]:
        assert _close(a, b, 1e-5, allowed) == whole(a, b, 1e-5, allowed)
    with_nan = np.where(a > 2, np.nan, a)
    assert _close(with_nan, with_nan.copy(), 1e-5) and whole(with_nan, with_nan.copy(), 1e-5, None)


def test_tensor_dict_is_asdict() -> None:
    from dataclasses import asdict

    from onnxlady._audit._verdicts import TensorAudit, _tensor_dict

    audit = TensorAudit("w", "g0", 0, [1.0, 0.5], [1.0, 2.0], [1])
    assert _tensor_dict(audit) == asdict(audit)
    assert list(_tensor_dict(audit)) == list(asdict(audit))
