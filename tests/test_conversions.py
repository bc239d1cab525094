"""The conversions of fixtures/conversions.py (issue 6: resync and audit across conversions).

For each conversion and fixture: the result is a new model that onnx's checker accepts, the
source is left as it was, converting twice gives the same bytes, and ONNX Runtime (CPU) gives
outputs within a tolerance fitting the conversion of the source's outputs, measured as the
largest absolute difference over the largest reference value. The same check catches a broken
conversion (two rows of the first weight swapped in the converted model). Then each conversion
is checked to do what it says: no float32 initializer after float16, bfloat16 rounded to
nearest even, no BatchNormalization after folding, no Identity and no original name after
simplify, int8 weights with per-channel scales behind DequantizeLinear after QDQ, the opset
changed in both directions.
"""

from __future__ import annotations

import functools
import re

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from fixtures.conversions import (
    CONVERSIONS,
    NEWEST_OPSET,
    downgrade_opset,
    fold_batchnorm,
    quantize_qdq,
    simplify,
    to_bfloat16_weights,
    to_float16,
    upgrade_opset,
)
from onnxlady._verify._compare import generate_inputs
from onnxlady.testing import copy_model, permute_copy

NAMES = ("vgg", "resnet", "mobilenet", "unfolded_bn", "concat", "matmul_mlp", "encoder_prenorm")
#: Largest output error allowed, as a fraction of the largest reference output.
TOLERANCE = {
    "float16": 1e-2,   # 11-bit mantissa on every intermediate
    "bfloat16": 2e-2,  # 8-bit mantissa on the weights only
    "fold-bn": 1e-4,
    "simplify": 1e-4,
    "qdq": 6e-2,       # 7-bit weights and 8-bit activations: a few % of the output scale
    "opset": 1e-4,
}
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@functools.cache
def _source(name: str) -> onnx.ModelProto:
    return FIXTURES[name](0)


@functools.cache
def _feeds(name: str) -> dict[str, np.ndarray]:
    return generate_inputs(_source(name), None, np.random.default_rng(0))


@functools.cache
def _reference(name: str) -> tuple[np.ndarray, ...]:
    return tuple(_run(_source(name), _feeds(name)))


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _error(name: str, model: onnx.ModelProto) -> float:
    """Largest |converted - reference| over the largest |reference|, across outputs."""
    outputs = _run(model, _feeds(name))
    return max(float(np.max(np.abs(a.astype(np.float64) - b))) / float(np.max(np.abs(b)))
               for a, b in zip(outputs, _reference(name)))


def _constant(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in model.graph.initializer if t.name == name), None)


