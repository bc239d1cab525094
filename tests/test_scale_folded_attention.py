"""An attention's query scale folded by onnxslim through the heads' Reshape and Transpose (held-out 14 F2).

HF's eager attention (SegFormer) multiplies q by ``d ** -0.25`` after splitting the heads:
``(x @ Wq + bq) -> Reshape -> Transpose -> Mul s``. With one head the Transpose moves no
element, and onnxslim 0.1.98 folds the Mul into q's weight *and* bias (both times ``s``). The
Mul was not read as q's step past the Transpose, so the weight paired (scale-invariant) but the
halved bias read as an edit: the untouched copy was ``modified``, its permuted copy too.

ONNX Runtime moves the same scalar into the scores' FusedMatMul (``alpha``) and keeps q's
weight: reading the Mul as q's step on both sides calls that copy ``modified``. So the site
records the scalar past the moves (``Site.beyond``) and the resync decides per pair: folded
only where the other model holds no step there (a FusedMatMul's ``alpha`` is one) and its
weight and bias both differ by that factor. A converted copy reads ``converted``, a permuted
one ``permuted`` (its key recovered bit for bit); a bias changed alone, a weight scaled alone,
one neuron scaled before the same converter, the scalar folded into q while ONNX Runtime's
``alpha`` still holds it, or folded into the layers on both sides of it, are still caught.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.contrib import ort_optimized
from fixtures.deployment import CONVERTERS
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy
from tests.test_deployment import check_resync_across
from tests.test_scale_folded_norm_converters import _changed

pytest.importorskip("onnxslim")

_DIM, _TOKENS = 16, 8


def _attention_model(heads: int = 1, seed: int = 0) -> onnx.ModelProto:
    """One residual self-attention block as HF's eager attention exports it, then a head.

    q and k are scaled by ``(d / heads) ** -0.25`` each after their heads are split.
    """
    rng = np.random.default_rng(seed)
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def constant(name: str, value: object, dtype: type = np.float32) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value).astype(dtype), name))
        return name

    width = _DIM // heads
    constant("split", [1, _TOKENS, heads, width], np.int64)
    constant("merge", [1, _TOKENS, _DIM], np.int64)
    constant("scale", np.array(float(width) ** -0.25))
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            helper.make_node("MatMul", ["x", constant(p + "_w", rng.normal(0.0, 0.3, (_DIM, _DIM)))], [p + "_mm"]),
            helper.make_node("Add", [constant(p + "_b", rng.normal(0.0, 0.1, _DIM)), p + "_mm"], [p + "_add"]),
            helper.make_node("Reshape", [p + "_add", "split"], [p + "_heads"]),
            helper.make_node("Transpose", [p + "_heads"], [p + "_t"], perm=perm),
        ]
        if p != "v":
            nodes.append(helper.make_node("Mul", [p + "_t", "scale"], [p + "_s"]))
    nodes += [
        helper.make_node("MatMul", ["q_s", "k_s"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_t"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merge"], ["merged"]),
        helper.make_node("MatMul", ["merged", constant("o_w", rng.normal(0.0, 0.3, (_DIM, _DIM)))], ["o_mm"]),
        helper.make_node("Add", ["o_mm", constant("o_b", rng.normal(0.0, 0.1, _DIM))], ["o_add"]),
        helper.make_node("Add", ["x", "o_add"], ["residual"]),
        helper.make_node("MatMul", ["residual", constant("head_w", rng.normal(0.0, 0.3, (_DIM, 4)))], ["head_mm"]),
        helper.make_node("Add", ["head_mm", constant("head_b", rng.normal(0.0, 0.1, 4))], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _TOKENS, _DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, _TOKENS, 4])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


_slim = CONVERTERS["onnxslim"]  # the real onnxslim, on a copy


def _scaled_initializers(model: onnx.ModelProto, factors: dict[str, float]) -> onnx.ModelProto:
    """``model`` with the named initializers multiplied by their factors."""
    changed = copy_model(model)
    for index, tensor in enumerate(changed.graph.initializer):
        if tensor.name in factors:
            value = numpy_helper.to_array(tensor) * np.float32(factors[tensor.name])
            changed.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, tensor.name))
    return changed


def _edited(model: onnx.ModelProto, name: str, change: str) -> onnx.ModelProto:
    """``name`` with neuron 3 scaled by 1.3 (``row``), one element moved (``bias``) or all of it halved (``half``)."""
    return _scaled_initializers(model, {name: 0.5}) if change == "half" else _changed(model, name, change)


def _fused(model: onnx.ModelProto, role: str) -> str:
    """The name of the slimmed q layer's weight (``B``) or bias (``C``): the Gemm whose weight onnxslim rewrote."""
    for node in model.graph.node:
        if node.op_type == "Gemm" and node.input[1].endswith("_weight_fused"):
            return node.input[1] if role == "weight" else node.input[2]
    raise AssertionError("no fused Gemm")


