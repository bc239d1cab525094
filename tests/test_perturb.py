"""Tests for onnxlady._transforms._perturb: noise, quantization and pruning of weight tensors."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES, RUNNABLE
from fixtures.quantized import INTEGER_WEIGHTS
from onnxlady._analysis._channels import analyze
from onnxlady._errors import OnnxladyError
from onnxlady._transforms._perturb import PerturbReport, TensorChange, perturb_model, weight_tensors
from onnxlady._verify._compare import generate_inputs

OPSET = 17
IR_VERSION = 8


# -- helpers ------------------------------------------------------------------------------
def holders(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every constant of the main graph by name: initializers and Constant node values."""
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    found[node.output[0]] = attribute.t
    return found


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {name: numpy_helper.to_array(t).astype(np.float64) for name, t in holders(model).items()}


def matmul_model(*weights: np.ndarray, raw: bool = True, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """X [N, K0] -> MatMul(W0) -> MatMul(W1) ... with weights stored as initializers W0, W1..."""
    nodes, inits = [], []
    current = "x"
    for k, weight in enumerate(weights):
        name = f"W{k}"
        if dtype == TensorProto.FLOAT and raw:
            inits.append(numpy_helper.from_array(weight.astype(np.float32), name))
        else:
            inits.append(helper.make_tensor(name, dtype, weight.shape, weight.reshape(-1).tolist(), raw=False))
        operand = name
        if dtype != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [name], [f"{name}.cast"], to=TensorProto.FLOAT))
            operand = f"{name}.cast"
        nodes.append(helper.make_node("MatMul", [current, operand], [f"y{k}"]))
        current = f"y{k}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weights[0].shape[0]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", weights[-1].shape[1]])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def run(model: onnx.ModelProto) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # verify's input generator: the right dtype per input, token ids below the vocabulary size.
    feeds = generate_inputs(model, {}, np.random.default_rng(123), (0.0, 1.0))
    return session.run(None, feeds)


def changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> set[str]:
    return {name for name in before if not np.array_equal(before[name], after[name])}


# -- which tensors ------------------------------------------------------------------------
def test_weight_tensors_are_the_weight_operands_in_graph_order() -> None:
    assert weight_tensors(FIXTURES["vgg"](0)) == [
        ("features.block1.conv.weight", "Conv"),
        ("features.block2.conv.weight", "Conv"),
        ("features.block3.conv.weight", "Conv"),
        ("classifier.fc1.weight", "Gemm"),
        ("logits.weight", "Gemm"),
    ]
    assert [op for _, op in weight_tensors(FIXTURES["matmul_mlp"](0))] == ["MatMul"] * 3
    assert ("dec.deconv.weight", "ConvTranspose") in weight_tensors(FIXTURES["conv_transpose"](0))
    # Through Cast (float16 leaf) and Identity, to the leaf.
    names = [name for name, _ in weight_tensors(FIXTURES["shared_initializer"](0))]
    assert names == ["conv1.weight", "conv2.weight", "conv3.weight.fp16", "conv4.weight", "logits.weight"]


def test_matmul_constant_on_input_0_and_shared_weight_listed_once() -> None:
    w = np.random.default_rng(0).standard_normal((4, 4))
    model = matmul_model(w)
    # A second MatMul reads W0 as its *first* operand; W0 is still one weight.
    model.graph.node.append(helper.make_node("MatMul", ["W0", "y0"], ["z"]))
    model.graph.output[0].name = "z"
    assert weight_tensors(model) == [("W0", "MatMul")]
    report = perturb_model(model, noise=1.0)
    assert [c.tensor for c in report.changes] == ["W0"]


# -- noise --------------------------------------------------------------------------------
@pytest.mark.parametrize("omega", [0.1, 1.0, 3.0])
def test_noise_std_is_omega_times_tensor_std(omega: float) -> None:
    model = FIXTURES["vgg"](0)
    before = arrays(model)
    report = perturb_model(model, noise=omega, seed=7)
    after = arrays(model)
    name = "classifier.fc1.weight"  # 32768 elements
    delta = (after[name] - before[name]) / before[name].std()
    assert np.std(delta) == pytest.approx(omega, rel=0.03)
    assert abs(np.mean(delta)) < 0.03 * omega
    change = next(c for c in report.changes if c.tensor == name)
    assert change.kind == "noise"
    assert change.detail["std"] == pytest.approx(before[name].std())
    assert change.detail["sigma"] == pytest.approx(omega * before[name].std())
    assert change.changed_elements == change.elements == before[name].size
    assert change.relative_l2_change == pytest.approx(
        np.linalg.norm(after[name] - before[name]) / np.linalg.norm(before[name])
    )


