"""Recurrent layers and control-flow bodies (issue 12, item 5: "Subgraphs and recurrent layers").

- LSTM / GRU / RNN: the hidden units are one group (``I_gates (x) p`` on the rows of W, R and B,
  ``p`` on R's columns, the initial states and the outputs' last axis; both directions of a
  bidirectional layer share it); permute -> verify -> unpermute, wrong permutations caught
  (one gate block, R's columns, one direction), resync recovers Psi 100; a graph-input
  initial state or a computed weight freezes, saying why;
- If / Loop / Scan bodies: their neurons are permuted (branch outputs agree through the If,
  loop-carried values and states agree with the body's outputs, scan outputs shift their axes);
  both branches run equivalent after permutation; constants held by a body are permuted and
  written (also by the streaming writer); bodies that cannot be opened say why.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from fixtures import recurrent as recurrent_fixtures
from onnxlady import (
    ChannelAnalysis,
    analyze,
    draw_permutations,
    permute_model,
    unpermute_model,
    verify_models,
)
from onnxlady._io._files import save_model
from onnxlady._io._tensors import tensor_holders
from onnxlady._resync._entry import resync_model
from onnxlady._transforms._permute import DeferredTensors
from onnxlady._verify._compare import generate_inputs
from onnxlady.testing import constant_bytes, copy_model, group_at, index_maps, permute_copy, permute_producer_only

FIXTURES = recurrent_fixtures.FIXTURES
RECURRENT = ["lstm", "lstm_bidirectional", "gru", "rnn", "rnn_batch_first"]
GATES = {"lstm": 4, "lstm_bidirectional": 4, "gru": 3, "rnn": 1, "rnn_batch_first": 1}
LAYER = {"lstm": "lstm", "lstm_bidirectional": "bilstm", "gru": "gru", "rnn": "rnn", "rnn_batch_first": "rnn"}


# -- helpers ----------------------------------------------------------------------------------
@functools.cache
def _fixture_bytes(name: str) -> bytes:
    return FIXTURES[name](0).SerializeToString()


def _fixture(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_fixture_bytes(name))


_maps, _group = index_maps, group_at


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(tensor_holders(model)[name]).copy()


def _put(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    """Overwrite constant ``name`` of ``model`` (wherever it lives) with ``array``."""
    tensor_holders(model)[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(out) for out in ReferenceEvaluator(model).run(None, feeds)]


def _feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    return generate_inputs(model, None, np.random.default_rng(seed))


def _same(reference: list[np.ndarray], candidate: list[np.ndarray]) -> bool:
    return all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(reference, candidate, strict=True))


def _equivalent(source: onnx.ModelProto, model: onnx.ModelProto, seed: int = 0) -> bool:
    """ONNX Runtime where it runs the model, else the ONNX reference evaluator (batch-first layers)."""
    if source.graph.name == "rnn_batch_first":
        feeds = _feeds(source, seed)
        return _same(_outputs(source, feeds), _outputs(model, feeds))
    report = verify_models(source, model, provider="cpu", seed=seed)
    return report.equivalent


def _roundtrip(name: str, seed: int) -> tuple[onnx.ModelProto, ChannelAnalysis, dict[str, np.ndarray]]:
    """Permute fixture ``name``: equivalent, constants changed, unpermuted bit for bit."""
    source = _fixture(name)
    model, analysis, perms, key = permute_copy(source, seed)
    assert perms, "nothing was permuted"
    assert constant_bytes(model) != constant_bytes(source)
    assert _equivalent(source, model, seed)
    permuted = copy_model(model)
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()
    return permuted, analysis, perms


# -- recurrent layers: analysis ----------------------------------------------------------------
def test_fixtures_are_registered_and_runnable() -> None:
    assert set(FIXTURES) == {"lstm", "lstm_bidirectional", "gru", "rnn", "rnn_batch_first", "if_body", "loop_body"}
    assert set(FIXTURES) - {"rnn_batch_first"} == recurrent_fixtures.RUNNABLE


@pytest.mark.parametrize("name", RECURRENT)
def test_hidden_units_are_one_group_over_every_gate_block(name: str) -> None:
    analysis = analyze(_fixture(name))
    layer, gates = LAYER[name], GATES[name]
    units = _group(analysis, f"{layer}.R", 2)
    assert units.permutable and units.reasons == ()
    blocks = "p" if gates == 1 else f"I_{gates} (x) p"
    assert _maps(analysis, f"{layer}.W", 1) == {units.id: blocks}
    assert _maps(analysis, f"{layer}.R", 1) == {units.id: blocks}
    assert _maps(analysis, f"{layer}.R", 2) == {units.id: "p"}
    assert _maps(analysis, f"{layer}.B", 1) == {units.id: f"I_{2 * gates} (x) p"}
    # The input side: W's columns take the producer's permutation.
    features = _group(analysis, f"{layer}.W", 2)
    assert features.permutable and features is not units
    assert _maps(analysis, "embed.weight" if name != "gru" else "conv.weight", 1 if name != "gru" else 0) == {
        features.id: "p"
    }
    assert analysis.summary()["permutable_fraction"] > 0


def test_lstm_states_and_peepholes_take_the_units() -> None:
    for name, layer in (("lstm", "lstm"), ("lstm_bidirectional", "bilstm")):
        analysis = analyze(_fixture(name))
        units = _group(analysis, f"{layer}.R", 2)
        assert _maps(analysis, f"{layer}.P", 1) == {units.id: "I_3 (x) p"}
        assert _maps(analysis, f"{layer}.initial_h", 2) == {units.id: "p"}
        assert _maps(analysis, f"{layer}.initial_c", 2) == {units.id: "p"}
    analysis = analyze(_fixture("lstm"))
    units = _group(analysis, "lstm.R", 2)
    # Y, Y_h and Y_c carry the units on their last axis, to both consumers.
    outputs = {"lstm.Y", "lstm.Y_h", "lstm.Y_c"}
    found = {m.tensor: m.axis for m in units.members if m.tensor in outputs}
    assert found == {"lstm.Y": 3, "lstm.Y_h": 2, "lstm.Y_c": 2}
    assert _maps(analysis, "sequence.weight", 0) == {units.id: "p"}
    assert _maps(analysis, "summary.weight", 1) == {units.id: "p"}


def test_bidirectional_directions_share_one_permutation() -> None:
    """Both directions take the same ``p``: merging the directions into the features gives
    ``I_2 (x) p`` on the consumer's rows.
    """
    analysis = analyze(_fixture("lstm_bidirectional"))
    units = _group(analysis, "bilstm.R", 2)
    assert _maps(analysis, "logits.weight", 0) == {units.id: "I_2 (x) p"}


def test_uniform_computed_initial_state_needs_no_permutation() -> None:
    """The RNN's initial state is ConstantOfShape zeros (computed): the units stay permutable."""
    for name in ("rnn", "rnn_batch_first"):
        analysis = analyze(_fixture(name))
        assert _group(analysis, "rnn.R", 2).permutable
        assert not _maps(analysis, "rnn.initial_h", 2)