def _weight_source(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The initializer behind a node's weight, followed back through Cast, DequantizeLinear and
    Identity (its stored form: float16, bfloat16 or int8).
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    for position in ([1] if node.op_type != "MatMul" else [1, 0]):
        name = node.input[position]
        while name in producers and producers[name].op_type in ("Cast", "DequantizeLinear", "Identity"):
            name = producers[name].input[0]
        tensor = _constant(model, name)
        if tensor is not None:
            return tensor
    return None


def _output_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Gemm":
        return 0 if helper.get_node_attr_value(node, "transB") else 1
    return rank - 1 if node.op_type == "MatMul" else 0


def _broken(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy whose last weight has two output channels swapped: a wrong model.

    The last layer, because global pooling averages a wrong channel early in the net down to
    below the float16 and QDQ tolerances; the two channels whose reference outputs differ most
    (their mean over the other axes), so that the swap is not hidden by two near-equal logits.
    """
    broken = copy_model(model)
    reference = _reference(name)[0]
    for node in reversed(broken.graph.node):
        tensor = _weight_source(broken, node) if node.op_type in WEIGHTED else None
        if tensor is not None:
            array = numpy_helper.to_array(tensor).copy()
            axis = _output_axis(node, array.ndim)
            index = np.arange(array.shape[axis])
            pair = [0, -1]
            if reference.shape[-1] == array.shape[axis]:
                means = reference.reshape(-1, reference.shape[-1]).mean(axis=0)
                pair = [int(np.argmax(means)), int(np.argmin(means))]
            index[pair] = index[pair[::-1]]
            tensor.CopyFrom(numpy_helper.from_array(np.take(array, index, axis=axis), tensor.name))
            return broken
    raise AssertionError("no weight to break")


def _folds(model: onnx.ModelProto) -> bool:
    producers = {o: n for n in model.graph.node for o in n.output}
    return any(n.op_type == "BatchNormalization" and getattr(producers.get(n.input[0]), "op_type", "") == "Conv"
               for n in model.graph.node)


CASES = [pytest.param(c, n, id=f"{c}-{n}") for c in CONVERSIONS for n in NAMES]


@pytest.mark.parametrize(("conversion", "name"), CASES)
def test_conversion_keeps_the_function(conversion: str, name: str) -> None:
    source = _source(name)
    if conversion == "fold-bn" and not _folds(source):
        pytest.skip(f"{name} has no BatchNormalization right after a Conv: folding leaves it as it is")
    before = source.SerializeToString()
    converted = CONVERSIONS[conversion](source)
    assert source.SerializeToString() == before, "the source was modified"
    assert converted.SerializeToString() != before, "the conversion changed nothing"
    assert CONVERSIONS[conversion](source).SerializeToString() == converted.SerializeToString()
    onnx.checker.check_model(converted, full_check=True)
    tolerance = TOLERANCE[conversion]
    assert _error(name, converted) <= tolerance
    # The same check fails on a wrong model: it can tell.
    assert _error(name, _broken(converted, name)) > 3 * tolerance


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_conversions_apply_to_a_permuted_model(conversion: str) -> None:
    """Issue 6 converts permuted models (untied copies, permuted BN statistics): same checks."""
    permuted, *_ = permute_copy(_source("resnet"), seed=3)
    assert _error("resnet", permuted) <= 1e-5
    converted = CONVERSIONS[conversion](permuted)
    onnx.checker.check_model(converted, full_check=True)
    assert _error("resnet", converted) <= TOLERANCE[conversion]


def test_conversion_table() -> None:
    assert list(CONVERSIONS) == ["float16", "bfloat16", "fold-bn", "simplify", "qdq", "opset"]


# -- float16 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet", "encoder_prenorm"])
def test_float16_computes_in_half(name: str) -> None:
    model = to_float16(_source(name))
    graph = model.graph
    assert {t.data_type for t in graph.initializer} - {TensorProto.INT64} == {TensorProto.FLOAT16}
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [TensorProto.FLOAT] * 2
    first, last = graph.node[0], graph.node[-1]
    assert (first.op_type, first.input[0], first.output[0]) == ("Cast", "input", "input.fp16")
    assert helper.get_attribute_value(first.attribute[0]) == TensorProto.FLOAT16
    assert (last.op_type, last.output[0]) == ("Cast", graph.output[0].name)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    # Every activation between the boundary Casts is float16 (integer shape tensors aside).
    assert {v.type.tensor_type.elem_type for v in inferred.value_info} - {TensorProto.INT64} == {TensorProto.FLOAT16}


def test_float16_without_io_types_takes_half_inputs() -> None:
    model = to_float16(_source("vgg"), keep_io_types=False)
    assert not any(n.op_type == "Cast" for n in model.graph.node)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    feeds = {k: v.astype(np.float16) for k, v in _feeds("vgg").items()}
    (out,) = _run(model, feeds)
    (ref,) = _reference("vgg")
    assert out.dtype == np.float16
    assert np.max(np.abs(out - ref)) <= TOLERANCE["float16"] * np.max(np.abs(ref))


def test_float16_keeps_float32_where_the_operator_needs_it() -> None:
    """Resize's ``scales`` must be float32: that initializer stays float32, the model runs."""
    source = FIXTURES["conv_transpose"](0)
    model = to_float16(source)
    (resize,) = [n for n in model.graph.node if n.op_type == "Resize"]
    assert _constant(model, resize.input[2]).data_type == TensorProto.FLOAT
    assert _constant(model, resize.input[2]).name == "dec.resize.scales"
    feeds = generate_inputs(source, None, np.random.default_rng(0))
    (out,), (ref,) = _run(model, feeds), _run(source, feeds)
    assert np.max(np.abs(out - ref)) <= TOLERANCE["float16"] * np.max(np.abs(ref))


def test_float16_casts_around_an_operator_without_half_kernels() -> None:
    """Range has no float16 form: its constant bounds stay float32, its computed step is cast
    to float32 before it, its output is cast back to float16 after it.
    """
    scalar = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Abs", ["step_raw"], ["step"], name="abs"),
         helper.make_node("Range", ["start", "limit", "step"], ["range"], name="range"),
         helper.make_node("Add", ["x", "range"], ["y"], name="add")],
        "range", [scalar("x", TensorProto.FLOAT, [1, 4])], [scalar("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(v, dtype=np.float32), n)
         for n, v in (("start", 0.0), ("limit", 4.0), ("step_raw", -1.0))])
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = to_float16(source)
    onnx.checker.check_model(model, full_check=True)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types == {"start": TensorProto.FLOAT, "limit": TensorProto.FLOAT, "step_raw": TensorProto.FLOAT16}
    ops = [(n.name, n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert ops == [("x.to_fp16", "Cast", ["x"], ["x.fp16"]),
                   ("abs", "Abs", ["step_raw"], ["step"]),
                   ("step.to_fp32", "Cast", ["step"], ["step.fp32"]),
                   ("range", "Range", ["start", "limit", "step.fp32"], ["range.fp32"]),
                   ("range.to_fp16", "Cast", ["range.fp32"], ["range"]),
                   ("add", "Add", ["x.fp16", "range"], ["y.fp16"]),
                   ("y.to_fp32", "Cast", ["y.fp16"], ["y"])]
    x = np.array([[0.5, -1.0, 2.25, 3.0]], dtype=np.float32)
    (y,) = _run(model, {"x": x})
    assert np.array_equal(y, x + np.arange(4, dtype=np.float32))


# -- bfloat16 ---------------------------------------------------------------------------------
def _round_bfloat16(array: np.ndarray) -> np.ndarray:
    """Round to nearest even on the bits: add 0x7fff plus the lowest kept bit, truncate."""
    bits = array.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("name", ["resnet", "matmul_mlp", "constant_weights"])
def test_bfloat16_weights_behind_casts(name: str) -> None:
    source = _source(name) if name in NAMES else FIXTURES[name](0)
    model = to_bfloat16_weights(source)
    producers = {o: n for n in model.graph.node for o in n.output}
    stored = {t.name: t for t in model.graph.initializer}
    stored |= {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    originals = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    originals |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                  for n in source.graph.node if n.op_type == "Constant"}
    checked = 0
    for node in model.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        weight = node.input[1]
        cast = producers.get(weight)
        if cast is not None and cast.op_type == "Identity":
            continue  # a weight reached through Identity is not a weight operand itself
        assert cast is not None and cast.op_type == "Cast" and cast.name == f"{weight}.cast"
        assert helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT
        tensor = stored[cast.input[0]]
        assert cast.input[0] == f"{weight}.bf16" and tensor.data_type == TensorProto.BFLOAT16
        bits = numpy_helper.to_array(tensor).view(np.uint16)
        assert np.array_equal(bits, _round_bfloat16(originals[weight]))
        checked += 1
    assert checked >= 3
    # Biases and normalisation parameters are not weights: they stay float32.
    assert any(t.data_type == TensorProto.FLOAT for t in model.graph.initializer) or name == "constant_weights"


def test_bfloat16_rounding_reference_is_nearest_even() -> None:
    halfway = np.array([1.00390625, 1.01171875, -1.00390625], dtype=np.float32)
    assert np.array_equal(_round_bfloat16(halfway), np.array([1.0, 1.015625, -1.0], dtype=ml_dtypes.bfloat16)
                          .view(np.uint16))


# -- BatchNormalization folding -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "unfolded_bn"])
def test_fold_batchnorm_removes_every_batchnorm(name: str) -> None:
    source = _source(name)
    model = fold_batchnorm(source)
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops
    assert ops == [n.op_type for n in source.graph.node if n.op_type != "BatchNormalization"]
    names = {t.name for t in model.graph.initializer}
    assert not any(".bn." in n or n.endswith((".mean", ".var")) for n in names)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    folded = [n for n in convs if len(n.input) > 2 and n.input[2].endswith("_bias_folded")]
    assert folded and all(n.input[2] == f"{n.input[1]}_bias_folded" for n in folded)
    if name == "unfolded_bn":
        assert "InstanceNormalization" in ops


def test_fold_batchnorm_leaves_a_conv_output_read_elsewhere() -> None:
    """A Conv output that is also a graph output cannot disappear: that BN stays."""
    source = copy_model(_source("unfolded_bn"))
    source.graph.output.append(helper.make_tensor_value_info("block1.conv", TensorProto.FLOAT, [1, 16, 32, 32]))
    model = fold_batchnorm(source)
    kept = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert [n.input[0] for n in kept] == ["block1.conv"]
    feeds = _feeds("unfolded_bn")
    for a, b in zip(_run(model, feeds), _run(source, feeds)):
        assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b))


# -- simplify ---------------------------------------------------------------------------------
def _noisy_vgg() -> onnx.ModelProto:
    """Vgg as a careless exporter writes it: an Identity after a conv, an inference Dropout, a
    no-op Reshape after the Flatten (shape from a Constant node), and the first Gemm's weight
    stored transposed behind a Transpose.
    """
    model = copy_model(_source("vgg"))
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        if node.name == "features.block1.conv":
            nodes.append(helper.make_node("Identity", [node.output[0]], ["extra.identity"], name="extra.identity"))
            node.output[0], nodes[-1].output[0] = "extra.conv", node.output[0]
            nodes[-1].input[0] = "extra.conv"
        if node.name == "features.block2.relu":
            nodes.append(helper.make_node("Dropout", [node.output[0]], [node.output[0]], name="extra.dropout"))
            node.output[0] = "extra.relu"
            nodes[-1].input[0] = "extra.relu"
        if node.op_type == "Flatten":
            shape = helper.make_tensor("extra.shape", TensorProto.INT64, [2], [1, 512])
            nodes.append(helper.make_node("Constant", [], ["extra.shape"], name="extra.shape", value=shape))
            nodes.append(helper.make_node("Reshape", ["extra.flat", "extra.shape"], [node.output[0]],
                                          name="extra.reshape"))
            node.output[0] = "extra.flat"
    fc1 = next(n for n in nodes if n.op_type == "Gemm")
    weight = _constant(model, fc1.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), "extra.weight_t"))
    nodes.insert(0, helper.make_node("Transpose", ["extra.weight_t"], [fc1.input[1]], name="extra.transpose",
                                     perm=[1, 0]))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def test_simplify_removes_what_an_exporter_added() -> None:
    noisy = _noisy_vgg()
    assert _error("vgg", noisy) <= 1e-6
    model = simplify(noisy)
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in _source("vgg").graph.node]
    assert _error("vgg", model) <= TOLERANCE["simplify"]
    fc1 = next(n for n in model.graph.node if n.op_type == "Gemm")
    source_fc1 = next(n for n in _source("vgg").graph.node if n.op_type == "Gemm")
    assert np.array_equal(numpy_helper.to_array(_constant(model, fc1.input[1])),
                          numpy_helper.to_array(_constant(_source("vgg"), source_fc1.input[1])))


