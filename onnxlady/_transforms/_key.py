"""The permutation key: everything needed to undo a permutation, bit for bit.

A key is JSON. Per group: id, size, members (for people) and the permutation ``perm`` with
``new[i] = old[perm[i]]``. Per permuted tensor: each axis's permutation as an expression over
group ids (a block sum, a Kronecker product, an interleave, a transposed map, a group, or the identity;
since version 2 also a product whose blocks each keep their own order, ``grouped``), so
undoing needs no re-analysis. A key is written as version 1 unless it holds a ``grouped`` map
(GroupNorm's per-group channel orders): keys without one stay readable by older releases, which
refuse a version-2 key by its version. Untied constants list the copies made and the inputs rewired to them. The key
names the source model (file sha256 and graph fingerprint) and the permuted one, so a key made
for another model is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._graph._expr import Atom, DirectSum, Expr, Fixed, Grouped, Interleave, Transposed
from onnxlady._io._inputs import load_json
from onnxlady._io._node_table import NodeTable
from onnxlady._io._tensors import tensor_holders

KEY_FORMAT = "onnxlady-permutation-key"
KEY_VERSION = 2
#: The versions read: 1 (no ``grouped`` map) and 2.
KEY_VERSIONS = (1, 2)

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
    #: sha256 of the permuted model's external data file, when it was written with one.
    permuted_data_sha256: str = ""
    seed: int | None = None
    source_file: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def permutations(self) -> dict[str, np.ndarray]:
        """The permutation of every group that records one.

        Returns:
            Group id -> int64 array ``perm`` (new position ``i`` holds old neuron ``perm[i]``).
        """
        return {g["id"]: np.asarray(g["perm"], dtype=np.int64) for g in self.groups if "perm" in g}

    def to_json(self) -> dict[str, Any]:
        """The key as the JSON document a key file holds (read back by :meth:`from_json`).

        Returns:
            A dict of plain values: format and version, the source and permuted models' hashes,
            the seed, the groups with their permutations, the permuted tensors and the untied copies.
        """
        return key_document(self, KEY_VERSION if _holds_grouped([self.tensors, self.extra]) else 1)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], origin: str = "key") -> PermutationKey:
        """A key from its JSON document, validated against the key schema before anything uses it.

        Checked: the format and version; hex digests; each group once, with a size in
        [1, 2**31) and a permutation of that size; each tensor once, each axis once, an axis
        in [0, 64) and an index map whose nodes are the known kinds, nested at most
        32 deep, naming only the key's groups, with non-negative bounded integer sizes;
        untied records naming their copies once. Sizes against a model are checked by
        :func:`check_key_fits`.

        Args:
            data: the parsed JSON document.
            origin: the key file's name, for messages.

        Returns:
            The key.

        Raises:
            OnnxladyError: the document breaks the schema (the message says where).
        """
        if not isinstance(data, Mapping) or data.get("format") != KEY_FORMAT:
            raise OnnxladyError(f"{origin}: not an onnxlady permutation key")
        version = data.get("version")
        if version not in KEY_VERSIONS or isinstance(version, bool):
            raise OnnxladyError(
                f"{origin}: key version {version} is not supported (expected {' or '.join(map(str, KEY_VERSIONS))})"
            )
        schema = _Schema(origin, int(version))
        source = schema.mapping(data.get("source"), "'source'")
        permuted = schema.mapping(data.get("permuted"), "'permuted'")
        groups = [
            schema.group(group, number) for number, group in enumerate(schema.array(data.get("groups"), "'groups'"))
        ]
        ids = [group["id"] for group in groups]
        if len(set(ids)) != len(ids):
            raise OnnxladyError(f"{origin}: malformed key (group {_first_repeat(ids)!r} is listed twice)")
        known = set(ids)
        tensors = [schema.tensor(entry, known) for entry in schema.array(data.get("tensors"), "'tensors'")]
        names = [entry["tensor"] for entry in tensors]
        if len(set(names)) != len(names):
            raise OnnxladyError(f"{origin}: malformed key (tensor {_first_repeat(names)!r} is listed twice)")
        if groups and not tensors:
            raise OnnxladyError(f"{origin}: malformed key (it permutes {len(groups)} groups but lists no tensor)")
        untied = [schema.untied(record) for record in schema.array(data.get("untied", []), "'untied'")]
        copies = [record["copy"] for record in untied]
        if len(set(copies)) != len(copies):
            raise OnnxladyError(f"{origin}: malformed key (untied copy {_first_repeat(copies)!r} is listed twice)")
        seed = data.get("seed")
        if seed is not None:
            schema.integer(seed, "the seed", 0, 2**64)
        return cls(
            source_sha256=schema.digest(source.get("sha256"), "source sha256"),
            source_fingerprint=schema.digest(source.get("graph_fingerprint"), "source graph_fingerprint", empty=False),
            permuted_fingerprint=schema.digest(
                permuted.get("graph_fingerprint"), "permuted graph_fingerprint", empty=False
            ),
            groups=groups,
            tensors=tensors,
            untied=untied,
            source_weights_sha256=schema.digest(source.get("weights_sha256", ""), "source weights_sha256"),
            permuted_weights_sha256=schema.digest(permuted.get("weights_sha256", ""), "permuted weights_sha256"),
            permuted_sha256=schema.digest(permuted.get("sha256", ""), "permuted sha256"),
            permuted_data_sha256=schema.digest(permuted.get("data_sha256", ""), "permuted data_sha256"),
            seed=seed,
            source_file=schema.text(source.get("file", ""), "source file"),
            extra={k: v for k, v in data.items() if k not in _KNOWN_FIELDS},
        )


def key_document(key: PermutationKey, version: int) -> dict[str, Any]:
    """The document :meth:`PermutationKey.to_json` returns, with ``version`` as its version.

    (A writer that finds the version as it walks the records passes a placeholder, then writes the found one.)
    """
    return {
        "format": KEY_FORMAT,
        "version": version,
        "source": {
            "file": key.source_file,
            "sha256": key.source_sha256,
            "graph_fingerprint": key.source_fingerprint,
            "weights_sha256": key.source_weights_sha256,
        },
        "permuted": {
            "sha256": key.permuted_sha256,
            "graph_fingerprint": key.permuted_fingerprint,
            "weights_sha256": key.permuted_weights_sha256,
            **({"data_sha256": key.permuted_data_sha256} if key.permuted_data_sha256 else {}),
        },
        "seed": key.seed,
        "groups": key.groups,
        "tensors": key.tensors,
        "untied": key.untied,
        **key.extra,
    }


#: Largest group size, identity block or axis length a key may name.
MAX_KEY_SIZE = 2**31 - 1
#: Highest tensor rank a key may name an axis of.
MAX_KEY_RANK = 64
#: Deepest index-map expression accepted (real ones nest a handful of levels).
MAX_TREE_DEPTH = 32
_HEX = frozenset("0123456789abcdef")
_TREE_KINDS = ("group", "identity", "sum", "product", "interleave", "transposed", "grouped")


def _first_repeat(values: list[str]) -> str:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return ""


class _Schema:
    """The key schema's checks, each raising one line that names the key file and the field."""

    def __init__(self, origin: str, version: int = KEY_VERSION) -> None:
        self.origin = origin
        self.version = version

    def fail(self, message: str) -> OnnxladyError:
        return OnnxladyError(f"{self.origin}: malformed key ({message})")

    def mapping(self, value: Any, what: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(f"{what} is {_shown(value)}, not an object")
        return value

    def array(self, value: Any, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(f"{what} is {_shown(value)}, not a list")
        return value

    def text(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{what} is {_shown(value)}, not a string")
        return value

    def integer(self, value: Any, what: str, low: int = 0, high: int = MAX_KEY_SIZE) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{what} is {_shown(value)}, not a whole number")
        if not low <= value <= high:
            raise self.fail(f"{what} is {_shown(value)}, outside [{low}, {high}]")
        return value

    def digest(self, value: Any, what: str, *, empty: bool = True) -> str:
        text = self.text(value, what)
        if (text or not empty) and (len(text) != 64 or not set(text) <= _HEX):
            raise self.fail(f"{what} is {_shown(text)}, not a sha256 in hex")
        return text

    # group() and tensor() run once per record of a key of thousands: a field of the usual type
    # is taken as it is, and only another one goes through the check that names it (formatting
    # each check's label up front cost more than the checks).
    def group(self, value: Any, number: int) -> dict[str, Any]:
        group = dict(value if type(value) is dict else self.mapping(value, f"group #{number}"))
        for name in ("id", "size", "perm"):
            if name not in group:
                raise self.fail(f"group #{number} lacks {name!r}")
        gid = group["id"]
        if type(gid) is not str:
            gid = self.text(gid, f"the id of group #{number}")
        size = group["size"]
        if type(size) is not int or not 1 <= size <= MAX_KEY_SIZE:
            size = self.integer(size, f"the size of group {gid}", 1)
        values = group["perm"]
        if type(values) is not list:
            values = self.array(values, f"the permutation of group {gid}")
        if len(values) != size:
            raise OnnxladyError(f"{self.origin}: group {gid} does not hold a permutation of {size}")
        # One pass over a permutation of plain ints (bools are not ints here); any other entry
        # goes through the check that names it.
        if not all(type(value) is int for value in values) or (values and not 0 <= min(values) <= max(values) < size):
            for value in values:
                self.integer(value, f"an entry of group {gid}'s permutation", 0, size - 1)
        if len(set(values)) != size:
            raise OnnxladyError(f"{self.origin}: group {gid} does not hold a permutation of {size}")
        if "members" in group and type(group["members"]) is not list:
            self.array(group["members"], f"the members of group {gid}")
        return group

    def tensor(self, value: Any, known: set[str]) -> dict[str, Any]:
        # Most records (all of a deep graph's key): a name, a source and one axis moved by one
        # known group, checked in one expression; any other record takes the checks below.
        if type(value) is dict and len(value) == 3 and type(items := value.get("axes")) is list and len(items) == 1:
            item = items[0]
            if (
                type(value.get("tensor")) is str
                and type(value.get("source")) is str
                and type(item) is dict
                and len(item) == 2
                and type(axis := item.get("axis")) is int
                and 0 <= axis < MAX_KEY_RANK
                and type(tree := item.get("expr")) is dict
                and len(tree) == 1
                and type(gid := tree.get("group")) is str
                and gid in known
            ):
                entry = dict(value)
                entry["axes"] = [dict(item)]
                return entry
        entry = dict(value if type(value) is dict else self.mapping(value, "a tensor entry"))
        for name in ("tensor", "source", "axes"):
            if name not in entry:
                raise self.fail(f"a tensor entry lacks {name!r}")
        name = entry["tensor"]
        if type(name) is not str:
            name = self.text(name, "a tensor name")
        if type(entry["source"]) is not str:
            self.text(entry["source"], f"the source of tensor {name!r}")
        items = entry["axes"]
        if type(items) is not list:
            items = self.array(items, f"the axes of tensor {name!r}")
        axes = [
            dict(item if type(item) is dict else self.mapping(item, f"an axis of tensor {name!r}")) for item in items
        ]
        seen = set()
        for item in axes:
            for field_name in ("axis", "expr"):
                if field_name not in item:
                    raise self.fail(f"an axis of tensor {name!r} lacks {field_name!r}")
            axis = item["axis"]
            if type(axis) is not int or not 0 <= axis < MAX_KEY_RANK:
                axis = self.integer(axis, f"the axis of tensor {name!r}", 0, MAX_KEY_RANK - 1)
            if axis in seen:
                raise self.fail(f"axis {axis} of tensor {name!r} is listed twice")
            seen.add(axis)
            self.tree(item["expr"], known, 0)
        entry["axes"] = axes
        return entry

    def tree(self, tree: Any, known: set[str], depth: int) -> None:
        """An index map: one of the known node kinds, known groups, bounded sizes and depth."""
        if depth > MAX_TREE_DEPTH:
            raise self.fail(f"an index map is nested more than {MAX_TREE_DEPTH} levels deep")
        if not isinstance(tree, Mapping) or len(tree) != 1:
            raise OnnxladyError(f"{self.origin}: malformed index map {_shown(tree)}")
        ((kind, value),) = tree.items()
        if kind == "group":
            if not isinstance(value, str) or value not in known:
                raise OnnxladyError(f"{self.origin}: index map names group {_shown(value)} that the key does not hold")
        elif kind == "identity":
            self.integer(value, "an identity block's size")
        elif kind in ("sum", "product", "interleave"):
            if (
                not isinstance(value, list)
                or (kind == "product" and len(value) != 2)
                or (kind != "product" and not value)
            ):
                raise OnnxladyError(f"{self.origin}: malformed index map {_shown(tree)}")
            for part in value:
                self.tree(part, known, depth + 1)
        elif kind == "grouped" and self.version >= 2:
            # Blocks moved by "of", each block of the source in its own order: {"of": tree, "blocks": [trees]}.
            if not isinstance(value, Mapping) or set(value) != {"of", "blocks"} or not isinstance(value["blocks"], list):
                raise OnnxladyError(f"{self.origin}: malformed index map {_shown(tree)}")
            if not value["blocks"]:
                raise OnnxladyError(f"{self.origin}: malformed index map {_shown(tree)}")
            self.tree(value["of"], known, depth + 1)
            for part in value["blocks"]:
                self.tree(part, known, depth + 1)
        elif kind == "transposed":
            # A channel shuffle's index map: {"rows": R, "cols": C, "of": tree of R * C positions}.
            if not isinstance(value, Mapping) or set(value) != {"rows", "cols", "of"}:
                raise OnnxladyError(f"{self.origin}: malformed index map {_shown(tree)}")
            self.integer(value["rows"], "a transposed map's rows", 1)
            self.integer(value["cols"], "a transposed map's columns", 1)
            self.tree(value["of"], known, depth + 1)
        else:
            raise OnnxladyError(f"{self.origin}: malformed index map {_shown(tree)}")

    def untied(self, value: Any) -> dict[str, Any]:
        record = dict(self.mapping(value, "an untied record"))
        for name in ("copy", "nodes", "rewired"):
            if name not in record:
                raise self.fail(f"an untied record lacks {name!r}")
        copy = self.text(record["copy"], "an untied copy's name")
        if "source" in record:
            self.text(record["source"], f"the source of untied copy {copy!r}")
        for node in self.array(record["nodes"], f"the nodes of untied copy {copy!r}"):
            self.text(node, f"a node of untied copy {copy!r}")
        for rewire in self.array(record["rewired"], f"the rewiring of untied copy {copy!r}"):
            rewire = self.mapping(rewire, f"a rewiring of untied copy {copy!r}")
            for name in ("from", "to"):
                if name not in rewire:
                    raise self.fail(f"a rewiring of untied copy {copy!r} lacks {name!r}")
                self.text(rewire[name], f"a rewiring of untied copy {copy!r}")
        return record


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..." + text[-10:]


_KNOWN_FIELDS = {"format", "version", "source", "permuted", "seed", "groups", "tensors", "untied"}


def read_key(path: str | os.PathLike[str]) -> PermutationKey:
    """Read a permutation key file written by ``onnxlady permute`` (or :func:`onnxlady.permute`).

    Args:
        path: the JSON key file.

    Returns:
        The key, validated against the key schema (see :meth:`PermutationKey.from_json`).

    Raises:
        OnnxladyError: the file is missing, not a regular file, not JSON (or nested too deeply),
            not an onnxlady key, of another version, or malformed.
    """
    data = load_json(path, "JSON key")
    return PermutationKey.from_json(data, str(path))


def check_key_fits(
    key: PermutationKey, model: onnx.ModelProto, holders: Mapping[str, onnx.TensorProto] | None = None
) -> None:
    """Check, before anything is applied, that ``key`` fits ``model``'s tensors exactly.

    Every tensor the key names exists; every axis is within its rank; every index map's size
    equals that axis's length and no part of it is longer (so evaluating it allocates no more
    than the tensor holds); every untied copy and node the key removes exists.

    Args:
        key: a key validated by :meth:`PermutationKey.from_json` (or made by this package).
        model: the model the key is to be applied to.
        holders: ``tensor_holders(model)``, when the caller has it already.

    Raises:
        OnnxladyError: the first mismatch found.
    """
    if holders is None:
        holders = tensor_holders(model)
    sizes = {str(g["id"]): int(g["size"]) for g in key.groups}
    for entry in key.tensors:
        name = entry["tensor"]
        tensor = holders.get(name)
        if tensor is None:
            raise OnnxladyError(f"the key names tensor '{name}' that this model lacks")
        dims = tensor.dims[:]  # (a list of Python ints)
        for item in entry["axes"]:
            axis = int(item["axis"])
            if axis >= len(dims):
                raise OnnxladyError(f"the key permutes axis {axis} of tensor '{name}', which has rank {len(dims)}")
            tree = item["expr"]
            # One group (most axes): its size, without the walk (a size that is not the axis's is refused alike).
            size = sizes.get(tree["group"], -1) if len(tree) == 1 and "group" in tree else -1
            if size != dims[axis]:
                try:
                    size = _fitted_size(tree, sizes, dims[axis])
                except _TooLong:
                    size = -1
            if size != dims[axis]:
                raise OnnxladyError(f"tensor '{name}' does not have the shape the key expects on axis {axis}")
    if not key.untied:  # (the sets below cost a pass over every node)
        return
    outputs = {output for node in model.graph.node for output in node.output}
    names = outputs | {t.name for t in model.graph.initializer}
    for record in key.untied:
        if record["copy"] not in names:
            raise OnnxladyError(f"the key removes untied copy '{record['copy']}' that this model lacks")
        for node in record["nodes"]:
            if node not in outputs:
                raise OnnxladyError(f"the key removes node output '{node}' that this model lacks")


class _TooLong(Exception):  # ruff: ignore[error-suffix-on-exception-name] - a signal inside check_key_fits
    """A part of an index map is longer than the axis it maps."""


def _fitted_size(tree: ExprTree, sizes: Mapping[str, int], limit: int) -> int:
    """The size of an index map, checking that no part of it exceeds ``limit``."""
    if "group" in tree:
        if tree["group"] not in sizes:
            raise OnnxladyError(f"index map names group {tree['group']!r} that the key does not hold")
        size = sizes[tree["group"]]
    elif "identity" in tree:
        size = int(tree["identity"])
        if size < 0:
            raise _TooLong
    elif "sum" in tree or "interleave" in tree:
        parts = [_fitted_size(part, sizes, limit) for part in (tree["sum"] if "sum" in tree else tree["interleave"])]
        size = sum(parts)
        if "interleave" in tree:
            stride = len(parts)
            if parts != [max(0, -(-(size - j) // stride)) for j in range(stride)]:
                raise _TooLong
    elif "transposed" in tree:
        spec = tree["transposed"]
        size = _fitted_size(spec["of"], sizes, limit)
        if size != int(spec["rows"]) * int(spec["cols"]):
            raise _TooLong
    elif "grouped" in tree:
        spec = tree["grouped"]
        blocks = _fitted_size(spec["of"], sizes, limit)
        inner = {_fitted_size(part, sizes, limit) for part in spec["blocks"]}
        if blocks != len(spec["blocks"]) or len(inner) != 1:
            raise _TooLong  # (not a fit: refused like one)
        size = blocks * inner.pop()
    else:
        outer, inner = tree["product"]
        size = _fitted_size(outer, sizes, limit) * _fitted_size(inner, sizes, limit)
    if size > limit:
        raise _TooLong
    return size


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
    if isinstance(expr, Transposed):
        return {"transposed": {"rows": expr.rows, "cols": expr.cols, "of": expr_to_tree(expr.inner, group_ids, find)}}
    if isinstance(expr, Grouped):
        return {
            "grouped": {
                "of": expr_to_tree(expr.outer, group_ids, find),
                "blocks": [expr_to_tree(inner, group_ids, find) for inner in expr.inners],
            }
        }
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
    if "transposed" in tree:
        return tree_size(tree["transposed"]["of"], sizes)
    if "grouped" in tree:
        return tree_size(tree["grouped"]["of"], sizes) * tree_size(tree["grouped"]["blocks"][0], sizes)
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
            raise OnnxladyError(
                f"interleave of parts {[part.size for part in parts]} does not deal out {total} positions"
            )
        result = np.empty(total, dtype=np.int64)
        for residue, part in enumerate(parts):
            result[residue::stride] = part * stride + residue
        return result
    if "transposed" in tree:
        # Position i * cols + j is position j * rows + i of the inner map (a channel shuffle).
        spec = tree["transposed"]
        rows, cols = int(spec["rows"]), int(spec["cols"])
        inner_index = evaluate_tree(spec["of"], perms, sizes)
        if inner_index.size != rows * cols:
            raise OnnxladyError(f"a transposed map of {rows} x {cols} holds {inner_index.size} positions")
        forward = (np.arange(cols, dtype=np.int64)[None, :] * rows + np.arange(rows, dtype=np.int64)[:, None]).reshape(
            -1
        )
        back = (np.arange(rows, dtype=np.int64)[None, :] * cols + np.arange(cols, dtype=np.int64)[:, None]).reshape(-1)
        return back[inner_index[forward]]
    if "grouped" in tree:
        # Block o holds block blocks[o] of the source, in that block's own order.
        spec = tree["grouped"]
        blocks = evaluate_tree(spec["of"], perms, sizes)
        orders = [evaluate_tree(part, perms, sizes) for part in spec["blocks"]]
        if len(orders) != blocks.size or len({order.size for order in orders}) != 1:
            raise OnnxladyError(f"a grouped map of {blocks.size} blocks lists {len(orders)} orders of unequal sizes")
        stacked = np.stack(orders)
        return (blocks[:, None] * stacked.shape[1] + stacked[blocks]).reshape(-1)
    outer = evaluate_tree(tree["product"][0], perms, sizes)
    inner = evaluate_tree(tree["product"][1], perms, sizes)
    return (outer[:, None] * inner.size + inner[None, :]).reshape(-1)


def _holds_grouped(value: Any) -> bool:
    """Whether a key's records hold a ``grouped`` index map anywhere (the key is then version 2)."""
    if isinstance(value, Mapping):
        return "grouped" in value or any(_holds_grouped(item) for item in value.values())
    if isinstance(value, list):
        return any(_holds_grouped(item) for item in value)
    return False


def graph_fingerprint(model: onnx.ModelProto, nodes: NodeTable | None = None) -> str:
    """sha256 of a graph's structure (operators, wiring, attributes, tensor shapes), not its weights.

    ``nodes``: the main graph's nodes as the load's check read them (see
    :mod:`onnxlady._io._node_table`), used while it still describes ``model.graph`` (read from it,
    as many nodes, not taken): the node lines are then made from it, and only the nodes holding
    attributes are read again. Every node field read from protobuf makes new Python objects; at
    50,000 nodes that was most of the fingerprint's 0.25 s. The hash is the same either way.
    """
    lines: list[bytes] = [f"opset:{opset}\n".encode() for opset in sorted((op.domain, op.version) for op in model.opset_import)]
    graph = model.graph
    _fingerprint_graph(graph, lines, nodes if nodes is not None and nodes.describes(graph) else None)
    # One hash of the joined lines (as hashing them one by one would give): no call per line.
    return hashlib.sha256(b"".join(lines)).hexdigest()


def _fingerprint_graph(graph: onnx.GraphProto, lines: list[bytes], table: NodeTable | None = None) -> None:
    """Append the fingerprint's lines of ``graph`` (and its subgraphs, depth first) to ``lines``.

    ``table``: ``graph``'s nodes as read already (checked by the caller to describe it).
    """
    add = lines.append
    for value in graph.input:
        add(f"in:{value.name}\n".encode())
    for value in graph.output:
        add(f"out:{value.name}\n".encode())
    # A repeated field's slice is a list (as list() makes it, in half the time), written as list() writes it.
    for tensor in graph.initializer:
        add(f"init:{tensor.name}:{tensor.data_type}:{tensor.dims[:]}\n".encode())
    if table is not None:
        # The same lines from the table's tuples (written as lists, as the slices are); a node
        # with attributes is read from protobuf for them.
        for index, ((op_type, domain), inputs, outputs, attributed) in enumerate(
            zip(table.ops, table.inputs, table.outputs, table.attributed)
        ):
            add(f"node:{domain}:{op_type}:{[*inputs]}:{[*outputs]}\n".encode())
            if attributed:
                _fingerprint_attributes(graph.node[index], lines)
        return
    for node in graph.node:
        add(f"node:{node.domain}:{node.op_type}:{node.input[:]}:{node.output[:]}\n".encode())
        if not node.attribute:  # (most nodes: asking is cheaper than an empty loop)
            continue
        _fingerprint_attributes(node, lines)


def _fingerprint_attributes(node: onnx.NodeProto, lines: list[bytes]) -> None:
    """Append the fingerprint's lines of ``node``'s attributes (and of the subgraphs they hold)."""
    add = lines.append
    tensor_type, graph_type, graphs_type = onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS
    for attribute in node.attribute:
        kind = attribute.type
        if kind == tensor_type:
            add(f"attr:{attribute.name}:{attribute.t.data_type}:{list(attribute.t.dims)}\n".encode())
        elif kind == graph_type:
            add(f"attr:{attribute.name}:graph\n".encode())
            _fingerprint_graph(attribute.g, lines)
        elif kind == graphs_type:
            for subgraph in attribute.graphs:
                _fingerprint_graph(subgraph, lines)
        else:
            add(b"attr:" + attribute.SerializeToString() + b"\n")
