"""A causal-mask fill value beyond float16's range, saturated by the float16 converter, is storage rounding.

HF's eager attention (CLIP's text model, BART's decoder) builds its causal mask from constants
as ``Where(cols <= rows, 0, finfo(float32).min)``. ONNX Runtime's float16 converter stores the
fill value -3.4e38 as -65504, the most negative finite half. The audit computes the mask in both
models and called the clamp an edit: an untouched float16 copy read ``modified`` (held-out
round 14, F6). A value beyond float16's range is now compared as float16 stores it (+-65504 or
+-inf), only where the suspect's value is held in float16; a fill moved within float16's range
(-100 made -200, -3.4e38 made 0) and a float32 copy holding -65504 are still ``modified``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady import analyze, audit, verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

float16 = pytest.importorskip("onnxruntime.transformers.float16", reason="onnxruntime.transformers not installed")

TOKENS, WIDTH = 8, 16
FLOAT32_MIN = float(np.finfo(np.float32).min)


def _causal_attention(fill: float = FLOAT32_MIN) -> onnx.ModelProto:
    """One self-attention layer whose causal mask is ``Where(cols <= rows, 0, fill)``, computed from Constant nodes."""
    rng = np.random.default_rng(7)

    def constant(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=f"{name}.node", value=numpy_helper.from_array(value, name))

    def weight(name: str, rows: int, cols: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32), name)

    nodes = [
        constant("cols", np.arange(TOKENS, dtype=np.int64).reshape(1, TOKENS)),
        constant("rows", np.arange(TOKENS, dtype=np.int64).reshape(TOKENS, 1)),
        constant("zero", np.array(0.0, np.float32)),
        constant("fill", np.array(fill, np.float32)),
        helper.make_node("LessOrEqual", ["cols", "rows"], ["allowed"], name="allowed"),
        helper.make_node("Where", ["allowed", "zero", "fill"], ["mask"], name="mask"),
        helper.make_node("MatMul", ["input", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["input", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["input", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="masked"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="probs", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context"], name="context"),
        helper.make_node("MatMul", ["context", "wo"], ["output"], name="o_proj"),
    ]
    initializers = [weight(name, WIDTH, WIDTH) for name in ("wq", "wk", "wv", "wo")]
    graph = helper.make_graph(
        nodes, "causal_attention", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, TOKENS, WIDTH])], initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxlady-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _half(model: onnx.ModelProto, **options: object) -> onnx.ModelProto:
    """``model`` through ONNX Runtime's float16 converter (float32 inputs and outputs kept)."""
    return float16.convert_float_to_float16(copy_model(model), keep_io_types=True, **options)


def _fill_of(model: onnx.ModelProto) -> onnx.TensorProto:
    node = next(node for node in model.graph.node if node.name == "fill.node")
    return node.attribute[0].t


def _with_fill(model: onnx.ModelProto, value: float) -> onnx.ModelProto:
    """``model`` with its mask's fill value set to ``value``, stored in the fill's own type."""
    changed = copy_model(model)
    tensor = _fill_of(changed)
    stored = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array(np.array(value, dtype=stored.dtype), tensor.name))
    return changed


def _verdict(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> tuple[str, int, str]:
    report = audit(reference, suspect)
    return report.verdict, report.exit_code, report.summary


@pytest.mark.parametrize("options", [{}, {"op_block_list": ["Add"]}], ids=["float16", "float16-add-blocked"])
def test_the_saturated_fill_value_is_a_conversion(options: dict[str, object]) -> None:
    reference = _causal_attention()
    suspect = _half(reference, **options)
    assert np.array_equal(numpy_helper.to_array(_fill_of(suspect)), np.finfo(np.float16).min)  # clamped, not -inf
    assert verify_models(reference, suspect).equivalent
    verdict, code, summary = _verdict(reference, suspect)
    assert (verdict, code) == ("converted", 0), summary


def test_a_permuted_float16_copy_is_permuted_and_a_wrong_permutation_is_caught() -> None:
    reference = _causal_attention()
    permuted, _, perms, _ = permute_copy(reference, 3)
    assert perms
    suspect = _half(permuted)
    assert verify_models(reference, suspect).equivalent
    verdict, code, summary = _verdict(reference, suspect)
    assert (verdict, code) == ("permuted", 0), summary
    wrong = copy_model(reference)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(reference, _half(wrong)).equivalent


@pytest.mark.parametrize(
    ("fill", "changed"), [(FLOAT32_MIN, 0.0), (FLOAT32_MIN, -100.0), (-100.0, -200.0)],
    ids=["-3.4e38-made-0", "-3.4e38-made-100", "-100-made-200"],
)  # fmt: skip
def test_a_fill_value_moved_within_float16s_range_is_modified(fill: float, changed: float) -> None:
    reference = _causal_attention(fill)
    assert _verdict(reference, _half(reference))[:2] == ("converted", 0)
    verdict, code, summary = _verdict(reference, _with_fill(_half(reference), changed))
    assert (verdict, code) == ("modified", 1), summary
    assert "computed from constants" in summary


def _folded_mask(model: onnx.ModelProto, fill: float) -> onnx.ModelProto:
    """``model`` with its mask folded into one stored float32 constant (as ONNX Runtime's optimizer folds it)."""
    folded = copy_model(model)
    computed = {"cols.node", "rows.node", "zero.node", "fill.node", "allowed", "mask"}
    kept = [node for node in folded.graph.node if node.name not in computed]
    del folded.graph.node[:]
    folded.graph.node.extend(kept)
    allowed = np.arange(TOKENS)[None, :] <= np.arange(TOKENS)[:, None]
    folded.graph.initializer.append(numpy_helper.from_array(np.where(allowed, 0.0, fill).astype(np.float32), "mask"))
    onnx.checker.check_model(folded)
    return folded


def test_a_float32_copy_holding_the_clamped_value_is_modified() -> None:
    """Only a value held in float16 is saturated: a float32 copy storing -65504 computes another mask."""
    reference = _causal_attention()
    verdict, code, summary = _verdict(reference, _folded_mask(reference, FLOAT32_MIN))
    assert (verdict, code) == ("converted", 0), summary  # the fold itself is a conversion
    verdict, code, summary = _verdict(reference, _folded_mask(reference, -65504.0))
    assert (verdict, code) == ("modified", 1), summary
    assert "computed from constants" in summary
