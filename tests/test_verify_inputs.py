"""Tests for verify's inputs (drawn as a real model accepts them, or given) and its three-valued verdict.

Every equivalence shown here comes with a wrong permutation that the same check catches.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady._errors import OnnxladyError
from onnxlady._verify._compare import verify_models
from onnxlady._verify._inputs import generate_inputs, plan_inputs
from onnxlady._verify._shapes import resolve_shapes

OPSET = 17
HIDDEN = 32


def make_model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def tensor(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def value(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def permuted(w1, w2, *, wrong=False, seed=3):
    """The hidden neurons of ``x @ w1 -> relu -> @ w2`` permuted (consistently, or only in ``w1``)."""
    perm = np.random.default_rng(seed).permutation(w1.shape[1])
    return w1[:, perm], (w2 if wrong else w2[perm])


# ---------------------------------------------------------------- hollow verdicts


def squash_model(w1, w2, b2, op="Sigmoid"):
    """X [N, 16] -> MatMul W1 -> Relu -> MatMul W2 -> Add B2 (logits) -> op -> y."""
    attrs = {"axis": -1} if op == "Softmax" else {}
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["m"]),
            helper.make_node("Add", ["m", "B2"], ["logits"]),
            helper.make_node(op, ["logits"], ["y"], **attrs),
        ],
        [value("x", TensorProto.FLOAT, ["N", 16])],
        [value("y", TensorProto.FLOAT, ["N", w2.shape[1]])],
        [tensor("W1", w1.astype(np.float32)), tensor("W2", w2.astype(np.float32)), tensor("B2", b2.astype(np.float32))],
    )


@pytest.fixture
def weights(rng):
    return rng.standard_normal((16, HIDDEN)), rng.standard_normal((HIDDEN, 8))


def test_nan_output_is_inconclusive():
    """0 / x with x = 0: NaN everywhere in both models; they agree, and that proves nothing."""
    model = make_model(
        [helper.make_node("Div", ["zero", "x"], ["y"])],
        [value("x", TensorProto.FLOAT, [1, 4])],
        [value("y", TensorProto.FLOAT, [1, 4])],
        [tensor("zero", np.float32(0.0))],
    )
    report = verify_models(model, model, provider="cpu", input_range=(0.0, 0.0))
    assert report.outputs[0].passed
    assert report.verdict == "inconclusive" and not report.equivalent
    assert report.reasons == ("output 'y': non-finite values (NaN or Inf) in the reference output",)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["verdict"] == "inconclusive" and data["equivalent"] is False
    assert data["reason"] == report.reasons[0] and data["reasons"] == list(report.reasons)


@pytest.mark.parametrize(
    ("bias", "reason"),
    [
        (-30.0, "all reference values below 0.001 in magnitude (10 x atol)"),  # a map below 1e-5 everywhere
        (60.0, "constant: every reference value is 1"),  # all at 1.0
        ("mixed", "saturated: every reference value lies within the tolerance of the Sigmoid's bounds (0 and 1)"),
    ],
)
def test_saturated_sigmoid_output_is_inconclusive_on_its_own(weights, bias, reason):
    """Without its input compared, a saturated Sigmoid output is no evidence: even a wrong permutation passes it."""
    w1, w2 = weights
    b2 = np.where(np.arange(8) % 2, 30.0, -30.0) if bias == "mixed" else np.full(8, bias)
    reference = squash_model(w1, w2, b2)
    wrong = squash_model(*permuted(w1, w2, wrong=True), b2)
    for candidate in (reference, wrong):
        report = verify_models(reference, candidate, provider="cpu", iterations=2, compare_squash_inputs=False)
        assert report.outputs[0].passed and report.squash_inputs == ()
        assert report.verdict == "inconclusive" and report.reasons == (f"output 'y': {reason}",)


def test_constant_output_is_inconclusive():
    """Y = x * 0 + C: the same value whatever the input, and a model with the elements swapped passes too."""

    def model(constant):
        return make_model(
            [helper.make_node("Mul", ["x", "zero"], ["z"]), helper.make_node("Add", ["z", "C"], ["y"])],
            [value("x", TensorProto.FLOAT, [2, 4])],
            [value("y", TensorProto.FLOAT, [2, 4])],
            [tensor("zero", np.float32(0.0)), tensor("C", np.asarray(constant, np.float32))],
        )

    report = verify_models(model(2.5), model(2.5), provider="cpu", iterations=3)
    assert report.verdict == "inconclusive"
    assert report.reasons == ("output 'y': constant: every reference value is 2.5",)
    # Within the tolerance of one another counts as constant too.
    nearly = verify_models(model([2.5, 2.5001, 2.5, 2.5]), model([2.5, 2.5, 2.5001, 2.5]), provider="cpu")
    assert nearly.outputs[0].passed and nearly.verdict == "inconclusive"
    assert "constant: every reference value lies within the tolerance of 2.5" in nearly.reasons[0]
    # A constant that really differs is still caught.
    assert verify_models(model(2.5), model(2.6), provider="cpu").verdict == "not-equivalent"


def test_squashing_output_input_is_compared_and_catches_a_wrong_permutation(weights):
    """The Sigmoid's input (the logits) is compared automatically; the saturated output hides the wrong permutation."""
    w1, w2 = weights
    b2 = np.where(np.arange(8) % 2, 30.0, -30.0)
    reference = squash_model(w1, w2, b2)
    right = verify_models(reference, squash_model(*permuted(w1, w2), b2), provider="cpu", iterations=2)
    assert right.verdict == "equivalent" and right.equivalent
    (logits,) = right.squash_inputs
    assert (logits.name, logits.kind, logits.op, logits.stands_for) == ("logits", "squash-input", "Sigmoid", "y")
    assert logits.degenerate is None and logits.passed
    assert right.outputs[0].degenerate is not None and right.outputs[0].degenerate.startswith("saturated")
    assert right.notes and "judged on the input of its Sigmoid, 'logits'" in right.notes[0]

    wrong = verify_models(reference, squash_model(*permuted(w1, w2, wrong=True), b2), provider="cpu", iterations=2)
    assert wrong.outputs[0].passed  # the saturated output alone cannot see it
    assert wrong.verdict == "not-equivalent" and not wrong.equivalent
    assert wrong.reasons[0].startswith("input of the Sigmoid making 'y', 'logits': 16 of 16 elements differ")
    assert wrong.to_dict()["squash_inputs"][0]["passed"] is False