@pytest.mark.parametrize("name", ["encoder_prenorm", "constant_weights", "shared_initializer"])
def test_simplify_renames_everything(name: str) -> None:
    source = _source(name) if name in NAMES else FIXTURES[name](0)
    model = simplify(source)
    graph = model.graph
    io = {v.name for v in (*graph.input, *graph.output)}
    assert io == {v.name for v in (*source.graph.input, *source.graph.output)}
    assert not {"Identity", "Dropout", "Constant"} & {n.op_type for n in graph.node}
    assert [n.name for n in graph.node] == [f"n{i}" for i in range(len(graph.node))]
    tensors = {t.name for t in graph.initializer} | {x for n in graph.node for x in (*n.input, *n.output)} - io
    assert all(re.fullmatch(r"t\d+", t) for t in tensors)
    old = {t.name for t in source.graph.initializer} | {x for n in source.graph.node for x in (*n.input, *n.output)}
    old |= {n.name for n in source.graph.node}
    assert not (old - io) & (tensors | {n.name for n in graph.node})
    if name == "shared_initializer":
        # The float16 weight's Cast is folded: a float32 initializer feeds the conv directly.
        assert "Cast" not in {n.op_type for n in graph.node}
    feeds = generate_inputs(source, None, np.random.default_rng(0))
    for a, b in zip(_run(model, feeds), _run(source, feeds)):
        assert np.max(np.abs(a - b)) <= TOLERANCE["simplify"] * np.max(np.abs(b))


