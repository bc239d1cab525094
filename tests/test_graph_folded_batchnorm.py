"""A BatchNorm folded into its Conv as arithmetic in the graph (onnxoptimizer's ``fuse_bn_into_conv``).

onnxoptimizer 0.4.2's default passes write the folded weight and bias not as stored constants but
as operators on the old ones: ``W' = Mul(W, Unsqueeze(Div(gamma, Sqrt(Add(var, Cast(eps))))))``
and ``b' = Add(Mul(Sub(Cast(b), mean), s), beta)``. :func:`fold_in_graph` writes that form by
hand, so these tests run without onnxoptimizer (one test checks the hand form is the tool's).
Before, resync across it and audit refused "different models: ... suspect has nothing" (no Conv
of the suspect had a weight they could read); now the Conv's computed weight and bias are read
by evaluating their constant subgraph (:mod:`onnxlady._resync._computed`) and paired with the
reference's Conv with its BatchNorm folded in.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from fixtures.deployment import CONVERTERS, unavailable
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._across import unit_bias, unit_weight
from onnxlady._resync._computed import read_computed
from onnxlady._resync._entry import resync_model
from onnxlady._resync._match import find_units
from onnxlady._verify._compare import verify_models
from onnxlady.testing import constant_bytes, copy_model, permute_copy
from tests.test_deployment import check_resync_across

MODELS = ("resnet", "mobilenet")


def fold_in_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with each Conv -> BatchNormalization written as onnxoptimizer's fold in the graph."""
    model = copy_model(model)
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    graph.initializer.append(numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "fold.axes"))
    folded: list[onnx.NodeProto] = []
    absorbed: set[str] = set()
    for number, node in enumerate(graph.node):
        if node.name in absorbed:
            continue
        bn = readers.get(node.output[0], [None])[0] if node.op_type == "Conv" else None
        if bn is None or bn.op_type != "BatchNormalization" or len(readers[node.output[0]]) != 1:
            folded.append(node)
            continue
        absorbed.add(bn.name)
        gamma, beta, mean, var = bn.input[1:5]
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        tag = f"fold{number}"
        graph.initializer.append(numpy_helper.from_array(np.array(eps, dtype=np.float32), f"{tag}.eps"))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else f"{tag}.zeros"
        if bias == f"{tag}.zeros":
            zeros = np.zeros(shapes[node.input[1]][0], dtype=np.float32)
            graph.initializer.append(numpy_helper.from_array(zeros, bias))
        arithmetic = [
            ("Cast", [f"{tag}.eps"], "e", {"to": TensorProto.FLOAT}),
            ("Add", [var, f"{tag}.e"], "v", {}),
            ("Sqrt", [f"{tag}.v"], "root", {}),
            ("Div", [gamma, f"{tag}.root"], "s", {}),
            ("Unsqueeze", [f"{tag}.s", "fold.axes"], "s4", {}),
            ("Mul", [node.input[1], f"{tag}.s4"], "w", {}),
            ("Cast", [bias], "b", {"to": TensorProto.FLOAT}),
            ("Sub", [f"{tag}.b", mean], "c", {}),
            ("Mul", [f"{tag}.c", f"{tag}.s"], "p", {}),
            ("Add", [f"{tag}.p", beta], "bias", {}),
        ]
        for op, inputs, output, attributes in arithmetic:
            folded.append(helper.make_node(op, inputs, [f"{tag}.{output}"], name=f"{tag}.{output}", **attributes))
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        del conv.input[1:]
        conv.input.extend([f"{tag}.w", f"{tag}.bias"])
        conv.output[0] = bn.output[0]
        folded.append(conv)
    del graph.node[:]
    graph.node.extend(folded)
    onnx.checker.check_model(model)
    return model


_CASES: dict[str, tuple[onnx.ModelProto, onnx.ModelProto, object, onnx.ModelProto]] = {}


def _case(name: str) -> tuple[onnx.ModelProto, onnx.ModelProto, object, onnx.ModelProto]:
    """(reference, permuted copy, true key, the permuted copy with its BatchNorms folded in the graph)."""
    if name not in _CASES:
        reference = FIXTURES[name](0)
        model, _, _, key = permute_copy(reference, 5)
        _CASES[name] = (reference, model, key, fold_in_graph(model))
    return _CASES[name]


@pytest.mark.parametrize("name", MODELS)
def test_the_fold_computes_what_the_batchnorm_did(name: str) -> None:
    reference, model, _, suspect = _case(name)
    assert "BatchNormalization" in {n.op_type for n in reference.graph.node}
    assert "BatchNormalization" not in {n.op_type for n in suspect.graph.node}
    assert verify_models(model, suspect, provider="cpu").equivalent


