"""The protobuf wire walker shared by the readers that leave weights in the file (onnxlady._io._wire)."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from onnxlady._io._skim import read_graph, read_without_payloads
from onnxlady._io._wire import (
    ATTRIBUTE,
    CONSTANT,
    INITIALIZER,
    MODEL_GRAPH,
    describe_tensor,
    length_field,
    message_fields,
    splice,
    tensor_spans,
)
from onnxlady._provenance._wire import read_weights

_FIXTURES = ["vgg", "resnet", "matmul_mlp", "constant_weights", "if_branch", "bert_like", "lstm_head"]


def _only(message: onnx.ModelProto | onnx.GraphProto, keep: str) -> bytes:
    """``message`` serialized with only its field ``keep``."""
    copy = type(message)()
    copy.CopyFrom(message)
    for field, _ in message.ListFields():
        if field.name != keep:
            copy.ClearField(field.name)
    return copy.SerializeToString()


def _reordered(model: onnx.ModelProto) -> bytes:
    """``model``'s bytes with its fields in another order than onnx.save's (field number order).

    The graph's kinds of field come last-numbered first (outputs, inputs, initializers, then
    nodes), the graph stands between the model's other fields: each repeated field keeps its own
    order, so the bytes parse as ``model``.
    """
    graph = b"".join(_only(model.graph, field.name) for field, _ in reversed(model.graph.ListFields()))
    top = [_only(model, field.name) for field, _ in model.ListFields() if field.name != "graph"]
    return b"".join(reversed(top[:2])) + length_field(MODEL_GRAPH, graph) + b"".join(top[2:])


def _constant_model() -> onnx.ModelProto:
    """A MatMul by a large Constant node's value, beside a large initializer."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])
    values = (np.arange(256 * 256, dtype=np.float32).reshape(256, 256) / 1e4).astype(np.float32)
    constant = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(values, "w"))
    nodes = [constant, helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    bias = numpy_helper.from_array(np.linspace(-1, 1, 256 * 64, dtype=np.float32).reshape(64, 256)[:1], "b")
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tensor(data: bytes, span_field: tuple[int, ...]) -> TensorProto:
    """The TensorProto whose field is ``span_field`` (a Field) in ``data``."""
    return TensorProto.FromString(data[span_field[3] : span_field[4]])


@pytest.mark.parametrize("name", _FIXTURES)
def test_spans_are_the_initializers_and_constants_onnx_load_gives(name: str) -> None:
    model = FIXTURES[name](0)
    data = model.SerializeToString()
    view = memoryview(data)
    spans = tensor_spans(view, 0, len(data))
    initializers = [span for span in spans if span.where == INITIALIZER]
    assert [span.initializer for span in initializers] == list(range(len(model.graph.initializer)))
    for span in initializers:
        assert _tensor(data, span.tensor) == model.graph.initializer[span.initializer]
        assert span.depth == 0 and span.path[0][0] == MODEL_GRAPH
    constants = [span for span in spans if span.where == CONSTANT]
    expected = [
        (index, position)
        for index, node in enumerate(model.graph.node)
        if node.op_type == "Constant"
        for position, attribute in enumerate(node.attribute)
        if attribute.name == "value"
    ]
    assert [(span.node, span.attribute) for span in constants] == expected
    for span in constants:
        assert _tensor(data, span.tensor) == model.graph.node[span.node].attribute[span.attribute].t


def test_a_wrong_span_is_caught() -> None:
    """The comparison above can fail: a span one initializer off is not that initializer."""
    model = FIXTURES["vgg"](0)
    data = model.SerializeToString()
    spans = [span for span in tensor_spans(memoryview(data), 0, len(data)) if span.where == INITIALIZER]
    assert _tensor(data, spans[1].tensor) != model.graph.initializer[0]


def test_constant_values_are_found_only_from_min_bytes_on() -> None:
    model = _constant_model()
    data = model.SerializeToString()
    view = memoryview(data)
    found = [span for span in tensor_spans(view, 0, len(data), min_bytes=1 << 16) if span.where == CONSTANT]
    assert [(span.node, span.attribute) for span in found] == [(0, 0)]
    assert numpy_helper.to_array(_tensor(data, found[0].tensor)).shape == (256, 256)
    assert not [span for span in tensor_spans(view, 0, len(data), min_bytes=1 << 20) if span.where == CONSTANT]
    assert not [span for span in tensor_spans(view, 0, len(data), constants=False) if span.where == CONSTANT]


def test_everywhere_finds_the_tensors_of_subgraphs() -> None:
    model = FIXTURES["if_branch"](0)
    data = model.SerializeToString()
    spans = tensor_spans(memoryview(data), 0, len(data), everywhere=True)
    nested = [span for span in spans if span.depth > 0]
    inner = [
        tensor
        for node in model.graph.node
        for attribute in node.attribute
        if attribute.HasField("g")
        for tensor in [
            *attribute.g.initializer,
            *(a.t for n in attribute.g.node for a in n.attribute if a.HasField("t")),
        ]
    ]
    assert inner, "the fixture has tensors in its branches"
    assert sorted(_tensor(data, span.tensor).SerializeToString() for span in nested) == sorted(
        tensor.SerializeToString() for tensor in inner
    )
    assert all(span.where in (INITIALIZER, ATTRIBUTE) for span in nested)


@pytest.mark.parametrize("name", _FIXTURES)
def test_describe_reads_what_protobuf_reads(name: str) -> None:
    model = FIXTURES[name](0)
    data = model.SerializeToString()
    view = memoryview(data)
    for span in tensor_spans(view, 0, len(data)):
        tensor = _tensor(data, span.tensor)
        layout = describe_tensor(view, span.tensor.payload, span.tensor.end)
        assert layout.dims == list(tensor.dims)
        assert layout.data_type == tensor.data_type
        assert layout.name is not None and data[layout.name[0] : layout.name[1]].decode() == tensor.name
        assert layout.plain == tensor.HasField("raw_data")
        if layout.raw is not None:
            assert data[layout.raw.payload : layout.raw.end] == tensor.raw_data


def test_describe_tells_other_storage_apart() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    typed = helper.make_tensor("t", TensorProto.FLOAT, [2, 3], values.ravel().tolist())
    external = numpy_helper.from_array(values, "e")
    onnx.external_data_helper.set_external_data(external, "w.bin", 0, 24)
    external.data_location = TensorProto.EXTERNAL
    external.ClearField("raw_data")
    stated = numpy_helper.from_array(values, "d")
    stated.data_location = TensorProto.DEFAULT
    for tensor, plain, outside in ((typed, False, False), (external, False, True), (stated, True, False)):
        data = tensor.SerializeToString()
        layout = describe_tensor(memoryview(data), 0, len(data))
        assert (layout.plain, layout.external) == (plain, outside), tensor.name


@pytest.mark.parametrize("name", _FIXTURES)
def test_splice_without_raw_data_is_the_model_without_it(name: str) -> None:
    model = FIXTURES[name](0)
    data = model.SerializeToString()
    view = memoryview(data)
    edits = []
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    for span in tensor_spans(view, 0, len(data)):
        raw = describe_tensor(view, span.tensor.payload, span.tensor.end).raw
        if raw is None:
            continue
        edits.append(((*span.path, raw), None))
        if span.where == INITIALIZER:
            expected.graph.initializer[span.initializer].ClearField("raw_data")
        else:
            expected.graph.node[span.node].attribute[span.attribute].t.ClearField("raw_data")
    assert edits
    skeleton = b"".join(splice(view, 0, len(data), edits))
    assert len(skeleton) < len(data)
    assert onnx.ModelProto.FromString(skeleton) == expected
    assert onnx.ModelProto.FromString(skeleton) != model  # the check can fail


def test_splice_gives_a_field_a_new_payload_and_refuses_disorder() -> None:
    model = FIXTURES["matmul_mlp"](0)
    data = model.SerializeToString()
    view = memoryview(data)
    span = tensor_spans(view, 0, len(data))[0]
    renamed = onnx.TensorProto()
    renamed.CopyFrom(model.graph.initializer[0])
    renamed.name = "a much longer name than the one it had"
    out = onnx.ModelProto.FromString(b"".join(splice(view, 0, len(data), [(span.path, renamed.SerializeToString())])))
    assert out.graph.initializer[0] == renamed
    assert list(out.graph.initializer[1:]) == list(model.graph.initializer[1:])
    assert b"".join(splice(view, 0, len(data), [])) == data
    spans = tensor_spans(view, 0, len(data))
    with pytest.raises(ValueError, match="order"):
        splice(view, 0, len(data), [(spans[1].path, None), (spans[0].path, None)])


@pytest.mark.parametrize("name", ["constant_weights", "vgg", "if_branch", "resnet"])
def test_a_field_order_other_than_onnx_save_reads_the_same(name: str, tmp_path: Path) -> None:
    model = FIXTURES[name](0)
    data = _reordered(model)
    assert data != model.SerializeToString() and onnx.ModelProto.FromString(data) == model
    spans = [span for span in tensor_spans(memoryview(data), 0, len(data)) if span.where == INITIALIZER]
    assert [_tensor(data, span.tensor) for span in spans] == list(model.graph.initializer)
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    skimmed = read_weights(data)
    assert skimmed.arrays or not model.graph.initializer
    for tensor in model.graph.initializer:
        if tensor.name in skimmed.arrays:
            assert np.array_equal(skimmed.arrays[tensor.name], numpy_helper.to_array(tensor))
    assert read_graph(path, keep_bytes=1 << 30).model == model
    with open(path, "rb") as handle:
        _, payloads = read_without_payloads(handle.fileno(), 256)
    assert payloads
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        for payload in payloads:
            tensor = model.graph.initializer[payload.initializer] if payload.initializer >= 0 else None
            if tensor is None:
                tensor = model.graph.node[payload.node].attribute[payload.attribute].t
            assert mapped[payload.offset : payload.offset + payload.length] == tensor.raw_data


def test_a_constant_left_in_the_file_after_reordering(tmp_path: Path) -> None:
    model = _constant_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(_reordered(model))
    with open(path, "rb") as handle:
        read, payloads = read_without_payloads(handle.fileno(), 1 << 16)
    assert [(p.initializer, p.node, p.attribute) for p in payloads] == [(-1, 0, 0)]
    assert not read.graph.node[0].attribute[0].t.raw_data
    read.graph.node[0].attribute[0].t.raw_data = path.read_bytes()[payloads[0].offset :][: payloads[0].length]
    assert read == model


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9, 0.999])
def test_truncated_bytes_are_a_truncated_message(fraction: float) -> None:
    data = FIXTURES["vgg"](0).SerializeToString()
    cut = data[: int(len(data) * fraction)]
    with pytest.raises(ValueError, match="truncated message"):
        tensor_spans(memoryview(cut), 0, len(cut), everywhere=True)
    with pytest.raises(ValueError, match="truncated message"):
        read_weights(cut)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x08\x96", "truncated message"),  # a varint cut at the end
        (b"\x12\x05ab", "truncated message"),  # a length past the end
        (b"\x0b\x00", "unsupported wire type 3"),  # a group
        (b"\x08" + b"\xff" * 10 + b"\x01", "malformed varint"),  # over 64 bits
    ],
)
def test_corrupt_bytes_are_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        message_fields(memoryview(data), 0, len(data))


def test_packed_dims_past_their_field_are_refused() -> None:
    tensor = numpy_helper.from_array(np.zeros((2, 3), np.float32), "t").SerializeToString()
    packed = length_field(onnx.TensorProto.DESCRIPTOR.fields_by_name["dims"].number, b"\x02\x83")
    data = packed + tensor
    with pytest.raises(ValueError, match="truncated message"):
        describe_tensor(memoryview(data), 0, len(data))
