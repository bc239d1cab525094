"""Permute and unpermute cost a constant per tensor (issue 15: permute of a deep graph near its floor).

A deep graph holds thousands of small tensors; each per-tensor step must be O(1): registering a
tensor in the key's digest (a list scan made it quadratic), hashing it (a hand-off to a worker
thread per tensor cost more than the hash), the graph fingerprint (computed twice), and the
key's JSON text (the standard encoder writes an indented document token by token). Each test
fails with the change it guards reverted: the counts are of comparisons, threads and calls, not
of seconds.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import onnx
import pytest

import onnxlady
from fixtures import FIXTURES, build_deep_model
from fixtures.deployment import build_shared_bias_untied
from onnxlady._api import _permute as _api_permute
from onnxlady._api._sources import key_text
from onnxlady._io._node_table import NodeTable
from onnxlady._transforms import _permute
from onnxlady._transforms._key import graph_fingerprint
from onnxlady._transforms._permute import SourceDigest


class _CountedName(str):
    """A tensor name that counts its equality tests (a list scan makes one per element)."""

    __slots__ = ()
    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedName.compared += 1
        return str.__eq__(self, other)  # type: ignore[no-any-return]

    __hash__ = str.__hash__


def test_registering_a_tensor_does_not_scan_the_ones_before() -> None:
    digest = SourceDigest()
    names = [_CountedName(f"tensor_{number}") for number in range(2000)]
    _CountedName.compared = 0
    assert all(digest.expect(name) for name in names)
    assert not digest.expect(_CountedName("tensor_7"))  # a second use of a source is still recognised
    # A scan compares each new name with every earlier one: ~2M comparisons here; a set a handful.
    assert _CountedName.compared < 100, _CountedName.compared
    digest.close()


def test_small_tensors_are_hashed_without_the_worker_and_the_digest_is_unchanged() -> None:
    rng = np.random.default_rng(0)
    chunks = {f"t{n}": rng.bytes(size) for n, size in enumerate([4, 64, 1024, 40_000, 3 << 18, 17])}
    digest = SourceDigest()
    for name, data in chunks.items():
        assert digest.expect(name)
        digest.add(name, np.frombuffer(data, dtype=np.uint8).data if name == "t2" else data)
    # Only the one tensor above the threshold went to the worker thread.
    assert list(digest._pending) == ["t4"]  # what was handed over is what is under test
    expected = hashlib.sha256()
    for name, data in chunks.items():
        expected.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    assert digest.hexdigest() == expected.hexdigest()
    # A different byte in any tensor gives another digest: the comparison above can fail.
    other = SourceDigest()
    for name, data in chunks.items():
        other.expect(name)
        other.add(name, data if name != "t1" else b"\1" + data[1:])
    assert other.hexdigest() != expected.hexdigest()


def test_the_fingerprint_is_computed_once_when_nothing_is_untied(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_deep_model(60)
    calls: list[int] = []

    def counted(model: onnx.ModelProto, nodes: NodeTable | None = None) -> str:
        calls.append(1)
        return graph_fingerprint(model, nodes)

    # (permute takes it before the analysis, from the nodes as the check read them; permute_model
    # would take it itself when not given it)
    monkeypatch.setattr(_permute, "graph_fingerprint", counted)
    monkeypatch.setattr(_api_permute, "graph_fingerprint", counted)
    result = onnxlady.permute(model, seed=1)
    assert len(calls) == 1
    assert not result.key.untied
    assert result.key.permuted_fingerprint == result.key.source_fingerprint == graph_fingerprint(result.model)


def test_an_untied_key_records_the_fingerprint_of_the_changed_graph() -> None:
    """Untying adds copies: the permuted graph is another graph, and the key says so."""
    result = onnxlady.permute(build_shared_bias_untied(0), seed=1)
    assert result.key.untied
    assert result.key.permuted_fingerprint == graph_fingerprint(result.model) != result.key.source_fingerprint
    for name in ("shared_initializer", "tied_lm_head"):  # constants shared alike: no copy, one graph
        result = onnxlady.permute(FIXTURES[name](0), seed=1)
        assert result.key.permuted_fingerprint == graph_fingerprint(result.model) == result.key.source_fingerprint


def _document() -> dict[str, object]:
    return {
        "format": "onnxlady-key",
        "nested": {"empty_list": [], "empty_dict": {}, "ints": [3, 1, 2], "bools": [True, False, None], "tuple": (1, "a")},
        "floats": [0.1, 1e-300, 1e300, -0.0, math.inf, -math.inf, math.nan, np.float64(0.25)],
        "text": ["plain", "é ☃ \U0001f600", 'quote " backslash \\ tab \t nl \n ctl \x01', ""],
        "deep": [[[{"axis": 0, "expr": {"kind": "group", "id": "g3"}}]]],
        "big": 10**40,
        "records": [{"tensor": f"w{n}", "perm": list(range(n))} for n in range(4)],
    }


def test_key_text_is_the_standard_encoders_text() -> None:
    key = onnxlady.permute(build_deep_model(60), seed=1).key
    assert key_text(key) == json.dumps(key.to_json(), indent=1) + "\n"
    key.extra = {"extra": _document()}
    assert key_text(key) == json.dumps(key.to_json(), indent=1) + "\n"
    # A value the one-pass writer leaves to json.dumps: the same text, or the same error.
    key.extra = {"extra": {1: "an int key", "x": [2]}}
    assert key_text(key) == json.dumps(key.to_json(), indent=1) + "\n"
    key.extra = {"extra": [np.int64(3)]}
    with pytest.raises(TypeError):
        key_text(key)


def test_key_text_differs_where_the_documents_do() -> None:
    key = onnxlady.permute(build_deep_model(60), seed=1).key
    text = key_text(key)
    key.groups[0]["perm"] = list(reversed(key.groups[0]["perm"]))
    assert key_text(key) != text
