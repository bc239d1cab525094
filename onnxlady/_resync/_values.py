"""Constants as their users read them, in float64, with a bound on each value's storage error.

Matching and resync across conversions compare numbers that two models store differently
(float16, bfloat16, int8 behind ``DequantizeLinear``, ONNX Runtime's packed ``MatMulNBits``
blocks). :func:`read_constant` reads a constant operand through its chain (the reshapes,
casts and dequantizations between the stored leaf and its user) as the user reads it, and
:class:`Approx` carries, beside every value, how far the exact number it stands for may be:
half a unit in the last place of its float type, half a quantization step behind a
dequantization. :func:`read_nbits` does the same for a ``MatMulNBits`` weight.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._tensors import integer_range, read_array

__all__ = ["COMPACT_TYPES", "Approx", "half_ulp", "nbits_layout", "read_constant", "read_nbits", "widened"]

#: Per stored float type (numpy dtype name): significand bits, with the implicit one, and the
#: smallest subnormal step.
_FLOAT_FORMATS = {
    "float16": (11, 2.0**-24),
    "bfloat16": (8, 2.0**-133),  # ml_dtypes, as onnx reads it
    "float32": (24, 2.0**-149),
    "float64": (53, 0.0),
}

#: The exponent bits of a float64: masking the rest leaves 2^floor(log2 |v|) (0 for 0).
_EXPONENT_BITS = np.int64(0x7FF0000000000000)


def half_ulp(values: np.ndarray, stored: np.dtype) -> np.ndarray:
    """Half a unit in the last place of each of ``values`` (float64) as stored in ``stored``.

    Zeros for exact types. With ``|v| = 2^k (1 + f)`` it is ``2^(k - bits)``, floored at the
    subnormal step (a converter may clamp a tiny value up to it rather than round it to zero);
    ``2^k`` is read off the exponent bits (``frexp`` or ``np.spacing`` cost ten times as much,
    and ``np.spacing`` in float16 is wrong for negative numbers).

    Args:
        values: the numbers, any shape.
        stored: the type they were stored in.

    Returns:
        An array of ``values``' shape: how far the number each was rounded from can be.
    """
    fmt = _FLOAT_FORMATS.get(np.dtype(stored).name)
    if fmt is None:
        return np.zeros(values.shape)
    bits, step = fmt
    # One new array, then in place: on large weights the page faults of each fresh array cost
    # more than the arithmetic.
    half = (np.ascontiguousarray(values, dtype=np.float64).view(np.int64) & _EXPONENT_BITS).view(np.float64)
    half *= 2.0**-bits
    # Floored at a whole subnormal step, not half: converters (onnxruntime.transformers.float16,
    # onnxconverter-common) clamp tiny nonzero values up to the smallest subnormal instead of
    # rounding them to zero. ascontiguousarray makes a 0-d scalar 1-d: give the bound its
    # value's shape back.
    return np.maximum(half, step, out=half).reshape(np.shape(values))


#: Float types that float64 holds exactly and numpy computes in natively: a value read compact
#: in one of them (:func:`read_constant`'s ``compact``) is the same numbers as its float64 read,
#: in a half or a quarter of the memory.
COMPACT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))

#: The bound of a value read without one (see :class:`Approx`): zeros, broadcast, never written.
_NO_BOUND = np.zeros(())
_NO_BOUND.flags.writeable = False


class Approx:
    """A constant as its user reads it, in float64, with a bound on its storage error.

    The bound is given (``error``), made when first read (``bound``: a function computing it,
    called at most once; a resync alone never reads most bounds, and each whole float64 array
    costs its page faults and its memory on large weights), or absent (neither: the value was
    read without it and ``error`` reads zeros). Treat both arrays as read-only values.
    """

    __slots__ = ("_bound", "_error", "value")

    def __init__(
        self, value: np.ndarray, error: np.ndarray | None = None, *, bound: Callable[[], np.ndarray] | None = None
    ) -> None:
        self.value = value
        self._error = error
        self._bound = bound

    @property
    def error(self) -> np.ndarray:
        """The bound: as given, made now (once) if it is made when read, zeros if absent."""
        if self._error is None:
            if self._bound is None:
                return np.broadcast_to(_NO_BOUND, self.value.shape)
            self._error, self._bound = self._bound(), None
        return self._error

    @property
    def bounded(self) -> bool:
        """Whether it carries a bound (given or made when read), not zeros for want of one."""
        return self._error is not None or self._bound is not None

    def __repr__(self) -> str:
        return f"Approx(value={self.value!r}, error={self.error!r})"

    def reshaped(self, shape: tuple[int, ...]) -> Approx:
        """The same numbers in another shape (the error bound follows)."""
        if not self.bounded:
            return Approx(self.value.reshape(shape))
        return Approx(self.value.reshape(shape), self.full_error().reshape(shape))

    def transposed(self, axes: tuple[int, ...]) -> Approx:
        """The same numbers with their axes reordered (``np.transpose``)."""
        if not self.bounded:
            return Approx(np.transpose(self.value, axes))
        return Approx(np.transpose(self.value, axes), np.transpose(self.full_error(), axes))

    def scaled(self, factor: float) -> Approx:
        """Every value times ``factor`` (the bound times ``|factor|``)."""
        if not self.bounded:
            return Approx(self.value * factor)
        return Approx(self.value * factor, self.full_error() * abs(factor))

    def full_error(self) -> np.ndarray:
        """The bound in the value's shape: itself where it has it.

        A view of it then stays writable wherever the value's view does, so the two are copied,
        or not, alike (see stored_operand).
        """
        error = self.error
        return error if error.shape == self.value.shape else np.broadcast_to(error, self.value.shape)


def _spread(parameter: np.ndarray, node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    """A (De)QuantizeLinear scale broadcast to its data's shape (per tensor, per axis or blocked)."""
    if parameter.size == 1:
        return np.broadcast_to(parameter.reshape(()), shape)
    rank = len(shape)
    axis = int(node_attribute(node, "axis", 1)) % max(rank, 1)
    block = int(node_attribute(node, "block_size", 0))
    if block:
        return np.repeat(parameter, block, axis=axis).take(range(shape[axis]), axis=axis)
    view = [1] * rank
    view[axis] = -1
    return np.broadcast_to(parameter.reshape(view), shape)


