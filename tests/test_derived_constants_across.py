"""A constant computed from constants in one model and stored folded in the other is compared by value.

Held-out round 10: torch's legacy exporter keeps Mamba's ``A_log -> Exp -> Neg``; the dynamo
exporter (and ONNX Runtime's optimizer, onnx-simplifier) folds ``-exp(A_log)`` into one stored
constant. The two sites that read it pair, but the stored ``A_log`` has no stored counterpart
for the resync to compare, so a tampered ``A_log`` across the two forms was audited
``converted``. Both sides' values are now computed and compared (sorted, so a permuted copy
still agrees).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures.contrib import ort_optimized
from onnxlady import analyze, audit, verify_models
from onnxlady._graph._fold import evaluate_node
from onnxlady.testing import copy_model, permute_copy, permute_producer_only, tensor_holders
from tests.test_unit_axes_tables import _scan_with_zero_state


def _tampered(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a few entries of ``A_log`` raised by 0.3 (their decay rate times 1.35)."""
    changed = copy_model(model)
    holder = tensor_holders(changed)["A_log"]
    values = onnx.numpy_helper.to_array(holder).copy()
    values[::5, 1] += np.float32(0.3)
    holder.CopyFrom(onnx.numpy_helper.from_array(values, "A_log"))
    return changed


def _folded(model: onnx.ModelProto) -> onnx.ModelProto:
    folded = ort_optimized(model, "basic")
    assert not any(node.op_type == "Neg" for node in folded.graph.node), "ORT no longer folds -exp(A_log)"
    return folded


def _audit(tmp_path: Path, reference: onnx.ModelProto, suspect: onnx.ModelProto) -> tuple[str, int, str]:
    onnx.save(reference, tmp_path / "reference.onnx")
    onnx.save(suspect, tmp_path / "suspect.onnx")
    result = audit(tmp_path / "reference.onnx", tmp_path / "suspect.onnx")
    return result.verdict, result.exit_code, result.summary


def test_the_folded_form_is_a_conversion_and_its_permuted_copy_permuted(tmp_path: Path) -> None:
    source = _scan_with_zero_state(zero=False)
    folded = _folded(source)
    assert verify_models(source, folded).equivalent
    assert _audit(tmp_path, source, folded)[:2] == ("converted", 0)
    assert _audit(tmp_path, folded, source)[:2] == ("converted", 0)
    permuted, _, perms, _ = permute_copy(source, 5)
    assert perms and verify_models(source, permuted).equivalent
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent
    assert _audit(tmp_path, source, _folded(permuted))[0] == "permuted"
    assert _audit(tmp_path, folded, permuted)[0] == "permuted"


@pytest.mark.parametrize("tampered_side", ["folded", "computed"])
def test_a_tampered_a_log_across_the_two_forms_is_modified(tmp_path: Path, tampered_side: str) -> None:
    source = _scan_with_zero_state(zero=False)
    tampered = _tampered(source)
    assert not verify_models(source, tampered).equivalent
    if tampered_side == "folded":  # the reference keeps the chain, the suspect stores it folded
        verdict, code, summary = _audit(tmp_path, source, _folded(tampered))
    else:  # the reference stores it folded, the suspect computes it from a tampered A_log
        verdict, code, summary = _audit(tmp_path, _folded(source), tampered)
    assert (verdict, code) == ("modified", 1), summary
    assert "computed from constants" in summary


def test_evaluation_covers_the_transcendental_steps_folding_leaves_alone() -> None:
    """Exp is no exact fold (libm rounds differently), so only the comparison computes it."""
    node = onnx.helper.make_node("Exp", ["x"], ["y"])
    value = evaluate_node(node, [np.array([0.0, 1.0])], 17)
    assert value is not None and np.allclose(value, [1.0, np.e])
    assert evaluate_node(node, [np.array([1000.0])], 17) is None  # not finite: nothing to compare
    assert evaluate_node(onnx.helper.make_node("Exp", ["x"], ["y"], domain="com.microsoft"), [np.array([0.0])], 17) is None