def test_onnxslim_folds_the_query_scale_into_weight_and_bias() -> None:
    """The test of the test: onnxslim's own output has the finding's form, and computes the same."""
    reference = _attention_model()
    slimmed = _slim(reference)
    names = {tensor.name for tensor in slimmed.graph.initializer}
    assert not {"q_w", "q_b"} & names and {"k_b", "v_b"} <= names  # q's weight and bias rewritten
    assert [node.op_type for node in slimmed.graph.node].count("Mul") == 1  # k keeps its Mul
    fused = {t.name: numpy_helper.to_array(t) for t in slimmed.graph.initializer}[_fused(slimmed, "bias")]
    q_b = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}["q_b"]
    np.testing.assert_array_equal(fused, q_b * np.float32(0.5))
    assert verify_models(reference, slimmed, provider="cpu").equivalent


@pytest.mark.parametrize("heads", [1, 2])
def test_slimmed_copy_reads_converted(heads: int) -> None:
    """One head: the fold (was ``modified``). Two heads: onnxslim keeps the Mul (a control)."""
    reference = _attention_model(heads)
    report = audit_models(reference, _slim(reference))
    assert report.verdict == "converted" and report.exit_code == 0


def test_slimmed_permuted_copy_resyncs_and_reads_permuted() -> None:
    reference = _attention_model()
    permuted, _, _, key = permute_copy(reference, 7)
    suspect = _slim(permuted)
    check_resync_across(reference, suspect, key)
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0


@pytest.mark.parametrize(
    ("tensor", "change", "verdicts"),
    [("q_w", "row", {"scaled"}), ("q_b", "bias", {"modified"}), ("q_b", "half", {"modified"}),
     ("q_w", "half", {"modified", "scaled"})],
)  # fmt: skip
def test_a_change_before_onnxslim_is_still_caught(tensor: str, change: str, verdicts: set[str]) -> None:
    reference = _attention_model()
    report = audit_models(reference, _slim(_edited(reference, tensor, change)))
    assert report.verdict in verdicts and report.exit_code == 1


@pytest.mark.parametrize(("role", "change"), [("bias", "half"), ("bias", "bias"), ("weight", "half")])
def test_a_fused_constant_changed_alone_is_still_caught(role: str, change: str) -> None:
    """The slimmed copy's fused bias (or weight) halved alone, the scale applied twice to it: an edit."""
    reference = _attention_model()
    slimmed = _slim(reference)
    report = audit_models(reference, _edited(slimmed, _fused(slimmed, role), change))
    assert report.verdict in ("modified", "scaled") and report.exit_code == 1


