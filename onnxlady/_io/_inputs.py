"""Opening input files that are not models: regular files only, JSON with bounded nesting.

A FIFO or a device given as an input would block a reader forever (or stream without end), so
every input is checked with ``os.stat`` before it is opened. JSON documents (keys, permutation
files) are checked for nesting depth before they are parsed: Python's parser recurses once per
level and a 100,000-deep document would end in ``RecursionError``. Non-finite numbers
(``NaN``, ``Infinity``, ``1e400``) are refused while parsing.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from onnxlady._errors import OnnxladyError

__all__ = ["MAX_JSON_DEPTH", "load_json", "refuse_special_file", "require_regular_file"]

#: Deepest nesting a key or permutation file may have (a key needs about ten levels).
MAX_JSON_DEPTH = 64
#: Largest JSON input read (a key of a model with millions of neurons stays far below).
_MAX_JSON_BYTES = 1 << 30
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSE = np.frombuffer(b"]}", dtype=np.uint8)
#: Each byte's change of nesting depth: +1 for ``[`` and ``{``, -1 for ``]`` and ``}``.
_STEPS = np.zeros(256, dtype=np.int8)
_STEPS[_OPEN] = 1
_STEPS[_CLOSE] = -1
#: Every byte but brackets and quotes.
_NOT_STRUCTURE = bytes(code for code in range(256) if code not in b'[]{}"')


def require_regular_file(path: str | os.PathLike[str], what: str = "file") -> os.stat_result:
    """Check that ``path`` is a regular file without opening it (a FIFO would block ``open``).

    Args:
        path: the file (symlinks are followed).
        what: how messages name it.

    Returns:
        Its ``os.stat`` result.

    Raises:
        OnnxladyError: it does not exist, is a folder, a FIFO, a device or a socket, or its
            name cannot be looked up (too long, a NUL byte...).
    """
    shown = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise OnnxladyError(f"{shown}: no such file") from None
    except ValueError as exc:  # an embedded NUL byte
        raise OnnxladyError(f"{shown!r}: not a usable path ({exc})") from None
    except OSError as exc:
        raise OnnxladyError(f"{_short(shown)}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise OnnxladyError(f"{shown}: is a folder, not {_article(what)} {what}")
    if not stat.S_ISREG(info.st_mode):
        raise OnnxladyError(f"{shown}: not a regular file (FIFOs, devices and sockets are refused as a {what})")
    return info


def refuse_special_file(path: str | os.PathLike[str], what: str = "file") -> None:
    """Refuse a FIFO, device, folder or unusable name; a missing file is left to the caller's reader.

    For readers that report a missing file in their own words but would block on a FIFO or fail
    with an ``OSError`` on a name the file system refuses.

    Raises:
        OnnxladyError: ``path`` exists and is not a regular file, or cannot be looked up.
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        pass
    require_regular_file(path, what)


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:80] + "..." + text[-40:]


def load_json(path: str | os.PathLike[str], what: str = "JSON file", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a JSON file whose nesting is at most ``max_depth`` and whose numbers are finite.

    Args:
        path: the file.
        what: how messages name it (``"key file"``...).
        max_depth: the deepest nesting of arrays and objects accepted.

    Returns:
        The parsed document.

    Raises:
        OnnxladyError: the file is missing, not a regular file, too big, not UTF-8 JSON, nested
            too deeply, or holds a non-finite number.
    """
    info = require_regular_file(path, what)
    if info.st_size > _MAX_JSON_BYTES:
        raise OnnxladyError(f"{path}: {info.st_size} bytes is too big for a {what}")
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise OnnxladyError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return parse_json(raw, f"{path}", what, max_depth)


def parse_json(raw: bytes, origin: str, what: str = "JSON file", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON bytes with the checks of :func:`load_json` (``origin`` names them in messages)."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise OnnxladyError(f"{origin}: not a {what} (JSON nested {depth} levels deep, at most {max_depth} allowed)")
    try:
        return json.loads(raw.decode("utf-8"), parse_float=_finite_float, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise OnnxladyError(f"{origin}: not a {what} (not UTF-8 text: {exc.reason})") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise OnnxladyError(f"{origin}: not a {what} ({exc})") from None


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings ignored)."""
    if b"\\" not in raw:
        # No escape anywhere: every string is a quote, its text, a quote. Of the brackets and
        # quotes alone, a string without brackets is two quotes in a row; with every such pair
        # gone and no quote left, no string held a bracket, and what is left is the structure.
        # Two passes in C over the bytes, where the pattern's took a third of reading a 50k-node key.
        structure = raw.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
        if b'"' not in structure:
            if not structure:
                return 0
            return int(max(0, np.cumsum(_STEPS[np.frombuffer(structure, dtype=np.uint8)], dtype=np.int64).max()))
    stripped = _STRING.sub(b'""', raw)
    codes = np.frombuffer(stripped, dtype=np.uint8)
    if codes.size == 0:
        return 0
    steps = np.isin(codes, _OPEN).astype(np.int64) - np.isin(codes, _CLOSE).astype(np.int64)
    return int(max(0, np.cumsum(steps).max()))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not a number JSON allows")


def _article(noun: str) -> str:
    """"a" or "an" before ``noun`` as it is read aloud ("an ONNX file", "a key")."""
    return "an" if noun[:1].lower() in "aeio" or noun[:4] == "ONNX" else "a"
