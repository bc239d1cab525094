"""A fused convolution's residual rewired, audited whichever of the two models is the fused one.

ONNX Runtime's ORT-mobile path writes ``Add(Conv(x), z)`` as ``com.microsoft FusedConv(x, W, B, z)``
(:mod:`tests.test_fusedconv_sum_input`). Two edits of that residual are modifications of the
reference, not other models:

- the sum input ``z`` made to read the block's input instead of its 1x1 shortcut convolution: the
  shortcut then computes nothing the outputs read. Its connections go around it, which counted
  the one edit again and refused the copy as "different models" (exit 2);
- the reference the fused copy and the suspect the plain model with its residual ``Add``
  rewired: the sum input was compared only with the plain model as the reference, and the
  suspect read ``converted`` (exit 0) while computing something else.

Every fused model here is written by ONNX Runtime itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_fusedconv_sum_input import _summed, ort_mobile, residual_cnn

from fixtures import FIXTURES
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._resync._match import check_same_model, match_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def shortcut_cnn(seed: int = 0) -> onnx.ModelProto:
    """A CNN whose first block adds a 1x1 shortcut convolution of its input (as wide as the block) to two 3x3 ones."""
    return residual_cnn(seed, stem=16, blocks=3)


def ghost_like_cnn(seed: int = 0) -> onnx.ModelProto:
    """GhostNet's pattern: identity residuals around a block whose shortcut is fused with its sum.

    The residuals are ``Add(Relu(Conv(x)), x)``, kept as ``Add`` by ONNX Runtime; the block adds a
    1x1 shortcut convolution to two 3x3 ones (``FusedConv`` 'sb.c2' with ``Z`` 'sb.short').
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name: str, x: str, k: int) -> str:
        weight = (rng.standard_normal((16, 16, k, k)) / np.sqrt(16 * k * k)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"{name}.w"))
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(16)).astype(np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, pads=[k // 2] * 4))
        return name

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"], name=f"{x}.relu"))
        return f"{x}.relu"

    def identity_block(name: str, x: str) -> str:
        nodes.append(helper.make_node("Add", [relu(conv(f"{name}.c", x, 3)), x], [f"{name}.sum"], name=f"{name}.sum"))
        return f"{name}.sum"

    inits.append(numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) / 5).astype(np.float32), "stem.w"))
    nodes.append(helper.make_node("Conv", ["x", "stem.w"], ["stem"], name="stem", pads=[1] * 4))
    x = relu("stem")
    for block in range(4):
        x = identity_block(f"i{block}", x)
    main = conv("sb.c2", relu(conv("sb.c1", x, 3)), 3)
    nodes.append(helper.make_node("Add", [conv("sb.short", x, 1), main], ["sb.sum"], name="sb.sum"))
    x = identity_block("last", "sb.sum")
    nodes.append(helper.make_node("GlobalAveragePool", [conv("head", x, 1)], ["out"], name="pool"))
    graph = helper.make_graph(
        nodes, "ghost", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _shortcut_unused(fused: onnx.ModelProto) -> None:
    # The sum input reads the block's input: the 1x1 shortcut convolution feeds nothing.
    node = _node(fused, "b1.c2")
    assert node.op_type == "FusedConv" and node.input[3] == "b1.short"
    node.input[3] = "stem.relu"


def test_a_sum_input_rewired_around_a_shortcut_is_modified_not_another_model() -> None:
    reference = shortcut_cnn()
    suspect = ort_mobile(reference)
    _shortcut_unused(suspect)
    assert not verify_models(reference, suspect, provider="cpu").equivalent
    check_same_model(match_models(reference, suspect))  # refused as "different models" before
    report = audit_models(reference, suspect)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary
    assert "FusedConv 'b1.c2' input 3 reads 'stem.relu'" in report.summary, report.summary
    assert "'b1.short'" in report.summary, report.summary


def test_only_the_connections_around_the_unused_layer_are_left_out() -> None:
    """The shortcut's bypass costs no connection; another rewiring beside it still counts."""
    reference = shortcut_cnn()
    suspect = ort_mobile(reference)
    _shortcut_unused(suspect)
    assert match_models(reference, suspect).shares[2] == pytest.approx(1.0)
    node = _node(suspect, "b3.c1")  # and block 3's residual reads block 1's output: not around the shortcut
    assert node.input[3] == "b2.sum.relu"
    node.input[3] = "b1.sum"
    assert match_models(reference, suspect).shares[2] < 0.9


def test_another_model_with_a_layer_made_unused_is_still_refused() -> None:
    """The connections around an unused layer are excused only where that layer pairs a live one."""
    suspect = ort_mobile(shortcut_cnn())
    _shortcut_unused(suspect)
    for reference in (FIXTURES["resnet"](0), residual_cnn()):
        with pytest.raises(OnnxladyError, match="different models"):
            check_same_model(match_models(reference, suspect))


def _residual_rewired(plain: onnx.ModelProto) -> None:
    # Block 4's residual Add reads block 2's output (same shape) instead of block 3's.
    node = _node(plain, "b4.sum")
    assert list(node.input) == ["b4.c1", "b3.sum.relu"]
    node.input[1] = "b2.sum.relu"


def _plain_shortcut_unused(plain: onnx.ModelProto) -> None:
    node = _node(plain, "b1.sum")
    assert list(node.input) == ["b1.short", "b1.c2"]
    node.input[0] = "stem.relu"


#: (plain model, edit of it, the fused convolution whose sum input the edit changes)
REVERSED: dict[str, tuple[Callable[[int], onnx.ModelProto], Callable[[onnx.ModelProto], None], str]] = {
    "residual": (residual_cnn, _residual_rewired, "b4.c1"),
    "shortcut": (shortcut_cnn, _plain_shortcut_unused, "b1.c2"),
}


@pytest.mark.parametrize("name", sorted(REVERSED))
def test_the_plain_suspect_of_a_fused_reference_has_its_residual_compared(name: str) -> None:
    """REF = ORT-mobile(plain), SUS = plain with its residual Add rewired: modified (was converted, exit 0)."""
    build, edit, fused_name = REVERSED[name]
    plain = build(0)
    reference = ort_mobile(plain)
    assert fused_name in {n.name for n in _summed(reference)}
    untouched = audit_models(reference, plain)
    assert untouched.verdict == "converted" and untouched.exit_code == 0, untouched.summary
    suspect = copy_model(plain)
    edit(suspect)
    assert not verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary
    assert f"FusedConv '{fused_name}' input 3 reads" in report.summary, report.summary
    assert "the suspect's residual Add after its Conv reads" in report.summary, report.summary


@pytest.mark.parametrize("name", ["resnet", "residual", "shortcut"])
def test_the_permuted_plain_suspect_of_a_fused_reference_is_permuted(name: str) -> None:
    """REF = ORT-mobile(plain), SUS = permuted plain: permuted (no false rewiring); a wrong permutation is caught."""
    plain = {"resnet": FIXTURES["resnet"], "residual": residual_cnn, "shortcut": shortcut_cnn}[name](0)
    reference = ort_mobile(plain)
    assert _summed(reference)
    model, _, _, key = permute_copy(plain, 3)
    assert key.permutations()
    assert verify_models(reference, model, provider="cpu").equivalent
    report = audit_models(reference, model)
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(reference, wrong, provider="cpu").equivalent
    report = audit_models(reference, wrong)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary


def _skips_the_main_branch(model: onnx.ModelProto) -> None:
    # The last identity residual reads the shortcut's output, not the block's sum: the 3x3 branch is skipped there.
    node = _node(model, "last.sum")
    assert node.op_type == "Add" and node.input[1] == "sb.sum"
    node.input[1] = "sb.short"


@pytest.mark.parametrize("fused", ["suspect", "reference"])
def test_a_kept_residual_rewired_to_the_fused_sum_input_is_modified(fused: str) -> None:
    """An ``Add`` ORT keeps, made to read the sum input of the FusedConv it read: modified.

    The Add that FusedConv took in is gone, but its output's name is not: the read is no
    converter's (both directions read ``converted``, exit 0, before).
    """
    plain = ghost_like_cnn()
    optimized = ort_mobile(plain)
    assert _node(optimized, "sb.c2").input[3] == "sb.short" and _node(optimized, "sb.c2").output[0] == "sb.sum"
    reference, suspect = (plain, copy_model(optimized)) if fused == "suspect" else (optimized, copy_model(plain))
    assert audit_models(reference, suspect).verdict == "converted"
    _skips_the_main_branch(suspect)
    assert not verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary
    assert "Add 'last.sum' input 1 reads 'sb.short' in the suspect" in report.summary, report.summary


@pytest.mark.parametrize("fused", ["suspect", "reference"])
def test_the_permuted_ghost_like_copy_is_permuted(fused: str) -> None:
    plain = ghost_like_cnn()
    model, analysis = permute_copy(plain, 3)[:2]
    reference, suspect = (plain, ort_mobile(model)) if fused == "suspect" else (ort_mobile(plain), model)
    assert verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary
    wrong = copy_model(model)
    permute_producer_only(wrong, analysis)
    wrong = ort_mobile(wrong) if fused == "suspect" else wrong
    assert not verify_models(reference, wrong, provider="cpu").equivalent
    assert audit_models(reference, wrong).exit_code == 1