def test_noise_is_reproducible_and_seed_dependent() -> None:
    a, b, c = (FIXTURES["resnet"](0) for _ in range(3))
    perturb_model(a, noise=0.5, seed=3)
    perturb_model(b, noise=0.5, seed=3)
    perturb_model(c, noise=0.5, seed=4)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()


def test_noise_uses_one_generator_in_graph_order() -> None:
    rng = np.random.default_rng(0)
    w0, w1 = rng.standard_normal((8, 6)), rng.standard_normal((6, 5))
    model = matmul_model(w0, w1)
    perturb_model(model, noise=2.0, seed=11)
    expected_rng = np.random.default_rng(11)
    for name, w in (("W0", w0), ("W1", w1)):
        w32 = w.astype(np.float32).astype(np.float64)
        expected = (w32 + expected_rng.standard_normal(w.shape) * 2.0 * w32.std()).astype(np.float32)
        np.testing.assert_array_equal(numpy_helper.to_array(holders(model)[name]), expected)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "unfolded_bn", "conv_transpose"])
def test_only_weights_change_biases_and_bn_untouched(name: str) -> None:
    model = FIXTURES[name](0)
    before = arrays(model)
    perturb_model(model, noise=1.0, quantize_bits=3, prune_percent=10)
    weights = {leaf for leaf, _ in weight_tensors(model)}
    assert changed(before, arrays(model)) == weights
    assert any(".bias" in n or ".mean" in n or ".var" in n or ".scale" in n for n in set(before) - weights)


def test_noise_zero_changes_nothing() -> None:
    model = FIXTURES["vgg"](0)
    before = model.SerializeToString()
    report = perturb_model(model, noise=0.0)
    assert model.SerializeToString() == before
    assert all(c.changed_elements == 0 and c.relative_l2_change == 0.0 for c in report.changes)


# -- quantization -------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_quantization_levels_and_error(bits: int) -> None:
    model = FIXTURES["mobilenet"](0)
    before = arrays(model)
    report = perturb_model(model, quantize_bits=bits)
    after = arrays(model)
    for change in report.changes:
        old, new = before[change.tensor], after[change.tensor]
        assert change.kind == "quantize"
        assert len(np.unique(new)) <= 2**bits
        step = (old.max() - old.min()) / (2**bits - 1)
        assert change.detail["levels"] == 2**bits
        assert change.detail["scale"] == pytest.approx(step)
        # Half a step, plus float32 rounding of the stored values.
        assert np.max(np.abs(new - old)) <= step / 2 + 1e-6 * np.max(np.abs(old))
        # The extremes are levels 0 and 2^B - 1: they survive up to float32 rounding.
        assert new.min() == pytest.approx(old.min(), rel=1e-6)
        assert new.max() == pytest.approx(old.max(), rel=1e-6)


def test_quantization_leaves_constant_tensor_alone() -> None:
    model = matmul_model(np.full((4, 3), 0.37), np.random.default_rng(0).standard_normal((3, 2)))
    before = model.graph.initializer[0].SerializeToString()
    report = perturb_model(model, quantize_bits=2)
    assert model.graph.initializer[0].SerializeToString() == before
    first, second = report.changes
    assert first.changed_elements == 0 and first.detail["constant"] is True
    assert second.changed_elements > 0


def test_quantization_32_bits_changes_float32_weights_little() -> None:
    model = FIXTURES["vgg"](0)
    before = arrays(model)
    perturb_model(model, quantize_bits=32)
    for name, new in arrays(model).items():
        np.testing.assert_allclose(new, before[name], rtol=1e-6, atol=1e-7)


# -- pruning ------------------------------------------------------------------------------
@pytest.mark.parametrize("percent", [0, 12.5, 30, 50, 99, 100])
def test_pruning_zeroes_exact_count_of_smallest(percent: float) -> None:
    model = FIXTURES["concat"](0)
    before = arrays(model)
    report = perturb_model(model, prune_percent=percent)
    after = arrays(model)
    for change in report.changes:
        old, new = before[change.tensor], after[change.tensor]
        k = math.floor(percent / 100 * old.size)
        assert np.count_nonzero(old == 0) == 0  # fixture weights have no zeros
        assert np.count_nonzero(new == 0) == k == change.detail["zeroed"] == change.changed_elements
        zeroed = new == 0
        np.testing.assert_array_equal(new[~zeroed], old[~zeroed])
        if 0 < k < old.size:
            assert np.abs(old[zeroed]).max() <= np.abs(old[~zeroed]).min()
            assert change.detail["threshold"] == pytest.approx(np.abs(old[zeroed]).max())


