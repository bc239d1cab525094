"""The one evaluator of values computed from shapes, static or partial (session 16: ``_graph._shape_scalars``).

The audit (a converter folds a run-time attention scale into a stored constant) and the resync's
sites (the same scale as a layer's scalar step) read it. With a dynamic batch, the head size
(the last axis) is known and evaluated; anything that needs the batch is not (never a guess);
integers computed through float arithmetic are not read as exact; tensors computed from
constants alone, and activations, are not evaluated here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady._graph._model_graph import ModelGraph
from onnxlady._graph._shape_scalars import shape_values


def _graph(batch: int | str) -> ModelGraph:
    """``x [batch, 6, 8]``: its Shape's last dim, first dim, a float round trip of the last, and a constant product."""
    constants = {
        "last": np.array([-1], np.int64), "end": np.array([2**62], np.int64), "zero": np.array([0], np.int64),
        "one": np.array(1.0, np.float32), "w": np.ones((8, 8), np.float32), "two": np.array(2.0, np.float32),
    }  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "last", "end"], ["dim"]),
        helper.make_node("Slice", ["shape", "zero", "last"], ["front"]),  # [batch, 6]: partial with a dynamic batch
        helper.make_node("Gather", ["front", "zero"], ["batch"], axis=0),
        helper.make_node("Cast", ["dim"], ["dim_f"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["dim_f"], ["root"]),
        helper.make_node("Div", ["one", "root"], ["scale"]),
        helper.make_node("Cast", ["dim_f"], ["dim_back"], to=TensorProto.INT64),  # an integer through a float
        helper.make_node("Mul", ["w", "two"], ["w2"]),  # constants alone
        helper.make_node("MatMul", ["x", "w2"], ["h"]),
        helper.make_node("Mul", ["h", "scale"], ["y"]),
        helper.make_node("Mul", ["dim", "batch"], ["size"]),
    ]
    graph = helper.make_graph(
        nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 6, 8]),
         helper.make_tensor_value_info("size", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("dim_back", TensorProto.INT64, [1])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return ModelGraph(model)


@pytest.mark.parametrize("batch", ["batch", 3])
def test_the_head_size_is_known_with_a_dynamic_batch(batch: int | str) -> None:
    graph = _graph(batch)
    values = shape_values(graph)
    assert values is shape_values(graph)  # one evaluator per graph
    scale = values.scalar("scale")
    assert scale is not None and float(scale[0]) == pytest.approx(8.0**-0.5)
    exact = values.exact("dim")
    assert exact is not None and exact.tolist() == [8]
    # What needs the batch is known only where it is static.
    for name in ("batch", "size"):
        assert (values.value(name) is None) == (batch == "batch"), name


def test_nothing_is_read_as_exact_or_evaluated_beyond_shape_arithmetic() -> None:
    values = shape_values(_graph("batch"))
    assert values.value("dim_back") is not None and values.exact("dim_back") is None  # computed through a float
    assert values.value("w2") is None  # constants alone: read elsewhere, with their bound
    assert values.value("h") is None and values.value("y") is None  # activations
    assert values.exact("scale") is None  # a float


def test_a_shape_read_for_an_unknown_dim_is_no_known_read() -> None:
    """A converter folds a Shape whose readers pick known dims: the resync's sites then look past it, and only then."""
    assert not shape_values(_graph("batch")).known_shape_read(0)  # its front slice gives the batch, unknown
    assert shape_values(_graph(3)).known_shape_read(0)
    assert not shape_values(_graph(3)).known_shape_read(1)  # a Slice, no Shape
