"""Shared weights (issue 12, item 4): one permutation for every use of a shared constant, no copy.

ALBERT-style models apply one layer's weights in every layer. Where the uses bind the constant
along the same axes with index maps of the same form, their groups are joined: the permuted model
has the same initializers, names and bytes as the source. A constant is untied (copied) only where
its uses cannot agree, and ``inspect`` says which uses need what.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxlady
from fixtures.decoder import build_decoder
from fixtures.deployment import build_shared_bias_untied, build_shared_layers
from onnxlady._analysis._channels import analyze
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_producer_only


def _footprint(model: onnx.ModelProto) -> tuple[list[str], int]:
    tensors = model.graph.initializer
    return sorted(t.name for t in tensors), sum(onnx.numpy_helper.to_array(t).nbytes for t in tensors)


def _readers(model: onnx.ModelProto, tensor: str) -> int:
    return sum(1 for node in model.graph.node for name in node.input if name == tensor)


CASES = {
    # One MLP block (LayerNorm, fc1, Relu, fc2) applied three times.
    "mlp_block_x3": (lambda: build_shared_layers(0, repeats=3), "block.fc1.weight", {}),
    # A GQA decoder whose three layers read one set of projections, its KV caches as state.
    "decoder_x3": (lambda: build_decoder(0, layers=3, shared=True), "layers.0.qkv_proj.weight", {"kv_state": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shared_weights_take_one_permutation_and_no_copy(case: str) -> None:
    build, shared, options = CASES[case]
    source = build()
    assert _readers(source, shared) == 3
    analysis = analyze(source, **options)
    assert analysis.untied == [] and analysis.untie_reasons == []
    # The weight's output columns are one group (or product of groups) for all three uses.
    assert any(m.tensor == shared and m.axis == 1 for g in analysis.permutable_groups for m in g.members)
    result = onnxlady.permute(source, seed=4, **options)
    assert result.untied_constants == [] and result.key.untied == []
    permuted = result.model
    assert _footprint(permuted) == _footprint(source)  # same tensors, same bytes: no copy
    assert len(permuted.graph.node) == len(source.graph.node)
    assert _readers(permuted, shared) == 3
    before = onnx.numpy_helper.to_array(next(t for t in source.graph.initializer if t.name == shared))
    after = onnx.numpy_helper.to_array(next(t for t in permuted.graph.initializer if t.name == shared))
    assert not np.array_equal(before, after)
    report = verify_models(source, permuted, provider="cpu")
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong, **options))
    assert verify_models(source, wrong, provider="cpu").verdict == "not-equivalent"
    restored = onnxlady.unpermute(permuted, result.key)
    assert restored.model.SerializeToString() == source.SerializeToString()
    assert "untied" not in onnxlady.inspect(source).to_text()


def test_uses_that_cannot_agree_are_untied_and_inspect_says_why() -> None:
    """A bias read by a moving conv and by the output conv (frozen): one copy, and the reason."""
    source = build_shared_bias_untied(0)
    text = onnxlady.inspect(source).to_text()
    assert ("untied: constant 'shared.bias' untied into 1 copy: its uses need different permutations "
            "(conv1: axis 0 takes g0; head: keeps its order)") in text
    result = onnxlady.permute(source, seed=1)
    assert result.untied_constants == ["shared.bias"]
    names, size = _footprint(result.model)
    assert len(names) == len(source.graph.initializer) + 1 and size == _footprint(source)[1] + 8 * 4
    assert verify_models(source, result.model, provider="cpu").equivalent
    restored = onnxlady.unpermute(result.model, result.key)
    assert restored.model.SerializeToString() == source.SerializeToString()


# -- fused projections: torch's nn.MultiheadAttention in_proj, sliced by bounds from shapes -------
def _sliced_in_proj(seed: int = 0) -> onnx.ModelProto:
    """``F.multi_head_attention_forward`` as older torch exports write it, on ``[1, 16, 32]``.

    The fused ``in_proj_weight [3E, E]`` and ``in_proj_bias [3E]`` are cut into Q, K and V by
    ``Slice`` whose starts and ends are computed: ``E`` from ``Shape`` of the activation, times 0,
    1, 2 and 3. Four heads of 8; then the output projection, a residual and a head of 10.
    """
    from onnx import TensorProto

    from onnxlady.testing import GraphBuilder

    b = GraphBuilder("sliced_in_proj", seed)
    x = b.relu(b.matmul(b.input("input", (1, 16, 32)), 32, name="embed"), name="embed_relu")
    weight = b.param("attention.in_proj_weight", b.he_normal((96, 32), 32, 1.0))
    bias = b.param("attention.in_proj_bias", b.small_normal((96,)))
    shape = b.custom("Shape", "", [x], (3,), name="shape", elem_type=TensorProto.INT64)
    width = b.custom("Gather", "", [shape, b.param("last", np.array([2], dtype=np.int64))], (1,), name="width",
                     elem_type=TensorProto.INT64, axis=0)
    axes = b.param("slice_axes", np.array([0], dtype=np.int64))
    bounds = [b.mul(width, b.param(f"times{k}", np.array([k], dtype=np.int64)), name=f"bound{k}") for k in range(4)]
    heads = []
    for k, what in enumerate("qkv"):
        w = b.custom("Slice", "", [weight, bounds[k], bounds[k + 1], axes], (32, 32), name=f"{what}_weight")
        w_bias = b.custom("Slice", "", [bias, bounds[k], bounds[k + 1], axes], (32,), name=f"{what}_bias")
        projected = b.add(b.matmul_on(x, b.transpose(w, [1, 0], name=f"{what}_t")), w_bias, name=f"{what}_proj")
        heads.append(b.transpose(b.reshape(projected, [1, 16, 4, 8], name=f"{what}_heads"),
                                 [0, 2, 1, 3] if what != "k" else [0, 2, 3, 1], name=f"{what}_split"))
    q, k, v = heads
    scores = b.mul(b.matmul_tensors(q, k, name="scores"), np.array(8**-0.5, dtype=np.float32), name="scaled")
    attended = b.matmul_tensors(b.softmax(scores, name="softmax"), v, name="attended")
    merged = b.reshape(b.transpose(attended, [0, 2, 1, 3], name="merge_t"), [1, 16, 32], name="merge")
    y = b.add(x, b.matmul(merged, 32, name="out_proj"), name="residual")
    return b.build(b.matmul(y, 10, name="head", gain=1.0))


def _sizes(analysis: object, tensor: str, axis: int) -> list[int]:
    from onnxlady._analysis._channels import ChannelAnalysis

    assert isinstance(analysis, ChannelAnalysis)
    return sorted(g.size for g in analysis.permutable_groups
                  for m in g.members if m.tensor == tensor and m.axis == axis)  # fmt: skip


def test_a_fused_in_proj_sliced_by_computed_bounds_moves_as_blocks() -> None:
    source = _sliced_in_proj(0)
    analysis = analyze(source)
    # Q, K and V blocks of the fused weight: heads (4), the Q/K dims and the V dims inside a head (8).
    assert _sizes(analysis, "attention.in_proj_weight", 0) == [4, 8, 8]
    assert analysis.untied == []  # the three blocks are one permutation of the fused weight
    assert _sizes(analysis, "attention.in_proj_bias", 0) == [4, 8, 8]
    assert not any("is computed" in str(r) for g in analysis.groups for r in g.reasons)
    result = onnxlady.permute(source, seed=2)
    assert _footprint(result.model) == _footprint(source)
    report = verify_models(source, result.model, provider="cpu")
    assert report.equivalent and not report.degenerate_outputs
    wrong = copy_model(result.model)
    permute_producer_only(wrong, analyze(wrong))
    assert verify_models(source, wrong, provider="cpu").verdict == "not-equivalent"
    assert onnxlady.unpermute(result.model, result.key).model.SerializeToString() == source.SerializeToString()


TORCH_MHA = Path(__file__).resolve().parents[1] / ".cache" / "deployment" / "torch_mha_unfolded.onnx"


@pytest.mark.skipif(not TORCH_MHA.exists(),
                    reason="no torch exports (/tmp/zoo-venv/bin/python -m tools.export_deployment_models)")
def test_torch_multihead_attention_projections_move() -> None:
    from onnxlady._io._files import load_model

    analysis = analyze(load_model(TORCH_MHA).model)
    assert _sizes(analysis, "attention.in_proj_weight", 0) == [4, 8]
    assert _sizes(analysis, "attention.out_proj.weight", 1) == [4, 8]
    assert float(analysis.summary()["permutable_fraction"]) > 0.9  # type: ignore[arg-type]
