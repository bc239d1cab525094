"""Folding of shape arithmetic for the analysis (onnxlady._graph._fold, ModelGraph.folded)."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlady._analysis._channels as analysis_module
from onnxlady import analyze, draw_permutations, permute_model, verify_models
from onnxlady._graph._fold import fold_node
from onnxlady._graph._model_graph import ModelGraph
from onnxlady.testing import copy_model

RNG = np.random.default_rng(0)


def _init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _weights(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, initializers, out_shape, in_shape=(1, 4, 6, 6)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "fold",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(out_shape))],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _conv_head(initializers: list) -> list:
    initializers += [_init("W1", _weights(8, 4, 3, 3)), _init("B1", _weights(8))]
    return [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["y"])]


def _i64(name: str, values) -> TensorProto:
    return _init(name, np.asarray(values, dtype=np.int64))


def reshape_model() -> onnx.ModelProto:
    """Y [1,8,6,6] -> Reshape to [1, c/2, 2, h*w] computed by Shape->Gather->Div/Mul->Unsqueeze->Concat."""
    inits: list = []
    nodes = _conv_head(inits)
    inits += [_i64("i0", 0), _i64("i1", 1), _i64("i2", 2), _i64("i3", 3), _i64("two", 2), _i64("ax0", [0]),
              _i64("last", [2]), _i64("back", [1, 8, 6, 6]), _init("W2", _weights(3, 8, 1, 1))]
    nodes += [
        helper.make_node("Shape", ["y"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["g0"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["g1"], axis=0),
        helper.make_node("Gather", ["s", "i2"], ["g2"], axis=0),
        helper.make_node("Gather", ["s", "i3"], ["g3"], axis=0),
        helper.make_node("Mul", ["g2", "g3"], ["hw"]),
        helper.make_node("Div", ["g1", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["g0", "ax0"], ["u0"]),
        helper.make_node("Unsqueeze", ["half", "ax0"], ["u1"]),
        helper.make_node("Unsqueeze", ["hw", "ax0"], ["u2"]),
        helper.make_node("Concat", ["u0", "u1", "last", "u2"], ["target"], axis=0),
        helper.make_node("Reshape", ["y", "target"], ["r"]),
        helper.make_node("Sigmoid", ["r"], ["r2"]),
        helper.make_node("Reshape", ["r2", "back"], ["r3"]),
        helper.make_node("Conv", ["r3", "W2"], ["out"]),
    ]
    return _model(nodes, inits, [1, 3, 6, 6])


def chunk_model() -> onnx.ModelProto:
    """x.chunk(2, dim=1) as the legacy exporter writes it: Slice ends computed from Shape."""
    inits: list = []
    nodes = _conv_head(inits)
    inits += [_i64("i1", 1), _i64("one", 1), _i64("two", 2), _i64("ax0", [0]), _i64("zero1", [0]),
              _i64("axes1", [1]), _i64("big", [np.iinfo(np.int64).max]),
              _init("Wa", _weights(3, 4, 1, 1)), _init("Wb", _weights(3, 4, 1, 1))]
    nodes += [
        helper.make_node("Shape", ["y"], ["s"]),
        helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
        helper.make_node("Add", ["c", "one"], ["c1p"]),
        helper.make_node("Div", ["c1p", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "ax0"], ["h"]),
        helper.make_node("Slice", ["y", "zero1", "h", "axes1"], ["lo"]),
        helper.make_node("Slice", ["y", "h", "big", "axes1"], ["hi"]),
        helper.make_node("Conv", ["lo", "Wa"], ["ca"]),
        helper.make_node("Conv", ["hi", "Wb"], ["cb"]),
        helper.make_node("Add", ["ca", "cb"], ["out"]),
    ]
    return _model(nodes, inits, [1, 3, 6, 6])


def expand_model() -> onnx.ModelProto:
    """Expand of an activation and of a constant to shapes computed by
    ConstantOfShape -> Mul -> Equal -> Where (the legacy export of ``expand``/``expand_as``).
    """
    inits: list = []
    nodes = _conv_head(inits)
    inits += [_i64("four", [4]), _i64("minus", -1), _i64("full", [1, 8, 6, 6]), _i64("plane", [1, 1, 6, 6]),
              _init("c", _weights(1, 1, 1, 1)), _init("W2", _weights(3, 8, 1, 1))]
    ones = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes += [
        helper.make_node("ConstantOfShape", ["four"], ["cos"], value=ones),
        helper.make_node("Mul", ["cos", "minus"], ["neg"]),
        helper.make_node("Equal", ["full", "neg"], ["eq"]),
        helper.make_node("Where", ["eq", "cos", "full"], ["shape_y"]),
        helper.make_node("Equal", ["plane", "neg"], ["eq2"]),
        helper.make_node("Where", ["eq2", "cos", "plane"], ["shape_c"]),
        helper.make_node("Expand", ["y", "shape_y"], ["ey"]),
        helper.make_node("Expand", ["c", "shape_c"], ["ec"]),
        helper.make_node("Add", ["ey", "ec"], ["sum"]),
        helper.make_node("Conv", ["sum", "W2"], ["out"]),
    ]
    return _model(nodes, inits, [1, 3, 6, 6])


MODELS = {"reshape": reshape_model, "chunk": chunk_model, "expand": expand_model}


def _analysis_without_folding(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as patch:
        patch.setattr(analysis_module, "ModelGraph", functools.partial(ModelGraph, fold=False))
        return analyze(model)


def _producer_groups(analysis) -> list:
    return [g for g in analysis.groups if any(m.tensor == "W1" for m in g.members)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folding_makes_the_group_permutable_and_stays_equivalent(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    source = MODELS[name]()
    before = _analysis_without_folding(source, monkeypatch)
    assert not any(g.permutable for g in _producer_groups(before)), "the test model must need folding"

    model = copy_model(source)
    analysis = analyze(model)
    groups = _producer_groups(analysis)
    assert groups and all(g.permutable for g in groups), [g.reasons for g in analysis.groups]

    graph = ModelGraph(source)
    assert graph.folded, "something must have been folded"
    for group in analysis.groups:
        for member in group.members:
            assert member.tensor not in graph.folded, f"folded tensor {member.tensor} is a group member"
    for name_ in graph.folded:
        # A folded value is never itself permuted: if it is a constant at all, it is one
        # forwarded (Expand/Reshape of a stored constant) and its leaf is the stored tensor.
        leaf = graph.constant_leaf(name_)
        assert leaf is None or leaf.name in graph.initializers or leaf.name in graph.constant_nodes

    perms = draw_permutations(analysis, 5)
    assert perms
    permute_model(analysis, perms, seed=5)
    # Only weights change: every node (the shape arithmetic included) stays as it was.
    assert [n.SerializeToString() for n in model.graph.node] == [n.SerializeToString() for n in source.graph.node]
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.INT64:
            original = next(t for t in source.graph.initializer if t.name == tensor.name)
            assert tensor.SerializeToString() == original.SerializeToString()
    report = verify_models(source, model, provider="cpu", iterations=2)
    assert report.equivalent, report


def test_folded_values_are_readable_but_not_constant_leaves() -> None:
    graph = ModelGraph(chunk_model())
    assert graph.constant_value("h").tolist() == [4]
    assert graph.constant_value("s").tolist() == [1, 8, 6, 6]
    for name in ("s", "c", "half", "h"):
        assert graph.constant_leaf(name) is None
        assert not graph.is_constant(name)
    assert graph.shape("lo") == (1, 4, 6, 6) and graph.shape("hi") == (1, 4, 6, 6)
    unfolded = ModelGraph(chunk_model(), fold=False)
    assert unfolded.constant_value("h") is None and not unfolded.folded


def test_symbolic_dimensions_are_never_folded() -> None:
    model = chunk_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    graph = ModelGraph(model)
    assert "s" not in graph.folded and graph.constant_value("s") is None
    assert graph.constant_value("c") is None  # Gather of the channel dim: Shape itself is not folded


def _fold(op: str, inputs: list[np.ndarray], **attrs) -> np.ndarray | None:
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(op, names, ["y"], **attrs)
    return fold_node(node, dict(zip(names, inputs)), {}, {}, 17)


def test_integer_arithmetic_follows_onnx() -> None:
    a, b = np.array([7, -7, 7, -7], np.int64), np.array([2, 2, -2, -2], np.int64)
    assert _fold("Div", [a, b]).tolist() == [3, -3, -3, 3]  # truncation toward zero
    assert _fold("Mod", [a, b]).tolist() == [1, 1, -1, -1]  # sign of the divisor
    assert _fold("Mod", [a, b], fmod=1).tolist() == [1, -1, 1, -1]
    assert _fold("Div", [a, np.array([0, 1, 1, 1], np.int64)]) is None
    assert _fold("Add", [a, b.astype(np.int32)]) is None  # mismatched dtypes: not folded
    data = np.arange(10, dtype=np.int64)
    big = np.iinfo(np.int64).max
    slices = [([2], [big], [0], [1]), ([-1], [-big], [0], [-1]), ([8], [2], [0], [-2]), ([-3], [-1], [0], [1])]
    for starts, ends, axes, steps in slices:
        got = _fold("Slice", [data] + [np.array(v, np.int64) for v in (starts, ends, axes, steps)])
        expected = _reference("Slice", [data] + [np.array(v, np.int64) for v in (starts, ends, axes, steps)])
        assert got.tolist() == expected.tolist(), (starts, ends, steps)


def _reference(op: str, inputs: list[np.ndarray], **attrs) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" for i in range(len(inputs))]
    return ReferenceEvaluator(helper.make_node(op, names, ["y"], **attrs)).run(None, dict(zip(names, inputs)))[0]


def test_large_outputs_are_not_folded() -> None:
    assert _fold("ConstantOfShape", [np.array([100, 100], np.int64)]) is None
    assert _fold("Range", [np.array(0, np.int64), np.array(10**6, np.int64), np.array(1, np.int64)]) is None
