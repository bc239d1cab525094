"""verify on the CPU keeps one ONNX Runtime session alive at a time, with the same report.

The reference runs every feed first (its outputs recorded), its session is freed, then the
candidate's opens and the comparison replays the record (onnxlady._verify._reference_runs).
These tests check that two sessions never coexist, and that the replayed comparison is the one
made with both sessions alive (the record's budget forced to nothing) on every path: several
feeds, a state loop, KV-cache decoding, a failing pair (the noise floor reopens the reference),
a candidate that cannot be opened, a reference that cannot run.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.decoder import build_decoder
from onnxlady import analyze
from onnxlady._errors import OnnxladyError
from onnxlady._verify import _compare, _noise_floor
from onnxlady._verify._compare import CheckNotRunError, verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N, 8] -> Gemm -> Relu -> Gemm -> Softmax (a squashing output: its input is fetched too)."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (16, 4)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _streaming() -> onnx.ModelProto:
    """A model with a fixed-shape state (state -> stateN): verify runs it as a loop of steps."""
    rng = np.random.default_rng(1)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 6)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(5e-2, dtype=np.float32), "step"),
        numpy_helper.from_array(rng.normal(0, 0.4, (6, 3)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Relu", ["m1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
        helper.make_node("Tanh", ["m2"], ["t2"]),
        helper.make_node("Mul", ["t2", "step"], ["update"]),
        helper.make_node("Add", ["state", "update"], ["stateN"]),
        helper.make_node("MatMul", ["state", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "streaming",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [1, 6])],
        weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _fixed_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` taking any batch but running only at 2 (its output reshaped to [2, 4]): a run that fails."""
    fixed = copy_model(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    fixed.graph.initializer.append(numpy_helper.from_array(np.array([2, 4], dtype=np.int64), "two_by_four"))
    fixed.graph.node[-1].output[0] = "y_any"
    fixed.graph.node.append(helper.make_node("Reshape", ["y_any", "two_by_four"], ["y"]))
    return fixed


def _wrong(model: onnx.ModelProto) -> onnx.ModelProto:
    wrong = copy_model(permute_copy(model, seed=1)[0])
    permute_producer_only(wrong, analyze(wrong))
    return wrong


def _saved(tmp_path: Path, name: str, model: onnx.ModelProto) -> str:
    path = tmp_path / name
    onnx.save(model, path)
    return str(path)


def _both_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """No record: every reference run is live, with the candidate's session open beside it (as before)."""
    monkeypatch.setattr(_compare, "_RECORD_BUDGET", -1)
    monkeypatch.setattr(_compare, "_stored_size", lambda model: -1)


def _track_sessions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the sessions alive each time verify (or its noise floor) opens one (the counts, after opening)."""
    alive: list[weakref.ref[Any]] = []
    counts: list[int] = []
    opened = _compare.create_session

    def tracked(*args: Any, **kwargs: Any) -> Any:
        result = opened(*args, **kwargs)
        alive.append(weakref.ref(result[0]))
        counts.append(sum(ref() is not None for ref in alive))
        return result

    monkeypatch.setattr(_compare, "create_session", tracked)
    monkeypatch.setattr(_noise_floor, "create_session", tracked)
    return counts


def test_one_session_alive_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    reference = _saved(tmp_path, "reference.onnx", model)
    candidate = _saved(tmp_path, "candidate.onnx", permute_copy(model, seed=3)[0])
    counts = _track_sessions(monkeypatch)
    report = verify_models(reference, candidate, provider="cpu", iterations=3)
    assert report.verdict == "equivalent", report.to_dict()
    assert counts == [1, 1]  # the reference's, then the candidate's once the first was freed


@pytest.mark.parametrize("decoding", [False, True])
def test_a_failing_pair_reopens_the_reference_for_its_noise(
    decoding: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_decoder(0) if decoding else _mlp()
    reference = _saved(tmp_path, "reference.onnx", model)
    candidate = _saved(tmp_path, "wrong.onnx", _wrong(model))
    counts = _track_sessions(monkeypatch)
    report = verify_models(reference, candidate, provider="cpu")
    assert report.verdict == "not-equivalent"
    assert any("decoding" in note for note in report.notes) == decoding  # two steps, each with its noise
    assert any(c.reference_noise is not None for c in report.outputs)  # the noise was measured
    # reference, candidate, then the noise floor's: the unoptimised reference (once for every
    # decoding step), the reference again; each freed before the next is built (the candidate's
    # too, once everything is compared)
    assert counts == [1, 1, 1, 1]


def _pairs() -> dict[str, tuple[onnx.ModelProto, onnx.ModelProto, dict[str, Any]]]:
    mlp, streaming, decoder = _mlp(), _streaming(), build_decoder(0)
    return {
        "feeds": (mlp, permute_copy(mlp, seed=3)[0], {"iterations": 4}),
        "wrong": (mlp, _wrong(mlp), {"iterations": 2}),
        "state-loop": (streaming, permute_copy(streaming, seed=2)[0], {}),
        "state-loop-wrong": (streaming, _wrong(streaming), {}),
        "decoding": (decoder, decoder, {}),
        "decoding-wrong": (decoder, _wrong(decoder), {}),
    }


@pytest.mark.parametrize("case", sorted(_pairs()))
def test_the_replayed_report_is_the_side_by_side_one(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference_model, candidate_model, options = _pairs()[case]
    reference = _saved(tmp_path, "reference.onnx", reference_model)
    candidate = _saved(tmp_path, "candidate.onnx", candidate_model)
    replayed = verify_models(reference, candidate, provider="cpu", **options).to_dict()
    with monkeypatch.context() as patch:
        _both_alive(patch)
        side_by_side = verify_models(reference, candidate, provider="cpu", **options).to_dict()
    assert replayed == side_by_side
    assert replayed["verdict"] == ("not-equivalent" if case.endswith("wrong") else "equivalent"), replayed


def test_a_candidate_that_cannot_open_is_said_before_a_reference_that_cannot_run(tmp_path: Path) -> None:
    model = _fixed_batch(_mlp())
    reference = _saved(tmp_path, "reference.onnx", model)
    broken = copy_model(model)
    broken.graph.node[1].op_type = "NoSuchOperator"
    candidate = _saved(tmp_path, "broken.onnx", broken)
    # The reference cannot run at batch 3: both fail,
    # and the candidate's failure to load is the one reported, as when both sessions opened first.
    with pytest.raises(OnnxladyError) as raised:
        verify_models(reference, candidate, provider="cpu", shapes={"x": (3, 8)})
    assert "broken.onnx" in str(raised.value) and not isinstance(raised.value, CheckNotRunError)


def test_a_reference_that_cannot_run_is_not_run_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fixed_batch(_mlp())
    reference = _saved(tmp_path, "reference.onnx", model)
    candidate = _saved(tmp_path, "candidate.onnx", permute_copy(model, seed=3)[0])
    messages = []
    for record in (True, False):
        with monkeypatch.context() as patch:
            if not record:
                _both_alive(patch)
            with pytest.raises(CheckNotRunError) as raised:
                verify_models(reference, candidate, provider="cpu", shapes={"x": (3, 8)})
        messages.append(str(raised.value))
    assert messages[0] == messages[1] and "cannot run" in messages[0], messages
