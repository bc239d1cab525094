"""Models whose layers sit in ONNX local functions: analysed through an inlined view, written as they are.

torch's ``export_modules_as_functions`` (and the dynamo exporter, and several optimisers) put
layers into ``model.functions``; the main graph calls them. Checked here, on the fixtures of
``fixtures/local_functions.py`` (``Block`` calling ``Mlp``, weights as call inputs):

- inspect finds the same groups and permutable share as on the inlined form;
- permute -> verify EQUIVALENT (ORT runs local functions) and a wrong permutation is caught;
  the output keeps its functions and call nodes; unpermute gives the source byte for byte;
- a Constant inside a function body, shared by the call sites, freezes the groups that would
  have to rewrite it (with that reason), never permuted on a guess;
- a function whose body holds an operator with no rule freezes what it touches;
- audit of the untouched inlined model is ``converted``, of a permuted then inlined copy
  ``permuted``; resync between the two forms gives the reference back.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import pytest
from onnx import helper

import onnxlady
from fixtures.local_functions import FIXTURES
from onnxlady import ChannelAnalysis, analyze, draw_permutations, permute_model, unpermute_model, verify_models
from onnxlady._graph._functions import calls_local_functions, inlined_view
from onnxlady.testing import constant_bytes, copy_model, permute_producer_only

NAMES = sorted(FIXTURES)


@functools.cache
def _fixture_bytes(name: str) -> bytes:
    return FIXTURES[name](0).SerializeToString()


def _fixture(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_fixture_bytes(name))


def _inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.inliner.inline_local_functions(model)


@functools.cache
def _analysis(name: str) -> ChannelAnalysis:
    return analyze(_fixture(name))


def _verify(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> bool:
    report = verify_models(reference, candidate, provider="cpu", iterations=2)
    if report.equivalent:
        assert not report.degenerate_outputs
    return report.equivalent


def _calls(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node if node.domain == "local"]


# -- the groups -------------------------------------------------------------------------------
def test_fixtures_call_their_functions() -> None:
    for name in NAMES:
        model = _fixture(name)
        assert calls_local_functions(model)
        assert _calls(model) == ["Block", "Block"]
        assert {f.name for f in model.functions} == {"Block", "Mlp"}
        assert not calls_local_functions(_inlined(model))
        assert inlined_view(_inlined(model)) is None


def test_permutable_share_equals_the_inlined_forms() -> None:
    analysis = _analysis("local_functions")
    inlined = analyze(_inlined(_fixture("local_functions")))
    summary, expected = analysis.summary(), inlined.summary()
    assert summary["permutable_fraction"] == expected["permutable_fraction"]
    assert float(summary["permutable_fraction"]) > 0.9  # type: ignore[arg-type]
    assert [(g.size, g.permutable) for g in analysis.groups] == [(g.size, g.permutable) for g in inlined.groups]
    assert [(g.size, g.permutable) for g in analysis.groups] == [(32, True), (64, True), (64, True), (10, False)]
    # Only the original's own tensors are planned: the outer initializers the calls read.
    original = {tensor.name for tensor in _fixture("local_functions").graph.initializer}
    assert {plan.tensor for plan in analysis.tensors} <= original


def test_analysis_does_not_change_the_model() -> None:
    model = _fixture("local_functions")
    before = model.SerializeToString()
    analysis = analyze(model)
    assert model.SerializeToString() == before
    assert analysis.model is model and analysis.graph.model is not model


def test_constant_inside_a_function_freezes_its_groups() -> None:
    analysis = _analysis("local_functions_const")
    by_size = [(g.size, g.permutable) for g in analysis.groups]
    assert by_size == [(32, True), (48, False), (48, False), (10, False)]
    for group in analysis.groups[1:3]:
        reasons = [str(reason) for reason in group.reasons]
        assert any("inside local function local::Mlp, shared by its call sites" in r for r in reasons), reasons
    # Inlined, each call has its own copy of the constant: the hidden neurons move there.
    inlined = analyze(_inlined(_fixture("local_functions_const")))
    assert [(g.size, g.permutable) for g in inlined.groups] == [(32, True), (48, True), (48, True), (10, False)]


def test_function_body_without_rule_freezes() -> None:
    model = _fixture("local_functions")
    mlp = next(f for f in model.functions if f.name == "Mlp")
    for node in mlp.node:  # the GELU's Erf becomes an operator no rule knows
        if node.op_type == "Erf":
            node.op_type, node.domain = "Mystery", "com.example"
    mlp.opset_import.append(helper.make_opsetid("com.example", 1))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    analysis = analyze(model)
    hidden = [g for g in analysis.groups if g.size == 64]
    assert hidden and all(not g.permutable for g in hidden)
    assert all(any("Mystery" in str(r) for r in g.reasons) for g in hidden)


def test_two_calls_sharing_a_weight_move_together() -> None:
    model = _fixture("local_functions")
    second = [node for node in model.graph.node if node.op_type == "Block"][1]
    second.input[4] = "blocks.0.fc1.bias"  # both calls read one fc1 bias: one permutation for both
    reference = copy_model(model)
    analysis = analyze(model)
    hidden = [g for g in analysis.groups if g.size == 64]
    assert len(hidden) == 1 and hidden[0].permutable
    permute_model(analysis, draw_permutations(analysis, 3))
    assert _verify(reference, model)


def test_a_copy_a_call_would_need_freezes() -> None:
    """A constant read by a call and by a use that must keep it: the call's copy would be a guess."""
    model = _fixture("local_functions")
    model.graph.input.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, [1, 8, 32]))
    model.graph.node.append(helper.make_node("Add", ["side", "blocks.0.fc2.bias"], ["side_out"], name="/side/Add"))
    model.graph.output.append(helper.make_tensor_value_info("side_out", onnx.TensorProto.FLOAT, [1, 8, 32]))
    analysis = analyze(model)
    assert all(plan.copy == 0 for plan in analysis.tensors)
    residual = analysis.groups[0]
    assert residual.size == 32 and not residual.permutable
    assert any("rewire a local function's call" in str(r) for r in residual.reasons), residual.reasons
    # Inlined, the copy lives in the main graph like any other: the residual stream moves.
    inlined = analyze(_inlined(model))
    assert inlined.groups[0].size == 32 and inlined.groups[0].permutable
    assert any(plan.copy > 0 for plan in inlined.tensors)


