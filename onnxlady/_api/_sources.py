"""What every public function shares: opening a model or key argument, checking output paths.

A model argument is a path or an ``onnx.ModelProto``; a key argument a path or a
:class:`~onnxlady._transforms._key.PermutationKey`. A model the API loads itself from a path is
its own and may be changed in place (that is how the file-to-file commands keep memory low); a
``ModelProto`` the caller gives is never changed: a function that must change it works on a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._io._digest import PendingDigest
from onnxlady._io._files import copy_model, file_sha256, load_model, write_atomically
from onnxlady._io._node_table import NodeTable
from onnxlady._io._outputs import check_output_paths, external_data_path
from onnxlady._io._progress import say
from onnxlady._io._validate import in_memory_capacity, validate_model
from onnxlady._transforms._key import _KNOWN_FIELDS as _KEY_FIELDS
from onnxlady._transforms._key import KEY_VERSION, PermutationKey, key_document, read_key

#: A model argument: a path to an ONNX file or a model in memory.
ModelSource = str | os.PathLike[str] | onnx.ModelProto
#: A permutation key argument: a path to a key file or a key in memory.
KeySource = str | os.PathLike[str] | PermutationKey
#: An output path argument (``None``: keep the result in memory only).
OutputPath = str | os.PathLike[str] | None


@dataclass
class OpenedModel:
    """A model argument, opened: the model and what is known about where it came from."""

    model: onnx.ModelProto
    #: The file it was read from; ``None`` for a model given in memory.
    path: Path | None
    #: sha256 of that file; ``None`` for a model given in memory, or opened without its digest.
    sha256: str | None
    #: Whether its weights were read from external data files (then outputs are written that way too).
    external_data: bool
    #: The external data files its tensors were read from.
    external_files: tuple[Path, ...]
    #: True when the API loaded the model itself, so changing it in place harms no caller.
    owned: bool
    #: The file's sha256 while it is being computed (opened with ``hash_later``).
    pending: PendingDigest | None = None
    #: A file's main-graph nodes as its check read them (opened with ``node_table``), for the
    #: analysis that follows (see :mod:`onnxlady._io._node_table`).
    nodes: NodeTable | None = None

    def writable(self) -> onnx.ModelProto:
        """The model to change in place: the API's own load, or a copy of the caller's model."""
        return self.model if self.owned else copy_model(self.model)

    def content_sha256(self) -> str:
        """The file's sha256, or for a model in memory the sha256 of its serialized bytes."""
        if self.sha256 is None and self.pending is not None:
            self.sha256, self.pending = self.pending.result(), None
        if self.sha256 is not None:
            return self.sha256
        if self.path is not None:  # opened without its digest (see open_model)
            self.sha256 = file_sha256(self.path)
            return self.sha256
        return hashlib.sha256(self.model.SerializeToString()).hexdigest()


