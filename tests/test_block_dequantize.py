"""Int4 weights in blocks behind ``DequantizeLinear(axis=0, block_size=32)`` (held-out round 13, F1).

ONNX Runtime's ``MatMulNBitsQuantizer`` in its QDQ form stores each MatMul weight as int4
(symmetric) or uint4 with uint4 zero points (asymmetric), scales per block of 32 along K. An
untouched copy was audited ``modified``: numpy gives int4/uint4 (ml_dtypes) the dtype kind
"V", so the dequantization read them as floats and dropped the zero points; and the symmetric
quantizer maps a block's largest magnitude to -8 and clips the other sign's +8 to 7, one whole
step, where the audit allowed half a step. Each form is made by the real quantizer where it
imports and by :func:`fixtures.block_dequantize.hand_qdq` (the same bytes, by its rule)
everywhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from fixtures.block_dequantize import BLOCK, float_mlp, hand_qdq, ort_qdq, shared_mlp
from onnxlady import analyze, audit
from onnxlady._api._permute import nothing_permutable
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._values import read_constant
from onnxlady.testing import copy_model, permute_copy

Maker = Callable[..., onnx.ModelProto]


def _ort(model: onnx.ModelProto, *, symmetric: bool) -> onnx.ModelProto:
    try:
        return ort_qdq(model, symmetric=symmetric)
    except ImportError as exc:  # the quantizer needs onnx_ir
        pytest.skip(f"ONNX Runtime's MatMulNBitsQuantizer cannot run here: {exc}")


MAKERS: dict[str, Maker] = {"ort": _ort, "hand": hand_qdq}
FORMS = [(maker, symmetric) for maker in MAKERS for symmetric in (True, False)]
IDS = [f"{maker}-{'symmetric' if symmetric else 'asymmetric'}" for maker, symmetric in FORMS]


def _initializer(model: onnx.ModelProto, name: str) -> tuple[int, np.ndarray]:
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            return index, numpy_helper.to_array(tensor)
    raise AssertionError(f"no initializer {name}")


def _replace(model: onnx.ModelProto, name: str, tensor: onnx.TensorProto) -> None:
    index, _ = _initializer(model, name)
    model.graph.initializer[index].CopyFrom(tensor)


def _audit(tmp_path: Path, reference: onnx.ModelProto, suspect: onnx.ModelProto):  # type: ignore[no-untyped-def]
    onnx.save(reference, tmp_path / "reference.onnx")
    onnx.save(suspect, tmp_path / "suspect.onnx")
    return audit(tmp_path / "reference.onnx", tmp_path / "suspect.onnx")


def _dequantized(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The ONNX reference implementation's output of one DequantizeLinear of constants."""
    inputs = {t.name: t for t in model.graph.initializer}
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
                              [inputs[name] for name in node.input if name])
    single = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return np.asarray(ReferenceEvaluator(single).run(None, {})[0])


def _dequantize_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes = [node for node in model.graph.node if node.op_type == "DequantizeLinear"]
    assert len(nodes) == 3 and all(helper.get_attribute_value(a) == BLOCK for n in nodes for a in n.attribute
                                   if a.name == "block_size")
    return nodes


def test_the_hand_form_is_the_quantizers_bytes() -> None:
    """The fallback fixture is the quantizer's output, byte for byte (where the quantizer runs)."""
    for source, symmetric in itertools.product((float_mlp(0), shared_mlp(0)), (True, False)):
        real, hand = _ort(source, symmetric=symmetric), hand_qdq(source, symmetric=symmetric)
        assert [(n.op_type, list(n.input)) for n in real.graph.node] == [(n.op_type, list(n.input)) for n in hand.graph.node]
        assert {t.name: t.SerializeToString() for t in real.graph.initializer} == {
            t.name: t.SerializeToString() for t in hand.graph.initializer}


@pytest.mark.parametrize(("maker", "symmetric"), FORMS, ids=IDS)
def test_block_dequantization_reads_as_onnx_defines_it(maker: str, symmetric: bool) -> None:
    """Every weight read through its DequantizeLinear is the ONNX reference implementation's output.

    Fails on HEAD for the asymmetric form: the uint4 zero points were dropped.
    """
    model = MAKERS[maker](float_mlp(0), symmetric=symmetric)
    graph = ModelGraph(model)
    for node in _dequantize_nodes(model):
        read = read_constant(graph, node.output[0])
        assert read is not None
        np.testing.assert_array_equal(read.value, _dequantized(model, node).astype(np.float64))


