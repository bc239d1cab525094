"""ONNX Runtime's channels-last convolution (``com.microsoft::NhwcConv``) is read as the Conv it stands for.

Held-out round 13's ``unet.ortx.onnx`` (ORT's offline optimizer, all levels): five of its six
convolutions became ``NhwcConv`` nodes, each weight stored ``(out, kH, kW, in)`` and the
activations transposed around them. The fingerprint read none of them: one layer of six paired,
``find`` called the copy (and its permuted form) `unrelated` to unet.onnx at 0.913. The copy here
is written the way ORT writes it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlady._graph._model_graph import ModelGraph
from onnxlady._provenance._find import find
from onnxlady._provenance._fingerprint import compare_fingerprints, fingerprint_model
from onnxlady._provenance._index import build_index
from onnxlady._provenance._producers import model_producers, producer_weights
from onnxlady.testing import permute_copy

CHANNELS = (3, 16, 32, 32, 16)


def _convs(seed: int) -> onnx.ModelProto:
    """Four 3 x 3 convolutions with ReLUs, shaped like trained layers (spread neuron norms)."""
    rng = np.random.default_rng(seed)
    nodes, weights, x = [], [], "image"
    for i, (cin, cout) in enumerate(itertools.pairwise(CHANNELS)):
        w = rng.normal(size=(cout, cin, 3, 3)) * rng.lognormal(0.0, 0.5, size=(cout, 1, 1, 1))
        weights += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                    numpy_helper.from_array(rng.normal(size=cout).astype(np.float32), f"b{i}")]  # fmt: skip
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]  # fmt: skip
        x = f"r{i}"
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, CHANNELS[-1], 8, 8])], weights,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _channels_last(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each Conv as ORT's NHWC transformer writes it: Transpose, NhwcConv (weight ``(out, kH, kW, in)``), Transpose."""
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    nodes, initializers = [], []
    for node in model.graph.node:
        if node.op_type != "Conv":
            nodes.append(node)
            continue
        x, w, b = node.input
        stored = np.ascontiguousarray(np.moveaxis(weights[w], 1, -1))
        initializers.append(numpy_helper.from_array(stored, f"{node.name}_weight_NHWC"))
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nodes += [
            helper.make_node("Transpose", [x], [f"{node.name}_in"], perm=[0, 2, 3, 1]),
            helper.make_node("NhwcConv", [f"{node.name}_in", f"{node.name}_weight_NHWC", b], [f"{node.name}_out"],
                             name=f"NhwcConv-{node.name}", domain="com.microsoft", **attributes),
            helper.make_node("Transpose", [f"{node.name}_out"], list(node.output), perm=[0, 3, 1, 2]),
        ]  # fmt: skip
    biases = [tensor for tensor in model.graph.initializer if tensor.name.startswith("b")]
    graph = helper.make_graph(nodes, "convs_nhwc", list(model.graph.input), list(model.graph.output),
                              biases + initializers)  # fmt: skip
    return helper.make_model(graph, opset_imports=list(model.opset_import))


def test_a_channels_last_copy_reads_every_layer_as_its_conv() -> None:
    reference = _convs(0)
    suspect = _channels_last(permute_copy(reference, seed=5)[0])
    assert [node.op_type for node in suspect.graph.node].count("NhwcConv") == 4  # the premise
    mine, theirs = fingerprint_model(reference), fingerprint_model(suspect)
    assert theirs.layers == 4  # 0 before: no NhwcConv was read
    np.testing.assert_array_equal(theirs.shapes, mine.shapes)  # kernel 9, fan-in in x 9
    assert compare_fingerprints(mine, theirs).distance < 1e-4
    # Both readers agree (the light index and the ModelGraph).
    light = model_producers(suspect)
    full = producer_weights(ModelGraph(suspect, infer_shapes=False))
    assert [(w.node, w.matrix.tobytes(), w.kernel) for w in light] == [(w.node, w.matrix.tobytes(), w.kernel) for w in full]


def test_a_weight_whose_layout_is_not_channels_last_is_not_read() -> None:
    suspect = _channels_last(_convs(0))
    for node in suspect.graph.node:
        if node.op_type == "NhwcConv":
            del node.attribute[:]  # no kernel_shape: the layout cannot be told, nothing is guessed
    assert fingerprint_model(suspect).layers == 0


def test_find_calls_the_channels_last_copy_derived_and_another_seed_unrelated(tmp_path: Path) -> None:
    for seed in (0, 1):
        onnx.save(_convs(seed), tmp_path / f"convs{seed}.onnx")
    index = tmp_path / "r.idx"
    build_index([tmp_path], index, workers=1)
    found = find(_channels_last(permute_copy(_convs(0), seed=5)[0]), index, top=2)
    best, other = found.candidates
    assert best.path.endswith("convs0.onnx") and best.call == "derived", found.to_json()
    assert other.call == "unrelated", found.to_json()
    stranger = find(_channels_last(_convs(2)), index, top=2)
    assert all(c.call == "unrelated" for c in stranger.candidates), stranger.to_json()