def _clipped(graph: ModelGraph, node: onnx.NodeProto) -> np.ndarray | None:
    """Where a DequantizeLinear's stored integers may stand for a number one whole step away.

    A symmetric quantizer of a signed type with ``2^b`` levels (``-2^(b-1) .. 2^(b-1) - 1``, zero
    point 0) may map the block's largest magnitude to ``-2^(b-1)``: ONNX Runtime's int4 block
    quantizer (``MatMulNBitsQuantizer``, MatMulNBits and QDQ forms) takes ``scale = w / -8`` for
    the value ``w`` of largest magnitude. A value of the other sign and up to the same magnitude
    then stands ``8`` steps from zero and is clipped to ``7``: up to one step away, where every
    other stored integer lies within half a step (held-out round 13, F1). So the integers at the
    type's largest value, with no zero point or a zero one, get a bound of one step; None when
    no integer is there (an unsigned type, a nonzero zero point, no value at the maximum), and
    outside that quantizer's forms (blocks, or int4): per-tensor and per-axis int8 quantizers
    (ONNX Runtime's static one quantizes int8 symmetrically to -127..127) round within half a step.
    """
    if not int(node_attribute(node, "block_size", 0)) and graph.dtypes.get(node.input[0]) != onnx.TensorProto.INT4:
        return None  # (before reading the integers: an int8 weight's stay unread and uncached)
    data = graph.constant_value(node.input[0])
    limits = integer_range(data.dtype) if data is not None else None
    if data is None or limits is None or limits[0] >= 0:
        return None
    zero = graph.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None and np.any(zero.astype(np.int64) != 0):
        return None
    at_top = data.astype(np.int8 if data.dtype.itemsize == 1 else np.int64) == limits[1]
    return at_top if at_top.any() else None


