"""Permutation-invariant fingerprints of a model's neurons, and the distance between two of them.

A registry search cannot resync a suspect against every entry; it needs a record per model that
any derivative of it (permuted, converted, perturbed) keeps and that another model does not
share. The paper's insight gives it: a model's neurons, up to order, are its identity. So each
*producer layer* (a Conv/ConvTranspose/Gemm/MatMul with a constant weight) is reduced to
statistics of its neurons that depend neither on their order nor on the order of its inputs,
and the model to the sequence of those layer records.

Which layers (:func:`~onnxlady._provenance._producers.model_producers`)
    The units of :func:`onnxlady._resync._match.find_units` (standard Conv, ConvTranspose, Gemm,
    MatMul; their weight read through Identity/Cast/DequantizeLinear/weight-only ``Mul`` chains,
    so float16, bfloat16 and QDQ int8 weights arrive as the real numbers their user reads),
    plus the forms an optimizer or a quantizer writes: ``com.microsoft`` FusedConv, NhwcConv
    (channels-last weight), FusedGemm, FusedMatMul (``transA``/``transB``) and MatMulNBits (2-8 bit blocks, scales, zero points),
    QLinearConv/QLinearMatMul (weight minus zero point, times scale), ConvInteger/MatMulInteger
    (weight minus zero point, times the weight's own scale where ONNX Runtime's dynamic form
    applies it after the layer, with a BatchNorm after that folded in; a float weight the
    dynamic form quantizes at run time by a DynamicQuantizeLinear is read as that float),
    ``com.microsoft.nchwc`` Conv (ORT_ENABLE_ALL's blocked layout, read as the Conv it stands
    for; all-zero channels a following convolution weighs are true ones, not padding), and a
    Gemm/MatMul whose weight is a ``Transpose`` of a constant (tied language-model heads, which
    ORT's optimizer folds into a stored transposed copy), and an ``Einsum`` whose letters prove one
    constant operand a layer (neuron letters on the weight and the output, input letters on the
    weight and the data, per-head letters on all three read as a batched MatMul's:
    :mod:`~onnxlady._provenance._einsum`). Layers come in the order the graph's
    outputs pull them in (depth first, inputs in slot order: ``pulled_order`` in
    :mod:`~onnxlady._provenance._producers`), which depends on the graph alone, not on the
    order its node list was written in (ORT's quantizer re-sorts it breadth first, its float16
    converter appends an input's ``Cast``). They are read by a light index of the graph (producers, consumers,
    constants) and, for forms it does not cover, by a ModelGraph; both give the same layers
    (see :mod:`onnxlady._provenance._producers`).

Common form
    Every weight becomes a 2-D matrix with one neuron per row (or per column: a MatMul's
    ``[K, N]`` weight is read as stored, not transposed): a neuron's inputs are its input
    channels times kernel positions for a convolution (per group for grouped ConvTranspose).
    Where a BatchNormalization follows the layer (the unit's ``batchnorm``), its per-neuron
    scale ``gamma / sqrt(var + eps)`` is folded in, so a model and its BN-folded copy
    (``fold_batchnorm``, ORT's ConvBN fusion, FusedConv) give the same statistics. Statistics
    come from power sums per neuron and weighted sums per input (:func:`layer_records`): a few
    float32 ``einsum`` passes over each large weight as stored (large layers of one shape
    stacked, one pass for all of them), one float64 batch for all small layers; sorting and
    resampling then run for all layers at once, each layer summed on its own so that a model's
    records are the same alone or batched with other models (:func:`fingerprints_of`). A neuron whose RMS is at
    most :data:`DEAD_NEURON` times its layer's largest counts as dead (all-zero rows of
    structured pruning, channels float16 or int8 round away, and the RMS-1e-36 rows real
    PaddleOCR models hold, which would otherwise overflow float32).

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
    squared, then divided by the unit of the shape (:func:`layer_unit`): :func:`unrelated_gap`,
    so that 1 means "as far as two unrelated layers of this shape" whatever the shape (the raw
    gaps shrink with width and fan-in, those of derivatives and of unrelated layers alike), but
    never below :data:`LAYER_UNIT_FLOOR`: the gap of two unrelated *random* layers keeps
    shrinking as they grow, while what noise or pruning does to a layer's statistics does not,
    so without a floor a very large layer (Magika's 512 x 1280 convolution) reads a noisy copy
    of itself as several unrelated gaps away. The two layer sequences are
    paired by a minimum-cost assignment within :func:`align_window` positions (optimizers
    reorder parallel branches: ORT emits ``k_proj`` before ``q_proj``, and moves the heads of
    a YOLO by a third of the model); a layer left without
    partner costs :data:`UNMATCHED_COST`. The model distance is the root mean square over pairs
    and unpaired layers, degenerate layers (:func:`degenerate_layers`: all-zero or constant,
    the same whatever the seed) left out.

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
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import onnx

from onnxlady._assignment import linear_sum_assignment
from onnxlady._errors import OnnxladyError
from onnxlady._provenance._producers import ProducerWeight, model_producers, producer_weights

__all__ = [
    "FIELDS",
    "FINGERPRINT_VERSION",
    "LayerMatch",
    "ModelFingerprint",
    "ProducerWeight",
    "compare_fingerprints",
    "degenerate_layers",
    "fingerprint_distance",
    "fingerprint_model",
    "fingerprints_of",
    "input_spread",
    "kurtosis_spread",
    "layer_record",
    "layer_records",
    "layer_unit",
    "model_producers",
    "norm_spread",
    "producer_weights",
    "resample",
    "search_vector",
    "search_vectors",
    "segment_resample",
    "segment_sort",
    "shaped_layers",
]

#: Version of the fields, their layout and the layer order; a fingerprint of another version is
#: not compared (an index of an older one is refused by find until ``index build`` reads it
#: again). 2: the layers of a graph whose node list is not topologically sorted come in its
#: pulled order (float16 copies through ORT's converter read like their reference). 3: every
#: graph's layers come in the order its outputs pull them in, whatever its node list's order
#: (ORT's quantizer re-sorts the list and interleaved CLIP's two towers). 4: per-head Einsum
#: weights (``bhsd,hdf->bhsf``) are read as layers (a model holding one had none before).
FINGERPRINT_VERSION = 4
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
#: Where the sorted fields lie in a record: one block (FIELDS lists them one after another).
_SORTED_SPAN = slice(SLICES[_SORTED_FIELDS[0]].start, SLICES[_SORTED_FIELDS[-1]].stop)

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
#: The smallest unit a layer distance is divided by (:func:`layer_unit`), in the raw units of
#: :data:`FIELD_SCALES` (about a noisy copy's gap per field). :func:`unrelated_gap` goes below it
#: from about 100 x 100 weights on. Calibrated on the registry experiment: the layers it
#: applies to hold derivative layers up to 0.53 raw (G < 0.5: Magika pruned, YOLOv8 pruned,
#: PP-OCRv4 noisy) and 0.91 (G < 1), and Magika's 3 layers need about 1.3 for its pruned copy to
#: read within the threshold of 3 layer slots. Unrelated random networks with a BatchNorm folded
#: in (shaped layers, so floored: the registry's torch shufflenet_v2 twin, timm's regnetx_002 and
#: regnety_002) close in as the floor grows: the twin reads 1.12 times its threshold at 1.3, 1.09
#: at 1.5 and 1.03 at 2.0, where the regnets are called derived.
LAYER_UNIT_FLOOR = 1.3
#: A layer whose :func:`norm_spread` is at least this was shaped by training or a folded
#: normalization (independent random weights give about 1: 0.7 to 1.13 over the large layers
#: of the zoo models ``tools.match_real_models`` reads); only pairs of layers shaped so, and
#: beyond per-neuron scales as far (:func:`shaped_layers`), get the floor.
SHAPED_SPREAD = 1.5
#: Cost of a layer with no partner: as far as an unrelated layer.
UNMATCHED_COST = 1.0
#: A layer every sorted field of which spans at most this much (raw record units, about a
#: hundredth of a noisy copy's gap, :data:`FIELD_SCALES`) has indistinguishable neurons: all
#: dead (timm's ResNet zero-initialises the last BatchNorm scale of each block, so its folded
#: convolution is all zeros whatever the seed) or all one constant (an init constant). Such a
#: layer reads the same in every model of its architecture: it pairs, but weighs nothing
#: (:func:`degenerate_layers`).
DEGENERATE_SPAN = 1e-4
#: Fewest same-shape alternatives (layers within the window that could pair but did not) a
#: comparison needs to measure its own unrelated gap (:attr:`LayerMatch.unrelated_scale`).
NULL_ALTERNATIVES = 16
#: Most the scale-dependent fields add to a layer's distance (about a noisy copy's gap).
SCALE_CAP = 1.5
#: Layers pair only within this many positions of each other (after scaling the two depths).
ALIGN_WINDOW = 3
#: ... or within this fraction of the deeper model's layers, if more: ONNX Runtime's optimizer
#: writes the branches of a YOLO or a PaddleOCR detector in another order, moving layers by up
#: to a third of the model.
ALIGN_FRACTION = 0.35


#: A pair is *contrasted* when its layers have other same-shape candidates within the window;
#: at least this many contrasted pairs make :attr:`LayerMatch.contrast` measurable.
CONTRAST_PAIRS = 3
#: Largest median contrast of a derived model: a derived layer sits far closer to its own copy
#: than to any other candidate, while the best of several unrelated candidates sits about as far
#: as the next (``python3 -m tools.registry_experiment``, row "contrast": derivatives at most
#: 0.34, other seeds of the same architecture at least 0.99; held-out models: derivatives at most
#: 0.71, other seeds of ViT-B, ConvNeXt, BERT, MobileNetV3, ResNet-18 0.99 to 1.28).
CONTRAST_LIMIT = 0.85


#: From this many weighed pairs on, a derived call must hold without its closest pair
#: (:attr:`LayerMatch.without_closest`): one table two unrelated models share (a token
#: embedding read by a tied head, held-out finding of session 12: an OPT and an SBERT sharing
#: only it and their LayerNorm vectors read 0.757 under a limit of 0.773) is no derivation of
#: the rest of the model.
SUPPORT_PAIRS = 2
#: A weighed pair at most this far apart is a copy of one layer (int8 and float16 conversions
#: read at most 0.09 over a whole model). Two or more copied layers are no single shared table:
#: a model that kept several layers of another and replaced the rest (a new classifier head on
#: a copied backbone) is derived, and needs no support beyond its closest pair.
COPIED_LAYER = 0.1


#: Assignment cost of leaving a degenerate layer unpaired: not 0, so that two of them pair
#: rather than tie with staying alone; the distance counts it as 0.
_WEIGHTLESS_ALONE = 1e-9


def align_window(m: int, n: int) -> int:
    """How many positions apart two layers of models of ``m`` and ``n`` layers may pair."""
    return max(ALIGN_WINDOW, math.ceil(ALIGN_FRACTION * max(m, n)))


_TINY = 1e-30


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


def _resample_blocks(blocks: np.ndarray, size: int) -> np.ndarray:
    """:func:`resample` of each ``blocks[b]`` (``(blocks, n, p)``, float64), as ``(blocks, size, p)``.

    The same steps as :func:`resample` along axis 1: the running sums (``cumsum``, a sequential
    sum along that axis) and the elementwise steps give each block the bits it gets alone.
    """
    count, n = blocks.shape[:2]
    whole, fraction = _resample_grid(n, size)
    cumulative = np.zeros((count, n + 2, *blocks.shape[2:]))
    np.cumsum(blocks, axis=1, out=cumulative[:, 1 : n + 1])
    padded = np.zeros((count, n + 1, *blocks.shape[2:]))
    padded[:, :n] = blocks
    integral = cumulative[:, whole] + fraction.reshape((1, -1) + (1,) * (blocks.ndim - 2)) * padded[:, whole]
    return np.diff(integral, axis=1) * (size / n)


@functools.lru_cache(maxsize=4096)
def _resample_grid(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges of :func:`resample` for ``n`` values: (whole part, fractional part)."""
    edges = np.linspace(0.0, n, size + 1)
    whole = np.minimum(np.floor(edges).astype(np.int64), n)
    return whole, edges - whole


