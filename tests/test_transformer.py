"""Transformers as PyTorch exports them: every permutable neuron found, nothing permuted wrongly.

- the fixtures of ``fixtures/transformer.py``: permute -> verify -> unpermute, wrong permutations
  (Q without K inside a head, heads without V, MLP units without fc2) caught, and the expected
  groups: one residual stream across blocks, heads as blocks, one permutation inside the heads
  shared by Q and K and another shared by V and the output projection, MLP hidden units;
- the MatMul rule for two computed operands on small inline graphs (multi-query attention,
  Gram matrices, an operand that cannot follow);
- tied embeddings (``MatMul(x, Transpose(table))``, ``Gemm(transB=1)``), the ``Gelu`` operator
  (opset 20) and rotary position embeddings.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from fixtures import FIXTURES
from fixtures.transformer import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    SEQ,
    VOCAB,
    WIDTH,
    gelu_erf,
    gelu_tanh,
    layer_norm_decomposed,
    mlp,
)
from onnxlady import (
    ChannelAnalysis,
    ChannelGroup,
    analyze,
    draw_permutations,
    permute_model,
    unpermute_model,
    verify_models,
)
from onnxlady._transforms._permute import _permute_tensor, _tensor_holders
from onnxlady._verify._compare import generate_inputs
from onnxlady.testing import GraphBuilder, constant_bytes, copy_model, permute_producer_only

TRANSFORMERS = ("encoder_postnorm", "encoder_prenorm", "tied_lm_head")
BLOCKS = {"encoder_postnorm": ("block0",), "encoder_prenorm": ("block0", "block1"), "tied_lm_head": ("block0",)}


# -- helpers ------------------------------------------------------------------------------
@functools.cache
def _fixture_bytes(name: str) -> bytes:
    return FIXTURES[name](0).SerializeToString()


def _fixture(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_fixture_bytes(name))


@functools.cache
def _analysis(name: str) -> ChannelAnalysis:
    return analyze(_fixture(name))


def _groups(analysis: ChannelAnalysis, tensor: str, axis: int) -> dict[str, tuple[ChannelGroup, str]]:
    """Group id -> (group, index map) for every weight member naming ``tensor`` on ``axis``."""
    found = {}
    for group in analysis.groups:
        for member in group.members:
            if member.is_weight and member.tensor == tensor and member.axis == axis:
                found[group.id] = (group, member.index_map)
    return found


def _group(analysis: ChannelAnalysis, tensor: str, axis: int, index_map: str = "p") -> ChannelGroup:
    """The group that moves ``tensor`` along ``axis`` with ``index_map``."""
    matches = [g for g, imap in _groups(analysis, tensor, axis).values() if imap == index_map]
    assert len(matches) == 1, f"{tensor} axis {axis}: {_groups(analysis, tensor, axis)}"
    return matches[0]


def _weight_members(group: ChannelGroup) -> set[tuple[str, int]]:
    return {(m.tensor, m.axis) for m in group.members if m.is_weight}


def _permute_all(source: onnx.ModelProto, seed: int):
    model = copy_model(source)
    analysis = analyze(model)
    perms = draw_permutations(analysis, seed)
    key = permute_model(analysis, perms, seed=seed)
    return model, analysis, perms, key


def _apply_group(model: onnx.ModelProto, analysis: ChannelAnalysis, gid: str,
                 only: set[tuple[str, int]] | None = None, seed: int = 5) -> set[tuple[str, int]]:
    """Permute by group ``gid`` alone the weight axes it moves (or just those in ``only``)."""
    perm = draw_permutations(analysis, seed, [gid])[gid]
    holders = _tensor_holders(model)
    changed = set()
    for plan in analysis.tensors:
        for axis, expr in plan.axes:
            if gid not in analysis.neuron_labels(expr):
                continue
            if only is not None and (plan.tensor, axis) not in only:
                continue
            idx = analysis.index_array(expr, {gid: perm})
            _permute_tensor(holders[plan.tensor], [(axis, idx)])
            changed.add((plan.tensor, axis))
    return changed


def _assert_equivalent(source: onnx.ModelProto, model: onnx.ModelProto) -> None:
    report = verify_models(source, model, provider="cpu", iterations=2)
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs


def _assert_permutations_are_safe(source: onnx.ModelProto, seed: int = 3) -> ChannelAnalysis:
    model, analysis, perms, _ = _permute_all(source, seed)
    assert perms, "nothing permutable: the check would prove nothing"
    _assert_equivalent(source, model)
    return analysis


def _run(model: onnx.ModelProto, seed: int = 0) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = generate_inputs(model, None, np.random.default_rng(seed))
    return session.run(None, feeds)


# -- the fixtures: permute, verify, unpermute ---------------------------------------------
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_fixture_outputs_are_order_one(name: str) -> None:
    (out,) = _run(_fixture(name))
    assert np.all(np.isfinite(out)) and 0.05 < float(out.std()) < 20.0, out.std()


@pytest.mark.parametrize("name", TRANSFORMERS)
@pytest.mark.parametrize("seed", [1, 7])
def test_permuted_transformer_is_equivalent_and_unpermutes_bit_exactly(name: str, seed: int) -> None:
    source = _fixture(name)
    model, analysis, perms, key = _permute_all(source, seed)
    assert set(perms) == {g.id for g in analysis.permutable_groups}
    assert constant_bytes(model) != constant_bytes(source)
    _assert_equivalent(source, model)
    assert unpermute_model(model, key) is True
    assert constant_bytes(model) == constant_bytes(source)
    assert model.SerializeToString() == source.SerializeToString()


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_each_group_alone_on_all_its_members_is_equivalent(name: str) -> None:
    """The control for the wrong permutations below: the helper itself keeps the function."""
    source = _fixture(name)
    analysis = _analysis(name)
    for group in analysis.permutable_groups:
        model = copy_model(source)
        assert _apply_group(model, analysis, group.id)
        _assert_equivalent(source, model)


def _attn(name: str, block: str) -> dict[str, ChannelGroup]:
    analysis = _analysis(name)
    p = f"{block}.attn"
    return {
        "heads": _group(analysis, f"{p}.q_proj.weight", 1, "p (x) I_8"),
        "qk": _group(analysis, f"{p}.q_proj.weight", 1, "I_4 (x) p"),
        "v": _group(analysis, f"{p}.v_proj.weight", 1, "I_4 (x) p"),
        "mlp": _group(analysis, f"{block}.mlp.fc1.weight", 1),
    }


WRONG = {
    # Q's columns permuted inside every head, K's left alone: the scores change.
    "q_without_k": ("qk", lambda p: {(f"{p}.attn.q_proj.weight", 1), (f"{p}.attn.q_proj.bias", 0)}),
    # Heads reordered in Q, K and V but not in the output projection's rows.
    "heads_without_out_proj": ("heads", lambda p: {
        (f"{p}.attn.{n}.{t}", 1 if t == "weight" else 0)
        for n in ("q_proj", "k_proj", "v_proj") for t in ("weight", "bias")
    }),
    # Heads reordered in Q and K only: each head's scores weight another head's values.
    "heads_without_v": ("heads", lambda p: {
        (f"{p}.attn.{n}.{t}", 1 if t == "weight" else 0) for n in ("q_proj", "k_proj") for t in ("weight", "bias")
    } | {(f"{p}.attn.out_proj.weight", 0)}),
    # V's within-head permutation without the output projection's rows.
    "v_without_out_proj": ("v", lambda p: {(f"{p}.attn.v_proj.weight", 1), (f"{p}.attn.v_proj.bias", 0)}),
    # MLP hidden units permuted in fc1 (weight and bias) but not in fc2's rows.
    "mlp_without_fc2": ("mlp", lambda p: {(f"{p}.mlp.fc1.weight", 1), (f"{p}.mlp.fc1.bias", 0)}),
}


@pytest.mark.parametrize("name", TRANSFORMERS)
@pytest.mark.parametrize("wrong", sorted(WRONG))
def test_wrong_permutation_is_caught(name: str, wrong: str) -> None:
    source = _fixture(name)
    analysis = _analysis(name)
    block = BLOCKS[name][-1]
    kind, members = WRONG[wrong]
    group = _attn(name, block)[kind]
    wanted = members(block)
    model = copy_model(source)
    changed = _apply_group(model, analysis, group.id, only=wanted)
    assert changed == wanted, "the wrong permutation must touch exactly the chosen tensors"
    report = verify_models(source, model, provider="cpu")
    assert not report.equivalent, f"{wrong}: permuting only {sorted(changed)} went unnoticed"


# -- the groups ---------------------------------------------------------------------------
def _residual_members(name: str) -> set[tuple[str, int]]:
    members = set()
    for block in BLOCKS[name]:
        for proj in ("q_proj", "k_proj", "v_proj"):
            members.add((f"{block}.attn.{proj}.weight", 0))
        members |= {(f"{block}.attn.out_proj.weight", 1), (f"{block}.attn.out_proj.bias", 0)}
        members |= {(f"{block}.mlp.fc1.weight", 0), (f"{block}.mlp.fc2.weight", 1), (f"{block}.mlp.fc2.bias", 0)}
    if name == "encoder_postnorm":
        members |= {("embed.tokens.weight", 1), ("embed.positions.weight", 1), ("logits.weight", 0)}
        members |= {("block0.norm1.scale.gamma", 0), ("block0.norm1.shift.beta", 0)}
        members |= {("block0.norm2.weight", 0), ("block0.norm2.bias", 0)}
    elif name == "encoder_prenorm":
        members |= {("embed.weight", 1), ("embed.bias", 0), ("logits.weight", 0)}
        members |= {("final_norm.weight", 0), ("final_norm.bias", 0)}
        for block in BLOCKS[name]:
            for norm in ("norm1", "norm2"):
                members |= {(f"{block}.{norm}.weight", 0), (f"{block}.{norm}.bias", 0)}
    else:
        # The tied table is permuted once, along its width, for the Gather and the LM head.
        members |= {("embed.tokens.weight", 1), ("embed.add.positions", 2)}
        members |= {("final_norm.weight", 0), ("final_norm.bias", 0)}
        for norm in ("norm1", "norm2"):
            members |= {(f"block0.{norm}.weight", 0), (f"block0.{norm}.bias", 0)}
    return members


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_residual_stream_is_one_group_across_blocks(name: str) -> None:
    analysis = _analysis(name)
    first = BLOCKS[name][0]
    residual = _group(analysis, f"{first}.attn.q_proj.weight", 0)
    assert residual.permutable and residual.size == WIDTH
    expected = _residual_members(name)
    assert expected <= _weight_members(residual), sorted(expected - _weight_members(residual))
    for tensor, axis in expected:
        assert _groups(analysis, tensor, axis) == {residual.id: (residual, "p")}, (tensor, axis)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_heads_and_within_head_groups(name: str) -> None:
    analysis = _analysis(name)
    seen: set[str] = set()
    for block in BLOCKS[name]:
        groups = _attn(name, block)
        p = f"{block}.attn"
        heads, qk, v = groups["heads"], groups["qk"], groups["v"]
        assert (heads.size, qk.size, v.size) == (HEADS, HEAD_DIM, HEAD_DIM)
        assert heads.permutable and qk.permutable and v.permutable
        assert len({heads.id, qk.id, v.id} | seen) == len(seen) + 3, "each block has its own groups"
        seen |= {heads.id, qk.id, v.id}
        # Heads move as blocks of D in Q, K, V and in the output projection's input rows.
        for tensor, axis in ((f"{p}.q_proj.weight", 1), (f"{p}.k_proj.weight", 1), (f"{p}.v_proj.weight", 1),
                             (f"{p}.q_proj.bias", 0), (f"{p}.k_proj.bias", 0), (f"{p}.v_proj.bias", 0),
                             (f"{p}.out_proj.weight", 0)):
            assert _groups(analysis, tensor, axis)[heads.id][1] == "p (x) I_8", tensor
        # One permutation inside every head, shared by Q and K; another by V and out_proj's rows.
        qk_members = {(f"{p}.{n}.{t}", 1 if t == "weight" else 0) for n in ("q_proj", "k_proj") for t in ("weight", "bias")}
        v_members = {(f"{p}.v_proj.weight", 1), (f"{p}.v_proj.bias", 0), (f"{p}.out_proj.weight", 0)}
        assert _weight_members(qk) == qk_members
        assert _weight_members(v) == v_members
        assert _groups(analysis, f"{p}.out_proj.weight", 0) == {
            heads.id: (heads, "p (x) I_8"), v.id: (v, "I_4 (x) p"),
        }
        mlp_hidden = groups["mlp"]
        assert mlp_hidden.permutable and mlp_hidden.size == HIDDEN
        assert _weight_members(mlp_hidden) == {
            (f"{block}.mlp.fc1.weight", 1), (f"{block}.mlp.fc1.bias", 0), (f"{block}.mlp.fc2.weight", 0),
        }


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_every_producer_neuron_not_pinned_by_an_output_is_permutable(name: str) -> None:
    analysis = _analysis(name)
    summary = analysis.summary()
    total = summary["producer_neurons"]
    pinned = summary["producer_neurons_pinned_by_outputs"]
    assert summary["permutable_producer_neurons"] + pinned == total, summary
    assert pinned == (VOCAB if name == "tied_lm_head" else 10)
    assert summary["permutable_fraction"] == pytest.approx((total - pinned) / total)
    assert summary["untied_constants"] == []
    # The only frozen group is the logits', for the graph output.
    frozen = [g for g in analysis.groups if g.frozen]
    assert len(frozen) == 1 and [r.kind for r in frozen[0].reasons] == ["graph-output"]
    blocks = len(BLOCKS[name])
    assert len(analysis.permutable_groups) == 1 + 4 * blocks  # residual + heads, qk, v, mlp per block


# -- MatMul of two computed tensors on small graphs -----------------------------------------
def test_multi_query_attention_heads_broadcast_against_a_single_key_head() -> None:
    """K and V with one head of D ([1, 1, S, D]) broadcast over Q's H heads: the heads stay
    free and independent of K and V; Q and K still share the within-head permutation.
    """
    b = GraphBuilder("mqa", 0)
    x = b.matmul(b.input("input", (1, SEQ, WIDTH)), WIDTH, name="embed", gain=1.0)
    q = b.transpose(b.reshape(b.matmul(x, WIDTH, name="q_proj", gain=1.0), [1, SEQ, HEADS, HEAD_DIM],
                              name="q_heads"), [0, 2, 1, 3], name="q_t")
    k = b.transpose(b.reshape(b.matmul(x, HEAD_DIM, name="k_proj", gain=1.0), [1, SEQ, 1, HEAD_DIM],
                              name="k_heads"), [0, 2, 3, 1], name="k_t")            # [1, 1, D, S]
    v = b.transpose(b.reshape(b.matmul(x, HEAD_DIM, name="v_proj", gain=1.0), [1, SEQ, 1, HEAD_DIM],
                              name="v_heads"), [0, 2, 1, 3], name="v_t")            # [1, 1, S, D]
    s = b.softmax(b.div(b.matmul_tensors(q, k, name="scores"), np.array(math.sqrt(HEAD_DIM), np.float32),
                        name="scale"), -1, name="softmax")
    o = b.transpose(b.matmul_tensors(s, v, name="context"), [0, 2, 1, 3], name="context_t")
    o = b.matmul(b.reshape(o, [1, SEQ, WIDTH], name="merge"), WIDTH, name="out_proj", gain=1.0)
    model = b.build(b.matmul(b.add(x, o, name="residual"), 10, name="logits", gain=1.0))
    analysis = _assert_permutations_are_safe(model)
    heads = _group(analysis, "q_proj.weight", 1, "p (x) I_8")
    qk = _group(analysis, "q_proj.weight", 1, "I_4 (x) p")
    assert heads.permutable and heads.size == HEADS and qk.permutable and qk.size == HEAD_DIM
    assert _group(analysis, "k_proj.weight", 1) is qk
    v = _group(analysis, "v_proj.weight", 1)
    assert v.permutable and v.size == HEAD_DIM
    assert _groups(analysis, "out_proj.weight", 0) == {heads.id: (heads, "p (x) I_8"), v.id: (v, "I_4 (x) p")}
    assert not _groups(analysis, "k_proj.weight", 1).keys() & {heads.id}


def test_gram_matrix_contracts_a_free_group() -> None:
    """X @ X^T over the features: both sides take the same permutation, the product ignores it."""
    b = GraphBuilder("gram", 0)
    x = b.matmul(b.input("input", (1, SEQ, WIDTH)), WIDTH, name="proj", gain=1.0)
    gram = b.matmul_tensors(x, b.transpose(x, [0, 2, 1], name="xt"), name="gram")   # [1, S, S]
    model = b.build(b.div(gram, np.array(WIDTH, np.float32), name="output"))
    analysis = _assert_permutations_are_safe(model)
    assert _group(analysis, "proj.weight", 1).permutable


def test_contraction_with_an_operand_that_cannot_follow_freezes() -> None:
    """A's features contracted with a graph input's rows: the input keeps its order, so A's
    group must too; the rows of the result (tokens) carry nothing.
    """
    b = GraphBuilder("pinned_contraction", 0)
    x = b.relu(b.matmul(b.input("input", (1, SEQ, WIDTH)), WIDTH, name="proj"), name="relu")
    other = b.input("other", (1, WIDTH, 8))
    model = b.build(b.matmul_tensors(x, other, name="output"))
    analysis = analyze(model)
    assert not _groups(analysis, "proj.weight", 1)  # frozen: its weights are not members
    frozen = [g for g in analysis.groups if g.size == WIDTH]
    assert frozen and all(g.frozen for g in frozen)
    assert any(r.kind == "graph-input" and "other" in r.message for g in frozen for r in g.reasons)


def test_batch_axes_of_equal_size_are_coupled() -> None:
    """Heads of Q against heads of another computed tensor: one head permutation for both."""
    b = GraphBuilder("batched", 0)
    x = b.matmul(b.input("input", (1, SEQ, WIDTH)), WIDTH, name="embed", gain=1.0)
    q = b.transpose(b.reshape(b.matmul(x, WIDTH, name="a_proj", gain=1.0), [1, SEQ, HEADS, HEAD_DIM],
                              name="a_heads"), [0, 2, 1, 3], name="a_t")             # [1, H, S, D]
    k = b.transpose(b.reshape(b.matmul(x, WIDTH, name="b_proj", gain=1.0), [1, SEQ, HEADS, HEAD_DIM],
                              name="b_heads"), [0, 2, 3, 1], name="b_t")             # [1, H, D, S]
    s = b.matmul_tensors(q, k, name="scores")
    model = b.build(b.reduce_mean(s, [1], keepdims=False, name="output"))  # the heads are summed
    analysis = _assert_permutations_are_safe(model)
    heads = _group(analysis, "a_proj.weight", 1, "p (x) I_8")
    assert heads.permutable and _group(analysis, "b_proj.weight", 1, "p (x) I_8") is heads


# -- tied embeddings --------------------------------------------------------------------------
def test_tied_table_is_permuted_once_through_the_transpose() -> None:
    source = _fixture("tied_lm_head")
    model, analysis, _, key = _permute_all(source, 4)
    assert analysis.untied == [] and key.untied == []
    plans = [t for t in analysis.tensors if t.source == "embed.tokens.weight"]
    assert len(plans) == 1 and plans[0].copy == 0
    assert [axis for axis, _ in plans[0].axes] == [1]  # the width; the vocabulary is pinned by the logits
    uses = {analysis.graph.nodes[n].op_type for n, _ in plans[0].uses}
    assert uses == {"Gather", "Transpose"}
    names = [t.name for t in model.graph.initializer]
    assert names.count("embed.tokens.weight") == 1 and not any("copy" in n for n in names)
    _assert_equivalent(source, model)


def _tied_model(head: str) -> onnx.ModelProto:
    """Token embedding ``tokens.weight`` [V, C], a pre-norm MLP block, a final LayerNorm, then the
    table reused by the head: ``Gemm(x, table, transB=1)`` (``head="gemm"``) or two MatMuls that
    read one ``Transpose(table)`` (``head="two_readers"``).
    """
    b = GraphBuilder(f"tied_{head}", 0)
    ids = b.input("input_ids", (1, SEQ), TensorProto.INT64)
    x = b.embedding(ids, VOCAB, WIDTH, name="tokens")
    x = b.add(x, mlp(b, b.layer_norm(x, name="norm1"), gelu_erf, name="mlp"), name="residual")
    x = b.layer_norm(x, name="final_norm")
    if head == "gemm":
        rows = b.reshape(x, [SEQ, WIDTH], name="rows")
        return b.build(b.custom("Gemm", "", [rows, "tokens.weight"], (SEQ, VOCAB), name="logits", transB=1))
    table_t = b.transpose("tokens.weight", [1, 0], name="table_t")
    first = b.matmul_tensors(x, table_t, name="logits")
    second = b.matmul_tensors(b.relu(x, name="relu"), table_t, name="logits2")
    return b.build([first, second])


def test_tied_table_through_gemm_trans_b_is_permuted_once() -> None:
    source = _tied_model("gemm")
    analysis = _assert_permutations_are_safe(source)
    residual = _group(analysis, "mlp.fc2.weight", 1)
    assert residual.permutable and ("tokens.weight", 1) in _weight_members(residual)
    assert analysis.untied == []


def test_transposed_table_with_two_readers_is_looked_through_by_both() -> None:
    """The Transpose's output feeds two MatMuls, and each takes its contracted axis.

    The table is bound through it once, with the residual stream (a reader that did not take
    the axis would freeze it instead: tests/test_derived_readers.py).
    """
    source = _tied_model("two_readers")
    model, analysis, _, _ = _permute_all(source, 3)
    residual = _group(analysis, "mlp.fc2.weight", 1)
    assert residual.permutable and ("tokens.weight", 1) in _weight_members(residual)
    assert analysis.untied == []
    assert _group(analysis, "mlp.fc1.weight", 1).permutable  # the MLP's own units stay free
    _assert_equivalent(source, model)
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong, provider="cpu").equivalent


def test_position_table_gathered_at_constant_positions_joins_the_residual_stream() -> None:
    """``Gather(position_table, constant positions)`` (an export without constant folding)."""
    b = GraphBuilder("constant_positions", 0)
    ids = b.input("input_ids", (1, SEQ), TensorProto.INT64)
    x = b.embedding(ids, VOCAB, WIDTH, name="tokens")
    where = b.param("position_ids", np.arange(SEQ, dtype=np.int64).reshape(1, SEQ))
    pos = b.gather(b.param("positions.weight", b.small_normal((SEQ, WIDTH), 0.5)), where, name="positions")
    x = b.add(x, pos, name="embed")
    x = b.add(x, mlp(b, layer_norm_decomposed(b, x, name="norm"), gelu_tanh, name="mlp"), name="residual")
    model = b.build(b.matmul(x, 10, name="logits", gain=1.0))
    analysis = _assert_permutations_are_safe(model)
    (residual,) = {g.id: g for g in analysis.groups for m in g.members
                   if not m.is_weight and m.tensor == "residual" and m.axis == 2}.values()
    assert residual.permutable, "; ".join(map(str, residual.reasons))
    assert ("positions.weight", 1) in _weight_members(residual)


# -- the Gelu operator (opset 20) and rotary embeddings --------------------------------------
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_operator_passes_the_hidden_units(approximate: str) -> None:
    b = GraphBuilder("gelu_op", 0, opset=20)
    x = b.matmul(b.input("input", (1, SEQ, WIDTH)), WIDTH, name="embed", gain=1.0)
    h = mlp(b, b.layer_norm(x, name="norm"), lambda bb, t, name: bb.gelu(t, approximate, name=name), name="mlp")
    model = b.build(b.matmul(b.add(x, h, name="residual"), 10, name="logits", gain=1.0))
    analysis = _assert_permutations_are_safe(model)
    hidden = _group(analysis, "mlp.fc1.weight", 1)
    assert hidden.permutable and hidden.size == HIDDEN
    assert _group(analysis, "mlp.fc2.weight", 0) is hidden
    assert _group(analysis, "embed.weight", 1).permutable


def _rope(b: GraphBuilder, t: str, cos: str, sin: str, *, name: str) -> str:
    """``t * cos + rotate_half(t) * sin`` on [1, H, S, D] (the Llama / GPT-NeoX form)."""
    half = HEAD_DIM // 2
    with b.scope(name):
        x1 = b.slice(t, [0], [half], [3], name="x1")
        x2 = b.slice(t, [half], [HEAD_DIM], [3], name="x2")
        x2 = b.mul(x2, np.array(-1.0, np.float32), name="neg", const_name="minus_one")
        rotated = b.concat([x2, x1], axis=3, name="rotate_half")
        return b.add(b.mul(t, cos, name="mul_cos"), b.mul(rotated, sin, name="mul_sin"), name="add")


@pytest.mark.parametrize("tables", ["constant", "computed"])
def test_rotary_embeddings_are_never_permuted_wrongly(tables: str) -> None:
    """RoPE pairs dimension d with d + D/2. With constant cos/sin tables, permuting the tables
    along D keeps the function when both halves take the same permutation (what the analysis
    finds); with cos/sin computed at run time the frequency constant they come from is permuted along.
    """
    b = GraphBuilder(f"rope_{tables}", 0)
    x = b.matmul(b.input("input", (1, SEQ, WIDTH)), WIDTH, name="embed", gain=1.0)
    angles = np.arange(SEQ, dtype=np.float32)[:, None] * (
        10000.0 ** (-np.arange(HEAD_DIM // 2, dtype=np.float32) / (HEAD_DIM // 2)))[None, :]
    angles = np.concatenate([angles, angles], axis=1)                                       # [S, D]
    if tables == "constant":
        cos = b.param("rope.cos", np.cos(angles).astype(np.float32))
        sin = b.param("rope.sin", np.sin(angles).astype(np.float32))
    else:
        raw = b.mul(b.reduce_mean(x, [2], name="rope.zero"), np.array(0.0, np.float32), name="rope.nothing")
        theta = b.add(b.reshape(raw, [1, SEQ, 1], name="rope.col"), angles.astype(np.float32), name="rope.theta")
        cos = b.custom("Cos", "", [theta], (1, SEQ, HEAD_DIM), name="rope.cos")
        sin = b.custom("Sin", "", [theta], (1, SEQ, HEAD_DIM), name="rope.sin")
    heads = [1, SEQ, HEADS, HEAD_DIM]
    q = b.transpose(b.reshape(b.matmul(x, WIDTH, name="q_proj", gain=1.0), heads, name="q_heads"),
                    [0, 2, 1, 3], name="q_t")
    k = b.transpose(b.reshape(b.matmul(x, WIDTH, name="k_proj", gain=1.0), heads, name="k_heads"),
                    [0, 2, 1, 3], name="k_t")
    q, k = _rope(b, q, cos, sin, name="rope_q"), _rope(b, k, cos, sin, name="rope_k")
    s = b.matmul_tensors(q, b.transpose(k, [0, 1, 3, 2], name="k_tt"), name="scores")
    s = b.softmax(b.div(s, np.array(math.sqrt(HEAD_DIM), np.float32), name="scale"), -1, name="softmax")
    v = b.transpose(b.reshape(b.matmul(x, WIDTH, name="v_proj", gain=1.0), heads, name="v_heads"),
                    [0, 2, 1, 3], name="v_t")
    o = b.transpose(b.matmul_tensors(s, v, name="context"), [0, 2, 1, 3], name="context_t")
    o = b.matmul(b.reshape(o, [1, SEQ, WIDTH], name="merge"), WIDTH, name="out_proj", gain=1.0)
    model = b.build(b.matmul(b.add(x, o, name="residual"), 10, name="logits", gain=1.0))
    analysis = _assert_permutations_are_safe(model)
    within = {g.id: (g, imap) for g, imap in _groups(analysis, "q_proj.weight", 1).values()
              if "I_4 (x)" in imap}
    if tables == "computed":
        # The frequencies cos/sin are computed from vary along head_dim: they follow the
        # within-head permutation (equivalence was verified above).
        assert within and all(g.permutable for g, _ in within.values())
    else:
        assert within and all(g.permutable for g, _ in within.values())
        assert ("rope.cos", 1) in set().union(*(_weight_members(g) for g, _ in within.values()))
    # Heads and V's within-head permutation are untouched by RoPE.
    assert _group(analysis, "q_proj.weight", 1, "p (x) I_8").permutable
    assert _group(analysis, "v_proj.weight", 1, "I_4 (x) p").permutable
