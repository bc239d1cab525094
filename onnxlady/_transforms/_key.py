"""The permutation key: everything needed to undo a permutation, bit for bit.

A key is JSON. Per group: id, size, members (for people) and the permutation ``perm`` with
``new[i] = old[perm[i]]``. Per permuted tensor: each axis's permutation as an expression over
group ids (a block sum, a Kronecker product, an interleave, a group, or the identity), so
undoing needs no re-analysis. Untied constants list the copies made and the inputs rewired to them. The key
names the source model (file sha256 and graph fingerprint) and the permuted one, so a key made
for another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._graph._expr import Atom, DirectSum, Expr, Fixed, Interleave

KEY_FORMAT = "onnxlady-permutation-key"
KEY_VERSION = 1

ExprTree = dict[str, Any]


@dataclass
class PermutationKey:
    """An in-memory key; :meth:`to_json` / :meth:`from_json` give its file form."""

    source_sha256: str
    source_fingerprint: str
    permuted_fingerprint: str
    groups: list[dict[str, Any]]  # id, size, frozen, members, perm
    tensors: list[dict[str, Any]]  # tensor, source, axes: [{axis, expr}]
    untied: list[dict[str, Any]]  # source, copy, nodes, rewired
    source_weights_sha256: str = ""
    permuted_weights_sha256: str = ""
    permuted_sha256: str = ""
    seed: int | None = None
    source_file: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def permutations(self) -> dict[str, np.ndarray]:
        return {g["id"]: np.asarray(g["perm"], dtype=np.int64) for g in self.groups if "perm" in g}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": KEY_FORMAT,
            "version": KEY_VERSION,
            "source": {
                "file": self.source_file,
                "sha256": self.source_sha256,
                "graph_fingerprint": self.source_fingerprint,
                "weights_sha256": self.source_weights_sha256,
            },
            "permuted": {
                "sha256": self.permuted_sha256,
                "graph_fingerprint": self.permuted_fingerprint,
                "weights_sha256": self.permuted_weights_sha256,
            },
            "seed": self.seed,
            "groups": self.groups,
            "tensors": self.tensors,
            "untied": self.untied,
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], origin: str = "key") -> PermutationKey:
        if not isinstance(data, Mapping) or data.get("format") != KEY_FORMAT:
            raise OnnxladyError(f"{origin}: not an onnxlady permutation key")
        if data.get("version") != KEY_VERSION:
            raise OnnxladyError(f"{origin}: key version {data.get('version')} is not supported (expected {KEY_VERSION})")
        try:
            source, permuted = data["source"], data["permuted"]
            key = cls(
                source_sha256=source["sha256"],
                source_fingerprint=source["graph_fingerprint"],
                permuted_fingerprint=permuted["graph_fingerprint"],
                groups=list(data["groups"]),
                tensors=list(data["tensors"]),
                untied=list(data.get("untied", [])),
                source_weights_sha256=source.get("weights_sha256", ""),
                permuted_weights_sha256=permuted.get("weights_sha256", ""),
                permuted_sha256=permuted.get("sha256", ""),
                seed=data.get("seed"),
                source_file=source.get("file", ""),
                extra={k: v for k, v in data.items() if k not in _KNOWN_FIELDS},
            )
            for group in key.groups:
                values = group["perm"]
                if not isinstance(values, list) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in values
                ):
                    raise OnnxladyError(f"{origin}: group {group['id']} has a permutation that is not a list of integers")
                perm = np.asarray(values, dtype=np.int64)
                if perm.shape != (int(group["size"]),) or not np.array_equal(np.sort(perm), np.arange(perm.size)):
                    raise OnnxladyError(f"{origin}: group {group['id']} does not hold a permutation of {group['size']}")
            known = {str(g["id"]) for g in key.groups}
            for entry in key.tensors:
                _require(entry, ("tensor", "source", "axes"), "a tensor entry", origin)
                for item in entry["axes"]:
                    _require(item, ("axis", "expr"), f"an axis of tensor {entry['tensor']!r}", origin)
                    _require_int(item["axis"], f"the axis of tensor {entry['tensor']!r}", origin)
                    _check_tree(item["expr"], known, origin)
            for record in key.untied:
                _require(record, ("copy", "nodes", "rewired"), "an untied record", origin)
                _require_iterable(record["nodes"], f"the nodes of untied copy {record['copy']!r}", origin)
                for rewire in record["rewired"]:
                    _require(rewire, ("from", "to"), f"a rewiring of untied copy {record['copy']!r}", origin)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OnnxladyError(f"{origin}: malformed key ({type(exc).__name__}: {exc})") from exc
        return key


def _require(record: Any, fields: tuple[str, ...], what: str, origin: str) -> None:
    """``record`` must be a JSON object holding every one of ``fields``."""
    if not isinstance(record, Mapping):
        raise OnnxladyError(f"{origin}: malformed key ({what} is {record!r}, not an object)")
    missing = [name for name in fields if name not in record]
    if missing:
        raise OnnxladyError(f"{origin}: malformed key ({what} lacks {', '.join(repr(m) for m in missing)})")


def _require_int(value: Any, what: str, origin: str) -> None:
    """``value`` must read as an integer (``int(value)`` is how the key is applied)."""
    try:
        int(value)
    except (TypeError, ValueError):
        raise OnnxladyError(f"{origin}: malformed key ({what} is {value!r}, not an integer)") from None


def _require_iterable(value: Any, what: str, origin: str) -> None:
    """``value`` must be a list (the key is applied by iterating over it)."""
    try:
        iter(value)
    except TypeError:
        raise OnnxladyError(f"{origin}: malformed key ({what} is {value!r}, not a list)") from None


def _check_tree(tree: Any, known: set[str], origin: str) -> None:
    """An index-map expression must use only the key's groups and the five node kinds."""
    if not isinstance(tree, dict) or len(tree) != 1:
        raise OnnxladyError(f"{origin}: malformed index map {tree!r}")
    ((kind, value),) = tree.items()
    if kind == "group":
        if value not in known:
            raise OnnxladyError(f"{origin}: index map names group {value!r} that the key does not hold")
    elif kind == "identity":
        int(value)
    elif kind in ("sum", "product", "interleave"):
        if not isinstance(value, list) or (kind == "product" and len(value) != 2) or (kind == "interleave" and not value):
            raise OnnxladyError(f"{origin}: malformed index map {tree!r}")
        for part in value:
            _check_tree(part, known, origin)
    else:
        raise OnnxladyError(f"{origin}: malformed index map {tree!r}")


