"""find --confirm refuses an unrelated same-architecture candidate at resync's first pass.

The audit of an independently initialised model of the suspect's architecture ends in the same
refusal (``unmatched``, "different models") only after resync has settled its ties, which an
unrelated pair is made of (332 s of CPU for two resnet18 seeds, held-out finding F4b of issue
17). A candidate the fingerprint calls unrelated is judged on the first pass first; the audit
runs only when that pass does not refuse it. The final call is the audit's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest

from fixtures import FIXTURES
from fixtures.conversions import to_float16
from onnxlady._provenance import _find
from onnxlady._provenance._find import UNMATCHED, find
from onnxlady._provenance._index import build_index
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import copy_model, permute_copy


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """The resnet fixture at seeds 0 and 1, indexed."""
    for seed in (0, 1):
        onnx.save(FIXTURES["resnet"](seed), tmp_path / f"resnet{seed}.onnx")
    index = tmp_path / "r.idx"
    build_index([tmp_path / "resnet0.onnx", tmp_path / "resnet1.onnx"], index, workers=1)
    return index


def _audited(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the references the audit ran on, in order."""
    calls: list[str] = []
    audit = _find.audit_models

    def counted(reference: onnx.ModelProto, suspect: onnx.ModelProto, **kwargs: Any) -> Any:
        calls.append(reference.graph.name)
        return audit(reference, suspect, **kwargs)

    monkeypatch.setattr(_find, "audit_models", counted)
    return calls


def test_an_unrelated_seed_is_refused_without_its_audit(
    registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suspect = tmp_path / "suspect.onnx"
    onnx.save(to_float16(permute_copy(FIXTURES["resnet"](0), seed=2)[0]), suspect)
    fingerprint_only = find(suspect, registry, top=2)
    assert [Path(c.path).name for c in fingerprint_only.candidates] == ["resnet0.onnx", "resnet1.onnx"]
    assert [c.call for c in fingerprint_only.candidates] == ["derived", "unrelated"]

    audited = _audited(monkeypatch)
    source, seed1 = find(suspect, registry, top=2, confirm=True).candidates
    assert source.confirmation is not None and source.confirmation.verdict != UNMATCHED
    assert seed1.confirmation is not None and seed1.confirmation.verdict == UNMATCHED
    assert "first pass" in seed1.confirmation.summary and "different models" in seed1.confirmation.summary
    assert (source.call, seed1.call) == ("derived", "unrelated")
    assert len(audited) == 1  # the source's audit only

    # The audit itself gives the same call, later: the first pass changed nothing but the time.
    full = _find._confirm(seed1.path, copy_model(onnx.load(suspect)), precheck=False)
    assert full.verdict == UNMATCHED and "different models" in full.summary and "first pass" not in full.summary


def test_a_copy_the_fingerprint_misses_is_still_audited(registry: Path, tmp_path: Path) -> None:
    """Heavy noise moves the true source past the fingerprint's limit: the first pass does not refuse it."""
    suspect = tmp_path / "suspect.onnx"
    noisy = permute_copy(FIXTURES["resnet"](0), seed=2)[0]
    perturb_model(noisy, noise=0.5, seed=4)
    onnx.save(noisy, suspect)
    source = find(suspect, registry, top=2, threshold=1e-9, confirm=True).candidates[0]
    assert Path(source.path).name == "resnet0.onnx" and source.confirmation is not None
    assert source.confirmation.verdict == "perturbed" and source.call == "derived"  # the audit's verdict
