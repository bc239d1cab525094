"""Behaviour of the permutation rules, seen through ``analyze()`` and checked with ONNX Runtime.

- the rule registry (one rule per operator, real operator names);
- index maps of group members on the existing fixtures (Flatten, Concat, depthwise, residual,
  graph outputs, unruled and custom operators, shared constants);
- the fixtures added for the rules (grouped convs, Paddle biases, Split/Slice/Concat, digit
  reshapes, ``view(1, -1)``): expected groups, permute -> verify -> unpermute, and a wrong
  permutation that verification must catch;
- small inline models where a guess would be wrong (the group must freeze), and regression
  tests for analysis bugs found on the way.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES, RUNNABLE
from fixtures.models import CUSTOM_DOMAIN
from onnxlady import (
    ChannelAnalysis,
    ChannelGroup,
    GroupMember,
    OnnxladyError,
    analyze,
    draw_permutations,
    permute_model,
    unpermute_model,
    verify_models,
)
from onnxlady._graph._expr import STRUCTURE, DirectSum, Fixed, GroupSolver, Product
from onnxlady._io._tensors import tensor_holders
from onnxlady._rules import (
    DuplicateRuleError,
    OpRule,
    _registry,
    register,
    registered_operators,
    rule_for,
)
from onnxlady._transforms._permute import _permute_tensor
from onnxlady.testing import GraphBuilder, copy_model, permute_producer_only

NEW_FIXTURES = ("grouped_conv", "bias_reshape", "split_concat", "reshape_digits", "flatten_gemm_nchw")
PRODUCER_ROLES = {"conv weight", "conv-transpose weight", "gemm weight", "matmul weight"}
#: Non-default domains whose operators a rule may name (checked with ``onnx.defs.has``).
KNOWN_DOMAINS = ("ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training")


# -- helpers ------------------------------------------------------------------------------
@functools.cache
def _fixture_bytes(name: str) -> bytes:
    return FIXTURES[name](0).SerializeToString()


def _fixture(name: str) -> onnx.ModelProto:
    """A fresh, mutable copy of a fixture (built once per session)."""
    return onnx.load_from_string(_fixture_bytes(name))


def _constants(model: onnx.ModelProto) -> dict[str, bytes]:
    """Every constant tensor (initializers and Constant node values), serialised."""
    return {name: t.SerializeToString() for name, t in tensor_holders(model).items()}


def _members(analysis: ChannelAnalysis, tensor: str, axis: int | None = None,
             weight: bool | None = None) -> list[tuple[ChannelGroup, GroupMember]]:
    """(group, member) for every member naming ``tensor`` (on ``axis``), in group order."""
    found = []
    for group in analysis.groups:
        for member in group.members:
            if member.tensor != tensor or (axis is not None and member.axis != axis):
                continue
            if weight is not None and member.is_weight != weight:
                continue
            found.append((group, member))
    return found


def _group(analysis: ChannelAnalysis, tensor: str, axis: int, weight: bool | None = None) -> ChannelGroup:
    """The one group a space belongs to (fails if the space spans several groups or none)."""
    groups = {g.id: g for g, _ in _members(analysis, tensor, axis, weight)}
    assert len(groups) == 1, f"{tensor} axis {axis}: groups {sorted(groups)}"
    return next(iter(groups.values()))


def _index_map(analysis: ChannelAnalysis, group: ChannelGroup, tensor: str, axis: int) -> str:
    maps = [m.index_map for m in group.members if m.tensor == tensor and m.axis == axis]
    assert len(maps) == 1, f"{tensor} axis {axis} in {group.id}: {maps}"
    return maps[0]


def _permute_all(source: onnx.ModelProto, seed: int):
    model = copy_model(source)
    analysis = analyze(model)
    perms = draw_permutations(analysis, seed)
    key = permute_model(analysis, perms, seed=seed)
    return model, analysis, perms, key


def _producer_output_axis(node: onnx.NodeProto, slot: int) -> int | None:
    """The axis of a producer's weight that makes its output neurons (its "rows")."""
    if node.op_type == "Conv" and slot == 1:
        return 0
    if node.op_type == "ConvTranspose" and slot == 1:
        return 1
    if node.op_type == "Gemm" and slot == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1 if slot == 1 else 0
    return None


