"""A table added after a layer (not a channel vector) carries a rescaled neuron's factor, as a bias does.

The audit's use classifier (``_verdicts._find_group_uses``) reads any constant an ``Add`` adds
to a MatMul's output (and a Gemm's ``C``, whatever its shape) as that layer's bias; the resync's
unit finder (``_resync._units.is_channel_vector``) reads a bias only where the constant is a
vector along the channel axis, ones elsewhere. They disagree on an ``[S, C]`` table added after a
MatMul (a position bias after a projection; a Gemm's ``C`` both read as its bias). For the audit the broad reading
is the right one: whatever its shape, an addend along the neuron axis must carry the row's scale
for a rescale to be undone by the next layer. With the strict reading a compensated rescale of
such a neuron (verify: equivalent) would read ``modified``; a rescale that leaves the table
(not equivalent) must not read ``permuted-rescaled``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._units import find_units
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

_TOKENS, _WIDTH, _HIDDEN, _NEURON, _FACTOR = 4, 8, 16, 3, 2.5


def _model(gemm: bool, table: tuple[int, ...] = (_TOKENS, _HIDDEN)) -> onnx.ModelProto:
    """``Relu(x @ W1 + T) @ W2``, T an ``[S, C]`` table: an ``Add`` after a MatMul, or a Gemm's ``C``."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((_WIDTH, _HIDDEN)) / 3).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(table).astype(np.float32), "table"),
        numpy_helper.from_array((rng.standard_normal((_HIDDEN, _WIDTH)) / 4).astype(np.float32), "w2"),
    ]
    first = [helper.make_node("Gemm", ["x", "w1", "table"], ["h"], name="fc1")] if gemm else [
        helper.make_node("MatMul", ["x", "w1"], ["m"], name="fc1"), helper.make_node("Add", ["m", "table"], ["h"], name="add")]
    nodes = [*first, helper.make_node("Relu", ["h"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w2"], ["out"], name="fc2")]
    shape = [_TOKENS, _WIDTH] if gemm else [1, _TOKENS, _WIDTH]
    graph = helper.make_graph(nodes, "table", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _rescaled(model: onnx.ModelProto, *, table: bool) -> onnx.ModelProto:
    """Neuron 3's weight column (and, if ``table``, its table column) x2.5, fc2's input row /2.5."""
    changed = copy_model(model)
    values = {tensor.name: numpy_helper.to_array(tensor).copy() for tensor in changed.graph.initializer}
    values["w1"][:, _NEURON] *= _FACTOR
    values["w2"][_NEURON, :] /= _FACTOR
    if table:
        values["table"][:, _NEURON] *= _FACTOR
    for tensor in changed.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    return changed


def test_the_readings_disagree_on_the_table() -> None:
    """What the tests below are about: the unit finder reads no bias in the table, a vector it reads (this can fail)."""
    for table, found in (((_TOKENS, _HIDDEN), False), ((_HIDDEN,), True)):
        model = _model(False, table)
        fc1 = next(index for index, node in enumerate(model.graph.node) if node.name == "fc1")
        assert (find_units(ModelGraph(model))[fc1].bias is not None) == found


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul-add", "gemm-c"])
def test_a_compensated_rescale_through_an_added_table_is_permuted_rescaled(gemm: bool) -> None:
    reference = _model(gemm)
    rescaled = _rescaled(reference, table=True)
    assert verify_models(reference, rescaled, provider="cpu").equivalent
    report = audit_models(reference, rescaled)
    assert report.verdict == "permuted-rescaled" and report.exit_code == 0, report.summary
    permuted, analysis = permute_copy(reference, 1)[:2]
    assert audit_models(reference, _rescaled(permuted, table=True)).verdict == "permuted-rescaled"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)
    assert not verify_models(reference, wrong, provider="cpu").equivalent
    assert audit_models(reference, _rescaled(wrong, table=True)).exit_code == 1


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul-add", "gemm-c"])
def test_a_rescale_that_leaves_the_table_is_no_equivalence(gemm: bool) -> None:
    reference = _model(gemm)
    attacked = _rescaled(reference, table=False)
    assert not verify_models(reference, attacked, provider="cpu").equivalent
    report = audit_models(reference, attacked)
    assert report.exit_code == 1 and report.verdict != "permuted-rescaled", report.summary


def test_analysis_labels_the_table_with_the_layer_group() -> None:
    """The table's neuron axis moves with the layer's neurons."""
    assert any(plan.source == "table" for plan in analyze(_model(False)).tensors)
