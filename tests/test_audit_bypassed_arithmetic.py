"""A scale deleted from the graph, its readers reading its input: ``modified``, not ``converted`` (held-out round 14).

Deleting SegFormer's query scale (``q * 0.5`` before the attention scores) left every weight
as it was; the suspect no longer matched node for node, the audit compared it across forms,
found no converter's signature, and read ``converted`` although the outputs change. A
simplifier does drop a ``Mul`` by ones, and onnx-simplifier moves ``x * 0.5`` into the next
``Conv``'s weight (the weights then differ by that factor, which the resync reads as a
conversion): those stay ``converted``. A reader that weighs with a constant holds the factor
only where its constant carries it: the Mul deleted in front of a MatMul whose weight was
kept as it was is an edit (it read ``converted``: the MatMul *could* have held it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

_SEQ, _WIDTH = 6, 16


def _attention(scale: float) -> onnx.ModelProto:
    """One attention block: q, k, v projections, ``q * scale``, scores, softmax, context, output."""
    rng = np.random.default_rng(0)
    inits = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    nodes = []
    for part in "qkv":
        w = const(f"{part}.w", rng.standard_normal((_WIDTH, _WIDTH)) / 4)
        b = const(f"{part}.b", rng.standard_normal(_WIDTH) / 10)
        nodes += [helper.make_node("MatMul", ["x", w], [f"{part}.mm"], name=f"{part}.mm"),
                  helper.make_node("Add", [f"{part}.mm", b], [part], name=f"{part}.add")]  # fmt: skip
    heads = const("heads", np.array([1, _SEQ, 1, _WIDTH]))
    heads_int = numpy_helper.from_array(np.array([1, _SEQ, 1, _WIDTH], np.int64), "heads")
    inits[inits.index(next(t for t in inits if t.name == "heads"))] = heads_int
    merged = numpy_helper.from_array(np.array([1, _SEQ, _WIDTH], np.int64), "merged")
    inits.append(merged)
    # As SegFormer's one-head stage: q split into heads (Reshape, Transpose), then scaled.
    nodes += [
        helper.make_node("Reshape", ["q", heads], ["q.h"], name="q.heads"),
        helper.make_node("Transpose", ["q.h"], ["q.t"], name="q.t", perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["q.t", const("scale", np.array(scale))], ["q.scaled"], name="q.scale"),
        helper.make_node("Reshape", ["k", heads], ["k.h"], name="k.heads"),
        helper.make_node("Transpose", ["k.h"], ["k.t"], name="k.t", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["v", heads], ["v.h"], name="v.heads"),
        helper.make_node("Transpose", ["v.h"], ["v.t"], name="v.t", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q.scaled", "k.t"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["attn"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["attn", "v.t"], ["ctx.h"], name="ctx"),
        helper.make_node("Transpose", ["ctx.h"], ["ctx.t"], name="ctx.t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx.t", "merged"], ["ctx"], name="ctx.merge"),
        helper.make_node("MatMul", ["ctx", const("o.w", rng.standard_normal((_WIDTH, _WIDTH)) / 4)], ["o.mm"], name="o.mm"),
        helper.make_node("Relu", ["o.mm"], ["y"], name="relu"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _SEQ, _WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, _SEQ, _WIDTH])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _without(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` with operator ``name`` deleted, its readers reading its first input."""
    model = copy_model(model)
    node = next(n for n in model.graph.node if n.name == name)
    for other in model.graph.node:
        for slot, tensor in enumerate(other.input):
            if tensor == node.output[0]:
                other.input[slot] = node.input[0]
    model.graph.node.remove(node)
    return model


def test_a_deleted_scale_before_the_attention_scores_is_modified() -> None:
    reference = _attention(0.5)
    suspect = _without(reference, "q.scale")
    assert not verify_models(reference, suspect, provider="cpu").equivalent  # the test of the test
    report = audit_models(reference, suspect)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary
    assert "Mul 'q.scale' removed: its readers read its input in the suspect" in report.summary


def test_a_deleted_mul_by_ones_is_no_edit() -> None:
    reference = _attention(1.0)
    report = audit_models(reference, _without(reference, "q.scale"))
    assert report.exit_code == 0, report.summary