@pytest.mark.parametrize("op", ["Softmax", "Tanh", "LogSoftmax"])
def test_other_squashing_ops_compare_their_input(weights, op):
    w1, w2 = weights
    b2 = np.zeros(8)
    reference = squash_model(w1, w2, b2, op=op)
    right = verify_models(reference, squash_model(*permuted(w1, w2), b2, op=op), provider="cpu")
    assert right.equivalent and [t.op for t in right.squash_inputs] == [op]
    wrong = verify_models(reference, squash_model(*permuted(w1, w2, wrong=True), b2, op=op), provider="cpu")
    assert wrong.verdict == "not-equivalent" and not wrong.squash_inputs[0].passed


def test_squash_behind_reshapes_and_a_candidate_without_it(weights):
    """A Reshape between the Sigmoid and the output is looked through; a candidate that lacks the op is noted."""
    w1, w2 = weights
    b2 = np.zeros(8)
    reference = squash_model(w1, w2, b2)
    reference.graph.node[-1].output[0] = "s"
    reference.graph.node.append(helper.make_node("Reshape", ["s", "shape"], ["y"]))
    reference.graph.initializer.append(tensor("shape", np.array([-1, 8], np.int64)))
    report = verify_models(reference, reference, provider="cpu")
    assert report.equivalent and report.squash_inputs[0].name == "logits"

    other = squash_model(w1, w2, b2)
    other.graph.node[-1].op_type = "HardSigmoid"
    mixed = verify_models(squash_model(w1, w2, b2), other, provider="cpu")
    assert mixed.squash_inputs == () and "not in the candidate" in mixed.notes[0]
    assert mixed.verdict == "not-equivalent"  # Sigmoid and HardSigmoid differ: the output itself shows it


