"""Audit: a suspect in the reference's own neuron order is ``converted``, never ``permuted``.

Held-out finding F12 of session 9: onnx-simplifier rewrote an untouched hrnet_w18_small (it
removed seven ``Constant`` nodes) and left no converter's signature the matching lists (no
renamed layer, no fused or quantized weight); resync recovered the identity in every group,
yet the audit said ``permuted`` ("the neurons re-ordered"). No neuron moved: the verdict is
``converted``. Here the reference holds one weight in a ``Constant`` node and the suspect in an
initializer (the same numbers, the same name): the untouched copy is ``converted``, a permuted
copy stays ``permuted`` and a wrong permutation is no clean verdict.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from fixtures import FIXTURES
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only


def _weight_in_a_constant_node(model: onnx.ModelProto, name: str = "logits.bias") -> onnx.ModelProto:
    """The model with initializer ``name`` written as a ``Constant`` node (as an exporter may write it)."""
    written = copy_model(model)
    tensor = next(t for t in written.graph.initializer if t.name == name)
    kept = [t for t in written.graph.initializer if t.name != name]
    del written.graph.initializer[:]
    written.graph.initializer.extend(kept)
    written.graph.node.insert(0, helper.make_node("Constant", [], [name], value=tensor))
    onnx.checker.check_model(written)
    return written


def _in_order(report: object) -> bool:
    resync = report.resync  # type: ignore[attr-defined]
    if resync.across is not None:
        return all(np.array_equal(m, np.arange(m.size)) for m in resync.across.matches.values())
    return all(np.array_equal(np.asarray(g["perm"]), np.arange(len(g["perm"]))) for g in resync.key.groups)


def test_untouched_model_written_otherwise_is_converted() -> None:
    original = FIXTURES["vgg"](0)
    reference = _weight_in_a_constant_node(original)
    report = audit_models(reference, original)
    assert _in_order(report)
    assert report.verdict == "converted" and report.exit_code == 0, report.summary
    assert "re-ordered" not in report.summary and "no neuron moved" in report.summary


def test_permuted_copy_written_otherwise_stays_permuted() -> None:
    original = FIXTURES["vgg"](0)
    reference = _weight_in_a_constant_node(original)
    permuted, _, _, _ = permute_copy(original, 3)
    report = audit_models(reference, permuted)
    assert not _in_order(report)
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary


def test_wrong_permutation_written_otherwise_is_no_clean_verdict() -> None:
    original = FIXTURES["vgg"](0)
    reference = _weight_in_a_constant_node(original)
    wrong = copy_model(original)
    permute_producer_only(wrong, analyze(wrong))
    report = audit_models(reference, wrong)
    assert report.verdict not in ("identical", "converted", "permuted") and report.exit_code == 1, report.summary