def read_constant(graph: ModelGraph, name: str, bounds: bool = True, compact: bool = False) -> Approx | None:
    """The constant ``name`` as its user reads it, with the error bound of its storage.

    Args:
        graph: the model.
        name: an input name of some node.
        bounds: compute the bound; without, the value carries none (its ``error`` reads zeros:
            for callers that use the value alone, such as the matching's signatures and the
            resync, whose bounds are made only when read).
        compact: without bounds, where the float64 value would be a conversion of an array in
            one of :data:`COMPACT_TYPES` (the stored tensor, or what its chain gives, such as a
            dequantized weight), return that array instead: ``value.astype(np.float64)`` is
            the float64 read, bit for bit and in the same layout. Resync across conversions
            keeps the weights it compares so and converts only the slices it computes with
            (:func:`widened`): whole float64 copies of both models were most of its memory.
            The array is read-only: a view of the model's bytes or the graph's own cached
            value, never to be written.

    Returns:
        The value through its chain (casts, reshapes, dequantization) in float64 (or compact)
        and the bound, or None when ``name`` is computed or its values cannot be read as
        numbers. A float64 value is a fresh array, shared with nothing.
    """
    leaf = graph.constant_leaf(name) if name else None
    if leaf is None:
        return None
    tensor = graph.leaf_tensor_or_none(leaf)
    if tensor is None:
        return None
    raw = read_array(tensor, f"tensor '{leaf.name}'")
    shape = raw.shape
    compact = compact and not bounds
    if compact and not leaf.chain and raw.dtype in COMPACT_TYPES:
        return Approx(raw)
    if leaf.chain and raw.dtype.kind in "iub":
        # Integers (quantized weights) are exact and their chain gives the value: neither is
        # made whole here (each whole float64 array costs its page faults on large weights).
        current = None
        error: np.ndarray = np.broadcast_to(np.zeros(()), shape)
    else:
        try:  # bfloat16 and float8 arrive as ml_dtypes arrays, which convert like the rest
            current = raw.astype(np.float64)
        except (TypeError, ValueError):
            return None
        error = half_ulp(current, raw.dtype) if bounds else np.broadcast_to(np.zeros(()), shape)
    for index in leaf.chain:
        node = graph.nodes[index]
        out = graph.constant_value(node.output[0])
        if out is None:
            return None
        # A copy even where the value already is float64: what is returned is owned by no
        # model's cache, so callers may hand it on without copying it (see stored_operand).
        out64 = out if compact else np.array(out, dtype=np.float64)  # compact: only its shape is read here
        op = node.op_type
        if op == "DequantizeLinear":
            scale = graph.constant_value(node.input[1])
            if scale is None:
                return None
            # The stored integers are exact; the number they stand for lies within half a step
            # (of each scale, then spread over the data: the same numbers, not made whole),
            # or one step where a symmetric quantizer clipped it (see _clipped).
            if bounds:
                error = _spread(0.5 * np.abs(np.asarray(scale, dtype=np.float64)), node, out64.shape)
                clipped = _clipped(graph, node)
                if clipped is not None:
                    error = np.where(clipped, 2.0 * error, error)
        elif op == "QuantizeLinear":
            if bounds:
                error = np.zeros(out64.shape)
        elif op == "Mul":
            data = graph.chain_data_slot(index)
            factor = graph.constant_value(node.input[1 - (data or 0)])
            if factor is None:
                return None
            if bounds:
                error = np.broadcast_to(error, out64.shape) * np.abs(np.asarray(factor, dtype=np.float64))
        elif bounds and error.size == out64.size:
            error = np.broadcast_to(error, shape).reshape(out64.shape)
        elif bounds:  # Expand: every copy carries its source's error
            error = np.broadcast_to(error.reshape(shape), out64.shape)
        if bounds:
            bound = half_ulp(out64, np.asarray(out).dtype)  # a fresh array of out64's shape
            error = np.add(bound, error, out=bound)  # error + bound, in place (a sum commutes)
        else:
            error = np.broadcast_to(np.zeros(()), out64.shape)
        current, shape = out64, out64.shape
    assert current is not None  # a chain made it, or it was read
    if compact and current.dtype not in COMPACT_TYPES:
        current = np.array(current, dtype=np.float64)  # what the float64 read gives
    if not bounds:
        return Approx(current)
    # A full bound is a fresh array here, like the value: returned as it is, not as a read-only
    # view (which its readers would copy again, see stored_operand).
    return Approx(current, error if error.shape == current.shape else np.broadcast_to(error, current.shape))


