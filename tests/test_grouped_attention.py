"""Multi-query and grouped-query attention: query heads move with their key/value head, never across.

The fixtures of ``fixtures/grouped_attention.py`` copy each key/value head for the query heads of
its group (``Unsqueeze -> Expand -> Reshape``, Hugging Face's ``repeat_kv``). The copies are equal
slices along the head axis, so the query heads may move freely inside their group (one key/value
head: all of them), and the key/value heads move with their groups as blocks. Checked here:

- the groups (query heads permutable, with the index maps that say how), which HEAD froze;
- permute -> verify equivalent -> unpermute byte-identical, for several seeds;
- wrong permutations caught: a producer's rows alone (``permute_producer_only``), a query head
  moved to another key/value group (its control, a move inside the group, is equivalent), query
  heads moved without the output projection;
- re-synchronization recovers every permutation (Psi 100);
- the equal-slice facts themselves (``uniform_axes``), and that nothing else is taken for them.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures.grouped_attention import FIXTURES, HEAD_DIM, HEADS, SEQ, WIDTH
from onnxlady import ChannelAnalysis, analyze, draw_permutations, permute_model, unpermute_model, verify_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._graph._uniform import uniform_axes
from onnxlady._io._tensors import tensor_holders
from onnxlady._resync._entry import resync_model
from onnxlady.testing import GraphBuilder, constant_bytes, copy_model, index_maps, permute_producer_only

NAMES = sorted(FIXTURES)
KV_HEADS = {"mqa_attention": 1, "gqa_attention": 2}
ATTN = "block0.attn"


@functools.cache
def _fixture_bytes(name: str) -> bytes:
    return FIXTURES[name](0).SerializeToString()


def _fixture(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_fixture_bytes(name))


@functools.cache
def _analysis(name: str) -> ChannelAnalysis:
    return analyze(_fixture(name))


def _permuted(name: str, seed: int) -> tuple[onnx.ModelProto, ChannelAnalysis, dict[str, np.ndarray], object]:
    model = _fixture(name)
    analysis = analyze(model)
    perms = draw_permutations(analysis, seed)
    key = permute_model(analysis, perms, seed=seed)
    return model, analysis, perms, key


def _verify(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> bool:
    report = verify_models(reference, candidate, provider="cpu", iterations=2)
    if report.equivalent:
        assert not report.degenerate_outputs
    return report.equivalent


def _move_query_heads(model: onnx.ModelProto, order: list[int], *, with_output: bool = True) -> None:
    """Reorder the query heads (q_proj's output columns by head, o_proj's input rows by head) by hand."""
    columns = np.concatenate([np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in order])
    holders = tensor_holders(model)
    targets = [(f"{ATTN}.q_proj.weight", 1), (f"{ATTN}.q_proj.bias", 0)]
    if with_output:
        targets.append((f"{ATTN}.o_proj.weight", 0))
    for name, axis in targets:
        values = numpy_helper.to_array(holders[name])
        holders[name].CopyFrom(numpy_helper.from_array(np.take(values, columns, axis=axis), name))


# -- the groups -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fixture_outputs_are_order_one(name: str) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(_fixture_bytes(name), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1.0, 1.0, (1, SEQ, WIDTH)).astype(np.float32)
    (out,) = session.run(None, {"input": x})
    assert np.all(np.isfinite(out)) and 0.05 < float(out.std()) < 20.0, out.std()


def test_one_key_value_head_leaves_the_query_heads_free() -> None:
    analysis = _analysis("mqa_attention")
    maps = index_maps(analysis, f"{ATTN}.q_proj.weight", 1)
    heads = [gid for gid, imap in maps.items() if imap == f"p (x) I_{HEAD_DIM}"]
    assert len(heads) == 1, maps
    group = analysis.group(heads[0])
    assert group.permutable and group.size == HEADS, group.reasons
    # The heads move o_proj's input blocks with them, and nothing of K or V (one head there).
    assert index_maps(analysis, f"{ATTN}.o_proj.weight", 0)[group.id] == f"p (x) I_{HEAD_DIM}"
    for proj in ("k_proj", "v_proj"):
        assert group.id not in index_maps(analysis, f"{ATTN}.{proj}.weight", 1)


def test_grouped_query_heads_move_with_their_key_value_head_and_inside_their_group() -> None:
    analysis = _analysis("gqa_attention")
    repeats = HEADS // KV_HEADS["gqa_attention"]
    maps = index_maps(analysis, f"{ATTN}.q_proj.weight", 1)
    by_map = {imap: gid for gid, imap in maps.items()}
    kv = analysis.group(by_map[f"p (x) {{q_g}}: 2 blocks of {repeats}, each its own order (x) I_{HEAD_DIM}"])
    # Each key/value head's query heads take their own order (round 16, F2): one group per KV head.
    inside = [
        analysis.group(by_map[f"block {k} of 2 ([{k * repeats}:{(k + 1) * repeats}] as the source holds it): p (x) I_{HEAD_DIM}"])
        for k in range(2)
    ]
    assert kv.permutable and kv.size == 2
    assert all(within.permutable and within.size == repeats for within in inside)
    # The key/value heads are the same group on K, V, Q and the output projection.
    for proj in ("k_proj", "v_proj"):
        assert index_maps(analysis, f"{ATTN}.{proj}.weight", 1)[kv.id] == f"p (x) I_{HEAD_DIM}"
    for within in inside:
        assert index_maps(analysis, f"{ATTN}.o_proj.weight", 0)[within.id] == maps[within.id]
        # The query heads inside a group touch neither K nor V.
        for proj in ("k_proj", "v_proj"):
            assert within.id not in index_maps(analysis, f"{ATTN}.{proj}.weight", 1)


# -- permute, verify, unpermute ---------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [1, 7])
def test_permuted_model_is_equivalent_and_unpermutes_byte_identically(name: str, seed: int) -> None:
    source = _fixture(name)
    model, analysis, perms, key = _permuted(name, seed)
    assert set(perms) == {g.id for g in analysis.permutable_groups}
    heads = next(gid for gid, imap in index_maps(analysis, f"{ATTN}.q_proj.weight", 1).items()
                 if imap.startswith(("p", "I_2 (x) p")))
    assert not np.array_equal(perms[heads], np.arange(len(perms[heads]))), "the query heads must move"
    assert constant_bytes(model) != constant_bytes(source)
    assert _verify(source, model)
    assert unpermute_model(model, key) is True  # type: ignore[arg-type]
    assert model.SerializeToString() == source.SerializeToString()


@pytest.mark.parametrize("name", NAMES)
def test_producer_rows_alone_are_caught(name: str) -> None:
    source = _fixture(name)
    model = copy_model(source)
    permute_producer_only(model, analyze(model))
    assert not _verify(source, model)


def test_query_head_moved_to_another_key_value_group_is_caught() -> None:
    source = _fixture("gqa_attention")
    repeats = HEADS // KV_HEADS["gqa_attention"]
    inside = list(range(HEADS))
    inside[0], inside[1] = 1, 0  # two heads of group 0: the control
    across = list(range(HEADS))
    across[0], across[repeats] = repeats, 0  # head 0 of group 0 <-> head 0 of group 1
    control = copy_model(source)
    _move_query_heads(control, inside)
    assert _verify(source, control), "the hand-made head move must itself keep the function"
    wrong = copy_model(source)
    _move_query_heads(wrong, across)
    assert not _verify(source, wrong), "a query head moved to another key/value head went unnoticed"


@pytest.mark.parametrize("name", NAMES)
def test_query_heads_moved_without_the_output_projection_are_caught(name: str) -> None:
    source = _fixture(name)
    order = list(range(HEADS))
    order[0], order[1] = 1, 0
    control = copy_model(source)
    _move_query_heads(control, order)
    assert _verify(source, control)
    wrong = copy_model(source)
    _move_query_heads(wrong, order, with_output=False)
    assert not _verify(source, wrong)


@pytest.mark.parametrize("name", NAMES)
def test_resync_recovers_every_permutation(name: str) -> None:
    reference = _fixture(name)
    suspect, _, _, key = _permuted(name, 3)
    result = resync_model(reference, suspect, true_key=key)  # type: ignore[arg-type]
    assert result.psi == pytest.approx(100.0)
    assert unpermute_model(suspect, result.key) is True
    assert constant_bytes(suspect) == constant_bytes(reference)


# -- the equal-slice facts ----------------------------------------------------------------------
def test_uniform_axes_follow_expand_reshape_and_transpose() -> None:
    graph = ModelGraph(_fixture("gqa_attention"))
    cache: dict[str, frozenset[int]] = {}
    assert uniform_axes(graph, f"{ATTN}.k_expand", cache) == {0, 2}    # [1, G, R, S, D]: R copies
    assert uniform_axes(graph, f"{ATTN}.k_repeat", cache) == {0}       # G and R merged: not all copies
    mqa = ModelGraph(_fixture("mqa_attention"))
    assert uniform_axes(mqa, f"{ATTN}.k_repeat", {}) == {0, 1}         # one head copied H times
    assert uniform_axes(mqa, f"{ATTN}.k_tt", {}) == {0, 1}             # through the Transpose
    assert uniform_axes(mqa, f"{ATTN}.scores", {}) == frozenset()      # a MatMul is never assumed


def _tiled_key_model() -> onnx.ModelProto:
    """GQA written with ``Tile`` on the head axis: heads ``[k0, k1, k0, k1]``, interleaved, not grouped."""
    b = GraphBuilder("tiled_kv", 0)
    x = b.matmul(b.input("input", (1, SEQ, WIDTH)), WIDTH, name="embed", gain=1.0)
    q = b.transpose(b.reshape(b.matmul(x, WIDTH, name="q_proj", gain=1.0), [1, SEQ, 4, 8], name="q_heads"),
                    [0, 2, 1, 3], name="q_t")
    k = b.transpose(b.reshape(b.matmul(x, 16, name="k_proj", gain=1.0), [1, SEQ, 2, 8], name="k_heads"),
                    [0, 2, 3, 1], name="k_t")
    k = b.tile(k, [1, 2, 1, 1], name="k_tile")                                        # [1, 4, 8, S]
    scores = b.softmax(b.matmul_tensors(q, k, name="scores"), -1, name="softmax")
    out = b.reshape(b.transpose(scores, [0, 2, 1, 3], name="scores_t"), [1, SEQ, 4 * SEQ], name="merge")
    return b.build(b.matmul(out, 10, name="logits", gain=1.0))


def test_tiled_copies_are_not_taken_for_equal_slices() -> None:
    """Tile repeats the key heads in turn (k0, k1, k0, k1): no axis holds equal slices.

    The query heads then only move as the tile allows; whatever is permuted keeps the function.
    """
    model = _tiled_key_model()
    graph = ModelGraph(model)
    assert uniform_axes(graph, "k_tile", {}) == frozenset()
    source = copy_model(model)
    analysis = analyze(model)
    perms = draw_permutations(analysis, 5)
    assert perms
    permute_model(analysis, perms)
    assert _verify(source, model)


# -- torch's legacy export with dynamic axes: the copies' count is computed ----------------------
def test_symbolic_expand_and_equal_read_torch_expand_sizes() -> None:
    from onnxlady._graph._fold import _symbolic_equal, symbolic_expand

    assert _symbolic_equal(("batch", 2, 4, "seq", 8), (-1,) * 5) == (0, 0, 0, 0, 0)
    assert _symbolic_equal(("batch", 2), ("batch", 3)) == (1, 0)
    assert _symbolic_equal(("batch",), ("seq",)) == (None,)  # two names may be the same size
    assert symbolic_expand(("batch", 2, 1, "seq", 8), ("batch", 2, 4, "seq", 8)) == ("batch", 2, 4, "seq", 8)
    assert symbolic_expand((1, 3), ("n", 1)) == ("n", 3)
    assert symbolic_expand(("a", 3), ("b", 3)) == (None, 3)  # a or b may be 1: not decided


def test_legacy_dynamic_repeat_kv_has_known_copies_and_moves_the_heads() -> None:
    from fixtures.grouped_attention import build_gqa_attention_dynamic

    source = build_gqa_attention_dynamic(0)
    assert ModelGraph(source).shape("k_expand") == ("batch", 2, HEADS // 2, "seq", HEAD_DIM)
    model = copy_model(source)
    analysis = analyze(model)
    maps = {imap: gid for gid, imap in index_maps(analysis, "q_proj.weight", 1).items()}
    repeats = HEADS // 2
    kv = analysis.group(maps[f"p (x) {{q_g}}: 2 blocks of {repeats}, each its own order (x) I_{HEAD_DIM}"])
    within = analysis.group(maps[f"block 1 of 2 ([{repeats}:{2 * repeats}] as the source holds it): p (x) I_{HEAD_DIM}"])
    assert kv.permutable and within.permutable, (kv.reasons, within.reasons)
    perms = draw_permutations(analysis, 4)
    key = permute_model(analysis, perms, seed=4)
    assert _verify(source, model)
    suspect = copy_model(model)
    result = resync_model(source, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()
    wrong = copy_model(source)
    order = list(range(HEADS))
    order[0], order[HEADS // 2] = HEADS // 2, 0  # a query head to the other key/value group
    columns = np.concatenate([np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in order])
    holders = tensor_holders(wrong)
    for name, axis in (("q_proj.weight", 1), ("q_proj.bias", 0), ("o_proj.weight", 0)):
        values = numpy_helper.to_array(holders[name])
        holders[name].CopyFrom(numpy_helper.from_array(np.take(values, columns, axis=axis), name))
    assert not _verify(source, wrong)