_KNOWN_FIELDS = {"format", "version", "source", "permuted", "seed", "groups", "tensors", "untied"}


def read_key(path: str | os.PathLike[str]) -> PermutationKey:
    """Read a permutation key file written by ``onnxlady permute`` (or :func:`onnxlady.permute`).

    Args:
        path: the JSON key file.

    Returns:
        The key, checked: every group holds a permutation of its size, every tensor entry names
        known groups.

    Raises:
        OnnxladyError: the file is missing, not JSON, not an onnxlady key, of another version,
            or malformed.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise OnnxladyError(f"{path}: no such key file") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxladyError(f"{path}: not a JSON key ({exc})") from exc
    return PermutationKey.from_json(data, str(path))


def expr_to_tree(expr: Expr, group_ids: Mapping[int, str], find: Any) -> ExprTree:
    """Serialise a resolved expression, atoms named by group id (``find`` maps atom -> root)."""
    if isinstance(expr, Atom):
        gid = group_ids.get(find(expr.id))
        return {"group": gid} if gid is not None else {"identity": expr.size}
    if isinstance(expr, Fixed):
        return {"identity": expr.size}
    if isinstance(expr, DirectSum):
        return {"sum": [expr_to_tree(part, group_ids, find) for part in expr.parts]}
    if isinstance(expr, Interleave):
        return {"interleave": [expr_to_tree(part, group_ids, find) for part in expr.parts]}
    return {"product": [expr_to_tree(expr.outer, group_ids, find), expr_to_tree(expr.inner, group_ids, find)]}


def tree_size(tree: ExprTree, sizes: Mapping[str, int]) -> int:
    if "group" in tree:
        return sizes[tree["group"]]
    if "identity" in tree:
        return int(tree["identity"])
    if "sum" in tree:
        return sum(tree_size(part, sizes) for part in tree["sum"])
    if "interleave" in tree:
        return sum(tree_size(part, sizes) for part in tree["interleave"])
    outer, inner = tree["product"]
    return tree_size(outer, sizes) * tree_size(inner, sizes)


def evaluate_tree(tree: ExprTree, perms: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> np.ndarray:
    """Index array ``idx`` (``new = take(old, idx)``) of a serialised expression."""
    if "group" in tree:
        gid = tree["group"]
        perm = perms.get(gid)
        return np.arange(sizes[gid], dtype=np.int64) if perm is None else np.asarray(perm, dtype=np.int64)
    if "identity" in tree:
        return np.arange(int(tree["identity"]), dtype=np.int64)
    if "sum" in tree:
        pieces, offset = [], 0
        for part in tree["sum"]:
            piece = evaluate_tree(part, perms, sizes)
            pieces.append(piece + offset)
            offset += piece.size
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if "interleave" in tree:
        # Position t * n + j is element t of part j (n parts), which keeps its residue j.
        parts = [evaluate_tree(part, perms, sizes) for part in tree["interleave"]]
        stride, total = len(parts), sum(part.size for part in parts)
        if [part.size for part in parts] != [max(0, -(-(total - j) // stride)) for j in range(stride)]:
            raise OnnxladyError(f"interleave of parts {[part.size for part in parts]} does not deal out {total} positions")
        result = np.empty(total, dtype=np.int64)
        for residue, part in enumerate(parts):
            result[residue::stride] = part * stride + residue
        return result
    outer = evaluate_tree(tree["product"][0], perms, sizes)
    inner = evaluate_tree(tree["product"][1], perms, sizes)
    return (outer[:, None] * inner.size + inner[None, :]).reshape(-1)


def graph_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of a graph's structure (operators, wiring, attributes, tensor shapes), not its weights."""
    digest = hashlib.sha256()
    for opset in sorted((op.domain, op.version) for op in model.opset_import):
        digest.update(f"opset:{opset}\n".encode())
    _fingerprint_graph(model.graph, digest)
    return digest.hexdigest()


def _fingerprint_graph(graph: onnx.GraphProto, digest: Any) -> None:
    for value in graph.input:
        digest.update(f"in:{value.name}\n".encode())
    for value in graph.output:
        digest.update(f"out:{value.name}\n".encode())
    for tensor in graph.initializer:
        digest.update(f"init:{tensor.name}:{tensor.data_type}:{list(tensor.dims)}\n".encode())
    for node in graph.node:
        digest.update(f"node:{node.domain}:{node.op_type}:{list(node.input)}:{list(node.output)}\n".encode())
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                digest.update(f"attr:{attribute.name}:{attribute.t.data_type}:{list(attribute.t.dims)}\n".encode())
            elif attribute.type == onnx.AttributeProto.GRAPH:
                digest.update(f"attr:{attribute.name}:graph\n".encode())
                _fingerprint_graph(attribute.g, digest)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    _fingerprint_graph(subgraph, digest)
            else:
                digest.update(b"attr:" + attribute.SerializeToString() + b"\n")