def test_squash_input_of_a_model_with_external_data(tmp_path, weights):
    """Comparing an intermediate tensor of a model with external data: only its graph is re-serialized."""
    w1, w2 = weights
    b2 = np.where(np.arange(8) % 2, 30.0, -30.0)
    folder = tmp_path / "models"
    folder.mkdir()
    for name, (a, b) in {"ref": (w1, w2), "right": permuted(w1, w2), "wrong": permuted(w1, w2, wrong=True)}.items():
        onnx.save(
            squash_model(a, b, b2),
            str(folder / f"{name}.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{name}.data",
            size_threshold=0,
        )
    report = verify_models(folder / "ref.onnx", folder / "right.onnx", provider="cpu")
    assert report.equivalent and report.squash_inputs[0].reference_max_abs > 1
    assert verify_models(folder / "ref.onnx", folder / "wrong.onnx", provider="cpu").verdict == "not-equivalent"


# ---------------------------------------------------------------- embedding indices, masks, segment ids


def text_model(w1, w2, *, rows=10, mask_name="attention_mask", positions=None, types=False, seq="seq"):
    """Token ids -> Gather on a [rows, 16] table (+ position table) -> MatMul W1 -> Relu -> MatMul W2,
    attention-style scores masked by ``(1 - mask) * -10000`` before a Softmax over the sequence.

    ``positions``: rows of a position table gathered at ``Range(0, len(ids))`` (a position table).
    ``types``: a ``token_type_ids`` input indexing a 2-row table.
    """
    table = np.random.default_rng(11).standard_normal((rows, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"], axis=0)]
    inits = [tensor("E", table), tensor("W1", w1.astype(np.float32)), tensor("W2", w2.astype(np.float32))]
    inputs = [value("input_ids", TensorProto.INT64, ["batch", seq])]
    x = "emb"
    if positions is not None:
        nodes += [
            helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
            helper.make_node("Gather", ["ids_shape", "one"], ["length"], axis=0),
            helper.make_node("Range", ["zero", "length", "one"], ["where"]),
            helper.make_node("Gather", ["P", "where"], ["pos"], axis=0),
            helper.make_node("Add", [x, "pos"], ["with_pos"]),
        ]
        inits += [
            tensor("P", np.random.default_rng(12).standard_normal((positions, 16)).astype(np.float32)),
            tensor("one", np.int64(1)),
            tensor("zero", np.int64(0)),
        ]
        x = "with_pos"
    if types:
        inputs.append(value("token_type_ids", TensorProto.INT64, ["batch", seq]))
        nodes += [
            helper.make_node("Gather", ["T", "token_type_ids"], ["type_emb"], axis=0),
            helper.make_node("Add", [x, "type_emb"], ["with_types"]),
        ]
        inits.append(tensor("T", np.random.default_rng(13).standard_normal((2, 16)).astype(np.float32)))
        x = "with_types"
    inputs.append(value(mask_name, TensorProto.INT64, ["batch", seq]))
    nodes += [
        helper.make_node("MatMul", [x, "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["v"]),  # [B, S, 8]
        helper.make_node("ReduceSum", ["v", "last"], ["scores"], keepdims=0),  # [B, S]
        helper.make_node("Cast", [mask_name], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one_f", "mask_f"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "big"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["attn"], axis=-1),
        helper.make_node("Unsqueeze", ["attn", "last"], ["attn3"]),
        helper.make_node("Mul", ["v", "attn3"], ["out"]),
    ]
    inits += [
        tensor("last", np.array([-1], np.int64)),
        tensor("one_f", np.float32(1.0)),
        tensor("big", np.float32(-10000.0)),
    ]
    return make_model(nodes, inputs, [value("out", TensorProto.FLOAT, ["batch", seq, 8])], inits)


def record(report, name):
    return next(r for r in report.inputs if r.name == name)


def test_embedding_indices_stay_within_the_table(weights):
    """A Gather on a 10-row table: ids in [0, 10), the run succeeds; a wrong permutation is caught."""
    w1, w2 = weights
    reference = text_model(w1, w2)
    report = verify_models(reference, text_model(*permuted(w1, w2)), provider="cpu", iterations=3)
    assert report.equivalent, report.reasons
    ids = record(report, "input_ids")
    assert (ids.rule, ids.low, ids.high, ids.dtype) == ("embedding-index", 0.0, 9.0, "int64")
    assert ids.detail == "indices of a Gather on 'E' (10 rows)"
    feeds = generate_inputs(reference, None, np.random.default_rng(0))
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() == 9  # the whole table is used
    wrong = verify_models(reference, text_model(*permuted(w1, w2, wrong=True)), provider="cpu")
    assert wrong.verdict == "not-equivalent"


@pytest.mark.parametrize("mask_name", ["attention_mask", "m"])
def test_masks_are_ones(weights, mask_name):
    """By name, or by use (``(1 - m) * -10000`` added to a Softmax's scores): every position attended."""
    w1, w2 = weights
    reference = text_model(w1, w2, mask_name=mask_name)
    feeds = generate_inputs(reference, None, np.random.default_rng(0))
    assert feeds[mask_name].dtype == np.int64 and np.all(feeds[mask_name] == 1)
    report = verify_models(reference, text_model(*permuted(w1, w2), mask_name=mask_name), provider="cpu")
    assert report.equivalent, report.reasons
    mask = record(report, mask_name)
    assert (mask.rule, mask.low, mask.high) == ("mask-ones", 1.0, 1.0)
    expected = "its name contains 'mask'" if mask_name == "attention_mask" else "through mask arithmetic"
    assert expected in mask.detail
    wrong = verify_models(reference, text_model(*permuted(w1, w2, wrong=True), mask_name=mask_name), provider="cpu")
    assert wrong.verdict == "not-equivalent"


def test_token_type_ids_are_zeros(weights):
    w1, w2 = weights
    reference = text_model(w1, w2, types=True)
    report = verify_models(reference, text_model(*permuted(w1, w2), types=True), provider="cpu")
    assert report.equivalent
    types = record(report, "token_type_ids")
    assert (types.rule, types.low, types.high) == ("segment-zeros", 0.0, 0.0)
    assert np.all(generate_inputs(reference, None, np.random.default_rng(0))["token_type_ids"] == 0)
    wrong = verify_models(reference, text_model(*permuted(w1, w2, wrong=True), types=True), provider="cpu")
    assert wrong.verdict == "not-equivalent"


# ---------------------------------------------------------------- dynamic dims the graph pins


def test_a_dim_shared_with_a_given_one(weights):
    """``--shape input_ids:1x12``: the mask's ``seq`` follows, or the two would not broadcast."""
    w1, w2 = weights
    reference = text_model(w1, w2)
    report = verify_models(reference, text_model(*permuted(w1, w2)), provider="cpu", shapes={"input_ids": [1, 12]})
    assert report.equivalent
    assert report.input_shapes == {"input_ids": (1, 12), "attention_mask": (1, 12)}
    assert "dim 1 (seq) = 12: shared with input 'input_ids'" in record(report, "attention_mask").shape_notes
    assert (
        verify_models(
            reference, text_model(*permuted(w1, w2, wrong=True)), provider="cpu", shapes={"input_ids": [1, 12]}
        ).verdict
        == "not-equivalent"
    )


def test_position_table_bounds_the_sequence_length(weights):
    """Positions gathered at ``Range(0, len(ids))`` from a 20-row table: the sequence is 20, not 64."""
    w1, w2 = weights
    reference = text_model(w1, w2, positions=20)
    choices = resolve_shapes(reference, None)
    assert choices["input_ids"].shape == (1, 20)
    assert "dim 1 (seq) = 20: the position table 'P' holds 20 rows" in choices["input_ids"].notes
    report = verify_models(reference, text_model(*permuted(w1, w2), positions=20), provider="cpu")
    assert report.equivalent and report.input_shapes["attention_mask"] == (1, 20)
    wrong = verify_models(reference, text_model(*permuted(w1, w2, wrong=True), positions=20), provider="cpu")
    assert wrong.verdict == "not-equivalent"


@pytest.mark.parametrize(
    ("node", "constant", "shape", "note"),
    [
        ("MatMul", np.ones((12, 3)), (1, 12), "dim 1 (d) = 12: MatMul with the constant 'K' [12, 3]"),
        ("Add", np.ones((1, 12)), (1, 12), "dim 1 (d) = 12: Add with the constant 'K' [1, 12]"),
        ("Reshape", np.array([2, 3, 4], np.int64), (1, 24), "dim 1 (d) = 24: Reshape to the constant shape [2, 3, 4]"),
    ],
)
def test_graph_pins_a_dynamic_dim(node, constant, shape, note):
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(node, ["r", "K"], ["y"])],
        [value("x", TensorProto.FLOAT, ["n", "d"])],
        [value("y", TensorProto.FLOAT, None)],
        [tensor("K", constant.astype(np.int64 if node == "Reshape" else np.float32))],
    )
    choice = resolve_shapes(model, None)["x"]
    assert choice.shape == shape and note in choice.notes and choice.guessed == (0,)
    assert verify_models(model, model, provider="cpu").input_shapes == {"x": shape}


def test_conv_channels_pinned_and_wrong_permutation_caught(rng):
    """X [N, C, H, W] with C dynamic: the Conv weight says C = 3 (the spatial dims stay defaults)."""
    w1, w2 = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal((4, 8, 1, 1))

    def conv(w1, w2):
        return make_model(
            [
                helper.make_node("Conv", ["x", "W1"], ["h"]),
                helper.make_node("Relu", ["h"], ["r"]),
                helper.make_node("Conv", ["r", "W2"], ["y"]),
            ],
            [value("x", TensorProto.FLOAT, ["N", "C", "H", "W"])],
            [value("y", TensorProto.FLOAT, None)],
            [tensor("W1", w1.astype(np.float32)), tensor("W2", w2.astype(np.float32))],
        )

    perm = rng.permutation(8)
    report = verify_models(conv(w1, w2), conv(w1[perm], w2[:, perm]), provider="cpu")
    assert report.equivalent and report.input_shapes == {"x": (1, 3, 64, 64)}
    assert verify_models(conv(w1, w2), conv(w1[perm], w2), provider="cpu").verdict == "not-equivalent"


# ---------------------------------------------------------------- inputs the user gives


def mlp(w1, w2, *, dims=("N", 16)):
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["y"]),
        ],
        [value("x", TensorProto.FLOAT, list(dims))],
        [value("y", TensorProto.FLOAT, ["N", w2.shape[1]])],
        [tensor("W1", w1.astype(np.float32)), tensor("W2", w2.astype(np.float32))],
    )


def test_polygraphy_json_inputs_load(tmp_path, weights):
    """A list of feed dicts as ``polygraphy run --save-inputs`` writes it, read with Polygraphy's loader."""
    polygraphy_json = pytest.importorskip("polygraphy.json")
    w1, w2 = weights
    feeds = [{"x": np.full((2, 16), 0.5, np.float32)}, {"x": np.linspace(-3, 3, 48, dtype=np.float32).reshape(3, 16)}]
    path = tmp_path / "inputs.json"
    polygraphy_json.save_json(feeds, str(path))
    report = verify_models(mlp(w1, w2), mlp(*permuted(w1, w2)), provider="cpu", load_inputs=path)
    assert report.equivalent and report.iterations == 2
    assert report.outputs[0].total_elements == (2 + 3) * 8  # both feeds ran, at their own batch sizes
    x = record(report, "x")
    assert (x.rule, x.low, x.high, x.shape, x.shapes_vary) == ("loaded", -3.0, 3.0, (2, 16), True)
    assert x.detail == f"given by input file {path}"
    wrong = verify_models(mlp(w1, w2), mlp(*permuted(w1, w2, wrong=True)), provider="cpu", load_inputs=path)
    assert wrong.verdict == "not-equivalent"


def test_npz_inputs_load_and_missing_inputs_follow_their_shapes(tmp_path, weights):
    """One array per input name; an input the archive lacks is drawn with the sizes the given ones imply."""
    w1, w2 = weights
    path = tmp_path / "inputs.npz"
    np.savez(path, input_ids=np.array([[1, 2, 3, 9, 0]], dtype=np.int32))  # int32 given for an int64 input
    reference = text_model(w1, w2)
    report = verify_models(reference, text_model(*permuted(w1, w2)), provider="cpu", load_inputs=path)
    assert report.equivalent and report.iterations == 1
    assert report.input_shapes == {"input_ids": (1, 5), "attention_mask": (1, 5)}
    assert (record(report, "input_ids").rule, record(report, "input_ids").high) == ("loaded", 9.0)
    mask = record(report, "attention_mask")
    assert (
        mask.rule == "mask-ones" and mask.shape == (1, 5) and mask.shape_notes == ("sizes implied by the given inputs",)
    )
    wrong = verify_models(reference, text_model(*permuted(w1, w2, wrong=True)), provider="cpu", load_inputs=path)
    assert wrong.verdict == "not-equivalent"


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"nope": np.zeros((1, 16), np.float32)}, "feeds 'nope', which is not an input of the model"),
        ({"x": np.zeros((16,), np.float32)}, "input 'x' has shape \\[16\\] but the model declares rank 2"),
        ({"x": np.zeros((1, 15), np.float32)}, "dimension 1 = 15 but the model fixes it at 16"),
        ({"x": np.array([["a"] * 16])}, "holds <U1 values; the model takes float32"),
    ],
)
def test_npz_inputs_that_do_not_fit(tmp_path, weights, arrays, message):
    w1, w2 = weights
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(OnnxladyError, match=message):
        verify_models(mlp(w1, w2), mlp(w1, w2), provider="cpu", load_inputs=path)


