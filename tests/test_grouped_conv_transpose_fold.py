"""A BatchNorm after a depthwise or grouped ConvTranspose, folded by ONNX Runtime's ConvBnFusion.

A ConvTranspose weight is ``[in, out / group, k...]``: output channel ``g * (out / group) + j``
reads ``W[g * (in / group) : (g + 1) * (in / group), j]``, so with more than one group its output
channels are no single axis of the stored weight. Resync reads it as ``[out, in / group, k...]``
(a grouped Conv's form), where a BatchNorm after it folds along axis 0, as the optimizer folds it.
Every suspect here is written by the real optimizer (``optimized_model_filepath``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from fixtures.contrib import ort_optimized
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._entry import resync_model
from onnxlady._resync._sites import find_sites, read_operand, stored_operand
from onnxlady._verify._compare import verify_models
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def deconv_decoder(seed: int = 0) -> onnx.ModelProto:
    """Conv, a depthwise ConvTranspose + BatchNorm, a grouped ConvTranspose + BatchNorm, a 1x1 Conv."""
    b = GraphBuilder("deconv_decoder", seed)
    x = b.input("x", (1, 8, 5, 5))
    h = b.relu(b.conv(x, 16, kernel=3, pad=1, name="stem"))
    h = b.relu(b.batchnorm(b.conv_transpose(h, 16, kernel=2, stride=2, group=16, name="dw"), name="dw_bn"))
    h = b.relu(b.batchnorm(b.conv_transpose(h, 8, kernel=3, stride=1, pad=1, group=4, name="gr"), name="gr_bn"))
    return b.build(b.conv(h, 4, kernel=1, name="head"))


def _optimized(model: onnx.ModelProto, level: str) -> onnx.ModelProto:
    """``model`` through ONNX Runtime's optimizer; fails unless both BatchNorms were folded away."""
    optimized = ort_optimized(model, level)
    ops = [node.op_type for node in optimized.graph.node]
    assert "BatchNormalization" not in ops, ops
    assert [int(next((a.i for a in n.attribute if a.name == "group"), 1))
            for n in optimized.graph.node if n.op_type == "ConvTranspose"] == [16, 4]  # fmt: skip
    return optimized


def test_the_optimizer_folds_the_batchnorms_into_the_grouped_weights() -> None:
    """What the reading below has to undo: ORT scales each output channel's weight slice (this can fail)."""
    reference = deconv_decoder()
    suspect = _optimized(reference, "basic")
    assert verify_models(reference, suspect, provider="cpu").equivalent
    before = {init.name: onnx.numpy_helper.to_array(init) for init in reference.graph.initializer}
    after = [onnx.numpy_helper.to_array(init) for init in suspect.graph.initializer]
    for name, shape in (("dw.weight", (16, 1, 2, 2)), ("gr.weight", (16, 2, 3, 3))):
        assert before[name].shape == shape
        assert any(a.shape == shape for a in after)
        assert not any(a.shape == shape and np.array_equal(a, before[name]) for a in after)  # folded: changed


def test_grouped_weight_canonical_form_reads_each_output_channel() -> None:
    """Canonical row ``o`` of a grouped ConvTranspose weight is what output channel ``o`` reads."""
    model = deconv_decoder()
    graph = ModelGraph(model)
    planned = {plan.source for plan in analyze(model).tensors}
    sites = {graph.nodes[site.node].name: site for site in find_sites(graph, planned) if site.family == "conv-transpose"}
    assert sorted(sites) == ["dw", "gr"]
    stored = {init.name: onnx.numpy_helper.to_array(init).astype(np.float64) for init in model.graph.initializer}
    for name, group in (("dw", 16), ("gr", 4)):
        weight = sites[name].operand("weight")
        assert weight is not None
        read = read_operand(graph, weight)
        assert read is not None
        w = stored[f"{name}.weight"]
        per_in, per_out = w.shape[0] // group, w.shape[1]
        expected = np.stack([w[(o // per_out) * per_in:(o // per_out + 1) * per_in, o % per_out]
                             for o in range(group * per_out)])  # fmt: skip
        assert np.array_equal(read.value, expected)
        back = stored_operand(weight, read)
        assert back is not None and np.array_equal(back.value, w)  # the inverse, as resync writes it back
    # A BatchNorm after each is read with its layer, and folds along canonical axis 0.
    assert all(site.batchnorm is not None for site in sites.values())


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_untouched_model_through_the_optimizer_is_converted(level: str) -> None:
    reference = deconv_decoder()
    suspect = _optimized(reference, level)
    report = audit_models(reference, suspect)
    assert report.verdict == "converted" and report.exit_code == 0


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_permuted_model_through_the_optimizer_is_permuted_and_resynced(level: str) -> None:
    reference = deconv_decoder()
    model, _, _, key = permute_copy(reference, 3)
    # The ConvTranspose channels move (within the blocks their groups allow).
    assert sum(len(perm) for perm in key.permutations().values()) == 18
    assert all(np.any(perm != np.arange(len(perm))) for perm in key.permutations().values())
    suspect = _optimized(model, level)
    before = suspect.SerializeToString()
    assert verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert suspect.SerializeToString() == before  # the suspect was not modified
    # A wrong permutation (producers only) is caught: it computes something else, and audit
    # does not call its optimized form a permutation of the reference.
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent
    assert audit_models(reference, _optimized(wrong, level)).verdict not in ("permuted", "converted")