def _lstm_with(initial_h_input: bool = False, weight_input: bool = False) -> onnx.ModelProto:
    """MatMul -> LSTM (hidden 6) -> Squeeze -> MatMul; the initial state or W as a graph input."""
    rng = np.random.default_rng(0)
    weights = {
        "embed.weight": rng.standard_normal((4, 5)).astype(np.float32),
        "W": rng.standard_normal((1, 24, 5)).astype(np.float32) * 0.4,
        "R": rng.standard_normal((1, 24, 6)).astype(np.float32) * 0.3,
        "head.weight": rng.standard_normal((6, 3)).astype(np.float32),
        "axis": np.array([1], np.int64),
    }
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [3, 1, 4])]
    for name, wanted in (("W", weight_input), ("h0", initial_h_input)):
        if wanted:
            shape = [1, 24, 5] if name == "W" else [1, 1, 6]
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            weights.pop(name, None)
    nodes = [
        helper.make_node("MatMul", ["input", "embed.weight"], ["embed"], name="embed"),
        helper.make_node("LSTM", ["embed", "W", "R", "", "", "h0" if initial_h_input else ""], ["Y"], name="lstm",
                         hidden_size=6),
        helper.make_node("Squeeze", ["Y", "axis"], ["Ys"], name="squeeze"),
        helper.make_node("MatMul", ["Ys", "head.weight"], ["logits"], name="head"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "lstm_inputs", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 1, 3])],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_graph_input_initial_state_freezes_the_units_and_nothing_else() -> None:
    analysis = analyze(_lstm_with(initial_h_input=True))
    units = _group(analysis, "Y", 3)  # a frozen group lists activations, not weights
    assert units.frozen and [r.kind for r in units.reasons] == ["graph-input"]
    assert "'h0'" in units.reasons[0].message
    assert _group(analysis, "embed.weight", 1).permutable  # the input side is unaffected


