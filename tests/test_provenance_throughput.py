"""Shortcuts of fingerprinting's throughput work: each gives what the plain computation gives, bit for bit.

An index holds fingerprints computed in batches, by pool workers, with these shortcuts; a suspect
read alone is compared against them, so a shortcut that changes one bit of a record is a bug.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import FIXTURES
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._provenance import _fingerprint
from onnxlady._provenance._fingerprint import _SHORT_ROW, _row_max, fingerprint_model, layer_records
from onnxlady._provenance._index import _TASK_BYTES, _TASK_FILES, _batches, _Task
from onnxlady._provenance._producers import ProducerWeight, WeightGraph, _collect, producer_weights
from onnxlady._provenance._read import fingerprint_files


@pytest.mark.parametrize("shape", [(7, 1), (30, 9), (4, 30, 9), (12, _SHORT_ROW), (12, _SHORT_ROW + 1), (3, 20, 50)])
def test_row_max_is_numpys_maximum(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    squares = rng.standard_normal(shape).astype(np.float32) ** 2
    squares.flat[::7] = 0.0
    for axis in (0, 1):
        expected = squares.max(axis=squares.ndim - 1 - axis)
        assert np.array_equal(_row_max(squares, axis), expected)
        assert _row_max(squares, axis).dtype == np.float32


def test_row_max_propagates_nan_and_infinity_as_numpy_does() -> None:
    squares = np.ones((5, 9), dtype=np.float32)
    squares[1, 4] = np.nan
    squares[3, 8] = np.inf
    got = _row_max(squares, 0)
    assert np.isnan(got[1]) and np.isinf(got[3]) and np.array_equal(got[[0, 2, 4]], squares.max(axis=1)[[0, 2, 4]])
    # Wrong on purpose: a maximum that skips NaN (np.fmax) would read this layer as finite.
    assert not np.isnan(np.fmax.reduce(squares, axis=1)[1])


@pytest.mark.parametrize("shape", [(4096, 9), (300, 16), (64, 17)])
def test_short_row_layer_records_are_the_plain_ones(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Depthwise-like layers (large: the einsum path), alone and stacked, with the shortcut and with numpy's max."""
    rng = np.random.default_rng(11)
    weights = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    weights[1][5] = 0.0  # a dead neuron
    layers = [ProducerWeight(i, f"w{i}", "Conv", w, 0, 9, 1) for i, w in enumerate(weights)]
    fast = [layer_records(layers[:1]), layer_records(layers)]
    monkeypatch.setattr(_fingerprint, "_row_max", lambda squares, axis: squares.max(axis=squares.ndim - 1 - axis))
    plain = [layer_records(layers[:1]), layer_records(layers)]
    for got, expected in zip(fast, plain):
        assert got.tobytes() == expected.tobytes()


def test_one_worker_gets_tasks_as_large_as_the_limits_allow() -> None:
    todo = [_Task(f"m{i}.onnx", 1000) for i in range(600)]
    one = _batches(todo, 1)
    assert [len(batch) for batch in one] == [_TASK_FILES, _TASK_FILES, 600 - 2 * _TASK_FILES]
    pool = _batches(todo, 2)
    assert max(len(batch) for batch in pool) == 75  # 600 files over 2 workers x 4 tasks
    heavy = [_Task(f"h{i}.onnx", _TASK_BYTES // 3) for i in range(7)]
    assert [len(batch) for batch in _batches(heavy, 1)] == [3, 3, 1]  # bytes bound a task too


def test_rank_reads_only_the_asked_declaration() -> None:
    for name in ("encoder_prenorm", "bert_like", "matmul_mlp", "tied_lm_head", "vgg"):
        model = FIXTURES[name](0)
        inferred = onnx.shape_inference.infer_shapes(model)
        for graph_model in (model, inferred):
            names = [value.name for value in (*graph_model.graph.input, *graph_model.graph.output, *graph_model.graph.value_info)]
            names += [output for node in graph_model.graph.node for output in node.output]
            lazy = WeightGraph(graph_model)
            full = WeightGraph(graph_model).declared_shapes()
            for tensor in names:
                expected = full.get(tensor)
                assert lazy.rank(tensor) == (None if expected is None else len(expected)), (name, tensor)


def test_a_name_declared_twice_keeps_the_better_known_shape() -> None:
    model = FIXTURES["matmul_mlp"](0)
    target = model.graph.node[0].output[0]
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, ["n", None]))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, [1, 2, 3]))
    assert WeightGraph(model).rank(target) == len(WeightGraph(model).declared_shapes()[target]) == 3


def test_fresh_processes_and_batches_give_the_same_fingerprints(tmp_path: Path) -> None:
    """The allocator warm-up (each new process, e.g. a pool worker) changes where memory comes from, never a value."""
    paths: list[str] = []
    for name in ("vgg", "mobilenet", "shufflenet_v2", "encoder_prenorm"):
        onnx.save(FIXTURES[name](1), tmp_path / f"{name}.onnx")
        paths.append(str(tmp_path / f"{name}.onnx"))
    with ProcessPoolExecutor(1) as pool:  # a fresh worker warms its allocator first
        remote = pool.submit(fingerprint_files, paths, digest=False).result()
    for result, path in zip(remote, paths):
        assert result.fingerprint == fingerprint_model(onnx.load(path)).to_bytes()


def test_an_activation_chain_is_no_constant_whatever_its_other_inputs_hold() -> None:
    """A MatMul reading ``Reshape(activation, shape)`` is read by the light WeightGraph.

    The chain is no constant as soon as its activation input is not one, so its shape operand is
    never read: a ``Constant`` holding ``value_ints`` there (a form only a ModelGraph reads, exported
    models write it for their Reshape shapes) no longer sends the whole model to a ModelGraph, and
    the layers read are the ModelGraph's.
    """
    helper, tensor = onnx.helper, onnx.TensorProto
    weight = np.random.default_rng(4).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["shape"], value_ints=[2, 8]),
            helper.make_node("Reshape", ["x", "shape"], ["rows"]),
            helper.make_node("MatMul", ["rows", "w"], ["y"]),
        ],
        "activation_chain",
        [helper.make_tensor_value_info("x", tensor.FLOAT, [16])],
        [helper.make_tensor_value_info("y", tensor.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    light = WeightGraph(model)
    found = _collect(light, light.order, light.op_types, light.units(), light.batchnorm_scale)
    assert "shape" not in light._values  # never read
    expected = producer_weights(ModelGraph(model, infer_shapes=False))
    assert [(w.node, w.neuron_axis, w.kernel, w.groups) for w in found] == [(2, 1, 1, 1)]
    assert [(w.node, w.neuron_axis, w.kernel, w.groups) for w in found] == [
        (w.node, w.neuron_axis, w.kernel, w.groups) for w in expected
    ]
    assert all(np.array_equal(a.matrix, b.matrix) for a, b in zip(found, expected))