def test_integer_inputs_refuse_values_that_do_not_fit(tmp_path, weights):
    w1, w2 = weights
    path = tmp_path / "ids.npz"
    np.savez(path, input_ids=np.array([[0.5, 1.0]]))
    with pytest.raises(OnnxladyError, match="non-integral or out-of-range values; the model takes int64"):
        verify_models(text_model(w1, w2), text_model(w1, w2), provider="cpu", load_inputs=path)


def test_bad_input_files(tmp_path, weights, monkeypatch):
    w1, w2 = weights
    model = mlp(w1, w2)
    with pytest.raises(OnnxladyError, match="no such file"):
        verify_models(model, model, provider="cpu", load_inputs=tmp_path / "absent.json")
    (tmp_path / "inputs.txt").write_text("x")
    with pytest.raises(OnnxladyError, match=r"expected a .json file in Polygraphy's format or a .npz archive"):
        verify_models(model, model, provider="cpu", load_inputs=tmp_path / "inputs.txt")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(OnnxladyError, match=r"not a readable .npz archive"):
        verify_models(model, model, provider="cpu", load_inputs=tmp_path / "broken.npz")
    (tmp_path / "broken.json").write_text('[{"x": ')
    if "polygraphy" in sys.modules or _has_polygraphy():
        with pytest.raises(OnnxladyError, match="is not Polygraphy input data"):
            verify_models(model, model, provider="cpu", load_inputs=tmp_path / "broken.json")
        (tmp_path / "numbers.json").write_text("[1, 2]")
        with pytest.raises(OnnxladyError, match="holds no feeds"):
            verify_models(model, model, provider="cpu", load_inputs=tmp_path / "numbers.json")
    monkeypatch.setitem(sys.modules, "polygraphy.json", None)  # as if Polygraphy were not installed
    with pytest.raises(OnnxladyError, match="needs the polygraphy package"):
        verify_models(model, model, provider="cpu", load_inputs=tmp_path / "broken.json")