def _conv(folder: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """``Conv(x * 0.5)`` and what onnx-simplifier makes of it (the factor in the Conv's weight)."""
    onnxsim = pytest.importorskip("onnxsim")
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 4, 3, 3)) / 6).astype(np.float32), "w0"),
        numpy_helper.from_array((rng.standard_normal(8) / 10).astype(np.float32), "b0"),
        numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(8) / 10).astype(np.float32), "b1"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r"], name="relu0"),
        helper.make_node("Mul", ["r", "half"], ["h"], name="half.mul"),
        helper.make_node("Conv", ["h", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["y"], name="relu1"),
    ]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits,
    )  # fmt: skip
    reference = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    reference.ir_version = 8
    simplified, ok = onnxsim.simplify(reference)
    assert ok
    return reference, simplified


def test_a_scale_onnxsim_moves_into_the_next_conv_stays_converted(tmp_path: Path) -> None:
    """onnx-simplifier's own fold: the Mul is gone and its reader reads its input, yet nothing changed.

    Here the resync names the fold (the factor moved into the Conv's weight), so the audit does
    not reach the check above; the check's own reading of a fold (the reader's constant carries
    the factor) is shown by the hand-made folds below, which leave no such trace.
    """
    reference, simplified = _conv(tmp_path)
    assert [n.op_type for n in simplified.graph.node] == ["Conv", "Relu", "Conv", "Relu"]  # the factor moved
    assert verify_models(reference, simplified, provider="cpu").equivalent
    report = audit_models(reference, simplified)
    assert report.exit_code == 0, report.summary


def _layers(per_channel: bool) -> onnx.ModelProto:
    """Four MatMul + Add + Relu layers, the last one's output scaled (a scalar or a vector), one more layer."""
    rng = np.random.default_rng(2)
    inits, nodes, last = [], [], "x"

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    for layer in range(5):
        weight, bias = const(f"w{layer}", rng.standard_normal((_WIDTH, _WIDTH)) / 3), const(f"b{layer}", rng.standard_normal(_WIDTH) / 4)
        nodes += [helper.make_node("MatMul", [last, weight], [f"m{layer}"], name=f"mm{layer}"),
                  helper.make_node("Add", [f"m{layer}", bias], [f"a{layer}"], name=f"add{layer}")]  # fmt: skip
        if layer < 4:
            nodes.append(helper.make_node("Relu", [f"a{layer}"], [f"r{layer}"], name=f"relu{layer}"))
            last = f"r{layer}"
        if layer == 3:
            scale = rng.uniform(0.3, 0.8, _WIDTH) if per_channel else np.array(0.5)
            nodes.append(helper.make_node("Mul", [last, const("scale", scale)], ["scaled"], name="scale.mul"))
            last = "scaled"
    graph = helper.make_graph(
        nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [_SEQ, _WIDTH])],
        [helper.make_tensor_value_info("a4", TensorProto.FLOAT, [_SEQ, _WIDTH])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with ``scale.mul`` deleted and its factor folded into the next layer's weight (rows: its inputs)."""
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    folded = _without(model, "scale.mul")
    weight = values["w4"] * values["scale"].reshape(-1, 1).astype(np.float32)
    index = next(number for number, tensor in enumerate(folded.graph.initializer) if tensor.name == "w4")
    folded.graph.initializer[index].CopyFrom(numpy_helper.from_array(weight, "w4"))
    return folded


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_scale_deleted_before_a_weight_kept_as_it_was_is_modified(per_channel: bool) -> None:
    reference = _layers(per_channel)
    suspect = _without(reference, "scale.mul")
    assert not verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary
    assert "Mul 'scale.mul' removed: its readers read its input in the suspect" in report.summary


@pytest.mark.parametrize("permuted", [False, True])
def test_a_scale_folded_into_the_next_weight_is_no_edit(permuted: bool) -> None:
    """The factor folded into the next MatMul's weight by hand (no converter's trace): the reader holds it.

    The permuted copy folds its own (permuted) scale: the weight is compared in any order. (With
    the reader's evidence ignored, each read ``modified``. A vector folded so is a weight change
    the resync reports.)
    """
    reference = _layers(per_channel=False)
    source = permute_copy(reference, 5)[0] if permuted else reference
    suspect = _folded(source)
    assert verify_models(reference, suspect, provider="cpu").equivalent
    wrong = copy_model(suspect)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(reference, wrong, provider="cpu").equivalent  # a wrong permutation is caught
    report = audit_models(reference, suspect)
    assert report.verdict == ("permuted" if permuted else "converted") and report.exit_code == 0, report.summary
