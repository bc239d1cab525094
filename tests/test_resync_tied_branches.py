"""Layers of equal content paired by their connections, class after class (held-out round 19, F7).

A Siamese model runs one encoder on two inputs; torch.onnx exports the second branch reading
``Identity`` copies of the first's weights, and onnxslim (its default ``weight_tying``) ties some
of them back to one initializer. Every layer then has an exact twin in the other branch, so
content cannot say which branch a layer belongs to; the pairing settled each class of such
layers by its neighbours, but against the pairing of the other classes as it was before any
was settled: all three classes crossed branches, 20 % of the connections agreed, and the
untouched slimmed copy was refused as "different models" (exit 2). The classes are now settled
in turn against the pairing as it stands, until none gains.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady import audit, resync, verify_models
from onnxlady.testing import permute_copy

onnxslim = pytest.importorskip("onnxslim", reason="onnxslim not installed (pip install -e '.[deployment]')")
logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def siamese(seed: int = 0) -> onnx.ModelProto:
    """One conv encoder on inputs ``a`` and ``b`` (the second reading Identity copies), ``|fa - fb|``, a head."""
    rng = np.random.default_rng(seed)
    constants: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for name, shape, fan in (("c1.w", [16, 3, 3, 3], 27), ("c1.b", [16], 1), ("c2.w", [32, 16, 3, 3], 144), ("c2.b", [32], 1),
                             ("fc.w", [24, 32], 32), ("fc.b", [24], 1), ("head.w", [8, 24], 24), ("head.b", [8], 1)):
        constants.append(numpy_helper.from_array((rng.standard_normal(shape) * fan ** -0.5).astype(np.float32), name))
    for name in ("c1.w", "c1.b", "c2.w", "c2.b"):  # what torch.onnx writes for a module applied twice
        nodes.append(helper.make_node("Identity", [name], [f"{name}.copy"], name=f"copy.{name}"))
    for side, suffix in (("a", ""), ("b", ".copy")):
        nodes += [
            helper.make_node("Conv", [side, f"c1.w{suffix}", f"c1.b{suffix}"], [f"{side}1"], name=f"{side}/c1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"{side}1"], [f"{side}1r"], name=f"{side}/r1"),
            helper.make_node("Conv", [f"{side}1r", f"c2.w{suffix}", f"c2.b{suffix}"], [f"{side}2"], name=f"{side}/c2", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"{side}2"], [f"{side}2r"], name=f"{side}/r2"),
            helper.make_node("ReduceMean", [f"{side}2r"], [f"{side}m"], name=f"{side}/mean", axes=[2, 3], keepdims=0),
            helper.make_node("Gemm", [f"{side}m", "fc.w", "fc.b"], [f"{side}f"], name=f"{side}/fc", transB=1),
        ]  # fmt: skip
    nodes += [helper.make_node("Sub", ["af", "bf"], ["d"], name="sub"), helper.make_node("Abs", ["d"], ["ad"], name="abs"),
              helper.make_node("Gemm", ["ad", "head.w", "head.b"], ["y"], name="head", transB=1)]
    graph = helper.make_graph(nodes, "siamese", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    slimmed = onnxslim.slim(model)
    readers = [list(node.input[1:]) for node in slimmed.graph.node if node.op_type == "Conv"]
    assert readers[0] == readers[1] or readers[2] == readers[3], readers  # some layer's weights tied into one initializer
    return slimmed


def test_outputs_neither_vanish_nor_explode() -> None:
    session = ort.InferenceSession(siamese().SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    y = session.run(None, {n: rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for n in "ab"})[0]
    assert np.all(np.isfinite(y)) and 0.05 < float(y.std()) < 20


def test_the_slimmed_copy_is_converted_and_its_permuted_copy_permuted(tmp_path: Path) -> None:
    source = siamese()
    reference = _saved(source, tmp_path / "reference.onnx")
    clean = audit(reference, _saved(_slim(source), tmp_path / "slim.onnx"))
    assert clean.verdict == "converted" and clean.exit_code == 0, clean.summary
    permuted = permute_copy(source, 3)[0]
    assert verify_models(source, permuted).equivalent
    moved = audit(reference, _saved(_slim(permuted), tmp_path / "perm-slim.onnx"))
    assert moved.verdict == "permuted" and moved.exit_code == 0, moved.summary


def test_a_resync_of_the_slimmed_permuted_copy_restores_the_order(tmp_path: Path) -> None:
    source = siamese()
    permuted = _slim(permute_copy(source, 5)[0])
    result = resync(_saved(source, tmp_path / "reference.onnx"), _saved(permuted, tmp_path / "suspect.onnx"),
                    output=tmp_path / "restored.onnx")
    assert result.output == tmp_path / "restored.onnx"
    restored = onnx.load(tmp_path / "restored.onnx")
    stored = {t.name: numpy_helper.to_array(t) for t in restored.graph.initializer}
    for tensor in source.graph.initializer:  # every weight back in the reference's order, bit for bit
        np.testing.assert_array_equal(stored[tensor.name], numpy_helper.to_array(tensor))
    assert verify_models(source, restored).equivalent
    wrong = onnx.load(tmp_path / "restored.onnx")
    head = next(t for t in wrong.graph.initializer if t.name == "head.w")
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head)[:, ::-1].copy(), "head.w"))  # one side only
    assert not verify_models(source, wrong).equivalent


def test_a_row_changed_in_the_slimmed_copy_is_modified(tmp_path: Path) -> None:
    source = siamese()
    suspect = _slim(source)
    weight = next(t for t in suspect.graph.initializer if t.name == "fc.w")
    values = numpy_helper.to_array(weight).copy()
    values[3] = np.random.default_rng(7).standard_normal(values.shape[1]).astype(np.float32) * 0.2
    weight.CopyFrom(numpy_helper.from_array(values, "fc.w"))
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
