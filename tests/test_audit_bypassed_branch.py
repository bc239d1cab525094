"""A branch cut off where it joined the network (held-out round 17, F1 and F2).

Deleting a residual ``Add`` (a LoRA adapter's) or a gate's ``Mul`` and making its readers read
one of its inputs drops the other branch; every weight stays (the branch left dead, or deleted
with its weights) and every kept operator keeps its name. The audit said ``converted``, exit 0.
A converter removes arithmetic only where one input is a neutral constant, or fuses it into an
operator that writes its output: a join of two computed tensors skipped is ``modified``; a
branch deleted with its layers leaves layers only the reference has: refused, "different
models", exit 2, also after a converter that renames every tensor around it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.deployment import CONVERTERS
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only


def _adapted_mlp() -> onnx.ModelProto:
    """Eight MatMul layers; the third with an unmerged LoRA adapter (``W x + 2 B(A x)``), the sixth gated."""
    rng = np.random.default_rng(11)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / shape[0])).astype(np.float32)

    initializers = [numpy_helper.from_array(np.array(2.0, np.float32), "lora_scale")]
    nodes = []
    x = "x"
    for layer in range(8):
        initializers += [numpy_helper.from_array(weight(32, 32), f"W{layer}"),
                         numpy_helper.from_array(weight(32) * 0.1, f"b{layer}")]
        nodes += [helper.make_node("MatMul", [x, f"W{layer}"], [f"xw{layer}"], name=f"mm{layer}"),
                  helper.make_node("Add", [f"xw{layer}", f"b{layer}"], [f"base{layer}"], name=f"bias{layer}")]
        out = f"base{layer}"
        if layer == 2:
            initializers += [numpy_helper.from_array(weight(32, 4), "A"), numpy_helper.from_array(weight(4, 32), "B")]
            nodes += [
                helper.make_node("MatMul", [x, "A"], ["xa"], name="lora_a"),
                helper.make_node("MatMul", ["xa", "B"], ["xab"], name="lora_b"),
                helper.make_node("Mul", ["xab", "lora_scale"], ["lora"], name="lora_mul"),
                helper.make_node("Add", [out, "lora"], ["adapted"], name="lora_add"),
            ]
            out = "adapted"
        nodes.append(helper.make_node("Relu", [out], [f"r{layer}"], name=f"relu{layer}"))
        out = f"r{layer}"
        if layer == 5:
            initializers.append(numpy_helper.from_array(weight(32, 32), "Wg"))
            nodes += [
                helper.make_node("MatMul", [x, "Wg"], ["xg"], name="gate_mm"),
                helper.make_node("Sigmoid", ["xg"], ["g"], name="gate_sigmoid"),
                helper.make_node("Mul", [out, "g"], ["gated"], name="gate_mul"),
            ]
            out = "gated"
        x = out
    initializers += [numpy_helper.from_array(weight(32, 8), "Wh"), numpy_helper.from_array(weight(8) * 0.1, "bh")]
    nodes += [helper.make_node("MatMul", [x, "Wh"], ["yw"], name="head_mm"),
              helper.make_node("Add", ["yw", "bh"], ["y"], name="head_bias")]
    graph = helper.make_graph(
        nodes, "adapted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 8])], initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _bypassed(model: onnx.ModelProto, node_name: str, *, clean: bool = False) -> onnx.ModelProto:
    """``model`` with operator ``node_name`` deleted, its readers reading its first input.

    ``clean`` also deletes what no longer reaches an output, weights included (a graph cleanup).
    """
    changed = copy_model(model)
    node = next(item for item in changed.graph.node if item.name == node_name)
    kept_input, output = node.input[0], node.output[0]
    changed.graph.node.remove(node)
    for item in changed.graph.node:
        for slot, name in enumerate(item.input):
            if name == output:
                item.input[slot] = kept_input
    if clean:
        needed = {value.name for value in changed.graph.output}
        for item in reversed(list(changed.graph.node)):
            if any(name in needed for name in item.output):
                needed.update(item.input)
            else:
                changed.graph.node.remove(item)
        for tensor in [t for t in changed.graph.initializer if t.name not in needed]:
            changed.graph.initializer.remove(tensor)
    return changed


def _equivalent(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> bool:
    return verify_models(reference, suspect, provider="cpu").equivalent


def test_a_lora_adapter_cut_off_is_modified() -> None:
    reference = _adapted_mlp()
    suspect = _bypassed(reference, "lora_add")  # the adapter's MatMuls left dead in the file
    assert not _equivalent(reference, suspect)
    report = audit_models(reference, suspect)
    assert report.verdict == "modified", report.summary
    assert "Add 'lora_add' removed: its readers read its input 'base2'" in report.summary
    assert report.exit_code == 1


@pytest.mark.parametrize("converter", [None, "onnxslim"], ids=["as-cut", "then-onnxslim"])
def test_a_lora_adapter_deleted_is_refused(converter: str | None) -> None:
    """Deleted with its weights: two 128-element layers only the reference has, whatever renames the rest.

    onnxslim writes each MatMul + Add as Reshape -> Gemm -> Reshape under new tensor names, so no
    operator is found under its name to say which join was cut; the layers the suspect lacks
    still say it is no conversion (held-out round 17, F2).
    """
    reference = _adapted_mlp()
    suspect = _bypassed(reference, "lora_add", clean=True)
    if converter is not None:
        suspect = CONVERTERS[converter](suspect)
    assert not _equivalent(reference, suspect)
    with pytest.raises(OnnxladyError, match="a learned layer is only in one of them, which no conversion does: reference: MatMul"):
        audit_models(reference, suspect)


def test_a_gate_skipped_is_modified_and_a_permuted_copy_too() -> None:
    reference = _adapted_mlp()
    suspect = _bypassed(reference, "gate_mul")
    assert not _equivalent(reference, suspect)
    assert "Mul 'gate_mul' removed" in audit_models(reference, suspect).summary
    permuted = permute_copy(reference, 5)[0]
    assert audit_models(reference, permuted).verdict == "permuted"
    cut = _bypassed(permuted, "gate_mul")
    assert audit_models(reference, cut).verdict == "modified"


def test_a_converted_copy_with_the_adapter_cut_off_is_modified() -> None:
    """onnxslim's copy, then the cut: the converted path compares operators by name too."""
    reference = _adapted_mlp()
    slimmed = CONVERTERS["onnxslim"](reference)
    assert _equivalent(reference, slimmed)
    assert audit_models(reference, slimmed).exit_code == 0
    permuted, analysis = permute_copy(reference, 3)[:2]
    slim_permuted = CONVERTERS["onnxslim"](permuted)
    assert _equivalent(reference, slim_permuted)
    assert audit_models(reference, slim_permuted).verdict == "permuted"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)  # a wrong permutation: caught
    assert not _equivalent(reference, wrong)
    assert audit_models(reference, CONVERTERS["onnxslim"](wrong)).exit_code == 1
    cut = _bypassed(slimmed, "lora_add")  # the adapter left dead in the converted copy
    assert not _equivalent(reference, cut)
    report = audit_models(reference, cut)
    assert report.verdict == "modified", report.summary
    assert "lora_add" in report.summary


@pytest.mark.parametrize("converter", ["ort-extended", "ort-all", "onnxsim", "onnxoptimizer"])
def test_the_real_converters_copies_keep_their_verdict(converter: str) -> None:
    """Fused or folded joins (a MatMul and its bias Add as one Gemm) are no cut-off branch."""
    reference = _adapted_mlp()
    converted = CONVERTERS[converter](reference)
    assert _equivalent(reference, converted)
    report = audit_models(reference, converted)
    assert report.exit_code == 0, report.summary
    assert "removed" not in report.summary