def _permute_one_producer_only(model: onnx.ModelProto, analysis: ChannelAnalysis, seed: int = 5) -> str:
    """Apply one group's permutation to ONE producer weight's rows and nothing else.

    That is what a tool that forgot the consumers (or the bias) would do: the result must not
    be equivalent. Returns a description of what was changed.
    """
    holders = tensor_holders(model)
    graph = analysis.graph
    for plan in analysis.tensors:
        if plan.copy or not PRODUCER_ROLES.intersection(plan.roles):
            continue
        node_index, slot = plan.uses[0]
        axis = _producer_output_axis(graph.nodes[node_index], slot)
        for plan_axis, expr in plan.axes:
            if plan_axis != axis:
                continue
            for gid in analysis.neuron_labels(expr):
                if analysis.group(gid).permutable:
                    perm = draw_permutations(analysis, seed, [gid])[gid]
                    idx = analysis.index_array(expr, {gid: perm})
                    assert not np.array_equal(idx, np.arange(idx.size))
                    _permute_tensor(holders[plan.tensor], [(axis, idx)])
                    return f"{plan.tensor} axis {axis} by {gid}"
    raise AssertionError("no producer weight with a permutable group")


def _model(nodes, inputs, outputs, initializers=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "inline", list(inputs), list(outputs),
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def _assert_permutations_are_safe(model: onnx.ModelProto, seed: int = 3, *, require: bool = True) -> None:
    """Every permutation the analysis allows keeps the model equivalent (``require``: and there is one)."""
    source = copy_model(model)
    permuted, _, perms, _ = _permute_all(source, seed)
    assert perms or not require, "nothing permutable: the check would prove nothing"
    report = verify_models(source, permuted, provider="cpu")
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]