def segment_sort(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sort each column of ``values`` ``(m, p)`` within each segment.

    Segment ``s`` is the next ``lengths[s]`` rows. Segments of one length are sorted in one call
    (as a ``(segments, length, p)`` block sorted along its middle axis: numpy runs the same sort
    on each column of each segment, so the result is the one a call per segment gives, bit for
    bit); numpy sorts a slice faster than any single call that sorts by (segment, value) pairs.
    """
    out = np.empty_like(values)
    sizes = lengths.tolist()
    starts = itertools.accumulate(sizes, initial=0)
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, sizes):
        by_length.setdefault(length, []).append(start)
    columns = values.shape[1]
    for length, group in by_length.items():
        if len(group) == 1:
            start = group[0]
            out[start : start + length] = np.sort(values[start : start + length], axis=0)
            continue
        rows = (np.array(group)[:, None] + np.arange(length)).ravel()
        out[rows] = np.sort(values[rows].reshape(len(group), length, columns), axis=1).reshape(-1, columns)
    return out


def segment_resample(values: np.ndarray, lengths: np.ndarray, size: int = RESAMPLE) -> np.ndarray:
    """:func:`resample` of each segment of ``values`` ``(m, p)``, as ``(segments, size, p)``.

    Segment ``s`` is the next ``lengths[s]`` rows (every length at least 1). Each output bin is
    the sum of the whole rows in it (``reduceat``) plus the fractions of the rows cut by its
    edges, so a segment's result depends on its own rows only, bit for bit: the layers of one
    model give the same records whether they are reduced alone or next to other models'.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    total, columns = values.shape
    padded = np.zeros((total + 1, columns))  # the row after the last: read with weight 0
    padded[:total] = values
    # Edges j * n / size of each segment (as np.linspace(0, n, size + 1) computes them).
    edges = np.arange(size + 1)[None, :] * (lengths / size)[:, None]
    edges[:, -1] = lengths
    whole = np.minimum(np.floor(edges).astype(np.int64), lengths[:, None])
    fraction = (edges - whole)[:, :, None]
    at = starts[:, None] + whole
    # Bin j sums rows at[j] .. at[j+1] - 1; the last bin of a segment ends where the next begins.
    # The pad row's own index closes the last bin (reduceat sums a final slice another way).
    bounds = np.append(at[:, :-1].ravel(), total)
    sums = np.add.reduceat(padded, bounds, axis=0)[:-1].reshape(len(lengths), size, columns)
    sums[at[:, 1:] == at[:, :-1]] = 0.0  # an empty bin (reduceat gives its first row instead)
    cut = fraction * padded[at]
    return (sums - cut[:, :-1] + cut[:, 1:]) * (size / lengths)[:, None, None]


#: Layers of at most this many weights are reduced together, in float64 passes over their
#: concatenated rows (the same few numpy calls for all of them: per-call overhead, not
#: arithmetic, is what small layers cost); larger ones one at a time, in float32 ``einsum``
#: passes over the weight as stored.
SMALL_LAYER = 2048
#: Most weights in one batch of small layers: its float64 passes (a dozen arrays of this many
#: values) then stay within a core's cache, where a batch 8 times larger ran them a quarter
#: slower from memory; each layer's sums are its own whatever batch it falls in.
_BATCH_WEIGHTS = 1 << 15
#: Large layers of at most this many weights are stacked with others of their shape and layout,
#: at most :data:`_STACK_WEIGHTS` weights per stack (a larger layer gains nothing: its passes
#: already cost far more than the calls).
_STACK_LAYER = 1 << 18
_STACK_WEIGHTS = 1 << 22


def _stack_key(weight: ProducerWeight) -> tuple[int, ...]:
    return (weight.neuron_axis, *weight.matrix.shape)


#: A neuron whose RMS is at most this fraction of the largest in its layer counts as dead (an
#: all-zero row of structured pruning, or a channel a float16 or int8 copy rounds to zero):
#: its normalized statistics carry no signal, and reading them would overflow float32.
DEAD_NEURON = 1e-6


@dataclass
class _Sums:
    """Per-neuron and per-input sums of some layers' weights.

    One entry per neuron or input, layers concatenated in order.
    """

    s1: np.ndarray  # sum of w
    s2: np.ndarray  # sum of w^2
    s3: np.ndarray
    s4: np.ndarray
    peak: np.ndarray  # max |w|
    inverse: np.ndarray  # sign / rms (0 for a dead neuron)
    cosine: np.ndarray  # cosine of the unit row to the layer's mean unit row
    direction: np.ndarray  # per input: mean over neurons of the unit rows
    column_rms: np.ndarray  # per input: rms over neurons of the unit rows


def _inverse(rms: np.ndarray, largest: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """``sign / rms`` of the live neurons (relative RMS above :data:`DEAD_NEURON`), else 0."""
    alive = rms > DEAD_NEURON * largest
    return np.where(alive, sign / np.where(alive, rms, 1.0), 0.0)


def _signs(weights: Sequence[ProducerWeight], neuron_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron (layers concatenated): the sign and magnitude of its BatchNorm scale."""
    sign, magnitude = np.ones(int(neuron_start[-1])), np.ones(int(neuron_start[-1]))
    for index, weight in enumerate(weights):
        if weight.row_scale is not None:
            scale = np.asarray(weight.row_scale, dtype=np.float64).ravel()
            where = slice(int(neuron_start[index]), int(neuron_start[index + 1]))
            sign[where] = np.where(scale < 0, -1.0, 1.0)
            magnitude[where] = np.abs(scale)
    return sign, magnitude


def _large_layer_sums(weight: ProducerWeight, sign: np.ndarray) -> _Sums:
    """Sums of one layer in float32 ``einsum`` passes over the weight as stored, combined in float64.

    No transposed or rescaled copy of the weight is made.
    """
    matrix = np.asarray(weight.matrix, dtype=np.float32)
    rows = "ij" if weight.neuron_axis == 0 else "ji"
    n, k = weight.neurons, weight.fan_in
    squares = np.multiply(matrix, matrix)
    s1 = np.einsum(f"{rows}->i", matrix).astype(np.float64)
    s2 = np.einsum(f"{rows}->i", squares).astype(np.float64)
    s3 = np.einsum(f"{rows},{rows}->i", squares, matrix).astype(np.float64)
    s4 = np.einsum(f"{rows},{rows}->i", squares, squares).astype(np.float64)
    peak = np.sqrt(_row_max(squares, weight.neuron_axis).astype(np.float64))
    rms = np.sqrt(s2 / k)
    inverse = _inverse(rms, rms.max(), sign)
    # Weighted by inverse / largest inverse (<= 1 / DEAD_NEURON): float32 cannot overflow.
    top = float(np.abs(inverse).max()) or 1.0
    relative = (inverse / top).astype(np.float32)
    direction = np.einsum(f"{rows},i->j", matrix, relative).astype(np.float64) * (top / n)
    column_square = np.einsum(f"{rows},i->j", squares, relative * relative).astype(np.float64)
    column_rms = np.sqrt(column_square / n) * top
    length = _euclidean(direction)
    toward = (direction / length if length > 0 else direction).astype(np.float32)
    cosine = np.einsum(f"{rows},j->i", matrix, toward).astype(np.float64) * inverse / math.sqrt(k)
    return _Sums(s1, s2, s3, s4, peak, inverse, cosine, direction, column_rms)


#: Rows of at most this many inputs have their maximum taken input by input (:func:`_row_max`).
_SHORT_ROW = 16


def _row_max(squares: np.ndarray, neuron_axis: int) -> np.ndarray:
    """Each neuron's largest value of ``squares`` (``([layers,] rows, inputs)``, neurons along ``neuron_axis``).

    A maximum is exact whatever the order it is taken in, so short rows (a depthwise 3 x 3
    convolution's 9 inputs) are reduced input by input, one vectorised ``np.maximum`` over every
    neuron per input: numpy's reduction along a short last axis costs several times more. NaN
    propagates either way.
    """
    axis = squares.ndim - 1 - neuron_axis
    if neuron_axis == 0 and 0 < squares.shape[-1] <= _SHORT_ROW:
        largest = squares[..., 0].copy()
        for column in range(1, squares.shape[-1]):
            np.maximum(largest, squares[..., column], out=largest)
        return largest
    return squares.max(axis=axis)


def _euclidean(vector: np.ndarray) -> float:
    """Euclidean norm of a float64 vector, by einsum: not BLAS, whose threads spin on after a call."""
    return math.sqrt(float(np.einsum("j,j->", vector, vector)))


def _stacked_layer_sums(weights: Sequence[ProducerWeight], sign: np.ndarray) -> _Sums:
    """:func:`_large_layer_sums` of layers of one shape and layout, stacked: the same numbers, bit for bit.

    One ``einsum`` per pass for all of them instead of one per layer (a real network repeats a
    few block shapes many times; the calls, not the arithmetic, are what mid-sized layers cost).
    """
    first = weights[0]
    n, k, count = first.neurons, first.fan_in, len(weights)
    stack = np.stack([np.asarray(w.matrix, dtype=np.float32) for w in weights])
    rows = "bij" if first.neuron_axis == 0 else "bji"
    squares = np.multiply(stack, stack)
    s1 = np.einsum(f"{rows}->bi", stack).astype(np.float64)
    s2 = np.einsum(f"{rows}->bi", squares).astype(np.float64)
    s3 = np.einsum(f"{rows},{rows}->bi", squares, stack).astype(np.float64)
    s4 = np.einsum(f"{rows},{rows}->bi", squares, squares).astype(np.float64)
    peak = np.sqrt(_row_max(squares, first.neuron_axis).astype(np.float64))
    rms = np.sqrt(s2 / k)
    inverse = _inverse(rms, rms.max(axis=1, keepdims=True), sign.reshape(count, n))
    top = np.abs(inverse).max(axis=1)
    top = np.where(top > 0, top, 1.0)
    relative = (inverse / top[:, None]).astype(np.float32)
    direction = np.einsum(f"{rows},bi->bj", stack, relative).astype(np.float64) * (top / n)[:, None]
    column_square = np.einsum(f"{rows},bi->bj", squares, relative * relative).astype(np.float64)
    column_rms = np.sqrt(column_square / n) * top[:, None]
    length = np.sqrt(np.einsum("bj,bj->b", direction, direction))  # each row as _euclidean sums it, bit for bit
    toward = np.where(
        length[:, None] > 0, direction / np.where(length > 0, length, 1.0)[:, None], direction
    ).astype(np.float32)
    cosine = np.einsum(f"{rows},bj->bi", stack, toward).astype(np.float64) * inverse / math.sqrt(k)
    return _Sums(
        s1.ravel(), s2.ravel(), s3.ravel(), s4.ravel(), peak.ravel(), inverse.ravel(), cosine.ravel(),
        direction.ravel(), column_rms.ravel(),
    )  # fmt: skip


def _small_layer_sums(weights: Sequence[ProducerWeight], sign: np.ndarray) -> _Sums:
    """Sums of several small layers at once.

    Their rows (neuron-major) are concatenated into one float64 vector, reduced per row with
    ``reduceat`` and per input with ``bincount``.
    """
    neurons = np.array([w.neurons for w in weights], dtype=np.int64)
    fan_in = np.array([w.fan_in for w in weights], dtype=np.int64)
    flat = np.concatenate(
        [(w.matrix if w.neuron_axis == 0 else w.matrix.T).reshape(-1) for w in weights], dtype=np.float64
    )
    row_k = np.repeat(fan_in, neurons)
    row_start = np.concatenate(([0], np.cumsum(row_k)[:-1]))
    squares = flat * flat
    s1 = np.add.reduceat(flat, row_start)
    s2 = np.add.reduceat(squares, row_start)
    s3 = np.add.reduceat(squares * flat, row_start)
    s4 = np.add.reduceat(squares * squares, row_start)
    peak = np.sqrt(np.maximum.reduceat(squares, row_start))
    rms = np.sqrt(s2 / row_k)
    layer_start = np.concatenate(([0], np.cumsum(neurons)[:-1]))
    largest = np.repeat(np.maximum.reduceat(rms, layer_start), neurons)
    inverse = _inverse(rms, largest, sign)
    # Column of every weight, numbered across the batch: its position in its row plus the
    # first column of its layer.
    column_start = np.concatenate(([0], np.cumsum(fan_in)[:-1]))
    offset = np.repeat(np.repeat(column_start, neurons) - row_start, row_k)
    column = np.arange(flat.size) + offset
    columns = int(fan_in.sum())
    per_column_n = np.repeat(neurons, fan_in).astype(np.float64)
    weight_inverse = np.repeat(inverse, row_k)
    direction = np.bincount(column, weights=flat * weight_inverse, minlength=columns) / per_column_n
    column_rms = np.sqrt(
        np.bincount(column, weights=squares * (weight_inverse * weight_inverse), minlength=columns) / per_column_n
    )
    length = np.sqrt(np.add.reduceat(direction * direction, column_start))
    safe = np.where(length > 0, length, 1.0)
    toward = direction / np.repeat(safe, fan_in)
    cosine = np.add.reduceat(flat * toward[column], row_start) * inverse / np.sqrt(row_k)
    return _Sums(s1, s2, s3, s4, peak, inverse, cosine, direction, column_rms)


def _concatenate(parts: list[_Sums]) -> _Sums:
    return _Sums(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Sums)))


def layer_records(weights: Sequence[ProducerWeight]) -> np.ndarray:
    """The records of layers (see the module docstring), one row of :data:`LAYER_WIDTH` each.

    Sums over each weight come from a few passes (small layers batched, see
    :data:`SMALL_LAYER`); the statistics, sorting and resampling of every layer then run
    together, segment by segment, so a model costs a fixed number of numpy calls plus a few
    per large layer.

    Args:
        weights: the layers, in order (each with at least one weight).

    Returns:
        float64 ``(len(weights), LAYER_WIDTH)``, fields in :data:`FIELDS` order. Dead neurons
        (see :data:`DEAD_NEURON`) read as mean 0, skew 0, kurtosis and peak at their minimum.
    """
    return _layer_records(weights)[0]


def _layer_records(weights: Sequence[ProducerWeight]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`layer_records`, and per layer whether every neuron's ``max |w|`` is finite.

    A weight holding NaN or infinity gives a non-finite peak (the maximum propagates both);
    so does a finite one beyond float32's square root of its range, which the caller tells
    apart by reading that layer once more. Every layer's row depends on that layer alone, so
    a non-finite layer changes no other row (its own is garbage, and dropped by the caller).
    """
    if not weights:
        return np.zeros((0, LAYER_WIDTH)), np.zeros(0, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _records_of(weights)


def _records_of(weights: Sequence[ProducerWeight]) -> tuple[np.ndarray, np.ndarray]:
    # Small layers first (batched), then large ones; rows go back to the caller's order at the end.
    order = [i for i, w in enumerate(weights) if w.size <= SMALL_LAYER]
    small = len(order)
    # Large layers of one shape and layout next to each other: their passes run stacked.
    order += sorted(
        (i for i, w in enumerate(weights) if w.size > SMALL_LAYER), key=lambda i: (*_stack_key(weights[i]), i)
    )
    ordered = [weights[i] for i in order]
    count = len(ordered)
    neurons = np.array([w.neurons for w in ordered], dtype=np.int64)
    fan_in = np.array([w.fan_in for w in ordered], dtype=np.int64)
    neuron_start = np.concatenate(([0], np.cumsum(neurons)))
    sign, magnitude = _signs(ordered, neuron_start)
    parts: list[_Sums] = []
    first = batch_size = 0
    for index, weight in enumerate(ordered[:small]):
        if batch_size + weight.size > _BATCH_WEIGHTS:
            if index > first:
                parts.append(_small_layer_sums(ordered[first:index], sign[neuron_start[first] : neuron_start[index]]))
            first, batch_size = index, 0
        batch_size += weight.size
    if small > first:
        parts.append(_small_layer_sums(ordered[first:small], sign[neuron_start[first] : neuron_start[small]]))
    index = small
    while index < count:
        weight, end = ordered[index], index + 1
        if weight.size <= _STACK_LAYER:
            key, stacked = _stack_key(weight), weight.size
            while end < count and _stack_key(ordered[end]) == key and stacked + ordered[end].size <= _STACK_WEIGHTS:
                stacked += ordered[end].size
                end += 1
        where = sign[neuron_start[index] : neuron_start[end]]
        parts.append(
            _large_layer_sums(weight, where) if end == index + 1 else _stacked_layer_sums(ordered[index:end], where)
        )
        index = end
    sums = parts[0] if len(parts) == 1 else _concatenate(parts)
    # Per-neuron statistics, every layer at once.
    k = np.repeat(fan_in, neurons).astype(np.float64)
    # Products, not powers: libm's pow is a hundred times slower on the subnormal numbers that
    # near-dead neurons give.
    mean = sums.s1 / k
    second = sums.s2 / k
    rms = np.sqrt(second)
    square = mean * mean
    variance = np.maximum(second - square, 0.0)
    third = sums.s3 / k - 3.0 * mean * second + 2.0 * square * mean
    fourth = sums.s4 / k - 4.0 * mean * sums.s3 / k + 6.0 * square * second - 3.0 * square * square
    spread = np.where((sums.inverse != 0) & (variance > _TINY), variance, np.inf)
    # Kurtosis >= 1 and max|w|/rms >= 1 for every row; the clips only tame dead rows.
    with np.errstate(over="ignore", invalid="ignore"):
        per_neuron = np.stack(
            [
                rms * magnitude,
                mean * sums.inverse,
                sums.cosine,
                sign * third / (spread * np.sqrt(spread)),
                np.log(np.clip(fourth / (spread * spread), 1.0, 1e6)),
                np.log(np.clip(sums.peak * np.abs(sums.inverse), 1.0, 1e6)),
            ],
            axis=1,
        )
    # Only weights beyond float32's range (|w| > 1e9: s4 overflows) give non-finite values.
    per_neuron = segment_sort(np.nan_to_num(per_neuron, nan=0.0, posinf=0.0, neginf=0.0), neurons)
    # The median neuron norm of each layer gives the level and normalizes the norms.
    low, high = neuron_start[:-1] + (neurons - 1) // 2, neuron_start[:-1] + neurons // 2
    median = 0.5 * (per_neuron[low, 0] + per_neuron[high, 0])
    per_neuron[:, 0] /= np.repeat(np.where(median > 0, median, 1.0), neurons)
    with np.errstate(divide="ignore", invalid="ignore"):
        column_mean = np.where(
            sums.column_rms > 0, sums.direction / np.where(sums.column_rms > 0, sums.column_rms, 1.0), 0.0
        )
    per_input = segment_sort(np.stack([column_mean, sums.column_rms], axis=1), fan_in)
    records = np.empty((count, LAYER_WIDTH))
    records[:, SLICES["level"]] = np.log(np.where(median > 0, median, _TINY))[:, None]
    for name, values in zip(_NEURON_FIELDS, np.moveaxis(segment_resample(per_neuron, neurons), 2, 0)):
        records[:, SLICES[name]] = values
    for name, values in zip(("colmean", "columns"), np.moveaxis(segment_resample(per_input, fan_in), 2, 0)):
        records[:, SLICES[name]] = values
    restored = np.empty_like(records)
    restored[order] = records
    finite = np.empty(count, dtype=bool)
    finite[order] = np.minimum.reduceat(np.isfinite(sums.peak), neuron_start[:-1])
    return restored, finite


#: The sorted per-neuron fields, in the column order :func:`layer_records` computes them.
_NEURON_FIELDS = ("norms", "mean", "cosine", "skew", "kurtosis", "peak")


def layer_record(matrix: np.ndarray, neuron_axis: int = 0, row_scale: np.ndarray | None = None) -> np.ndarray:
    """The record of one layer (:func:`layer_records` of that layer alone).

    Args:
        matrix: the layer's 2-D weight; neurons along ``neuron_axis``.
        neuron_axis: 0 (a row per neuron) or 1 (a column per neuron, a MatMul's ``[K, N]``).
        row_scale: a folded BatchNorm's per-neuron factor; its sign flips a neuron's signed
            statistics, its magnitude scales its norm.

    Returns:
        float64 vector of :data:`LAYER_WIDTH` values, fields in :data:`FIELDS` order.
    """
    weight = ProducerWeight(0, "", "", np.asarray(matrix), neuron_axis, 1, 1, row_scale)
    return layer_records([weight])[0]


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

    # Per-layer facts every comparison of this fingerprint reads (find compares one suspect with
    # dozens of candidates, two to four times each): computed once, never written to.
    @functools.cached_property
    def degenerate(self) -> np.ndarray:
        """:func:`degenerate_layers` of the records."""
        return degenerate_layers(self.records)

    @functools.cached_property
    def copies(self) -> np.ndarray:
        """Per layer, a class shared by the layers with the same shape and record (:func:`_copy_classes`)."""
        return _copy_classes(self)

    def to_bytes(self) -> bytes:
        """The fingerprint as bytes, with no pickled objects.

        :data:`_MAGIC`, a little-endian uint32 header length, a JSON header (version, layer count,
        record width, operators, names), then the records (float32) and shapes (int64) as raw
        little-endian numpy arrays.
        """
        header = json.dumps(
            {
                "version": self.version,
                "layers": self.layers,
                "width": LAYER_WIDTH,
                "ops": list(self.ops),
                "names": list(self.names),
            }
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
            raise OnnxladyError(
                f"not a fingerprint of this layout ({layers} layers of {width} values, {len(data)} bytes)"
            )
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
                {
                    "name": name,
                    "op": op,
                    "neurons": int(s[0]),
                    "fan_in": int(s[1]),
                    "kernel": int(s[2]),
                    "groups": int(s[3]),
                }
                for name, op, s in zip(self.names, self.ops, self.shapes)
            ],
        }


def fingerprint_model(model: onnx.ModelProto) -> ModelFingerprint:
    """Fingerprint ``model`` (see the module docstring). The model is not modified.

    Args:
        model: a loaded model (external data loaded).

    Returns:
        Its fingerprint; a model with no readable producer layer gets an empty one.

    Raises:
        OnnxladyError: the model is malformed (a tensor nothing defines, a cycle...).
    """
    return fingerprints_of([model_producers(model)])[0]


def fingerprints_of(models: Sequence[Sequence[ProducerWeight]]) -> list[ModelFingerprint]:
    """The fingerprints of several models from their producer weights, their layers reduced together.

    One :func:`layer_records` call for all of them: a small model costs a few hundred
    microseconds of numpy calls on its own, a fraction of that in a batch. Each model's records
    are those it gets alone, bit for bit (every statistic is computed per layer).

    Args:
        models: per model, its producer weights (:func:`model_producers`).

    Returns:
        One fingerprint per model, in order.
    """
    every = [weight for weights in models for weight in weights]
    rows, peaks_finite = _layer_records(every)
    records = rows.astype(np.float32)
    # A layer holding NaN or infinity is no layer of the fingerprint (it could not be compared).
    kept = peaks_finite.copy()
    for number in np.flatnonzero(~peaks_finite).tolist():
        kept[number] = bool(np.all(np.isfinite(every[number].matrix)))
    if not kept.all():
        records = records[kept]
        flags = iter(kept.tolist())
        models = [[weight for weight in weights if next(flags)] for weights in models]
    fingerprints = []
    start = 0
    for weights in models:
        shapes = np.array([[w.neurons, w.fan_in, w.kernel, w.groups] for w in weights], dtype=np.int64)
        fingerprints.append(
            ModelFingerprint(
                records[start : start + len(weights)],
                shapes.reshape(-1, 4),
                tuple(w.op_type for w in weights),
                tuple(w.name for w in weights),
            )
        )
        start += len(weights)
    return fingerprints


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
        [
            np.full(length, FIELD_WEIGHTS[name] / (FIELD_SCALES[name] ** 2 * length * total) if name in names else 0.0)
            for name, length in FIELDS
        ]
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
    return _weighted_squares(a, b, _INVARIANT_WEIGHTS) + np.minimum(
        _weighted_squares(a, b, _SCALE_WEIGHTS), SCALE_CAP**2
    )


def unrelated_gap(shapes: np.ndarray) -> np.ndarray:
    """:data:`UNRELATED_GAP` for each row ``(neurons, fan_in, ...)`` of ``shapes``."""
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 4)
    scale, a, b = UNRELATED_GAP
    return scale * np.maximum(shapes[:, 0], 1.0) ** -a * np.maximum(shapes[:, 1], 1.0) ** -b


def norm_spread(records: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Per layer, the spread of its neurons' norms in units of an i.i.d. random layer's.

    The standard deviation of the ``norms`` field (each neuron's RMS over the median) times
    ``sqrt(2 * fan_in)``: about 1 for independent Gaussian weights (less for uniform ones),
    whatever the shape; trained layers and layers with a folded normalization read 1.5 to 10.
    """
    norms = np.asarray(records, dtype=np.float64).reshape(-1, LAYER_WIDTH)[:, SLICES["norms"]]
    fan_in = np.asarray(shapes, dtype=np.float64).reshape(-1, 4)[:, 1]
    return norms.std(axis=1) * np.sqrt(2.0 * np.maximum(fan_in, 1.0))


def input_spread(records: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Per layer, the spread of its inputs' weights over neurons in units of an i.i.d. random layer's.

    The relative standard deviation of the ``columns`` field (each input's RMS over the unit
    rows) times ``sqrt(2 * neurons)``: about 1 for independent random weights, whatever their
    per-neuron scales (the rows are unit rows), as for :func:`norm_spread`; training makes some
    inputs matter more than others (the registry's real models: 1.3 to 24 on their large
    shaped layers, median 3 to 5).
    """
    records = np.asarray(records, dtype=np.float64).reshape(-1, LAYER_WIDTH)
    columns = records[:, SLICES["columns"]]
    neurons = np.asarray(shapes, dtype=np.float64).reshape(-1, 4)[:, 0]
    mean = columns.mean(axis=1)
    relative = columns.std(axis=1) / np.where(mean > 0, mean, 1.0)
    return np.where(mean > 0, relative, 0.0) * np.sqrt(2.0 * np.maximum(neurons, 1.0))


def kurtosis_spread(records: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Per layer, the spread of its neurons' log kurtosis in units of an i.i.d. Gaussian layer's.

    The standard deviation of the ``kurtosis`` field over ``sqrt(24 / fan_in) / 3`` (the
    sampling spread of a Gaussian row's log kurtosis): about 1 for independent Gaussian weights
    (less for uniform ones), whatever their per-neuron scales; training gives its neurons
    different tails (the registry's real models: 1.1 to 21 on their large shaped layers).
    """
    records = np.asarray(records, dtype=np.float64).reshape(-1, LAYER_WIDTH)
    fan_in = np.asarray(shapes, dtype=np.float64).reshape(-1, 4)[:, 1]
    return records[:, SLICES["kurtosis"]].std(axis=1) / (np.sqrt(24.0 / np.maximum(fan_in, 1.0)) / 3.0)


def shaped_layers(records: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Per layer, whether it is shaped beyond random draws: the layers the unit floor is for.

    Its neurons' norms spread (:func:`norm_spread` at least :data:`SHAPED_SPREAD`), *and* so does
    something a per-neuron scale cannot make: its inputs (:func:`input_spread`) or its neurons'
    tails (:func:`kurtosis_spread`), at least :data:`SHAPED_SPREAD` too. Random weights with
    per-neuron scales (a folded normalization, a scaled init) spread their norms only, and two
    draws of one such law converge as they grow, like plain random layers: without the second
    condition two unrelated random models of one architecture with 128-448 wide layers and a
    0.1 log-normal spread of their neuron scales read 0.5-0.63 apart under a limit of 0.67
    (``derived``); their layers read 0.9-1.06 and 0.8-0.98 on the two other spreads.
    """
    return (norm_spread(records, shapes) >= SHAPED_SPREAD) & (
        (input_spread(records, shapes) >= SHAPED_SPREAD) | (kurtosis_spread(records, shapes) >= SHAPED_SPREAD)
    )


def layer_unit(shapes: np.ndarray, shaped_a: np.ndarray | None = None, shaped_b: np.ndarray | None = None) -> np.ndarray:
    """What a distance between layers of each shape is divided by (module docstring).

    :func:`unrelated_gap`, or at least :data:`LAYER_UNIT_FLOOR` for a pair of layers both shaped
    beyond random draws (``shaped_a[i] & shaped_b[j]``: :func:`norm_spread` at least
    :data:`SHAPED_SPREAD`). Two independent random layers of one law converge as they grow, and
    the random-layer gap is all that tells them apart; two trained layers do not converge, and
    noise or pruning moves a large trained layer by more than that gap.

    Args:
        shapes: ``(m, 4)`` shapes of the rows.
        shaped_a: ``(m,)`` whether each row's layer is shaped (None: no floor).
        shaped_b: ``(n,)`` the same for the columns; the result is then ``(m, n)``.

    Returns:
        ``(m,)`` units, or ``(m, n)`` when both flags are given.
    """
    gap = unrelated_gap(shapes)
    if shaped_a is None or shaped_b is None:
        return gap
    both = shaped_a[:, None] & shaped_b[None, :]
    return np.where(both, np.maximum(gap, LAYER_UNIT_FLOOR)[:, None], gap[:, None])


def field_gaps(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per field, the RMS difference between paired records ``a[i]`` and ``b[i]``.

    In the field's scale units (1: as far as a noisy copy; the calibration reads these).
    """
    diff = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).reshape(-1, LAYER_WIDTH)
    return {
        name: float(np.sqrt(np.mean(diff[:, SLICES[name]] ** 2)) / FIELD_SCALES[name]) if diff.size else 0.0
        for name, _ in FIELDS
    }


@dataclass(frozen=True)
class LayerMatch:
    """How two fingerprints' layers pair, and their distance.

    Attributes:
        distance: root mean square over paired layers (their distance) and unpaired layers
            (:data:`UNMATCHED_COST`); 0 for equal fingerprints.
        pairs: (layer of a, layer of b, distance) for each paired layer.
        unmatched_a: layers of ``a`` left without partner.
        unmatched_b: layers of ``b`` left without partner.
        weightless_pairs: pairs of two degenerate layers (:func:`degenerate_layers`), left out
            of the distance: they read the same in any two models of one architecture.
        weightless_unpaired: degenerate layers left without partner, left out of the distance.
        unrelated_scale: how far apart unrelated layers of *these* models read, at most 1: the
            RMS distance of each layer to the same-shape layers of the other model within the
            window that it did not pair with (different layers: as unrelated as another seed's),
            where there are at least :data:`NULL_ALTERNATIVES` of them; else 1. The unit
            (:func:`layer_unit`) is fitted on Gaussian random layers; timm's ConvNeXt layers
            of two seeds read 0.93 of it, which the threshold must follow.
        contrast: the median, over pairs whose layers have other same-shape candidates within
            the window, of the pair's distance over its best alternative's (the ratio test of
            feature matching), when at least :data:`CONTRAST_PAIRS` pairs have one; else None.
            With many interchangeable layers (a ViT's 12 blocks) the assignment picks, among
            unrelated candidates, the closest of several: a distance biased low (ViT-B/16 of
            two seeds: 0.71, under its limit), but no closer than the next candidate (contrast
            1.08); a derived layer is far closer to its copy than to anything else (0.19 for
            noise OMEGA 0.1). :func:`is_derived` requires it below :data:`CONTRAST_LIMIT`.
        without_closest: the distance over the same slots but the closest weighed pair's, from
            :data:`SUPPORT_PAIRS` weighed pairs on and where at most one of them is a copy
            (:data:`COPIED_LAYER`), else None: :func:`is_derived` requires it within the limit
            too, so that no call rests on one layer alone. A derivative's layers are all close
            to their copies, and leaving one out moves its distance little; a model that shares
            one table with an unrelated one (a token embedding behind a tied head) is close in
            that layer only, and past the limit without it.
    """

    distance: float
    pairs: tuple[tuple[int, int, float], ...]
    unmatched_a: tuple[int, ...]
    unmatched_b: tuple[int, ...]
    weightless_pairs: int = 0
    weightless_unpaired: int = 0
    unrelated_scale: float = 1.0
    contrast: float | None = None
    without_closest: float | None = None

    @property
    def slots(self) -> int:
        """Layer slots the distance is the mean over: weighed pairs and weighed unpaired layers."""
        return len(self.pairs) + len(self.unmatched_a) + len(self.unmatched_b) - self.weightless_pairs - self.weightless_unpaired

    @property
    def weighed_pairs(self) -> int:
        """Pairs that carry evidence (not both layers degenerate)."""
        return len(self.pairs) - self.weightless_pairs

    def to_json(self) -> dict[str, Any]:
        return {
            "distance": self.distance,
            "paired_layers": len(self.pairs),
            "unpaired_layers": [len(self.unmatched_a), len(self.unmatched_b)],
        }


def degenerate_layers(records: np.ndarray) -> np.ndarray:
    """Per layer, whether its neurons are indistinguishable: it carries no identity evidence.

    True when every sorted field spans at most :data:`DEGENERATE_SPAN`: all neurons dead (an
    all-zero layer, e.g. a convolution folded with a zero-initialised BatchNorm scale) or all
    alike with alike inputs (a constant layer). Such a layer reads the same in every model of
    its architecture, whatever the seed, so two of them pair at distance 0 whether the models
    are related or not; :func:`compare_fingerprints` pairs them but leaves them out of the
    distance, as resync lets constant neurons pair without weighing.

    Args:
        records: ``(layers, LAYER_WIDTH)`` layer records.

    Returns:
        ``(layers,)`` bool.
    """
    records = np.asarray(records, dtype=np.float64).reshape(-1, LAYER_WIDTH)
    # The sorted fields lie one after another (FIELDS): one reduction over all of them.
    values = records[:, _SORTED_SPAN].reshape(records.shape[0], len(_SORTED_FIELDS), RESAMPLE)
    return ((values.max(axis=2) - values.min(axis=2)) <= DEGENERATE_SPAN).all(axis=1)


def compare_fingerprints(a: ModelFingerprint, b: ModelFingerprint) -> LayerMatch:
    """Pair the layers of two fingerprints and measure their distance (module docstring).

    Degenerate layers (:func:`degenerate_layers`) pair like any other, but a pair of two of
    them, or one left without partner, weighs nothing: the distance is the mean over the other
    slots. Where no slot is left (every layer of both models degenerate) the distance is
    :data:`UNMATCHED_COST`: no evidence either way.

    The comparison is also made once more with ``b``'s levels moved by the median level
    difference of the weighed pairs (:func:`_level_offset`), and the closer of the two kept:
    noise raises every layer's level by about ``log(1 + OMEGA^2) / 2`` and magnitude pruning
    lowers it, one shift for the whole model, which alone put Magika's and BERT's noisy copies
    (OMEGA = 0.2) past their limit; two unrelated models of one architecture differ by no such
    common shift (their offsets read 0.001), so they gain nothing from it.

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
    match = _compare(a, b)
    offset = _level_offset(a, b, match)
    if not offset:  # too few weighed pairs, or no shift
        tails = _tail_offsets(a, b, match)
        if tails is None:
            return match
        pruned = _compare(a, replace(b, records=b.records - tails.astype(np.float32)))
        return pruned if pruned.distance < match.distance else match
    records = b.records.copy()
    records[:, SLICES["level"]] -= np.float32(offset)
    shifted = _compare(a, replace(b, records=records))
    best = shifted if shifted.distance < match.distance else match
    tails = _tail_offsets(a, b, match)
    if tails is None:
        return best
    records = b.records - tails.astype(np.float32)
    pruned = _compare(a, replace(b, records=records))
    return pruned if pruned.distance < best.distance else best


#: Fewest weighed pairs from which a model-wide level shift is estimated (:func:`_level_offset`).
LEVEL_OFFSET_PAIRS = 3


def _level_offset(a: ModelFingerprint, b: ModelFingerprint, match: LayerMatch) -> float:
    """The median level difference (``b`` minus ``a``) over the weighed pairs of ``match``.

    0 with fewer than :data:`LEVEL_OFFSET_PAIRS` of them (too little to tell a common shift
    from the layers' own levels).
    """
    level = SLICES["level"].start
    degenerate_a, degenerate_b = a.degenerate, b.degenerate
    gaps = [
        float(b.records[j, level]) - float(a.records[i, level])
        for i, j, _ in match.pairs
        if not degenerate_a[i] and not degenerate_b[j]
    ]
    return float(np.median(gaps)) if len(gaps) >= LEVEL_OFFSET_PAIRS else 0.0


#: Fields magnitude pruning shifts by one amount in every layer (besides ``level``): zeroing the
#: smallest weights raises each neuron's kurtosis and its peak over RMS alike.
TAIL_FIELDS = ("level", "kurtosis", "peak")
#: Smallest model-wide ``kurtosis`` or ``peak`` shift (scale units) worth a third comparison:
#: unrelated models read up to about 0.25, a 30 % pruned copy of random layers 0.86.
TAIL_SHIFT = 0.5


def _tail_offsets(a: ModelFingerprint, b: ModelFingerprint, match: LayerMatch) -> np.ndarray | None:
    """Per record value, the model-wide shift of :data:`TAIL_FIELDS` (``b`` minus ``a``), or None.

    Per field, the median over layer pairs of the field's mean difference. The pairs are the
    weighed pairs of ``match``, or, with fewer than :data:`LEVEL_OFFSET_PAIRS` of them, every
    same-shape pair within the window paired by raw distance: a 30 % pruned copy of a large
    random layer sits past the unrelated gap on these fields alone (kurtosis 0.86 and peak 0.32
    scale units in every layer of a 512 x 2048 chain, every other field under 0.06), so the
    first pass leaves its layers unpaired. Two unrelated models show no common shift (their
    medians read 0.07 scale units or less), so they gain nothing from it.
    """
    degenerate_a, degenerate_b = a.degenerate, b.degenerate
    pairs = [(i, j) for i, j, _ in match.pairs if not degenerate_a[i] and not degenerate_b[j]]
    if len(pairs) < LEVEL_OFFSET_PAIRS:
        m, n = a.layers, b.layers
        if min(m, n) < LEVEL_OFFSET_PAIRS:
            return None
        same = np.all(a.shapes[:, None, :] == b.shapes[None, :, :], axis=2)
        positions_a = np.arange(m)[:, None] * ((n - 1) / (m - 1) if m > 1 else 1.0)
        allowed = same & (np.abs(positions_a - np.arange(n)[None, :]) <= align_window(m, n))
        allowed &= ~degenerate_a[:, None] & ~degenerate_b[None, :]
        if not allowed.any():
            return None
        raw = np.where(allowed, layer_distances(a.records, b.records), np.inf)
        cost = np.where(allowed, raw, raw[allowed].max() * (m + n) + 1.0)
        rows, cols = linear_sum_assignment(cost)
        pairs = [(int(i), int(j)) for i, j in zip(rows, cols) if allowed[i, j]]
        if len(pairs) < LEVEL_OFFSET_PAIRS:
            return None
    first, second = [i for i, _ in pairs], [j for _, j in pairs]
    difference = b.records[second].astype(np.float64) - a.records[first].astype(np.float64)
    offsets = np.zeros(LAYER_WIDTH)
    for name in TAIL_FIELDS:
        offsets[SLICES[name]] = float(np.median(difference[:, SLICES[name]].mean(axis=1)))
    # A shift under half a scale unit moves no call; skipping it spares find a third pass.
    moved = max(abs(offsets[SLICES[name]][0]) / FIELD_SCALES[name] for name in TAIL_FIELDS[1:])
    return offsets if moved >= TAIL_SHIFT else None


def _compare(a: ModelFingerprint, b: ModelFingerprint) -> LayerMatch:
    """:func:`compare_fingerprints` for the records as they are (no level shift)."""
    m, n = a.layers, b.layers
    if m == 0 or n == 0:
        unpaired = m + n
        return LayerMatch(UNMATCHED_COST if unpaired else 0.0, (), tuple(range(m)), tuple(range(n)))
    same = np.all(a.shapes[:, None, :] == b.shapes[None, :, :], axis=2)
    positions_a = np.arange(m)[:, None] * ((n - 1) / (m - 1) if m > 1 else 1.0)
    near = np.abs(positions_a - np.arange(n)[None, :]) <= align_window(m, n)
    allowed = same & near
    penalty = UNMATCHED_COST**2
    forbidden = 4.0 * penalty * (m + n) + 1.0
    squared = np.full((m, n), forbidden)
    rows_i, cols_j = np.nonzero(allowed)
    if rows_i.size:
        used_a, used_b = np.unique(rows_i), np.unique(cols_j)
        full = layer_distances(a.records[used_a], b.records[used_b]) / layer_unit(
            a.shapes[used_a],
            shaped_layers(a.records[used_a], a.shapes[used_a]),
            shaped_layers(b.records[used_b], b.shapes[used_b]),
        ) ** 2
        squared[rows_i, cols_j] = full[np.searchsorted(used_a, rows_i), np.searchsorted(used_b, cols_j)]
    degenerate_a, degenerate_b = a.degenerate, b.degenerate
    both = allowed & degenerate_a[:, None] & degenerate_b[None, :]
    squared[both] = 0.0
    # A degenerate layer left alone weighs nothing; the assignment still prefers to pair it.
    alone_a = np.where(degenerate_a, _WEIGHTLESS_ALONE, penalty)
    alone_b = np.where(degenerate_b, _WEIGHTLESS_ALONE, penalty)
    # Square assignment: layer i of a may pair with b's j or with its own "unpaired" slot.
    cost = np.full((m + n, n + m), forbidden)
    cost[:m, :n] = np.minimum(squared, forbidden)
    cost[:m, n:] = np.where(np.eye(m, dtype=bool), alone_a[:, None], forbidden)
    cost[m:, :n] = np.where(np.eye(n, dtype=bool), alone_b[None, :], forbidden)
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
    weightless_pairs = sum(1 for i, j, _ in pairs if degenerate_a[i] and degenerate_b[j])
    weightless_unpaired = int(degenerate_a[list(unmatched_a)].sum() + degenerate_b[list(unmatched_b)].sum())
    total = sum(d * d for _, _, d in pairs) + penalty * (
        len(unmatched_a) + len(unmatched_b) - weightless_unpaired
    )
    count = len(pairs) + len(unmatched_a) + len(unmatched_b) - weightless_pairs - weightless_unpaired
    distance = float(np.sqrt(total / count)) if count else UNMATCHED_COST
    weighed = sorted(d for i, j, d in pairs if not (degenerate_a[i] and degenerate_b[j]))
    without_closest = None
    if len(weighed) >= SUPPORT_PAIRS and sum(d <= COPIED_LAYER for d in weighed) <= 1:
        without_closest = float(np.sqrt(max(total - weighed[0] ** 2, 0.0) / (count - 1)))
    alternatives = allowed & ~degenerate_a[:, None] & ~degenerate_b[None, :]
    alternatives[[i for i, _, _ in pairs], [j for _, j, _ in pairs]] = False
    # A layer whose model reads the same weights elsewhere (ALBERT's one layer read in every
    # layer) has those readings as alternatives exactly as close as its own partner: they are
    # the same layer again, no unrelated candidate (held-out round 13, F10: a permuted ALBERT
    # called unrelated at distance 0).
    if pairs:
        copies_a, copies_b = a.copies, b.copies
        rows, columns = np.array([i for i, _, _ in pairs]), np.array([j for _, j, _ in pairs])
        alternatives[rows] &= copies_b[None, :] != copies_b[columns][:, None]
        alternatives[:, columns] &= copies_a[:, None] != copies_a[rows][None, :]
    unrelated_scale = 1.0
    if np.count_nonzero(alternatives) >= NULL_ALTERNATIVES:
        unrelated_scale = min(1.0, float(np.sqrt(np.mean(squared[alternatives]))))
    return LayerMatch(
        distance, tuple(sorted(pairs)), unmatched_a, unmatched_b, weightless_pairs, weightless_unpaired,
        unrelated_scale, _contrast(pairs, alternatives, squared), without_closest,
    )


def _copy_classes(fingerprint: ModelFingerprint) -> np.ndarray:
    """Per layer, a class shared by the layers of the model whose shape and record are identical (one weight read twice).

    Rows are grouped by their bytes, with ``-0.0`` made ``0.0`` (equal values, as ``np.unique``
    compares them); ``np.unique`` over the rows as structured items cost a search more than its
    comparisons (two to four calls per candidate), so it is left to rows holding NaN, which
    equals nothing, not even itself.
    """
    rows = np.concatenate([fingerprint.shapes.astype(np.float64), fingerprint.records.astype(np.float64)], axis=1)
    if not np.isfinite(rows).all():
        _, classes = np.unique(np.ascontiguousarray(rows).view([("", rows.dtype)] * rows.shape[1]), return_inverse=True)
        return classes.reshape(-1)
    seen: dict[bytes, int] = {}
    return np.array([seen.setdefault(row.tobytes(), len(seen)) for row in rows + 0.0], dtype=np.intp)


def _contrast(pairs: list[tuple[int, int, float]], alternatives: np.ndarray, squared: np.ndarray) -> float | None:
    """:attr:`LayerMatch.contrast`: median of each pair's distance over its best alternative's."""
    ratios = []
    for i, j, d in pairs:
        others = np.concatenate([squared[i][alternatives[i]], squared[:, j][alternatives[:, j]]])
        if others.size:
            ratios.append(d / max(float(np.sqrt(others.min())), _TINY))
    return float(np.median(ratios)) if len(ratios) >= CONTRAST_PAIRS else None


def is_derived(match: LayerMatch, limit: float, *, support: bool = True) -> bool:
    """The call: within ``limit``, with evidence, contrasted, and supported beyond one layer.

    Evidence: a weighed pair; contrasted: :attr:`LayerMatch.contrast` below
    :data:`CONTRAST_LIMIT` (or unmeasured); supported: within ``limit`` without the closest
    pair too (:attr:`LayerMatch.without_closest`, or unmeasured).

    Args:
        match: the comparison of two fingerprints.
        limit: the largest distance called derived.
        support: ask for support; a fixed limit the user chose (``find --threshold``) is a
            limit on the distance alone, and calls without it.

    Returns:
        Whether the two models are called derived.
    """
    contrasted = match.contrast is None or match.contrast < CONTRAST_LIMIT
    supported = not support or match.without_closest is None or match.without_closest <= limit
    return bool(match.weighed_pairs) and match.distance <= limit and contrasted and supported


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
        values = (
            np.einsum("lw,wv->lv", fingerprint.records.astype(np.float64), _SEARCH_PROJECTION)
            / unrelated_gap(fingerprint.shapes)[:, None]
        )
        shapes = np.log2(np.maximum(fingerprint.shapes, 1).astype(np.float64)) * SHAPE_WEIGHT
        chunks = resample(np.concatenate([values, shapes], axis=1), SEARCH_CHUNKS)
        vector[:-2] = (chunks / math.sqrt(SEARCH_CHUNKS)).ravel()
    vector[-2:] = np.log2([layers + 1.0, fingerprint.parameters + 1.0]) * SHAPE_WEIGHT
    return vector


def search_vectors(fingerprints: Sequence[ModelFingerprint]) -> np.ndarray:
    """:func:`search_vector` of each fingerprint, as rows: the same values, bit for bit.

    The per-layer steps (projection, division by the unrelated gap, ``log2`` of the shapes)
    run once over every layer of every fingerprint, each layer's row computed on its own as
    the single call computes it; the layer sequences of models of one layer count are
    resampled together (:func:`_resample_blocks`).
    An index build's task fingerprints up to hundreds of small models, for which a dozen numpy
    calls per model cost more than their arithmetic (``python3 -m tools.registry_experiment
    --stages``, row "search vectors and serialization": 0.39x ``onnx.load`` per fixture file with
    one call per model, 0.20x batched).

    Args:
        fingerprints: the fingerprints.

    Returns:
        float32 ``(len(fingerprints), SEARCH_WIDTH)``.
    """
    vectors = np.zeros((len(fingerprints), SEARCH_WIDTH), dtype=np.float32)
    if not fingerprints:
        return vectors
    counts = [fingerprint.layers for fingerprint in fingerprints]
    shapes = np.concatenate([fingerprint.shapes for fingerprint in fingerprints]).reshape(-1, 4)
    if shapes.shape[0]:
        records = np.concatenate([fingerprint.records for fingerprint in fingerprints]).astype(np.float64)
        values = np.einsum("lw,wv->lv", records, _SEARCH_PROJECTION) / unrelated_gap(shapes)[:, None]
        logs = np.log2(np.maximum(shapes, 1).astype(np.float64)) * SHAPE_WEIGHT
        rows = np.concatenate([values, logs], axis=1)
        # Models of one layer count are resampled together, as a (models, layers, values) block:
        # resample's running sums run along the layer axis of each model alone, its other steps
        # are elementwise, so each model's chunks are those of resample() on it, bit for bit.
        starts = list(itertools.accumulate(counts, initial=0))
        by_count: dict[int, list[int]] = {}
        for number, count in enumerate(counts):
            if count:
                by_count.setdefault(count, []).append(number)
        for count, numbers in by_count.items():
            picked = (np.array([starts[number] for number in numbers])[:, None] + np.arange(count)).ravel()
            chunks = _resample_blocks(rows[picked].reshape(len(numbers), count, -1), SEARCH_CHUNKS)
            vectors[numbers, :-2] = (chunks / math.sqrt(SEARCH_CHUNKS)).reshape(len(numbers), -1)
    totals = np.array([[fingerprint.layers + 1.0, fingerprint.parameters + 1.0] for fingerprint in fingerprints])
    vectors[:, -2:] = np.log2(totals) * SHAPE_WEIGHT
    return vectors


def _search_projection() -> np.ndarray:
    """``(LAYER_WIDTH, values)``: each field averaged in :data:`SEARCH_FIELD_VALUES` bins.

    A field of one value is kept as it is; each is multiplied by the field's weight over its scale,
    as the distance weighs it.
    """
    total = sum(FIELD_WEIGHTS.values())
    columns = []
    for name, length in FIELDS:
        bins = 1 if length == 1 else SEARCH_FIELD_VALUES
        factor = math.sqrt(FIELD_WEIGHTS[name] / (FIELD_SCALES[name] ** 2 * total * bins))
        for part in range(bins):
            column = np.zeros(LAYER_WIDTH)
            start = SLICES[name].start + part * (length // bins)
            column[start : start + length // bins] = factor / (length // bins)
            columns.append(column)
    return np.stack(columns, axis=1)


_SEARCH_PROJECTION = _search_projection()


def fingerprint_distance(a: ModelFingerprint, b: ModelFingerprint) -> float:
    """The distance of :func:`compare_fingerprints` alone (0: same neurons up to order)."""
    return compare_fingerprints(a, b).distance