def open_model(
    source: ModelSource,
    what: str = "model",
    progress: Callable[[str], None] | None = None,
    *,
    map_external: bool = False,
    as_loaded: bool = False,
    digest: bool = True,
    hash_later: bool = False,
    node_table: bool = False,
) -> OpenedModel:
    """Open a model argument: load a path (with its external data), take a ModelProto as it is.

    Args:
        source: a path to an ONNX file or an ``onnx.ModelProto``.
        what: how messages name the argument (``"reference"``, ``"suspect"``...).
        progress: told when a file is being loaded (a large one takes a while).
        map_external: leave a file's large external tensors in their files, read as memory
            maps (see :func:`onnxlady._io._files.load_model`); for commands that write every
            tensor they change through the output set.
        as_loaded: with ``map_external``, the tensors read in keep the fields ``onnx.load``
            gives them, so that a file written from the model is byte for byte what
            ``onnx.load`` and a save give.
        digest: hash the file (:attr:`OpenedModel.sha256`); a command that records no sha256
            of this input passes False, sparing a read of every byte.
        hash_later: with ``digest``, hash the file in a thread of its own and return without
            waiting for it: :meth:`OpenedModel.content_sha256` waits (the hash then runs beside
            the load and whatever the caller does next; see :mod:`onnxlady._io._digest`).
        node_table: keep a file's main-graph nodes as its check read them
            (:attr:`OpenedModel.nodes`), for a caller that analyses it next.

    Returns:
        The opened model; :attr:`OpenedModel.owned` says whether it may be changed in place.

    Raises:
        OnnxladyError: the argument is neither a path nor a ModelProto, the file is missing or
            not a readable ONNX model, or the model is not structurally sound.
    """
    if isinstance(source, onnx.ModelProto):
        # The same structural check a file gets: a hostile graph built in memory must not reach the rules.
        validate_model(source, f"the {what} (in memory)", capacity=in_memory_capacity(source))
        return OpenedModel(source, None, None, False, (), owned=False)
    if not isinstance(source, (str, os.PathLike)):
        raise OnnxladyError(f"{what}: expected a path or an onnx.ModelProto, got {type(source).__name__}")
    say(progress, f"loading the {what} {os.fspath(source)}")
    # (None for a path that is not a regular file: the load refuses it, or hashes it as before)
    pending = PendingDigest.start(source) if digest and hash_later else None
    loaded = load_model(
        source, map_external=map_external, as_loaded=as_loaded, digest=digest and pending is None, node_table=node_table
    )
    return OpenedModel(
        loaded.model, loaded.path, loaded.sha256, loaded.external_data, loaded.external_files, owned=True,
        pending=pending, nodes=loaded.nodes,
    )  # fmt: skip


def source_path(source: object) -> Path | None:
    """The path a model or key argument names, ``None`` for an object in memory."""
    return Path(source) if isinstance(source, (str, os.PathLike)) else None