@pytest.mark.parametrize(("maker", "symmetric"), FORMS, ids=IDS)
def test_the_bound_is_the_quantizers_rounding(maker: str, symmetric: bool) -> None:
    """Each original weight lies within the bound, which is half a step except at a symmetric +7.

    The symmetric quantizer's clipped +8 is one step off (the bound there is one step, and some
    weight needs more than half of it: fails on HEAD, whose bound was half a step everywhere).
    """
    source = float_mlp(0)
    model = MAKERS[maker](source, symmetric=symmetric)
    graph = ModelGraph(model)
    beyond_half = 0
    for node in _dequantize_nodes(model):
        read = read_constant(graph, node.output[0])
        assert read is not None
        weight = _initializer(source, node.input[0].removesuffix("_DQ_Q4"))[1].astype(np.float64)
        _, scale = _initializer(model, node.input[1])
        step = np.repeat(np.abs(scale.astype(np.float64)), BLOCK, axis=0)
        stored = _initializer(model, node.input[0])[1].astype(np.int64)
        clipped = (stored == 7) if symmetric else np.zeros(stored.shape, dtype=bool)
        # The bound is the rule's: one step at a symmetric +7, half a step elsewhere (and the
        # float32 half-ulp of the dequantized value).
        np.testing.assert_allclose(read.error, np.where(clipped, 1.0, 0.5) * step, rtol=1e-5)
        assert np.all(np.abs(read.value - weight) <= read.error)
        beyond_half += int(np.sum(np.abs(read.value - weight) > 0.5 * step * (1 + 1e-6)))
    assert (beyond_half > 0) == symmetric  # the fixture exercises the clipped step


@pytest.mark.parametrize(("maker", "symmetric"), FORMS, ids=IDS)
def test_an_untouched_quantized_copy_is_converted(tmp_path: Path, maker: str, symmetric: bool) -> None:
    """Fails on HEAD: ``modified`` (both forms)."""
    source = float_mlp(0)
    result = _audit(tmp_path, source, MAKERS[maker](source, symmetric=symmetric))
    assert result.verdict == "converted", result.report.summary if hasattr(result.report, "summary") else result.verdict
    assert result.exit_code == 0


@pytest.mark.parametrize(("maker", "symmetric"), FORMS, ids=IDS)
def test_a_permuted_quantized_copy_is_permuted(tmp_path: Path, maker: str, symmetric: bool) -> None:
    """The reference permuted, then quantized: ``permuted``; a wrong permutation is caught.

    Fails on HEAD: ``modified``.
    """
    source = float_mlp(0)
    permuted, analysis, perms, _ = permute_copy(source, 5)
    assert sum(g.permutable for g in analysis.groups) == 2 and all(not np.array_equal(p, np.arange(len(p))) for p in perms.values())
    result = _audit(tmp_path, source, MAKERS[maker](permuted, symmetric=symmetric))
    assert result.verdict == "permuted"
    assert result.exit_code == 0
    # Wrong: the first layer's output columns permuted, the second layer's rows not.
    wrong = copy_model(source)
    index, weight = _initializer(wrong, "fc0.weight")
    wrong.graph.initializer[index].CopyFrom(numpy_helper.from_array(weight[:, ::-1].copy(), "fc0.weight"))
    result = _audit(tmp_path, source, MAKERS[maker](wrong, symmetric=symmetric))
    assert result.verdict not in ("converted", "permuted")


@pytest.mark.parametrize(("maker", "symmetric"), FORMS, ids=IDS)
def test_one_blocks_scale_doubled_is_not_converted(tmp_path: Path, maker: str, symmetric: bool) -> None:
    """One block of one column (32 weights) read with its scale doubled: not ``converted``."""
    source = float_mlp(0)
    model = MAKERS[maker](source, symmetric=symmetric)
    _, scale = _initializer(model, "fc1.weight_DQ_scales")
    scale = scale.copy()
    scale[1, 3] *= 2
    _replace(model, "fc1.weight_DQ_scales", numpy_helper.from_array(scale, "fc1.weight_DQ_scales"))
    result = _audit(tmp_path, source, model)
    assert result.verdict not in ("converted", "permuted")
    assert result.exit_code == 1


