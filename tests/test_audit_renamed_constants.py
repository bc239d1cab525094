"""Weights an operator reads under a name the reference lacks (held-out round 16, F3 and F4).

The weight audit compares constants by name. A tied ``Gemm`` weight untied into a transposed
copy, ``transB`` kept (the operator now computes ``r @ W`` instead of ``r @ W.T``), was audited
``converted``, exit 0, the new constant compared with nothing (F3). A square ``MatMul`` weight
replaced by its transpose under a new name crashed the audit with a ``KeyError`` (F4). Now a
renamed constant is compared under the name it replaces, and an untied one with the suspect's
own constant it copies: a copy that holds other values is ``modified``, one that holds them
transposed and is read with ``transA``/``transB`` flipped is the same operand (F5).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only


def _tied_gemms() -> onnx.ModelProto:
    """Two Gemms read one tied 16x16 weight, one of them transposed (the held-out ``gemmtie``)."""
    rng = np.random.default_rng(3)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    initializers = [
        numpy_helper.from_array(weight(12, 16), "W1"),
        numpy_helper.from_array(weight(16) * 0.1, "b1"),
        numpy_helper.from_array(weight(16, 16), "Wshared"),
        numpy_helper.from_array(weight(16, 6), "W3"),
        numpy_helper.from_array(weight(6) * 0.1, "b3"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], name="g1", transB=0),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "Wshared"], ["h2"], name="g2", transB=0),
        helper.make_node("Tanh", ["h2"], ["t2"], name="tanh2"),
        helper.make_node("Gemm", ["t2", "Wshared"], ["h3"], name="g3", transB=1),
        helper.make_node("Relu", ["h3"], ["r3"], name="relu3"),
        helper.make_node("MatMul", ["r3", "W3"], ["m4"], name="mm4"),
        helper.make_node("Add", ["m4", "b3"], ["y"], name="add4"),
    ]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 6])], initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _untied(model: onnx.ModelProto, transposed: bool, trans_b: int) -> onnx.ModelProto:
    """``model`` whose Gemm g3 reads its own copy of the tied weight (transposed or not), with ``transB``."""
    changed = copy_model(model)
    shared = _array(changed, "Wshared")
    changed.graph.initializer.append(
        numpy_helper.from_array(np.ascontiguousarray(shared.T if transposed else shared), "Wshared_T")
    )
    g3 = next(node for node in changed.graph.node if node.name == "g3")
    g3.input[1] = "Wshared_T"
    next(a for a in g3.attribute if a.name == "transB").i = trans_b
    return changed


def _renamed(model: onnx.ModelProto, name: str, change: Callable[[np.ndarray], np.ndarray]) -> onnx.ModelProto:
    """``model`` whose constant ``name`` is stored as ``change`` of it under a new name (the old one gone)."""
    changed = copy_model(model)
    tensor = next(t for t in changed.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(change(numpy_helper.to_array(tensor))), name + "_T"))
    for node in changed.graph.node:
        for slot, read in enumerate(node.input):
            if read == name:
                node.input[slot] = name + "_T"
    return changed


def _equivalent(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> bool:
    return verify_models(reference, suspect, provider="cpu").equivalent


def test_a_transposed_untied_copy_with_trans_b_kept_is_modified() -> None:
    reference = _tied_gemms()
    wrong = _untied(reference, transposed=True, trans_b=1)
    assert not _equivalent(reference, wrong)  # g3 computes t2 @ Wshared
    report = audit_models(reference, wrong)
    assert report.verdict == "modified", report.summary
    assert "Gemm 'g3' reads 'Wshared_T' where the reference reads 'Wshared', with other values" in report.summary
    permuted = permute_copy(reference, 2)[0]
    assert audit_models(reference, _untied(permuted, transposed=True, trans_b=1)).verdict == "modified"


def test_an_untied_copy_as_it_is_is_no_edit() -> None:
    reference = _tied_gemms()
    same = _untied(reference, transposed=False, trans_b=1)
    assert _equivalent(reference, same)
    assert audit_models(reference, same).verdict in ("identical", "converted")
    permuted, analysis = permute_copy(reference, 2)[:2]
    untied = _untied(permuted, transposed=False, trans_b=1)
    assert _equivalent(reference, untied)
    assert audit_models(reference, untied).verdict == "permuted"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)  # a wrong permutation: still caught
    assert not _equivalent(reference, _untied(wrong, transposed=False, trans_b=1))
    assert audit_models(reference, _untied(wrong, transposed=False, trans_b=1)).exit_code == 1


def test_the_transposed_untie_with_trans_b_flipped_is_a_conversion() -> None:
    """``Gemm(A, W.T, transB=0)`` computes ``Gemm(A, W, transB=1)``: a re-layout, not an edit (round 16, F5)."""
    reference = _tied_gemms()
    relaid = _untied(reference, transposed=True, trans_b=0)
    assert _equivalent(reference, relaid)
    assert audit_models(reference, relaid).verdict == "converted"
    permuted, analysis = permute_copy(reference, 2)[:2]
    assert _equivalent(reference, _untied(permuted, transposed=True, trans_b=0))
    assert audit_models(reference, _untied(permuted, transposed=True, trans_b=0)).verdict == "permuted"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)  # a wrong permutation: still caught
    assert not _equivalent(reference, _untied(wrong, transposed=True, trans_b=0))
    assert audit_models(reference, _untied(wrong, transposed=True, trans_b=0)).exit_code == 1
    nudged = _untied(reference, transposed=True, trans_b=0)  # the re-laid copy with one value changed
    tensor = next(t for t in nudged.graph.initializer if t.name == "Wshared_T")
    values = numpy_helper.to_array(tensor).copy()
    values[3, 5] *= 1.5
    tensor.CopyFrom(numpy_helper.from_array(values, "Wshared_T"))
    assert not _equivalent(reference, nudged)
    assert audit_models(reference, nudged).verdict == "modified"


def test_a_weight_transposed_under_a_new_name_is_modified() -> None:
    reference = _tied_gemms()
    square = _renamed(reference, "Wshared", lambda a: a.T)  # both Gemms read it; audited by name: KeyError before
    assert not _equivalent(reference, square)
    assert audit_models(reference, square).verdict == "modified"
    permuted = permute_copy(reference, 2)[0]
    assert audit_models(reference, _renamed(permuted, "Wshared", lambda a: a.T)).verdict == "modified"


def test_a_renamed_weight_is_compared() -> None:
    reference = _tied_gemms()
    same = _renamed(reference, "W3", lambda a: a)
    assert audit_models(reference, same).verdict in ("identical", "converted")
    noisy = _renamed(reference, "W3", lambda a: a + np.float32(0.05) * np.sign(a))
    assert not _equivalent(reference, noisy)
    assert audit_models(reference, noisy).verdict == "modified"  # converted before: W3_T compared with nothing
    permuted, analysis = permute_copy(reference, 2)[:2]
    assert audit_models(reference, _renamed(permuted, "W3", lambda a: a)).verdict == "permuted"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)
    assert audit_models(reference, _renamed(wrong, "W3", lambda a: a)).exit_code == 1


def _untied_twice(model: onnx.ModelProto, second: Callable[[np.ndarray], np.ndarray]) -> onnx.ModelProto:
    """``model`` whose two Gemms read two new copies of the tied weight (the second ``second`` of it), the tied name gone."""
    changed = copy_model(model)
    shared = _array(changed, "Wshared")
    kept = [t for t in changed.graph.initializer if t.name != "Wshared"]
    del changed.graph.initializer[:]
    changed.graph.initializer.extend(kept)
    changed.graph.initializer.append(numpy_helper.from_array(shared.copy(), "Wa"))
    changed.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(second(shared)), "Wb"))
    for node in changed.graph.node:
        if node.name in ("g2", "g3"):
            node.input[1] = "Wa" if node.name == "g2" else "Wb"
    return changed


def test_an_untie_that_drops_the_tied_name() -> None:
    reference = _tied_gemms()
    permuted = permute_copy(reference, 2)[0]
    same = _untied_twice(permuted, lambda a: a)  # a KeyError before
    assert _equivalent(reference, same)
    assert audit_models(reference, same).verdict == "permuted"
    wrong = _untied_twice(permuted, lambda a: a.T)
    assert not _equivalent(reference, wrong)
    report = audit_models(reference, wrong)
    assert report.verdict == "modified", report.summary
    assert "Gemm 'g3' reads 'Wb' where the reference reads 'Wshared', with other values" in report.summary
