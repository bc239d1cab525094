"""The fingerprint's graph walk: its layer order and its checks, against plain reference versions.

:func:`~onnxlady._provenance._producers.pulled_order` and the tables of
:class:`~onnxlady._provenance._producers.WeightGraph` were rewritten for speed in session 17
(issue 17: names read once as lists, the topological check a set per node, the walk without
per-name branches); fingerprints of 1,587 files stayed byte-identical. These tests hold the
rewritten code to the definitions: the order is a recursive depth-first walk from the graph's
outputs (every writer of a name written several times, in list order), and a graph that reads a
name before any node writes it, or declares an output nothing gives, is left to the ModelGraph
reader.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady._provenance._producers import FullGraphNeeded, WeightGraph, pulled_order


def _reference_order(
    inputs: Sequence[Sequence[str]], outputs: Sequence[Sequence[str]], graph_outputs: Sequence[str]
) -> list[int]:
    """pulled_order's definition, recursively: each node after every writer of what it reads."""
    writers: dict[str, list[int]] = defaultdict(list)
    for index, names in enumerate(outputs):
        for name in names:
            if name:
                writers[name].append(index)
    order: list[int] = []
    entered: set[int] = set()

    def visit(index: int) -> None:
        if index in entered:
            return
        entered.add(index)
        for name in inputs[index]:
            for writer in writers.get(name, []):
                visit(writer)
        order.append(index)

    for name in graph_outputs:
        for writer in writers.get(name, []):
            visit(writer)
    for index in range(len(inputs)):
        visit(index)
    return order


def _random_lists(rng: random.Random) -> tuple[list[list[str]], list[list[str]], list[str]]:
    names = ["a", "b", "c", "d", "e", "f", ""]
    count = rng.randint(1, 9)
    inputs = [[rng.choice(names) for _ in range(rng.randint(0, 3))] for _ in range(count)]
    outputs = [[rng.choice(names) for _ in range(rng.randint(0, 2))] for _ in range(count)]
    return inputs, outputs, [rng.choice(names) for _ in range(rng.randint(0, 3))]


def test_pulled_order_is_the_recursive_walk() -> None:
    rng = random.Random(17)
    several = 0
    for _ in range(3000):
        inputs, outputs, graph_outputs = _random_lists(rng)
        made = [name for names in outputs for name in names if name]
        several += len(made) != len(set(made))
        assert pulled_order(inputs, outputs, graph_outputs) == _reference_order(inputs, outputs, graph_outputs), (
            inputs,
            outputs,
            graph_outputs,
        )
    assert several > 500  # names written several times (every writer pulled) are well covered


def test_pulled_order_of_a_branching_graph() -> None:
    # out <- add(left, right); right is listed first, yet the output pulls left's chain first.
    inputs = [["x"], ["r"], ["x"], ["l"], ["l2", "r2"]]
    outputs = [["r"], ["r2"], ["l"], ["l2"], ["out"]]
    assert pulled_order(inputs, outputs, ["out"]) == [2, 3, 0, 1, 4] == _reference_order(inputs, outputs, ["out"])


def _model(nodes: list[onnx.NodeProto], outputs: list[str], inputs: Sequence[str] = ("x",)) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in outputs],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weight_graph_reads_a_sorted_graph() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
        helper.make_node("MatMul", ["y", "w"], ["h2"]),
        helper.make_node("Add", ["h2", ""], ["z"]),  # an omitted input is no read
    ]
    graph = WeightGraph(_model(nodes, ["z"]))
    assert graph.order == [0, 1, 2, 3]
    assert graph.producer == {"h": (0, 0), "y": (1, 0), "h2": (2, 0), "z": (3, 0)}
    assert sorted(graph.units()) == [0, 2]


@pytest.mark.parametrize(
    ("nodes", "outputs"),
    [
        # A node reads a name a later node writes.
        ([helper.make_node("Relu", ["h"], ["y"]), helper.make_node("MatMul", ["x", "w"], ["h"])], ["y"]),
        # A node reads its own output.
        ([helper.make_node("Add", ["x", "y"], ["y"])], ["y"]),
        # A graph output nothing gives.
        ([helper.make_node("MatMul", ["x", "w"], ["h"])], ["nowhere"]),
        # A graph output named '' that no node writes.
        ([helper.make_node("MatMul", ["x", "w"], ["h"])], [""]),
    ],
    ids=["read-before-written", "reads-own-output", "output-not-produced", "empty-output-not-produced"],
)
def test_weight_graph_leaves_unsorted_or_open_graphs_to_model_graph(nodes: list[onnx.NodeProto], outputs: list[str]) -> None:
    with pytest.raises(FullGraphNeeded):
        WeightGraph(_model(nodes, outputs))


def test_a_name_written_again_after_it_is_read_is_fine() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
        helper.make_node("Neg", ["y"], ["h"]),  # h written again: the last writer is its producer
    ]
    graph = WeightGraph(_model(nodes, ["h"]))
    assert graph.producer["h"] == (2, 0)
    assert graph.order == [0, 1, 2]
    # An output named '' is declared where a node writes ''.
    WeightGraph(_model([helper.make_node("Split", ["x"], ["", "s"], num_outputs=2)], ["s", ""]))
