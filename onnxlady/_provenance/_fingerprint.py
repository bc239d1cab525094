"""Permutation-invariant fingerprints of a model's neurons, and the distance between two of them.

A registry search cannot resync a suspect against every entry; it needs a record per model that
any derivative of it (permuted, converted, perturbed) keeps and that another model does not
share. The paper's insight gives it: a model's neurons, up to order, are its identity. So each
*producer layer* (a Conv/ConvTranspose/Gemm/MatMul with a constant weight) is reduced to
statistics of its neurons that depend neither on their order nor on the order of its inputs,
and the model to the sequence of those layer records.

Which layers (:func:`producer_weights`)
    The units of :func:`onnxlady._resync._match.find_units` (standard Conv, ConvTranspose, Gemm,
    MatMul; their weight read through Identity/Cast/DequantizeLinear/weight-only ``Mul`` chains,
    so float16, bfloat16 and QDQ int8 weights arrive as the real numbers their user reads),
    plus the forms an optimizer or a quantizer writes: ``com.microsoft`` FusedConv, FusedGemm,
    FusedMatMul (``transA``/``transB``) and MatMulNBits (2-8 bit blocks, scales, zero points),
    QLinearConv/QLinearMatMul (weight minus zero point, times scale), ConvInteger/MatMulInteger
    (weight minus zero point: their scale is applied later, on the activations), and a
    Gemm/MatMul whose weight is a ``Transpose`` of a constant (tied language-model heads, which
    ORT's optimizer folds into a stored transposed copy). Layers come in the graph's
    topological order.

Common form
    Every weight becomes a 2-D matrix with one neuron per row (or per column: a MatMul's
    ``[K, N]`` weight is read as stored, not transposed): a neuron's inputs are its input
    channels times kernel positions for a convolution (per group for grouped ConvTranspose).
    Where a BatchNormalization follows the layer (the unit's ``batchnorm``), its per-neuron
    scale ``gamma / sqrt(var + eps)`` is folded in, so a model and its BN-folded copy
    (``fold_batchnorm``, ORT's ConvBN fusion, FusedConv) give the same statistics. Statistics
    come from a few float32 ``einsum`` passes over the weight as stored, combined in float64.

Fields of a layer record (each sorted field resampled to :data:`RESAMPLE` values by
area-preserving resampling of its quantile function, so layers of any width give records of
one length), per neuron ``i`` with weights ``w_i``, ``rms_i = sqrt(mean(w_i^2))`` (times the
BatchNorm scale), ``u_i = w_i / rms_i``:

=============== ============================================================ ===================================
field           what                                                         what breaks it
=============== ============================================================ ===================================
``level``       ``log`` of the median ``rms_i``                               any rescale of the layer (ConvInteger's
                                                                             scale applied later, a Mul folded in by
                                                                             an optimizer); noise adds ``OMEGA^2/2``
``norms``       sorted ``rms_i / median``                                     per-neuron rescales the common form
                                                                             cannot see (ORT folding a per-channel
                                                                             ``Mul`` into a Conv), fine-tuning
``mean``        sorted ``mean(w_i) / rms_i``                                  negative per-neuron scales (sign)
``cosine``      sorted cosine of ``u_i`` to the mean of the ``u``             negative per-neuron scales
``colmean``     sorted per input: mean over neurons of ``u`` / its rms         negative per-neuron scales
``columns``     sorted per input: rms over neurons of ``u``                    strong fine-tuning
``skew``        sorted per-neuron skewness                                   negative per-neuron scales
``kurtosis``    sorted per-neuron ``log`` kurtosis                           pruning (moves it up, uniformly)
``peak``        sorted ``log max|w_i| / rms_i``                               int4 or coarser quantization
=============== ============================================================ ===================================

All fields are invariant to a permutation of the layer's neurons (they are sorted) and of its
inputs (per-neuron statistics are symmetric functions of the neuron's weights; per-input
statistics are sorted over inputs), so a permuted copy has the same record up to float
rounding. Every field but ``level`` and ``norms`` (:data:`SCALE_FIELDS`) is also invariant to
positive per-neuron scales (a BatchNorm or Mul folded where the common form cannot see it, a
function-preserving rescale); the distance caps what those two can add (:data:`SCALE_CAP`).
Noise, int8 quantization, float16/bfloat16 and pruning move every field a little; how much,
and how far apart unrelated models of the same architecture are, is what
:data:`FIELD_SCALES` and :data:`FIELD_WEIGHTS` record (calibrated by ``python3 -m
tools.registry_experiment --calibrate``).

Left out on purpose: a histogram of normalized weights (magnitude pruning puts a spike at zero
that moves it more than the gap between unrelated models), per-neuron mean absolute value
(same reason) and statistics read in the order of another one (``kurtosis`` in ``norms``
order: near-ties swap under noise, and these moved as far for a derivative as for an
unrelated model).

Distance (:func:`compare_fingerprints`)
    Per pair of layers of the same shape (``neurons, fan_in, kernel, groups``): the root of the
    weighted mean over fields of each field's mean squared difference divided by its scale
    squared, then divided by :func:`unrelated_gap` of the shape, so that 1 means "as far as two
    unrelated layers of this shape" whatever the shape (the raw gaps shrink with width and
    fan-in, those of derivatives and of unrelated layers alike). The two layer sequences are
    paired by a minimum-cost assignment within :data:`ALIGN_WINDOW` positions (optimizers
    reorder parallel branches: ORT emits ``k_proj`` before ``q_proj``); a layer left without
    partner costs :data:`UNMATCHED_COST`. The model distance is the root mean square over pairs
    and unpaired layers.

What breaks the fingerprint as a whole: retraining from scratch (by design: that is another
model), structural edits that change most layer shapes (distillation, removing neurons), and
rewrites that pack layers together (ORT's Attention fusion concatenating Q, K and V): those
layers stay unpaired and cost the unpaired cost. Limits of the measure: unrelated models of
one architecture differ only by their own sampling of weights, a gap that shrinks with layer
width like the gaps of derivatives do; in the registry experiment (random-weight fixtures,
layers of 3 to 64 neurons) the two stayed a factor 2 apart. Trained models differ far more
than random ones.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from scipy.optimize import linear_sum_assignment

from onnxlady._errors import OnnxladyError
from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph, node_label
from onnxlady._resync._across import _batchnorm
from onnxlady._resync._match import find_units

__all__ = [
    "FIELDS",
    "FINGERPRINT_VERSION",
    "LayerMatch",
    "ModelFingerprint",
    "ProducerWeight",
    "compare_fingerprints",
    "fingerprint_distance",
    "fingerprint_model",
    "layer_record",
    "producer_weights",
    "resample",
    "search_vector",
]

#: Version of the fields and their layout; a fingerprint of another version is not compared.
FINGERPRINT_VERSION = 1
#: Values per sorted field.
RESAMPLE = 16
#: First bytes of a serialized fingerprint.
_MAGIC = b"ONNXLADY-FP\x00"

#: (name, length) of each field of a layer record, in storage order.
FIELDS: tuple[tuple[str, int], ...] = (
    ("level", 1),
    ("norms", RESAMPLE),
    ("mean", RESAMPLE),
    ("cosine", RESAMPLE),
    ("colmean", RESAMPLE),
    ("columns", RESAMPLE),
    ("skew", RESAMPLE),
    ("kurtosis", RESAMPLE),
    ("peak", RESAMPLE),
)
SLICES: dict[str, slice] = {}
_offset = 0
for _name, _length in FIELDS:
    SLICES[_name] = slice(_offset, _offset + _length)
    _offset += _length
#: Length of a layer record.
LAYER_WIDTH = _offset
_SORTED_FIELDS = tuple(name for name, length in FIELDS if length == RESAMPLE)

#: Per field, the typical RMS gap between a model's layers and those of its farthest derivative
#: in the registry experiment (noise OMEGA = 0.1 or 30 % pruning; median over references):
#: differences are measured in these units.
FIELD_SCALES: dict[str, float] = {
    "level": 0.0111,
    "norms": 0.0169,
    "mean": 0.0138,
    "cosine": 0.0172,
    "colmean": 0.0181,
    "columns": 0.0111,
    "skew": 0.0429,
    "kurtosis": 0.0348,
    "peak": 0.0236,
}
#: Per field, its weight in the distance: the square of how many times farther an unrelated
#: model of the same architecture is than a derivative (a Fisher-like ratio; median over the
#: registry experiment's references), printed by ``python3 -m tools.registry_experiment
#: --calibrate``.
FIELD_WEIGHTS: dict[str, float] = {
    "level": 10.6,
    "norms": 7.7,
    "mean": 29.4,
    "cosine": 11.7,
    "colmean": 20.4,
    "columns": 12.3,
    "skew": 12.2,
    "kurtosis": 6.5,
    "peak": 6.0,
}
#: Expected raw distance between the records of two unrelated layers of ``neurons x fan_in``
#: (independent random weights): ``G * neurons^-A * fan_in^-B`` for ``(G, A, B)`` here. Layer
#: distances are divided by it, so 1 means "as far apart as two unrelated layers" for every shape.
UNRELATED_GAP = (63.6, 0.449, 0.411)
#: Cost of a layer with no partner: as far as an unrelated layer.
UNMATCHED_COST = 1.0
#: Most the scale-dependent fields add to a layer's distance (about a noisy copy's gap).
SCALE_CAP = 1.5
#: Layers pair only within this many positions of each other (after scaling the two depths).
ALIGN_WINDOW = 3

_TINY = 1e-30
_MS_DOMAIN = "com.microsoft"


# -- producer weights in common form --------------------------------------------------------
@dataclass(frozen=True)
class ProducerWeight:
    """One producer layer's weight in common form (see the module docstring).

    Attributes:
        node: index of the layer's node in the graph.
        name: the node's label (its name, or ``op_type#index``).
        op_type: the operator, ``domain::op`` for operators outside the standard domain.
        matrix: float32 2-D weight; its neurons run along ``neuron_axis``, their inputs along
            the other axis (a view of the stored weight where its layout allows: a MatMul's
            ``[K, N]`` weight is not transposed).
        neuron_axis: 0 or 1.
        kernel: spatial positions per input channel (1 for Gemm/MatMul).
        groups: the convolution's ``group`` attribute (1 otherwise).
        row_scale: per-neuron factor of a folded BatchNorm (``gamma / sqrt(var + eps)``),
            applied by :func:`layer_record` without writing the product; None without one.
    """

    node: int
    name: str
    op_type: str
    matrix: np.ndarray
    neuron_axis: int
    kernel: int
    groups: int
    row_scale: np.ndarray | None = None

    @property
    def neurons(self) -> int:
        return int(self.matrix.shape[self.neuron_axis])

    @property
    def fan_in(self) -> int:
        return int(self.matrix.shape[1 - self.neuron_axis])

    def rows(self) -> np.ndarray:
        """The weight as a ``(neurons, fan_in)`` float32 matrix, BatchNorm scale applied."""
        rows = self.matrix if self.neuron_axis == 0 else self.matrix.T
        if self.row_scale is not None:
            rows = rows * self.row_scale.astype(np.float32)[:, None]
        return np.ascontiguousarray(rows, dtype=np.float32)


def _conv_rows(weight: np.ndarray) -> tuple[np.ndarray, int]:
    """Conv weight ``(out, in/g, *k)``: a row per output channel."""
    kernel = int(np.prod(weight.shape[2:])) if weight.ndim > 2 else 1
    return weight.reshape(weight.shape[0], -1), kernel


def _conv_transpose_rows(weight: np.ndarray, groups: int) -> tuple[np.ndarray, int]:
    """ConvTranspose weight ``(in, out/g, *k)`` as rows over output channels.

    Output channel ``g * out/g + j`` reads the inputs of group ``g`` only.
    """
    cin, per_group = weight.shape[:2]
    kernel = int(np.prod(weight.shape[2:])) if weight.ndim > 2 else 1
    grouped = weight.reshape(groups, cin // groups, per_group, kernel)
    return np.moveaxis(grouped, 2, 1).reshape(groups * per_group, -1), kernel


def _axis_matrix(weight: np.ndarray, out_axis: int) -> tuple[np.ndarray, int]:
    """A Gemm/MatMul weight as (2-D matrix, neuron axis).

    A 2-D weight as it is, a batched one with its output axis first and the rest flattened.
    """
    out_axis %= weight.ndim
    if weight.ndim == 2:
        return weight, out_axis
    return np.moveaxis(weight, out_axis, 0).reshape(weight.shape[out_axis], -1), 0


def _along(vector: np.ndarray, axis: int, rank: int) -> np.ndarray:
    view = [1] * rank
    view[axis % rank] = -1
    return vector.reshape(view)


def _float_value(graph: ModelGraph, name: str) -> np.ndarray | None:
    """A constant operand as float32 (through its chain: Cast, DequantizeLinear...), or None."""
    if not name:
        return None
    value = graph.constant_value(name)
    if value is None:
        return _transposed_constant(graph, name)
    if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
        return None  # integers are indices or shapes here; quantized weights are read elsewhere
    return np.asarray(value, dtype=np.float32)


def _transposed_constant(graph: ModelGraph, name: str) -> np.ndarray | None:
    """``Transpose(constant)``, read as the constant's transposed value.

    A tied head reads the embedding table this way; an optimizer folds it into a stored copy, so
    both forms must give the same weight.
    """
    produced = graph.producer.get(name)
    if produced is None:
        return None
    node = graph.nodes[produced[0]]
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    value = graph.constant_value(node.input[0])
    if value is None or (value.dtype.kind != "f" and value.dtype.name != "bfloat16"):
        return None
    perm = node_attribute(node, "perm", None)
    return np.transpose(np.asarray(value, dtype=np.float32), perm)


def _quantized(graph: ModelGraph, node: onnx.NodeProto, slot: int, scale_slot: int | None, zero_slot: int,
               out_axis: int) -> np.ndarray | None:  # fmt: skip
    """An integer weight minus its zero point, times its scale.

    The scale is per tensor or per output channel, as QLinearConv/QLinearMatMul/ConvInteger/
    MatMulInteger read it.
    """
    raw = graph.constant_value(node.input[slot]) if len(node.input) > slot else None
    if raw is None or raw.dtype.kind not in "iu":
        return None
    weight = raw.astype(np.float32)
    rank = weight.ndim
    zero_name = node.input[zero_slot] if len(node.input) > zero_slot else ""
    zero = graph.constant_value(zero_name) if zero_name else None
    if zero is not None:
        zero32 = zero.astype(np.float32)
        weight -= zero32.reshape(()) if zero32.size == 1 else _along(zero32, out_axis, rank)
    if scale_slot is not None:
        scale = graph.constant_value(node.input[scale_slot])
        if scale is None:
            return None
        scale32 = np.asarray(scale, dtype=np.float32)
        weight *= scale32.reshape(()) if scale32.size == 1 else _along(scale32, out_axis, rank)
    return weight


def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Little-endian bit fields of ``bits`` bits from uint8 bytes, the first ``count`` of each row.

    MatMulNBits packs its weights and zero points this way.
    """
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    fields = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return fields.reshape(*packed.shape[:-1], -1)[..., :count]


