"""What exporters leave in graphs that permutations must see through (held-out round 10).

F2: views that exporters lower to index operators.

torch's dynamo exporter lowers ``AdaptiveAvgPool2d``'s ``aten.as_strided`` in ConvNeXt's head to
``Reshape(mean) -> Gather(axis 0, indices = arange(C) shaped [1, C, 1, 1])``: a Gather that copies
the channel axis in order. It froze the last stage (14 % of the producer neurons) as "Gather
selects positions". A Gather of the whole axis in order carries the permutation to the indices'
long axis; any other index vector (a reversal, a subset) still freezes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from onnxlady import ChannelAnalysis, ChannelGroup, analyze, verify_models
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only

CHANNELS = 12


def _model(indices: np.ndarray) -> onnx.ModelProto:
    b = GraphBuilder("gather_view", 0)
    x = b.relu(b.conv(b.input("input", (1, 3, 8, 8)), CHANNELS, 3, name="stem"), name="act")
    pooled = b.reduce_mean(x, [2, 3], keepdims=False, name="pool")  # [1, C]
    flat = b.reshape(pooled, [CHANNELS], name="flat")  # [C]
    where = b.param("view.indices", indices.astype(np.int64))
    view = b.gather(flat, where, axis=0, name="view")  # [1, C, 1, 1] when the indices are
    return b.build(b.conv(view, 5, 1, name="head", gain=1.0))


def _stem_group(analysis: ChannelAnalysis) -> ChannelGroup:
    """The stem's channels (a frozen group lists the activations that carry it, not its weights)."""
    return next(g for g in analysis.groups if any(m.tensor == "flat" and m.axis == 0 for m in g.members))


def test_a_gather_of_the_whole_axis_in_order_carries_the_permutation() -> None:
    source = _model(np.arange(CHANNELS).reshape(1, CHANNELS, 1, 1))
    group = _stem_group(analyze(source))
    assert group.permutable, "; ".join(map(str, group.reasons))
    assert any(m.tensor == "head.weight" and m.axis == 1 for m in group.members)
    permuted, _, perms, _ = permute_copy(source, 3)
    assert perms
    assert verify_models(source, permuted).equivalent
    wrong = copy_model(source)
    changed = permute_producer_only(wrong, analyze(wrong))
    assert changed == "stem.weight"
    assert not verify_models(source, wrong).equivalent


def test_negative_indices_of_the_whole_axis_in_order_count_as_in_order() -> None:
    source = _model((np.arange(CHANNELS) - CHANNELS).reshape(1, CHANNELS, 1, 1))
    assert _stem_group(analyze(source)).permutable
    permuted, _, _, _ = permute_copy(source, 5)
    assert verify_models(source, permuted).equivalent


@pytest.mark.parametrize(
    "indices",
    [np.arange(CHANNELS)[::-1].reshape(1, CHANNELS, 1, 1), np.arange(CHANNELS).reshape(1, 1, CHANNELS // 2, 2)],
    ids=["reversed", "two-long-axes"],
)
def test_any_other_gather_along_the_permuted_axis_still_freezes(indices: np.ndarray) -> None:
    source = _model(indices)
    group = _stem_group(analyze(source))
    assert group.frozen
    assert any("Gather selects positions" in r.message for r in group.reasons)
    permuted, _, _, _ = permute_copy(source, 3)
    assert verify_models(source, permuted).equivalent


def test_the_fixture_is_not_degenerate() -> None:
    import onnxruntime as ort

    model = _model(np.arange(CHANNELS).reshape(1, CHANNELS, 1, 1))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)})
    assert out.shape == (1, 5, 1, 1) and np.isfinite(out).all() and 0.05 < float(np.abs(out).mean()) < 20
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
