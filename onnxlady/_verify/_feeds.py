"""Inputs the user gives verify: a file of feeds, or a Python function yielding them.

* ``load_inputs=PATH``: a JSON file in Polygraphy's format (a list of feed dicts, as written by
  ``polygraphy run --save-inputs``; read with Polygraphy's own ``polygraphy.json.load_json``), or a
  ``.npz`` archive holding one array per input name (one feed).
* ``data_loader_script="file.py:function"``: like Polygraphy's ``--data-loader-script``, the
  function (``load_data`` when no name is given) is called without arguments and returns an
  iterable of feed dicts; they are read one at a time, so a long loader is not held in memory.

Every array is checked against the model: known input name, declared rank and fixed dimensions,
an element type it can be cast to without changing its values.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._verify._inputs import InputPlan

#: Polygraphy's default function name for ``--data-loader-script``.
DEFAULT_LOADER_FUNCTION = "load_data"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_input_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The feeds stored in ``path``: Polygraphy JSON (a list of feed dicts, or one) or ``.npz``.

    Raises:
        OnnxladyError: a missing or unreadable file, an unknown suffix, content that is not feeds,
            or Polygraphy not installed for a JSON file.
    """
    file = Path(path)
    if not file.is_file():
        raise OnnxladyError(f"input file {str(file)!r}: no such file")
    suffix = file.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(file, allow_pickle=False) as archive:
                feeds: Any = [{name: archive[name] for name in archive.files}]
        except Exception as exc:  # zipfile, ValueError, OSError: not a usable archive
            raise OnnxladyError(f"input file {str(file)!r} is not a readable .npz archive: {_first_line(exc)}") from exc
    elif suffix == ".json":
        try:
            from polygraphy.json import load_json
        except ImportError as exc:
            raise OnnxladyError(
                f"input file {str(file)!r}: reading Polygraphy's JSON format needs the polygraphy package "
                "(pip install polygraphy), or give the inputs as a .npz archive"
            ) from exc
        try:
            feeds = load_json(str(file), description="input data")
        except Exception as exc:  # JSON, base64 and NumPy errors: not Polygraphy input data
            raise OnnxladyError(
                f"input file {str(file)!r} is not Polygraphy input data (a JSON list of feed dicts): {_first_line(exc)}"
            ) from exc
        if isinstance(feeds, Mapping):
            feeds = [feeds]
    else:
        raise OnnxladyError(f"input file {str(file)!r}: expected a .json file in Polygraphy's format or a .npz archive")
    if not isinstance(feeds, list) or not feeds or not all(isinstance(f, Mapping) for f in feeds):
        raise OnnxladyError(f"input file {str(file)!r} holds no feeds: expected a list of {{input name: array}} dicts")
    return [dict(f) for f in feeds]


def script_feeds(spec: str) -> tuple[str, Iterator[Any]]:
    """Run ``file.py:function`` and return ``(label, the feeds it yields)``.

    Raises:
        OnnxladyError: a missing script, an error while importing or calling it, a missing or
            non-callable function, or a result that is not iterable.
    """
    text = str(spec)
    script, sep, function = text.rpartition(":")
    if not sep or not script.endswith(".py") or not function.isidentifier():
        script, function = text, DEFAULT_LOADER_FUNCTION
    path = Path(script)
    label = f"data loader script {script}:{function}"
    if not path.is_file():
        raise OnnxladyError(f"{label}: no such file")
    module_name = f"_onnxlady_data_loader_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise OnnxladyError(f"{label} fails on import: not a Python file")
    try:
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
        try:
            module_spec.loader.exec_module(module)
        finally:
            sys.modules.pop(module_name, None)
    except Exception as exc:  # whatever the user's script raises
        raise OnnxladyError(f"{label} fails on import: {_first_line(exc)}") from exc
    loader = getattr(module, function, None)
    if not callable(loader):
        raise OnnxladyError(f"{label}: the script defines no function {function!r}")
    try:
        feeds = loader()
        iterator = iter(feeds)
    except Exception as exc:  # whatever the user's function raises
        raise OnnxladyError(f"{label} fails: {_first_line(exc)}") from exc
    return label, _guarded(iterator, label)


def _guarded(iterator: Iterator[Any], label: str) -> Iterator[Any]:
    """The script's feeds, its exceptions turned into OnnxladyError."""
    for number in itertools.count(1):
        try:
            feed = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # whatever the user's generator raises
            raise OnnxladyError(f"{label} fails on feed {number}: {_first_line(exc)}") from exc
        yield feed


def coerce_feed(
    feed: Any, plans: Mapping[str, InputPlan], declared: Mapping[str, Sequence[int | None] | None], source: str
) -> dict[str, np.ndarray]:
    """Check one user feed against the model and cast its arrays to the inputs' element types.

    Args:
        feed: ``{input name: array-like}``.
        plans: The model's input plans by name (element types).
        declared: Each input's declared dims (None for dynamic ones), None when the rank is unknown.
        source: Names the feed in messages (``input file x.json, feed 2``).

    Returns:
        ``{input name: array}`` with the model's element types; inputs the feed lacks are absent.

    Raises:
        OnnxladyError: not a dict, an unknown input name, a wrong rank or fixed dimension, or an
            array whose values the input's type cannot hold.
    """
    if not isinstance(feed, Mapping):
        raise OnnxladyError(f"{source} is a {type(feed).__name__}, not a dict of {{input name: array}}")
    arrays: dict[str, np.ndarray] = {}
    for name, value in feed.items():
        plan = plans.get(str(name))
        if plan is None:
            listing = ", ".join(repr(n) for n in plans) or "none"
            raise OnnxladyError(f"{source} feeds {name!r}, which is not an input of the model (its inputs: {listing})")
        try:
            array = np.asarray(
                value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else value
            )
        except Exception as exc:  # an object NumPy cannot convert
            raise OnnxladyError(f"{source}: input {name!r} is not an array: {_first_line(exc)}") from exc
        dims = declared.get(plan.name)
        if dims is not None:
            if array.ndim != len(dims):
                raise OnnxladyError(
                    f"{source}: input {name!r} has shape {list(array.shape)} but the model declares rank {len(dims)}"
                )
            for axis, (size, fixed) in enumerate(zip(array.shape, dims)):
                if fixed is not None and size != fixed:
                    raise OnnxladyError(
                        f"{source}: input {name!r} has dimension {axis} = {size} but the model fixes it at {fixed}"
                    )
        arrays[plan.name] = _cast(array, plan, f"{source}: input {name!r}")
    return arrays


def _cast(array: np.ndarray, plan: InputPlan, what: str) -> np.ndarray:
    """``array`` as the input's element type, refusing a cast that would change integer or boolean values."""
    target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(plan.elem))
    if array.dtype == target:
        return array
    if array.dtype.kind not in "biuf" and array.dtype.name != "bfloat16":
        raise OnnxladyError(f"{what} holds {array.dtype} values; the model takes {plan.dtype}")
    if target.kind in "f" or target.name == "bfloat16":
        return array.astype(target)  # float inputs: rounding to the input's precision is what the model sees
    cast = array.astype(target)
    if array.dtype.kind == "f" and not np.array_equal(cast.astype(np.float64), array.astype(np.float64)):
        raise OnnxladyError(f"{what} holds non-integral or out-of-range values; the model takes {plan.dtype}")
    if array.dtype.kind in "biu" and not np.array_equal(cast.astype(array.dtype), array):
        raise OnnxladyError(f"{what} holds values outside the range of {plan.dtype}, the model's type")
    return cast
