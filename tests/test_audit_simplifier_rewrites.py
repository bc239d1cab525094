"""What onnx-simplifier and onnxslim write is no graph edit (session 13, h7 item 4).

Each of these untouched models was audited ``modified`` ("graph edited with the weights kept",
exit 1; verify equivalent) on the simplifier's own output:

- a ``Pad`` folded into the Conv that reads it (``conv_transpose``: "Conv has other attributes",
  its ``pads`` 0 made 1 with the Pad gone; onnxsim and onnxslim);
- a Slice of the whole tensor dropped, its output name given to the Relu before it
  (``split_concat``: "Slice is Relu in the suspect"; onnxslim);
- a ``Loop`` body sorted again (``if_branch``, ``loop_body``: "Loop has other attributes";
  onnxslim).

Edits made to the same outputs are still found (the test of the test).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import helper

from fixtures import FIXTURES
from fixtures.deployment import convert, unavailable
from fixtures.recurrent import FIXTURES as RECURRENT
from onnxlady import audit, verify_models
from onnxlady._audit._graph_edits import graph_edits
from onnxlady.testing import copy_model

logging.getLogger("onnxruntime").setLevel(logging.ERROR)

BUILDERS = {**FIXTURES, "loop_body": RECURRENT["loop_body"]}


def _converted(name: str, converter: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    reason = unavailable(converter)
    if reason:
        pytest.skip(reason)
    source = BUILDERS[name](0)
    return source, convert(source, converter)


def _audit(tmp_path: Path, reference: onnx.ModelProto, suspect: onnx.ModelProto):  # type: ignore[no-untyped-def]
    onnx.save(reference, tmp_path / "reference.onnx")
    onnx.save(suspect, tmp_path / "suspect.onnx")
    return audit(tmp_path / "reference.onnx", tmp_path / "suspect.onnx")


def _node(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    for node in graph.node:
        if node.name == name:
            return node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                try:
                    return _node(attribute.g, name)
                except KeyError:
                    pass
    raise KeyError(name)


def _unpad_other_conv(model: onnx.ModelProto) -> None:
    """A Conv that reads no Pad, its ``pads`` set to zeros: the output shrinks, the next layers see other pixels."""
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and any(a.name == "pads" and any(a.ints) for a in n.attribute))
    for attribute in conv.attribute:
        if attribute.name == "pads":
            attribute.CopyFrom(helper.make_attribute("pads", [0] * len(attribute.ints)))


def _abs(name: str) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        _node(model.graph, name).op_type = "Abs"
    return edit


CASES = {
    "conv_transpose-onnxsim": ("conv_transpose", "onnxsim", None),
    "conv_transpose-onnxslim": ("conv_transpose", "onnxslim", None),
    "split_concat-onnxslim": ("split_concat", "onnxslim", _abs("c2f.cv2_relu")),
    "if_branch-onnxslim": ("if_branch", "onnxslim", None),
    "loop_body-onnxslim": ("loop_body", "onnxslim", _abs("loop.relu_a")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_simplifiers_output_is_no_edit(tmp_path: Path, case: str) -> None:
    name, converter, _ = CASES[case]
    source, simplified = _converted(name, converter)
    assert verify_models(source, simplified).equivalent
    result = _audit(tmp_path, source, simplified)
    assert result.verdict in ("converted", "identical") and result.exit_code == 0, result.summary


@pytest.mark.parametrize("case", sorted(case for case, (_, _, edit) in CASES.items() if edit is not None))
def test_an_edit_in_a_simplifiers_output_is_still_modified(tmp_path: Path, case: str) -> None:
    name, converter, edit = CASES[case]
    assert edit is not None
    source, simplified = _converted(name, converter)
    suspect = copy_model(simplified)
    edit(suspect)
    assert not verify_models(source, suspect).equivalent
    result = _audit(tmp_path, source, suspect)
    assert result.verdict == "modified" and result.exit_code == 1, result.summary


def test_a_pads_edit_where_no_pad_was_folded_is_still_modified(tmp_path: Path) -> None:
    source, simplified = _converted("conv_transpose", "onnxsim")
    suspect = copy_model(simplified)
    _unpad_other_conv(suspect)
    result = _audit(tmp_path, source, suspect)
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "has other attributes" in result.summary, result.summary


def test_a_renamed_output_is_an_edit_where_the_operator_before_is_not_the_one_dropped() -> None:
    """Another type under one output name: a simplifier's only where the suspect's is the reference's operator before."""
    source, simplified = _converted("split_concat", "onnxslim")
    assert graph_edits(source, simplified, node_for_node=False) == []
    suspect = copy_model(simplified)
    _node(suspect.graph, "c2f.cv2_relu").name = "renamed"
    assert any("is Relu in the suspect" in line for line in graph_edits(source, suspect, node_for_node=False))
