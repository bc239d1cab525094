"""Two consecutive ``Transpose``s fused by onnxoptimizer: a conversion, not an operator with other attributes.

onnxoptimizer's ``fuse_consecutive_transposes`` writes ``Transpose(Transpose(x, p1), p2)`` as the
second ``Transpose`` (its name and output kept) reading ``x`` with ``perm`` ``q[i] = p1[p2[i]]``.
The rotary fixture's key path (``k_t`` then ``k_tt``) is fused so: its untouched copy (verify:
EQUIVALENT) read ``modified``, "Transpose 'block0.k_tt' has other attributes", exit 1. A ``perm``
that is not the composition is still an edit.
"""

from __future__ import annotations

import itertools
import logging

import onnx
import pytest

from fixtures import FIXTURES
from fixtures.deployment import CONVERTERS
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

pytest.importorskip("onnxoptimizer")
logging.getLogger("onnxruntime").setLevel(logging.ERROR)

_FUSED = "block0.k_tt"


def _perm(model: onnx.ModelProto) -> list[int]:
    node = next(n for n in model.graph.node if n.name == _FUSED)
    return list(next(a for a in node.attribute if a.name == "perm").ints)


def test_the_optimizer_fuses_the_key_transposes() -> None:
    """What the tests below read (this can fail)."""
    reference = FIXTURES["contrib_rotary"](0)
    suspect = CONVERTERS["onnxoptimizer"](copy_model(reference))
    assert "block0.k_t" in {n.name for n in reference.graph.node}
    assert "block0.k_t" not in {n.name for n in suspect.graph.node}
    assert _perm(reference) == [0, 1, 3, 2] and _perm(suspect) == [0, 2, 3, 1]


def test_the_fused_copy_is_converted_and_its_permuted_copy_permuted() -> None:
    reference = FIXTURES["contrib_rotary"](0)
    suspect = CONVERTERS["onnxoptimizer"](copy_model(reference))
    assert verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "converted" and report.exit_code == 0, report.summary
    permuted = permute_copy(reference, 3)[0]
    report = audit_models(reference, CONVERTERS["onnxoptimizer"](permuted))
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong))
    wrong = CONVERTERS["onnxoptimizer"](wrong)
    assert not verify_models(reference, wrong, provider="cpu").equivalent
    assert audit_models(reference, wrong).exit_code == 1


#: Perms other than the composition (0, 2, 3, 1) and the reference's own (0, 1, 3, 2): another attribute.
OTHERS = [p for p in itertools.permutations(range(4)) if p[0] == 0 and p not in ((0, 2, 3, 1), (0, 1, 3, 2))]


@pytest.mark.parametrize("perm", OTHERS)
def test_a_perm_that_is_not_the_composition_is_an_edit(perm: tuple[int, ...]) -> None:
    reference = FIXTURES["contrib_rotary"](0)
    suspect = CONVERTERS["onnxoptimizer"](copy_model(reference))
    node = next(n for n in suspect.graph.node if n.name == _FUSED)
    attribute = next(a for a in node.attribute if a.name == "perm")
    del attribute.ints[:]
    attribute.ints.extend(perm)
    report = audit_models(reference, suspect)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary
    assert f"Transpose '{_FUSED}' has other attributes" in report.summary, report.summary