def _has_polygraphy() -> bool:
    try:
        import polygraphy.json  # ruff: ignore[unused-import]
    except ImportError:
        return False
    return True


def test_value_ranges_apply(weights):
    w1, w2 = weights
    reference = text_model(w1, w2)
    plans = {p.name: p for p in plan_inputs(reference, None, (-1.0, 1.0), {"input_ids": (3.2, 5)})}
    assert (plans["input_ids"].rule, plans["input_ids"].low, plans["input_ids"].high) == ("value-range", 4.0, 5.0)
    feeds = generate_inputs(
        reference, {"input_ids": [4, 64]}, np.random.default_rng(0), value_ranges={"input_ids": (3.2, 5)}
    )
    assert set(np.unique(feeds["input_ids"])) == {4, 5}  # both ends included, as Polygraphy draws integers

    floats = mlp(w1, w2)
    report = verify_models(floats, mlp(*permuted(w1, w2)), provider="cpu", value_ranges={"x": (2.0, 3.0)})
    assert report.equivalent and (record(report, "x").rule, record(report, "x").low) == ("value-range", 2.0)
    x = generate_inputs(floats, None, np.random.default_rng(0), value_ranges={"x": (2.0, 3.0)})["x"]
    assert x.min() >= 2.0 and x.max() <= 3.0
    wrong = verify_models(floats, mlp(*permuted(w1, w2, wrong=True)), provider="cpu", value_ranges={"x": (2.0, 3.0)})
    assert wrong.verdict == "not-equivalent"

    with pytest.raises(OnnxladyError, match="value range for unknown input 'y'"):
        verify_models(floats, floats, provider="cpu", value_ranges={"y": (0, 1)})
    with pytest.raises(OnnxladyError, match="low <= high"):
        verify_models(floats, floats, provider="cpu", value_ranges={"x": (1, 0)})
    with pytest.raises(OnnxladyError, match="holds no int64 value"):
        verify_models(reference, reference, provider="cpu", value_ranges={"input_ids": (0.2, 0.8)})


