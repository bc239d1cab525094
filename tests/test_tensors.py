"""The one tensor-holder module (onnxlady._io._tensors), the model copy and the attribute reader.

Every reader of constants goes through these functions, so the tests pin what the four readers
they replace did: which tensors a model holds, every stored type read exactly, float32 only where
it holds every value, unloaded external data refused by every user (with the message naming the
tensor), the finite check, and copies that share nothing with their original.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from onnxlady import OnnxladyError, analyze, draw_permutations, permute_model
from onnxlady import testing as onnxlady_testing
from onnxlady._audit._verdicts import audit_models
from onnxlady._graph._attributes import node_attribute
from onnxlady._io import _files
from onnxlady._io._files import copy_model
from onnxlady._io._tensors import (
    EXACT_IN_FLOAT32,
    FloatConstants,
    all_finite,
    float_dtype,
    is_external,
    read_array,
    read_constants,
    read_float,
    require_loaded,
    tensor_holders,
)
from onnxlady._resync._entry import resync_model
from onnxlady._transforms._permute import _permute_tensor
from onnxlady._transforms._watermark import embed_watermark
from onnxlady._verify._compare import _model_source

# -- every stored type ------------------------------------------------------------------------
#: Per stored type: values that reach its extremes, so a lossy float32 read shows.
_VALUES: dict[int, np.ndarray] = {
    TensorProto.FLOAT: np.array([-3.4e38, -1.5, 0.0, 2.0**-149, 3.4e38], dtype=np.float32),
    TensorProto.DOUBLE: np.array([-1e300, 1.0 + 2.0**-52, 0.0, 5e-324, 1e300], dtype=np.float64),
    TensorProto.FLOAT16: np.array([-65504.0, -1.0, 0.0, 2.0**-24, 65504.0], dtype=np.float16),
    TensorProto.BFLOAT16: np.array([-3.0e38, -1.0, 0.0, 2.0**-133, 1.5], dtype=ml_dtypes.bfloat16),
    TensorProto.INT8: np.array([-128, -1, 0, 1, 127], dtype=np.int8),
    TensorProto.UINT8: np.array([0, 1, 128, 254, 255], dtype=np.uint8),
    TensorProto.INT16: np.array([-32768, -1, 0, 1, 32767], dtype=np.int16),
    TensorProto.UINT16: np.array([0, 1, 32768, 65534, 65535], dtype=np.uint16),
    TensorProto.INT32: np.array([-(2**31), -1, 0, 2**24 + 1, 2**31 - 1], dtype=np.int32),
    TensorProto.UINT32: np.array([0, 1, 2**24 + 1, 2**31, 2**32 - 1], dtype=np.uint32),
    TensorProto.INT64: np.array([-(2**53), -1, 0, 2**24 + 1, 2**53], dtype=np.int64),
    TensorProto.UINT64: np.array([0, 1, 2**24 + 1, 2**40 + 1, 2**53], dtype=np.uint64),
    TensorProto.BOOL: np.array([True, False, True, True, False]),
    TensorProto.FLOAT8E4M3FN: np.array([-448.0, -1.0, 0.0, 2.0**-9, 448.0], dtype=ml_dtypes.float8_e4m3fn),
}
_NAMES = {data_type: helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.") for data_type in _VALUES}


def _tensor(data_type: int, raw: bool) -> onnx.TensorProto:
    values = _VALUES[data_type].reshape(1, 5)
    if raw:
        return numpy_helper.from_array(values, "t")
    # The typed storage field (float_data, int32_data with 16-bit patterns...), as older exporters write.
    stored = helper.make_tensor("t", data_type, values.shape, values.reshape(-1).tolist())
    assert not stored.HasField("raw_data")
    return stored


@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "typed-field"])
@pytest.mark.parametrize("data_type", list(_VALUES), ids=list(_NAMES.values()))
def test_read_array_gives_the_stored_values(data_type: int, raw: bool) -> None:
    tensor = _tensor(data_type, raw)
    values = read_array(tensor, "tensor 't'")
    expected = _VALUES[data_type].reshape(1, 5)
    assert values.dtype == expected.dtype and values.shape == (1, 5)
    assert values.tobytes() == expected.tobytes()


@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "typed-field"])
@pytest.mark.parametrize("data_type", list(_VALUES), ids=list(_NAMES.values()))
def test_read_float_is_exact_in_its_dtype(data_type: int, raw: bool) -> None:
    values = read_float(_tensor(data_type, raw), "tensor 't'")
    exact = _VALUES[data_type].reshape(1, 5).astype(np.float64)  # every stored value, exactly
    wanted = np.float32 if data_type in EXACT_IN_FLOAT32 else np.float64
    assert values.dtype == wanted == float_dtype(data_type)
    assert np.array_equal(values.astype(np.float64), exact)


def test_float32_would_lose_the_types_read_as_float64() -> None:
    """The float64 rule is needed: float32 rounds these types' extreme values (the test would
    pass vacuously if it did not).
    """
    for data_type in set(_VALUES) - EXACT_IN_FLOAT32 - {TensorProto.FLOAT8E4M3FN}:
        exact = _VALUES[data_type].astype(np.float64)
        with np.errstate(over="ignore"):
            assert not np.array_equal(exact.astype(np.float32).astype(np.float64), exact), _NAMES[data_type]


def test_raw_float32_is_read_without_a_copy() -> None:
    tensor = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    for values in (read_array(tensor, "w"), read_float(tensor, "w")):
        assert not values.flags.owndata and not values.flags.writeable  # a view of the proto's bytes
    converted = read_float(numpy_helper.from_array(np.arange(6, dtype=np.float16), "h"), "h")
    assert converted.flags.owndata and converted.dtype == np.float32


def test_strings_are_not_numbers() -> None:
    tensor = helper.make_tensor("s", TensorProto.STRING, [2], [b"a", b"b"])
    assert read_array(tensor, "tensor 's'").tolist() == ["a", "b"]
    with pytest.raises(OnnxladyError, match="tensor 's' of the suspect cannot be read as numbers"):
        read_float(tensor, "tensor 's' of the suspect")


# -- which tensors a model holds --------------------------------------------------------------
def _model_with_constants() -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "w")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full(2, 3.0, np.float32), "")),
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.zeros((2, 2), np.float32), "")),
        helper.make_node("Constant", [], ["f"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["custom"], domain="my.domain", value=numpy_helper.from_array(np.ones(2), "")),
        helper.make_node("MatMul", ["x", "w"], ["y0"]),
        helper.make_node("Add", ["y0", "c"], ["y1"]),
        helper.make_node("Mul", ["y1", "f"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])


def test_tensor_holders_finds_initializers_and_constant_values() -> None:
    model = _model_with_constants()
    holders = tensor_holders(model)
    assert list(holders) == ["w", "c"]  # not value_floats (no TensorProto), not another domain's Constant
    assert holders["w"] is not model.graph.node[1].attribute[0].t  # the initializer wins over a Constant
    assert read_array(holders["w"], "w").tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert read_array(holders["c"], "c").tolist() == [3.0, 3.0]
    # The protos are the model's own: writing to one changes the model.
    holders["c"].CopyFrom(numpy_helper.from_array(np.full(2, 7.0, np.float32), ""))
    assert numpy_helper.to_array(model.graph.node[0].attribute[0].t).tolist() == [7.0, 7.0]


def test_read_constants_reads_every_holder() -> None:
    model = _model_with_constants()
    arrays = read_constants(model, "reference")
    assert sorted(arrays) == ["c", "w"]
    assert arrays["w"].dtype == np.float32 and arrays["c"].tolist() == [3.0, 3.0]


# -- external data ----------------------------------------------------------------------------
def _unload(tensor: onnx.TensorProto) -> None:
    """Make ``tensor`` point to an external file that was never loaded."""
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")


def _vgg() -> onnx.ModelProto:
    return FIXTURES["vgg"](0)


def _first_conv_weight(model: onnx.ModelProto) -> onnx.TensorProto:
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    return tensor_holders(model)[conv.input[1]]


def test_external_data_is_detected() -> None:
    tensor = numpy_helper.from_array(np.ones(3, dtype=np.float32), "w")
    assert not is_external(tensor)
    require_loaded(tensor, "tensor 'w'")  # loaded: no error
    _unload(tensor)
    assert is_external(tensor)
    message = "tensor 'w' of the suspect still points to external data that was not loaded"
    for read in (require_loaded, read_array, read_float):
        with pytest.raises(OnnxladyError, match=message):
            read(tensor, "tensor 'w' of the suspect")


def test_external_data_is_refused_by_every_reader(tmp_path, monkeypatch) -> None:
    """The file the tensor names exists in the working directory: a reader that did not refuse
    would quietly read it (onnx resolves a relative location against the working directory).
    """
    model = _vgg()
    tensor = _first_conv_weight(model)
    name = tensor.name
    (tmp_path / "weights.bin").write_bytes(tensor.raw_data)
    monkeypatch.chdir(tmp_path)
    _unload(tensor)
    assert np.array_equal(numpy_helper.to_array(tensor), numpy_helper.to_array(_first_conv_weight(_vgg())))

    with pytest.raises(OnnxladyError, match=f"tensor '{name}' of the reference still points to external data"):
        read_constants(model, "reference")
    with pytest.raises(OnnxladyError, match=f"tensor '{name}' of the suspect still points to external data"):
        FloatConstants(model, "suspect").array(name)
    with pytest.raises(OnnxladyError, match=f"tensor '{name}' still points to external data"):
        _permute_tensor(tensor, [(0, np.arange(tensor.dims[0])[::-1])])
    with pytest.raises(OnnxladyError, match=f"tensor '{name}' of the suspect still points to external data"):
        resync_model(_vgg(), model)
    with pytest.raises(OnnxladyError, match="still points to external data"):
        audit_models(_vgg(), model)
    with pytest.raises(OnnxladyError, match="weights live in external files"):
        _model_source(model, "candidate")
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    with pytest.raises(OnnxladyError, match=f"weight '{name}' still points to external data"):
        embed_watermark(model, conv.name, 2, seed=0)


def test_loaded_models_are_read() -> None:
    """The same calls on the model before unloading: the refusals above are about external data."""
    model = _vgg()
    tensor = _first_conv_weight(model)
    assert read_constants(model, "reference")[tensor.name].shape == tuple(tensor.dims)
    assert FloatConstants(model, "suspect").array(tensor.name).dtype == np.float32
    assert resync_model(_vgg(), copy_model(model)).model is not None
    assert audit_models(_vgg(), copy_model(model)).verdict == "identical"


# -- the finite check -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "finite"),
    [
        (np.array([1.0, -2.0, 0.0], dtype=np.float32), True),
        (np.array([1e308, 1e308, -1e308], dtype=np.float64), True),  # the sum overflows, the values do not
        (np.array([65504.0, 65504.0], dtype=np.float16), True),  # likewise in float16's own range
        (np.array([1.0, np.nan], dtype=np.float32), False),
        (np.array([np.inf, -np.inf], dtype=np.float64), False),  # the sum is NaN
        (np.array([1.0, -np.inf], dtype=np.float16), False),
        (np.zeros(0, dtype=np.float32), True),
        (np.arange(4, dtype=np.int64), True),
    ],
)
def test_all_finite(values: np.ndarray, finite: bool) -> None:
    assert all_finite(values) is finite
    assert finite == bool(np.all(np.isfinite(values)))  # what it must agree with


def test_check_finite_only_checks_the_named_tensors() -> None:
    model = _model_with_constants()
    holders = tensor_holders(model)
    holders["c"].CopyFrom(numpy_helper.from_array(np.array([-np.inf, 0.0], dtype=np.float32), ""))
    values = FloatConstants(model, "reference")
    values.check_finite(["w"])  # an infinite constant that is not compared is allowed
    with pytest.raises(OnnxladyError, match="tensor 'c' of the reference holds NaN or Inf values"):
        values.check_finite(["w", "c"])
    holders["w"].CopyFrom(numpy_helper.from_array(np.array([[np.nan, 0.0], [0.0, 0.0]], dtype=np.float32), "w"))
    with pytest.raises(OnnxladyError, match="tensor 'w' of the suspect holds NaN or Inf values"):
        FloatConstants(model, "suspect").check_finite(["w"])


def test_float_constants_reads_each_tensor_once() -> None:
    values = FloatConstants(_model_with_constants(), "reference")
    assert values.array("w") is values.array("w")
    with pytest.raises(KeyError):
        values.array("missing")


# -- copies -----------------------------------------------------------------------------------
def test_copy_model_shares_nothing_with_its_original() -> None:
    original = _vgg()
    before = original.SerializeToString()
    clone = copy_model(original)
    assert clone is not original and clone.SerializeToString() == before
    # Changing the copy leaves the original alone...
    analysis = analyze(clone)
    permute_model(analysis, draw_permutations(analysis, 1))
    clone.graph.node[0].name = "renamed"
    assert clone.SerializeToString() != before
    assert original.SerializeToString() == before
    # ...and changing the original leaves the copy alone.
    copied = clone.SerializeToString()
    _first_conv_weight(original).raw_data = bytes(len(_first_conv_weight(original).raw_data))
    assert clone.SerializeToString() == copied


def test_one_copy_helper() -> None:
    assert onnxlady_testing.copy_model is copy_model is _files.copy_model


# -- attributes -------------------------------------------------------------------------------
def test_node_attribute_reads_values_and_defaults() -> None:
    node = helper.make_node("Gemm", ["a", "b"], ["y"], transB=1, alpha=0.5, perm=[1, 0], mode="x")
    assert node_attribute(node, "transB", 0) == 1
    assert node_attribute(node, "alpha") == pytest.approx(0.5)
    assert node_attribute(node, "perm") == [1, 0]
    assert node_attribute(node, "mode") == b"x"
    assert node_attribute(node, "transA", 0) == 0  # absent: the operator's default
    assert node_attribute(node, "beta") is None
    tensor = numpy_helper.from_array(np.ones(2, dtype=np.float32), "v")
    constant = helper.make_node("Constant", [], ["c"], value=tensor)
    assert numpy_helper.to_array(node_attribute(constant, "value")).tolist() == [1.0, 1.0]