def _matmul_nbits(graph: ModelGraph, node: onnx.NodeProto) -> np.ndarray | None:
    """com.microsoft MatMulNBits, dequantized as rows ``(N, K)``.

    ``B`` is uint8 ``[N, blocks, block_size * bits / 8]``, scales ``[N * blocks]``, optional zero
    points (packed uint8, or in the scales' type; default ``2^(bits-1)``). Returns the dequantized
    weight as rows ``(N, K)``.
    """
    k, n = int(node_attribute(node, "K", 0)), int(node_attribute(node, "N", 0))
    bits, block = int(node_attribute(node, "bits", 4)), int(node_attribute(node, "block_size", 0))
    packed = graph.constant_value(node.input[1]) if len(node.input) > 1 else None
    scales = graph.constant_value(node.input[2]) if len(node.input) > 2 else None
    if packed is None or scales is None or bits not in (2, 4, 8) or k <= 0 or n <= 0 or block <= 0:
        return None
    blocks = -(-k // block)
    packed = np.asarray(packed, dtype=np.uint8).reshape(n, blocks, -1)
    quantized = _unpack_bits(packed, bits, block).astype(np.float32)  # (n, blocks, block)
    zero_name = node.input[3] if len(node.input) > 3 else ""
    zero_value = graph.constant_value(zero_name) if zero_name else None
    if zero_value is None:
        zero = np.full((n, blocks), float(1 << (bits - 1)), dtype=np.float32)
    elif zero_value.dtype == np.uint8:
        zero = _unpack_bits(zero_value.reshape(n, -1), bits, blocks).astype(np.float32)
    else:
        zero = np.asarray(zero_value, dtype=np.float32).reshape(n, blocks)
    scale = np.asarray(scales, dtype=np.float32).reshape(n, blocks)
    weight = (quantized - zero[..., None]) * scale[..., None]
    return weight.reshape(n, blocks * block)[:, :k]


def _plain_matrix(graph: ModelGraph, node: onnx.NodeProto, transpose_a: int, transpose_b: int) -> tuple[np.ndarray, int] | None:
    """A Gemm-like ``A @ B`` with exactly one constant operand.

    Its output neurons are B's columns (rows when ``transB``) or A's rows (columns when
    ``transA``).
    """
    if len(node.input) < 2:
        return None
    left, right = (_float_value(graph, name) for name in node.input[:2])
    if (left is None) == (right is None):
        return None
    if right is not None and right.ndim >= 2:
        return _axis_matrix(right, -2 if transpose_b else -1)
    if left is not None and left.ndim >= 2:
        return _axis_matrix(left, -1 if transpose_a else -2)
    return None


def _other_producer(graph: ModelGraph, index: int) -> tuple[np.ndarray, int, int, int] | None:
    """(matrix, neuron axis, kernel, groups) of a producer :func:`find_units` does not list."""
    node = graph.nodes[index]
    domain, op = node.domain or "", node.op_type
    groups = int(node_attribute(node, "group", 1))
    weight: np.ndarray | None
    if domain in ("", "ai.onnx"):
        if op in ("QLinearConv", "ConvInteger"):
            weight = _quantized(graph, node, 3, 4, 5, 0) if op == "QLinearConv" else _quantized(graph, node, 1, None, 3, 0)
            if weight is None:
                return None
            matrix, kernel = _conv_rows(weight)
            return matrix, 0, kernel, groups
        if op in ("QLinearMatMul", "MatMulInteger"):
            weight = _quantized(graph, node, 3, 4, 5, -1) if op == "QLinearMatMul" else _quantized(graph, node, 1, None, 3, -1)
            return None if weight is None or weight.ndim < 2 else (*_axis_matrix(weight, -1), 1, 1)
        if op in ("Gemm", "MatMul"):  # a weight find_units does not see: Transpose(constant)
            found = _plain_matrix(graph, node, 0, int(node_attribute(node, "transB", 0)))
            return None if found is None else (*found, 1, 1)
        return None
    if domain != _MS_DOMAIN:
        return None
    if op == "FusedConv":
        weight = _float_value(graph, node.input[1]) if len(node.input) > 1 else None
        if weight is None or weight.ndim < 3:
            return None
        matrix, kernel = _conv_rows(weight)
        return matrix, 0, kernel, groups
    if op in ("FusedGemm", "FusedMatMul"):
        found = _plain_matrix(graph, node, int(node_attribute(node, "transA", 0)), int(node_attribute(node, "transB", 0)))
        return None if found is None else (*found, 1, 1)
    if op == "MatMulNBits":
        weight = _matmul_nbits(graph, node)
        return None if weight is None else (weight, 0, 1, 1)
    return None


def producer_weights(graph: ModelGraph) -> list[ProducerWeight]:
    """Every producer layer of ``graph`` with its weight in common form, in topological order.

    Args:
        graph: the model's graph (shape inference is not needed).

    Returns:
        One :class:`ProducerWeight` per layer whose weight could be read (see the module
        docstring for the operators read and the common form).
    """
    units = find_units(graph)
    found: list[ProducerWeight] = []
    for index in graph.order:
        node = graph.nodes[index]
        unit = units.get(index)
        groups = int(node_attribute(node, "group", 1))
        row_scale = None
        if unit is not None:
            weight = _float_value(graph, node.input[unit.weight_slot])
            if weight is None:
                continue
            if node.op_type == "Conv":
                matrix, kernel = _conv_rows(weight)
                axis = 0
            elif node.op_type == "ConvTranspose":
                (matrix, kernel), axis = _conv_transpose_rows(weight, groups), 0
            else:
                (matrix, axis), kernel, groups = _axis_matrix(weight, unit.out_axis), 1, 1
            if unit.batchnorm is not None:
                batchnorm = _batchnorm(graph, unit.batchnorm)
                if batchnorm is not None and batchnorm.scale.value.size == matrix.shape[axis]:
                    row_scale = np.asarray(batchnorm.scale.value, dtype=np.float64).ravel()
        else:
            other = _other_producer(graph, index)
            if other is None:
                continue
            matrix, axis, kernel, groups = other
        if matrix.size == 0 or not np.all(np.isfinite(matrix)):
            continue
        op = node.op_type if (node.domain or "") in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        found.append(ProducerWeight(index, node_label(node, index), op, matrix, axis, kernel, groups, row_scale))
    return found


# -- layer records --------------------------------------------------------------------------
def resample(values: np.ndarray, size: int = RESAMPLE) -> np.ndarray:
    """Area-preserving resampling of a sequence (or of each column of a matrix) to ``size``.

    The sequence is read as a step function over [0, 1) (value ``i`` on ``[i/n, (i+1)/n)``) and
    each output is its mean over ``[j/size, (j+1)/size)``: a long sequence is averaged in
    bins, a short one repeated; the overall mean is kept.

    Args:
        values: ``(n,)`` sequence (for a quantile function: sorted values) or ``(n, p)``
            matrix, resampled along its first axis.
        size: output length.

    Returns:
        float64 array of ``size`` values (``(size, p)`` for a matrix); zeros for an empty input.
    """
    array = np.asarray(values, dtype=np.float64)
    n = array.shape[0]
    if n == 0:
        return np.zeros((size, *array.shape[1:]))
    whole, fraction = _resample_grid(n, size)
    rest = array.shape[1:]
    cumulative = np.zeros((n + 2, *rest))  # [0, prefix sums..., total], then the step after the end
    np.cumsum(array, axis=0, out=cumulative[1 : n + 1])
    padded = np.zeros((n + 1, *rest))
    padded[:n] = array
    integral = cumulative[whole] + fraction.reshape((-1,) + (1,) * len(rest)) * padded[whole]
    return np.diff(integral, axis=0) * (size / n)


@functools.lru_cache(maxsize=4096)
def _resample_grid(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges of :func:`resample` for ``n`` values: (whole part, fractional part)."""
    edges = np.linspace(0.0, n, size + 1)
    whole = np.minimum(np.floor(edges).astype(np.int64), n)
    return whole, edges - whole


def layer_record(matrix: np.ndarray, neuron_axis: int = 0, row_scale: np.ndarray | None = None) -> np.ndarray:
    """The fields of one layer as a float64 vector of :data:`LAYER_WIDTH` values.

    The fields are described in the module docstring.

    Every statistic comes from a few ``einsum`` passes over the weight as stored (power sums
    per neuron, weighted sums per input), without a transposed or rescaled copy: the cost is
    a handful of reads of the weight.

    Args:
        matrix: the layer's 2-D weight; neurons along ``neuron_axis``.
        neuron_axis: 0 (a row per neuron) or 1 (a column per neuron, a MatMul's ``[K, N]``).
        row_scale: a folded BatchNorm's per-neuron factor; its sign flips a neuron's signed
            statistics, its magnitude scales its norm.

    Returns:
        The record, fields in :data:`FIELDS` order. Dead neurons (all-zero rows, as structured
        pruning leaves them) read as mean 0, skew 0, kurtosis and peak at their minimum.
    """
    weight = np.asarray(matrix, dtype=np.float32)
    rows = "ij" if neuron_axis == 0 else "ji"
    n, k = weight.shape[neuron_axis], weight.shape[1 - neuron_axis]
    squares = np.multiply(weight, weight)
    # Power sums per neuron (float32 passes, combined in float64).
    s1 = np.einsum(f"{rows}->i", weight).astype(np.float64)
    s2 = np.einsum(f"{rows}->i", squares).astype(np.float64)
    s3 = np.einsum(f"{rows},{rows}->i", squares, weight).astype(np.float64)
    s4 = np.einsum(f"{rows},{rows}->i", squares, squares).astype(np.float64)
    peak_abs = np.sqrt(squares.max(axis=1 - neuron_axis).astype(np.float64))
    mean = s1 / k
    second = s2 / k
    rms = np.sqrt(second)
    variance = np.maximum(second - mean * mean, 0.0)
    third = s3 / k - 3.0 * mean * second + 2.0 * mean**3
    fourth = s4 / k - 4.0 * mean * s3 / k + 6.0 * mean * mean * second - 3.0 * mean**4
    sign = np.ones(n) if row_scale is None else np.where(np.asarray(row_scale).ravel() < 0, -1.0, 1.0)
    magnitude = np.ones(n) if row_scale is None else np.abs(np.asarray(row_scale, dtype=np.float64).ravel())
    alive = rms > 0
    inverse = np.where(alive, sign / np.where(alive, rms, 1.0), 0.0)
    spread = np.where(variance > _TINY, variance, np.inf)
    skew = sign * third / spread**1.5
    # Kurtosis >= 1 and max|w|/rms >= 1 for every row; the clips only tame dead rows.
    kurtosis = np.log(np.clip(fourth / spread**2, 1.0, 1e6))
    peak = np.log(np.clip(peak_abs * np.abs(inverse), 1.0, 1e6))
    # Per input: sums over neurons of the unit rows u_i = sign_i w_i / rms_i and of their squares.
    direction = np.einsum(f"{rows},i->j", weight, inverse.astype(np.float32)).astype(np.float64) / n
    column_rms = np.sqrt(np.einsum(f"{rows},i->j", squares, (inverse * inverse).astype(np.float32)).astype(np.float64) / n)
    length = math.sqrt(float(direction @ direction))
    toward = (direction / length if length > 0 else direction).astype(np.float32)
    cosine = np.einsum(f"{rows},j->i", weight, toward).astype(np.float64) * inverse / math.sqrt(k)
    column_mean = np.where(column_rms > 0, direction / np.where(column_rms > 0, column_rms, 1.0), 0.0)
    norms = np.sort(rms * magnitude)
    median = float(0.5 * (norms[(n - 1) // 2] + norms[n // 2]))
    # The sorted fields, one column each, resampled together (one call, not eight).
    per_neuron = {
        "norms": norms / median if median > 0 else norms,
        "mean": mean * inverse,
        "cosine": cosine,
        "skew": skew,
        "kurtosis": kurtosis,
        "peak": peak,
    }
    record = np.empty(LAYER_WIDTH)
    record[SLICES["level"]] = math.log(median) if median > 0 else math.log(_TINY)
    neuron_fields = [name for name in _SORTED_FIELDS if name in per_neuron]
    stacked = np.sort(np.stack([per_neuron[name] for name in neuron_fields], axis=1), axis=0)
    for name, values in zip(neuron_fields, resample(stacked).T):
        record[SLICES[name]] = values
    stacked = np.sort(np.stack([column_mean, column_rms], axis=1), axis=0)
    record[SLICES["colmean"]], record[SLICES["columns"]] = resample(stacked).T
    return record


# -- model fingerprints ---------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFingerprint:
    """A model's fingerprint: one record per producer layer, in topological order.

    Attributes:
        records: float32 ``(layers, LAYER_WIDTH)``, the layer records.
        shapes: int64 ``(layers, 4)``: neurons, fan_in, kernel, groups per layer.
        ops: the layers' operators.
        names: the layers' node labels (for reports; not compared).
        version: :data:`FINGERPRINT_VERSION` of the fields.
    """

    records: np.ndarray
    shapes: np.ndarray
    ops: tuple[str, ...]
    names: tuple[str, ...]
    version: int = FINGERPRINT_VERSION

    @property
    def layers(self) -> int:
        return int(self.records.shape[0])

    @property
    def parameters(self) -> int:
        """Weight elements over all producer layers (kernel included)."""
        return int(np.sum(self.shapes[:, 0] * self.shapes[:, 1])) if self.layers else 0

    def to_bytes(self) -> bytes:
        """The fingerprint as bytes, with no pickled objects.

        :data:`_MAGIC`, a little-endian uint32 header length, a JSON header (version, layer count,
        record width, operators, names), then the records (float32) and shapes (int64) as raw
        little-endian numpy arrays.
        """
        header = json.dumps(
            {"version": self.version, "layers": self.layers, "width": LAYER_WIDTH, "ops": list(self.ops), "names": list(self.names)}
        ).encode()
        return b"".join(
            (
                _MAGIC,
                len(header).to_bytes(4, "little"),
                header,
                np.ascontiguousarray(self.records, dtype="<f4").tobytes(),
                np.ascontiguousarray(self.shapes, dtype="<i8").tobytes(),
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelFingerprint:
        """Read :meth:`to_bytes`' output back.

        Raises:
            OnnxladyError: the bytes are not a fingerprint, or one of a newer version.
        """
        if not data.startswith(_MAGIC):
            raise OnnxladyError("not a fingerprint (no fingerprint header)")
        try:
            start = len(_MAGIC) + 4
            length = int.from_bytes(data[len(_MAGIC) : start], "little")
            header = json.loads(data[start : start + length])
            version, layers, width = int(header["version"]), int(header["layers"]), int(header["width"])
        except (ValueError, KeyError, TypeError) as exc:
            raise OnnxladyError(f"not a fingerprint ({exc})") from exc
        if version > FINGERPRINT_VERSION:
            raise OnnxladyError(
                f"fingerprint version {version} is newer than this onnxlady reads ({FINGERPRINT_VERSION}): upgrade onnxlady"
            )
        offset = start + length
        size = layers * width * 4
        if width != LAYER_WIDTH or len(data) != offset + size + layers * 32:
            raise OnnxladyError(f"not a fingerprint of this layout ({layers} layers of {width} values, {len(data)} bytes)")
        records = np.frombuffer(data, dtype="<f4", count=layers * width, offset=offset).reshape(layers, width)
        shapes = np.frombuffer(data, dtype="<i8", count=layers * 4, offset=offset + size).reshape(layers, 4)
        return cls(records, shapes, tuple(header["ops"]), tuple(header["names"]), version)

    def to_json(self) -> dict[str, Any]:
        """A summary for reports: version, layer count, parameters and per-layer operator/shape."""
        return {
            "version": self.version,
            "layers": self.layers,
            "parameters": self.parameters,
            "producers": [
                {"name": name, "op": op, "neurons": int(s[0]), "fan_in": int(s[1]), "kernel": int(s[2]), "groups": int(s[3])}
                for name, op, s in zip(self.names, self.ops, self.shapes)
            ],
        }


def fingerprint_model(model: onnx.ModelProto) -> ModelFingerprint:
    """Fingerprint ``model`` (see the module docstring). The model is not modified.

    Args:
        model: a loaded model (external data loaded).

    Returns:
        Its fingerprint; a model with no readable producer layer gets an empty one.
    """
    graph = ModelGraph(model, infer_shapes=False)
    weights = producer_weights(graph)
    records = np.array(
        [layer_record(w.matrix, w.neuron_axis, w.row_scale) for w in weights], dtype=np.float32
    ).reshape(-1, LAYER_WIDTH)
    shapes = np.array([[w.neurons, w.fan_in, w.kernel, w.groups] for w in weights], dtype=np.int64)
    return ModelFingerprint(records, shapes.reshape(-1, 4), tuple(w.op_type for w in weights), tuple(w.name for w in weights))


# -- distance -------------------------------------------------------------------------------
#: Fields a per-neuron rescale moves (all others are invariant to positive per-neuron scales).
SCALE_FIELDS = ("level", "norms")


def _value_weights(names: tuple[str, ...]) -> np.ndarray:
    """Per value of a record, the weight of its squared difference.

    ``weight / (scale^2 * length * total weight)`` for the fields in ``names``, 0 elsewhere, so
    that summing weighted squared differences gives the weighted mean over fields of each field's
    mean squared difference in scale units.
    """
    total = sum(FIELD_WEIGHTS.values())
    return np.concatenate(
        [np.full(length, FIELD_WEIGHTS[name] / (FIELD_SCALES[name] ** 2 * length * total) if name in names else 0.0)
         for name, length in FIELDS]
    )


_INVARIANT_WEIGHTS = _value_weights(tuple(name for name, _ in FIELDS if name not in SCALE_FIELDS))
_SCALE_WEIGHTS = _value_weights(SCALE_FIELDS)


def _weighted_squares(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    aw = a.astype(np.float64) * np.sqrt(weights)
    bw = b.astype(np.float64) * np.sqrt(weights)
    return np.maximum((aw * aw).sum(1)[:, None] + (bw * bw).sum(1)[None, :] - 2.0 * aw @ bw.T, 0.0)


def layer_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distances between every record of ``a`` ``(m, W)`` and of ``b`` ``(n, W)``.

    The scale-dependent fields (:data:`SCALE_FIELDS`) add at most :data:`SCALE_CAP` squared:
    a per-neuron rescale the common form cannot see (ORT folds a per-channel ``Mul`` after a
    Conv into its weight) moves them arbitrarily far while every other field stays put.
    """
    return _weighted_squares(a, b, _INVARIANT_WEIGHTS) + np.minimum(_weighted_squares(a, b, _SCALE_WEIGHTS), SCALE_CAP**2)


def unrelated_gap(shapes: np.ndarray) -> np.ndarray:
    """:data:`UNRELATED_GAP` for each row ``(neurons, fan_in, ...)`` of ``shapes``."""
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 4)
    scale, a, b = UNRELATED_GAP
    return scale * np.maximum(shapes[:, 0], 1.0) ** -a * np.maximum(shapes[:, 1], 1.0) ** -b


def field_gaps(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per field, the RMS difference between paired records ``a[i]`` and ``b[i]``.

    In the field's scale units (1: as far as a noisy copy; the calibration reads these).
    """
    diff = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).reshape(-1, LAYER_WIDTH)
    return {name: float(np.sqrt(np.mean(diff[:, SLICES[name]] ** 2)) / FIELD_SCALES[name]) if diff.size else 0.0 for name, _ in FIELDS}


@dataclass(frozen=True)
class LayerMatch:
    """How two fingerprints' layers pair, and their distance.

    Attributes:
        distance: root mean square over paired layers (their distance) and unpaired layers
            (:data:`UNMATCHED_COST`); 0 for equal fingerprints.
        pairs: (layer of a, layer of b, distance) for each paired layer.
        unmatched_a: layers of ``a`` left without partner.
        unmatched_b: layers of ``b`` left without partner.
    """

    distance: float
    pairs: tuple[tuple[int, int, float], ...]
    unmatched_a: tuple[int, ...]
    unmatched_b: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "distance": self.distance,
            "paired_layers": len(self.pairs),
            "unpaired_layers": [len(self.unmatched_a), len(self.unmatched_b)],
        }


def compare_fingerprints(a: ModelFingerprint, b: ModelFingerprint) -> LayerMatch:
    """Pair the layers of two fingerprints and measure their distance (module docstring).

    Args:
        a: one fingerprint.
        b: the other.

    Returns:
        The pairing and the distance (symmetric in ``a`` and ``b`` up to ties).

    Raises:
        OnnxladyError: the fingerprints have different versions.
    """
    if a.version != b.version:
        raise OnnxladyError(f"cannot compare fingerprints of versions {a.version} and {b.version}")
    m, n = a.layers, b.layers
    if m == 0 or n == 0:
        unpaired = m + n
        return LayerMatch(UNMATCHED_COST if unpaired else 0.0, (), tuple(range(m)), tuple(range(n)))
    same = np.all(a.shapes[:, None, :] == b.shapes[None, :, :], axis=2)
    positions_a = np.arange(m)[:, None] * ((n - 1) / (m - 1) if m > 1 else 1.0)
    near = np.abs(positions_a - np.arange(n)[None, :]) <= ALIGN_WINDOW
    allowed = same & near
    penalty = UNMATCHED_COST**2
    forbidden = 4.0 * penalty * (m + n) + 1.0
    squared = np.full((m, n), forbidden)
    rows_i, cols_j = np.nonzero(allowed)
    if rows_i.size:
        used_a, used_b = np.unique(rows_i), np.unique(cols_j)
        full = layer_distances(a.records[used_a], b.records[used_b]) / unrelated_gap(a.shapes[used_a])[:, None] ** 2
        squared[rows_i, cols_j] = full[np.searchsorted(used_a, rows_i), np.searchsorted(used_b, cols_j)]
    # Square assignment: layer i of a may pair with b's j or with its own "unpaired" slot.
    cost = np.full((m + n, n + m), forbidden)
    cost[:m, :n] = np.minimum(squared, forbidden)
    cost[:m, n:] = np.where(np.eye(m, dtype=bool), penalty, forbidden)
    cost[m:, :n] = np.where(np.eye(n, dtype=bool), penalty, forbidden)
    cost[m:, n:] = 0.0
    chosen_rows, chosen_cols = linear_sum_assignment(cost)
    pairs: list[tuple[int, int, float]] = []
    paired_a: set[int] = set()
    paired_b: set[int] = set()
    for i, j in zip(chosen_rows, chosen_cols):
        if i < m and j < n and squared[i, j] < forbidden:
            pairs.append((int(i), int(j), float(np.sqrt(squared[i, j]))))
            paired_a.add(int(i))
            paired_b.add(int(j))
    unmatched_a = tuple(i for i in range(m) if i not in paired_a)
    unmatched_b = tuple(j for j in range(n) if j not in paired_b)
    total = sum(d * d for _, _, d in pairs) + penalty * (len(unmatched_a) + len(unmatched_b))
    count = len(pairs) + len(unmatched_a) + len(unmatched_b)
    return LayerMatch(float(np.sqrt(total / count)), tuple(sorted(pairs)), unmatched_a, unmatched_b)


# -- search vectors -------------------------------------------------------------------------
#: Pieces of the layer sequence a search vector keeps (each the mean of its layers).
SEARCH_CHUNKS = 8
#: Values per sorted field in a search vector (the field's 16 values averaged in this many bins).
SEARCH_FIELD_VALUES = 2
#: Weight of one unit of ``log2`` of a layer dimension (neurons, fan-in, kernel, groups) in a
#: search vector: twice the width costs half an unrelated layer.
SHAPE_WEIGHT = 0.5
_SEARCH_LAYER_WIDTH = sum(1 if length == 1 else SEARCH_FIELD_VALUES for _, length in FIELDS) + 4
#: Length of a search vector.
SEARCH_WIDTH = SEARCH_CHUNKS * _SEARCH_LAYER_WIDTH + 2


def search_vector(fingerprint: ModelFingerprint) -> np.ndarray:
    """A fixed-length float32 summary of ``fingerprint`` for a first, coarse search.

    Each layer is reduced to its fields averaged in :data:`SEARCH_FIELD_VALUES` bins, weighted
    and scaled like :func:`compare_fingerprints` does (so the squared Euclidean distance of two
    summaries approximates a layer distance), plus ``log2`` of its shape; the layer sequence
    is resampled to :data:`SEARCH_CHUNKS` chunks (local reorderings stay within a chunk); two
    values for the whole model (``log2`` of layer and parameter counts) close it. The exact
    distance is only computed for the candidates this summary ranks first.

    Args:
        fingerprint: a model's fingerprint.

    Returns:
        float32 vector of :data:`SEARCH_WIDTH` values.
    """
    vector = np.zeros(SEARCH_WIDTH, dtype=np.float32)
    layers = fingerprint.layers
    if layers:
        records = fingerprint.records.astype(np.float64)
        gap = unrelated_gap(fingerprint.shapes)[:, None]
        total = sum(FIELD_WEIGHTS.values())
        parts = []
        for name, length in FIELDS:
            values = records[:, SLICES[name]]
            if length > 1:
                values = values.reshape(layers, SEARCH_FIELD_VALUES, -1).mean(axis=2)
            factor = math.sqrt(FIELD_WEIGHTS[name] / (FIELD_SCALES[name] ** 2 * total * values.shape[1]))
            parts.append(values * factor / gap)
        parts.append(np.log2(np.maximum(fingerprint.shapes, 1).astype(np.float64)) * SHAPE_WEIGHT)
        chunks = resample(np.concatenate(parts, axis=1), SEARCH_CHUNKS)
        vector[:-2] = (chunks / math.sqrt(SEARCH_CHUNKS)).ravel()
    vector[-2:] = np.log2([layers + 1.0, fingerprint.parameters + 1.0]) * SHAPE_WEIGHT
    return vector


def fingerprint_distance(a: ModelFingerprint, b: ModelFingerprint) -> float:
    """The distance of :func:`compare_fingerprints` alone (0: same neurons up to order)."""
    return compare_fingerprints(a, b).distance