def widened(value: Approx) -> Approx:
    """``value`` with its numbers in float64 (itself when they are; a compact read converted, bound kept).

    The conversion keeps the array's layout (``order="K"``), as the float64 read it stands for
    has it: sums over it then run in the same order.
    """
    if value.value.dtype == np.float64:
        return value
    wide = value.value.astype(np.float64)
    return Approx(wide, value.full_error()) if value.bounded else Approx(wide)


# -- MatMulNBits ------------------------------------------------------------------------------
def nbits_layout(node: onnx.NodeProto) -> tuple[int, int, int, int, int] | None:
    """``(N, K, bits, block_size, blocks)`` of a ``MatMulNBits`` node, or None if malformed."""
    k, n = int(node_attribute(node, "K", 0)), int(node_attribute(node, "N", 0))
    bits, block = int(node_attribute(node, "bits", 4)), int(node_attribute(node, "block_size", 0))
    if bits not in (2, 4, 8) or k <= 0 or n <= 0 or block <= 0 or block * bits % 8:
        return None
    return n, k, bits, block, -(-k // block)


def _unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit fields of ``bits`` bits from uint8 bytes, one new last axis."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)


def read_nbits(graph: ModelGraph, index: int) -> Approx | None:
    """A ``MatMulNBits`` weight dequantized, ``[N, blocks, bytes per block, values per byte]``.

    That layout keeps B's stored axes (rows, blocks, bytes) where the analysis permutes them,
    with the values sharing a byte on a last axis; ``value.reshape(N, -1)[:, :K]`` is the weight
    as rows. Each value is within one quantization step of the number it stands for (half a step
    of rounding, half a step more where a rounded zero point clamped the block's range).

    Args:
        graph: the model.
        index: the ``MatMulNBits`` node.

    Returns:
        The dequantized weight, or None when an operand is computed, ``g_idx`` reorders the
        input features, or the layout is not the one the operator documents.
    """
    node = graph.nodes[index]
    layout = nbits_layout(node)
    if layout is None or len(node.input) < 3 or (len(node.input) > 4 and node.input[4]):
        return None
    n, _, bits, block, blocks = layout
    packed = graph.constant_value(node.input[1])
    scales = graph.constant_value(node.input[2])
    if packed is None or scales is None or packed.dtype != np.uint8 or packed.size != n * blocks * block * bits // 8:
        return None
    fields = _unpack_bits(packed.reshape(n, blocks, -1), bits).astype(np.float64)  # [N, blocks, bytes, per byte]
    zero_name = node.input[3] if len(node.input) > 3 else ""
    zero_value = graph.constant_value(zero_name) if zero_name else None
    if zero_name and zero_value is None:
        return None
    if zero_value is None:
        zero = np.full((n, blocks), float(1 << (bits - 1)))
    elif zero_value.dtype == np.uint8:
        zero = _unpack_bits(zero_value.reshape(n, -1), bits).reshape(n, -1)[:, :blocks].astype(np.float64)
    else:
        zero = np.asarray(zero_value, dtype=np.float64).reshape(n, blocks)
    scale = np.asarray(scales, dtype=np.float64).reshape(n, blocks)
    value = (fields - zero[:, :, None, None]) * scale[:, :, None, None]
    # Half a step of rounding, and up to half a step more at the ends of a block's range, which
    # an asymmetric quantizer's rounded zero point clamps (ONNX Runtime GenAI's builder does).
    error = np.broadcast_to(np.abs(scale)[:, :, None, None], value.shape)
    return Approx(value, error)
