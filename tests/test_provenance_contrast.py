"""The ratio test: with many interchangeable layers, the closest of several unrelated candidates
is no closer than the next one, while a derived layer is far closer to its copy than to anything.

Held-out finding of issue 17: two seeds of timm's ViT-B/16 (12 identical blocks) read 0.71 apart,
under their limit of 0.87, because the layer assignment picks the closest of about nine
same-shape candidates for each layer.
"""

from __future__ import annotations

import pytest

from fixtures import build_deep_model
from onnxlady import perturb
from onnxlady._provenance._find import _threshold_of
from onnxlady._provenance._fingerprint import (
    CONTRAST_LIMIT,
    compare_fingerprints,
    fingerprint_model,
    is_derived,
)
from onnxlady.testing import permute_copy


@pytest.mark.parametrize(("nodes", "width"), [(240, 64), (120, 128)])
def test_other_seed_of_a_repetitive_model_is_not_derived(nodes: int, width: int) -> None:
    reference = fingerprint_model(build_deep_model(nodes, width, seed=0))
    other = compare_fingerprints(fingerprint_model(build_deep_model(nodes, width, seed=1)), reference)
    limit = _threshold_of(other, None)
    # The distance alone would call it derived: the selection among same-shape layers biases it low.
    assert other.distance <= limit
    assert other.contrast is not None and other.contrast > CONTRAST_LIMIT
    assert not is_derived(other, limit)

    copy = permute_copy(build_deep_model(nodes, width, seed=0), seed=3)[0]
    for suspect in (copy, perturb(copy, noise=0.1, seed=5).model):
        derived = compare_fingerprints(fingerprint_model(suspect), reference)
        assert derived.contrast is not None and derived.contrast < 0.5 * CONTRAST_LIMIT
        assert is_derived(derived, _threshold_of(derived, None))


def test_contrast_needs_enough_contrasted_pairs() -> None:
    """A model with a few layers of distinct shapes has no alternatives: the distance decides."""
    from fixtures import FIXTURES

    reference = fingerprint_model(FIXTURES["vgg"](0))
    match = compare_fingerprints(fingerprint_model(permute_copy(FIXTURES["vgg"](0), seed=1)[0]), reference)
    assert match.contrast is None and is_derived(match, _threshold_of(match, None))
