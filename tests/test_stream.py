"""onnxlady._io._stream: the streaming writer and the chunked reader give exactly protobuf's model.

``write_model`` writes fields in protobuf's own order, so its file is ``SerializeToString``'s
byte for byte (``test_written_bytes_are_protobufs_own``); the other tests compare files by
parsing them and serializing the parsed message. Every test also checks that the model
handed to ``write_model`` is left untouched (overrides must never be assigned into it).
"""

from __future__ import annotations

import ctypes
import io
import mmap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from onnx import TensorProto, helper, numpy_helper

import onnxlady._io._stream as stream
from fixtures import FIXTURES, RUNNABLE
from onnxlady._io._stream import Override, read_model, write_model
from onnxlady.testing import copy_model

Overrides = dict[str, bytes]


# -- helpers ------------------------------------------------------------------------------------
def parse(data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(data)
    return model


def written(model: onnx.ModelProto, overrides: Mapping[str, Override] | None = None) -> onnx.ModelProto:
    """``model`` through ``write_model`` (into memory) and back, checking it is left as it was."""
    before = model.SerializeToString()
    out = io.BytesIO()
    write_model(model, out, overrides=overrides)
    assert model.SerializeToString() == before, "write_model changed the in-memory model"
    return parse(out.getvalue())


def assert_same(actual: onnx.ModelProto, expected: onnx.ModelProto) -> None:
    assert actual.SerializeToString() == expected.SerializeToString()


def raw_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """(override name, tensor) of every main-graph initializer and Constant value in raw_data."""
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            yield tensor.name, tensor
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.HasField("raw_data"):
                    yield node.output[0], attribute.t


def reversed_elements(tensor: TensorProto) -> bytes:
    """The tensor's elements in reverse order: same length, same values (so still runnable)."""
    return numpy_helper.to_array(tensor).reshape(-1)[::-1].tobytes()


def permuted(model: onnx.ModelProto, keep: Callable[[TensorProto], bool] = lambda t: True) -> Overrides:
    return {name: reversed_elements(t) for name, t in raw_tensors(model) if keep(t)}


def applied(model: onnx.ModelProto, overrides: Overrides) -> onnx.ModelProto:
    """What the overrides mean, done the plain protobuf way on a copy."""
    expected = copy_model(model)
    for name, tensor in raw_tensors(expected):
        if name in overrides:
            tensor.raw_data = overrides[name]
    return expected


def run(model: onnx.ModelProto | str) -> list[np.ndarray]:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in value.shape]
        feeds[value.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return session.run(None, feeds)


@pytest.fixture(params=["plain", "big-tensor path", "no keep budget"])
def writer_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The writer's three ways to emit an item, forced on small models: serialized and kept;
    every raw tensor as header + raw_data read at write time; serialized twice (deferred).
    """
    if request.param == "big-tensor path":
        monkeypatch.setattr(stream, "_BIG_TENSOR", 0)
    elif request.param == "no keep budget":
        monkeypatch.setattr(stream, "_KEEP_BUDGET", 0)
        monkeypatch.setattr(stream, "_SMALL_PIECE", 16)  # many "big" pieces: one write each
    return request.param


def model_with_everything() -> onnx.ModelProto:
    """An If with a Constant and an initializer in each branch, a main-graph Constant, model and
    graph metadata_props, a local function, training info, a sparse initializer and an
    initializer in ``float_data`` (runnable by ONNX Runtime, valid for the checker).
    """
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])  # float_data

    def branch(name: str, value: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Constant", [], [f"{name}_c"], value=numpy_helper.from_array(np.full(4, value, np.float32))),
             helper.make_node("Add", [f"{name}_c", f"{name}_i"], [f"{name}_out"])],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [4])],
            initializer=[numpy_helper.from_array(np.full(4, -value, np.float32), f"{name}_i")],
        )  # fmt: skip

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["branch"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0)),
            helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(4, np.float32), "k")),
            helper.make_node("Mul", ["y", "k"], ["yk"]),
            helper.make_node("Add", ["yk", "branch"], ["out0"]),
            helper.make_node("Mul", ["out0", "typed_pad"], ["out"]),
        ],
        "everything",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
        initializer=[w, typed, numpy_helper.from_array(np.zeros((), np.float32), "zero"),
                     numpy_helper.from_array(np.ones(4, np.float32), "typed_pad")],
        sparse_initializer=[helper.make_sparse_tensor(
            helper.make_tensor("sp", TensorProto.FLOAT, [2], [5.0, 6.0]),
            helper.make_tensor("sp_idx", TensorProto.INT64, [2], [0, 3]), [4])],
        doc_string="main graph",
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    model.doc_string = "a model with everything"
    helper.set_model_props(model, {"author": "onnxlady", "license": "MIT"})
    graph_meta = model.graph.metadata_props.add()
    graph_meta.key, graph_meta.value = "graph-key", "graph-value"
    function = model.functions.add()
    function.CopyFrom(helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                           [helper.make_opsetid("", 17)]))  # fmt: skip
    training = model.training_info.add()
    training.initialization.CopyFrom(helper.make_graph([], "init", [], []))
    return model


# -- write_model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_round_trip_without_overrides(name: str, writer_mode: str) -> None:
    model = FIXTURES[name](0)
    assert_same(written(model), model)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_round_trip_with_overrides(name: str, writer_mode: str) -> None:
    model = FIXTURES[name](0)
    overrides = permuted(model)
    assert overrides
    assert_same(written(model, overrides), applied(model, overrides))


def test_constant_node_values_are_overridden() -> None:
    model = FIXTURES["constant_weights"](0)
    assert not model.graph.initializer
    overrides = permuted(model)
    assert "conv1.weight" in overrides
    result = written(model, overrides)
    assert_same(result, applied(model, overrides))
    (value,) = [n.attribute[0].t for n in result.graph.node if n.output[0] == "conv1.weight"]
    assert value.raw_data == overrides["conv1.weight"]


def test_float16_shared_initializer() -> None:
    model = FIXTURES["shared_initializer"](0)
    (fp16,) = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    overrides = {fp16.name: reversed_elements(fp16), "shared.zero_bias": np.arange(16, dtype=np.float32).tobytes()}
    assert_same(written(model, overrides), applied(model, overrides))


@pytest.mark.parametrize("name", ["vgg", "constant_weights", "shared_initializer", "bias_reshape"])
def test_written_file_checks_and_runs(name: str, tmp_path: Path) -> None:
    assert name in RUNNABLE
    model = FIXTURES[name](0)
    overrides = permuted(model, keep=lambda t: t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16))
    path = tmp_path / "out.onnx"
    write_model(model, path, overrides=overrides)
    expected = applied(model, overrides)
    assert_same(onnx.load(path), expected)
    onnx.checker.check_model(str(path))
    for got, want in zip(run(str(path)), run(expected), strict=True):
        np.testing.assert_array_equal(got, want)


def test_subgraphs_metadata_functions_training_info(writer_mode: str) -> None:
    model = model_with_everything()
    onnx.checker.check_model(model)
    assert_same(written(model), model)
    overrides = {"w": np.arange(12, dtype=np.float32)[::-1].copy().tobytes(), "k": np.full(4, 3, np.float32).tobytes()}
    result = written(model, overrides)
    assert_same(result, applied(model, overrides))
    assert {p.key: p.value for p in result.metadata_props} == {"author": "onnxlady", "license": "MIT"}
    assert result.graph.metadata_props[0].key == "graph-key" and len(result.functions) == 1
    then_branch = result.graph.node[3].attribute[0].g
    assert_same(then_branch, model.graph.node[3].attribute[0].g)  # type: ignore[arg-type]
    onnx.checker.check_model(result)
    np.testing.assert_array_equal(run(result)[0], run(applied(model, overrides))[0])


def test_typed_field_tensor_override_becomes_raw_data() -> None:
    model = model_with_everything()
    result = written(model, {"typed": np.array([7, 8, 9], np.float32).tobytes()})
    (typed,) = [t for t in result.graph.initializer if t.name == "typed"]
    assert not typed.float_data and typed.HasField("raw_data")
    np.testing.assert_array_equal(numpy_helper.to_array(typed), [7, 8, 9])
    assert typed.dims == [3] and typed.data_type == TensorProto.FLOAT


def test_callable_overrides_are_called_once_while_writing() -> None:
    model = FIXTURES["vgg"](0)
    eager = permuted(model)
    calls: list[str] = []

    def lazy(name: str) -> Override:
        def produce() -> memoryview:
            calls.append(name)
            return np.frombuffer(eager[name], dtype=np.float32).data  # float items: written as bytes

        return produce

    result = written(model, {name: lazy(name) for name in eager})
    assert sorted(calls) == sorted(eager)
    assert_same(result, applied(model, eager))


def test_callable_of_wrong_size_removes_the_partial_file(tmp_path: Path) -> None:
    model = FIXTURES["vgg"](0)
    name = next(iter(permuted(model)))
    path = tmp_path / "out.onnx"
    with pytest.raises(RuntimeError, match=name):
        write_model(model, path, overrides={name: lambda: b"\0"})
    assert not path.exists()


def test_bad_overrides_write_nothing(tmp_path: Path) -> None:
    model = FIXTURES["vgg"](0)
    name, tensor = next(raw_tensors(model))
    path = tmp_path / "out.onnx"
    with pytest.raises(KeyError, match="nowhere"):
        write_model(model, path, overrides={"nowhere": b""})
    with pytest.raises(KeyError, match="then_i"):  # subgraph initializers are not main-graph ones
        write_model(model_with_everything(), path, overrides={"then_i": b"\0" * 16})
    with pytest.raises(ValueError, match="bytes"):
        write_model(model, path, overrides={name: reversed_elements(tensor)[:-4]})
    with pytest.raises(ValueError, match="contiguous"):
        write_model(model, path, overrides={name: numpy_helper.to_array(tensor).T[::2]})  # type: ignore[dict-item]
    assert not path.exists()


def test_too_big_for_protobuf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(stream, "_PROTOBUF_LIMIT", 1000)
    with pytest.raises(ValueError, match="2 GiB"):
        write_model(FIXTURES["vgg"](0), tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_external_data_stays_external(tmp_path: Path) -> None:
    model = FIXTURES["vgg"](0)
    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(model, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)  # fmt: skip
    external = onnx.load(str(source), load_external_data=False)
    names = [t.name for t in external.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert names
    # Written next to the weights file: the references still resolve, nothing was inlined.
    target = source.parent / "copy.onnx"
    write_model(external, target)
    assert_same(onnx.load(str(target), load_external_data=False), external)
    assert target.stat().st_size < 10_000
    assert_same(onnx.load(str(target)), onnx.load(str(source)))
    assert_same(read_model(target), onnx.load(str(target)))
    assert_same(read_model(target, load_external_data=False), external)
    # An external tensor can get its data only through its file; another one can be overridden.
    with pytest.raises(ValueError, match="external"):
        write_model(external, tmp_path / "bad.onnx", overrides={names[0]: b""})


def test_unknown_fields_survive() -> None:
    """Fields from a newer onnx (unknown to this one) on every hand-encoded message are kept."""
    model = FIXTURES["constant_weights"](0)
    extra = stream._key(1000, 0) + stream._varint(300) + stream._key(1001, 2) + b"\x03abc"
    extra += stream._key(1002, 3) + stream._key(1, 5) + b"\1\2\3\4" + stream._key(1002, 4)
    extra += stream._key(1003, 1) + b"\x01" * 8
    model.MergeFromString(extra)
    model.graph.MergeFromString(extra)
    node = next(n for n in model.graph.node if n.op_type == "Constant")
    node.MergeFromString(extra)
    node.attribute[0].MergeFromString(extra)
    node.attribute[0].t.MergeFromString(extra)
    overrides = {node.output[0]: reversed_elements(node.attribute[0].t)}
    result = written(model, overrides)
    assert_same(result, applied(model, overrides))
    node = next(n for n in result.graph.node if n.op_type == "Constant")
    for message in (result, result.graph, node, node.attribute[0], node.attribute[0].t):
        assert len(UnknownFieldSet(message)) == 4


def test_field_numbers_match_onnx_proto() -> None:
    assert (stream._MODEL_GRAPH, stream._GRAPH_NODE, stream._GRAPH_INITIALIZER) == (7, 1, 5)
    assert (stream._NODE_ATTRIBUTE, stream._ATTR_T, stream._TENSOR_RAW_DATA) == (5, 5, 9)
    for value in (0, 1, 127, 128, 300, 2**31, 2**64 - 1):
        decoded, shift = 0, 0
        for byte in stream._varint(value):
            decoded |= (byte & 0x7F) << shift
            shift += 7
        assert decoded == value


# -- read_model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 300, 1 << 20])
def test_chunked_read_equals_protobuf(chunk: int, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    for name in ("vgg", "constant_weights", "mobilenet"):
        model = FIXTURES[name](0)
        onnx.save(model, str(path))
        assert_same(stream._read_chunked(path, chunk), model)
    model = model_with_everything()
    write_model(model, path)  # our own field order
    assert_same(stream._read_chunked(path, chunk), model)


def test_read_model_chunked_above_threshold(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(stream, "_WHOLE_FILE_BELOW", 0)
    monkeypatch.setattr(stream, "_READ_CHUNK", 1000)
    model = FIXTURES["resnet"](0)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert_same(read_model(path), onnx.load(str(path)))


def test_read_model_merges_repeated_fields_like_protobuf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two concatenated models parse as their merge (two graph fields included): so does ours."""
    monkeypatch.setattr(stream, "_WHOLE_FILE_BELOW", 0)
    data = FIXTURES["vgg"](0).SerializeToString() + FIXTURES["matmul_mlp"](0).SerializeToString()
    data += onnx.ModelProto(graph=onnx.GraphProto()).SerializeToString()  # an empty graph field
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    assert_same(stream._read_chunked(path, 100), parse(data))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(onnx.ModelProto(ir_version=8, graph=onnx.GraphProto()).SerializeToString())
    assert stream._read_chunked(empty).HasField("graph")


def test_read_model_damaged_file_raises_decode_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(stream, "_WHOLE_FILE_BELOW", 0)
    data = FIXTURES["vgg"](0).SerializeToString()
    path = tmp_path / "m.onnx"
    for damaged in (data[: len(data) // 2], data[:-1], b"\xff" * 64):
        path.write_bytes(damaged)
        with pytest.raises(DecodeError):
            read_model(path)


def test_parse_copies_the_buffer_it_is_given(tmp_path: Path) -> None:
    """Why read_model may reuse or free its chunk buffers: upb's parse never aliases them.
    An mmap is refused outright; a memoryview of one is copied, so unmapping it is safe.
    """
    tensor = numpy_helper.from_array(np.arange(4096, dtype=np.float32), "t")
    data = tensor.SerializeToString()
    buffer = bytearray(data)
    parsed = TensorProto()
    parsed.ParseFromString(buffer)
    buffer[-4096:] = b"\xee" * 4096
    assert parsed.SerializeToString() == data

    immutable = bytes(bytearray(data))  # a bytes object of its own, overwritten behind Python's back
    parsed = TensorProto()
    parsed.ParseFromString(immutable)
    address = ctypes.cast(ctypes.c_char_p(immutable), ctypes.c_void_p).value
    assert address is not None
    ctypes.memset(address + len(data) - 4096, 0xEE, 4096)
    assert immutable != data and parsed.SerializeToString() == data

    path = tmp_path / "t.pb"
    path.write_bytes(data)
    with open(path, "r+b") as handle:
        mapped = mmap.mmap(handle.fileno(), 0)
        with pytest.raises(TypeError):
            TensorProto().ParseFromString(mapped)  # type: ignore[arg-type]
        view = memoryview(mapped)
        parsed = TensorProto()
        parsed.ParseFromString(view)
        view.release()
        mapped[-4096:] = b"\xee" * 4096
        mapped.close()
    assert parsed.SerializeToString() == data


@pytest.mark.parametrize("name", ["vgg", "constant_weights", "shared_initializer"])
def test_written_bytes_are_protobufs_own(name: str, writer_mode: str) -> None:
    """The file is ``SerializeToString()``'s byte for byte, overrides applied (a resync's proof of sameness).

    Doc strings, domains and unknown fields sit on both sides of every field written by hand
    (a graph's nodes and initializers, a Constant's attribute, its tensor's ``raw_data``).
    """
    model = FIXTURES[name](0)
    model.doc_string, model.graph.doc_string = "model", "graph"
    extra = stream._key(1000, 0) + stream._varint(300) + stream._key(1001, 2) + b"\x03abc"
    for message in (model, model.graph):
        message.MergeFromString(extra)
    for node in model.graph.node:
        node.doc_string = "node"
        for attribute in node.attribute:
            attribute.doc_string = "attribute"
            if attribute.HasField("t"):
                attribute.t.doc_string = "tensor"
                attribute.t.MergeFromString(extra)
        if node.op_type == "Constant":
            node.domain = "ai.onnx"
            node.MergeFromString(extra)
    for tensor in model.graph.initializer:
        tensor.doc_string = "tensor"
        tensor.MergeFromString(extra)
    overrides = permuted(model)
    assert overrides
    for given in ({}, overrides):
        out = io.BytesIO()
        write_model(model, out, overrides=given)
        assert out.getvalue() == applied(model, given).SerializeToString()