# -- QDQ --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vgg", "resnet", "matmul_mlp", "encoder_prenorm"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_qdq_weights_int8_behind_dequantize(name: str, per_channel: bool) -> None:
    source = _source(name)
    model = quantize_qdq(source, per_channel=per_channel)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    originals = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    checked = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or producers.get(node.input[1]) is None:
            continue
        dq = producers[node.input[1]]
        if dq.op_type != "DequantizeLinear":  # a MatMul of two activations (attention)
            assert node.op_type == "MatMul" and node.input[1] not in originals
            continue
        weight = dq.input[0].removesuffix("_quantized")
        q, scale, zero = (stored[x] for x in dq.input)
        original = originals[weight]
        assert q.dtype == np.int8 and np.max(np.abs(q)) <= 64 and not np.any(zero)
        assert zero.dtype == np.int8 and dq.input[1:] == [f"{weight}_scale", f"{weight}_zero_point"]
        assert weight not in stored  # the float weight is gone
        if per_channel:
            axis = _output_axis(node, original.ndim)
            assert helper.get_node_attr_value(dq, "axis") == axis
            assert scale.shape == (original.shape[axis],)
            expanded = np.expand_dims(scale, tuple(a for a in range(original.ndim) if a != axis))
        else:
            assert scale.shape == () and not dq.attribute
            expanded = scale
        assert np.all(np.abs(q * expanded - original) <= expanded / 2 + 1e-7)
        # The activation input passes through QuantizeLinear -> DequantizeLinear (uint8).
        act = producers[node.input[0]]
        assert act.op_type == "DequantizeLinear" and producers[act.input[0]].op_type == "QuantizeLinear"
        assert stored[act.input[2]].dtype == np.uint8 and stored[act.input[1]].shape == ()
        checked += 1
    assert checked >= 3
    assert _error(name, model) <= TOLERANCE["qdq"]