def test_computed_weight_freezes_with_its_reason() -> None:
    analysis = analyze(_lstm_with(weight_input=True))
    features = _group(analysis, "embed", 2)
    assert features.frozen and features.reasons[0].kind == "not-constant"
    assert "LSTM 'lstm'" in features.reasons[0].message
    assert not _maps(analysis, "head.weight", 0)  # the LSTM makes no units to permute


# -- recurrent layers: permutation -------------------------------------------------------------
@pytest.mark.parametrize("name", RECURRENT)
@pytest.mark.parametrize("seed", [1, 2])
def test_recurrent_permute_verify_unpermute(name: str, seed: int) -> None:
    permuted, analysis, perms = _roundtrip(name, seed)
    units = _group(analysis, f"{LAYER[name]}.R", 2)
    assert units.id in perms
    source = _fixture(name)
    for tensor in (f"{LAYER[name]}.{kind}" for kind in ("W", "R", "B")):
        assert not np.array_equal(_array(permuted, tensor), _array(source, tensor))


def _undo_rows(model: onnx.ModelProto, source: onnx.ModelProto, name: str, start: int, stop: int,
               direction: slice = slice(None)) -> None:
    """Put back the source's rows ``start:stop`` (axis 1) of tensor ``name`` in ``model``."""
    array = _array(model, name)
    array[direction, start:stop] = _array(source, name)[direction, start:stop]
    _put(model, name, array)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_batch_first"])
def test_one_gate_block_left_in_place_is_caught(name: str) -> None:
    source = _fixture(name)
    model, _, _, _ = permute_copy(source, 3)
    layer, gates = LAYER[name], GATES[name]
    hidden = _array(source, f"{layer}.R").shape[2]
    block = gates - 1  # LSTM c, GRU h, RNN its only gate
    for tensor in ("W", "R"):
        _undo_rows(model, source, f"{layer}.{tensor}", block * hidden, (block + 1) * hidden)
    assert not _equivalent(source, model)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_batch_first"])
def test_recurrence_columns_left_in_place_are_caught(name: str) -> None:
    source = _fixture(name)
    model, analysis, perms, _ = permute_copy(source, 3)
    layer = LAYER[name]
    units = _group(analysis, f"{layer}.R", 2)
    # R permuted on its rows only: undo the column permutation.
    inverse = np.argsort(perms[units.id])
    _put(model, f"{layer}.R", np.take(_array(model, f"{layer}.R"), inverse, axis=2))
    assert not _equivalent(source, model)


def test_one_direction_left_unpermuted_is_caught() -> None:
    source = _fixture("lstm_bidirectional")
    model, _, _, _ = permute_copy(source, 3)
    for tensor, rows in (("W", 32), ("R", 32), ("B", 64), ("P", 24), ("initial_h", 2), ("initial_c", 2)):
        if tensor.startswith("initial"):
            array = _array(model, f"bilstm.{tensor}")
            array[1] = _array(source, f"bilstm.{tensor}")[1]
            _put(model, f"bilstm.{tensor}", array)
        else:
            _undo_rows(model, source, f"bilstm.{tensor}", 0, rows, direction=slice(1, 2))
    assert not _equivalent(source, model)


