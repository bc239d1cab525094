"""Shapes survive ONNX Runtime's float16 converter (issue 12: deployment converters).

``onnxruntime.transformers.float16.convert_float_to_float16`` keeps the operators of its block
list (``Max``, ``Min``, ``Range``...) in float32 and wraps them in ``Cast`` nodes that it appends
at the *end* of the node list, so the graph it writes is no longer in topological order (ONNX
Runtime accepts it). ONNX's shape inference visits nodes in the order listed, so it lost every
shape from such a ``Max`` on; with it went the ``Reshape``/``Expand`` shapes computed from
``Shape -> Cast -> Slice -> Concat -> Cast`` (as jax2tf writes a LayerNorm, e.g. Magika's), and
every group they touch froze ("unknown-shape"). The converter's value_info (stale symbolic
dims) did not make up for it.

The model here has that pattern: a producer, its mean square clamped by ``Max``, reshaped and
broadcast to shapes computed from the input's shape, the normalized value fed to a consumer.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady import analyze
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._transforms._permute import unpermute_model
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy
from onnxlady.testing._helpers import permute_producer_only

float16 = pytest.importorskip("onnxruntime.transformers.float16", reason="onnxruntime.transformers not installed")

HIDDEN = 16
SEQ = 4
FEATURES = 8
CLASSES = 3


def _clamped_norm_model() -> onnx.ModelProto:
    """x[N, 4, 8] -> MatMul+Add (16 neurons) -> h / sqrt(Max(mean(h * h over the neurons), eps)) -> Relu -> MatMul+Add."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.normal(0, 0.5, (FEATURES, HIDDEN)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.5, HIDDEN).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (HIDDEN, CLASSES)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.5, CLASSES).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array(1e-3, np.float32), "eps"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([1], np.int32), "tail"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "b1"], ["h"]),
        helper.make_node("Mul", ["h", "h"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[2], keepdims=0),
        helper.make_node("Max", ["var", "eps"], ["clamped"]),  # in the converter's block list
        # The [N, 4, 1] target as jax2tf computes it: Shape -> Cast -> Slice -> Concat -> Cast.
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Cast", ["x_shape"], ["x_shape32"], to=TensorProto.INT32),
        helper.make_node("Slice", ["x_shape32", "zero", "two", "zero"], ["batch32"]),
        helper.make_node("Concat", ["batch32", "tail"], ["target32"], axis=0),
        helper.make_node("Cast", ["target32"], ["target"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["clamped", "target"], ["clamped3"]),
        helper.make_node("Expand", ["clamped3", "target"], ["broadcast"]),
        helper.make_node("Sqrt", ["broadcast"], ["std"]),
        helper.make_node("Div", ["h", "std"], ["normed"]),
        helper.make_node("Relu", ["normed"], ["act"]),
        helper.make_node("MatMul", ["act", "w2"], ["mm2"]),
        helper.make_node("Add", ["mm2", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "clamped_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SEQ, CLASSES])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@functools.cache
def _source() -> onnx.ModelProto:
    return _clamped_norm_model()


@functools.cache
def _converted() -> onnx.ModelProto:
    return float16.convert_float_to_float16(copy_model(_source()), keep_io_types=True)


def _coverage(model: onnx.ModelProto) -> tuple[int, int]:
    """(permutable producer neurons, permutable groups) of ``model``."""
    analysis = analyze(copy_model(model))
    permutable = [group for group in analysis.groups if group.permutable]
    return sum(group.size for group in permutable), len(permutable)


def test_the_converter_writes_the_pattern() -> None:
    """The premise: a float16 graph whose Max (kept float32) is listed before the Cast it reads."""
    model = _converted()
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    defined = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer}
    late = []
    for node in model.graph.node:
        late += [name for name in node.input if name and name not in defined]
        defined.update(node.output)
    assert late, "the converter now writes a sorted graph: this test no longer covers the case"


def test_shapes_equal_before_and_after_conversion() -> None:
    plain, converted = ModelGraph(copy_model(_source())), ModelGraph(copy_model(_converted()))
    for name in ("clamped3", "broadcast", "std", "normed", "act"):
        assert None not in plain.shapes[name]
        assert converted.shapes.get(name) == plain.shapes[name], name


def test_coverage_equal_before_and_after_conversion() -> None:
    before = _coverage(_source())
    assert before[0] == HIDDEN  # the hidden neurons move (the output's are pinned)
    assert _coverage(_converted()) == before


def test_converted_permutes_equivalent_and_unpermutes_bit_exact() -> None:
    source = _converted()
    model, _, perms, key = permute_copy(source, 7)
    assert perms, "nothing was permuted: the test would prove nothing"
    assert [t.raw_data for t in model.graph.initializer] != [t.raw_data for t in source.graph.initializer]
    report = verify_models(source, model, provider="cpu", iterations=2)
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()


def test_converted_wrong_permutation_is_caught() -> None:
    source = _converted()
    model = copy_model(source)
    permute_producer_only(model, analyze(model))
    assert not verify_models(source, model, provider="cpu").equivalent
