"""verify's memory on the CPU: weights read by ONNX Runtime from the file.

A CPU session that must return intermediate tensors gets the model's bytes without its weights
(onnxlady._verify._weightless): every large inline weight becomes an external-data reference to
its own bytes in the file. These tests check that those references point at exactly the right
bytes (the tensors read through them equal those onnx.load reads), that ORT computes
bit-identical outputs from them, and that verify uses them and still catches a wrong permutation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from onnxlady import analyze
from onnxlady._verify import _session
from onnxlady._verify._compare import verify_models
from onnxlady._verify._weightless import WEIGHTLESS_MIN_BYTES, weightless_bytes
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

_WIDTH, _HIDDEN = 64, 512


def _model() -> onnx.ModelProto:
    """x[2, 64] -> Gemm (128 KiB initializer) -> Relu -> MatMul (128 KiB Constant) -> Add -> Softmax."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1 / np.sqrt(_WIDTH), (_WIDTH, _HIDDEN)).astype(np.float32)
    b1 = rng.normal(0, 0.1, _HIDDEN).astype(np.float32)
    w2 = rng.normal(0, 1 / np.sqrt(_HIDDEN), (_HIDDEN, _WIDTH)).astype(np.float32)
    b2 = rng.normal(0, 0.1, _WIDTH).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Constant", [], ["w2"], name="w2_constant", value=numpy_helper.from_array(w2, "w2")),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "b2"], ["logits"], name="bias2"),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "weightless", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, _WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, _WIDTH])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(b2, "b2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _saved(folder: Path, name: str, model: onnx.ModelProto) -> Path:
    path = folder / name
    onnx.save(model, path)
    return path


def _tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer and Constant value of ``model``, by name."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def test_the_large_weights_point_at_their_own_bytes_in_the_file(tmp_path: Path) -> None:
    path = _saved(tmp_path, "model.onnx", _model())
    data, folder, moved, had_external = weightless_bytes(path)
    assert folder == str(tmp_path.resolve())
    assert (moved, had_external) == (2, False)
    assert len(data) < os.path.getsize(path) // 10  # the weights stayed in the file
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    external = {t.name for t in proto.graph.initializer if external_data_helper.uses_external_data(t)}
    constants = [n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"]
    assert external == {"w1"}  # b1 and b2 are under WEIGHTLESS_MIN_BYTES: kept inline
    assert [external_data_helper.uses_external_data(t) for t in constants] == [True]
    assert all(len(t.raw_data) < WEIGHTLESS_MIN_BYTES for t in proto.graph.initializer)
    # Read through the references, every tensor is the one onnx.load reads: the offsets are right.
    external_data_helper.load_external_data_for_model(proto, folder)
    expected, got = _tensors(onnx.load(path)), _tensors(proto)
    assert expected.keys() == got.keys()
    for name, array in expected.items():
        assert got[name].tobytes() == array.tobytes(), name


def test_a_model_with_no_large_weight_is_unchanged(tmp_path: Path) -> None:
    model = _model()
    path = _saved(tmp_path, "model.onnx", model)
    unchanged = weightless_bytes(path, min_bytes=1 << 30)
    assert (unchanged.data, unchanged.moved, unchanged.had_external) == (b"", 0, False)  # the file is the model
    # verify then hands ORT the path, or the file's bytes with the outputs appended, as before.
    relu = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    small = _saved(tmp_path, "small.onnx", helper.make_model(relu, opset_imports=[helper.make_opsetid("", 17)]))
    assert _session._model_source(small, "small", weightless=True) == (str(small), None)
    source, _ = _session._model_source(small, "small", ["x"], weightless=True)
    assert isinstance(source, bytes) and source.startswith(small.read_bytes())


def test_a_symlinked_model_points_into_the_real_file(tmp_path: Path) -> None:
    real = _saved(tmp_path, "real.onnx", _model())
    elsewhere = tmp_path / "links"
    elsewhere.mkdir()
    link = elsewhere / "link.onnx"
    link.symlink_to(real)
    data, folder, _, _ = weightless_bytes(link)
    assert folder == str(tmp_path.resolve())
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"real.onnx"}


def _outputs(source: str | bytes, folder: str | None, extra: list[str]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).uniform(-1, 1, (2, _WIDTH)).astype(np.float32)
    return list(session.run(None, {"x": x}))


def test_ort_computes_the_same_bits_from_the_weightless_bytes(tmp_path: Path) -> None:
    path = _saved(tmp_path, "model.onnx", _model())
    from_path = _outputs(str(path), None, [])
    moved = weightless_bytes(path)
    from_bytes = _outputs(moved.data, moved.folder, [])
    assert [a.tobytes() for a in from_path] == [b.tobytes() for b in from_bytes]
    assert 0.01 < float(np.abs(from_path[0]).max()) < 1.0  # softmax probabilities that neither vanish nor saturate


def test_verify_hands_a_cpu_session_no_weights_and_still_catches_a_wrong_permutation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    reference = _saved(tmp_path, "reference.onnx", model)
    candidate = _saved(tmp_path, "candidate.onnx", permute_copy(model, seed=3)[0])
    wrong = copy_model(permute_copy(model, seed=3)[0])
    permute_producer_only(wrong, analyze(wrong))
    wrong_path = _saved(tmp_path, "wrong.onnx", wrong)
    given: list[int] = []
    real_session = ort.InferenceSession

    def recording(source: Any, *args: Any, **kwargs: Any) -> Any:
        given.append(len(source) if isinstance(source, bytes) else -1)
        return real_session(source, *args, **kwargs)

    monkeypatch.setattr(_session.ort, "InferenceSession", recording, raising=False)
    report = verify_models(reference, candidate, provider="cpu")
    assert report.verdict == "equivalent"
    assert [c.name for c in report.squash_inputs] == ["logits"]  # fetched: the sessions got bytes
    assert given and all(0 < size < os.path.getsize(reference) // 10 for size in given)
    assert verify_models(reference, wrong_path, provider="cpu").verdict == "not-equivalent"


def test_a_cpu_session_reads_inline_weights_from_the_file_and_external_ones_by_path(tmp_path: Path) -> None:
    model = _model()
    inline = _saved(tmp_path, "inline.onnx", model)
    source, folder = _session._model_source(inline, "inline", weightless=True)
    assert isinstance(source, bytes) and len(source) < os.path.getsize(inline) // 10
    assert folder == str(tmp_path.resolve())
    external = tmp_path / "external.onnx"
    onnx.save(copy_model(model), external, save_as_external_data=True, location="external.onnx.data", size_threshold=0)
    assert weightless_bytes(external).had_external
    assert _session._model_source(external, "external", weightless=True) == (str(external), None)
    assert _session._model_source(inline, "inline") == (str(inline), None)  # CUDA sessions: the path, as before
    session, used, _ = _session.create_session(inline, "cpu")
    x = np.random.default_rng(1).uniform(-1, 1, (2, _WIDTH)).astype(np.float32)
    assert used == _session.CPU
    assert session.run(None, {"x": x})[0].tobytes() == _outputs(str(inline), None, [])[0].tobytes()
