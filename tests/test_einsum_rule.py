"""Einsum read from its equation (held-out round 14, F4: a block written with einsum had 0 groups).

Every subscript letter takes one permutation wherever it appears: the heads and head dims of
``bsd,dhe->bhse`` projections, coupled across Q and K by the scores ``bhse,bhte->bhst``, and the
MLP's hidden units, whatever way the equation is written (weight first, implicit output,
ellipsis). Each form permutes, verifies in ONNX Runtime and unpermutes bit for bit; the moves
the rule must not make (a moved weight put back) are caught by verify; a repeated letter (a diagonal) freezes. The audit
and resync see Einsum's constants as weights, through a float16 conversion and a renaming
simplifier too; ``perturb`` reaches them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxlady
from fixtures.conversions import simplify, to_float16
from fixtures.einsum import HEAD, HEADS, HIDDEN, build_einsum_block
from onnxlady import analyze, unpermute_model, verify_models
from onnxlady._rules._context import RuleDoesNotApply
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

FORMS = ("explicit", "weight_first", "implicit", "ellipsis")


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _edit(model: onnx.ModelProto, name: str, change: Callable[[np.ndarray], np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` replaced by ``change(its value)``."""
    edited = copy_model(model)
    tensor = next(t for t in edited.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()), name))
    return edited


def test_the_equation_is_read_as_numpy_reads_it() -> None:
    from onnxlady._rules.einsum import parse_equation  # (here: the other tests run where the rule is missing)

    assert parse_equation("bsd, df -> bsf", 2) == ([("bsd", None), ("df", None)], ("bsf", None))
    assert parse_equation("bsd,df", 2)[1] == ("bfs", None)  # implicit: letters seen once, sorted
    assert parse_equation("...d,df->...f", 2) == ([("d", 0), ("df", None)], ("f", 0))
    assert parse_equation("...d,df", 2)[1] == ("f", 0)  # implicit: the ellipsis first
    for equation, operands in (("bsd,df->bsf", 3), ("bsD,df", 2), ("bs1,df->bsf", 2)):
        with pytest.raises(RuleDoesNotApply):
            parse_equation(equation, operands)


@pytest.mark.parametrize("mlp", FORMS)
def test_heads_head_dims_and_hidden_units_are_groups(mlp: str) -> None:
    analysis = analyze(build_einsum_block(0, mlp=mlp))
    assert not [r for g in analysis.groups for r in g.reasons if r.kind in ("blocking", "no-rule", "index-map")]
    members = {g.size: {(m.tensor, m.axis) for m in g.members if m.is_weight} for g in analysis.permutable_groups}
    assert sorted(g.size for g in analysis.permutable_groups) == [HEADS, HEAD, HEAD, HIDDEN]
    assert members[HEADS] == {("wq", 1), ("wk", 1), ("wv", 1), ("wo", 0)}  # one head order for Q, K, V, O
    assert members[HIDDEN] == {("w1", 1), ("b1", 0), ("w2", 0)}
    head_dims = sorted(
        sorted(m.tensor for m in g.members if m.is_weight) for g in analysis.permutable_groups if g.size == HEAD
    )
    assert head_dims == [["wk", "wq"], ["wo", "wv"]]  # Q/K share theirs through the scores, V/O theirs
    summary = analysis.summary()
    assert summary["producer_neurons"] > 0 and summary["permutable_fraction"] > 0.5


@pytest.mark.parametrize("mlp", FORMS)
def test_permute_keeps_the_function_and_unpermute_restores_the_bytes(mlp: str) -> None:
    source = build_einsum_block(0, mlp=mlp)
    model, _, perms, key = permute_copy(source, 5)
    assert len(perms) == 4
    for name in ("wq", "wo", "w1", "w2"):
        assert not np.array_equal(_array(model, name), _array(source, name)), name
    assert verify_models(source, model, provider="cpu").equivalent
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()


def test_each_operand_the_rule_moves_must_move() -> None:
    """The permuted block with one moved weight put back (a letter moved on some operands only) is caught.

    w2 (the hidden units, read after the bias and Relu), wk (the head dims the scores contract
    with Q's) and wo (the heads and V's dims, contracted by the output projection).
    """
    source = build_einsum_block(0)
    model, _, _, _ = permute_copy(source, 5)
    assert verify_models(source, model, provider="cpu").equivalent
    for name in ("w2", "wk", "wo"):
        assert not np.array_equal(_array(model, name), _array(source, name)), name
        partial = _edit(model, name, lambda _, name=name: _array(source, name))
        assert not verify_models(source, partial, provider="cpu").equivalent, name