def _scalar_before_next_layer() -> onnx.ModelProto:
    """``(x @ W1 + b1) -> Reshape -> Transpose -> Mul 0.5 -> Reshape -> @ W2 + b2``: the scalar the next layer reads."""
    rng = np.random.default_rng(3)
    initializers: list[onnx.TensorProto] = []

    def constant(name: str, value: object, dtype: type = np.float32) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value).astype(dtype), name))
        return name

    half = _DIM // 2
    nodes = [
        helper.make_node("MatMul", ["x", constant("w1", rng.normal(0.0, 0.3, (_DIM, _DIM)))], ["mm1"]),
        helper.make_node("Add", ["mm1", constant("b1", rng.normal(0.0, 0.1, _DIM))], ["add1"]),
        helper.make_node("Reshape", ["add1", constant("split", [1, _TOKENS, 2, half], np.int64)], ["heads"]),
        helper.make_node("Transpose", ["heads"], ["moved"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["moved", constant("half", np.array(0.5))], ["scaled"]),
        helper.make_node("Reshape", ["scaled", constant("rows", [1, 2 * _TOKENS, half], np.int64)], ["rows_out"]),
        helper.make_node("MatMul", ["rows_out", constant("w2", rng.normal(0.0, 0.3, (half, 4)))], ["mm2"]),
        helper.make_node("Add", ["mm2", constant("b2", rng.normal(0.0, 0.1, 4))], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "next",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _TOKENS, _DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2 * _TOKENS, 4])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _mul_deleted(model: onnx.ModelProto, factors: dict[str, float]) -> onnx.ModelProto:
    """:func:`_scalar_before_next_layer`'s Mul deleted (its reader reads its input), initializers scaled by ``factors``."""
    folded = _scaled_initializers(model, factors)
    mul = next(node for node in folded.graph.node if node.op_type == "Mul")
    for node in folded.graph.node:
        node.input[:] = ["moved" if name == "scaled" else name for name in node.input]
    folded.graph.node.remove(mul)
    return folded


@pytest.mark.parametrize(("factor", "verdict"), [("0.5", "converted"), ("0.6", "modified")])
def test_a_scalar_the_next_layer_reads_stays_its_input_scalar(factor: str, verdict: str) -> None:
    """Past a Transpose, a Mul the next layer reads is not the layer before's step: folded forward it pairs.

    (As onnx-simplifier folds GELU's 0.5 into the next layer's weight; made by hand here, where
    neither simplifier folds it.) Read as the first layer's step, its bias would differ: ``modified``.
    A wrong factor folded is still caught.
    """
    reference = _scalar_before_next_layer()
    folded = _mul_deleted(reference, {"w2": float(factor)})
    assert verify_models(reference, folded, provider="cpu").equivalent == (verdict == "converted")
    report = audit_models(reference, folded)
    assert report.verdict == verdict and report.exit_code == (verdict != "converted")


def test_ort_extended_copy_reads_converted() -> None:
    """ONNX Runtime's MatMulScaleFusion moves both scalars into the scores' FusedMatMul (alpha): no layer holds them.

    (Reading q's scalar as q's step on both sides regardless calls this copy ``modified``.)
    """
    reference = _attention_model()
    optimized = ort_optimized(reference)
    assert "FusedMatMul" in {node.op_type for node in optimized.graph.node}
    report = audit_models(reference, optimized)
    assert report.verdict == "converted" and report.exit_code == 0


def test_ort_extended_copy_with_the_scale_also_folded_into_q_is_caught() -> None:
    """ONNX Runtime's alpha holds q's scalar; q's weight and bias halved as well apply it twice: an edit.

    (A fold read wherever the weight and bias differ by the factor, the alpha not counted as a
    step held there, calls this copy ``converted``.)
    """
    reference = _attention_model()
    suspect = _scaled_initializers(ort_optimized(reference), {"q_w": 0.5, "q_b": 0.5})
    assert not verify_models(reference, suspect, provider="cpu").equivalent  # the test of the test
    report = audit_models(reference, suspect)
    assert report.verdict in ("modified", "scaled") and report.exit_code == 1


def test_the_slimmed_model_as_reference_reads_converted() -> None:
    """The fold read from the other side: the reference holds the folded weight, the suspect the Mul."""
    reference = _attention_model()
    report = audit_models(_slim(reference), reference)
    assert report.verdict == "converted" and report.exit_code == 0


def test_a_scalar_folded_into_the_layers_on_both_sides_is_caught() -> None:
    """The Mul the next layer reads deleted, its factor folded into the layer before *and* the one after.

    It is the next layer's input scalar only (read past the Transpose as the layer before's
    step too, each side's fold is accepted and the factor counts twice): ``modified``.
    """
    reference = _scalar_before_next_layer()
    folded = _mul_deleted(reference, {"w1": 0.5, "b1": 0.5, "w2": 0.5})
    assert not verify_models(reference, folded, provider="cpu").equivalent
    report = audit_models(reference, folded)
    assert report.verdict in ("modified", "scaled") and report.exit_code == 1


@pytest.mark.parametrize("heads", [1, 2])
def test_an_operator_rewired_to_read_a_fused_layer_is_caught(heads: int) -> None:
    """A residual Add of the slimmed copy made to read the fused output projection twice: ``modified``.

    onnxslim writes ``o``'s MatMul and Add as Gemm and Reshape under new node names, the last
    one's output under the Add's tensor name; the Add's input traced to that operator only the
    suspect has was not compared (held-out round 14's SegFormer slim copy with such a rewire read
    ``modified`` only for the F2 fold, and ``converted`` once that was read: two heads, no fold).
    """
    reference = _attention_model(heads)
    for node in reference.graph.node:
        node.name = node.output[0]
    slimmed = _slim(reference)
    assert audit_models(reference, slimmed).verdict == "converted"  # the control
    residual = next(node for node in slimmed.graph.node if node.name == "residual")
    assert list(residual.input) == ["x", "o_add"] and "o_add" not in {n.name for n in slimmed.graph.node}
    residual.input[0] = "o_add"
    assert not verify_models(reference, slimmed, provider="cpu").equivalent
    report = audit_models(reference, slimmed)
    assert report.verdict == "modified" and report.exit_code == 1
    assert "Add 'residual' input 0 reads 'o_add' in the suspect, where the reference reads 'the graph input x'" in report.summary
