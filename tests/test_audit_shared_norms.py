"""A normalization constant several layers share, changed in a converted copy, is ``modified`` (session 13, h14, F8).

torch's exporter stores equal tensors once and reads them through ``Identity`` (ALBERT's one
layer, a zero bias), onnxslim deduplicates equal tensors by bytes: in the converted copy one
stored gamma or beta is read by several LayerNorms, often under another name than the
reference's. Sites pair linear layers only, and non-weight constants were compared by name:
one element of the shared gamma scaled (or of the shared zero beta set) in an onnxslim or ONNX
Runtime copy was compared nowhere and read ``converted`` (exit 0), while verify says NOT
EQUIVALENT. Now every normalization parameter the suspect stores must equal some constant of
the reference; the untouched and the permuted conversions keep their verdicts.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures import FIXTURES
from fixtures.deployment import convert, unavailable
from onnxlady import analyze, audit, verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def _shared(seed: int, tied: bool) -> onnx.ModelProto:
    """bert_like with every LayerNorm's gamma equal (ALBERT) and every beta zero.

    ``tied``: the earlier norms read the last one's tensors through ``Identity`` (torch's
    exporter); otherwise each norm stores its own equal copy (onnxslim deduplicates them).
    """
    model = copy_model(FIXTURES["bert_like"](seed))
    graph = model.graph
    norms = [node for node in graph.node if node.op_type == "LayerNormalization"]
    inits = {tensor.name: tensor for tensor in graph.initializer}
    gamma = numpy_helper.to_array(inits[norms[0].input[1]])
    gamma = (1.0 + 0.3 * np.random.default_rng(seed).standard_normal(gamma.shape)).astype(np.float32)
    zeros = np.zeros_like(gamma)
    for node in norms:
        for slot, value in ((1, gamma), (2, zeros)):
            inits[node.input[slot]].CopyFrom(numpy_helper.from_array(value, node.input[slot]))
    if tied:  # ALBERT's export: the last layer's tensors stored, the earlier layers' read through Identity
        last = norms[-1]
        for index, node in enumerate(norms[:-1]):
            for slot in (1, 2):
                graph.initializer.remove(inits[node.input[slot]])
                graph.node.insert(0, helper.make_node("Identity", [last.input[slot]], [node.input[slot]],
                                                      name=f"tie{index}_{slot}"))
    # The last norm's output is an output too (BERT's last_hidden_state): no norm then has a
    # single linear reader whose site would carry its gamma and beta.
    shape = [*[d.dim_value for d in graph.output[0].type.tensor_type.shape.dim][:-1], gamma.size]
    graph.output.append(helper.make_tensor_value_info(norms[-1].output[0], onnx.TensorProto.FLOAT, shape))
    onnx.checker.check_model(model)
    return model


def _converted(model: onnx.ModelProto, converter: str) -> onnx.ModelProto:
    reason = unavailable(converter)
    if reason:
        pytest.skip(reason)
    return convert(model, converter)


def _most_shared(model: onnx.ModelProto, slot: int) -> str:
    """The stored constant most LayerNorms read at ``slot``: the converter's one copy.

    ORT's SkipLayerNormalization reads gamma and beta one slot later.
    """
    shift = {"LayerNormalization": 0, "SkipLayerNormalization": 1}
    readers = Counter(node.input[slot + shift[node.op_type]] for node in model.graph.node
                      if node.op_type in shift and len(node.input) > slot + shift[node.op_type])
    name, count = readers.most_common(1)[0]
    assert count >= 3 and name in {t.name for t in model.graph.initializer}, readers  # the converter shares it
    return name


def _tampered(model: onnx.ModelProto, name: str, slot: int) -> onnx.ModelProto:
    model = copy_model(model)
    for tensor in model.graph.initializer:
        if tensor.name == name:
            values = numpy_helper.to_array(tensor).copy()
            values[3] = values[3] * 1.5 if slot == 1 else 0.5
            tensor.CopyFrom(numpy_helper.from_array(values, name))
    return model


def _audit(tmp_path: Path, reference: onnx.ModelProto, suspect: onnx.ModelProto):  # type: ignore[no-untyped-def]
    onnx.save(reference, tmp_path / "reference.onnx")
    onnx.save(suspect, tmp_path / "suspect.onnx")
    return audit(tmp_path / "reference.onnx", tmp_path / "suspect.onnx")


CASES = [("onnxslim", False), ("onnxslim", True), ("ort-extended", True), ("ort-basic", True)]


@pytest.mark.parametrize("slot", [1, 2], ids=["gamma", "zero-beta"])
@pytest.mark.parametrize(("converter", "tied"), CASES)
def test_a_changed_shared_norm_constant_in_a_converted_copy_is_modified(
    tmp_path: Path, converter: str, tied: bool, slot: int
) -> None:
    source = _shared(0, tied)
    converted = _converted(source, converter)
    assert _audit(tmp_path, source, converted).verdict == "converted"  # untouched: no accusation
    name = _most_shared(converted, slot)
    suspect = _tampered(converted, name, slot)
    assert not verify_models(source, suspect).equivalent
    result = _audit(tmp_path, source, suspect)
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    # Named: the suspect's shared tensor, or the reference's stored one it stands for.
    stored = [node for node in source.graph.node if node.op_type == "LayerNormalization"][-1].input[slot]
    assert name in result.summary.replace("\\_", "_") or stored in result.summary.replace("\\_", "_"), result.summary


@pytest.mark.parametrize(("converter", "tied"), CASES)
def test_a_permuted_converted_copy_with_shared_norms_is_permuted(tmp_path: Path, converter: str, tied: bool) -> None:
    """The shared gamma moves with the neurons: its sorted values still equal the reference's."""
    source = _shared(1, tied)
    permuted = permute_copy(source, 3)[0]
    assert verify_models(source, permuted).equivalent
    result = _audit(tmp_path, source, _converted(permuted, converter))
    assert result.verdict == "permuted", result.summary
    wrong = copy_model(source)  # one producer's rows swapped without its consumers: caught
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent
