"""Q, K and V weights packed by a ``Concat`` of their initializers (held-out round 12, F9).

onnxoptimizer's ``fuse_qkv`` (one of its default passes) writes an attention's three projections
as ``MatMul(x, Concat(Wq, Wk, Wv))`` and a ``Split``, the three initializers kept
(:mod:`fixtures.packed_attention` writes the same form without it). Before, the analysis froze
every Q, K and V group of that form ("axis 1 of '...' carries no channel permutation") and
resync across it refused "different models". Now the analysis binds each piece of the
concatenated weight at the Concat (a Concat along the walked axis cuts the group into one
group per piece), and resync pairs each piece with its projection in the unpacked graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.deployment import CONVERTERS, unavailable
from fixtures.packed_attention import build_encoder_packed_qkv, pack_qkv
from fixtures.transformer import build_encoder_prenorm
from onnxlady import analyze, unpermute_model
from onnxlady._audit._verdicts import audit_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._entry import resync_model
from onnxlady._resync._sites import find_sites
from onnxlady._transforms._perturb import perturb_model
from onnxlady._verify._compare import verify_models
from onnxlady.testing import constant_bytes, copy_model, index_maps, permute_copy, permute_producer_only

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _sizes(model: onnx.ModelProto) -> list[tuple[int, bool]]:
    return [(group.size, group.permutable) for group in analyze(model).groups]


def _bound_leaves(model: onnx.ModelProto) -> set[str]:
    """The constants a permutable group moves."""
    groups = analyze(model).groups
    return {member.tensor for group in groups if group.permutable for member in group.members if member.is_weight}


def _scaled(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    out = copy_model(model)
    for tensor in out.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(tensor) * factor).astype(np.float32), name))
    return out


def _resynced(reference: onnx.ModelProto, suspect: onnx.ModelProto, key: object) -> object:
    """Resync with Psi 100, the output computing what the suspect computes (which a wrong permutation does not)."""
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert verify_models(suspect, result.model, provider="cpu").equivalent
    wrong = copy_model(result.model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(suspect, wrong, provider="cpu").equivalent
    return result


# -- the packed model on its own (twin) -------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_the_packed_form_moves_the_groups_the_plain_form_moves(bias: bool) -> None:
    plain, packed = build_encoder_prenorm(0), build_encoder_packed_qkv(0, bias=bias)
    assert any(node.op_type == "Concat" for node in packed.graph.node)
    assert _sizes(packed) == _sizes(plain)  # Q/K heads and dims, V dims: permutable, as unpacked
    bound = _bound_leaves(packed)
    for block in (0, 1):
        for projection in PROJECTIONS:
            assert f"block{block}.attn.{projection}.weight" in bound
            assert f"block{block}.attn.{projection}.bias" in bound


@pytest.mark.parametrize("bias", [False, True])
def test_permute_verify_unpermute_resync_and_audit_the_packed_form(bias: bool) -> None:
    packed = build_encoder_packed_qkv(0, bias=bias)
    model, analysis, perms, key = permute_copy(packed, 5)
    for block in (0, 1):  # each piece's neurons (its axis 1) moved, where it is stored
        for projection in PROJECTIONS:
            moving = index_maps(analysis, f"block{block}.attn.{projection}.weight", 1)
            assert any(gid in perms and (perms[gid] != np.arange(perms[gid].size)).any() for gid in moving), moving
    assert verify_models(packed, model, provider="cpu").equivalent
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(packed, wrong, provider="cpu").equivalent
    restored = copy_model(model)
    unpermute_model(restored, key)
    assert constant_bytes(restored) == constant_bytes(packed)
    assert resync_model(packed, model, true_key=key).psi == pytest.approx(100.0)
    assert audit_models(packed, model).verdict == "permuted"


def test_a_packed_weight_read_elsewhere_freezes_its_groups() -> None:
    """A second reader of the concatenated weight would see it permuted unannounced: frozen, with the reason."""
    packed = build_encoder_packed_qkv(0)
    concat = next(node for node in packed.graph.node if node.op_type == "Concat")
    packed.graph.node.append(helper.make_node("ReduceSum", [concat.output[0]], ["weight_sum"], keepdims=0))
    packed.graph.output.append(helper.make_tensor_value_info("weight_sum", TensorProto.FLOAT, None))
    groups = analyze(packed).groups
    frozen = [group for group in groups if not group.permutable and group.size in (4, 8)]
    assert len(frozen) == 3 and all(group.reasons for group in frozen)  # block 0's Q/K heads, dims, V dims
    assert sum(group.permutable and group.size in (4, 8) for group in groups) == 3  # block 1's still move
    model, _, _, _ = permute_copy(packed, 5)
    assert verify_models(packed, model, provider="cpu").equivalent


def test_blocks_sliced_from_one_weight_and_concatenated_in_another_order() -> None:
    """``Concat(W[:, 4:], W[:, :4])``: each block keeps its own permutation through the Concat."""
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((8, 12)), "w2": rng.standard_normal((12, 6))}
    bounds = {"s0": [0], "e0": [4], "s1": [4], "e1": [12], "axis": [1]}
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    initializers += [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in bounds.items()]
    nodes = [
        helper.make_node("Slice", ["w", "s0", "e0", "axis"], ["a"]),
        helper.make_node("Slice", ["w", "s1", "e1", "axis"], ["b"]),
        helper.make_node("Concat", ["b", "a"], ["c"], axis=1),
        helper.make_node("MatMul", ["x", "c"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "sliced", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])], initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert sorted(group.size for group in analyze(model).groups if group.permutable) == [4, 8]
    permuted, _, _, _ = permute_copy(model, 3)
    assert verify_models(model, permuted, provider="cpu").equivalent
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent


# -- across: one model plain, the other packed ---------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_resync_a_packed_suspect_to_a_plain_reference(bias: bool) -> None:
    reference = build_encoder_prenorm(0)
    model, _, _, key = permute_copy(reference, 7)
    suspect = pack_qkv(model, bias=bias)
    result = _resynced(reference, suspect, key)
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in suspect.graph.node]
    # In the reference's order: the same constants as the reference packed.
    assert constant_bytes(result.model) == constant_bytes(pack_qkv(reference, bias=bias))
    restored = copy_model(suspect)
    unpermute_model(restored, result.key)
    assert constant_bytes(restored) == constant_bytes(result.model)
    fused = [c.detail for c in result.across.match.conversions if c.kind == "fused"]
    assert fused and ("Concat+MatMul+Add+Split" if bias else "Concat+MatMul+Split+Add") in fused[0]


def test_pieces_in_another_order_pair_by_content() -> None:
    """fuse_qkv packs the three MatMuls in the order their input's readers are listed: K may come first."""
    reference = build_encoder_prenorm(0)
    model, _, _, key = permute_copy(reference, 7)
    suspect = pack_qkv(model)
    for node in suspect.graph.node:  # K's weight and product first, then Q's (equal widths)
        names = node.input if node.op_type == "Concat" else node.output if node.op_type == "Split" else None
        if names is not None:
            swapped = [names[1], names[0], *names[2:]]
            del names[:]
            names.extend(swapped)
    assert verify_models(model, suspect, provider="cpu").equivalent
    _resynced(reference, suspect, key)
    assert audit_models(reference, suspect).verdict == "permuted"