@functools.cache
def _runtime_contrib_ops() -> frozenset[tuple[str, str]]:
    """(domain, op) of the contrib operators ONNX Runtime defines (com.microsoft...), if it says."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        return frozenset((schema.domain, schema.name) for schema in ort_c.get_all_operator_schema())
    except (ImportError, AttributeError):
        return frozenset()


# -- the registry -------------------------------------------------------------------------
def test_second_rule_for_an_operator_is_refused_and_leaves_the_registry_unchanged() -> None:
    before = registered_operators()
    conv_rule = rule_for("", "Conv")
    assert conv_rule is not None

    class ThrowawayConvRule(OpRule):
        op_types = ("Conv",)

    with pytest.raises(DuplicateRuleError, match="Conv"):
        register(ThrowawayConvRule)
    assert registered_operators() == before
    assert rule_for("", "Conv") is conv_rule
    assert rule_for("ai.onnx", "Conv") is conv_rule  # ai.onnx is the default domain


def test_same_op_name_in_another_domain_is_a_different_operator() -> None:
    before = registered_operators()
    domain = "com.example.onnxlady.test"

    class OtherDomainConvRule(OpRule):
        op_types = ("Conv",)
        domain = "com.example.onnxlady.test"

    try:
        register(OtherDomainConvRule)
        assert isinstance(rule_for(domain, "Conv"), OtherDomainConvRule)
        assert not isinstance(rule_for("", "Conv"), OtherDomainConvRule)
    finally:
        _registry._RULES.pop((domain, "Conv"), None)
    assert registered_operators() == before


def test_refused_rule_is_not_half_registered() -> None:
    before = registered_operators()

    class HalfClashRule(OpRule):
        op_types = ("OnnxladyThrowawayOp", "Conv")

    try:
        with pytest.raises(DuplicateRuleError):
            register(HalfClashRule)
        assert rule_for("", "OnnxladyThrowawayOp") is None
        assert registered_operators() == before
    finally:
        _registry._RULES.pop(("", "OnnxladyThrowawayOp"), None)


def test_rule_for_unknown_operators_is_none() -> None:
    assert rule_for("", "OnnxladyNoSuchOp") is None
    assert rule_for(CUSTOM_DOMAIN, "Mystery") is None
    # A custom domain's op is not the ai.onnx op of the same name.
    assert rule_for("", "Relu") is not None
    assert rule_for(CUSTOM_DOMAIN, "Relu") is None
    assert rule_for("com.microsoft", "Conv") is None


def test_every_registered_operator_is_a_real_onnx_operator() -> None:
    operators = registered_operators()
    assert len(operators) == len(set(operators))
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Concat", "Split", "Slice",
            "Reshape", "Flatten", "BatchNormalization", "LRN", "CumSum"} <= set(operators)
    unknown = []
    for operator in operators:
        if "::" in operator:
            domain, op_type = operator.split("::", 1)
            ok = domain in KNOWN_DOMAINS and (
                onnx.defs.has(op_type, domain) or (domain, op_type) in _runtime_contrib_ops()
            )
        else:  # ONNX, or ONNX Runtime's ONNX-domain contrib operators (SimplifiedLayerNormalization)
            ok = onnx.defs.has(operator) or ("", operator) in _runtime_contrib_ops()
        if not ok:
            unknown.append(operator)
    assert not unknown, f"rules for operators ONNX does not define: {unknown}"


# -- index maps on the existing fixtures ---------------------------------------------------
def test_vgg_flatten_gemm_is_channel_major() -> None:
    analysis = analyze(_fixture("vgg"))
    group = _group(analysis, "features.block3.conv.weight", 0)
    assert group.size == 32 and group.permutable
    # Flatten of [1, 32, 4, 4]: fc1 input index c * 16 + s.
    assert _index_map(analysis, group, "classifier.fc1.weight", 1) == "p (x) I_16"
    assert _index_map(analysis, group, "classifier.flatten", 1) == "p (x) I_16"
    assert _group(analysis, "classifier.fc1.weight", 1) is group


def test_concat_members_show_their_offsets() -> None:
    analysis = analyze(_fixture("concat"))
    expected = {
        "inception.branch1.conv.weight": "[0:8] of 28: p",
        "inception.branch2.conv.weight": "[8:20] of 28: p",
        "inception.branch3.conv.weight": "[20:28] of 28: p",
    }
    for producer, offsets in expected.items():
        group = _group(analysis, producer, 0)
        assert group.permutable
        assert _index_map(analysis, group, "inception.mix.weight", 1) == offsets
    dense = {"inception.mix.weight": "[0:28] of 40: p", "dense.conv.weight": "[28:40] of 40: p"}
    for producer, offsets in dense.items():
        group = _group(analysis, producer, 0)
        assert _index_map(analysis, group, "dense.transition.weight", 1) == offsets
    # The concat's consumer spans exactly the groups of its inputs.
    spanned = {g.id for g, _ in _members(analysis, "inception.mix.weight", 1)}
    assert spanned == {_group(analysis, p, 0).id for p in expected}


def test_depthwise_weight_rows_follow_the_conv_that_feeds_them() -> None:
    analysis = analyze(_fixture("mobilenet"))
    for block in ("block1", "block2"):
        group = _group(analysis, f"{block}.expand.weight", 0)
        assert group.permutable
        assert _group(analysis, f"{block}.depthwise.weight", 0) is group
        assert _index_map(analysis, group, f"{block}.depthwise.weight", 0) == "p"
        assert _group(analysis, f"{block}.depthwise_bn.scale", 0) is group


def test_residual_add_joins_both_producers() -> None:
    analysis = analyze(_fixture("resnet"))
    stem = _group(analysis, "stem.conv.weight", 0)
    assert _group(analysis, "layer1.conv2.conv.weight", 0) is stem
    assert _group(analysis, "layer1.conv1.conv.weight", 0) is not stem
    shortcut = _group(analysis, "layer2.shortcut.conv.weight", 0)
    assert _group(analysis, "layer2.conv2.conv.weight", 0) is shortcut
    assert stem.permutable and shortcut.permutable


def test_last_producer_is_frozen_by_the_graph_output() -> None:
    analysis = analyze(_fixture("vgg"))
    group = _group(analysis, "logits", 1, weight=False)
    assert group.frozen and not group.permutable
    assert [r.kind for r in group.reasons] == ["graph-output"]
    assert "logits" in group.reasons[0].message
    # A frozen group's weights are not permuted, so they are not listed as members.
    assert not _members(analysis, "logits.weight", 1)
    with pytest.raises(OnnxladyError, match="cannot be permuted"):
        draw_permutations(analysis, 0, [group.id])


def test_unruled_ai_onnx_operators_freeze_with_their_name() -> None:
    analysis = analyze(_fixture("unruled_op"))
    lrn = _group(analysis, "conv1", 1, weight=False)
    assert lrn.frozen
    assert any(r.kind == "blocking" and "LRN" in r.message for r in lrn.reasons), lrn.reasons
    cumsum = _group(analysis, "conv2", 1, weight=False)
    assert cumsum.frozen
    assert any(r.kind == "blocking" and "CumSum" in r.message for r in cumsum.reasons), cumsum.reasons
    assert _group(analysis, "conv3.weight", 0).permutable  # downstream of both: still free


def test_custom_domain_operator_freezes_with_its_name() -> None:
    analysis = analyze(_fixture("custom_op"))
    group = _group(analysis, "conv1", 1, weight=False)
    assert group.frozen
    assert any(r.kind == "no-rule" and f"{CUSTOM_DOMAIN}::Mystery" in r.message for r in group.reasons)
    assert group.id not in draw_permutations(analysis, 0)


def test_a_shared_zero_bias_needs_no_copy() -> None:
    """Three unrelated convs share one zero bias: permuting it is a no-op, so nothing is untied
    and their groups stay apart (issue 12: untie only where uses cannot agree)."""
    source = _fixture("shared_initializer")
    model = copy_model(source)
    analysis = analyze(model)
    assert analysis.untied == [] and analysis.untie_reasons == []
    assert len({_group(analysis, f"conv{k}.weight", 0).id for k in (1, 2)}) == 2
    key = permute_model(analysis, draw_permutations(analysis, 4), seed=4)
    assert key.untied == [] and len(model.graph.initializer) == len(source.graph.initializer)
    assert verify_models(source, model, provider="cpu").equivalent
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()


def test_a_constant_whose_uses_disagree_is_untied_and_retied() -> None:
    """A bias read by a layer whose neurons move and by one whose neurons are the output."""
    from fixtures.deployment import build_shared_bias_untied

    source = build_shared_bias_untied(0)
    model = copy_model(source)
    analysis = analyze(model)
    (untied,) = analysis.untied
    assert untied.source == "shared.bias" and untied.tensor.startswith("shared.bias.")
    (reason,) = analysis.untie_reasons
    assert "'shared.bias' untied into 1 copy" in reason and "head: keeps its order" in reason
    key = permute_model(analysis, draw_permutations(analysis, 4), seed=4)
    assert [record["copy"] for record in key.untied] == [untied.tensor]
    readers = {n.name: n.input[2] for n in model.graph.node if n.op_type == "Conv"}
    assert (readers["conv1"], readers["head"]) == (untied.tensor, "shared.bias")
    assert verify_models(source, model, provider="cpu").equivalent
    assert unpermute_model(model, key) is True
    assert untied.tensor not in {t.name for t in model.graph.initializer}
    assert model.SerializeToString() == source.SerializeToString()


def test_shared_layers_take_one_permutation_and_no_copy() -> None:
    """ALBERT-style layers applying one block's weights three times: their groups are joined,
    the permuted model is the same structure (no copies), and it computes the same."""
    from fixtures.deployment import build_shared_layers

    source = build_shared_layers(0)
    model = copy_model(source)
    analysis = analyze(model)
    assert analysis.untied == [] and analysis.permutable_groups
    hidden = _group(analysis, "block.fc1.weight", 1)
    assert hidden.permutable and hidden.size == 64
    key = permute_model(analysis, draw_permutations(analysis, 3), seed=3)
    assert sorted(t.name for t in model.graph.initializer) == sorted(t.name for t in source.graph.initializer)
    assert verify_models(source, model, provider="cpu").equivalent
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong, provider="cpu").equivalent
    assert unpermute_model(model, key) is True and model.SerializeToString() == source.SerializeToString()


# -- the new fixtures: permute, verify, catch a wrong permutation, unpermute ----------------
@pytest.mark.parametrize("name", NEW_FIXTURES)
def test_new_fixture_round_trip(name: str) -> None:
    assert name in FIXTURES and name in RUNNABLE
    source = _fixture(name)
    model, analysis, perms, key = _permute_all(source, seed=11)
    assert perms and set(perms) == {g.id for g in analysis.permutable_groups}
    assert _constants(model) != _constants(source)
    report = verify_models(source, model, provider="cpu")
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs
    assert unpermute_model(model, key) is True
    assert _constants(model) == _constants(source)
    assert model.SerializeToString() == source.SerializeToString()


@pytest.mark.parametrize("name", NEW_FIXTURES)
def test_new_fixture_wrong_permutation_is_caught(name: str) -> None:
    source = _fixture(name)
    model = copy_model(source)
    analysis = analyze(model)
    changed = _permute_one_producer_only(model, analysis)
    report = verify_models(source, model, provider="cpu")
    assert not report.equivalent, f"permuting only {changed} went unnoticed"


def test_grouped_conv_groups() -> None:
    analysis = analyze(_fixture("grouped_conv"))
    # conv1 feeds a group-4 conv: only "the same permutation inside every group of 4".
    conv1 = _group(analysis, "conv1.weight", 0)
    assert conv1.permutable and conv1.size == 4
    assert _index_map(analysis, conv1, "conv1.weight", 0) == "I_4 (x) p"
    assert _index_map(analysis, conv1, "group4.weight", 1) == "p"
    # group2's two output groups of 16 carry on through the depthwise conv (multiplier 2), whose
    # two outputs per input channel take their own order, channel by channel.
    halves = [g for g, _ in _members(analysis, "group2.weight", 0)]
    assert [g.size for g in halves] == [16, 16] and all(g.permutable for g in halves)
    in_block = "16 blocks of 2, each its own order"
    for group, (lo, hi) in zip(halves, ((0, 16), (16, 32))):
        assert _index_map(analysis, group, "group2.weight", 0) == f"[{lo}:{hi}] of 32: p"
        assert _index_map(analysis, group, "depthwise.weight", 0) == f"[{2 * lo}:{2 * hi}] of 64: p (x) {{q_g}}: {in_block}"
        assert _index_map(analysis, group, "logits.weight", 1) == f"[{2 * lo}:{2 * hi}] of 64: p (x) {{q_g}}: {in_block}"
    pairs = [g for g, _ in _members(analysis, "depthwise.weight", 0) if g.size == 2]
    assert len(pairs) == 32 and all(g.permutable for g in pairs)
    # group4's inputs per output group: the same permutation inside each half of 8 inputs.
    inner = [g for g, _ in _members(analysis, "group2.weight", 1)]
    assert all(g.size == 4 for g in inner)


def test_grouped_conv_feeding_grouped_conv_stays_permutable() -> None:
    analysis = analyze(_fixture("grouped_conv"))
    blocks = [g for g, _ in _members(analysis, "relu2", 1, weight=False)]
    assert blocks and all(g.permutable for g in blocks), [(g.id, g.reasons) for g in blocks]


def test_solver_aligns_blocks_with_repeated_block_sums() -> None:
    solver = GroupSolver()
    a, b, c, d = (solver.new_atom(4) for _ in range(4))
    q = solver.new_atom(8)
    solver.unify(DirectSum((a, b, c, d)), Product(Fixed(2, STRUCTURE), q))
    assert not any(solver.is_frozen(x.id) for x in (a, b, c, d, q))
    assert solver.find(a.id) == solver.find(c.id) and solver.find(b.id) == solver.find(d.id)
    assert solver.find(a.id) != solver.find(b.id)


def test_bias_reshape_groups() -> None:
    model = _fixture("bias_reshape")
    constant_nodes = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    initializers = {t.name for t in model.graph.initializer}
    analysis = analyze(model)
    expected = {"conv1": 16, "conv2": 24, "conv3": 32}
    for conv, size in expected.items():
        group = _group(analysis, f"{conv}.conv.weight", 0)
        assert group.permutable and group.size == size
        # The bias leaf itself (before its Reshape/Unsqueeze) is permuted with the conv rows.
        assert _group(analysis, f"{conv}.bias", 0, weight=True) is group
        assert _index_map(analysis, group, f"{conv}.bias", 0) == "p"
    assert {"conv1.bias", "conv3.bias"} <= constant_nodes and "conv2.bias" in initializers
    # Scalars broadcast: never members, never permuted.
    for scalar in ("affine.scale", "affine.shift", "hardswish.add.three", "hardswish.div.six",
                   "hardswish.clip.min", "hardswish.clip.max"):
        assert not _members(analysis, scalar), scalar
    # Scale/shift and the decomposed HardSwish keep conv2's group.
    group = _group(analysis, "conv2.conv.weight", 0)
    for activation in ("affine.mul", "affine.add", "hardswish.mul", "hardswish.div"):
        assert _group(analysis, activation, 1, weight=False) is group
    assert _group(analysis, "conv3.conv.weight", 1) is group


def test_split_concat_groups() -> None:
    analysis = analyze(_fixture("split_concat"))
    cv1 = [g for g, _ in _members(analysis, "c2f.cv1.weight", 0)]
    assert [g.size for g in cv1] == [8, 8] and all(g.permutable for g in cv1)
    first, second = cv1
    assert _index_map(analysis, first, "c2f.cv1.weight", 0) == "[0:8] of 16: p"
    assert _index_map(analysis, second, "c2f.cv1.weight", 0) == "[8:16] of 16: p"
    # Concat(first, second, second + m(second)): the residual puts m.cv2 in the second half's group.
    assert _index_map(analysis, first, "c2f.cv2.weight", 1) == "[0:8] of 24: p"
    assert _index_map(analysis, second, "c2f.cv2.weight", 1) == "[8:16] of 24: p; [16:24] of 24: p"
    assert _group(analysis, "c2f.m.cv2.weight", 0) is second
    assert _group(analysis, "c2f.m.cv1.weight", 1) is second
    # Slice [4:12] of cv2's 16 outputs cuts them into three blocks.
    cv2 = [g for g, _ in _members(analysis, "c2f.cv2.weight", 0)]
    maps = sorted(_index_map(analysis, g, "c2f.cv2.weight", 0) for g in cv2)
    assert maps == ["[0:4] of 16: p", "[12:16] of 16: p", "[4:12] of 16: p"]
    middle = _group(analysis, "slices.middle_conv.weight", 1)
    assert _index_map(analysis, middle, "c2f.cv2.weight", 0) == "[4:12] of 16: p"
    assert _index_map(analysis, middle, "slices.middle_conv.weight", 1) == "p"
    # The no-op Slice [0:INT64_MAX] passes the whole space through.
    whole = {g.id for g, _ in _members(analysis, "slices.whole_conv.weight", 1)}
    assert whole == {g.id for g in cv2}
    # Both slice branches meet in an Add.
    assert _group(analysis, "slices.middle_conv.weight", 0) is _group(analysis, "slices.whole_conv.weight", 0)
    assert all(g.permutable for g in analysis.groups if g.id != _group(analysis, "logits", 1).id)


def test_reshape_digits_groups() -> None:
    analysis = analyze(_fixture("reshape_digits"))
    group = _group(analysis, "fc1.weight", 1)
    assert group.permutable and group.size == 32
    assert _group(analysis, "fc1.bias", 0) is group
    # [1, 8, 32] -> [1, 256]: index token * 32 + feature.
    assert _index_map(analysis, group, "merged.reshape", 1) == "I_8 (x) p"
    assert _index_map(analysis, group, "merged.fc.weight", 0) == "I_8 (x) p"
    # [1, 8, 32] -> [1, 2, 128]: index (token % 4) * 32 + feature.
    assert _index_map(analysis, group, "regrouped.reshape", 2) == "I_4 (x) p"
    assert _index_map(analysis, group, "regrouped.fc.weight", 0) == "I_4 (x) p"
    for output in ("merged.fc", "regrouped.fc"):
        frozen = [g for g, _ in _members(analysis, output, weight=False)]
        assert frozen and all(g.frozen for g in frozen)


def test_flatten_gemm_nchw_groups() -> None:
    analysis = analyze(_fixture("flatten_gemm_nchw"))
    group = _group(analysis, "conv2.weight", 0)
    assert group.permutable and group.size == 8
    # view(1, -1) of [1, 8, 8, 8]: fc1 input index c * 64 + s.
    assert _index_map(analysis, group, "view", 1) == "p (x) I_64"
    assert _index_map(analysis, group, "fc1.weight", 1) == "p (x) I_64"
    assert _group(analysis, "fc1.weight", 0).size == 32


# -- inline models where a guess would be wrong --------------------------------------------
@pytest.mark.parametrize("op_type", ["Mystery", "Relu"])
def test_output_read_by_an_unknown_operator_is_never_permuted(op_type: str) -> None:
    """conv1's output feeds a conv (which has a rule) and a custom-domain op (which has none).

    Permuting conv1 and conv2's columns would look fine from the conv side, but nobody knows
    what the custom op does with channel order: the group must freeze, naming the operator,
    even when the op carries the name of an ai.onnx op whose rule would allow it.
    """
    b = GraphBuilder("guess", 0)
    x = b.input("input", (1, 3, 8, 8))
    x = b.relu(b.conv(x, 8, 3, name="conv1"), name="relu1")
    side = b.custom(op_type, CUSTOM_DOMAIN, [x], b.shape(x), name="custom")
    main = b.relu(b.conv(x, 8, 3, name="conv2"), name="relu2")
    main = b.conv(main, 4, 1, name="conv3")
    model = b.build([main, side])
    analysis = analyze(model)
    group = _group(analysis, "relu1", 1, weight=False)
    assert group.frozen and not group.permutable
    assert any(r.kind == "no-rule" and f"{CUSTOM_DOMAIN}::{op_type}" in r.message for r in group.reasons)
    assert not _members(analysis, "conv1.weight", 0)  # its rows are not touched
    assert not _members(analysis, "conv2.weight", 1)  # nor the other consumer's columns
    assert group.id not in draw_permutations(analysis, 0)
    assert _group(analysis, "conv2.weight", 0).permutable  # conv2's own outputs are free


def test_constant_read_by_an_unknown_operator_keeps_its_original() -> None:
    """A bias also read by a custom op: that use keeps the untouched original, the conv a copy."""
    b = GraphBuilder("guess_constant", 0)
    x = b.input("input", (1, 3, 8, 8))
    bias = b.param("shared_bias", b.small_normal((8,)))
    x = b.relu(b.conv(x, 8, 3, bias=bias, name="conv1"), name="relu1")
    side = b.custom("Mystery", CUSTOM_DOMAIN, [bias], (8,), name="custom")
    x = b.conv(x, 4, 1, name="conv2")
    model = b.build([x, side])
    original = numpy_helper.to_array(tensor_holders(model)["shared_bias"]).copy()
    analysis = analyze(model)
    assert _group(analysis, "conv1.weight", 0).permutable
    (copy,) = analysis.untied
    assert copy.source == "shared_bias"
    permute_model(analysis, draw_permutations(analysis, 2))
    holders = tensor_holders(model)
    custom = next(n for n in model.graph.node if n.op_type == "Mystery")
    assert list(custom.input) == ["shared_bias"]
    np.testing.assert_array_equal(numpy_helper.to_array(holders["shared_bias"]), original)
    assert not np.array_equal(numpy_helper.to_array(holders[copy.tensor]), original)


# -- bugs: analysis that allows a permutation the model does not survive --------------------
def test_batchnorm_over_tokens_keeps_the_feature_permutation() -> None:
    """BatchNorm1d applied to a [B, S, C] tensor: its channels are the tokens, features pass through."""
    b = GraphBuilder("bn_tokens", 0)
    x = b.input("input", (1, 8, 16))
    x = b.matmul(x, 32, name="fc1")                      # features on axis 2
    x = b.relu(b.batchnorm(x, name="bn"), name="relu")   # BN parameters along axis 1 (8 tokens)
    _assert_permutations_are_safe(b.build(b.matmul(x, 10, name="output", gain=1.0)))


def test_flatten_with_negative_axis() -> None:
    b = GraphBuilder("flatten_negative", 0)
    x = b.input("input", (1, 8, 16))
    x = b.relu(b.matmul(x, 32, name="fc1"), name="relu")
    x = b.flatten(x, axis=-1, name="flatten")            # [8, 32]: features stay on the last axis
    x = b.matmul(x, 10, bias=False, name="fc2", gain=1.0)
    _assert_permutations_are_safe(b.build(b.reduce_mean(x, [0], keepdims=False, name="output")))


def test_bias_in_a_value_floats_constant() -> None:
    """Permuting must not crash; freezing the group or permuting the list are both fine."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((16, 32)) * 0.35).astype(np.float32), "fc1.weight"),
        numpy_helper.from_array((rng.standard_normal((32, 10)) * 0.25).astype(np.float32), "fc2.weight"),
    ]
    model = _model(
        [
            helper.make_node("MatMul", ["input", "fc1.weight"], ["fc1.matmul"], name="fc1.matmul"),
            helper.make_node("Constant", [], ["fc1.bias"], name="fc1.bias",
                             value_floats=(rng.standard_normal(32) * 0.1).tolist()),
            helper.make_node("Add", ["fc1.matmul", "fc1.bias"], ["fc1"], name="fc1"),
            helper.make_node("Relu", ["fc1"], ["relu"], name="relu"),
            helper.make_node("MatMul", ["relu", "fc2.weight"], ["output"], name="fc2"),
        ],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 10])],
        weights,
    )
    _assert_permutations_are_safe(model, require=False)