# -- permute, verify, unpermute --------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_permute_is_equivalent_and_keeps_functions(name: str, seed: int) -> None:
    reference = _fixture(name)
    model = _fixture(name)
    analysis = analyze(model)
    perms = draw_permutations(analysis, seed)
    assert perms
    key = permute_model(analysis, perms, seed=seed)
    assert _calls(model) == ["Block", "Block"]
    assert [f.SerializeToString() for f in model.functions] == [f.SerializeToString() for f in reference.functions]
    assert constant_bytes(model) != constant_bytes(reference)
    assert _verify(reference, model)
    # ORT BASIC inlines the functions: the permuted model inlined is equivalent too.
    assert _verify(reference, _inlined(model))
    assert unpermute_model(model, key)
    assert model.SerializeToString() == reference.SerializeToString()


@pytest.mark.parametrize("name", NAMES)
def test_wrong_permutation_is_caught(name: str) -> None:
    reference = _fixture(name)
    wrong = copy_model(reference)
    changed = permute_producer_only(wrong, _analysis(name))
    assert changed in {tensor.name for tensor in reference.graph.initializer}
    assert not _verify(reference, wrong)


def test_files_through_the_public_api(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(_fixture("local_functions"), source)
    permuted = tmp_path / "permuted.onnx"
    result = onnxlady.permute(source, output=permuted, seed=4, verify=True)
    assert result.verify is not None and result.verify.exit_code == 0
    written = onnx.load(permuted)
    assert _calls(written) == ["Block", "Block"] and len(written.functions) == 2
    restored = tmp_path / "restored.onnx"
    assert result.key_path is not None
    undone = onnxlady.unpermute(permuted, result.key_path, output=restored)
    assert undone.weights_identical_to_source
    assert restored.read_bytes() == source.read_bytes()
    inspected = onnxlady.inspect(source)
    assert inspected.analysis.summary()["permutable_groups"] == 3


# -- audit and resync between a function model and its inlined form -----------------------------
def test_audit_inlined_untouched_is_converted(tmp_path: Path) -> None:
    reference, inlined = tmp_path / "ref.onnx", tmp_path / "inlined.onnx"
    onnx.save(_fixture("local_functions"), reference)
    onnx.save(_inlined(_fixture("local_functions")), inlined)
    assert onnxlady.audit(reference, inlined).report.verdict == "converted"
    assert onnxlady.audit(inlined, reference).report.verdict == "converted"
    assert onnxlady.audit(reference, reference).report.verdict == "identical"


def test_audit_permuted_then_inlined_is_permuted(tmp_path: Path) -> None:
    reference, permuted, inlined = tmp_path / "ref.onnx", tmp_path / "permuted.onnx", tmp_path / "inlined.onnx"
    onnx.save(_fixture("local_functions"), reference)
    onnxlady.permute(reference, output=permuted, seed=2)
    onnx.save(_inlined(onnx.load(permuted)), inlined)
    assert onnxlady.audit(reference, permuted).report.verdict == "permuted"
    assert onnxlady.audit(reference, inlined).report.verdict == "permuted"


def test_audit_catches_a_weight_changed_inside_the_calls(tmp_path: Path) -> None:
    reference, suspect = tmp_path / "ref.onnx", tmp_path / "suspect.onnx"
    onnx.save(_fixture("local_functions"), reference)
    changed = _fixture("local_functions")
    weight = next(t for t in changed.graph.initializer if t.name == "blocks.1.fc1.weight")
    values = onnx.numpy_helper.to_array(weight).copy()
    values[:, :8] = np.random.default_rng(5).standard_normal((values.shape[0], 8)).astype(np.float32)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(changed, suspect)
    assert onnxlady.audit(reference, suspect).report.verdict not in ("identical", "permuted", "converted")


def test_resync_across_the_two_forms(tmp_path: Path) -> None:
    reference, permuted, inlined = tmp_path / "ref.onnx", tmp_path / "permuted.onnx", tmp_path / "inlined.onnx"
    onnx.save(_fixture("local_functions"), reference)
    onnxlady.permute(reference, output=permuted, seed=6)
    onnx.save(_inlined(_fixture("local_functions")), inlined)
    back = tmp_path / "back.onnx"
    onnxlady.resync(reference, permuted, output=back)
    assert back.read_bytes() == reference.read_bytes()
    # The inlined form as reference: the permuted function model is put back in its order.
    again = tmp_path / "again.onnx"
    onnxlady.resync(inlined, permuted, output=again)
    restored = onnx.load(again)
    assert len(restored.functions) == 2
    assert constant_bytes(restored) == constant_bytes(_fixture("local_functions"))


def test_perturb_reaches_the_weights_the_calls_read(tmp_path: Path) -> None:
    source, noisy = tmp_path / "model.onnx", tmp_path / "noisy.onnx"
    reference = _fixture("local_functions")
    onnx.save(reference, source)
    onnxlady.perturb(source, output=noisy, noise=0.01, seed=1)
    written = onnx.load(noisy)
    assert _calls(written) == ["Block", "Block"] and len(written.functions) == 2
    before, after = constant_bytes(reference), constant_bytes(written)
    changed = {name for name in before if before[name] != after[name]}
    # embed, both calls' fc1 and fc2, head: the MatMul weights, inside the functions too.
    assert changed == {"embed.weight", "head.weight"} | {f"blocks.{i}.fc{j}.weight" for i in range(2) for j in (1, 2)}


def test_provenance_reads_the_layers_inside_the_calls() -> None:
    from onnxlady._provenance._producers import model_producers

    model = _fixture("local_functions")
    weights, inlined = model_producers(model), model_producers(_inlined(model))
    assert len(weights) == len(inlined) == 6  # embed, fc1 and fc2 of both calls, head
    assert [w.matrix.tobytes() for w in weights] == [w.matrix.tobytes() for w in inlined]


def _body_edited(edit: str) -> onnx.ModelProto:
    """``local_functions`` with one edit inside a function body (every call site computes it)."""
    model = _fixture("local_functions")
    for function in model.functions:
        for node in function.node:
            if edit == "erf" and node.op_type == "Erf":
                node.op_type = "Tanh"
            if edit == "epsilon" and node.op_type == "LayerNormalization":
                for attribute in node.attribute:
                    if attribute.name == "epsilon":
                        attribute.f = 1.0
    return model


@pytest.mark.parametrize("edit", ["erf", "epsilon"])
def test_audit_catches_a_function_body_edited_then_inlined(edit: str, tmp_path: Path) -> None:
    reference, suspect = tmp_path / "ref.onnx", tmp_path / "suspect.onnx"
    onnx.save(_fixture("local_functions"), reference)
    edited = _body_edited(edit)
    assert edited.SerializeToString() != _fixture("local_functions").SerializeToString()
    assert not _verify(_fixture("local_functions"), edited)
    onnx.save(_inlined(edited), suspect)
    assert onnxlady.audit(reference, suspect).report.verdict == "modified"
    assert onnxlady.audit(suspect, reference).report.verdict == "modified"
    # The control: the same model inlined without the edit is a conversion.
    onnx.save(_inlined(_fixture("local_functions")), suspect)
    assert onnxlady.audit(reference, suspect).report.verdict == "converted"
