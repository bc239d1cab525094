"""A folded integer input holding another value than the chain it replaces (held-out round 18, F2).

RWKV's token shift pads the time axis by one token with a pads tensor computed from
constants (``Concat`` of ``Constant`` pieces). A constant folder stores the value the chain
computes; a literal of another value (a shift by two tokens) with the chain left dead, or
cleaned away, read ``converted``, exit 0, while the outputs differ. The same literal with the
chain's value, or the whole model folded by a converter, is no edit.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady import audit, verify

TIME, WIDTH = 8, 16


def _shift_model(seed: int = 0) -> onnx.ModelProto:
    """The input times W1, mixed with itself shifted one token in time (pads chain of constants), then @ W2."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    w2 = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"], name="fc1"),
        helper.make_node("Constant", [], ["front"], name="front_const",
                         value=numpy_helper.from_array(np.array([0, 1, 0], np.int64))),
        helper.make_node("Constant", [], ["back"], name="back_const",
                         value=numpy_helper.from_array(np.array([0, -1, 0], np.int64))),
        helper.make_node("Concat", ["front", "back"], ["pads"], name="pads_concat", axis=0),
        helper.make_node("Pad", ["h", "pads"], ["shifted"], name="shift", mode="constant"),
        helper.make_node("Sub", ["h", "shifted"], ["mixed"], name="mix"),
        helper.make_node("Relu", ["mixed"], ["act"], name="act"),
        helper.make_node("MatMul", ["act", "w2"], ["output"], name="fc2"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "shift",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, TIME, WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, TIME, WIDTH])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _literal_pads(model: onnx.ModelProto, pads: list[int], *, clean: bool) -> onnx.ModelProto:
    """The Pad made to read a new literal; the chain left dead, or removed with ``clean``."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    nodes = list(edited.graph.node)
    if clean:
        nodes = [n for n in nodes if n.name not in ("front_const", "back_const", "pads_concat")]
    literal = helper.make_node("Constant", [], ["pads_literal"], name="pads_literal",
                               value=numpy_helper.from_array(np.array(pads, np.int64)))
    for node in nodes:
        if node.op_type == "Pad":
            node.input[1] = "pads_literal"
    del edited.graph.node[:]
    edited.graph.node.extend([literal, *nodes])
    return edited


@pytest.mark.parametrize("clean", [False, True], ids=["chain-left-dead", "chain-removed"])
def test_another_literal_in_place_of_a_chain_is_modified(clean: bool) -> None:
    reference = _shift_model()
    suspect = _literal_pads(reference, [0, 2, 0, 0, -2, 0], clean=clean)
    assert not verify(reference, suspect).equivalent  # the tamper computes something else
    report = audit(reference, suspect)
    assert report.verdict == "modified" and report.exit_code == 1
    assert "Pad 'shift' input 1 holds [0, 2, 0, 0, -2, 0]" in report.summary


@pytest.mark.parametrize("clean", [False, True], ids=["chain-left-dead", "chain-removed"])
def test_the_chain_folded_to_its_own_value_is_no_edit(clean: bool) -> None:
    reference = _shift_model()
    suspect = _literal_pads(reference, [0, 1, 0, 0, -1, 0], clean=clean)
    result = verify(reference, suspect)
    assert result.equivalent
    report = audit(reference, suspect)
    assert report.verdict in ("identical", "converted") and report.exit_code == 0, report.summary


def test_a_converter_folding_the_chain_is_no_edit() -> None:
    onnxslim = pytest.importorskip("onnxslim", reason="onnxslim (a deployment converter) is not installed")
    reference = _shift_model()
    suspect = onnxslim.slim(reference)
    assert verify(reference, suspect).equivalent
    report = audit(reference, suspect)
    assert report.exit_code == 0 and report.verdict != "modified", report.summary
