"""Permute and unpermute of a deep graph walk it a fixed number of times (issue 15: both near their floor).

What session 18 took out of a 20k-node permute and unpermute, each guarded by a count (of walks,
calls, messages formatted), not by seconds, and each failing with its change reverted:

- a small tensor is moved with one ``take`` per axis (the folded gather cost a dozen numpy calls);
- a key file without escapes is measured for nesting without the string pattern;
- reading a key formats no check's message for well-formed records (a few per record before);
- unpermute lists the model's constants once (three walks before), builds no name sets for a key
  that untied nothing, and leaves the graph's nodes alone when nothing was untied;
- writing a model lists its tensors once (onnx's generator walked them three times);
- the key's text finds its version while it is written (``to_json`` walked every record for it).

Each fast path is also checked against what it replaces: the same bytes, depths, errors and text.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

import onnxlady
from fixtures import FIXTURES, build_deep_model
from onnxlady import OnnxladyError
from onnxlady._api import _sources
from onnxlady._api._sources import key_text
from onnxlady._io import _external, _inputs, _outputs
from onnxlady._io._inputs import json_depth
from onnxlady._transforms import _key, _permute
from onnxlady._transforms._key import PermutationKey, graph_fingerprint
from onnxlady._transforms._permute import _is_permutation, _take_axes, unpermute_model


# -- moving small tensors ------------------------------------------------------------------
def _folded(array: np.ndarray, axes: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """The reference: chained ``np.take``, one axis after the other."""
    for axis, index in axes:
        array = np.take(array, index, axis=axis)
    return array


def _moving(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random permutation that moves something (when ``size`` > 1)."""
    perm = rng.permutation(size)
    return perm[::-1].copy() if size > 1 and np.array_equal(perm, np.arange(size)) else perm


