"""The derived/unrelated call: a threshold that grows with the layers compared, and the ranking rule.

Calibrated by ``python3 -m tools.registry_experiment`` (docs/provenance.md); these tests pin the
rule's shape and its use by ``find`` and ``find_all_pairs``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import FIXTURES
from onnxlady._provenance._find import (
    DERIVED_THRESHOLD,
    EVIDENCE,
    MIN_THRESHOLD,
    derived_threshold,
    find,
    find_all_pairs,
)
from onnxlady._provenance._fingerprint import ModelFingerprint, fingerprint_model
from onnxlady._provenance._index import add_fingerprints, build_index
from onnxlady.testing import permute_copy


def test_threshold_grows_with_the_layers_compared() -> None:
    limits = [derived_threshold(n) for n in range(1, 400)]
    assert all(a <= b for a, b in itertools.pairwise(limits))
    assert derived_threshold(1) == derived_threshold(2) == MIN_THRESHOLD
    assert derived_threshold(3) == pytest.approx(math.sqrt(1 - EVIDENCE / math.sqrt(3)))
    assert 0.39 < derived_threshold(3) < 0.41 and 0.89 < derived_threshold(60) < 0.91
    assert derived_threshold(10**6) < 1.0
    assert pytest.approx(derived_threshold(4)) == DERIVED_THRESHOLD


def _noisy(fingerprint: ModelFingerprint, shift: float) -> ModelFingerprint:
    """A fingerprint whose layer records all moved by ``shift`` (a stand-in for a far derivative)."""
    return ModelFingerprint(
        (fingerprint.records + np.float32(shift)).astype(np.float32), fingerprint.shapes, fingerprint.ops,
        fingerprint.names,
    )  # fmt: skip


def test_find_calls_each_candidate_by_its_own_limit(tmp_path: Path) -> None:
    reference = fingerprint_model(FIXTURES["resnet"](0))
    index = tmp_path / "r.idx"
    add_fingerprints(index, [("resnet", reference), ("vgg", fingerprint_model(FIXTURES["vgg"](0)))])
    report = find(_noisy(reference, 0.0), index, top=2)
    best = report.candidates[0]
    slots = best.paired_layers + sum(best.unpaired_layers)
    assert best.path == "resnet" and best.call == "derived"
    assert best.threshold == pytest.approx(derived_threshold(slots)) and best.score == pytest.approx(1.0)
    assert report.threshold is None and json.loads(json.dumps(report.to_json()))["candidates"][0]["threshold"] > 0
    # A shift that puts the copy just past its limit is called unrelated; a fixed threshold overrides.
    far = _noisy(reference, 0.02)
    moved = find(far, index, top=1).candidates[0]
    assert moved.path == "resnet"
    fixed = find(far, index, top=1, threshold=moved.distance * 1.01).candidates[0]
    assert fixed.call == "derived" and fixed.threshold == pytest.approx(moved.distance * 1.01)
    strict = find(far, index, top=1, threshold=moved.distance * 0.99).candidates[0]
    assert strict.call == "unrelated"


def test_a_model_sharing_no_layer_ranks_last_and_is_never_derived(tmp_path: Path) -> None:
    """A far copy of a model (distance above 1) still ranks before models with no layer in common."""
    reference = fingerprint_model(FIXTURES["matmul_mlp"](0))
    other = fingerprint_model(FIXTURES["vgg"](0))
    index = tmp_path / "r.idx"
    add_fingerprints(index, [("mlp", reference), ("vgg", other)])
    far = _noisy(reference, 0.1)  # two of three layers still pair, each past 1
    report = find(far, index, top=2)
    assert [c.path for c in report.candidates] == ["mlp", "vgg"]
    assert report.candidates[0].distance > 1.0 and report.candidates[0].paired_layers > 0
    assert report.candidates[1].distance == pytest.approx(1.0) and report.candidates[0].call == "unrelated"
    assert report.candidates[1].paired_layers == 0 and report.candidates[1].call == "unrelated"
    # Without that rule, plain distance order would have put vgg first: the rule is what ranks mlp.
    assert sorted(report.candidates, key=lambda c: c.distance)[0].path == "vgg"


def test_all_pairs_use_the_same_limits(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    onnx.save(FIXTURES["resnet"](0), registry / "resnet.onnx")
    onnx.save(permute_copy(FIXTURES["resnet"](0), seed=3)[0], registry / "resnet.permuted.onnx")
    onnx.save(FIXTURES["resnet"](1), registry / "resnet.seed1.onnx")
    index = tmp_path / "r.idx"
    build_index([registry], index, workers=1)
    report = find_all_pairs(index)
    assert report.threshold is None
    assert [sorted(Path(m).name for m in c.members) for c in report.clusters] == [["resnet.onnx", "resnet.permuted.onnx"]]
    assert find_all_pairs(index, threshold=10.0).clusters[0].members.__len__() == 3  # everything pairs