@pytest.mark.parametrize("name", ["lstm", "lstm_bidirectional", "gru", "rnn"])
def test_producer_permuted_alone_is_caught(name: str) -> None:
    source = _fixture(name)
    model = copy_model(source)
    permute_producer_only(model, analyze(model))
    assert not verify_models(source, model, provider="cpu").equivalent


@pytest.mark.parametrize("name", [*RECURRENT, "if_body", "loop_body"])
def test_resync_of_a_permuted_copy_recovers_every_neuron(name: str) -> None:
    source = _fixture(name)
    model, _, _, key = permute_copy(source, 5)
    result = resync_model(source, model, true_key=key)
    assert result.psi == 100.0 and result.psi_distinguishable == 100.0
    assert constant_bytes(result.model) == constant_bytes(source)


# -- control flow: If -------------------------------------------------------------------------
def _branch_seeds(model: onnx.ModelProto) -> dict[bool, int]:
    """A verify seed for each value of the fixture's condition ``mean(input) > 0``."""
    taken: dict[bool, int] = {}
    for seed in range(40):
        taken.setdefault(bool(_feeds(model, seed)["input"].mean() > 0), seed)
    assert set(taken) == {True, False}
    return taken


def test_if_body_neurons_are_permutable() -> None:
    analysis = analyze(_fixture("if_body"))
    assert analysis.closed_subgraphs == [] and analysis.summary()["subgraphs_not_analysed"] == []
    for branch in ("then", "else"):
        first = _group(analysis, f"{branch}.conv1.weight", 0)
        assert first.permutable and _maps(analysis, f"{branch}.conv2.weight", 1) == {first.id: "p"}
    # The If returns either branch's features: both last convs and the main Gemm share one group.
    returned = _group(analysis, "then.conv2.weight", 0)
    assert returned.permutable
    assert _group(analysis, "else.conv2.weight", 0) is returned
    assert _maps(analysis, "logits.weight", 1) == {returned.id: "p"}
    assert _group(analysis, "select", 1) is returned
    assert len(analysis.permutable_groups) == 3
    assert analysis.summary()["permutable_producer_neurons"] == 8 + 16 + 8 + 16


def test_if_body_permutes_equivalently_on_both_branches() -> None:
    source = _fixture("if_body")
    model, _, _, key = permute_copy(source, 4)
    for name in ("then.conv1.weight", "else.conv2.weight", "else.conv2.bias"):
        assert not np.array_equal(_array(model, name), _array(source, name))
    for seed in _branch_seeds(source).values():
        report = verify_models(source, model, provider="cpu", seed=seed)
        assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert unpermute_model(model, key) and model.SerializeToString() == source.SerializeToString()


def test_one_branch_left_unpermuted_is_caught_when_it_runs() -> None:
    source = _fixture("if_body")
    model, _, _, _ = permute_copy(source, 4)
    for name in ("else.conv2.weight", "else.conv2.bias"):
        _put(model, name, _array(source, name))
    seeds = _branch_seeds(source)
    assert verify_models(source, model, provider="cpu", seed=seeds[True]).equivalent  # the then branch
    assert not verify_models(source, model, provider="cpu", seed=seeds[False]).equivalent