def test_value_range_makes_a_log_model_verifiable(weights):
    """log(x) on [-1, 1) is NaN for half the inputs (inconclusive); on [0.5, 2] it carries signal."""
    w1, w2 = weights

    def log_mlp(w1, w2):
        model = mlp(w1, w2)
        model.graph.node.insert(0, helper.make_node("Log", ["x"], ["logx"]))
        model.graph.node[1].input[0] = "logx"
        return model

    hollow = verify_models(log_mlp(w1, w2), log_mlp(*permuted(w1, w2)), provider="cpu")
    assert hollow.verdict == "inconclusive" and "non-finite" in hollow.reasons[0]
    ranged = {"x": (0.5, 2.0)}
    assert verify_models(log_mlp(w1, w2), log_mlp(*permuted(w1, w2)), provider="cpu", value_ranges=ranged).equivalent
    wrong = verify_models(log_mlp(w1, w2), log_mlp(*permuted(w1, w2, wrong=True)), provider="cpu", value_ranges=ranged)
    assert wrong.verdict == "not-equivalent"


SCRIPT = """
import numpy as np


def load_data():
    for scale in (1.0, 2.0, 3.0):
        yield {"x": np.full((1, 16), scale, dtype=np.float32)}


def other():
    return [{"x": np.ones((2, 16), dtype=np.float32)}]


def broken():
    yield {"x": np.ones((1, 16), dtype=np.float32)}
    raise RuntimeError("disk on fire")
"""