def test_pruning_breaks_ties_by_position_and_reads_percent_as_decimal() -> None:
    w = np.array([[0.5, -0.5, 0.5, 2.0], [-0.5, 3.0, 0.5, 1.0]])
    model = matmul_model(w)
    perturb_model(model, prune_percent=50)  # 4 of 8: the first 4 of the five 0.5 magnitudes
    new = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(new, [[0, 0, 0, 2.0], [0, 3.0, 0.5, 1.0]])
    # 0.3 % of 1000 is 3 (0.3 is not exact in binary: a float product gives 2.999...).
    model = matmul_model(np.arange(1, 1001, dtype=np.float64).reshape(100, 10))
    report = perturb_model(model, prune_percent=0.3)
    assert report.changes[0].detail["zeroed"] == 3
    assert np.count_nonzero(numpy_helper.to_array(model.graph.initializer[0]) == 0) == 3


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 200),
    percent=st.floats(0, 100, allow_nan=False),
    seed=st.integers(0, 2**16),
)
def test_pruning_count_property(n: int, percent: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Few distinct magnitudes and some zeros: ties and already-zero entries.
    w = rng.integers(-3, 4, size=(n, 1)).astype(np.float64)
    model = matmul_model(w)
    perturb_model(model, prune_percent=percent)
    new = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    k = math.floor(Decimal(repr(percent)) * n / 100)  # T as the decimal it prints as
    chosen = np.argsort(np.abs(w.reshape(-1)), kind="stable")[:k]
    expected = w.reshape(-1).copy()
    expected[chosen] = 0
    np.testing.assert_array_equal(new.reshape(-1), expected)
    assert np.count_nonzero(new == 0) == max(k, np.count_nonzero(w == 0))


# -- combined -----------------------------------------------------------------------------
def test_combined_applies_prune_then_quantize_then_noise() -> None:
    combined = FIXTURES["resnet"](0)
    report = perturb_model(combined, noise=0.3, quantize_bits=4, prune_percent=40, seed=5)
    assert report.order == ["prune", "quantize", "noise"]
    for tensor in report.tensors:
        assert [c.kind for c in report.changes if c.tensor == tensor] == ["prune", "quantize", "noise"]
    sequential = FIXTURES["resnet"](0)
    perturb_model(sequential, prune_percent=40)
    perturb_model(sequential, quantize_bits=4)
    perturb_model(sequential, noise=0.3, seed=5)
    assert combined.SerializeToString() == sequential.SerializeToString()
    other_order = FIXTURES["resnet"](0)
    perturb_model(other_order, noise=0.3, seed=5)
    perturb_model(other_order, quantize_bits=4)
    perturb_model(other_order, prune_percent=40)
    assert combined.SerializeToString() != other_order.SerializeToString()


def test_prune_then_quantize_keeps_level_count() -> None:
    model = FIXTURES["vgg"](0)
    report = perturb_model(model, quantize_bits=2, prune_percent=60)
    after = arrays(model)
    for tensor in report.tensors:
        assert len(np.unique(after[tensor])) <= 4


# -- dtypes, storage, Constant nodes ------------------------------------------------------
def test_float16_weight_behind_cast_stays_float16() -> None:
    model = FIXTURES["shared_initializer"](0)
    before = arrays(model)
    fp16 = holders(model)["conv3.weight.fp16"]
    assert fp16.data_type == TensorProto.FLOAT16 and fp16.HasField("raw_data")
    perturb_model(model, noise=0.5, quantize_bits=6)
    fp16 = holders(model)["conv3.weight.fp16"]
    assert fp16.data_type == TensorProto.FLOAT16 and fp16.HasField("raw_data")
    assert len(fp16.raw_data) == 2 * before["conv3.weight.fp16"].size
    assert not np.array_equal(numpy_helper.to_array(fp16), before["conv3.weight.fp16"])
    assert "shared.zero_bias" not in changed(before, arrays(model))
    onnx.checker.check_model(model)
    assert np.all(np.isfinite(run(model)[0]))


def test_quantization_of_float16_respects_levels() -> None:
    model = FIXTURES["shared_initializer"](0)
    perturb_model(model, quantize_bits=3)
    assert len(np.unique(numpy_helper.to_array(holders(model)["conv3.weight.fp16"]))) <= 8


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_typed_field_storage_is_kept(dtype: int) -> None:
    w = np.random.default_rng(1).standard_normal((6, 4))
    model = matmul_model(w, raw=False, dtype=dtype)
    tensor = model.graph.initializer[0]
    assert not tensor.HasField("raw_data")
    before = numpy_helper.to_array(tensor).astype(np.float64)
    perturb_model(model, noise=1.0, seed=2)
    tensor = model.graph.initializer[0]
    assert tensor.data_type == dtype and not tensor.HasField("raw_data")
    after = numpy_helper.to_array(tensor).astype(np.float64)
    assert after.shape == before.shape
    delta = after - before
    assert np.all(delta != 0)
    assert 0.3 < np.std(delta) / np.std(before) < 2.0


def test_bfloat16_rounds_to_nearest() -> None:
    w = np.array([[1.0, -2.0], [0.5, 3.0]])
    model = matmul_model(w, raw=False, dtype=TensorProto.BFLOAT16)
    perturb_model(model, quantize_bits=8)
    after = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    exact = -2.0 + np.rint((w + 2.0) / 5.0 * 255) * 5.0 / 255
    # bfloat16 has 8 significant bits: round to nearest is within 2^-8 relative...
    assert np.all(np.abs(after - exact) <= np.abs(exact) * 2.0**-8)
    # ... and agrees with numpy's own bfloat16 (ml_dtypes) rounding of the float32 value.
    bf16 = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
    np.testing.assert_array_equal(after, exact.astype(np.float32).astype(bf16).astype(np.float64))


def test_constant_node_weights_are_perturbed() -> None:
    model = FIXTURES["constant_weights"](0)
    assert not model.graph.initializer
    before = arrays(model)
    report = perturb_model(model, noise=0.2, prune_percent=10)
    assert changed(before, arrays(model)) == {"conv1.weight", "conv2.weight", "conv3.weight", "logits.weight"}
    assert {c.tensor for c in report.changes} == {"conv1.weight", "conv2.weight", "conv3.weight", "logits.weight"}
    assert sum(n.op_type == "Constant" for n in model.graph.node) == len(before)
    assert np.all(np.isfinite(run(model)[0]))


def test_constant_node_value_floats_is_perturbed() -> None:
    # MatMul of [N, 3] by a 1-D [3] vector held as Constant value_floats.
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value_floats=[0.5, -1.0, 2.0]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    perturb_model(model, prune_percent=34)
    assert list(model.graph.node[0].attribute[0].floats) == [0.0, -1.0, 2.0]
    assert run(model)[0].shape == (2,)


def test_integer_weights_are_refused_and_model_untouched() -> None:
    rng = np.random.default_rng(0)
    model = matmul_model(rng.standard_normal((4, 4)), rng.standard_normal((4, 3)))
    # W1 becomes int8 storage read through Cast(to=FLOAT); W0 stays float32.
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(rng.integers(-5, 5, (4, 3)).astype(np.int8), "W1"))
    model.graph.node.insert(1, helper.make_node("Cast", ["W1"], ["W1.cast"], to=TensorProto.FLOAT))
    model.graph.node[2].input[1] = "W1.cast"
    before = model.SerializeToString()
    with pytest.raises(OnnxladyError, match=r"'W1'.*INT8"):
        perturb_model(model, noise=1.0)
    assert model.SerializeToString() == before