def _big_body_model() -> onnx.ModelProto:
    """An If whose then branch holds a 64x64x3x3 conv weight (147 KiB) and an else branch."""
    rng = np.random.default_rng(0)

    def conv(name: str, x: str, c_in: int, c_out: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
        w = (rng.standard_normal((c_out, c_in, 3, 3)) * math.sqrt(2 / (9 * c_in))).astype(np.float32)
        return (
            helper.make_node("Conv", [x, f"{name}.weight"], [name], name=name, pads=[1, 1, 1, 1]),
            [numpy_helper.from_array(w, f"{name}.weight")],
        )

    branches = {}
    for label, width in (("then", 64), ("else", 8)):
        n1, w1 = conv(f"{label}.conv1", "input", 3, width)
        relu = helper.make_node("Relu", [f"{label}.conv1"], [f"{label}.relu"], name=f"{label}.relu")
        n2, w2 = conv(f"{label}.conv2", f"{label}.relu", width, 64)
        pool = helper.make_node("GlobalAveragePool", [f"{label}.conv2"], [f"{label}.pool"], name=f"{label}.pool")
        out = helper.make_tensor_value_info(f"{label}.pool", TensorProto.FLOAT, [1, 64, 1, 1])
        branches[f"{label}_branch"] = helper.make_graph([n1, relu, n2, pool], label, [], [out], initializer=w1 + w2)
    head = (rng.standard_normal((4, 64)) * 0.2).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
        helper.make_node("Greater", ["mean", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["select"], name="select", **branches),
        helper.make_node("Flatten", ["select"], ["flat"]),
        helper.make_node("Gemm", ["flat", "head.weight"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "big_body", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                     numpy_helper.from_array(head, "head.weight")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_streamed_permute_writes_the_constants_of_subgraphs(tmp_path: Path) -> None:
    """Large tensors are permuted as the streaming writer writes them, which it does for the
    main graph's only; a body's constants are permuted in place and written as they are.
    """
    source = _big_body_model()
    assert _array(source, "then.conv2.weight").nbytes >= 1 << 16 and _array(source, "head.weight").nbytes < 1 << 16
    model = copy_model(source)
    analysis = analyze(model)
    deferred = DeferredTensors()
    key = permute_model(analysis, draw_permutations(analysis, 2), deferred=deferred)
    save_model(model, tmp_path / "out.onnx", overrides=deferred.overrides)
    deferred.finish(key)
    permuted = onnx.load(tmp_path / "out.onnx")
    assert not np.array_equal(_array(permuted, "then.conv2.weight"), _array(source, "then.conv2.weight"))
    seeds = {bool(_feeds(source, seed)["input"].mean() > 0): seed for seed in range(40)}
    assert set(seeds) == {True, False}
    for seed in seeds.values():
        assert verify_models(source, permuted, provider="cpu", seed=seed).equivalent
    assert unpermute_model(permuted, key)
    assert permuted.SerializeToString() == source.SerializeToString()


# -- control flow: Loop and Scan ---------------------------------------------------------------
def test_loop_carried_value_and_scan_output_keep_their_groups() -> None:
    analysis = analyze(_fixture("loop_body"))
    carried = _group(analysis, "stem.weight", 0)
    assert carried.permutable
    assert _maps(analysis, "loop.conv_b.weight", 0) == {carried.id: "p"}  # the residual's rows
    assert _maps(analysis, "loop.conv_a.weight", 1) == {carried.id: "p"}
    assert _group(analysis, "loop.x", 1) is carried and _group(analysis, "refined", 1) is carried
    assert _maps(analysis, "logits.weight", 1) == {carried.id: "p"}
    inner = _group(analysis, "loop.conv_a.weight", 0)
    assert inner.permutable and inner is not carried
    assert _group(analysis, "traces", 2) is inner  # the scan output stacks along a new axis 0
    assert _maps(analysis, "trace.weight", 1) == {inner.id: "p"}


@pytest.mark.parametrize("seed", [1, 2])
def test_loop_body_permute_verify_unpermute(seed: int) -> None:
    _roundtrip("loop_body", seed)


def test_loop_body_residual_rows_left_in_place_are_caught() -> None:
    source = _fixture("loop_body")
    model, _, _, _ = permute_copy(source, 3)
    for name in ("loop.conv_b.weight", "loop.conv_b.bias"):
        _put(model, name, _array(source, name))
    assert not verify_models(source, model, provider="cpu").equivalent


def _scan_model(scan_axis: int = 2) -> onnx.ModelProto:
    """A Conv1d feature sequence scanned by a recurrent cell written as a Scan body.

    ``input`` [1, 4, 10] -> Conv1d 4->8 -> Relu -> ``seq`` [1, 8, 10], scanned along axis 2
    (time). The state ``h`` [1, 6] starts as Gemm(mean over time): body ``u = relu(x_t @ A)``
    (8->12), ``h' = tanh(h @ Wh + u @ Bm)`` (6->6, 12->6), scan output ``u`` stacked along axis 1
    -> [1, 10, 12] -> MatMul 12->5 (``per_step``); the final state -> Gemm 6->3 (``summary``).
    With ``scan_axis=1`` the scan walks the channels instead: slices [1, 10], 8 steps.
    """
    rng = np.random.default_rng(1)
    width, steps = (8, 10) if scan_axis == 2 else (10, 8)

    def normal(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)

    body_weights = {
        "cell.A": normal((width, 12), width), "cell.Wh": normal((6, 6), 6) * 0.5, "cell.Bm": normal((12, 6), 12),
    }  # fmt: skip
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["cell.x", "cell.A"], ["cell.u_lin"], name="cell.u_lin"),
            helper.make_node("Relu", ["cell.u_lin"], ["cell.u"], name="cell.u"),
            helper.make_node("MatMul", ["cell.h", "cell.Wh"], ["cell.hh"], name="cell.hh"),
            helper.make_node("MatMul", ["cell.u", "cell.Bm"], ["cell.uh"], name="cell.uh"),
            helper.make_node("Add", ["cell.hh", "cell.uh"], ["cell.sum"], name="cell.sum"),
            helper.make_node("Tanh", ["cell.sum"], ["cell.h_next"], name="cell.h_next"),
        ],
        "cell",
        [helper.make_tensor_value_info("cell.h", TensorProto.FLOAT, [1, 6]),
         helper.make_tensor_value_info("cell.x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("cell.h_next", TensorProto.FLOAT, [1, 6]),
         helper.make_tensor_value_info("cell.u", TensorProto.FLOAT, [1, 12])],
        initializer=[numpy_helper.from_array(v, k) for k, v in body_weights.items()],
    )  # fmt: skip
    weights = {
        "conv.weight": normal((8, 4, 3), 12) * 1.4, "conv.bias": normal((8,), 8) * 0.1,
        "h0.weight": normal((6, 8), 8) * 2.0, "per_step.weight": normal((12, 5), 12),
        "summary.weight": normal((3, 6), 6),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv"], name="conv", pads=[1, 1]),
        helper.make_node("Relu", ["conv"], ["seq"], name="relu"),
        helper.make_node("ReduceMean", ["seq"], ["seq_mean"], name="seq_mean", axes=[2], keepdims=0),
        helper.make_node("Gemm", ["seq_mean", "h0.weight"], ["h0"], name="h0", transB=1),
        helper.make_node("Scan", ["h0", "seq"], ["h_final", "steps"], name="scan", body=body, num_scan_inputs=1,
                         scan_input_axes=[scan_axis], scan_output_axes=[1]),
        helper.make_node("MatMul", ["steps", "per_step.weight"], ["per_step"], name="per_step"),
        helper.make_node("Gemm", ["h_final", "summary.weight"], ["summary"], name="summary", transB=1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "scan_cell", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 10])],
        [helper.make_tensor_value_info("per_step", TensorProto.FLOAT, [1, steps, 5]),
         helper.make_tensor_value_info("summary", TensorProto.FLOAT, [1, 3])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_scan_states_slices_and_outputs() -> None:
    source = _scan_model()
    analysis = analyze(source)
    assert analysis.closed_subgraphs == []
    features = _group(analysis, "conv.weight", 0)
    assert features.permutable and _maps(analysis, "cell.A", 0) == {features.id: "p"}  # the slice's axis 1
    assert _group(analysis, "cell.x", 1) is features
    state = _group(analysis, "h0.weight", 0)
    assert state.permutable
    assert _maps(analysis, "cell.Wh", 0) == {state.id: "p"} and _maps(analysis, "cell.Wh", 1) == {state.id: "p"}
    assert _maps(analysis, "cell.Bm", 1) == {state.id: "p"} and _maps(analysis, "summary.weight", 1) == {state.id: "p"}
    steps = _group(analysis, "cell.A", 1)
    assert steps.permutable and _group(analysis, "steps", 2) is steps  # stacked along axis 1: [1, 10, 12]
    assert _maps(analysis, "per_step.weight", 0) == {steps.id: "p"}
    model, _, perms, key = permute_copy(source, 2)
    assert {features.id, state.id, steps.id} <= set(perms)
    report = verify_models(source, model, provider="cpu", iterations=2)
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    wrong = copy_model(model)
    _put(wrong, "cell.Wh", _array(source, "cell.Wh"))
    assert not verify_models(source, wrong, provider="cpu").equivalent
    assert unpermute_model(model, key) and model.SerializeToString() == source.SerializeToString()


def test_scan_along_a_permuted_axis_freezes_it() -> None:
    """Scanning the conv's channels (axis 1) walks the neurons in order: that group freezes."""
    source = _scan_model(scan_axis=1)
    analysis = analyze(source)
    features = _group(analysis, "conv", 1)
    assert features.frozen and "sliced along its permuted axis 1" in features.reasons[0].message
    assert "Scan 'scan'" in features.reasons[0].message
    assert _group(analysis, "h0.weight", 0).permutable  # the state is unaffected
    model, _, _, _ = permute_copy(source, 2)
    assert verify_models(source, model, provider="cpu").equivalent


# -- control flow: what cannot be opened -------------------------------------------------------
def _reused_name_model() -> onnx.ModelProto:
    """``if_body`` with both branches' first conv output renamed ``hidden``: names are reused."""
    model = _fixture("if_body")
    select = next(n for n in model.graph.node if n.op_type == "If")
    for attribute in select.attribute:
        for node in attribute.g.node:
            for position, name in enumerate(node.output):
                if name.endswith(".conv1"):
                    node.output[position] = "hidden"
            for position, name in enumerate(node.input):
                if name.endswith(".conv1"):
                    node.input[position] = "hidden"
    return model


def test_bodies_reusing_names_stay_closed_and_say_why() -> None:
    model = _reused_name_model()
    analysis = analyze(model)
    (line,) = analysis.closed_subgraphs
    assert line.startswith("If 'select':") and "'hidden'" in line
    assert analysis.summary()["subgraphs_not_analysed"] == [line]
    assert analysis.permutable_groups == []
    (group,) = analysis.groups  # the Gemm's outputs: a graph output
    returned = analysis.group(next(iter(_maps(analysis, "logits", 1))))
    assert returned is group and returned.frozen
    # Nothing is permuted, and permuting changes nothing.
    assert not _maps(analysis, "then.conv1.weight", 0)


def test_body_constant_read_by_two_convs_joins_their_groups() -> None:
    """A then-branch weight read by two convs whose inputs are different groups: the uses agree
    (both bind the rows and the columns), so their groups are joined and no copy is needed
    (issue 12; a copy would have had to live in the body, and one input would have frozen).
    """
    model = _fixture("if_body")
    select = next(n for n in model.graph.node if n.op_type == "If")
    then_branch = next(a.g for a in select.attribute if a.name == "then_branch")
    weight = np.random.default_rng(3).standard_normal((8, 3, 1, 1)).astype(np.float32) * 0.5
    then_branch.initializer.append(numpy_helper.from_array(weight, "then.twin_in.weight"))
    added = [
        helper.make_node("Conv", ["input", "then.twin_in.weight"], ["then.twin_in"], name="then.twin_in"),
        helper.make_node("Conv", ["then.twin_in", "then.conv2.weight", "then.conv2.bias"], ["then.twin"],
                         name="then.twin", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["then.relu2", "then.twin"], ["then.both"], name="then.both"),
    ]  # fmt: skip
    nodes = list(then_branch.node)
    relu2 = next(k for k, n in enumerate(nodes) if n.name == "then.relu2")
    nodes[relu2 + 1 : relu2 + 1] = added
    next(n for n in nodes if n.name == "then.pool").input[0] = "then.both"
    del then_branch.node[:]
    then_branch.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    analysis = analyze(model)
    assert analysis.untied == []
    reasons = [r.message for g in analysis.groups for r in g.reasons]
    assert not any("would have to live inside an If/Loop/Scan body" in m for m in reasons)
    assert analysis.permutable_groups
    source = copy_model(model)
    permuted, _, _, key = permute_copy(source, 1)
    for seed in _branch_seeds(source).values():
        assert verify_models(source, permuted, provider="cpu", seed=seed).equivalent
    assert unpermute_model(permuted, key) and permuted.SerializeToString() == source.SerializeToString()
