"""What bounds a large audit's peak memory and its passes over the weights, with the same report.

- The re-synchronized suspect of an inline twin is computed once and kept while the audit
  compares it pass after pass (:func:`onnxlady._audit._lazy.resynced_constants`); its last
  reader, the classification of the change, reads each weight once: the kept arrays are let go
  before it (:meth:`LazyConstants.release`), so its work arrays take their place instead of
  coming on top of a model's worth of them (the audit's peak).
- :func:`onnxlady._audit._forensics._distinct_at_least` with ``enough`` reads no further than
  it must: each element adds one pattern at most, so it counts again only once the count could
  have passed ``enough`` (chunks that doubled read up to twice as far on noise-like weights);
- :func:`onnxlady._audit._verdicts._close_chunked` reads a's finiteness from the maximum and
  minimum its tolerance needs, and b's only where every chunk is close (a perturbed weight's
  first chunk differs): the answers of testing both arrays first.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import onnxlady
import onnxlady._audit._verdicts as verdicts_module
import onnxlady._io._external as external_module
import onnxlady._io._files as files_module
from fixtures import FIXTURES
from onnxlady._analysis._channels import analyze
from onnxlady._audit._forensics import DISTINCT_CAP, QUANT_RATIO, _distinct_at_least
from onnxlady._audit._lazy import LazyConstants
from onnxlady._transforms._permute import draw_permutations, permute_model
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import copy_model, permute_producer_only


def _suspect(reference: onnx.ModelProto, *, wrong: bool = False) -> onnx.ModelProto:
    model = copy_model(reference)
    analysis = analyze(model)
    permute_model(analysis, draw_permutations(analysis, 1))
    if wrong:
        permute_producer_only(model, analyze(model))
    perturb_model(model, seed=3, noise=0.05)
    return model


def _paths(tmp_path: Path, wrong: bool = False) -> tuple[Path, Path]:
    reference = FIXTURES["resnet"](0)
    reference_path, suspect_path = tmp_path / "ref.onnx", tmp_path / "sus.onnx"
    onnx.save(reference, reference_path)
    onnx.save(_suspect(reference, wrong=wrong), suspect_path)
    return reference_path, suspect_path


@pytest.fixture(autouse=True)
def _map_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixtures' tensors are small: map every one of at least 1 KB, as large ones are."""
    monkeypatch.setattr(external_module, "INLINE_BYTES", 1024)
    monkeypatch.setattr(files_module, "INLINE_BYTES", 1024)


def test_classification_reads_the_twin_without_keeping_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference_path, suspect_path = _paths(tmp_path)
    created: list[LazyConstants] = []
    resynced = verdicts_module.resynced_constants

    def capture(result: Any) -> Mapping[str, np.ndarray] | None:
        lazy = resynced(result)
        if isinstance(lazy, LazyConstants):
            created.append(lazy)
        return lazy

    kept_when_classified: list[bool] = []
    classify = verdicts_module.classify_change

    def check(ref: Any, sus: Any, weights: dict[str, Any], *args: Any) -> dict[str, Any]:
        (lazy,) = created
        first, second = [name for name in lazy if name in weights][:2]
        alive = weakref.ref(lazy[first])
        lazy[second]  # another weight read: the first one's array is kept only if every one is
        kept_when_classified.append(alive() is not None)
        return classify(ref, sus, weights, *args)

    monkeypatch.setattr(verdicts_module, "resynced_constants", capture)
    monkeypatch.setattr(verdicts_module, "classify_change", check)
    released = onnxlady.audit(reference_path, suspect_path).report
    assert kept_when_classified == [False], "the twin's arrays were all kept through the classification"
    assert released.verdict == "perturbed", released.summary

    # Kept to the end, the report is the same, finding for finding.
    monkeypatch.setattr(verdicts_module, "classify_change", classify)
    monkeypatch.setattr(LazyConstants, "release", lambda self: None)
    kept = onnxlady.audit(reference_path, suspect_path).report
    assert kept.to_dict() == released.to_dict()
    assert kept.perturbation == released.perturbation


def test_a_wrong_permutation_is_still_caught(tmp_path: Path) -> None:
    reference_path, suspect_path = _paths(tmp_path, wrong=True)
    report = onnxlady.audit(reference_path, suspect_path).report
    assert report.exit_code == 1 and report.verdict not in ("identical", "permuted", "converted")
    assert report.differing_tensors


def test_release_lets_go_of_kept_arrays() -> None:
    calls: list[str] = []

    def loader(name: str) -> Any:
        return lambda: calls.append(name) or np.full(2, len(calls))

    lazy = LazyConstants({"a": loader("a"), "b": loader("b")}, keep_all=True)
    lazy["a"], lazy["b"], lazy["a"]
    assert calls == ["a", "b"]  # every array kept
    lazy.release()
    lazy["a"], lazy["a"], lazy["b"], lazy["a"]
    assert calls == ["a", "b", "a", "b", "a"]  # computed again, only the last one kept


def test_distinct_bound_reads_little_past_enough() -> None:
    noise = np.random.default_rng(7).standard_normal(600_000).astype(np.float32)
    enough = max(DISTINCT_CAP, QUANT_RATIO * noise.size)
    full = _distinct_at_least(noise)
    early = _distinct_at_least(noise, enough=enough)
    assert enough < early <= full  # past enough: every threshold up to it answers as the full count
    # Counted again only after the fewest elements that could pass enough (at least 2^16):
    # chunks that doubled had read about 390,000 elements (a bound of about 360,000).
    assert early <= enough + (1 << 16)


def test_close_reads_a_perturbed_weight_without_testing_it_for_finite_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """max(a) and min(a), which the tolerance needs, are a's finiteness test; b's is needed only where all is close."""
    tested: list[int] = []

    def counted(values: np.ndarray) -> bool:
        tested.append(values.size)
        return bool(np.all(np.isfinite(values)))

    monkeypatch.setattr(verdicts_module, "all_finite", counted)
    rng = np.random.default_rng(0)
    a = rng.standard_normal(1000).astype(np.float32)
    assert not verdicts_module._close_chunked(a, a + np.float32(0.1), 1e-5, None)
    assert tested == []  # HEAD tested both arrays first
    assert verdicts_module._close_chunked(a, a.copy(), 1e-5, None) and tested == [1000]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_close_answers_as_the_finite_test_first_did(dtype: type) -> None:
    def reference(a: np.ndarray, b: np.ndarray, rtol: float, allowed: np.ndarray | None) -> bool:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if not (np.all(np.isfinite(a64)) and np.all(np.isfinite(b64))):
            return bool(np.array_equal(a64, b64, equal_nan=True))
        scale = float(np.abs(a64).max()) if a64.size else 0.0
        return bool(np.all(np.abs(a64 - b64) <= rtol * scale + (0.0 if allowed is None else allowed) + 1e-30))

    base = np.linspace(-2, 2, 700).astype(dtype)
    cases = []
    for bad in (np.nan, np.inf, -np.inf):
        spoiled = base.copy()
        spoiled[5] = bad
        cases += [(base, spoiled), (spoiled, base), (spoiled, spoiled.copy()), (spoiled, base * dtype(2))]
    cases += [(base, base.copy()), (base, base * dtype(1.5)), (base[:0], base[:0])]
    for a, b in cases:
        for allowed in (None, np.full(a.shape, np.inf), np.full(a.shape, 0.5)):
            expected = reference(a, b, 1e-5, allowed)
            assert verdicts_module._close_chunked(a, b, 1e-5, allowed) == expected, (a, b, allowed)