@pytest.mark.parametrize("name", MODELS)
def test_resync_across_a_fold_in_the_graph(name: str) -> None:
    reference, _, key, suspect = _case(name)
    assert len(analyze(suspect).permutable_groups) == len(analyze(reference).permutable_groups)
    result = check_resync_across(reference, suspect, key)
    # The output is the reference's order: the reference folded the same way, bit for bit.
    assert constant_bytes(result.model) == constant_bytes(fold_in_graph(reference))


@pytest.mark.parametrize("name", MODELS)
def test_audit_of_a_fold_in_the_graph(name: str) -> None:
    reference, _, _, suspect = _case(name)
    untouched = audit_models(reference, fold_in_graph(reference))
    assert untouched.verdict == "converted" and untouched.exit_code == 0
    assert "batchnorm-folded" in {finding.kind for finding in untouched.conversions}
    permuted = audit_models(reference, suspect)
    assert permuted.verdict == "permuted" and permuted.exit_code == 0


@pytest.mark.parametrize(
    ("name", "which"), [("resnet", 1), ("resnet", 2), ("resnet", 3), ("resnet", 4), ("mobilenet", 4)]
)
def test_a_tampered_batchnorm_constant_is_no_conversion(name: str, which: int) -> None:
    """One channel of one BatchNorm's gamma, beta, mean or variance changed by 1 %: the folded weight or bias reads it."""
    reference, model, _, _ = _case(name)
    tampered = _tampered(model, which)
    report = audit_models(reference, fold_in_graph(tampered))
    assert report.verdict not in ("identical", "permuted", "converted") and report.exit_code == 1


def _tampered(model: onnx.ModelProto, which: int) -> onnx.ModelProto:
    """A copy with one channel of the last BatchNorm's input ``which`` (gamma 1, beta 2, mean 3, var 4) changed by 1 %."""
    tampered = copy_model(model)
    bn = [n for n in tampered.graph.node if n.op_type == "BatchNormalization"][-1]
    tensor = next(t for t in tampered.graph.initializer if t.name == bn.input[which])
    values = numpy_helper.to_array(tensor).copy()
    values[3] = values[3] * 1.01 + 1e-3
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return tampered


@pytest.mark.parametrize("name", MODELS)
def test_against_a_reference_folded_in_the_graph(name: str) -> None:
    """The other way round: the reference computes its folded weights, the suspect keeps its BatchNorms.

    The reference's constants (``W``, ``gamma``, ``beta``, mean, variance) are solved through the
    computed weight and bias they make, element for element; a tampered BatchNorm in the
    suspect then differs there (before, those constants had no counterpart: it read ``permuted``).
    """
    reference, model, key, _ = _case(name)
    folded = fold_in_graph(reference)
    result = resync_model(folded, model, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert constant_bytes(result.model) == constant_bytes(reference)


@pytest.mark.parametrize("name", MODELS)
def test_audit_against_a_reference_folded_in_the_graph(name: str) -> None:
    reference, model, _, _ = _case(name)
    folded = fold_in_graph(reference)
    assert audit_models(folded, model).verdict == "permuted"
    for which in (1, 3):
        report = audit_models(folded, _tampered(model, which))
        assert report.verdict not in ("identical", "permuted", "converted") and report.exit_code == 1


def test_computed_values_are_the_folded_ones_within_their_bound() -> None:
    """The evaluated weight and bias equal the reference's BatchNorm folded in, within the bound read with them."""
    reference = FIXTURES["resnet"](0)
    graph, folded = ModelGraph(reference), ModelGraph(fold_in_graph(reference))
    units = [unit for unit in find_units(graph).values() if unit.batchnorm is not None]
    convs = [index for index, node in enumerate(folded.nodes) if node.op_type == "Conv"]
    assert len(units) == len(convs) > 0
    for unit, index in zip(units, convs):
        expected_weight = unit_weight(graph, unit)
        assert expected_weight is not None
        expected_bias = unit_bias(graph, unit, expected_weight.value.shape[0])
        weight = read_computed(folded, folded.nodes[index].input[1])
        bias = read_computed(folded, folded.nodes[index].input[2])
        assert weight is not None and bias is not None
        for read, expected in ((weight, expected_weight), (bias, expected_bias)):
            assert expected is not None and read.value.shape == expected.value.shape
            assert np.all(read.error > 0)
            assert np.all(np.abs(read.value - expected.value) <= read.error + expected.error)
        assert np.abs(bias.value).max() > 0.01  # the bias is no zeros: it carries beta and the mean


def test_the_hand_fold_is_the_tools() -> None:
    """The hand-built form is what onnxoptimizer writes (operators and what they read, in order)."""
    reason = unavailable("onnxoptimizer")
    if reason is not None:
        pytest.skip(reason)
    reference = FIXTURES["resnet"](0)

    def shape_of(model: onnx.ModelProto) -> list[tuple[str, int]]:
        return [(n.op_type, len(n.input)) for n in model.graph.node]

    assert shape_of(CONVERTERS["onnxoptimizer"](reference)) == shape_of(fold_in_graph(reference))
