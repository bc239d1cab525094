"""Read a model's graph without its weights, and extend a model file without parsing it.

``onnx.load(path, load_external_data=False)`` still parses and copies every weight stored inside
the file (``raw_data``): for a command that needs only the graph (``verify`` reading the inputs,
outputs and small constants before ONNX Runtime opens the file itself) that is a full copy of
the model for nothing. :func:`read_graph` walks the protobuf wire format over a memory map of
the file and hands protobuf only the bytes around the weights: every tensor whose encoding is
larger than ``keep_bytes`` loses its data fields (``raw_data``, ``float_data``...), keeping its
name, type, dimensions and external-data location. The pages holding the weights are never
touched, so reading the graph costs time and memory in proportion to the graph, not the model.

:func:`with_graph_outputs` adds graph outputs to a model file's bytes by appending one small
``graph`` field: protobuf merges a message field that appears twice (repeated fields
concatenate), so the result parses as the model with the extra outputs, with no parse and no
re-serialization of the weights.

The walking itself (fields, where each tensor is, the bytes less some fields) is
:mod:`onnxlady._io._wire`'s; this module says which tensors are left out.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from typing import NamedTuple

import onnx

from onnxlady._io._wire import (
    CONSTANT,
    LEN,
    MODEL_GRAPH,
    TENSOR_DATA,
    TENSOR_NAME,
    Field,
    describe_tensor,
    length_field,
    message_fields,
    splice,
    tensor_spans,
)

__all__ = ["GraphOnly", "Payload", "read_graph", "read_without_payloads", "with_graph_outputs"]

#: Tensors up to this many encoded bytes keep their data: every small constant a graph reader
#: needs (shape targets, clip bounds: verify reads up to 4096 elements) stays readable.
KEEP_BYTES = 64 << 10


class GraphOnly:
    """A model read by :func:`read_graph`: the proto and the names of the tensors left without data."""

    def __init__(self, model: onnx.ModelProto, skimmed: set[str]) -> None:
        self.model = model
        #: Tensors (initializers, Constant values) whose data was not read.
        self.skimmed = skimmed


def _graph_only(view: memoryview, size: int, keep_bytes: int) -> GraphOnly:
    """The model in ``view[:size]``, every tensor of more than ``keep_bytes`` bytes without its data fields."""
    model = onnx.ModelProto()
    skimmed: set[str] = set()
    edits = []
    for span in tensor_spans(view, 0, size, min_bytes=keep_bytes + 1, everywhere=True):
        tensor = span.tensor
        kept = bytearray()
        for number, wire, field_start, payload, field_end in message_fields(view, tensor.payload, tensor.end):
            if number in TENSOR_DATA:
                continue
            if number == TENSOR_NAME and wire == LEN:
                skimmed.add(bytes(view[payload:field_end]).decode("utf-8", "replace"))
            kept += view[field_start:field_end]
        edits.append((span.path, bytes(kept)))
    data = b"".join(splice(view, 0, size, edits))  # the views of the map gone before it closes
    model.ParseFromString(data)
    return GraphOnly(model, skimmed)


def read_graph(path: str | os.PathLike[str], *, keep_bytes: int = KEEP_BYTES) -> GraphOnly:
    """The model in ``path`` with the data of its large tensors left unread.

    Args:
        path: an ONNX file (its external data, if any, is not read either).
        keep_bytes: tensors whose encoding is at most this many bytes keep their data.

    Returns:
        The model (every node, input, output, value info, attribute and small constant as
        :func:`onnx.load` gives them) and the names of the tensors left without data.

    Raises:
        ValueError: the file is not a well-formed protobuf message.
        google.protobuf.message.DecodeError: protobuf rejects the skimmed bytes.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return GraphOnly(onnx.ModelProto(), set())
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _graph_only(view, size, keep_bytes)
            finally:
                view.release()


def with_graph_outputs(model_bytes: bytes, names: Sequence[str]) -> bytes:
    """``model_bytes`` (a serialized ModelProto) with graph outputs ``names`` added (types left to the reader).

    The outputs are appended as a second ``graph`` field, which protobuf merges into the first:
    the weights are neither parsed nor copied, only the new tail is encoded.
    """
    if not names:
        return model_bytes
    extra = onnx.GraphProto()
    for name in names:
        extra.output.add().name = name
    payload = extra.SerializeToString()
    return model_bytes + length_field(MODEL_GRAPH, payload)