@pytest.mark.parametrize(("maker", "symmetric"), FORMS, ids=IDS)
@pytest.mark.parametrize("where", ["inside", "to-the-top"])
def test_a_weight_edited_beyond_rounding_is_flagged(tmp_path: Path, maker: str, symmetric: bool, where: str) -> None:
    """One stored integer moved by one step, beyond the rounding bound but within the next wider one: flagged.

    ``inside``: an integer inside the range moved up by one where the weight was rounded down
    (it now lies 0.6 to 0.9 steps off: caught by the half-step bound, missed by a bound of one
    step everywhere). ``to-the-top``: an integer one below the type's largest value (7, or 15
    unsigned) moved up to it, where the weight lay below it: now 1.1 to 1.45 steps off, beyond
    even the clipped +7's one step.
    """
    source = float_mlp(0)
    model = MAKERS[maker](source, symmetric=symmetric)
    name = "fc1.weight_DQ_Q4"
    _, stored = _initializer(model, name)
    q = stored.astype(np.int64)
    _, scale = _initializer(model, "fc1.weight_DQ_scales")
    zero = (_initializer(model, "fc1.weight_DQ_zero_points")[1].astype(np.int64) if not symmetric
            else np.zeros(scale.shape, dtype=np.int64))
    weight = _initializer(source, "fc1.weight")[1].astype(np.float64)
    # Where each weight lies from its stored integer, in steps (the scale may be negative).
    residual = weight / np.repeat(scale.astype(np.float64), BLOCK, axis=0) + np.repeat(zero, BLOCK, axis=0) - q
    top, bottom = (7, -8) if symmetric else (15, 0)
    if where == "inside":
        candidates = np.argwhere((q > bottom) & (q < top - 1) & (residual > 0.1) & (residual < 0.4))
    else:
        candidates = np.argwhere((q == top - 1) & (residual < -0.1) & (residual > -0.45))
    assert len(candidates), "the fixture holds no such weight"
    row, col = candidates[0]
    q[row, col] += 1
    _replace(model, name, numpy_helper.from_array(q.astype(stored.dtype), name))
    result = _audit(tmp_path, source, model)
    assert result.verdict not in ("converted", "permuted")
    assert result.exit_code == 1


def test_the_quantized_model_itself_is_refused_with_its_reason() -> None:
    """Permuting the QDQ model itself: int4 weights make no neurons that move, and the refusal says why.

    Moving K rows across blocks would change the quantized values, and nibbles are never moved.
    Fails on HEAD: "no Conv, Gemm or MatMul with a constant weight".
    """
    for symmetric in (True, False):
        analysis = analyze(hand_qdq(float_mlp(0), symmetric=symmetric))
        assert not any(group.permutable for group in analysis.groups)
        why = nothing_permutable(analysis, "m")
        assert "3 weights pack two values per byte" in why and "MatMul 'fc0' reads 'fc0.weight_DQ_Q4'" in why, why


@pytest.mark.parametrize(("maker", "symmetric"), FORMS, ids=IDS)
def test_a_shared_weight_stored_as_int4_and_float_is_converted(tmp_path: Path, maker: str, symmetric: bool) -> None:
    """ALBERT's shared weight, quantized where a MatMul reads it and float where an Identity does.

    The two copies differ by the int4 rounding, within the bound: ``converted`` (and ``permuted``
    for a permuted reference); the float copy scaled, or the int4 copy's block scale doubled, is
    still a changed copy. Fails without the copies' comparison allowing the storage bound
    ("a stored copy of a constant changed").
    """
    source = shared_mlp(0)
    model = MAKERS[maker](source, symmetric=symmetric)
    assert {"fc1.weight", "fc1.weight_DQ_Q4"} <= {t.name for t in model.graph.initializer}
    result = _audit(tmp_path, source, model)
    assert (result.verdict, result.exit_code) == ("converted", 0)
    permuted, analysis, _, _ = permute_copy(source, 5)
    assert any(group.permutable for group in analysis.groups)
    result = _audit(tmp_path, source, MAKERS[maker](permuted, symmetric=symmetric))
    assert (result.verdict, result.exit_code) == ("permuted", 0)
    scaled = copy_model(model)
    _, weight = _initializer(scaled, "fc1.weight")
    _replace(scaled, "fc1.weight", numpy_helper.from_array((weight * 1.5).astype(weight.dtype), "fc1.weight"))
    assert _audit(tmp_path, source, scaled).verdict not in ("converted", "permuted")
    doubled = copy_model(model)
    _, scale = _initializer(doubled, "fc1.weight_DQ_scales")
    scale = scale.copy()
    scale[0, 5] *= 2
    _replace(doubled, "fc1.weight_DQ_scales", numpy_helper.from_array(scale, "fc1.weight_DQ_scales"))
    assert _audit(tmp_path, source, doubled).verdict not in ("converted", "permuted")