def test_dequantize_linear_weights_are_refused() -> None:
    w = numpy_helper.from_array(np.arange(12, dtype=np.int8).reshape(4, 3), "Wq")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["Wq", "scale"], ["W"]),
            helper.make_node("MatMul", ["x", "W"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[w, scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    assert weight_tensors(model) == [("Wq", "MatMul")]
    with pytest.raises(OnnxladyError, match="'Wq'"):
        perturb_model(model, quantize_bits=4)


def test_unloaded_external_data_is_refused() -> None:
    model = matmul_model(np.ones((2, 2)))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="w.bin")
    with pytest.raises(OnnxladyError, match="external data"):
        perturb_model(model, noise=1.0)


def test_non_finite_weights_are_refused() -> None:
    model = matmul_model(np.array([[1.0, np.nan], [0.0, 2.0]]))
    with pytest.raises(OnnxladyError, match="NaN"):
        perturb_model(model, quantize_bits=4)


# -- only ---------------------------------------------------------------------------------
def test_only_group_restricts_to_that_groups_weights() -> None:
    model = FIXTURES["vgg"](0)
    analysis = analyze(model)
    group = analysis.group("g1")
    expected = {m.tensor for m in group.members if m.is_weight and m.tensor.endswith("weight")}
    assert expected == {"features.block2.conv.weight", "features.block3.conv.weight"}
    assert {name for name, _ in weight_tensors(model, ["g1"])} == expected
    before = arrays(model)
    report = perturb_model(model, noise=1.0, only=["g1"])
    assert changed(before, arrays(model)) == expected
    assert set(report.tensors) == expected


def test_only_group_maps_untied_copies_to_their_source() -> None:
    model = FIXTURES["shared_initializer"](0)
    # g1 reads an untied copy of the shared bias; its weights are conv2's and conv3's.
    assert weight_tensors(model, ["g1"]) == [("conv2.weight", "Conv"), ("conv3.weight.fp16", "Conv")]


def test_only_tensor_names_and_chain_names() -> None:
    model = FIXTURES["shared_initializer"](0)
    picked = weight_tensors(model, ["conv3.weight.cast", "logits.weight", "g0"])
    assert [name for name, _ in picked] == ["conv1.weight", "conv2.weight", "conv3.weight.fp16", "logits.weight"]


@pytest.mark.parametrize(
    ("only", "message"),
    [
        (["g99"], "no group 'g99'"),
        (["nope"], "'nope' is neither a group id nor a constant tensor"),
        (["features.block1.conv.bias"], "not a weight"),
        ([], "empty"),
    ],
)
def test_only_bad_names(only: list[str], message: str) -> None:
    model = FIXTURES["vgg"](0)
    before = model.SerializeToString()
    with pytest.raises(OnnxladyError, match=message):
        perturb_model(model, noise=1.0, only=only)
    assert model.SerializeToString() == before


# -- parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "nothing to perturb"),
        ({"noise": -0.1}, "noise level"),
        ({"noise": float("nan")}, "noise level"),
        ({"quantize_bits": 0}, "bits"),
        ({"quantize_bits": 33}, "bits"),
        ({"quantize_bits": 4.0}, "bits"),
        ({"prune_percent": -1}, "pruning percent"),
        ({"prune_percent": 100.5}, "pruning percent"),
        ({"noise": 1.0, "seed": -1}, "seed"),
    ],
)
def test_bad_parameters(kwargs: dict[str, object], message: str) -> None:
    model = FIXTURES["vgg"](0)
    with pytest.raises(OnnxladyError, match=message) as info:
        perturb_model(model, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_model_without_weights_is_refused() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    with pytest.raises(OnnxladyError, match="no Conv"):
        perturb_model(model, noise=1.0)


# -- report -------------------------------------------------------------------------------
def test_report_to_dict_is_json_and_progress_is_called() -> None:
    model = FIXTURES["vgg"](0)
    messages: list[str] = []
    report = perturb_model(model, noise=1.0, prune_percent=5.0, seed=9, progress=messages.append)
    assert isinstance(report, PerturbReport) and all(isinstance(c, TensorChange) for c in report.changes)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["seed"] == 9 and data["noise"] == 1.0 and data["prune_percent"] == 5.0
    assert data["quantize_bits"] is None and data["order"] == ["prune", "noise"]
    assert data["tensors"] == 5 and len(data["changes"]) == 10
    assert set(data["changes"][0]) == {
        "tensor", "op_type", "kind", "elements", "changed_elements", "relative_l2_change", "detail",
    }
    assert messages


# -- end to end in ONNX Runtime -----------------------------------------------------------
# Integer (already quantized) weights are refused by design: those fixtures are left out.
@pytest.mark.parametrize("name", sorted(RUNNABLE - INTEGER_WEIGHTS))
def test_perturbed_models_run_and_outputs_change_plausibly(name: str) -> None:
    base = run(FIXTURES[name](0))
    for kwargs, low, high in (
        ({"noise": 0.1}, 1e-3, 1.0),
        ({"quantize_bits": 8}, 1e-4, 0.1),
        ({"prune_percent": 20}, 1e-3, 1.0),
    ):
        model = FIXTURES[name](0)
        perturb_model(model, **kwargs)  # type: ignore[arg-type]
        onnx.checker.check_model(model)
        outputs = run(model)
        for new, old in zip(outputs, base):
            assert new.shape == old.shape and np.all(np.isfinite(new))
        relative = np.linalg.norm(outputs[0] - base[0]) / np.linalg.norm(base[0])
        assert low < relative < high, (name, kwargs, relative)