def output_path(path: OutputPath) -> Path | None:
    """An output argument as a Path (``None`` stays ``None``)."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise OnnxladyError(f"expected an output path, got {type(path).__name__}")
    return Path(path)


def open_key(key: KeySource) -> PermutationKey:
    """A key argument: read a key file, or take a :class:`PermutationKey` as it is."""
    if isinstance(key, PermutationKey):
        return key
    if not isinstance(key, (str, os.PathLike)):
        raise OnnxladyError(f"key: expected a path or a PermutationKey, got {type(key).__name__}")
    return read_key(key)


# -- outputs ------------------------------------------------------------------------------
def written_paths(output: Path | None, extra: Sequence[Path]) -> list[Path]:
    """Every file a command writes: the model, its external data file, then ``extra`` (keys, reports)."""
    paths = [output, external_data_path(output)] if output is not None else []
    return paths + list(extra)


def check_outputs(
    output: Path | None, inputs: Sequence[Path | None], extra: Sequence[Path] = (), *, overwrite_input: bool = False
) -> None:
    """Refuse outputs that would overwrite an input or each other, before any work.

    An output is an input when the paths resolve to the same file or when both exist and are
    one file (a symlink or a hard link to it). ``overwrite_input`` allows the model output
    (and its external data file) to replace an input, never a key or a report.

    Args:
        output: the model to write, if any.
        inputs: the files read (``None`` entries, arguments given in memory, are skipped).
        extra: other files written (keys, reports).
        overwrite_input: allow the model output to be an input file.

    Raises:
        OnnxladyError: an output is an input, two outputs are the same file, an output is a
            folder or has too long a name, or an output folder does not exist.
    """
    replaceable = written_paths(output, []) if overwrite_input else []
    check_output_paths(
        [output, *extra] if output is not None else list(extra), inputs, replaceable=replaceable,
        companions=[external_data_path(output)] if output is not None else [],
    )  # fmt: skip


def check_external_inputs(
    output: Path | None, opened: Sequence[OpenedModel], extra: Sequence[Path] = (), *, overwrite_input: bool = False
) -> None:
    """Refuse outputs that would overwrite the external-data files the inputs were read from.

    Raises:
        OnnxladyError: an output is one of those files and ``overwrite_input`` does not allow it.
    """
    protected = [path for model in opened for path in model.external_files]
    if protected:
        replaceable = written_paths(output, []) if overwrite_input else []
        try:
            check_output_paths(
                [output, *extra] if output is not None else list(extra), protected, replaceable=replaceable,
                companions=[external_data_path(output)] if output is not None else [],
            )  # fmt: skip
        except OnnxladyError as exc:
            raise OnnxladyError(f"{exc} (an input's external data)") from None


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically (temporary file beside it, then rename).

    Raises:
        OnnxladyError: the folder does not exist or the file cannot be written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path()
    if not folder.is_dir():
        raise OnnxladyError(f"{path}: output folder '{folder}' does not exist")
    write_atomically(path, text.encode())


def write_key(key: PermutationKey, path: str | os.PathLike[str]) -> None:
    """Write a permutation key as JSON, atomically.

    Raises:
        OnnxladyError: the folder does not exist or the file cannot be written.
    """
    write_text(path, key_text(key))


def key_text(key: PermutationKey) -> str:
    """A permutation key's file content (JSON): ``json.dumps(key.to_json(), indent=1)``, byte for byte.

    The standard encoder writes an indented document in pure Python, one generator step per
    token (seconds for the key of a 50k-node graph); :func:`_indented` builds the same text in
    one pass, and finds the key's version on the way (a ``grouped`` index map among the tensors'
    or the extra records makes it version 2: :meth:`PermutationKey.to_json` walks them for it
    once more). A value it does not know (never in a key) falls back to ``json.dumps`` itself.
    """
    extra = key.extra
    if _KEY_FIELDS & set(extra) or not all(type(name) is str for name in extra):
        # Extra records that replace a field, or a name json.dumps turns into text: the document as to_json makes it.
        return _document_text(key.to_json())
    watched = {"tensors", *extra}  # the records to_json looks for a grouped map in (and the extra names themselves)
    found = ["grouped" in extra]
    parts = ["{\n "]
    version_at = 0
    try:
        for position, (name, value) in enumerate(key_document(key, 1).items()):
            if position:
                parts.append(",\n ")
            parts.append(_encode_string(name) + ": ")
            if name == "version":
                version_at = len(parts)
                parts.append("")  # written below, once the records are walked
                continue
            if name == "tensors":
                _tensor_records(value, "\n ", parts, found)
            else:
                _indented(value, "\n ", parts, found if name in watched else None)
    except _NotPlainError:
        return json.dumps(key.to_json(), indent=1) + "\n"
    parts[version_at] = int.__repr__(KEY_VERSION if found[0] else 1)
    parts.append("\n}\n")
    return "".join(parts)


_RECORD_FIELDS = ("tensor", "source", "axes")
_AXIS_FIELDS = ("axis", "expr")


def _tensor_records(records: Any, newline: str, parts: list[str], grouped: list[bool] | None) -> None:
    """The key's tensor records as :func:`_indented` writes them, the common ones in one piece each.

    A record of a tensor name, its source and axes each moved by one group or none (``{"group":
    id}`` or ``{"identity": n}``) is most of a deep graph's key: written from one template, not
    by four nested calls. Any other record (a sum, a product...) goes through :func:`_indented`.
    """
    if type(records) is not list or not records or all(type(record) is int for record in records):
        _indented(records, newline, parts, grouped)
        return
    item = newline + " "  # the indents of: a record, its fields, its axes, their fields, an index map's entry
    field = item + " "
    axis = field + " "
    axis_field = axis + " "
    leaf = axis_field + " "
    source_head, axes_head, axis_separator = "," + field + '"source": ', "," + field + '"axes": [' + axis, "," + axis
    axis_head, expr_head, axis_end = "{" + axis_field + '"axis": ', "," + axis_field + '"expr": {' + leaf, axis_field + "}" + axis + "}"
    record_head, record_end = "{" + field + '"tensor": ', field + "]" + item + "}"
    parts.append("[" + item)
    for position, record in enumerate(records):
        if position:
            parts.append("," + item)
        text = _record_text(record, axis_head, expr_head, axis_end, axis_separator)
        if text is None:
            _indented(record, item, parts, grouped)
            continue
        parts.append(
            record_head + _encode_string(record["tensor"]) + source_head + _encode_string(record["source"])
            + axes_head + text + record_end
        )  # fmt: skip
    parts.append(newline + "]")


def _record_text(record: Any, axis_head: str, expr_head: str, axis_end: str, separator: str) -> str | None:
    """The axes of a common tensor record, as :func:`_tensor_records` writes them; None for another record."""
    if type(record) is not dict or tuple(record) != _RECORD_FIELDS:
        return None
    axes = record["axes"]
    if type(record["tensor"]) is not str or type(record["source"]) is not str or type(axes) is not list or not axes:
        return None
    texts = []
    for entry in axes:
        if type(entry) is not dict or tuple(entry) != _AXIS_FIELDS or type(entry["axis"]) is not int:
            return None
        expr = entry["expr"]
        if type(expr) is not dict or len(expr) != 1:
            return None
        ((kind, value),) = expr.items()
        if kind == "group" and type(value) is str:
            shown = '"group": ' + _encode_string(value)
        elif kind == "identity" and type(value) is int:
            shown = '"identity": ' + int.__repr__(value)
        else:
            return None
        texts.append(axis_head + int.__repr__(entry["axis"]) + expr_head + shown + axis_end)
    return separator.join(texts)


def _document_text(document: dict[str, Any]) -> str:
    """``json.dumps(document, indent=1)`` and a newline: :func:`_indented`'s text, or the standard encoder's."""
    parts: list[str] = []
    try:
        _indented(document, "\n", parts)
    except _NotPlainError:
        return json.dumps(document, indent=1) + "\n"
    parts.append("\n")
    return "".join(parts)


class _NotPlainError(Exception):
    """A value :func:`_indented` leaves to ``json.dumps``."""


_encode_string = json.encoder.encode_basestring_ascii  # the C function json.dumps uses (ensure_ascii)


def _scalar(value: Any) -> str:
    """A JSON scalar as ``json.dumps`` writes it (``NaN``/``Infinity`` for non-finite floats)."""
    if isinstance(value, str):
        return _encode_string(value)  # type: ignore[no-any-return]
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "Infinity" if value > 0 else "-Infinity"
        return float.__repr__(value)
    raise _NotPlainError


def _indented(value: Any, newline: str, parts: list[str], grouped: list[bool] | None = None) -> None:
    """Append ``value`` as ``json.dumps(..., indent=1)`` writes it at the indent ``newline`` ends with.

    With ``grouped``, its flag is set when an object inside (through objects and lists, as
    :meth:`PermutationKey.to_json` looks) has a ``grouped`` entry.
    """
    if isinstance(value, dict):
        if not value:
            parts.append("{}")
            return
        if grouped is not None and "grouped" in value:
            grouped[0] = True
        inner = newline + " "
        separator = "," + inner
        parts.append("{" + inner)
        first = True
        for name, item in value.items():
            if not isinstance(name, str):
                raise _NotPlainError  # json.dumps turns such keys into strings: leave that to it
            if not first:
                parts.append(separator)
            first = False
            kind = type(item)
            if kind is str:  # the common leaves, written here: no call per value
                parts.append(_encode_string(name) + ": " + _encode_string(item))
            elif kind is int:
                parts.append(_encode_string(name) + ": " + int.__repr__(item))
            else:
                parts.append(_encode_string(name) + ": ")
                _indented(item, inner, parts, grouped)
        parts.append(newline + "}")
    elif isinstance(value, (list, tuple)):
        if not value:
            parts.append("[]")
            return
        inner = newline + " "
        if all(type(item) is int for item in value):  # a permutation, a shape: one join
            parts.append("[" + inner + ("," + inner).join(map(int.__repr__, value)) + newline + "]")
            return
        within = grouped if isinstance(value, list) else None  # (to_json does not look inside tuples)
        separator = "," + inner
        parts.append("[" + inner)
        for position, item in enumerate(value):
            if position:
                parts.append(separator)
            _indented(item, inner, parts, within)
        parts.append(newline + "]")
    else:
        parts.append(_scalar(value))


# -- JSON ---------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays, paths and tuples turned into JSON types, recursively.

    Floats are left as they are (``json.dumps`` writes a non-finite one as ``NaN``/``Infinity``,
    as the CLI always did), so a document prints exactly as before.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def path_text(path: Path | None) -> str | None:
    """A path as the JSON documents show it (``None`` for a model in memory)."""
    return None if path is None else str(path)