@pytest.mark.parametrize("bias", [False, True])
def test_resync_a_plain_suspect_to_a_packed_reference(bias: bool) -> None:
    reference = build_encoder_prenorm(0)
    model, _, _, key = permute_copy(reference, 7)
    result = resync_model(pack_qkv(reference, bias=bias), model, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert constant_bytes(result.model) == constant_bytes(reference)


@pytest.mark.parametrize("bias", [False, True])
def test_audit_across_the_packed_form(bias: bool) -> None:
    reference = build_encoder_prenorm(0)
    model, _, _, _ = permute_copy(reference, 7)
    assert audit_models(reference, pack_qkv(reference, bias=bias)).verdict == "converted"
    assert audit_models(reference, pack_qkv(model, bias=bias)).verdict == "permuted"
    assert audit_models(pack_qkv(reference, bias=bias), model).verdict == "permuted"
    noisy = copy_model(model)
    perturb_model(noisy, noise=0.5, seed=3)
    report = audit_models(reference, pack_qkv(noisy, bias=bias))
    assert report.verdict == "perturbed" and report.exit_code == 1
    # One of the three pieces scaled (K: the scores change): not a conversion.
    tampered = _scaled(pack_qkv(reference, bias=bias), "block0.attn.k_proj.weight", 1.5)
    report = audit_models(reference, tampered)
    assert report.verdict not in ("identical", "permuted", "converted") and report.exit_code == 1


def test_a_split_that_cuts_across_the_pieces_is_no_site() -> None:
    """The parts must be the pieces: a product cut elsewhere mixes two pieces' neurons."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), f"w{i}") for i in range(2)]
    sizes = numpy_helper.from_array(np.array([2, 6], dtype=np.int64), "sizes")
    nodes = [
        helper.make_node("Concat", ["w0", "w1"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Split", ["y", "sizes"], ["a", "b"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "cut", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("a", "b")],
        [*weights, sizes],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert not [site for site in find_sites(ModelGraph(model), set()) if site.family == "dense"]
    aligned = copy_model(model)
    aligned.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([4, 4], dtype=np.int64), "sizes"))
    dense = [site for site in find_sites(ModelGraph(aligned), set()) if site.family == "dense"]
    assert [(site.operands[0].node, site.operands[0].slot) for site in dense] == [(0, 0), (0, 1)]


# -- the real tool ------------------------------------------------------------------------------
def _optimized() -> tuple[onnx.ModelProto, onnx.ModelProto, object, onnx.ModelProto]:
    reason = unavailable("onnxoptimizer")
    if reason is not None:
        pytest.skip(reason)
    reference = build_encoder_prenorm(0)
    model, _, _, key = permute_copy(reference, 7)
    return reference, model, key, CONVERTERS["onnxoptimizer"](model)


def test_onnxoptimizer_packs_the_weights_as_the_fixture_does() -> None:
    _, _, _, suspect = _optimized()
    producers = {name: node for node in suspect.graph.node for name in node.output}
    packed = [producers[node.input[1]] for node in suspect.graph.node
              if node.op_type == "MatMul" and node.input[1] in producers]  # fmt: skip
    assert [list(node.input) for node in packed if node.op_type == "Concat"] == [
        [f"block{block}.attn.{projection}.weight" for projection in PROJECTIONS] for block in (0, 1)
    ]
    assert sum(node.op_type == "Split" for node in suspect.graph.node) == 2


def test_resync_and_audit_through_onnxoptimizer() -> None:
    reference, model, key, suspect = _optimized()
    _resynced(reference, suspect, key)
    assert audit_models(reference, suspect).verdict == "permuted"
    converted = CONVERTERS["onnxoptimizer"](reference)
    assert audit_models(reference, converted).verdict == "converted"
    assert resync_model(converted, model, true_key=key).psi == pytest.approx(100.0)
