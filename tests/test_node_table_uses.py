"""The graph fingerprint and unpermute's constants, made from the nodes as the load's check read them (issue 15).

Reading each node's fields from protobuf made most of the fingerprint's cost on deep graphs
(0.25 s at 50,000 nodes); permute and unpermute now hand it the load's node table, and only
nodes holding attributes are read again. The hash must be the one keys recorded, and a table
that no longer describes the graph (a node added since, another graph) must not be used.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from fixtures import FIXTURES, build_deep_model
from onnxlady._io._files import load_model
from onnxlady._io._node_table import NodeTable
from onnxlady._io._tensors import tensor_holders
from onnxlady._transforms._key import graph_fingerprint
from onnxlady._transforms._permute import _holders


def _loaded(tmp_path: Path, model: onnx.ModelProto) -> tuple[onnx.ModelProto, NodeTable]:
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    loaded = load_model(path, node_table=True, digest=False)
    assert loaded.nodes is not None  # the table route is the one under test
    return loaded.model, loaded.nodes


@pytest.mark.parametrize("name", ["grouped_conv", "resnet", "bert_like", "channel_shuffle", "local_functions"])
def test_the_table_gives_the_fingerprint_protobuf_gives(tmp_path: Path, name: str) -> None:
    model, nodes = _loaded(tmp_path, FIXTURES[name](0))
    assert any(node.attribute for node in model.graph.node) or name == "bert_like"
    assert graph_fingerprint(model, nodes) == graph_fingerprint(model)


def test_the_table_is_used_while_it_describes_the_graph(tmp_path: Path) -> None:
    model, nodes = _loaded(tmp_path, build_deep_model(60))
    before = graph_fingerprint(model)
    assert graph_fingerprint(model, nodes) == before
    # The node lines come from the table: an entry changed in it changes the hash (so the
    # equality above compared the table's lines, not protobuf's read again).
    nodes.outputs[0] = ("renamed",)
    assert graph_fingerprint(model, nodes) != before


def test_a_table_that_no_longer_describes_the_graph_is_not_used(tmp_path: Path) -> None:
    model, nodes = _loaded(tmp_path, build_deep_model(60))
    other, _ = _loaded(tmp_path, build_deep_model(60))
    # Another graph's table (same nodes) is ignored: the hash is read from protobuf.
    other.graph.node[0].output[0] = "elsewhere"
    assert graph_fingerprint(other, nodes) == graph_fingerprint(other) != graph_fingerprint(model)
    # A node added since the table was read: the table is ignored, the new node counted.
    added = onnx.helper.make_node("Identity", ["output"], ["extra"])
    model.graph.node.append(added)
    assert graph_fingerprint(model, nodes) == graph_fingerprint(model)
    # A table taken by a graph is not used either.
    model.graph.node.pop()
    assert nodes.take(model.graph) is nodes
    nodes.outputs[0] = ("renamed",)
    assert graph_fingerprint(model, nodes) == graph_fingerprint(model)


@pytest.mark.parametrize("name", ["constant_weights", "qdq_convnet", "resnet", "local_functions_const"])
def test_the_holders_read_with_the_table_are_tensor_holders(tmp_path: Path, name: str) -> None:
    """Unpermute lists the constants reading only the nodes the table says hold attributes.

    (A graph with subgraphs gets no table from the check: the walk of every node stays its route.)
    """
    model, nodes = _loaded(tmp_path, FIXTURES[name](0))
    every, main = _holders(model, nodes)
    assert list(every.items()) == list(tensor_holders(model).items())  # same names, same order, same protos
    assert list(main.items()) == list(tensor_holders(model, subgraphs=False).items())
    assert every is main  # one dict where no subgraph holds constants
    if name == "constant_weights":  # Constant nodes' values are among them
        assert any(node.op_type == "Constant" and node.output[0] in main for node in model.graph.node)
