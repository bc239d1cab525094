"""Audit refuses a suspect whose structure pairs but whose weights are unrelated (issue 13, a held-out finding).

Two models of the same layer widths pair structurally at 100 % (an independently initialised copy,
DistilBERT against CLIP's text encoder); the audit then called the other model a ``modified``
copy of the reference. After resync, an unrelated model's neurons are near ties (no match clearly
better than the next) with a low cosine similarity; a derivative keeps clear matches, or, when
pruned, a high similarity of its surviving neurons.
"""

from __future__ import annotations

import pytest

import onnxlady
from fixtures import FIXTURES
from onnxlady.testing import permute_copy


@pytest.mark.parametrize("name", ["vgg", "resnet", "encoder_prenorm", "mobilenet", "matmul_mlp"])
def test_an_independently_initialised_copy_is_another_model(name: str) -> None:
    with pytest.raises(onnxlady.OnnxladyError, match="different models: the structures pair, but the weights do not"):
        onnxlady.audit(FIXTURES[name](0), FIXTURES[name](1))


@pytest.mark.parametrize("name", ["vgg", "nhwc_convnet", "encoder_prenorm"])
@pytest.mark.parametrize(
    "change", [{"noise": 2.0, "seed": 1}, {"prune": 99.0}, {"quantize": 2}], ids=["noise2", "prune99", "bits2"]
)
def test_heavily_changed_derivatives_are_still_audited(name: str, change: dict[str, float]) -> None:
    reference = FIXTURES[name](0)
    suspect = onnxlady.perturb(permute_copy(reference, seed=1)[0], **change).model  # type: ignore[arg-type]
    assert onnxlady.audit(reference, suspect).to_json()["verdict"] == "perturbed"