def test_qdq_weights_only_and_full_range() -> None:
    reduced = quantize_qdq(_source("resnet"), activations=False)
    assert "QuantizeLinear" not in {n.op_type for n in reduced.graph.node}
    assert _error("resnet", reduced) <= TOLERANCE["qdq"]
    full = quantize_qdq(_source("resnet"), activations=False, reduce_range=False)
    levels = [np.max(np.abs(numpy_helper.to_array(t))) for t in full.graph.initializer
              if t.name.endswith("_quantized")]
    assert max(levels) == 127
    # Twice the levels: about half the error of 7-bit weights.
    assert _error("resnet", full) < 0.75 * _error("resnet", reduced)


# -- opset --------------------------------------------------------------------------------------
def test_upgrade_rewrites_changed_operators() -> None:
    source = FIXTURES["conv_transpose"](0)
    model = upgrade_opset(source, NEWEST_OPSET)
    assert model.opset_import[0].version == NEWEST_OPSET and model.ir_version >= 10
    (mean,) = [n for n in model.graph.node if n.op_type == "ReduceMean"]
    assert len(mean.input) == 2 and not any(a.name == "axes" for a in mean.attribute)  # axes as an input (18)
    feeds = generate_inputs(source, None, np.random.default_rng(0))
    for a, b in zip(_run(model, feeds), _run(source, feeds)):
        assert np.max(np.abs(a - b)) <= TOLERANCE["opset"] * np.max(np.abs(b))
    with pytest.raises(ValueError, match="below"):
        upgrade_opset(source, 13)


@pytest.mark.parametrize("name", ["vgg", "resnet", "unfolded_bn", "concat", "matmul_mlp"])
def test_downgrade_to_13_and_back(name: str) -> None:
    """A model built at opset 13 (what older exporters write), then upgraded to 17 and to 21."""
    old = downgrade_opset(_source(name), 13)
    assert old.opset_import[0].version == 13
    onnx.checker.check_model(old, full_check=True)
    assert _error(name, old) <= TOLERANCE["opset"]
    for target in (17, NEWEST_OPSET):
        new = upgrade_opset(old, target)
        assert new.opset_import[0].version == target
        assert _error(name, new) <= TOLERANCE["opset"]
        assert _error(name, _broken(new, name)) > 3 * TOLERANCE["opset"]


@pytest.mark.parametrize(("name", "op"), [("encoder_prenorm", "LayerNormalization"), ("mobilenet", "HardSwish")])
def test_downgrade_refuses_operators_the_target_lacks(name: str, op: str) -> None:
    with pytest.raises(ValueError, match=op):
        downgrade_opset(_source(name), 13)