@pytest.mark.parametrize(
    "shape", [(16,), (16, 16), (16, 32), (8, 4, 3, 3), (300, 300), (64, 64, 3, 3), (2, 0, 3), (1,)]
)
def test_moved_elements_are_those_of_one_take_per_axis(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    array = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
    for count in range(1, len(shape) + 1):
        axes = [(axis, _moving(rng, shape[axis])) for axis in sorted(rng.choice(len(shape), count, replace=False))]
        moved = _take_axes(array, axes)
        assert moved.shape == array.shape and moved.dtype == array.dtype
        assert np.array_equal(moved, _folded(array, axes))
        if array.size and any(len(index) > 1 for _, index in axes):
            assert not np.array_equal(moved, array)  # something moved: the comparison above can fail


def test_an_index_that_does_not_fit_its_axis_is_refused_on_both_paths() -> None:
    for shape in [(16, 16), (300, 300)]:  # one take per axis, and the folded gather
        with pytest.raises(ValueError):
            _take_axes(np.zeros(shape, np.float32), [(0, np.arange(shape[0] - 1))])


class _CountingNumpy:
    """The numpy module as ``_permute`` sees it, counting the module-level functions called."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        value = getattr(np, name)
        if callable(value) and not isinstance(value, type):

            def counted(*args: object, **kwargs: object) -> object:
                self.calls.append(name)
                return value(*args, **kwargs)

            return counted
        return value


def test_a_small_tensor_is_moved_without_numpy_module_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _CountingNumpy()
    monkeypatch.setattr(_permute, "np", counting)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 16)).astype(np.float32)
    axes = [(0, rng.permutation(16)), (1, rng.permutation(16))]
    moved = _take_axes(weight, axes)
    # The folded gather made a dozen (dtype, ascontiguousarray, zeros, arange, asarray, take...).
    assert counting.calls == []
    assert np.array_equal(moved, weight[axes[0][1]][:, axes[1][1]])


def test_is_permutation_agrees_with_numpy() -> None:
    rng = np.random.default_rng(0)
    cases = [np.arange(0), np.arange(1), rng.permutation(16), rng.permutation(300), np.array([0, 0, 2]),
             np.array([1, 2, 3]), np.array([-1, 0, 1]), np.array([2, 0, 1], dtype=np.uint8)]  # fmt: skip
    for perm in cases:
        expected = bool(np.array_equal(np.sort(perm), np.arange(perm.size)))
        assert _is_permutation(perm) == expected, perm


# -- reading a key -----------------------------------------------------------------------------
def _reference_depth(raw: bytes) -> int:
    """Nesting depth by a character-by-character scan (strings and their escapes skipped)."""
    depth = deepest = 0
    inside = escaped = False
    for byte in raw:
        char = chr(byte)
        if inside:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                inside = False
        elif char == '"':
            inside = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def test_json_depth_ignores_brackets_in_strings_with_and_without_escapes() -> None:
    documents = [
        b"", b"1", b"[]", b"[[[]]]", b'{"a": [1, {"b": []}]}', b'["[[[[", "]]"]', b'["a\\"[[[", 1]',
        b'{"x": "\\\\", "y": [[["]"]]]}', b'["{", ["}"], [[""]]]', b'"[[[["', b"]]][[",
        json.dumps({"tensors": [{"tensor": "w[0]", "axes": [{"expr": {"group": "g{1}"}}]}]}).encode(),
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b'[]{}"a,: ', dtype=np.uint8)  # well-formed or not, no escapes
    documents += [rng.choice(alphabet, size=int(rng.integers(0, 40))).tobytes() for _ in range(2000)]
    for raw in documents:
        if raw.count(b'"') % 2 == 0:  # (an unclosed string: the pattern leaves it as text)
            assert json_depth(raw) == _reference_depth(raw), raw
    assert json_depth(b'["[["]') == 1
    assert json_depth(b'[["[["]]') == 2


def test_a_key_without_escapes_is_measured_without_the_string_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[int] = []
    pattern = _inputs._STRING

    class Counted:
        def sub(self, replacement: bytes, raw: bytes) -> bytes:
            used.append(len(raw))
            return pattern.sub(replacement, raw)

    monkeypatch.setattr(_inputs, "_STRING", Counted())
    text = key_text(onnxlady.permute(build_deep_model(60), seed=1).key).encode()
    assert b"\\" not in text
    assert json_depth(text) == _reference_depth(text) == 6
    assert used == []
    # With an escape the pattern reads the strings (a quote inside one must not end it).
    assert json_depth(b'["\\"[[", [1]]') == 2 and used


def test_reading_a_key_formats_no_message_for_well_formed_records(monkeypatch: pytest.MonkeyPatch) -> None:
    document = json.loads(key_text(onnxlady.permute(build_deep_model(300), seed=1).key))
    assert len(document["groups"]) > 40 and len(document["tensors"]) > 100
    checks: list[str] = []
    for name in ("integer", "text", "array", "mapping"):
        original = getattr(_key._Schema, name)

        def counted(self: object, value: object, what: str, *args: object, _original=original, **kw: object) -> object:
            checks.append(what)
            return _original(self, value, what, *args, **kw)

        monkeypatch.setattr(_key._Schema, name, counted)
    key = PermutationKey.from_json(document)
    assert key.to_json() == document
    # The document's own fields only (source, permuted, the lists, the digests): none per group, tensor or entry.
    assert len(checks) <= 16, checks  # 14: format, digests, seed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["groups"][0]["perm"].__setitem__(0, True), "is True, not a whole number"),
        (lambda d: d["groups"][0]["perm"].__setitem__(0, 1.0), "is 1.0, not a whole number"),
        (lambda d: d["groups"][0]["perm"].__setitem__(0, -1), "is -1, outside"),
        (lambda d: d["groups"][0].__setitem__("size", "16"), "the size of group g0 is '16'"),
        (lambda d: d["groups"][0].__setitem__("size", True), "the size of group g0 is True"),
        (lambda d: d["groups"][0].__setitem__("id", 3), "the id of group #0 is 3"),
        (lambda d: d["groups"][0].__setitem__("perm", (1, 0)), "the permutation of group g0 is"),
        (lambda d: d["groups"][0].__setitem__("members", {}), "the members of group g0 is"),
        (lambda d: d["groups"].__setitem__(0, [1]), "group #0 is [1], not an object"),
        (lambda d: d["tensors"][0].__setitem__("tensor", 7), "a tensor name is 7"),
        (lambda d: d["tensors"][0].__setitem__("source", None), "the source of tensor"),
        (lambda d: d["tensors"][0].__setitem__("axes", {}), "the axes of tensor"),
        (lambda d: d["tensors"][0]["axes"].__setitem__(0, 0), "an axis of tensor"),
        (lambda d: d["tensors"][0]["axes"][0].__setitem__("axis", 64), "is 64, outside"),
        (lambda d: d["tensors"][0]["axes"][0].__setitem__("axis", False), "is False, not a whole number"),
        (lambda d: d["tensors"].__setitem__(0, "w"), "a tensor entry is 'w', not an object"),
    ],
)
def test_a_malformed_record_is_still_refused_by_name(change, message: str) -> None:  # type: ignore[no-untyped-def]
    document = json.loads(key_text(onnxlady.permute(build_deep_model(60), seed=1).key))
    PermutationKey.from_json(json.loads(json.dumps(document)))  # as written: read
    change(document)
    with pytest.raises(OnnxladyError, match=re.escape(message)):
        PermutationKey.from_json(document, "k.json")


# -- unpermute --------------------------------------------------------------------------------
def test_unpermute_lists_the_constants_once_and_leaves_the_nodes_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    source = build_deep_model(120)
    result = onnxlady.permute(source, seed=1)
    assert not result.key.untied
    permuted = result.model
    walks: list[bool] = []
    original = _permute._tensor_holders

    def counted(model: onnx.ModelProto, *, subgraphs: bool = True) -> dict[str, onnx.TensorProto]:
        walks.append(subgraphs)
        return original(model, subgraphs=subgraphs)

    monkeypatch.setattr(_permute, "_tensor_holders", counted)
    monkeypatch.setattr(_key, "tensor_holders", counted)
    first = permuted.graph.node[0]
    assert unpermute_model(permuted, result.key)
    assert len(walks) == 1  # three before: the fit check, the restore, the streamable ones
    # No copy to remove: the node list is not rebuilt (a rebuild detaches every node).
    assert permuted.graph.node[0] is first
    assert [t.raw_data for t in permuted.graph.initializer] == [t.raw_data for t in source.graph.initializer]


def test_a_key_that_untied_constants_is_still_undone_with_its_copies_removed() -> None:
    from fixtures.deployment import build_shared_bias_untied

    source = build_shared_bias_untied(0)
    result = onnxlady.permute(source, seed=1)
    assert result.key.untied
    restored = onnx.ModelProto()
    restored.CopyFrom(result.model)
    assert len(restored.graph.initializer) > len(source.graph.initializer)
    assert unpermute_model(restored, result.key)
    assert restored.SerializeToString() == source.SerializeToString()


def test_a_model_with_bodies_is_unpermuted_with_their_constants() -> None:
    source = FIXTURES["if_branch"](0)
    result = onnxlady.permute(source, seed=1)
    restored = onnx.ModelProto()
    restored.CopyFrom(result.model)
    assert restored.SerializeToString() != source.SerializeToString()
    assert unpermute_model(restored, result.key)
    assert restored.SerializeToString() == source.SerializeToString()


# -- writing ----------------------------------------------------------------------------------
def test_writing_a_model_lists_its_tensors_once(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = build_deep_model(120)
    onnx_walks: list[int] = []
    original = onnx.external_data_helper._get_all_tensors

    def counted(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
        onnx_walks.append(1)
        return original(model)

    monkeypatch.setattr(onnx.external_data_helper, "_get_all_tensors", counted)
    listings: list[int] = []
    listed = _external.model_tensors

    def counted_listing(model: onnx.ModelProto) -> list[onnx.TensorProto]:
        listings.append(1)
        return listed(model)

    monkeypatch.setattr(_outputs, "model_tensors", counted_listing)
    with _outputs.OutputSet() as outputs:
        sha = outputs.write_model(tmp_path / "m.onnx", model, digest=True)
    assert onnx_walks == [] and listings == [1]  # onnx's generator walked them three times
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()
    assert sha == __import__("hashlib").sha256(model.SerializeToString()).hexdigest()


def test_estimated_size_and_mapped_tensors_read_the_listed_tensors() -> None:
    model = FIXTURES["if_branch"](0)
    tensors = _external.model_tensors(model)
    expected = sum(
        int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        for t in onnx.external_data_helper._get_all_tensors(model)
    )
    assert _outputs._estimated_size(model, tensors) == _outputs._estimated_size(model) == expected > 0
    assert not _external.has_mapped(model, tensors) and not _external.has_mapped_external(model, tensors)


# -- the graph fingerprint ------------------------------------------------------------------
def _reference_fingerprint(model: onnx.ModelProto) -> str:
    """The fingerprint as keys of earlier sessions recorded it (lists made with list())."""
    import hashlib

    lines = [f"opset:{opset}\n".encode() for opset in sorted((op.domain, op.version) for op in model.opset_import)]

    def walk(graph: onnx.GraphProto) -> None:
        lines.extend(f"in:{value.name}\n".encode() for value in graph.input)
        lines.extend(f"out:{value.name}\n".encode() for value in graph.output)
        for tensor in graph.initializer:
            lines.append(f"init:{tensor.name}:{tensor.data_type}:{list(tensor.dims)}\n".encode())
        for node in graph.node:
            lines.append(f"node:{node.domain}:{node.op_type}:{list(node.input)}:{list(node.output)}\n".encode())
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    lines.append(f"attr:{attribute.name}:{attribute.t.data_type}:{list(attribute.t.dims)}\n".encode())
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    lines.append(f"attr:{attribute.name}:graph\n".encode())
                    walk(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for subgraph in attribute.graphs:
                        walk(subgraph)
                else:
                    lines.append(b"attr:" + attribute.SerializeToString() + b"\n")

    walk(model.graph)
    return hashlib.sha256(b"".join(lines)).hexdigest()


@pytest.mark.parametrize("name", ["if_branch", "grouped_conv", "shared_initializer", "tied_lm_head"])
def test_the_fingerprint_is_the_one_keys_recorded(name: str) -> None:
    model = FIXTURES[name](0)
    assert graph_fingerprint(model) == _reference_fingerprint(model)
    # Odd names (quotes, backslashes, non-ASCII) are written as list() writes them.
    model.graph.node[0].input[0] = "it's \"odd\" \\ é\x01"
    model.graph.node[0].output.append("")
    changed = graph_fingerprint(model)
    assert changed == _reference_fingerprint(model)
    model.graph.node[0].output[-1] = "x"
    assert graph_fingerprint(model) != changed  # the fingerprint reads the names: it can differ


# -- the key's text -------------------------------------------------------------------------------
def _grouped_tree() -> dict[str, object]:
    return {"grouped": {"of": {"group": "g0"}, "blocks": [{"identity": 2}, {"identity": 2}]}}


def test_the_key_text_finds_its_version_without_a_second_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    key = onnxlady.permute(build_deep_model(60), seed=1).key
    expected_v1 = json.dumps(key.to_json(), indent=1) + "\n"
    walks: list[int] = []
    original = _key._holds_grouped

    def counted(value: object) -> bool:
        walks.append(1)
        return original(value)

    monkeypatch.setattr(_key, "_holds_grouped", counted)
    assert key_text(key) == expected_v1
    key.tensors[-1]["axes"][0]["expr"] = _grouped_tree()
    text = key_text(key)
    assert walks == []  # to_json walks every record for its version: the writer finds it as it writes
    assert json.loads(text)["version"] == 2
    monkeypatch.setattr(_key, "_holds_grouped", original)
    assert text == json.dumps(key.to_json(), indent=1) + "\n"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"kv_state": [{"input": "past", "axes": [{"axis": 1, "expr": _grouped_tree()}]}]},  # version 2
        {"grouped": 1},  # an extra record named so: version 2, as to_json says
        {"note": ({"grouped": 1},)},  # inside a tuple: to_json does not look there, version 1
        {"note": [[{"x": {"grouped": None}}]]},
        {"seed": 5},  # an extra field replacing a fixed one: the document as to_json makes it
        {"version": 7},
        {3: "an int name"},
        {"note": {1: "an int key inside"}},
    ],
)
def test_the_key_text_is_json_dumps_of_to_json(extra: dict[object, object]) -> None:
    key = onnxlady.permute(build_deep_model(60), seed=1).key
    key.extra = extra  # type: ignore[assignment]
    assert key_text(key) == json.dumps(key.to_json(), indent=1) + "\n"
    key.tensors[0]["axes"][0]["expr"] = _grouped_tree()
    assert key_text(key) == json.dumps(key.to_json(), indent=1) + "\n"
    assert key.to_json()["version"] == (7 if extra == {"version": 7} else 2)


def _set_expr(expr: object):  # type: ignore[no-untyped-def]
    return lambda tensors: tensors[0]["axes"][0].__setitem__("expr", expr)


@pytest.mark.parametrize(
    "change",
    [
        lambda tensors: tensors[0].update(note=1),  # a field more
        lambda tensors: tensors.__setitem__(0, dict(reversed(list(tensors[0].items())))),  # fields in another order
        lambda tensors: tensors[0].__setitem__("axes", []),
        lambda tensors: tensors[0]["axes"].append({"axis": 1, "expr": {"identity": 16}}),
        lambda tensors: tensors[0]["axes"][0].__setitem__("axis", True),
        lambda tensors: tensors[0].__setitem__("tensor", 'é "q" \\ \n'),
        _set_expr({"identity": 5}),
        _set_expr({"identity": True}),
        _set_expr({"group": 3}),
        _set_expr({}),
        _set_expr({"sum": [{"group": "g0"}, {"identity": 2}]}),
        _set_expr(_grouped_tree()),
        lambda tensors: tensors.append("a name"),
        lambda tensors: tensors.__setitem__(slice(None), [1, 2]),
        lambda tensors: tensors.__setitem__(slice(None), []),
    ],
)
def test_each_kind_of_tensor_record_is_written_as_json_dumps_writes_it(change) -> None:  # type: ignore[no-untyped-def]
    key = onnxlady.permute(build_deep_model(60), seed=1).key
    text = key_text(key)
    change(key.tensors)
    assert key_text(key) == json.dumps(key.to_json(), indent=1) + "\n" != text


def test_common_tensor_records_are_written_without_a_call_each(monkeypatch: pytest.MonkeyPatch) -> None:
    key = onnxlady.permute(build_deep_model(300), seed=1).key
    expected = json.dumps(key.to_json(), indent=1) + "\n"
    records = {id(record) for record in key.tensors}
    calls: list[int] = []
    original = _sources._indented

    def counted(*args: object) -> None:
        calls.append(id(args[0]) in records)
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_sources, "_indented", counted)
    assert key_text(key) == expected
    # Four nested calls per record before (the record, its axes, each axis, its index map).
    assert calls and not any(calls), sum(calls)


def test_the_key_text_of_a_key_with_an_unusual_value_is_the_standard_encoders(monkeypatch: pytest.MonkeyPatch) -> None:
    key = onnxlady.permute(build_deep_model(60), seed=1).key
    key.extra = {"note": [np.int64(3)]}
    with pytest.raises(TypeError):
        key_text(key)
    key.extra = {"note": [1.5, float("nan")]}
    assert key_text(key) == json.dumps(key.to_json(), indent=1) + "\n"
    assert _sources.key_text is key_text
