"""The static-shape fast path gives what ONNX's shape inference gives, and only where it can (issue 15)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import build_deep_model
from onnxlady._graph import _static_shapes
from onnxlady._graph._model_graph import ModelGraph


def _graphs(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelGraph, ModelGraph, bool]:
    """The graph with the fast path, the graph with ONNX's inference only, and whether the fast path answered."""
    answered = []
    original = _static_shapes.static_output_shapes

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        found = original(*args, **kwargs)
        answered.append(found is not None)
        return found

    monkeypatch.setattr(_static_shapes, "static_output_shapes", spy)
    fast = ModelGraph(model)
    monkeypatch.setattr(_static_shapes, "static_output_shapes", lambda *args, **kwargs: None)
    slow = ModelGraph(model)
    monkeypatch.undo()
    return fast, slow, any(answered)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _weight(name: str, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


def _random_model(rng: np.random.Generator) -> onnx.ModelProto:
    """A chain of broadcasting binaries, unaries and batched MatMuls over random static shapes."""
    rank = int(rng.integers(2, 5))
    shape = tuple(int(d) for d in rng.integers(1, 5, size=rank))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    nodes, weights, current = [], [], "x"
    for k in range(12):
        kind = rng.choice(["binary", "unary", "matmul"])
        out = f"t{k}"
        if kind == "unary":
            nodes.append(helper.make_node(str(rng.choice(sorted(_static_shapes.UNARY_OPS))), [current], [out]))
        elif kind == "binary":
            # A broadcast operand: some dims 1, maybe a lower rank, on either side.
            other = tuple(1 if rng.random() < 0.4 else d for d in shape)[int(rng.integers(0, len(shape))) :]
            if rng.random() < 0.3:  # the operand widens some size-1 dims of the activation
                tail = shape[len(shape) - len(other) :]
                other = tuple(3 if a == 1 and rng.random() < 0.5 else d for a, d in zip(tail, other))
            weights.append(_weight(f"w{k}", other))
            pair = [current, f"w{k}"] if rng.random() < 0.5 else [f"w{k}", current]
            nodes.append(helper.make_node(str(rng.choice(sorted(_static_shapes.BINARY_OPS))), pair, [out]))
            padded = (1,) * (len(shape) - len(other)) + other if len(other) < len(shape) else other
            shape = tuple(max(a, b) for a, b in zip((1,) * (len(padded) - len(shape)) + shape, padded))
        else:
            if len(shape) < 2:
                continue
            width = int(rng.integers(1, 6))
            batch = tuple(1 if rng.random() < 0.5 else d for d in shape[:-2])[int(rng.integers(0, len(shape) - 1)) :]
            weights.append(_weight(f"w{k}", (*batch, shape[-1], width)))
            nodes.append(helper.make_node("MatMul", [current, f"w{k}"], [out]))
            shape = (*shape[:-1], width)
        current = out
    y = helper.make_tensor_value_info(current, TensorProto.FLOAT, list(shape))
    return _model(nodes, [x], [y], weights)


@pytest.mark.parametrize("seed", range(40))
def test_random_static_graphs_match_onnx_inference(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_model(np.random.default_rng(seed))
    fast, slow, answered = _graphs(model, monkeypatch)
    assert answered  # the fast path was taken...
    assert fast.shapes == slow.shapes  # ...and gave what inference gives
    assert fast.dtypes == slow.dtypes
    # Every node output is typed (the comparison is not between two empty answers).
    assert all(name in fast.shapes for node in model.graph.node for name in node.output)


def test_deep_model_matches_onnx_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow, answered = _graphs(build_deep_model(120), monkeypatch)
    assert answered
    assert fast.shapes == slow.shapes and fast.dtypes == slow.dtypes


def _mlp(
    *,
    x_shape: tuple[int | str, ...] = (2, 4),
    dtype: int = TensorProto.FLOAT,
    out_shape: list[int | str] | None = None,
    extra: onnx.NodeProto | None = None,
    w_shape: tuple[int, ...] = (4, 3),
) -> onnx.ModelProto:
    numpy_type = helper.tensor_dtype_to_np_dtype(dtype)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"])]
    last = "r"
    if extra is not None:
        nodes.append(extra)
        last = extra.output[0]
    y = helper.make_tensor_value_info(last, dtype, out_shape if out_shape is not None else [2, 3])
    x = helper.make_tensor_value_info("x", dtype, list(x_shape))
    return _model(nodes, [x], [y], [_weight("w", w_shape, numpy_type)])


@pytest.mark.parametrize(
    "model",
    [
        _mlp(x_shape=("batch", 4), out_shape=["batch", 3]),  # a symbolic dim
        _mlp(dtype=TensorProto.INT64),  # integer types: data propagation may read them
        _mlp(extra=helper.make_node("Softmax", ["r"], ["s"], axis=-1)),  # an attribute
        _mlp(extra=helper.make_node("Transpose", ["r"], ["s"])),  # another operator
        _mlp(out_shape=[2, 5]),  # an output declared other than computed
        _mlp(out_shape=["n", 3]),  # an output declared with a symbol inference fills in
        _mlp(w_shape=(5, 3)),  # inner dims that do not agree
        _mlp(x_shape=(0, 4), out_shape=[0, 3]),  # a zero dim
    ],
    ids=["symbolic", "int64", "attribute", "other-op", "declared-output", "symbolic-output", "mismatch", "zero-dim"],
)
def test_fast_path_declines_what_it_does_not_compute_exactly(
    model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, slow, _ = _graphs(model, monkeypatch)
    assert fast.shapes == slow.shapes and fast.dtypes == slow.dtypes
    monkeypatch.setattr(ModelGraph, "_inferred_infos", lambda self, skeleton: pytest.fail("inference ran"))
    # The plain MLP the cases start from is computed without inference, so each case declines.
    ModelGraph(_mlp())
    with pytest.raises(pytest.fail.Exception, match="inference ran"):
        ModelGraph(model)


def test_broadcast() -> None:
    assert _static_shapes.broadcast((2, 1, 4), (3, 1)) == (2, 3, 4)
    assert _static_shapes.broadcast((4,), (2, 3, 4)) == (2, 3, 4)
    assert _static_shapes.broadcast((2, 3), (3, 3)) is None