def test_data_loader_script(tmp_path, weights):
    w1, w2 = weights
    script = tmp_path / "loader.py"
    script.write_text(SCRIPT)
    reference, right = mlp(w1, w2), mlp(*permuted(w1, w2))
    report = verify_models(reference, right, provider="cpu", data_loader_script=str(script))
    assert report.equivalent and report.iterations == 3
    x = record(report, "x")
    assert (x.rule, x.low, x.high) == (
        "script",
        1.0,
        3.0,
    ) and x.detail == f"given by data loader script {script}:load_data"
    named = verify_models(reference, right, provider="cpu", data_loader_script=f"{script}:other")
    assert named.equivalent and named.iterations == 1 and named.input_shapes == {"x": (2, 16)}
    wrong = verify_models(reference, mlp(*permuted(w1, w2, wrong=True)), provider="cpu", data_loader_script=str(script))
    assert wrong.verdict == "not-equivalent"

    with pytest.raises(OnnxladyError, match="fails on feed 2: RuntimeError: disk on fire"):
        verify_models(reference, right, provider="cpu", data_loader_script=f"{script}:broken")
    with pytest.raises(OnnxladyError, match="defines no function 'absent'"):
        verify_models(reference, right, provider="cpu", data_loader_script=f"{script}:absent")
    with pytest.raises(OnnxladyError, match="no such file"):
        verify_models(reference, right, provider="cpu", data_loader_script=str(tmp_path / "none.py"))
    (tmp_path / "syntax.py").write_text("def load_data(:\n")
    with pytest.raises(OnnxladyError, match="fails on import: SyntaxError"):
        verify_models(reference, right, provider="cpu", data_loader_script=str(tmp_path / "syntax.py"))
    with pytest.raises(OnnxladyError, match="either as a file"):
        verify_models(reference, right, provider="cpu", data_loader_script=str(script), load_inputs=script)


# ---------------------------------------------------------------- a reference that cannot run


def test_reference_that_cannot_run_says_which_shape_to_give():
    """X [1, 1, T] split in two halves of 16: T must be 32; the default 64 fails, and the message says so."""
    model = make_model(
        [helper.make_node("Split", ["x", "halves"], ["a", "b"], axis=2), helper.make_node("Sub", ["a", "b"], ["y"])],
        [value("x", TensorProto.FLOAT, [1, 1, "T"])],
        [value("y", TensorProto.FLOAT, [1, 1, 16])],
        [tensor("halves", np.array([16, 16], np.int64))],
    )
    with pytest.raises(OnnxladyError) as info:
        verify_models(model, model, provider="cpu")
    message = str(info.value)
    assert message.startswith("ONNX Runtime cannot run the reference model on the generated inputs: ")
    assert (
        "input 'x' of shape [1, 1, 64] has guessed dimension(s) 2: give its real shape with --shape x:1x1xN" in message
    )
    assert verify_models(model, model, provider="cpu", shapes={"x": [1, 1, 32]}).equivalent


def test_reference_that_cannot_run_names_the_input_the_failing_operator_reads():
    """ORT names the failing operator and its own input, not the graph input feeding it (round 14 F5).

    ``ids`` [1, S] comes first and runs at any S; ``cache`` [1, 1, D] is split in two halves of
    16, so D must be 32. The message must point at ``cache`` (read by the Split ORT names), not
    at the first input with a guessed dimension.
    """
    model = make_model(
        [
            helper.make_node("ReduceSum", ["ids"], ["total"], keepdims=0),
            helper.make_node("Split", ["cache", "halves"], ["a", "b"], axis=2, name="cache_halves"),
            helper.make_node("Sub", ["a", "b"], ["d"]),
            helper.make_node("Add", ["d", "total"], ["y"]),
        ],
        [value("ids", TensorProto.FLOAT, [1, "S"]), value("cache", TensorProto.FLOAT, [1, 1, "D"])],
        [value("y", TensorProto.FLOAT, [1, 1, 16])],
        [tensor("halves", np.array([16, 16], np.int64))],
    )
    with pytest.raises(OnnxladyError) as info:
        verify_models(model, model, provider="cpu")
    message = str(info.value)
    assert "Name:'cache_halves'" in message
    assert "input 'cache' of shape [1, 1, 64] has guessed dimension(s) 2: give its real shape with --shape cache:1x1xN" in message
    assert verify_models(model, model, provider="cpu", shapes={"cache": [1, 1, 32]}).equivalent


def test_reference_that_cannot_run_on_given_inputs(tmp_path):
    model = make_model(
        [helper.make_node("Split", ["x", "halves"], ["a", "b"], axis=1), helper.make_node("Sub", ["a", "b"], ["y"])],
        [value("x", TensorProto.FLOAT, [1, "T"])],
        [value("y", TensorProto.FLOAT, [1, 16])],
        [tensor("halves", np.array([16, 16], np.int64))],
    )
    path = tmp_path / "x.npz"
    np.savez(path, x=np.ones((1, 8), np.float32))
    with pytest.raises(OnnxladyError, match=f"cannot run the reference model on the inputs given by input file {path}"):
        verify_models(model, model, provider="cpu", load_inputs=path)


