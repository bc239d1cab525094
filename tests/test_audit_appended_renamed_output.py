"""Operators appended behind a model's output under a new output name are an edit (held-out round 19, F4).

``onnx.compose.merge_models`` bolts a post-processing model behind another: it lists the opset
import once per model and names the output after the second model's. A ``Mul`` by a constant
appended that way (one logit x1.5) kept every weight and was audited ``converted``, exit 0: the
node-for-node comparison gave up on the doubled opset import, and on a small model one operator
more tipped the share of operators found by name below 90 %, so the suspect read as no
node-for-node copy, while the audit had already matched it as one. The same append keeping the
output's name was caught. An ``Identity`` that only renames the output computes nothing and is
still a conversion.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, compose, helper, numpy_helper

from fixtures import FIXTURES
from onnxlady import audit
from onnxlady._audit._graph_edits import graph_edits
from onnxlady.testing import copy_model, permute_copy

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _post(model: onnx.ModelProto, op_type: str) -> onnx.ModelProto:
    """A one-operator model reading ``model``'s first output: ``Mul`` by ones with one 1.5, or ``Identity``."""
    value = model.graph.output[0]
    width = value.type.tensor_type.shape.dim[-1].dim_value
    shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
    constants, inputs = [], ["in0"]
    if op_type == "Mul":
        factor = np.ones(width, np.float32)
        factor[-1] = 1.5
        constants.append(numpy_helper.from_array(factor, "k"))
        inputs.append("k")
    graph = helper.make_graph([helper.make_node(op_type, inputs, ["out0"], name="post")], "post",
                              [helper.make_tensor_value_info("in0", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out0", TensorProto.FLOAT, shape)], initializer=constants)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _merged(model: onnx.ModelProto, op_type: str) -> onnx.ModelProto:
    """``model`` with ``op_type`` bolted behind its first output by onnx.compose.merge_models."""
    post = _post(model, op_type)
    return compose.merge_models(model, post, io_map=[(model.graph.output[0].name, "in0")], prefix2="post/")


def _outputs(model: onnx.ModelProto) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
            for i in session.get_inputs()}
    return [np.asarray(o) for o in session.run(None, feed)]


@pytest.fixture(scope="module", params=["resnet", "matmul_mlp"])
def source(request: pytest.FixtureRequest) -> onnx.ModelProto:
    model = FIXTURES[request.param](0)
    out = _outputs(model)[0]
    assert np.all(np.isfinite(out)) and 1e-3 < float(out.std()) < 1e3  # outputs neither vanish nor explode
    return model


@pytest.mark.parametrize("permuted", [False, True], ids=["as-is", "permuted"])
def test_a_mul_merged_behind_the_output_is_modified(tmp_path: Path, source: onnx.ModelProto, permuted: bool) -> None:
    suspect = _merged(permute_copy(source, 3)[0] if permuted else copy_model(source), "Mul")
    assert len(suspect.opset_import) > len({o.domain for o in suspect.opset_import})  # merge_models lists it twice
    assert not np.allclose(_outputs(source)[0], _outputs(suspect)[0], atol=1e-4)  # it computes something else
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "Mul 'post/post' inserted" in result.summary, result.summary


def test_an_identity_merged_behind_the_output_is_no_edit(tmp_path: Path, source: onnx.ModelProto) -> None:
    suspect = _merged(copy_model(source), "Identity")
    np.testing.assert_array_equal(_outputs(source)[0], _outputs(suspect)[0])
    assert graph_edits(source, suspect) == []
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.exit_code == 0 and result.verdict in ("identical", "converted"), result.summary


def test_operators_added_to_a_small_copy_are_listed(source: onnx.ModelProto) -> None:
    """Three operators appended by hand (the output renamed): more than a tenth of a small model's operators."""
    suspect = copy_model(source)
    output = suspect.graph.output[0].name
    suspect.graph.initializer.append(numpy_helper.from_array(np.asarray(1.5, np.float32), "k"))
    suspect.graph.node.extend([helper.make_node("Mul", [output, "k"], ["m1"], name="m1"),
                               helper.make_node("Mul", ["m1", "k"], ["m2"], name="m2"),
                               helper.make_node("Mul", ["m2", "k"], ["renamed"], name="m3")])
    suspect.graph.output[0].name = "renamed"
    assert len(source.graph.node) < 27  # n of n + 3 operators is under 90 %: the old share hid the three
    edits = graph_edits(source, suspect)
    assert [line for line in edits if "inserted" in line] == [f"Mul '{name}' inserted" for name in ("m1", "m2", "m3")]
    assert "the graph's inputs or outputs differ" in edits
    # A converter's form (compared across forms) keeps the old share: operators added there are added_operators'.
    assert graph_edits(source, suspect, node_for_node=False) == []
