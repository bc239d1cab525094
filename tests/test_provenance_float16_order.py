"""A two-input model through ONNX Runtime's float16 converter keeps its layer order in the fingerprint.

Held-out finding (session 14): ``convert_float_to_float16(keep_io_types=True)`` appends the
``Cast`` of a float graph input at the *end* of the node list. The graph is then not sorted,
and the ModelGraph's order (smallest ready index first) ran every node that does not wait for
that input first: CLIP's text layers, then the vision layers, 14 positions from where the
reference has them and outside the alignment window. ``find`` called CLIP's float16 copy
`unrelated` to clip.onnx (0.93) and ranked BART first. The fingerprint now reads the layers in
the order the graph's outputs pull them in, whatever the node list's order (version 3; see
``tests/test_provenance_list_order.py`` for lists re-sorted by ORT's quantizer).
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady._errors import OnnxladyError
from onnxlady._provenance._find import find
from onnxlady._provenance._fingerprint import ModelFingerprint, fingerprint_model
from onnxlady._provenance._index import build_index
from onnxlady.testing import copy_model, permute_copy

float16 = pytest.importorskip("onnxruntime.transformers.float16", reason="onnxruntime.transformers not installed")

#: Layers per tower: each tower is displaced by the other's depth, past the window of 3.
TOWER = 4


def _two_towers(seed: int) -> onnx.ModelProto:
    """A CLIP-like model: a float ``pixels`` tower listed first, then an ``ids`` tower (Gather)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []

    def tower(name: str, x: str, fan_in: int) -> str:
        for i in range(TOWER):
            out = 16 if i == TOWER - 1 else 32
            # Shaped like trained layers (spread neuron norms), so the layers tell seeds apart.
            w = rng.normal(size=(fan_in, out)) * rng.lognormal(0.0, 0.5, size=(1, out))
            weights.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"{name}.w{i}"], [f"{name}.m{i}"], name=f"{name}/MatMul{i}"))
            x = f"{name}.m{i}"
            if i < TOWER - 1:
                nodes.append(helper.make_node("Tanh", [x], [f"{name}.a{i}"], name=f"{name}/Tanh{i}"))
                x = f"{name}.a{i}"
            fan_in = out
        return x

    image = tower("vision", "pixels", 24)
    weights.append(numpy_helper.from_array(rng.normal(size=(50, 32)).astype(np.float32), "text.table"))
    nodes.append(helper.make_node("Gather", ["text.table", "ids"], ["text.embedded"], name="text/Gather"))
    text = tower("text", "text.embedded", 32)
    graph = helper.make_graph(
        nodes,
        "two_towers",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5]),
            helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [2, 24]),
        ],
        [
            helper.make_tensor_value_info(image, TensorProto.FLOAT, [2, 16]),
            helper.make_tensor_value_info(text, TensorProto.FLOAT, [2, 5, 16]),
        ],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _float16(model: onnx.ModelProto) -> onnx.ModelProto:
    converted = float16.convert_float_to_float16(copy_model(model), keep_io_types=True)
    # The premise: the input's Cast comes after the nodes that read it (the list is not sorted).
    listed = [node.op_type for node in converted.graph.node]
    assert "Cast" in listed[-3:] and "Cast" not in listed[:TOWER], listed
    return converted


def test_float16_copy_reads_its_layers_in_the_reference_order() -> None:
    reference = _two_towers(0)
    suspect = _float16(permute_copy(reference, seed=3)[0])
    assert fingerprint_model(suspect).names == fingerprint_model(reference).names


def test_find_calls_the_float16_copy_derived_and_another_seed_unrelated(tmp_path: Path) -> None:
    for seed in (0, 1):
        onnx.save(_two_towers(seed), tmp_path / f"towers{seed}.onnx")
    index = tmp_path / "r.idx"
    build_index([tmp_path], index, workers=1)

    found = find(_float16(permute_copy(_two_towers(0), seed=3)[0]), index, top=2)
    best, other = found.candidates
    assert best.path.endswith("towers0.onnx") and best.call == "derived", found.to_json()
    assert best.distance < 0.05, found.to_json()  # 0.97 apart, unrelated, before
    assert other.call == "unrelated", found.to_json()

    # Another seed's float16 copy is derived from neither (the order helps the true copy only).
    stranger = find(_float16(_two_towers(2)), index, top=2)
    assert all(c.call == "unrelated" for c in stranger.candidates), stranger.to_json()


def test_index_of_an_older_fingerprint_version_is_refused_naming_index_build(tmp_path: Path) -> None:
    onnx.save(_two_towers(0), tmp_path / "towers0.onnx")
    index = tmp_path / "r.idx"
    build_index([tmp_path], index, workers=1)
    with sqlite3.connect(index) as connection:
        (blob,) = connection.execute("SELECT fingerprint FROM models").fetchone()
        fingerprint = ModelFingerprint.from_bytes(blob)
        older = replace(fingerprint, version=fingerprint.version - 1).to_bytes()
        connection.execute("UPDATE models SET fingerprint = ?", (older,))
    with pytest.raises(OnnxladyError, match=r"older than this onnxlady's.*`onnxlady index build`"):
        find(_two_towers(0), index)
