"""Tests for onnxlady._verify: running two models in ONNX Runtime and comparing their outputs.

tests/test_verify_inputs.py tests the inputs verify draws or loads, and the three-valued verdict.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady._errors import OnnxladyError
from onnxlady._verify._compare import (
    VERIFY_ATOL,
    VERIFY_RTOL,
    create_session,
    generate_inputs,
    parse_shape_overrides,
    verify_models,
)
from onnxlady._verify._session import probe_cuda

OPSET = 17
IR_VERSION = 8


def make_model(nodes, inputs, outputs, initializers=(), ir_version=IR_VERSION, opsets=None):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    opset_imports = opsets or [helper.make_opsetid("", OPSET)]
    return helper.make_model(graph, opset_imports=opset_imports, ir_version=ir_version)


def linear_model(weight: np.ndarray, bias: np.ndarray, *, out_name: str = "y", in_name: str = "x"):
    """Y = relu(x @ W + B) with x of shape [N, in]."""
    n_in, n_out = weight.shape
    return make_model(
        [
            helper.make_node("MatMul", [in_name, "W"], ["h"]),
            helper.make_node("Add", ["h", "B"], ["a"]),
            helper.make_node("Relu", ["a"], [out_name]),
        ],
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", n_out])],
        [
            numpy_helper.from_array(weight.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "B"),
        ],
    )


def constant_output_model(value: float, shape=(2, 4)):
    """Y = x * 0 + C: every output element equals ``value`` whatever the input."""
    return make_model(
        [helper.make_node("Mul", ["x", "zero"], ["z"]), helper.make_node("Add", ["z", "C"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
            numpy_helper.from_array(np.array(value, np.float32), "C"),
        ],
    )


def scale_model(factor: float, shape=("N", 8)):
    return make_model(
        [helper.make_node("Mul", ["x", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [numpy_helper.from_array(np.array(factor, np.float32), "s")],
    )


@pytest.fixture
def weights():
    rng = np.random.default_rng(1)
    return rng.standard_normal((16, 8)), rng.standard_normal(8)


CUDA_LOADS, CUDA_REASON = probe_cuda()


# ---------------------------------------------------------------- equivalence and tolerances


def test_identical_models_pass(weights):
    w, b = weights
    report = verify_models(linear_model(w, b), linear_model(w, b), provider="cpu", iterations=3)
    assert report.equivalent
    assert report.provider_used == "CPUExecutionProvider"
    assert report.fallback_reason is None
    (out,) = report.outputs
    assert out.name == "y" and out.dtype == "float32" and out.shape == (1, 8)
    assert out.max_abs_error == 0.0 and out.mismatched_elements == 0
    assert out.total_elements == 3 * 8
    assert out.reference_max_abs > 0.1
    assert out.degenerate is None
    assert report.atol == VERIFY_ATOL and report.rtol == VERIFY_RTOL
    assert report.input_shapes == {"x": (1, 16)}


def test_permuted_hidden_neurons_pass():
    """Permuting the hidden neurons of a two-layer MLP reorders a sum: equivalent, maybe not bit-exact."""
    rng = np.random.default_rng(2)
    w1, b1, w2 = rng.standard_normal((32, 64)), rng.standard_normal(64), rng.standard_normal((64, 8))
    perm = rng.permutation(64)

    def mlp(w1, b1, w2):
        return make_model(
            [
                helper.make_node("MatMul", ["x", "W1"], ["h"]),
                helper.make_node("Add", ["h", "B1"], ["a"]),
                helper.make_node("Relu", ["a"], ["r"]),
                helper.make_node("MatMul", ["r", "W2"], ["y"]),
            ],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
            [numpy_helper.from_array(t.astype(np.float32), n) for t, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"))],
        )

    report = verify_models(mlp(w1, b1, w2), mlp(w1[:, perm], b1[perm], w2[perm]), provider="cpu", iterations=2)
    assert report.equivalent, report.outputs


def test_changed_weight_fails_and_counts_mismatches(weights):
    w, b = weights
    w2 = w.copy()
    w2[:, 3] += 1e-2  # changes output column 3 (where relu lets it through)
    report = verify_models(linear_model(w, b), linear_model(w2, b), provider="cpu", iterations=4, seed=7)
    assert not report.equivalent
    (out,) = report.outputs
    assert not out.passed
    assert 1 <= out.mismatched_elements <= 4  # at most one column per iteration
    assert out.total_elements == 32
    assert out.max_abs_error > 1e-3
    assert out.mean_abs_error > 0


@pytest.mark.parametrize(
    ("ref", "cand", "passes"),
    [
        (0.01, 0.01 + 5e-5, True),  # |a-b| = 5e-5 <= atol although rel = 5e-3 > rtol
        (100.0, 100.05, True),  # |a-b| = 0.05 > atol but rel = 5e-4 <= rtol
        (0.01, 0.011, False),  # outside both
        (100.0, 100.5, False),  # outside both
    ],
)
def test_tolerance_semantics(ref, cand, passes):
    report = verify_models(constant_output_model(ref), constant_output_model(cand), provider="cpu")
    (out,) = report.outputs
    assert out.passed is passes
    assert out.mismatched_elements == (0 if passes else 8)
    assert out.max_abs_error == pytest.approx(abs(cand - ref), rel=1e-3)
    assert out.max_rel_error == pytest.approx(abs(cand - ref) / ref, rel=1e-3)
    assert out.reference_max_abs == pytest.approx(ref)


def test_custom_tolerances(weights):
    w, b = weights
    w2 = w + 1e-2
    assert not verify_models(linear_model(w, b), linear_model(w2, b), provider="cpu").equivalent
    report = verify_models(linear_model(w, b), linear_model(w2, b), provider="cpu", atol=0.01, rtol=0.0)
    assert report.equivalent and report.atol == 0.01 and report.rtol == 0.0
    # A tolerance as large as the outputs themselves proves nothing: inconclusive, never equivalent.
    loose = verify_models(linear_model(w, b), linear_model(w2, b), provider="cpu", atol=1.0, rtol=0.0)
    assert loose.outputs[0].passed and loose.verdict == "inconclusive" and not loose.equivalent
    assert loose.reason == "output 'y': all reference values below 10 in magnitude (10 x atol)"


@pytest.mark.parametrize("kwargs", [{"atol": -1.0}, {"rtol": float("nan")}, {"iterations": 0}, {"seed": -1},
                                    {"provider": "tpu"}, {"input_range": (1.0, -1.0)}])
def test_bad_settings_raise(weights, kwargs):
    w, b = weights
    with pytest.raises(OnnxladyError):
        verify_models(linear_model(w, b), linear_model(w, b), **{"provider": "cpu", **kwargs})


def int_add_model(offset: int):
    return make_model(
        [helper.make_node("Add", ["i", "k"], ["o"])],
        [helper.make_tensor_value_info("i", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("o", TensorProto.INT64, ["N", 4])],
        [numpy_helper.from_array(np.array(offset, np.int64), "k")],
    )


def test_integer_outputs_must_match_exactly():
    same = verify_models(int_add_model(1000), int_add_model(1000), provider="cpu")
    assert same.equivalent and same.outputs[0].dtype == "int64"
    # Off by one on values around 1000: within rtol and atol for floats, but integers are exact.
    report = verify_models(int_add_model(1000), int_add_model(1001), provider="cpu", atol=10.0, rtol=1.0)
    (out,) = report.outputs
    assert not out.passed and out.mismatched_elements == 4 and out.max_abs_error == 1.0


def test_bool_outputs_exact():
    def model(threshold):
        return make_model(
            [helper.make_node("Greater", ["x", "t"], ["o"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
            [helper.make_tensor_value_info("o", TensorProto.BOOL, [1, 256])],
            [numpy_helper.from_array(np.array(threshold, np.float32), "t")],
        )

    assert verify_models(model(0.0), model(0.0), provider="cpu").equivalent
    report = verify_models(model(0.0), model(0.5), provider="cpu")
    assert not report.equivalent and report.outputs[0].mismatched_elements > 0


# ---------------------------------------------------------------- non-finite and degenerate outputs


def div_model(numerator: float):
    """O = numerator / x with x drawn from [0, 0]: inf or nan everywhere."""
    return make_model(
        [helper.make_node("Div", ["n", "x"], ["o"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(numerator, np.float32), "n")],
    )


def test_same_non_finite_values_are_equal_but_degenerate():
    report = verify_models(div_model(1.0), div_model(1.0), provider="cpu", input_range=(0.0, 0.0))
    (out,) = report.outputs
    assert out.passed
    assert out.degenerate is not None and "non-finite" in out.degenerate
    assert report.verdict == "inconclusive" and not report.equivalent
    nan = verify_models(div_model(0.0), div_model(0.0), provider="cpu", input_range=(0.0, 0.0))
    assert nan.outputs[0].passed and nan.verdict == "inconclusive"
    assert nan.reasons == ("output 'o': non-finite values (NaN or Inf) in the reference output",)


def test_different_non_finite_values_fail():
    report = verify_models(div_model(1.0), div_model(-1.0), provider="cpu", input_range=(0.0, 0.0))
    assert not report.equivalent and report.outputs[0].mismatched_elements == 4
    nan_vs_inf = verify_models(div_model(0.0), div_model(1.0), provider="cpu", input_range=(0.0, 0.0))
    assert not nan_vs_inf.equivalent
    assert json.dumps(nan_vs_inf.to_dict(), allow_nan=False)


def test_tiny_outputs_are_degenerate():
    report = verify_models(scale_model(1e-9), scale_model(1e-9), provider="cpu")
    (out,) = report.outputs
    assert out.passed and out.degenerate is not None and "10 x atol" in out.degenerate
    assert report.degenerate_outputs == (out,)
    # Such outputs pass even when the models differ a lot: the verdict is inconclusive, not equivalent.
    opposite = verify_models(scale_model(1e-9), scale_model(-1e-9), provider="cpu")
    assert opposite.outputs[0].passed and opposite.verdict == "inconclusive" and not opposite.equivalent
    assert verify_models(scale_model(1.0), scale_model(1.0), provider="cpu").outputs[0].degenerate is None
    # The threshold follows atol: outputs of 1e-3 are meaningful at atol 1e-6, not at the default.
    assert verify_models(scale_model(1e-3), scale_model(1e-3), provider="cpu", atol=1e-6).outputs[0].degenerate is None


# ---------------------------------------------------------------- shapes


def test_parse_shape_overrides():
    assert parse_shape_overrides(["x:1x3x224x224"]) == {"x": (1, 3, 224, 224)}
    assert parse_shape_overrides(["input:0:2x5", "ids:[1,7]"]) == {"input:0": (2, 5), "ids": (1, 7)}
    assert parse_shape_overrides(["scalarish:1"]) == {"scalarish": (1,)}
    assert parse_shape_overrides([]) == {}


@pytest.mark.parametrize("spec", ["x", "x:", ":1x2", "x:1xa", "x:1x-2", "x:0x3", "x:1x", "x:1.5"])
def test_parse_shape_overrides_rejects_bad_specs(spec):
    with pytest.raises(OnnxladyError):
        parse_shape_overrides([spec])


def test_parse_shape_overrides_rejects_duplicates():
    with pytest.raises(OnnxladyError, match="more than once"):
        parse_shape_overrides(["x:1x2", "x:1x3"])


def test_unknown_dims_default_and_overrides():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "h", None])],
    )
    report = verify_models(model, model, provider="cpu")
    assert report.input_shapes == {"x": (1, 3, 64, 64)}
    assert report.outputs[0].shape == (1, 3, 64, 64)
    report = verify_models(model, model, provider="cpu", shapes={"x": [2, 3, 5, 7]})
    assert report.input_shapes == {"x": (2, 3, 5, 7)}
    assert report.outputs[0].total_elements == 2 * 3 * 5 * 7

    with pytest.raises(OnnxladyError, match="unknown input 'nope'"):
        verify_models(model, model, provider="cpu", shapes={"nope": [1]})
    with pytest.raises(OnnxladyError, match="rank 3"):
        verify_models(model, model, provider="cpu", shapes={"x": [1, 3, 5]})
    with pytest.raises(OnnxladyError, match="fixes it at 3"):
        verify_models(model, model, provider="cpu", shapes={"x": [1, 4, 5, 5]})


def test_initializers_listed_as_inputs_are_not_fed(weights):
    """Old IR versions list every initializer among the graph inputs as well."""
    w, b = weights
    model = linear_model(w, b)
    model.ir_version = 3
    model.opset_import[0].version = 9
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    rng = np.random.default_rng(0)
    assert set(generate_inputs(model, None, rng)) == {"x"}
    report = verify_models(model, model, provider="cpu")
    assert report.equivalent and set(report.input_shapes) == {"x"}


# ---------------------------------------------------------------- integer inputs and Gather


def embedding_model(rows: int, *, id_type=TensorProto.INT32, axis: int = 0):
    """Token ids -> Cast -> Unsqueeze -> Gather from a [rows, 4] table (or [4, rows] with axis=1)."""
    table = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + 1.0
    if axis == 1:
        table = np.ascontiguousarray(table.T)
    return make_model(
        [
            helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
            helper.make_node("Unsqueeze", ["ids64", "ax"], ["ids3"]),
            helper.make_node("Gather", ["E", "ids3"], ["emb"], axis=axis),
            helper.make_node("Identity", ["emb"], ["out"]),
        ],
        [helper.make_tensor_value_info("ids", id_type, ["N", "L"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(np.array([0], np.int64), "ax")],
    )


@pytest.mark.parametrize("axis", [0, 1])
def test_gather_indices_stay_in_range(axis):
    model = embedding_model(5, axis=axis)
    rng = np.random.default_rng(0)
    feeds = generate_inputs(model, {"ids": (4, 64)}, rng, (-1.0, 1.0))
    assert feeds["ids"].dtype == np.int32
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() == 4  # the whole range [0, 5) is used
    # ORT rejects out-of-range Gather indices, so a run with [0, 16) ids would fail here.
    report = verify_models(model, model, provider="cpu", iterations=3, shapes={"ids": [2, 32]})
    assert report.equivalent and report.outputs[0].reference_max_abs > 1


def test_other_integer_inputs_use_small_range():
    feeds = generate_inputs(int_add_model(0), {"i": (8, 4)}, np.random.default_rng(3), (-1.0, 1.0))
    assert feeds["i"].dtype == np.int64 and feeds["i"].min() >= 0 and feeds["i"].max() < 16


def test_inputs_are_seeded_and_fresh_per_draw():
    model = scale_model(1.0)
    a = generate_inputs(model, None, np.random.default_rng(5), (2.0, 3.0))["x"]
    b = generate_inputs(model, None, np.random.default_rng(5), (2.0, 3.0))["x"]
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.min() >= 2.0 and a.max() <= 3.0
    rng = np.random.default_rng(5)
    first, second = (generate_inputs(model, None, rng, (2.0, 3.0))["x"] for _ in range(2))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16])
def test_other_float_input_types(elem):
    model = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("x", elem, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    report = verify_models(model, model, provider="cpu")
    assert report.equivalent and 0.1 < report.outputs[0].reference_max_abs <= 1.0


# ---------------------------------------------------------------- mismatched models


def test_mismatched_outputs_raise(weights):
    w, b = weights
    ref = linear_model(w, b)
    with pytest.raises(OnnxladyError, match=r"'y'.*'z'"):
        verify_models(ref, linear_model(w, b, out_name="z"), provider="cpu")

    extra = linear_model(w, b)
    extra.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 8]))
    with pytest.raises(OnnxladyError, match=r"1 outputs but .* has 2"):
        verify_models(ref, extra, provider="cpu")
    with pytest.raises(OnnxladyError, match="output 'h' is missing"):
        verify_models(extra, ref, provider="cpu")

    as_double = linear_model(w, b, out_name="y32")
    as_double.graph.node.append(helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.DOUBLE))
    del as_double.graph.output[:]
    as_double.graph.output.append(helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 8]))
    with pytest.raises(OnnxladyError, match=r"float.*double"):
        verify_models(ref, as_double, provider="cpu")


def test_output_shapes_compared_at_run_time():
    ref = scale_model(1.0, shape=(1, 8))
    cand = make_model(
        [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(1.0, np.float32), "s"), numpy_helper.from_array(np.array([2, 4]), "shape")],
    )
    with pytest.raises(OnnxladyError, match=r"shape \(1, 8\).*\(2, 4\)"):
        verify_models(ref, cand, provider="cpu")


def test_mismatched_inputs_raise(weights):
    w, b = weights
    ref = linear_model(w, b)
    with pytest.raises(OnnxladyError, match=r"input 'x'.*missing"):
        verify_models(ref, linear_model(w, b, in_name="x2"), provider="cpu")
    double_in = make_model(
        [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), *linear_model(w, b, in_name="xf").graph.node],
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        linear_model(w, b).graph.initializer,
    )
    with pytest.raises(OnnxladyError, match=r"input 'x' is float .*double"):
        verify_models(ref, double_in, provider="cpu")
    with pytest.raises(OnnxladyError, match=r"dimension 1 = 16 .* 32"):
        verify_models(ref, linear_model(np.ones((32, 8)), b), provider="cpu")


# ---------------------------------------------------------------- files, errors from ORT


def test_paths_and_external_data(tmp_path, weights, monkeypatch):
    w, b = weights
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(linear_model(w, b), str(folder / "ref.onnx"))
    onnx.save(
        linear_model(w, b), str(folder / "cand.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location="cand.data", size_threshold=0,
    )
    assert (folder / "cand.data").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # external data must resolve against the model's folder
    report = verify_models(folder / "ref.onnx", str(folder / "cand.onnx"), provider="cpu")
    assert report.equivalent

    # An in-memory proto that still points at external files cannot be resolved.
    proto = onnx.load(str(folder / "cand.onnx"), load_external_data=False)
    with pytest.raises(OnnxladyError, match="external"):
        verify_models(folder / "ref.onnx", proto, provider="cpu")


def test_bad_files_raise(tmp_path, weights):
    w, b = weights
    good = tmp_path / "good.onnx"
    onnx.save(linear_model(w, b), str(good))
    with pytest.raises(OnnxladyError, match="no such file"):
        verify_models(good, tmp_path / "missing.onnx", provider="cpu")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe not a model at all \x00\x01")
    with pytest.raises(OnnxladyError):
        verify_models(good, junk, provider="cpu")


def test_ort_cannot_run_custom_op(weights, capfd):
    w, b = weights
    custom = make_model(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        opsets=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.example", 1)],
    )
    with pytest.raises(OnnxladyError, match=r"^ONNX Runtime cannot run the candidate model: ") as info:
        verify_models(linear_model(w, b), custom, provider="cpu")
    assert "\n" not in str(info.value) and "[ONNXRuntimeError]" not in str(info.value)
    assert capfd.readouterr().err == ""  # ORT's own log line stays silent: the message says it once


def test_out_of_range_gather_would_fail(monkeypatch, capfd):
    """Without the Gather analysis ids come from [0, 16) and ORT rejects them: the analysis matters.

    The message says it is the reference that cannot run on the generated inputs, and how to fix it.
    """
    import onnxlady._verify._inputs as inputs

    monkeypatch.setattr(inputs, "embedding_bounds", lambda index, names: {})
    model = embedding_model(5)
    with pytest.raises(OnnxladyError, match=r"^ONNX Runtime cannot run the reference model on the generated inputs") as info:
        verify_models(model, model, provider="cpu", shapes={"ids": [2, 32]})
    assert "Gather" in str(info.value) and "--val-range ids:[lo,hi]" in str(info.value)
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------- providers, progress, JSON


def test_cpu_session():
    session, used, reason = create_session(scale_model(2.0), "cpu")
    assert used == "CPUExecutionProvider" and reason is None
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_cuda_provider_raises_without_cuda():
    if CUDA_LOADS:
        pytest.skip("the CUDA execution provider loads on this machine, so 'cuda' legitimately succeeds")
    with pytest.raises(OnnxladyError, match=r"^CUDA execution provider could not be loaded: "):
        verify_models(scale_model(1.0), scale_model(1.0), provider="cuda")


def test_auto_falls_back_to_cpu_with_reason(capfd):
    if CUDA_LOADS:
        pytest.skip("the CUDA execution provider loads on this machine, so 'auto' does not fall back")
    report = verify_models(scale_model(1.0), scale_model(1.0), provider="auto")
    assert report.provider_requested == "auto"
    assert report.provider_used == "CPUExecutionProvider"
    assert report.fallback_reason and report.fallback_reason.startswith("CUDAExecutionProvider not available: ")
    assert report.fallback_reason == f"CUDAExecutionProvider not available: {CUDA_REASON}"
    assert report.equivalent
    assert "provider_bridge" not in capfd.readouterr().err  # ORT's loader error stays silent


@pytest.mark.skipif(not CUDA_LOADS, reason="needs a CUDA execution provider that loads")
def test_cuda_runs_with_tf32_off(weights):
    w, b = weights
    report = verify_models(linear_model(w, b), linear_model(w, b), provider="cuda")
    assert report.provider_used == "CUDAExecutionProvider" and report.equivalent


def test_progress_called_per_iteration(weights):
    w, b = weights
    messages: list[str] = []
    verify_models(linear_model(w, b), linear_model(w, b), provider="cpu", iterations=3, progress=messages.append)
    iterations = [m for m in messages if m.startswith("iteration")]
    assert len(iterations) == 3 and iterations[-1].startswith("iteration 3/3")
    # Each stage is announced, so a slow one (a large graph's sessions) shows on a non-terminal.
    assert [m for m in messages if m.startswith("verify:")] == [
        "verify: reading the models' graphs",
        "verify: opening ONNX Runtime sessions",
        "verify: running both models",
    ]


def test_progress_lines_on_a_non_terminal_while_sessions_open(weights, monkeypatch):
    """The periodic line of a non-terminal names the stage even before the first feed has run."""
    import io
    import time

    from onnxlady._io._progress import ProgressReporter
    from onnxlady._verify import _compare

    w, b = weights
    opened = _compare._open_sessions

    def slow_open(*args, **kwargs):
        time.sleep(0.3)
        return opened(*args, **kwargs)

    monkeypatch.setattr(_compare, "_open_sessions", slow_open)
    stream = io.StringIO()
    reporter = ProgressReporter(stream=stream, bar=False, interval=0.1)
    verify_models(linear_model(w, b), linear_model(w, b), provider="cpu", progress=reporter)
    reporter.close()
    assert "verify: opening ONNX Runtime sessions" in stream.getvalue()


def test_to_dict_is_json_serialisable(weights):
    w, b = weights
    report = verify_models(linear_model(w, b), linear_model(w + 0.1, b), provider="cpu", iterations=2, seed=3)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["equivalent"] is False
    assert data["provider_used"] == "CPUExecutionProvider"
    assert data["input_shapes"] == {"x": [1, 16]}
    assert data["outputs"][0]["name"] == "y" and data["outputs"][0]["mismatched_elements"] > 0
    assert data["iterations"] == 2 and data["seed"] == 3


def test_report_is_frozen(weights):
    w, b = weights
    report = verify_models(linear_model(w, b), linear_model(w, b), provider="cpu")
    with pytest.raises(AttributeError):
        report.atol = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        report.outputs[0].passed = False  # type: ignore[misc]


# ---------------------------------------------------------------- index outputs


def _argmax_classifier(first: np.ndarray, second: np.ndarray, op: str = "ArgMax") -> onnx.ModelProto:
    """x [1, 8] -> MatMul [8, 16] -> Relu -> MatMul [16, 10] -> ArgMax (keepdims 0): one class index."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["scores"]),
            helper.make_node(op, ["scores"], ["cls"], axis=1, keepdims=0),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("cls", TensorProto.INT64, [1])],
        [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")],
    )


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
def test_an_index_output_is_judged_on_the_scores_it_reduces(op: str) -> None:
    """Held-out: one agreeing class index was EQUIVALENT on a wrong permutation (it kept the class)."""
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(16, 10)).astype(np.float32)
    order = rng.permutation(16)
    reference = _argmax_classifier(first, second, op)
    permuted = _argmax_classifier(first[:, order], second[order], op)
    report = verify_models(reference, permuted, provider="cpu")
    assert report.verdict == "equivalent", report.reasons
    assert any("judged on the input of its" in note for note in report.notes)
    # Hidden units moved in the first layer only: the scores change, while one index may not.
    wrong = _argmax_classifier(first[:, order], second, op)
    report = verify_models(reference, wrong, provider="cpu")
    assert report.verdict == "not-equivalent"
    assert any("scores" in reason for reason in report.reasons)


def test_a_single_integer_proves_little_by_itself() -> None:
    rng = np.random.default_rng(1)
    first, second = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(16, 10)).astype(np.float32)
    model = _argmax_classifier(first, second)
    (cls,) = [c for c in verify_models(model, model, provider="cpu").outputs if c.name == "cls"]
    assert cls.passed and cls.degenerate is not None and "single value" in cls.degenerate
