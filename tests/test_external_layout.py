"""permute then unpermute of an external-data model gives back the files byte for byte.

Each tensor goes back where the source file kept it: a Constant's value ``onnx.save`` leaves
inline (4 KB, above the 1 KB threshold), an initializer under the threshold the file was saved
with, a small external tensor read in when the model was opened (64 bytes, when the file keeps
every initializer external), a large one left mapped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlady


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    constant = helper.make_node("Constant", [], ["table"], value=tensor("table_value", 1, 1024))  # 4 KB inline
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),  # w1: 77 KB, left mapped
        helper.make_node("Mul", ["h", "scale"], ["s"]),  # scale: 2 KB
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),  # w2: 4 KB, read in when opened
        constant,
        helper.make_node("ReduceSum", ["table"], ["total"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "layout", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
        [tensor("w1", 64, 300), tensor("b1", 64), tensor("scale", 8, 64), tensor("w2", 16, 64), tensor("b2", 16)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("threshold", [0, 1024, 4096])
def test_unpermute_gives_back_the_external_files_byte_for_byte(tmp_path: Path, threshold: int) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(
        _model(), source, save_as_external_data=True, all_tensors_to_one_file=True,
        location="model.onnx.data", size_threshold=threshold,
    )  # fmt: skip
    stored = onnx.load(source, load_external_data=False)
    inline = {t.name for t in stored.graph.initializer if t.data_location != TensorProto.EXTERNAL}
    # threshold 0: every initializer in the data file, the smallest read in when the model is opened
    assert ({"b1", "b2"} <= inline) == (threshold > 0) and ("scale" in inline) == (threshold > 2048)
    assert stored.graph.node[4].attribute[0].t.data_location != TensorProto.EXTERNAL  # the Constant stays inline

    permuted = onnxlady.permute(source, output=tmp_path / "permuted.onnx", seed=3)
    assert permuted.permuted_neurons > 0
    back = tmp_path / "back"
    back.mkdir()
    restored = onnxlady.unpermute(tmp_path / "permuted.onnx", permuted.key, output=back / "model.onnx")
    assert restored.weights_identical_to_source
    assert _sha(back / "model.onnx") == _sha(source)
    assert _sha(back / "model.onnx.data") == _sha(tmp_path / "model.onnx.data")
    assert restored.to_json()["output_identical_to_source_file"] is True
