"""ONNX's own ``Attention`` operator (opset 23), as torch's dynamo exporter writes it at that opset.

Held-out round 13, F6: every head froze ("no rule for operator ai.onnx::Attention": a timm ViT
67.9 % permutable at opset 23 against 99.2 % at opset 18). The rule shares GroupQueryAttention's
head algebra; each case permutes, verifies in ONNX Runtime, shows the moves it must not make are
caught, and unpermutes bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures.onnx_attention import HEAD, build_onnx_attention
from onnxlady import analyze, unpermute_model, verify_models
from onnxlady.testing import copy_model, permute_copy

CASES = [("3d", True), ("3d", False), ("4d", True), ("4d", False)]


def _tensor(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    _tensor(model, name).CopyFrom(numpy_helper.from_array(value, name))


@pytest.mark.parametrize(("layout", "mask"), CASES)
def test_the_heads_and_their_dims_are_permutable(layout: str, mask: bool) -> None:
    analysis = analyze(build_onnx_attention(0, layout=layout, mask=mask))
    assert not [r for g in analysis.groups for r in g.reasons if r.kind == "no-rule"]
    # KV heads, the query heads within each of the two groups (an order per group), Q/K dims, V dims
    sizes = sorted(g.size for g in analysis.permutable_groups)
    assert sizes == [2, 2, 2, HEAD, HEAD, 64], sizes
    assert {"q.weight", "k.weight", "v.weight", "o.weight"} <= {m.tensor for g in analysis.permutable_groups for m in g.members}


@pytest.mark.parametrize(("layout", "mask"), CASES)
def test_permute_keeps_the_function_and_unpermute_restores_the_bytes(layout: str, mask: bool) -> None:
    source = build_onnx_attention(0, layout=layout, mask=mask)
    model, _, perms, key = permute_copy(source, 4)
    assert perms
    assert not np.array_equal(numpy_helper.to_array(_tensor(model, "q.weight")), numpy_helper.to_array(_tensor(source, "q.weight")))
    assert verify_models(source, model, provider="cpu").equivalent
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()


@pytest.mark.parametrize(("layout", "mask"), CASES)
def test_a_query_head_moved_to_another_key_value_group_is_caught(layout: str, mask: bool) -> None:
    """Query heads 0 and 2 read KV heads 0 and 1: swapping them in Q and in the output projection alone is wrong."""
    source = build_onnx_attention(0, layout=layout, mask=mask)
    wrong = copy_model(source)
    order = np.arange(4 * HEAD).reshape(4, HEAD)[[2, 1, 0, 3]].reshape(-1)
    _set(wrong, "q.weight", numpy_helper.to_array(_tensor(source, "q.weight"))[:, order])
    _set(wrong, "q.bias", numpy_helper.to_array(_tensor(source, "q.bias"))[order])
    _set(wrong, "o.weight", numpy_helper.to_array(_tensor(source, "o.weight"))[order, :])
    if mask:
        _set(wrong, "attention.mask", numpy_helper.to_array(_tensor(source, "attention.mask"))[:, [2, 1, 0, 3]])
    assert not verify_models(source, wrong, provider="cpu").equivalent


def test_the_mask_follows_the_query_heads() -> None:
    """A permuted model whose per-head mask is put back in the original order is caught."""
    source = build_onnx_attention(0, layout="3d", mask=True)
    model, _, _, _ = permute_copy(source, 4)
    moved = numpy_helper.to_array(_tensor(model, "attention.mask"))
    original = numpy_helper.to_array(_tensor(source, "attention.mask"))
    assert not np.array_equal(moved, original)  # the mask moved with the heads
    _set(model, "attention.mask", original)
    assert not verify_models(source, model, provider="cpu").equivalent
