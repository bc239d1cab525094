"""ONNX Runtime contrib operators (issue 12, item 2): each rule checked against ONNX Runtime itself.

For every fixture of fixtures/contrib.py (hand-built as the optimizers write them, and the real
converters' outputs): the contrib operators are there, nothing freezes for want of a rule or a
shape, the groups the operator's symmetry allows are permutable, a permuted model is equivalent,
a wrong permutation is caught (also one that moves a contrib operator's weight without its
partners), unpermuting is bit-exact, and after a conversion the producer-neuron coverage is the
plain model's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from fixtures import contrib as C
from onnxlady import analyze
from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._rules import registered_operators
from onnxlady._transforms._permute import unpermute_model
from onnxlady._verify._compare import verify_models
from onnxlady.testing import GraphBuilder
from onnxlady.testing._helpers import (
    constant_bytes,
    copy_model,
    permute_copy,
    permute_producer_only,
)

BUILT: dict[str, Callable[[], onnx.ModelProto]] = {
    **{name: functools.partial(C.FIXTURES[name], 0) for name in C.FIXTURES},
    **{name: functools.partial(C.EXTRA[name], 0) for name in C.EXTRA},
    "contrib_gqa_kv_cache": functools.partial(C.build_gqa, 0, kv_cache=True),
}
ALL_NAMES = sorted(BUILT) + sorted(C.CONVERTED_SOURCES)

#: Operators each fixture must hold (for the converted ones: what the real tool wrote).
EXPECTED_OPS: dict[str, set[str]] = {
    "contrib_fused_conv": {"FusedConv", "FusedGemm"},
    "contrib_gelu_mlp": {"BiasGelu", "FastGelu", "Gelu", "QuickGelu", "FusedMatMul"},
    "contrib_skip_norm": {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"},
    "contrib_attention": {"Attention", "MultiHeadAttention", "FusedMatMul"},
    "contrib_rotary": {"RotaryEmbedding"},
    "contrib_gqa": {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"},
    "contrib_gqa_kv_cache": {"GroupQueryAttention"},
    "contrib_llama": {"GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"},
    "contrib_matmul_nbits": {"MatMulNBits"},
    "contrib_embed": {"EmbedLayerNormalization"},
    "bert_like": set(),
    "ort_extended.resnet": {"FusedConv"},
    "ort_extended.mobilenet": {"FusedConv"},
    "ort_extended.vgg": {"FusedConv", "FusedGemm"},
    "ort_extended.flatten_gemm_nchw": {"FusedConv", "FusedGemm"},
    "ort_extended.matmul_mlp": set(),
    "ort_extended.encoder_prenorm": {"FusedMatMul", "SkipLayerNormalization"},
    "ort_extended.encoder_postnorm": {"FusedMatMul", "SkipLayerNormalization", "Gelu"},
    "ort_extended.bert_like": {"FusedMatMul", "SkipLayerNormalization", "Gelu"},
    "ort_basic.resnet": set(),
    "ort_transformer.bert_like": {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"},
    "ort_transformer_fastgelu.bert_like": {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization",
                                           "FastGelu"},
    "ort_transformer_mha.bert_like": {"MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"},
    "nbits.matmul_mlp": {"MatMulNBits"},
    "nbits.encoder_prenorm": {"MatMulNBits"},
}

#: Freeze reasons that are the symmetry's own limits, not missing rules or shapes.
ALLOWED_FREEZES = ("graph-output", "graph-input", "index-map")


@functools.cache
def _model_bytes(name: str) -> bytes:
    if name in BUILT:
        return BUILT[name]().SerializeToString()
    try:
        return C.build_converted(name).SerializeToString()
    except ImportError as exc:  # MatMulNBitsQuantizer needs onnx_ir
        pytest.skip(f"converter for {name} cannot run here: {exc}")


def _model(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_model_bytes(name))


@functools.cache
def _summary(name: str) -> dict[str, object]:
    return analyze(_model(name)).summary()


def _permutable_sizes(analysis: ChannelAnalysis, tensor: str, axis: int) -> list[int]:
    """Sizes of the permutable groups that move ``tensor`` along ``axis`` (sorted)."""
    return sorted(g.size for g in analysis.permutable_groups
                  if any(m.tensor == tensor and m.axis == axis for m in g.members))


# ------------------------------------------------------------------ registry and ONNX Runtime facts


def test_every_contrib_family_has_a_rule() -> None:
    registered = set(registered_operators())
    wanted = {"FusedConv", "FusedGemm", "FusedMatMul", "Gelu", "FastGelu", "BiasGelu", "QuickGelu",
              "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "Attention", "MultiHeadAttention",
              "GroupQueryAttention", "RotaryEmbedding", "MatMulNBits", "EmbedLayerNormalization"}
    assert {f"com.microsoft::{op}" for op in wanted} <= registered
    assert "SimplifiedLayerNormalization" in registered  # the ONNX domain, as ONNX Runtime registers it


def _run_simplified_norm(domain: str) -> np.ndarray:
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["y"], domain=domain, epsilon=1e-5)
    graph = helper.make_graph([node], "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              initializer=[numpy_helper.from_array(np.ones(4, np.float32), "scale")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.arange(8, dtype=np.float32).reshape(2, 4)})[0]


def test_simplified_layer_norm_lives_in_the_onnx_domain_in_onnx_runtime() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(_run_simplified_norm(""), expected, rtol=1e-5)
    with pytest.raises(Exception, match="SimplifiedLayerNormalization"):
        _run_simplified_norm("com.microsoft")


def test_contrib_shapes_reach_every_tensor_after_the_optimizer() -> None:
    """ORT saves no value_info: the contrib shape functions let inference go on past each fused node."""
    for name in ("ort_extended.resnet", "ort_transformer.bert_like", "contrib_gqa", "contrib_matmul_nbits"):
        graph = ModelGraph(_model(name))
        unknown = [out for node in graph.nodes for out in node.output if out and graph.shape(out) is None]
        assert not unknown, (name, unknown)


# ------------------------------------------------------------------ every fixture


@pytest.mark.parametrize("name", ALL_NAMES)
def test_fixture_holds_its_contrib_operators(name: str) -> None:
    present = {node.op_type for node in _model(name).graph.node}
    assert EXPECTED_OPS[name] <= present


@pytest.mark.parametrize("name", ALL_NAMES)
def test_nothing_freezes_for_want_of_a_rule_or_a_shape(name: str) -> None:
    analysis = analyze(_model(name))
    for group in analysis.groups:
        for reason in group.reasons:
            assert reason.kind in ALLOWED_FREEZES, (group.id, str(reason))
    assert analysis.permutable_groups


@pytest.mark.parametrize("name", ALL_NAMES)
def test_permuted_model_is_equivalent_and_unpermutes_bit_exact(name: str) -> None:
    source = _model(name)
    model, _, perms, key = permute_copy(source, 5)
    assert perms, "nothing was permuted: the test would prove nothing"
    assert constant_bytes(model) != constant_bytes(source)
    report = verify_models(source, model, provider="cpu", iterations=2)
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs
    assert unpermute_model(model, key) is True
    assert constant_bytes(model) == constant_bytes(source)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_wrong_permutation_is_caught(name: str) -> None:
    source = _model(name)
    model = copy_model(source)
    permute_producer_only(model, analyze(model))
    assert not verify_models(source, model, provider="cpu").equivalent


@pytest.mark.parametrize("name", sorted(C.CONVERTED_SOURCES))
def test_coverage_after_conversion_equals_the_plain_model(name: str) -> None:
    converted = _summary(name)
    plain = analyze(FIXTURES[C.CONVERTED_SOURCES[name][0]](0)).summary()
    assert converted["producer_neurons"] == plain["producer_neurons"]
    assert converted["permutable_producer_neurons"] == plain["permutable_producer_neurons"]
    assert converted["permutable_producer_neurons"] > 0


# ------------------------------------------------------------------ what each operator allows


def test_attention_heads_and_dims() -> None:
    analysis = analyze(_model("contrib_attention"))
    # Packed [32, 96] weight: 4 heads (shared by Q, K, V), 8 Q/K dims, 8 V dims per head.
    assert _permutable_sizes(analysis, "attn1.qkv.weight", 1) == [4, 8, 8]
    assert _permutable_sizes(analysis, "attn2.qkv.weight", 1) == [4, 8, 12]  # V heads of 12
    assert _permutable_sizes(analysis, "attn2.out_proj.weight", 0) == [4, 12]
    assert _permutable_sizes(analysis, "mha.q_proj.weight", 1) == [4, 8]
    assert _permutable_sizes(analysis, "mha.k_proj.weight", 1) == [4, 8]
    assert _permutable_sizes(analysis, "mha.head_bias", 1) == [4]
    q_groups = {g.id for g in analysis.permutable_groups
                if any(m.tensor == "mha.q_proj.weight" and m.axis == 1 for m in g.members)}
    v_groups = {g.id for g in analysis.permutable_groups
                if any(m.tensor == "mha.v_proj.weight" and m.axis == 1 for m in g.members)}
    assert len(q_groups & v_groups) == 1  # the heads; the dims inside differ


def test_group_query_attention_moves_kv_heads_with_their_query_groups() -> None:
    analysis = analyze(_model("contrib_gqa"))
    # Q: kv heads (2) x query heads in a group (2, an order per group: two groups) x rotary
    # frequencies (8); K: kv heads x frequencies.
    assert _permutable_sizes(analysis, "layers.0.q_proj.weight", 1) == [2, 2, 2, 8]
    assert _permutable_sizes(analysis, "layers.0.k_proj.weight", 1) == [2, 8]
    assert _permutable_sizes(analysis, "layers.0.v_proj.weight", 1) == [2, 16]
    assert _permutable_sizes(analysis, "layers.0.o_proj.weight", 0) == [2, 2, 2, 16]
    assert _permutable_sizes(analysis, "rope.cos_cache", 1) == [8]  # frequencies move with their pairs
    assert _permutable_sizes(analysis, "layers.1.qkv_proj.weight", 1) == [2, 2, 2, 8, 16]  # packed


def test_group_query_attention_with_a_kv_cache_freezes_what_the_cache_holds() -> None:
    analysis = analyze(_model("contrib_gqa_kv_cache"))
    # The query heads inside a group are not in the cache: they still move, each group its own way.
    assert _permutable_sizes(analysis, "layers.0.q_proj.weight", 1) == [2, 2]
    held = [g for g in analysis.groups if any("past_key_values.layers.0.key" in r.message for r in g.reasons)]
    assert held and all(g.frozen for g in held)


def test_rotary_embedding_moves_whole_pairs_with_their_frequencies() -> None:
    analysis = analyze(_model("contrib_rotary"))
    assert _permutable_sizes(analysis, "block0.q_proj.weight", 1) == [4, 4]  # heads, frequencies
    assert _permutable_sizes(analysis, "block1.k_proj.weight", 1) == [4, 4]  # interleaved pairs
    assert _permutable_sizes(analysis, "block0.v_proj.weight", 1) == [4, 8]
    reasons = [str(r) for g in analysis.groups for r in g.reasons]
    assert any("rotary pairs keep their order" in r for r in reasons)


def test_matmul_nbits_rows_blocks_and_bytes() -> None:
    analysis = analyze(_model("contrib_matmul_nbits"))
    # fc1 (4-bit, K = 64 in 4 blocks of 8 bytes): its zero points pack two blocks a byte, so its
    # blocks move as whole zero-point bytes (pairs of blocks); the bytes inside a block (pairs of
    # K) move: the embedding's 64 outputs move as p_2 (x) I_2 (x) p_8 (x) I_2.
    assert _permutable_sizes(analysis, "embed.weight", 1) == [2, 8]
    assert _permutable_sizes(analysis, "fc1.weight", 1) == [2]
    assert _permutable_sizes(analysis, "fc1.weight", 2) == [8]
    # fc1's rows move with their scales and packed zero points; fc2 (no zero points) reads them in
    # whole blocks (4) and bytes (8): the rows take those two groups.
    assert _permutable_sizes(analysis, "fc1.weight", 0) == [4, 8]
    for tensor in ("fc1.scales", "fc1.zero_points"):  # flat [N * blocks] and [N * zero-point bytes]
        assert _permutable_sizes(analysis, tensor, 0) == [2, 4, 8], tensor
    assert _permutable_sizes(analysis, "fc2.weight", 1) == [4]
    # fc2's rows and bias are read by the 8-bit fc3 (3 blocks of 16 bytes); fc3's rows are free.
    assert _permutable_sizes(analysis, "fc2.bias", 0) == [3, 16]
    assert _permutable_sizes(analysis, "fc3.weight", 0) == [32]
    assert _permutable_sizes(analysis, "fc3.scales", 0) == [32]
    assert _permutable_sizes(analysis, "fc3.scales", 1) == [3]  # [N, n_blocks] scales
    assert _permutable_sizes(analysis, "fc3.zero_points", 1) == [3]


def test_embed_layer_norm_tables_move_together() -> None:
    analysis = analyze(_model("contrib_embed"))
    sizes = [_permutable_sizes(analysis, t, 1) for t in
             ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
              "embeddings.token_type_embeddings.weight")]
    assert sizes == [[32]] * 3


# ------------------------------------------------------------------ partial permutations must be caught


def _swap(model: onnx.ModelProto, tensor: str, axis: int, i: int, j: int) -> None:
    """Swap entries ``i`` and ``j`` of ``tensor`` along ``axis`` in place (one half of a permutation)."""
    for init in model.graph.initializer:
        if init.name == tensor:
            array = numpy_helper.to_array(init).copy()
            index = np.arange(array.shape[axis])
            index[[i, j]] = index[[j, i]]
            init.CopyFrom(numpy_helper.from_array(np.take(array, index, axis=axis), tensor))
            return
    raise AssertionError(f"no initializer {tensor}")


@pytest.mark.parametrize(("name", "tensor", "axis", "i", "j"), [
    ("contrib_attention", "attn1.qkv.weight", 1, 0, 8),        # a Q head moved, its K head not
    ("contrib_attention", "mha.k_proj.weight", 1, 0, 1),       # K dims without Q dims
    ("contrib_gqa", "layers.0.k_proj.weight", 1, 0, 16),       # a KV head without its query group
    ("contrib_gqa", "layers.0.q_proj.weight", 1, 0, 4),        # a rotary pair split
    ("contrib_matmul_nbits", "fc1.weight", 0, 0, 1),           # rows without their scales
    ("contrib_skip_norm", "norm1.gamma", 0, 0, 1),             # gamma alone
    ("contrib_embed", "embeddings.position_embeddings.weight", 1, 0, 1),  # one table alone
    ("contrib_fused_conv", "block.conv2.weight", 0, 0, 1),     # conv rows without Z's channels
])
def test_partial_permutation_of_a_contrib_operator_is_caught(name: str, tensor: str, axis: int, i: int,
                                                             j: int) -> None:
    source = _model(name)
    model = copy_model(source)
    _swap(model, tensor, axis, i, j)
    assert not verify_models(source, model, provider="cpu").equivalent


def _attention_model(*, past: bool = False, do_rotary: bool = False) -> onnx.ModelProto:
    """Tokens -> MatMul -> Attention (optionally with a past state input and present output) -> MatMul head."""
    b = GraphBuilder("attention_variant", 0)
    x = b.input("input", (1, C.SEQ, C.WIDTH))
    h = b.matmul(x, C.WIDTH, name="embed", gain=1.0)
    head_size = C.WIDTH // C.HEADS
    inputs = [h, b.param("qkv.weight", b.he_normal((C.WIDTH, 3 * C.WIDTH), C.WIDTH, 1.0)),
              b.param("qkv.bias", b.small_normal((3 * C.WIDTH,)))]
    outputs: list[C.OutputSpec] = [("y", (1, C.SEQ, C.WIDTH), TensorProto.FLOAT)]
    if past:
        inputs += ["", b.input("past", (2, 1, C.HEADS, 3, head_size))]
        outputs.append(("present", (2, 1, C.HEADS, 3 + C.SEQ, head_size), TensorProto.FLOAT))
    names = C.contrib_node(b, "Attention", inputs, outputs, name="attention", num_heads=C.HEADS,
                           do_rotary=int(do_rotary))
    return b.build([b.matmul(names[0], C.NUM_OUTPUTS, name="logits", gain=1.0), *names[1:]])


def test_attention_with_a_past_state_freezes_what_the_state_holds() -> None:
    source = _attention_model(past=True)
    analysis = analyze(source)
    # The state [2, B, N, P, H] holds the heads and K's and V's dims: a graph input pins them all.
    assert _permutable_sizes(analysis, "qkv.weight", 1) == []
    assert any("graph input 'past'" in str(r) for g in analysis.groups for r in g.reasons)
    assert _permutable_sizes(analysis, "qkv.weight", 0) == [32]  # the rows still follow the input
    model, _, perms, _ = permute_copy(source, 3)
    assert perms and verify_models(source, model, provider="cpu").equivalent


def test_attention_with_rotary_inside_pins_the_query_key_dims() -> None:
    analysis = analyze(_attention_model(do_rotary=True))
    # Heads (4) and V dims (8) move; the Q/K dims inside a head keep their order (the rotary
    # frequencies are computed inside the operator and cannot follow).
    assert _permutable_sizes(analysis, "qkv.weight", 1) == [4, 8]
    dims = next(g for g in analysis.permutable_groups
                if g.size == 8 and any(m.tensor == "qkv.weight" and m.axis == 1 for m in g.members))
    (member,) = [m for m in dims.members if m.tensor == "qkv.weight" and m.axis == 1]
    assert member.index_map == "[64:96] of 96: I_4 (x) p"  # V's columns only
