"""A run-time attention scale that onnxslim folds into a constant, read as a step on both sides (session 15).

torch's MultiheadAttention scales q and k^T by a scalar it computes at run time from the head
size: ``Shape(q) -> Slice -> Cast -> Sqrt -> Div(1, .) -> Sqrt``, then ``Mul(q, s)`` and
``Mul(Transpose(k), s)``. onnxslim 0.1.98 knows the static shapes and folds the chain into a
stored constant: kept in the Muls, or folded with q's bias Add into a Gemm. The reference's Mul
was no step of q's site (its scalar is no stored constant, and the ``Shape`` reading q made the
Mul no lone reader), while the copy's was: the untouched, equivalent copy read ``scaled``
(x0.5946). The reference's site now reads the evaluated scalar as its step (the Shape a
converter folds reads no value); with a dynamic batch the head size is still known (session 16,
:mod:`onnxlady._graph._shape_scalars`), and a dim that is not known is never guessed. A wrong
scale folded into wk alone, one neuron scaled, and a wrong permutation are still caught.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.deployment import CONVERTERS
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only
from tests.test_deployment import check_resync_across

pytest.importorskip("onnxslim")

_TOKENS, _DIM, _HIDDEN = 6, 8, 16


def _attention_model(biased: bool, batch: int | str = 1) -> onnx.ModelProto:
    """An MLP block, then one-head attention with separate q/k/v projections and torch's run-time scale.

    ``batch``: the input's first dim, a name for a dynamic batch (the head size is still known).
    """
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((_DIM, _HIDDEN)) / 3, "b1": rng.standard_normal(_HIDDEN) / 4,
        "w2": rng.standard_normal((_HIDDEN, _DIM)) / 4, "b2": rng.standard_normal(_DIM) / 4,
        "wq": rng.standard_normal((_DIM, _DIM)) / 3, "wk": rng.standard_normal((_DIM, _DIM)) / 3,
        "wv": rng.standard_normal((_DIM, _DIM)) / 3, "wo": rng.standard_normal((_DIM, _DIM)) / 3,
        "bo": rng.standard_normal(_DIM) / 4,
    }  # fmt: skip
    constants = {"one": np.array(1.0, np.float32), "start": np.array([-1]), "end": np.array([2**62])}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["f0"]), helper.make_node("Add", ["f0", "b1"], ["f1"]),
        helper.make_node("Relu", ["f1"], ["f2"]), helper.make_node("MatMul", ["f2", "w2"], ["f3"]),
        helper.make_node("Add", ["f3", "b2"], ["f4"]), helper.make_node("Add", ["x", "f4"], ["h"]),
    ]  # fmt: skip
    for p in ("q", "k", "v"):
        nodes.append(helper.make_node("MatMul", ["h", "w" + p], [p + "0" if biased else p]))
        if biased:
            weights["b" + p] = rng.standard_normal(_DIM) / 4
            nodes.append(helper.make_node("Add", [p + "0", "b" + p], [p]))
    nodes += [
        helper.make_node("Shape", ["q"], ["qs"]), helper.make_node("Slice", ["qs", "start", "end"], ["hd"]),
        helper.make_node("Cast", ["hd"], ["hdf"], to=TensorProto.FLOAT), helper.make_node("Sqrt", ["hdf"], ["r"]),
        helper.make_node("Div", ["one", "r"], ["inv"]), helper.make_node("Sqrt", ["inv"], ["s"]),
        helper.make_node("Mul", ["q", "s"], ["q2"]), helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["kt", "s"], ["k2"]), helper.make_node("MatMul", ["q2", "k2"], ["a0"]),
        helper.make_node("Softmax", ["a0"], ["a"], axis=-1), helper.make_node("MatMul", ["a", "v"], ["o0"]),
        helper.make_node("MatMul", ["o0", "wo"], ["o1"]), helper.make_node("Add", ["o1", "bo"], ["o2"]),
        helper.make_node("Add", ["h", "o2"], ["y"]),
    ]  # fmt: skip
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    initializers += [numpy_helper.from_array(v, k) for k, v in constants.items()]
    graph = helper.make_graph(
        nodes, "runtime_scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, _TOKENS, _DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, _TOKENS, _DIM])], initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


_slim = CONVERTERS["onnxslim"]  # the real onnxslim, on a copy


def _changed(model: onnx.ModelProto, name: str, change: str) -> onnx.ModelProto:
    """``name`` times 1.1 (``all``) or with neuron 3 times 1.3 (``row``)."""
    changed = copy_model(model)
    for index, tensor in enumerate(changed.graph.initializer):
        if tensor.name == name:
            value = numpy_helper.to_array(tensor).copy()
            if change == "all":
                value *= np.float32(1.1)
            else:
                value[:, 3] *= np.float32(1.3)
            changed.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, name))
    return changed


@pytest.mark.parametrize("biased", [False, True])
def test_onnxslim_folds_the_runtime_scale(biased: bool) -> None:
    """The test of the test: onnxslim's output holds the scale as a stored constant, and computes the same."""
    reference = _attention_model(biased)
    slimmed = _slim(reference)
    assert not {"Shape", "Sqrt"} & {node.op_type for node in slimmed.graph.node}
    assert "Shape" in {node.op_type for node in reference.graph.node}
    stored = [numpy_helper.to_array(t) for t in slimmed.graph.initializer if t.dims in ([], [1])]
    assert any(np.isclose(float(value.reshape(-1)[0]), 8.0**-0.25) for value in stored if value.dtype.kind == "f")
    assert verify_models(reference, slimmed, provider="cpu").equivalent