@pytest.mark.parametrize("mlp", FORMS)
def test_one_einsum_weight_permuted_alone_is_caught(mlp: str) -> None:
    """``permute_producer_only`` finds Einsum weights (their role names the letter) and verify catches it."""
    source = build_einsum_block(0, mlp=mlp)
    wrong = copy_model(source)
    changed = permute_producer_only(wrong, analyze(wrong))
    assert not np.array_equal(_array(wrong, changed), _array(source, changed))
    assert not verify_models(source, wrong, provider="cpu").equivalent


def test_a_repeated_letter_freezes_the_groups_it_touches() -> None:
    """``bsf,ff->bsf`` reads a diagonal: the hidden units keep their order, the attention still moves."""
    analysis = analyze(build_einsum_block(0, mlp="diagonal"))
    hidden = next(g for g in analysis.groups if g.size == HIDDEN)
    assert hidden.frozen
    assert any("repeats a letter" in r.message for r in hidden.reasons), hidden.reasons
    assert sorted(g.size for g in analysis.permutable_groups) == [HEADS, HEAD, HEAD]


def test_audit_and_resync_read_einsum_constants_as_weights() -> None:
    reference = build_einsum_block(0)
    permuted, _, _, key = permute_copy(reference, 5)
    assert onnxlady.audit(reference, permuted).to_json()["verdict"] == "permuted"
    assert onnxlady.resync(reference, permuted, true_key=key).to_json()["psi"] == pytest.approx(100.0)
    for convert in (to_float16, simplify):  # float16 weights; every tensor renamed (held-out: refused, exit 2)
        converted = convert(permuted)
        assert onnxlady.audit(reference, converted).to_json()["verdict"] == "permuted", convert.__name__
        assert onnxlady.resync(reference, converted, true_key=key).to_json()["psi"] == pytest.approx(100.0), (
            convert.__name__
        )

    # perturb's noise reaches Einsum's weights; resync and audit see through it.
    noisy = onnxlady.perturb(permuted, noise=0.1, seed=3).model
    assert not np.array_equal(_array(noisy, "w1"), _array(permuted, "w1"))
    assert onnxlady.resync(reference, noisy, true_key=key).to_json()["psi"] >= 99
    assert onnxlady.audit(reference, noisy).to_json()["verdict"] == "perturbed"

    # One hidden unit's w1 column x1.5 (held-out: "constants differ but not the weights").
    scaled = onnxlady.audit(
        reference, _edit(reference, "w1", lambda w: w * np.where(np.arange(HIDDEN) == 5, 1.5, 1))
    ).to_json()
    assert scaled["verdict"] == "scaled", scaled["summary"]
    assert [n["neuron"] for n in scaled["scaled_neurons"]] == [5]
    # One weight element changed: modified, and the weights are named as weights.
    edited = _edit(
        reference, "w1", lambda w: w + np.where(np.arange(w.size).reshape(w.shape) == 99, 0.5, 0).astype(w.dtype)
    )
    report = onnxlady.audit(reference, edited).to_json()
    assert report["verdict"] == "modified"
    assert "weight tensors changed" in report["summary"] and "other constants" not in report["summary"], report[
        "summary"
    ]


def test_an_outer_product_with_a_constant_vector_moves_but_makes_no_neurons() -> None:
    """``bsf,g->bsfg`` (as rotary frequencies are written): ``g`` is a group, but not a layer's neurons.

    Producer neurons are those of Einsums that weigh a data operand (a letter contracted with a
    constant): 16 of the first layer and 5 of the head, not the 3 entries of the vector.
    """
    rng = np.random.default_rng(0)
    weights = {"w1": (32, 16), "c": (3,), "w2": (16, 3, 5)}
    initializers = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n) for n, s in weights.items()
    ]
    nodes = [
        onnx.helper.make_node("Einsum", ["x", "w1"], ["h"], equation="bsd,df->bsf"),
        onnx.helper.make_node("Tanh", ["h"], ["t"]),
        onnx.helper.make_node("Einsum", ["t", "c"], ["o"], equation="bsf,g->bsfg"),
        onnx.helper.make_node("Einsum", ["o", "w2"], ["y"], equation="bsfg,fgk->bsk"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "outer",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 6, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 6, 5])],
        initializers,
    )
    source = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    source.ir_version = 8
    analysis = analyze(source)
    assert sorted(g.size for g in analysis.permutable_groups) == [3, 16]
    assert analysis.summary()["producer_neurons"] == 16 + 5
    model, _, _, _ = permute_copy(source, 2)
    assert not np.array_equal(_array(model, "c"), _array(source, "c"))
    assert verify_models(source, model, provider="cpu").equivalent
    wrong = copy_model(source)
    assert permute_producer_only(wrong, analyze(wrong)) == "w1"  # the first layer's rows alone
    assert not verify_models(source, wrong, provider="cpu").equivalent  # a wrong permutation is caught