def test_placeholder_dim_names_are_not_shared():
    """Exporters write "?" for any unknown dim: two "?" dims are not the same size (paddle2onnx's [?, 3, ?, ?])."""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [value("x", TensorProto.FLOAT, ["?", 3, "?", "?"])],
        [value("y", TensorProto.FLOAT, None)],
    )
    choice = resolve_shapes(model, {"x": [1, 3, 32, 48]})["x"]
    assert choice.shape == (1, 3, 32, 48)
    notes = resolve_shapes(model, None)["x"].notes
    assert notes == (
        "dim 0 = 1: default batch size (nothing in the graph pins it)",
        "dim 2 = 64: default (nothing in the graph pins it)",
        "dim 3 = 64: default (nothing in the graph pins it)",
    )


def test_report_lists_how_inputs_were_fed(weights):
    """The JSON document carries, per input, what a README table needs: name, shape, dtype, rule, range, why."""
    w1, w2 = weights
    report = verify_models(text_model(w1, w2, types=True), text_model(*permuted(w1, w2), types=True), provider="cpu")
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    rows = {row["name"]: row for row in data["inputs"]}
    assert list(rows) == ["input_ids", "token_type_ids", "attention_mask"]
    assert rows["input_ids"] == {
        "name": "input_ids",
        "shape": [1, 64],
        "dtype": "int64",
        "rule": "embedding-index",
        "low": 0.0,
        "high": 9.0,
        "detail": "indices of a Gather on 'E' (10 rows)",
        "shape_notes": [
            "dim 0 (batch) = 1: default batch size (nothing in the graph pins it)",
            "dim 1 (seq) = 64: default (nothing in the graph pins it)",
        ],
        "shapes_vary": False,
    }
    assert [rows[n]["rule"] for n in rows] == ["embedding-index", "segment-zeros", "mask-ones"]
    assert data["verdict"] == "equivalent" and data["reason"] is None and data["reasons"] == []
    wrong = verify_models(
        text_model(w1, w2, types=True), text_model(*permuted(w1, w2, wrong=True), types=True), provider="cpu"
    )
    assert wrong.to_dict()["verdict"] == "not-equivalent" and wrong.to_dict()["reason"].startswith("output 'out': ")


def test_parse_value_ranges():
    from onnxlady._verify._compare import parse_value_ranges

    assert parse_value_ranges(["input_ids:[0,99]", "x:0:[-1.5, 2e3]", "[0,1]"]) == (
        {"input_ids": (0.0, 99.0), "x:0": (-1.5, 2000.0)},
        (0.0, 1.0),
    )
    assert parse_value_ranges([]) == ({}, None)
    for bad in ["x", "x:0,1", "x:[1]", "x:[a,b]", "x:[2,1]", "x:[0,inf]"]:
        with pytest.raises(OnnxladyError):
            parse_value_ranges([bad])
    with pytest.raises(OnnxladyError, match="more than once"):
        parse_value_ranges(["x:[0,1]", "x:[0,2]"])
    with pytest.raises(OnnxladyError, match="more than once"):
        parse_value_ranges(["[0,1]", "[0,2]"])


# -- KV caches whose head size only the attention knows ------------------------------------------
def test_a_symbolic_cache_head_size_is_read_off_the_attention() -> None:
    """The genai builder declares the caches' head dim as ``kv_cache_dim``: GroupQueryAttention's
    packed query projection (width over heads + 2 KV heads) gives it, not the default guess."""
    from fixtures.decoder import HEAD_DIM, KV_HEADS, build_decoder
    from onnxlady._verify._shapes import resolve_shapes

    model = build_decoder(symbolic_head=True)
    choices = resolve_shapes(model, None)
    cache = choices["past_key_values.0.key"]
    assert cache.shape[1] == KV_HEADS and cache.shape[3] == HEAD_DIM
    assert 3 not in cache.guessed and any("query projection" in line for line in cache.notes)
    import onnxlady

    report = onnxlady.verify(model, model)
    assert report.to_json()["verdict"] == "equivalent"


def test_the_genai_builders_int4_cache_is_sized_through_matmul_nbits() -> None:
    from pathlib import Path

    from onnxlady._verify._shapes import resolve_shapes

    path = Path(__file__).resolve().parents[1] / ".cache" / "deployment" / "genai_int4" / "model.onnx"
    if not path.exists():
        pytest.skip("the genai builder's int4 export is made by tools.export_deployment_models --genai")
    model = onnx.load(str(path), load_external_data=False)
    assert resolve_shapes(model, None)["past_key_values.0.value"].shape[3] == 16