# -- payloads left in the file ------------------------------------------------------------------
#: Graph fields are handed to protobuf in runs of about this many bytes (memory stays bounded).
_MERGE_CHUNK = 4 << 20


class Payload(NamedTuple):
    """The ``raw_data`` of a main-graph tensor that :func:`read_without_payloads` left in the file."""

    #: Its position in ``model.graph.initializer``, or -1 for a Constant node's value.
    initializer: int
    #: For a Constant's value: the node's position in ``model.graph.node`` (else -1).
    node: int
    #: For a Constant's value: the attribute's position in the node (else -1).
    attribute: int
    #: Where its bytes start in the file.
    offset: int
    #: How many bytes it holds.
    length: int


def read_without_payloads(fileno: int, min_bytes: int) -> tuple[onnx.ModelProto, list[Payload]]:
    """The model in an open file, the ``raw_data`` of its large main-graph tensors left unread.

    Walks the wire format over a memory map of the file; protobuf parses everything else, in
    runs of graph fields (never the whole file at once). An initializer, or the ``value`` of a
    Constant node, whose single ``raw_data`` holds at least ``min_bytes`` is parsed without it,
    and its bytes' place is returned: its pages are never touched. Subgraphs and every other
    field are parsed as they are.

    Args:
        fileno: a file descriptor open for reading on the ONNX file.
        min_bytes: the smallest ``raw_data`` left in the file.

    Returns:
        The model (each initializer left in the file has no ``raw_data``) and where each
        such initializer's bytes are.

    Raises:
        ValueError: the file is not a well-formed protobuf message (truncated...).
        google.protobuf.message.DecodeError: protobuf rejects the bytes.
    """
    size = os.fstat(fileno).st_size
    model = onnx.ModelProto()
    payloads: list[Payload] = []
    if size == 0:
        return model, payloads
    with mmap.mmap(fileno, 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            pending = bytearray()  # top-level fields not merged yet
            for number, wire, field_start, _, field_end in message_fields(view, 0, size):
                if number == MODEL_GRAPH and wire == LEN:
                    if pending:
                        model.MergeFromString(pending)
                        pending = bytearray()
                    _merge_graph(model, view, field_start, field_end, min_bytes, payloads)
                else:
                    pending += view[field_start:field_end]
            if pending:
                model.MergeFromString(pending)
        finally:
            view.release()
    return model, payloads


def _merge_graph(
    model: onnx.ModelProto, view: memoryview, start: int, end: int, min_bytes: int, payloads: list[Payload]
) -> None:
    """Merge the graph field in ``[start, end)`` into ``model`` in runs, large payloads left out.

    protobuf merges a message field seen several times (repeated fields concatenate in order),
    so each run is parsed as a graph of its own, merged into ``model.graph``.
    """
    initializers = len(model.graph.initializer)  # a second graph field continues the lists
    nodes = len(model.graph.node)
    edits: list[tuple[tuple[Field, ...], bytes | None]] = []
    for span in tensor_spans(view, start, end, min_bytes=min_bytes):
        tensor = span.tensor
        if tensor.end - tensor.payload < min_bytes:
            continue
        layout = describe_tensor(view, tensor.payload, tensor.end)
        raw = layout.raw
        if not layout.plain or raw is None or raw.end - raw.payload < min_bytes:
            continue
        # graph > initializer > raw_data, or graph > node > attribute > tensor > raw_data: each
        # field re-encoded shorter, the payload's bytes left out.
        edits.append(((*span.path[1:], raw), None))
        if span.where == CONSTANT:
            payloads.append(Payload(-1, nodes + span.node, span.attribute, raw.payload, raw.end - raw.payload))
        else:
            payloads.append(Payload(initializers + span.initializer, -1, -1, raw.payload, raw.end - raw.payload))
    graph = model.graph
    graph.SetInParent()  # an empty graph is still a present graph
    field = Field(*message_fields(view, start, end)[0])
    pieces = splice(view, field.payload, field.end, edits)
    run = bytearray()
    try:
        for index in range(len(pieces)):  # no name holds a view of the map: it closes after an error too
            if len(pieces[index]) >= _MERGE_CHUNK:  # whole fields left as they are: parsed where they lie
                if run:
                    graph.MergeFromString(run)
                    run = bytearray()
                graph.MergeFromString(pieces[index])
                continue
            run += pieces[index]
            if len(run) >= _MERGE_CHUNK:
                graph.MergeFromString(run)
                run = bytearray()
        if run:
            graph.MergeFromString(run)
    finally:
        pieces.clear()
