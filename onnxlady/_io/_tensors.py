"""A model's constant tensors: where each one is stored, and its values as numpy arrays.

Every part of onnxlady that reads or rewrites constants finds them here, so they all agree on
what a constant is and refuse the same things:

- :func:`tensor_holders` maps each constant of the main graph (initializers and the ``value``
  tensors of ``Constant`` nodes) to the ``TensorProto`` that stores it; permuting, resync,
  the audit and watermarking change those protos in place;
- :func:`require_loaded` refuses a tensor whose bytes still live in an external file that was
  never loaded (onnx would otherwise read it relative to the working directory, or write the
  stale reference back); :func:`is_external` is the test alone;
- :func:`read_array` gives the stored values as onnx reads them, a read-only view of the raw
  bytes where onnx allows it (no copy); :func:`read_float` gives them as float32 where float32
  holds every value exactly and as float64 otherwise (see :data:`EXACT_IN_FLOAT32`), which is
  how resync compares weights; :class:`FloatConstants` caches those float views per model and
  :func:`read_constants` reads every constant of a model at once;
- :func:`all_finite` tells whether an array holds no NaN or infinity, cheaply in the common
  all-finite case.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlady._errors import OnnxladyError
from onnxlady._io._external import is_mapped, mapped_array

__all__ = [
    "EXACT_IN_FLOAT32",
    "FloatConstants",
    "all_finite",
    "float_dtype",
    "integer_range",
    "is_external",
    "read_array",
    "read_constants",
    "read_float",
    "require_loaded",
    "tensor_holders",
]

#: Stored types whose every value a float32 holds exactly; anything else is read as float64.
EXACT_IN_FLOAT32: frozenset[int] = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.BOOL,
    }
)


def tensor_holders(model: onnx.ModelProto, *, subgraphs: bool = True) -> dict[str, onnx.TensorProto]:
    """Every constant tensor of the model by name: initializers and Constant node values.

    The protos returned are the model's own (not copies), so writing to one changes the model.
    An initializer wins over a Constant node of the same name; a Constant stored as
    ``value_float(s)``/``value_int(s)`` has no TensorProto and is not listed. The constants of
    subgraphs (If branches, Loop and Scan bodies, at any depth) follow the main graph's, where
    their names are not taken already: the analysis permutes them where it opened the bodies.

    Args:
        model: the model whose constants are wanted.
        subgraphs: also list the constants held inside subgraphs (False: the main graph's only,
            for instance the tensors a streaming writer can override).

    Returns:
        Tensor name -> the ``TensorProto`` holding its values: the main graph's initializers,
        its Constant nodes in graph order, then each subgraph's, depth first.
    """
    holders: dict[str, onnx.TensorProto] = {}
    _add_holders(model.graph, holders, subgraphs)
    return holders


def _add_holders(graph: onnx.GraphProto, holders: dict[str, onnx.TensorProto], subgraphs: bool) -> None:
    for tensor in graph.initializer:
        holders.setdefault(tensor.name, tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value":
                    holders.setdefault(node.output[0], attribute.t)
    if not subgraphs:
        return
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _add_holders(attribute.g, holders, subgraphs)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for nested in attribute.graphs:
                    _add_holders(nested, holders, subgraphs)


def is_external(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor``'s bytes live in an external file rather than in the proto itself."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def require_loaded(tensor: onnx.TensorProto, label: str) -> None:
    """Refuse a tensor whose external data was not loaded into the model.

    Args:
        tensor: the tensor about to be read or rewritten.
        label: how the message names it, e.g. ``"tensor 'w' of the suspect"``.

    A tensor left in its file on purpose (:func:`onnxlady._io._external.map_external_data`) is
    readable: :func:`read_array` maps it.

    Raises:
        OnnxladyError: ``"<label> still points to external data that was not loaded"``.
    """
    if is_external(tensor) and not is_mapped(tensor):
        raise OnnxladyError(f"{label} still points to external data that was not loaded")


def read_array(tensor: onnx.TensorProto, label: str) -> np.ndarray:
    """The tensor's values in their own dtype, as ``onnx.numpy_helper.to_array`` reads them.

    Raw-stored tensors come back as a read-only view of the proto's bytes (no copy); bfloat16
    and float8 as ml_dtypes arrays.

    Args:
        tensor: the tensor to read.
        label: how an error message names it (see :func:`require_loaded`).

    Returns:
        The values, shaped like the tensor.

    Raises:
        OnnxladyError: the tensor's external data was not loaded.
    """
    require_loaded(tensor, label)
    if is_mapped(tensor):  # left in its file: a read-only memory map, pages read as touched
        return mapped_array(tensor)
    return numpy_helper.to_array(tensor)


def read_constants(model: onnx.ModelProto, which: str) -> dict[str, np.ndarray]:
    """Every constant of the main graph (:func:`tensor_holders`) read by :func:`read_array`.

    Args:
        model: the model whose constants are read.
        which: how error messages name the model ("reference", "suspect").

    Returns:
        Tensor name -> its values in their stored dtype.

    Raises:
        OnnxladyError: a constant's external data was not loaded.
    """
    return {name: read_array(tensor, f"tensor '{name}' of the {which}") for name, tensor in tensor_holders(model).items()}


#: Integer types numpy does not know as integers (their dtype's kind is "V"): onnx reads INT4,
#: UINT4, INT2 and UINT2 as ml_dtypes arrays. Their range, by dtype name.
_SUBBYTE_INTEGERS: dict[str, tuple[int, int]] = {"int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3)}


def integer_range(dtype: np.dtype) -> tuple[int, int] | None:
    """The smallest and largest value of an integer (or bool) type, None for any other type.

    ``dtype.kind in "iub"`` misses int4 and friends (kind "V"): a test on the kind alone reads
    their values as floats with no zero point (held-out round 13, F1).
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return int(info.min), int(info.max)
    if dtype.kind == "b":
        return 0, 1
    return _SUBBYTE_INTEGERS.get(dtype.name) if dtype.kind == "V" else None


