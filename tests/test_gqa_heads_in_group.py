"""Query heads inside one key/value group take their own order, group by group (round 16, F2).

Query head ``k * R + g`` reads key/value head ``k`` only, so the ``R`` query heads of one group may
be re-ordered among themselves independently of every other group's. Checked for the three forms
that carry it: Hugging Face's ``repeat_kv`` (``Unsqueeze -> Expand -> Reshape``), the same written
with ``Tile`` (``repeat_interleave``, which HEAD did not read as copies at all), and ONNX
Runtime's ``GroupQueryAttention``: a seeded permute draws a different order per group, the copy is
equivalent and unpermutes bit for bit, a query head moved to another group is caught, resync
restores the orders and the audit calls a swap inside one group ``permuted``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures.contrib import GQA_HEAD_DIM, GQA_HEADS, GQA_KV_HEADS, build_gqa
from fixtures.grouped_attention import HEAD_DIM, HEADS, SEQ, WIDTH, build_gqa_attention
from onnxlady import analyze, audit, draw_permutations, permute_model, resync, unpermute_model, verify_models
from onnxlady.testing import GraphBuilder, copy_model, permute_copy

KV = 2


def tiled_gqa() -> onnx.ModelProto:
    """``repeat_interleave`` of the key/value heads written with Tile: ``[1, G, 1, S, D] -> [1, G, R, S, D]``."""
    repeats = HEADS // KV
    b = GraphBuilder("tiled_gqa", 0)
    x = b.matmul(b.input("input", (1, SEQ, WIDTH)), WIDTH, name="embed", gain=1.0)
    x = b.layer_norm(x, name="norm")
    q = b.matmul(x, HEADS * HEAD_DIM, name="q_proj", gain=1.0)
    q = b.transpose(b.reshape(q, [1, SEQ, HEADS, HEAD_DIM], name="q_heads"), [0, 2, 1, 3], name="q_t")
    shared = []
    for label in ("k", "v"):
        t = b.matmul(x, KV * HEAD_DIM, name=f"{label}_proj", gain=1.0)
        t = b.transpose(b.reshape(t, [1, SEQ, KV, HEAD_DIM], name=f"{label}_heads"), [0, 2, 1, 3], name=f"{label}_t")
        t = b.tile(b.unsqueeze(t, [2], name=f"{label}_unsqueeze"), [1, 1, repeats, 1, 1], name=f"{label}_tile")
        shared.append(b.reshape(t, [1, HEADS, SEQ, HEAD_DIM], name=f"{label}_repeat"))
    scores = b.matmul_tensors(q, b.transpose(shared[0], [0, 1, 3, 2], name="k_tt"), name="scores")
    scores = b.div(scores, np.array(math.sqrt(HEAD_DIM), dtype=np.float32), name="scale", const_name="sqrt_d")
    context = b.matmul_tensors(b.softmax(scores, -1, name="softmax"), shared[1], name="context")
    context = b.reshape(b.transpose(context, [0, 2, 1, 3], name="context_t"), [1, SEQ, HEADS * HEAD_DIM], name="merge")
    x = b.layer_norm(b.matmul(context, WIDTH, name="o_proj", gain=1.0), name="final_norm")
    return b.build(b.matmul(x, 10, name="logits", gain=1.0))


#: name -> (builder, query projection, output projection, heads, head size)
CASES = {
    "expand": (lambda: build_gqa_attention(0), "block0.attn.q_proj", "block0.attn.o_proj", HEADS, HEAD_DIM),
    "tile": (tiled_gqa, "q_proj", "o_proj", HEADS, HEAD_DIM),
    "contrib": (lambda: build_gqa(0), "layers.0.q_proj", "layers.0.o_proj", GQA_HEADS, GQA_HEAD_DIM),
}


def _head_order(source: onnx.ModelProto, permuted: onnx.ModelProto, case: str) -> list[int]:
    """Which source query head each query head of the permuted copy holds (from the output projection's rows)."""
    _, _, out_proj, heads, size = CASES[case]
    # Output projection rows are head-major; a head's block of rows is its fingerprint (the dims
    # inside it may move too, and the columns: compare the sorted values).
    def blocks(model: onnx.ModelProto) -> list[bytes]:
        w = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}[f"{out_proj}.weight"]
        return [np.sort(w[h * size : (h + 1) * size], axis=None).tobytes() for h in range(heads)]

    before, after = blocks(source), blocks(permuted)
    return [before.index(block) for block in after]


