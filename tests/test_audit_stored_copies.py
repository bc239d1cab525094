"""A constant the converted suspect stores twice is compared in every copy (session 13, h7 items 3 and 4).

The resync compares each reference constant once, through one of the sites that read it. ONNX
Runtime (BASIC and up) and onnx-simplifier fold a tied output layer's ``Transpose`` of the token
table into a stored copy, and ORT's transpose optimizer stores a rotary table once per layout.
One copy scaled by 1.5 kept the other one equal: the tied copy was audited ``converted`` (exit
0, verify NOT EQUIVALENT), and a scaled rotary table was refused as "different models" (the
changed table, moved across unit axes, paired with nothing). Both are now ``modified``, with the
table named.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from fixtures.contrib import ort_optimized
from fixtures.deployment import convert, unavailable
from onnxlady import analyze, audit, verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only
from tests.test_match_tables import _rotary_attention

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def _scaled(model: onnx.ModelProto, names: set[str], factor: float = 1.5) -> onnx.ModelProto:
    model = copy_model(model)
    assert names <= {t.name for t in model.graph.initializer}, names
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in names:
            values = numpy_helper.to_array(tensor)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array((values * factor).astype(values.dtype), tensor.name))
    return model


def _audit(tmp_path: Path, reference: onnx.ModelProto, suspect: onnx.ModelProto):  # type: ignore[no-untyped-def]
    onnx.save(reference, tmp_path / "reference.onnx")
    onnx.save(suspect, tmp_path / "suspect.onnx")
    return audit(tmp_path / "reference.onnx", tmp_path / "suspect.onnx")


def _tied_form(source: onnx.ModelProto, converter: str) -> onnx.ModelProto:
    if converter == "onnxsim":
        reason = unavailable("onnxsim")
        if reason:
            pytest.skip(reason)
        return convert(source, "onnxsim")
    return ort_optimized(source, converter)


@pytest.mark.parametrize("converter", ["basic", "extended", "onnxsim"])
def test_a_folded_copy_of_a_tied_table_changed_is_modified(tmp_path: Path, converter: str) -> None:
    source = FIXTURES["tied_lm_head"](0)
    converted = _tied_form(source, converter)
    names = {t.name for t in converted.graph.initializer}
    assert "lm_head.tied_weight" in names and "embed.tokens.weight" in names  # the converter stored the copy
    assert _audit(tmp_path, source, converted).verdict == "converted"
    suspect = _scaled(converted, {"lm_head.tied_weight"})
    assert not verify_models(source, suspect).equivalent
    result = _audit(tmp_path, source, suspect)
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "'lm_head.tied_weight', one of 2 copies of the reference's 'embed.tokens.weight'" in result.summary


def test_a_permuted_copy_with_its_tied_table_folded_is_permuted(tmp_path: Path) -> None:
    """Both copies moved with the neurons: the comparison of sorted values sees no change."""
    source = FIXTURES["tied_lm_head"](0)
    permuted = permute_copy(source, 5)[0]
    assert verify_models(source, permuted).equivalent
    result = _audit(tmp_path, source, ort_optimized(permuted, "extended"))
    assert result.verdict == "permuted", result.summary
    wrong = copy_model(source)  # one producer's rows swapped without its consumers: caught
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent
    result = _audit(tmp_path, source, ort_optimized(wrong, "extended"))
    assert result.exit_code != 0, result.summary


def _rotary_tables(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer if int(np.prod(t.dims)) == 48}


@pytest.mark.parametrize("level", ["basic", "extended"])
@pytest.mark.parametrize("table", ["rope.cos", "rope.sin"])
def test_a_scaled_rotary_table_under_the_optimizer_is_modified(tmp_path: Path, level: str, table: str) -> None:
    """The table scaled in the converted copy (ORT stores the sin table twice: one copy changed) or before."""
    source = _rotary_attention()
    optimized = ort_optimized(source, level)
    assert [1, 6, 1, 8] in _rotary_tables(optimized).values(), "ORT no longer moves the table's unit axes"
    for suspect in (_scaled(optimized, {table}), ort_optimized(_scaled(source, {table}), level)):
        assert not verify_models(source, suspect).equivalent
        result = _audit(tmp_path, source, suspect)
        assert result.verdict == "modified" and result.exit_code == 1, result.summary
        assert table in result.summary, result.summary