def float_dtype(data_type: int) -> type[np.floating]:
    """float32 for the stored types in :data:`EXACT_IN_FLOAT32`, float64 for every other one."""
    return np.float32 if data_type in EXACT_IN_FLOAT32 else np.float64


def read_float(tensor: onnx.TensorProto, label: str) -> np.ndarray:
    """The tensor's values as float32 (exact for 8- and 16-bit types) or float64.

    A float32 tensor comes back without a copy (a read-only view of its bytes); any other type
    is converted once.

    Args:
        tensor: the tensor to read.
        label: how an error message names it (see :func:`require_loaded`).

    Returns:
        The values as floats, shaped like the tensor.

    Raises:
        OnnxladyError: the tensor's external data was not loaded, or its values are not
            numbers (strings, an undefined type).
    """
    require_loaded(tensor, label)
    try:
        values = mapped_array(tensor) if is_mapped(tensor) else numpy_helper.to_array(tensor)
        return np.asarray(values.astype(float_dtype(tensor.data_type), copy=False))
    except (TypeError, ValueError) as exc:
        raise OnnxladyError(f"{label} cannot be read as numbers ({exc})") from exc


#: Elements per piece of :func:`all_finite`: its scratch buffer stays in the cache.
_FINITE_PIECE = 1 << 16

#: A float16's magnitude bits (all but the sign), and their value for infinity (exponent bits
#: all ones, mantissa zero): every magnitude from it on is infinite or NaN.
_HALF_MAGNITUDE, _HALF_INFINITY = np.uint16(0x7FFF), 0x7C00


def all_finite(values: np.ndarray) -> bool:
    """Whether ``values`` holds no NaN and no infinity.

    A contiguous float32 array is tested a piece at a time into one small buffer (no array as
    large as ``values`` is allocated; its float64 sum took three times as long as the test).
    Float16, which numpy tests value by value in software, is tested on its bits instead: a
    value is finite when its magnitude bits are below those of infinity. Other arrays (float64,
    whose sum is faster than the test) sum in float64 first, finite when every value is (a
    float32 sum cannot overflow it), and test each value only when the sum is not finite.
    """
    narrow = values.dtype in (np.float16, np.float32) and values.flags.c_contiguous
    flat = values.reshape(-1) if narrow else None
    if flat is None:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing or NaN sum is an answer, not a fault
            total = np.sum(values, dtype=np.float64)
        return bool(np.isfinite(total) or np.all(np.isfinite(values)))
    if flat.dtype == np.float16:
        words = flat.view(np.uint16)
        magnitudes = np.empty(min(words.size, _FINITE_PIECE), dtype=np.uint16)
        for start in range(0, words.size, _FINITE_PIECE):
            piece = magnitudes[: min(_FINITE_PIECE, words.size - start)]
            np.bitwise_and(words[start : start + _FINITE_PIECE], _HALF_MAGNITUDE, out=piece)
            if piece.max() >= _HALF_INFINITY:
                return False
        return True
    finite = np.empty(min(flat.size, _FINITE_PIECE), dtype=bool)
    for start in range(0, flat.size, _FINITE_PIECE):
        piece = finite[: min(_FINITE_PIECE, flat.size - start)]
        np.isfinite(flat[start : start + _FINITE_PIECE], out=piece)
        if not piece.all():
            return False
    return True


class FloatConstants:
    """Float views (:func:`read_float`) of one model's constants, each read once, on demand.

    A tensor left in its external file (:func:`onnxlady._io._external.is_mapped`) is read
    anew each time instead: memory then holds only the tensors in use.

    Attributes:
        holders: the model's constants by name (:func:`tensor_holders`).
        which: how messages name the model ("reference", "suspect").
    """

    def __init__(self, model: onnx.ModelProto, which: str, known: dict[str, np.ndarray] | None = None) -> None:
        """Read nothing yet.

        Args:
            model: the model whose constants are read.
            which: how messages name the model.
            known: constants a caller has read already (:func:`read_constants`), reused where
                they are what :func:`read_float` gives (float32 or float64 as stored, not mapped):
                a second copy of every weight is not read.
        """
        self.holders = tensor_holders(model)
        self.which = which
        self._cache: dict[str, np.ndarray] = {}
        for name, values in (known or {}).items():
            holder = self.holders.get(name)
            if holder is not None and not is_mapped(holder) and values.dtype == float_dtype(holder.data_type):
                self._cache[name] = values

    def array(self, name: str) -> np.ndarray:
        """Constant ``name`` as float32 or float64 (see :func:`read_float`).

        Raises:
            KeyError: the model has no constant ``name``.
            OnnxladyError: its external data was not loaded, or it does not hold numbers.
        """
        if name not in self._cache:
            values = read_float(self.holders[name], f"tensor '{name}' of the {self.which}")
            if is_mapped(self.holders[name]):
                return values  # not kept: a kept map holds its pages in memory (read again instead)
            self._cache[name] = values
        return self._cache[name]

    def check_finite(self, names: Iterable[str]) -> None:
        """The named constants must be finite: NaN matches nothing, Inf swamps every sum.

        Only the tensors a caller compares are checked; other constants may legitimately hold
        infinities (the ``-inf`` start value of a running maximum, an attention mask).

        Raises:
            OnnxladyError: one of them holds NaN or Inf (the message names it).
        """
        for name in names:
            if not all_finite(self.array(name)):
                raise OnnxladyError(f"tensor '{name}' of the {self.which} holds NaN or Inf values")