def test_constant_varying_along_a_broadcast_axis_starts_a_group() -> None:
    """LayerNorm over channels, exported as x - mean times (inverse std * gamma): gamma meets a
    tensor of size 1 on the channel axis and must follow the channels it is multiplied into.
    """
    from onnxlady.testing import copy_model, permute_producer_only

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w2")
    gamma = numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32), "gamma")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c1", "axes"], ["mean"]),
        helper.make_node("Sub", ["c1", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["square"]),
        helper.make_node("ReduceMean", ["square", "axes"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", ["inv", "gamma"], ["scale"]),
        helper.make_node("Mul", ["centred", "scale"], ["normed"]),
        helper.make_node("Conv", ["normed", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "ln_channels", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w1, w2, gamma, axes],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    analysis = analyze(model)
    (group,) = [g for g in analysis.groups if ("gamma", 1) in {(m.tensor, m.axis) for m in g.members}]
    assert group.permutable and ("w1", 0) in {(m.tensor, m.axis) for m in group.members}
    permuted = copy_model(model)
    permuted_analysis = analyze(permuted)
    permute_model(permuted_analysis, draw_permutations(permuted_analysis, 1))
    assert verify_models(model, permuted, provider="cpu").equivalent
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent


def test_matmul_with_the_weight_on_the_left() -> None:
    """Y = W1 @ X then Y2 = W2 @ relu(Y): W1's rows and W2's columns take one permutation."""
    from onnxlady.testing import copy_model, permute_producer_only

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((12, 6)) / np.sqrt(6)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((5, 12)) / np.sqrt(6)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["w1", "x"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["w2", "r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "left_weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 7])], [w1, w2],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    analysis = analyze(model)
    (hidden,) = [g for g in analysis.groups if ("w1", 0) in {(m.tensor, m.axis) for m in g.members}]
    assert hidden.permutable and ("w2", 1) in {(m.tensor, m.axis) for m in hidden.members}
    permuted = copy_model(model)
    permuted_analysis = analyze(permuted)
    permute_model(permuted_analysis, draw_permutations(permuted_analysis, 2))
    assert verify_models(model, permuted, provider="cpu").equivalent
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent
