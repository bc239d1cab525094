"""Constant tables stored again with their unit axes moved pair across the two layouts.

ONNX Runtime's transpose optimizer (already at ORT_ENABLE_BASIC) moves a Transpose past the
rotary ``Mul`` of a query and stores the cos/sin table ``[1, 1, S, D]`` as ``[1, S, 1, D]``.
The same numbers then had another token, and the untouched model was refused as "different
models". Sites left over by both models pair where their constants differ only by unit axes
and their content, equal within storage rounding, tells them apart; a constant tensor (a zero
initial state of a scan) decides nothing and is never paired on its shape alone (a first
version that dropped unit axes from every generic site's token mispaired Mamba's zero state
through ORT basic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures.contrib import ort_optimized
from onnxlady import OnnxladyError, analyze, audit, verify_models
from onnxlady._resync._match import match_models
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only
from tests.test_match_tables import _rotary_attention

D_INNER, STATE, SEQ = 16, 4, 5


def _table_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer if t.name.startswith("rope.")}


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_a_rotary_table_stored_with_moved_unit_axes_is_converted(tmp_path: Path, level: str) -> None:
    source = _rotary_attention()
    optimized = ort_optimized(source, level)
    assert [1, 6, 1, 8] in _table_shapes(optimized).values(), "ORT no longer moves the table's unit axes"
    assert verify_models(source, optimized).equivalent
    reference, suspect = tmp_path / "reference.onnx", tmp_path / "optimized.onnx"
    onnx.save(source, reference)
    onnx.save(optimized, suspect)
    result = audit(reference, suspect)
    assert result.verdict == "converted", result.summary
    assert result.exit_code == 0


def test_a_permuted_copy_through_the_optimizer_is_audited_permuted(tmp_path: Path) -> None:
    source = _rotary_attention()
    permuted, _, perms, _ = permute_copy(source, 7)
    assert perms and verify_models(source, permuted).equivalent
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent
    reference, suspect = tmp_path / "reference.onnx", tmp_path / "suspect.onnx"
    onnx.save(source, reference)
    onnx.save(ort_optimized(permuted, "extended"), suspect)
    result = audit(reference, suspect)
    assert result.verdict == "permuted", result.summary


def test_a_changed_table_in_the_moved_layout_is_not_converted(tmp_path: Path) -> None:
    """Only equal content pairs across layouts: a changed table is not read as a conversion."""
    source = _rotary_attention()
    changed = ort_optimized(source, "extended")
    table = next(t for t in changed.graph.initializer if t.name == "rope.sin" and list(t.dims) == [1, 6, 1, 8])
    values = onnx.numpy_helper.to_array(table).copy()
    values[0, 3, 0, :] += 0.5
    table.CopyFrom(onnx.numpy_helper.from_array(values, "rope.sin"))
    reference, suspect = tmp_path / "reference.onnx", tmp_path / "changed.onnx"
    onnx.save(source, reference)
    onnx.save(changed, suspect)
    try:
        result = audit(reference, suspect)
    except OnnxladyError as refused:  # "different models", as before the layouts paired
        assert "different models" in str(refused)
        return
    assert result.exit_code != 0 and result.verdict not in ("converted", "identical", "permuted"), result.summary


def _scan_with_zero_state(zero: bool = True) -> onnx.ModelProto:
    """One selective-scan step of a Mamba block: ``exp(dt * A) * h0 + dt * B``, ``A = -exp(A_log)``, h0 zeros.

    ``zero=False``: a state of small random numbers instead (so that ``A`` matters to the output).
    """
    b = GraphBuilder("scan_state", 0)
    x = b.input("input", (1, SEQ, 8))
    h = b.matmul(x, D_INNER, name="in_proj")
    state_b = b.unsqueeze(b.matmul(x, STATE, name="x_proj"), [2], name="b_unsq")
    a_log = b.param("A_log", np.log(b.uniform((D_INNER, STATE), 0.5, 4.0)).astype(np.float32))
    a = b.custom("Neg", "", [b.custom("Exp", "", [a_log], (D_INNER, STATE), name="exp_a")], (D_INNER, STATE), name="neg_a")
    state = b.param("h0", np.zeros((1, D_INNER, STATE), np.float32) if zero else b.small_normal((1, D_INNER, STATE), 1.0))
    dt = b.unsqueeze(b.sigmoid(b.add(h, b.small_normal((D_INNER,), 0.5), name="dt")), [-1], name="dt_unsq")
    decay = b.custom("Exp", "", [b.mul(dt, a, name="dta")], (1, SEQ, D_INNER, STATE), name="decay")
    updated = b.add(b.mul(decay, state, name="kept"), b.mul(dt, state_b, name="dtb"), name="state")
    y = b.reduce_mean(updated, [3], keepdims=False, name="over_state")
    return b.build(b.matmul(y, 3, name="out_proj", gain=1.0))


def test_a_zero_state_and_a_folded_derived_constant_through_ort_basic(tmp_path: Path) -> None:
    """ORT folds ``-exp(A_log)`` into a stored ``[D, N]`` beside the zero state ``[1, D, N]``: still converted and permuted."""
    source = _scan_with_zero_state()
    reference = tmp_path / "reference.onnx"
    onnx.save(source, reference)
    optimized = ort_optimized(source, "basic")
    onnx.save(optimized, tmp_path / "optimized.onnx")
    assert audit(reference, tmp_path / "optimized.onnx").verdict == "converted"
    permuted, _, perms, _ = permute_copy(source, 3)
    assert perms and verify_models(source, permuted).equivalent
    onnx.save(ort_optimized(permuted, "basic"), tmp_path / "permuted.onnx")
    assert audit(reference, tmp_path / "permuted.onnx").verdict == "permuted"


def _moved_tables(values: np.ndarray, zeros: bool) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """``q * T + Z`` with T, Z ``[1, 1, S, D]`` (reference) and, transposed around, ``[1, S, 1, D]`` (suspect)."""
    models = []
    for moved in (False, True):
        b = GraphBuilder("moved_tables", 0)
        q = b.input("input", (1, 2, 6, 8))
        table, offset = np.asarray(values, np.float32), np.zeros((1, 1, 6, 8), np.float32) if zeros else None
        if moved:
            q = b.transpose(q, [0, 2, 1, 3], name="to_seq")
            table = table.reshape(1, 6, 1, 8)
        y = b.mul(q, b.param("T", table), name="times_table")
        if offset is not None:
            y = b.add(y, b.param("Z", offset.reshape(table.shape)), name="plus_zeros")
        if moved:
            y = b.transpose(y, [0, 2, 1, 3], name="back")
        models.append(b.build(b.matmul(b.relu(y), 8, name="proj", gain=1.0)))
    return models[0], models[1]


def test_only_tables_whose_content_decides_pair_across_unit_axes() -> None:
    rng = np.random.default_rng(0)
    reference, suspect = _moved_tables(rng.normal(size=(1, 1, 6, 8)), zeros=True)
    assert verify_models(reference, suspect).equivalent
    match = match_models(reference, suspect)
    paired = {(pair.reference, pair.suspect) for pair in match.site_pairs}
    assert ("Mul 'times_table'", "Mul 'times_table'") in paired
    # The zero offset holds one value: its shape alone would pair it, which decides nothing.
    assert not any("plus_zeros" in pair.reference for pair in match.site_pairs)