def _swapped_heads(model: onnx.ModelProto, case: str, first: int, second: int) -> onnx.ModelProto:
    """A copy with query heads ``first`` and ``second`` exchanged (Q projection columns, output projection rows)."""
    _, q_proj, out_proj, heads, size = CASES[case]
    order = np.arange(heads * size).reshape(heads, size)
    order[[first, second]] = order[[second, first]]
    order = order.reshape(-1)
    copy = copy_model(model)
    for init in copy.graph.initializer:
        axis = {f"{q_proj}.weight": 1, f"{q_proj}.bias": 0, f"{out_proj}.weight": 0}.get(init.name)
        if axis is not None:
            init.CopyFrom(onnx.numpy_helper.from_array(np.take(onnx.numpy_helper.to_array(init), order, axis=axis), init.name))
    return copy


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_group_draws_its_own_query_head_order(case: str) -> None:
    build, *_ = CASES[case]
    source = build()
    heads = CASES[case][3]
    repeats = heads // (GQA_KV_HEADS if case == "contrib" else KV)
    orders = set()
    for seed in range(1, 6):
        permuted, _, _, key = permute_copy(source, seed)
        order = np.asarray(_head_order(source, permuted, case)).reshape(-1, repeats)
        assert all(len(set(row // repeats)) == 1 for row in order), order  # groups move whole
        orders.update(tuple(int(h) % repeats for h in row) for row in order)
        assert verify_models(source, permuted).equivalent
        assert unpermute_model(permuted, key) is True
        assert [i.raw_data for i in permuted.graph.initializer] == [i.raw_data for i in source.graph.initializer]
    if repeats > 2:  # (two heads a group: every order drawn is the swap)
        # Over a few seeds the groups' own orders differ (one shared order would give one per seed).
        assert len(orders) > 5, orders
    # One group's heads alone can move: the other groups keep theirs.
    model = copy_model(source)
    analysis = analyze(model)
    inner = [g.id for g in analysis.permutable_groups if g.size == repeats and any(
        m.tensor == f"{CASES[case][1]}.weight" and m.index_map.startswith("block ") for m in g.members)]
    assert len(inner) == heads // repeats, [(g.id, g.size) for g in analysis.groups]
    first = next(g for g in inner if any(m.index_map.startswith("block 0 ") for m in analysis.group(g).members))
    permute_model(analysis, draw_permutations(analysis, 1, [first]))
    order = _head_order(source, model, case)
    assert sorted(order[:repeats]) == list(range(repeats)) and order[:repeats] != list(range(repeats))
    assert order[repeats:] == list(range(repeats, heads))
    assert verify_models(source, model).equivalent


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_swap_inside_a_group_is_permuted_and_one_across_groups_is_caught(case: str, tmp_path: Path) -> None:
    build, *_ = CASES[case]
    source = build()
    heads = CASES[case][3]
    repeats = heads // (GQA_KV_HEADS if case == "contrib" else KV)
    inside = _swapped_heads(source, case, 0, 1)
    across = _swapped_heads(source, case, 0, repeats)  # head 0 reads KV head 0, head `repeats` KV head 1
    assert verify_models(source, inside).equivalent
    assert not verify_models(source, across).equivalent
    reference = tmp_path / "reference.onnx"
    onnx.save(source, reference)
    onnx.save(inside, tmp_path / "inside.onnx")
    onnx.save(across, tmp_path / "across.onnx")
    assert audit(reference, tmp_path / "inside.onnx").verdict == "permuted"
    assert audit(reference, tmp_path / "across.onnx").verdict != "permuted"
    report = resync(reference, tmp_path / "inside.onnx", output=tmp_path / "restored.onnx")
    restored = onnx.load(tmp_path / "restored.onnx")
    assert [i.raw_data for i in restored.graph.initializer] == [i.raw_data for i in source.graph.initializer], report