@pytest.mark.parametrize("biased", [False, True])
def test_slimmed_copy_reads_converted(biased: bool) -> None:
    reference = _attention_model(biased)
    report = audit_models(reference, _slim(reference))
    assert report.verdict == "converted" and report.exit_code == 0


def test_slimmed_permuted_copy_resyncs_and_reads_permuted() -> None:
    reference = _attention_model(True)
    permuted, _, _, key = permute_copy(reference, 5)
    suspect = _slim(permuted)
    check_resync_across(reference, suspect, key)
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0


@pytest.mark.parametrize(("tensor", "change"), [("wk", "all"), ("wq", "all"), ("wq", "row"), ("wk", "row")])
@pytest.mark.parametrize("biased", [False, True])
def test_a_change_before_onnxslim_is_still_caught(biased: bool, tensor: str, change: str) -> None:
    """A wrong scale (x1.1) or one neuron scaled in wq or wk, then onnxslim: an edit."""
    reference = _attention_model(biased)
    report = audit_models(reference, _slim(_changed(reference, tensor, change)))
    assert report.verdict in ("scaled", "modified") and report.exit_code == 1


def test_a_wrong_permutation_is_caught() -> None:
    """The slimmed copy with one layer's neurons permuted and its readers left: not equivalent, and not passed."""
    reference = _attention_model(True)
    wrong = _slim(reference)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(reference, wrong, provider="cpu").equivalent
    report = audit_models(reference, wrong)
    assert report.verdict not in ("converted", "permuted", "identical") and report.exit_code == 1


# -- a dynamic batch (session 16) ----------------------------------------------------------------
# The scale's Shape(q) holds a symbolic batch, so the graph folds nothing: the reference's Mul had
# no step (and the Shape made it no lone reader of q) while onnxslim, which knows the last axis,
# stored the scalar: the untouched copy read ``scaled`` (x0.5946). The head size is read from the
# partial shape now (:mod:`onnxlady._graph._shape_scalars`), by the resync's sites as by the audit.
@pytest.mark.parametrize("biased", [False, True])
def test_onnxslim_folds_the_runtime_scale_with_a_dynamic_batch(biased: bool) -> None:
    """The test of the test: the batch is dynamic, and onnxslim still stores the scale and computes the same."""
    reference = _attention_model(biased, "batch")
    assert reference.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    slimmed = _slim(reference)
    assert not {"Shape", "Sqrt"} & {node.op_type for node in slimmed.graph.node}
    stored = [numpy_helper.to_array(t) for t in slimmed.graph.initializer if t.dims in ([], [1])]
    assert any(np.isclose(float(value.reshape(-1)[0]), 8.0**-0.25) for value in stored if value.dtype.kind == "f")
    assert verify_models(reference, slimmed, provider="cpu").equivalent


@pytest.mark.parametrize("biased", [False, True])
def test_slimmed_copy_with_a_dynamic_batch_reads_converted(biased: bool) -> None:
    reference = _attention_model(biased, "batch")
    report = audit_models(reference, _slim(reference))
    assert report.verdict == "converted" and report.exit_code == 0, report.summary


def test_slimmed_permuted_copy_with_a_dynamic_batch_resyncs_and_reads_permuted() -> None:
    reference = _attention_model(True, "batch")
    permuted, _, _, key = permute_copy(reference, 5)
    suspect = _slim(permuted)
    check_resync_across(reference, suspect, key)  # a wrong permutation of its output is caught there
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary


@pytest.mark.parametrize(("tensor", "change"), [("wk", "all"), ("wq", "all"), ("wq", "row"), ("wk", "row")])
@pytest.mark.parametrize("biased", [False, True])
def test_a_change_before_onnxslim_with_a_dynamic_batch_is_still_caught(biased: bool, tensor: str, change: str) -> None:
    """A wrong scale (x1.1) or one neuron scaled in wq or wk, then onnxslim: an edit."""
    reference = _attention_model(biased, "batch")
    report = audit_models(reference, _slim(_changed(reference, tensor, change)))
    assert report.verdict in ("scaled", "modified") and report.exit_code == 1


def test_a_wrong_permutation_with_a_dynamic_batch_is_caught() -> None:
    reference = _attention_model(True, "batch")
    wrong = _slim(reference)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(reference, wrong, provider="cpu").equivalent
    report = audit_models(reference, wrong)
    assert report.verdict not in ("converted", "permuted", "identical") and report.exit_code == 1
