"""What was done to a modified suspect: pruning, quantization, noise, fine-tuning, or uncertain.

:func:`audit_models` calls :func:`classify_change` once the suspect is re-synchronized and found
to differ from the reference by more than a permutation and function-preserving scales. It
compares every weight (input 1 of Conv/ConvTranspose/Gemm, the constant operand of MatMul) with
the reference's, measures the evidence below, and names one kind only when that evidence is
clear; otherwise the kind is ``uncertain`` and the reason says what was seen.
:func:`find_scaled_under_noise` finds the neurons of the *Find the Lady* scaling attack when
the rest of the weights carry noise too (the exact-multiple test of the scale analysis then
fails).

The rules and their thresholds were chosen from a labelled set of real changes (noise at
several Omega, per-tensor quantization at 2..8 bits and int8 QDQ, pruning at 10..99 %, real
SGD fine-tuning of a digits CNN and of torchvision models, scaling attacks, compensated
rescales, scaling attacks plus noise, compensated rescales plus noise; each as made, permuted,
and permuted then converted to float16): ``python3 -m tools.forensics_calibration`` regenerates
it and prints the confusion matrix (``docs/results.md``, "Forensics: confusion matrix").

Evidence, per weight tensor (``d = suspect - reference``, aligned by the resync):

- *new zeros* counted without the alignment (zeros of the suspect minus zeros of the
  reference), and whether the suspect's non-zero values are exactly the reference's largest
  magnitudes, or its values in place (magnitude pruning leaves the other weights untouched);
- *distinct values*: a tensor quantized to ``B`` bits holds at most ``2^B`` values (counted
  exactly up to :data:`DISTINCT_CAP`, beyond it where the vote needs it; ``few_distinct_values``
  is the vote's exact input);
- *relative change*: robust std of ``d`` (1.4826 x median absolute deviation, so a few
  neurons the resync mis-paired do not count) over the std of the reference; the noise of
  ``perturb`` gives the same value (Omega) in every tensor;
- *row and column dispersion*: how much the change's energy varies between output neurons
  (rows) and between input channels (columns), as the log inter-quartile ratio of the per-row
  mean squares over that ratio for i.i.d. Gaussian noise (chi-square quantiles): about 1 for
  i.i.d. noise, far above for gradient steps (dead or saturated neurons get no gradient, BatchNorm
  statistics rescale whole rows) -- quartiles, so that up to a quarter of mis-paired rows
  do not count;
- *spectral excess*: the squared top singular value of the change (rows x the rest) over its
  expected value for an i.i.d. Gaussian matrix of the same shape and energy: about 1 for noise,
  far above for the low-rank, correlated updates of SGD (a gradient is a sum of outer products
  of activations and errors);
- *correlation with the weight*, as a z-score (``rho sqrt(n)``): weight decay and rescaled
  BatchNorm statistics correlate the change with the weight, noise does not;

and, for the other constants (biases, normalisation parameters and statistics): whether they
changed, compared as multisets (sorted values) as well, so a bias the resync mis-paired reads
as unchanged: ``perturb`` never touches them, fine-tuning always moves them. One that only
moved (same multiset, other places) is said to be re-ordered, never untouched; where the kind
stays uncertain and no constant changed, each changed weight is checked the same way: a
re-ordering outside the permutations the rules model (two channels swapped inside one
GroupNorm group) is said as such -- whether it keeps the function is ``verify``'s to tell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import onnx

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._audit._rowwise import FittedRows, least_squares_rows
from onnxlady._audit._scipy import gammaincinv, top_eigenvalue
from onnxlady._audit._select import median, median_deviation
from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._computed import aligned_uses, standardized_values
from onnxlady._rules.einsum import einsum_equation, einsum_weight_axes

__all__ = ["WeightInfo", "classify_change", "find_scaled_under_noise", "weight_infos"]

_T = TypeVar("_T")

#: Operators whose weight operand is classified (those ``perturb`` touches).
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Recurrent operators, whose input and recurrence weights (inputs 1 and 2) are weights too.
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
#: Pruning: new exact zeros in at least this fraction of the changed tensors' elements.
PRUNE_MIN_FRACTION = 0.05
#: Pruning: at least this fraction of the kept weights equal the reference's largest magnitudes.
PRUNE_KEPT_MATCH = 0.95
#: Quantization: a tensor votes when it holds at most this fraction of the reference's distinct values.
QUANT_RATIO = 0.25
#: Quantization: a tensor needs this many reference distinct values to vote (a tiny tensor cannot tell).
QUANT_MIN_DISTINCT = 64
#: Quantization: fraction of the voting elements that must vote.
QUANT_VOTE = 0.5
#: Distinct values are counted exactly up to this many (every 16-bit type's values); beyond it
#: the evidence says ``"> 65536"``, unless the quantization vote needs the exact count.
DISTINCT_CAP = 1 << 16
#: Noise/fine-tuning: a weight tensor changed densely when at least this fraction of its elements did.
DENSE = 0.9
#: Relative tolerance when comparing values as multisets (float16 storage: half an ulp is 4.9e-4).
MULTISET_RTOL = 1e-3
#: Noise: the per-tensor robust relative change varies by at most this coefficient of variation.
NOISE_CV = 0.25
#: Noise: median row/column dispersion (1 for i.i.d.) at most this. The quartiles of 16 rows
#: are noisy: i.i.d. noise on the 16-neuron layers of nhwc_convnet reads 1.34; real
#: fine-tuning reads 1.85 and above in the calibration.
NOISE_DISPERSION = 1.5
#: Noise: median spectral excess (1 for i.i.d.) at most this.
NOISE_SPECTRAL = 1.3
#: Noise: median |z| of the change's correlation with the weight (about 0.7 for i.i.d.) at most this.
NOISE_CORRELATION_Z = 3.0
#: Noise across a conversion: at most this fraction of the other constants may differ beyond their
#: storage error (a float16 copy of a bias or BatchNorm statistic next to noisy weights can; the
#: calibration's float16 noise cases show one conv bias in ppocrv4_rec, 8 of 231 (two BatchNorms)
#: in ppocr_cls). Without a conversion any such change rules noise out.
NOISE_CONVERTED_OTHERS = 0.1
#: Fine-tuning, with biases/normalisation changed too: the dense change has a median spectral
#: excess at least this (low rank)...
TUNE_SPECTRAL = 1.5
#: ...and departs from i.i.d. noise by one more of: median row/column dispersion at least this...
TUNE_DISPERSION = 1.5
#: ...median |z| of the correlation with the weight at least this...
TUNE_CORRELATION_Z = 4.0
#: ...or a per-tensor relative change this uneven (coefficient of variation).
TUNE_CV = 0.5
#: Fine-tuning with no bias/normalisation change seen (below a conversion's storage precision):
#: both the dispersion and the spectral excess at least this...
TUNE_STRONG = 5.0
#: ...in at least this fraction of the weight tensors (training moves every layer; two tensors
#: of 64 changed are a local edit, such as a rescale the resync could not align).
TUNE_STRONG_TOUCHED = 0.5
#: Scaled neurons under noise: |k - 1| in noise standard errors.
SCALE_Z = 8.0
#: Scaled neurons under noise: smallest |k - 1| reported.
SCALE_MIN = 0.05
#: Scaled neurons under noise: largest plausible k (a near-zero reference row gives any k).
SCALE_MAX_K = 100.0
#: Scaled neurons under noise: the model's bulk must be unscaled (median |z| at most this)...
SCALE_BULK_Z = 2.0
#: ...and the scaled neurons at most this fraction of all neurons.
SCALE_MAX_FRACTION = 0.1
#: Float16's smallest subnormal spacing: storage error of tiny constants (1e-6 epsilons).
FLOAT16_TINY = 2.0**-24
_MIN_ROWS = 8
#: A Gram matrix at most this wide leaves the forensics' worker time for the change's median
#: absolute deviation besides (a 192-wide one: 1.7 ms, the deviation 1.2 ms; a 640-wide one
#: 50 ms, where the deviation, 10 ms, is done in the caller's thread, which then waits less).
_POOLED_GRAM = 384


@dataclass(frozen=True)
class WeightInfo:
    """A weight tensor (reference name), its operator and its output (row) axis."""

    tensor: str
    op_type: str
    row_axis: int


def weight_infos(analysis: ChannelAnalysis) -> dict[str, WeightInfo]:
    """The weight tensors of the reference: those ``perturb`` touches, and a recurrent layer's.

    Input 1 of Conv/ConvTranspose/Gemm, the constant operand of MatMul, through Identity/Cast
    chains (in If/Loop bodies too); the first use wins. An LSTM/GRU/RNN's ``W`` and ``R``
    (``[directions, gates x hidden, ...]``, rows on axis 1) are its weights as well: read as
    "other constants", noise on every weight of a recurrent model was called "biases changed"
    and the kind uncertain.
    """
    graph = analysis.graph
    out: dict[str, WeightInfo] = {}
    for index, node in enumerate(graph.nodes):
        if node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx"):
            for slot in (1, 2):
                leaf = graph.constant_leaf(node.input[slot]) if slot < len(node.input) and node.input[slot] else None
                if leaf is not None and len(graph.shape(leaf.name) or ()) == 3:
                    out.setdefault(leaf.name, WeightInfo(leaf.name, node.op_type, 1))
            continue
        if node.op_type == "Einsum" and node.domain in ("", "ai.onnx"):
            _einsum_weights(graph, node, out)
            continue
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for slot in (1, 0) if node.op_type == "MatMul" else (1,):
            if slot >= len(node.input) or not node.input[slot]:
                continue
            leaf = graph.constant_leaf(node.input[slot])
            if leaf is None:
                _computed_weights(graph, index, slot, out)
                continue
            rank = len(graph.shape(leaf.name) or ())
            if node.op_type == "Conv":
                axis = 0
            elif node.op_type == "ConvTranspose":
                axis = 1
            elif node.op_type == "Gemm":
                axis = 0 if int(node_attribute(node, "transB", 0)) else 1
            else:
                axis = max(rank - 1, 0) if slot == 1 else max(rank - 2, 0)
            out.setdefault(leaf.name, WeightInfo(leaf.name, node.op_type, axis))
            break
    return out


def _computed_weights(graph: ModelGraph, index: int, slot: int, out: dict[str, WeightInfo]) -> None:
    """The constants that hold a Conv or Gemm weight computed in the graph element for element: its weights.

    A weight standardized (NFNet's ``ScaledStdConv2d``) or normalized (weight norm) in the graph,
    or a BatchNorm folded in by arithmetic (:func:`~onnxlady._resync._computed.aligned_uses`):
    a row of the stored values edited was called "other constants" (held-out round 17, F1).
    Rows on the output channels: axis 1 of standardized ``[1, M, F]`` values, else the weight's own.
    """
    node = graph.nodes[index]
    if node.op_type not in ("Conv", "Gemm") or slot != 1:
        return
    axis = 0 if node.op_type == "Conv" or int(node_attribute(node, "transB", 0)) else 1
    standardized = standardized_values(graph, node.input[1])
    for use_node, use_slot in aligned_uses(graph, node.input[1], index, 1):
        leaf = graph.constant_leaf(graph.nodes[use_node].input[use_slot])
        if leaf is not None:
            out.setdefault(leaf.name, WeightInfo(leaf.name, node.op_type, 1 if standardized is not None else axis))


def _einsum_weights(graph: ModelGraph, node: onnx.NodeProto, out: dict[str, WeightInfo]) -> None:
    """The constant operands of an Einsum that reads a computed one: its weights, rows on their first neuron axis.

    (held-out round 14, F4: an edited Einsum weight was called "other constants".)
    """
    equation = einsum_equation(node)
    for slot, name in enumerate(node.input):
        leaf = graph.constant_leaf(name) if name else None
        if leaf is None:
            continue
        rank = len(graph.shape(leaf.name) or ())
        axes = einsum_weight_axes(equation, len(node.input), slot, rank, lambda i: graph.is_constant(node.input[i]))
        if axes is not None and rank:
            producer, consumer = axes
            row = producer[0] if producer else consumer[-1] if consumer else 0
            out.setdefault(leaf.name, WeightInfo(leaf.name, node.op_type, row))


# -- per-tensor measurements ------------------------------------------------------------------
def _matrix(array: np.ndarray, axis: int, into: np.ndarray | None = None) -> np.ndarray:
    """``array`` as (size along ``axis``) x (everything else).

    Where that takes a copy, ``into`` (a flat float64 array of ``array``'s size, when given)
    holds it: the same values in the same C order as the copy ``reshape`` makes.
    """
    if array.ndim == 0:
        return array.reshape(1, 1)
    moved = np.moveaxis(array, axis, 0)
    shape = (array.shape[axis], -1)
    if into is None or array.dtype != into.dtype:
        return moved.reshape(shape)
    try:
        return moved.reshape(shape, copy=False)  # a view: as before, no copy
    except ValueError:  # reshape would copy: copied into ``into`` instead
        return _moved_copy(array, axis, into).reshape(shape)


def _moved_copy(array: np.ndarray, axis: int, into: np.ndarray) -> np.ndarray:
    """``np.moveaxis(array, axis, 0)`` copied into ``into`` (flat, ``array``'s size and dtype), C order.

    A C-contiguous ``array`` is a matrix (the axes before ``axis``) x (``axis``) of records
    (the axes after it, contiguous in both layouts): the copy is that matrix's transpose, one
    record (a conv kernel's ``kh * kw`` values) moved at a time. numpy's own copy of the moved
    view moves one element at a time in inner loops of a kernel's length, two to four times
    slower on a wide conv. The same bytes land in the same places either way.
    """
    moved_shape = (array.shape[axis], *array.shape[:axis], *array.shape[axis + 1 :])
    target = into.reshape(moved_shape)
    outer, width = math.prod(array.shape[:axis]), array.shape[axis]
    record = math.prod(array.shape[axis + 1 :]) * array.itemsize
    if not array.flags.c_contiguous or not array.size or record <= array.itemsize:
        np.copyto(target, np.moveaxis(array, axis, 0))
        return target
    kind = np.dtype((np.void, record))
    np.copyto(into.reshape(width, -1).view(kind), array.reshape(outer, -1).view(kind).T)
    return target


class _Scratch:
    """Flat float64 work arrays that :func:`classify_change` reuses from one weight tensor to the next.

    An array the size of a large weight, allocated anew for every tensor, costs its page faults
    at first touch (numpy's large arrays come from fresh ``mmap`` memory): on the benchmark
    machine 0.3 s for 75 MB, thirty times the arithmetic done in it, and three such arrays per
    tensor. Reused, each role's memory is faulted in once per audit. A role's array only ever
    grows (the smaller one goes before the larger is allocated), so the peak is that of the
    largest tensor, as before.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, role: str, size: int) -> np.ndarray:
        """A flat float64 array of ``size`` elements (contents undefined): ``role``'s memory, reused."""
        array = self._arrays.get(role)
        if array is None or array.size < size:
            self._arrays.pop(role, None)
            array = self._arrays[role] = np.empty(size)
        return array[:size]

    def cleared(self, size: int) -> np.ndarray:
        """A flat bool array of ``size`` elements, all False (the pattern table of :func:`_distinct_at_least`).

        It is the scratch array's memory: :func:`_measure` counts distinct values before it
        uses the scratch array, and a table (at most four bytes per element counted, see
        :func:`_distinct_at_least`) fits in it, so the table adds nothing to the peak either.
        """
        table = self.get("scratch", -(-size // 8)).view(np.bool_)[:size]
        table.fill(False)
        return table


def _dispersion(matrix: np.ndarray, squares: np.ndarray | None = None) -> float | None:
    """Log inter-quartile ratio of the rows' mean squares over that of i.i.d. Gaussian rows.

    ``squares``: ``matrix * matrix`` where the caller has it already (C-contiguous, so its
    row means are the same sums).
    """
    rows, width = matrix.shape
    if rows < _MIN_ROWS or width < 2:
        return None
    energy = np.mean(matrix * matrix if squares is None else squares, axis=1)
    q25, q75 = _quartiles(energy)
    if q25 <= 0:
        return float("inf") if q75 > 0 else None
    return float(math.log(q75 / q25) / _chi2_log_iqr(width))


def _quartiles(values: np.ndarray) -> tuple[np.float64, np.float64]:
    """``np.percentile(values, [25, 75])`` of a 1-D float64 array, computed as numpy computes it.

    numpy's "linear" method step by step: virtual indexes ``(n - 1) q``, the order statistics
    either side (the values ``np.partition`` puts there), and its two-sided interpolation
    (``a + (b - a) g``, or ``b - (b - a)(1 - g)`` from ``g = 0.5`` up): the same operations,
    hence the same values. ``np.percentile`` itself sorts its indexes with ``np.unique``, which
    imports ``numpy.ma`` the first time it runs: a tenth of a small model's audit. NaNs and
    infinities (and other dtypes) are left to numpy.
    """
    if values.dtype != np.float64 or values.ndim != 1 or values.size < 2 or not np.isfinite(np.sum(values)):
        q25, q75 = np.percentile(values, [25, 75])
        return q25, q75
    virtual = (values.size - 1) * np.array([0.25, 0.75])
    previous = np.floor(virtual)
    gamma = virtual - previous
    below = previous.astype(np.intp)
    above = below + 1
    ordered = np.partition(values, sorted({int(i) for i in (*below, *above)}))
    low, high = ordered[below], ordered[above]
    step = high - low
    found = low + step * gamma
    np.subtract(high, step * (1 - gamma), out=found, where=gamma >= 0.5)
    return found[0], found[1]


@lru_cache(maxsize=1024)
def _chi2_log_iqr(width: int) -> float:
    """Log of the chi-square(``width``) upper over lower quartile.

    ``2 gammaincinv(width / 2, q)`` is what ``scipy.stats.chi2.ppf`` computes (bit for bit),
    without importing ``scipy.stats`` (over a second of every audit's start-up), nor
    ``scipy.special`` (see :mod:`onnxlady._audit._scipy`).
    """
    half = width / 2
    return math.log(gammaincinv(half, 0.75) / gammaincinv(half, 0.25))


def _spectral_excess(matrix: np.ndarray, squares: np.ndarray | None = None) -> float | None:
    """Squared top singular value over its i.i.d. Gaussian expectation ``sigma^2 (sqrt m + sqrt n)^2``.

    ``squares`` as for :func:`_dispersion`.
    """
    return _spectral_excess_later(matrix, squares)()


def _spectral_excess_later(
    matrix: np.ndarray,
    squares: np.ndarray | None = None,
    product: Future[np.ndarray] | None = None,
    pool: Executor | None = None,
) -> Callable[[], float | None]:
    """What returns :func:`_spectral_excess` of ``matrix``, given its Gram product started already.

    The energy is read now (``squares`` may be overwritten once this returns). ``product``:
    :func:`_gram_later`'s, waited for by the returned function in every case (``matrix`` is
    free once it returns); without it the product is computed when the function is called.
    ``pool``: the product's, where the top eigenvalue is then computed too, once the product is
    done (it reads the product only), while the caller goes on.
    """
    m, n = matrix.shape
    energy = float(np.mean(matrix * matrix if squares is None else squares)) if min(m, n) >= _MIN_ROWS else 0.0
    # (only where it is read: ARPACK refuses an all-zero product, and scipy's own eigsh, imported then, is slow to load)
    top_later = _in_pool(pool, _top_of_product, product) if product is not None and pool is not None and energy else None

    def excess() -> float | None:
        square = product.result() if product is not None else None
        if not energy:  # too few rows or columns, or an all-zero matrix: nothing to normalise by
            return None
        if top_later is not None:
            top = top_later()
        else:
            if square is None:
                square = _gram(matrix)
            top = _top(square)
        return top / (energy * (math.sqrt(m) + math.sqrt(n)) ** 2)

    return excess


def _top(square: np.ndarray) -> float:
    """The largest eigenvalue of a Gram matrix: Lanczos up to 2048 wide, else power iterations."""
    return _top_eigenvalue(square) if square.shape[0] <= 2048 else _power(square)


def _top_of_product(product: Future[np.ndarray]) -> float:
    """:func:`_top` of the Gram matrix ``product`` computes (in a pool's thread: after it, in submission order)."""
    return _top(product.result())


def _gram(matrix: np.ndarray) -> np.ndarray:
    """The smaller Gram matrix of ``matrix`` (rows by rows, or columns by columns)."""
    m, n = matrix.shape
    return matrix @ matrix.T if m <= n else matrix.T @ matrix


def _gram_later(matrix: np.ndarray, pool: Executor | None) -> Future[np.ndarray] | None:
    """:func:`_gram` of ``matrix`` started in ``pool``'s thread (numpy lets go of the GIL in it).

    None without a pool, or where :func:`_spectral_excess` reads no product (too few rows or
    columns). ``matrix`` must stay as it is until the future is done. The product is the same
    call in either thread (the same BLAS routine on the same array: the same bits).
    """
    if pool is None or min(matrix.shape) < _MIN_ROWS:
        return None
    return pool.submit(_gram, matrix)


def _in_pool(pool: Executor | None, function: Callable[..., _T], *args: Any) -> Callable[[], _T]:
    """What returns ``function(*args)``, run in ``pool``'s thread (after the work submitted before it), or here without a pool.

    The value is the same in either thread (the same calls on the same arrays); the caller must
    leave the arrays ``args`` read as they are until it has the value.
    """
    if pool is None:
        value = function(*args)
        return lambda: value
    return pool.submit(function, *args).result


def _top_eigenvalue(gram: np.ndarray) -> float:
    """The largest eigenvalue of a symmetric matrix, to float precision.

    Lanczos (ARPACK) from a fixed start needs a few dozen products where a full decomposition
    costs O(n^3): 0.17 s instead of 1.8 s for a 1024-wide layer (and 0.2 s for a 256-wide one
    on a loaded machine). Small matrices, and the rare matrix on which it does not converge,
    get the full decomposition.
    """
    if gram.shape[0] > 64:
        top = top_eigenvalue(gram, 1e-12)  # scipy's eigsh, without importing scipy.sparse.linalg
        if top is not None:
            return top
    return float(np.linalg.eigvalsh(gram)[-1])


def _distinct(values: np.ndarray) -> int:
    """How many distinct values an array holds (NaNs count once, -0 equals 0), in its own dtype.

    What ``np.unique(values).size`` gives, with one sorted copy and no more: the sort is most
    of an audit's forensics on large tensors. A float64 array whose values are all float32
    (the suspect's weights, widened) is sorted as float32: the same count (the narrowing is
    exact, hence one to one), half the bytes.
    """
    flat = np.ravel(values)
    if flat.dtype.kind != "f":  # integers, bools, complex: as np.unique counts them
        return int(np.unique(flat).size)
    if flat.dtype == np.float16:
        return _distinct16(flat)
    ordered = None
    if flat.dtype == np.float64 and flat.size:
        with np.errstate(over="ignore"):  # out of float32's range: not equal, counted in float64
            narrow = flat.astype(np.float32)
        if np.array_equal(narrow, flat):  # False with a NaN: counted in float64 then
            narrow.sort()  # a copy of our own: sorted in place
            ordered = narrow
    if ordered is None:
        ordered = np.sort(flat)  # NaNs last
    finite = ordered.size
    if finite and np.isnan(ordered[-1]):
        finite = int(np.searchsorted(np.isnan(ordered), True))  # where the NaNs start
    head = ordered[:finite]
    count = 1 + int(np.count_nonzero(head[1:] != head[:-1])) if finite else 0
    return count + (finite < ordered.size)


def _distinct16(flat: np.ndarray) -> int:
    """:func:`_distinct` of float16 values without a sort: which of the 65536 bit patterns occur.

    Patterns that compare equal count once: -0 with 0, and every NaN (exponent all ones, a
    non-zero fraction) with every other.
    """
    present = np.bincount(flat.view(np.uint16), minlength=1 << 16).astype(bool)
    patterns = np.arange(1 << 16)
    nan = ((patterns & 0x7C00) == 0x7C00) & ((patterns & 0x03FF) != 0)
    count = int(np.count_nonzero(present & ~nan)) + bool(np.any(present & nan))
    return count - bool(present[0x0000] and present[0x8000])


def _distinct_at_least(
    values: np.ndarray, prefix: int | None = None, enough: float | None = None, buffers: _Scratch | None = None
) -> int:
    """A lower bound of :func:`_distinct` in one pass, no sort: how many low-bit patterns occur.

    Equal values have equal bit patterns but for the sign of zero, which the bits read here
    leave out (so do NaNs' payloads, but any NaN gives 0: no bound). The patterns are the low
    bits of a float32's representation (the high bits of a float64's folded onto its low ones),
    twice as many patterns as elements read: for weights of noise-like values a bound near the
    exact count. Only the first ``prefix`` elements are read when given (a bound still).

    With ``enough``, the pass stops once more than ``enough`` patterns occurred (the count of
    those read so far, above ``enough``, is returned: a bound still): a caller that compares
    the bound with thresholds up to ``enough`` gets the answers the whole pass gives. The
    scatter into the pattern table was the largest cost of the forensics after the change's
    top singular value; a noise-like tensor passes its thresholds in its first quarter. The
    table is ``buffers``' (cleared) where given: the same answer, without the page faults of a
    fresh table of up to 2 GiB per call.
    """
    flat = np.ravel(values)
    if prefix is not None:
        flat = flat[:prefix]
    if flat.dtype not in (np.float32, np.float64) or not flat.size:
        return 0
    if not np.isfinite(np.sum(flat, dtype=np.float64)):  # NaN (or an infinity, or a huge sum): no bound
        return 0
    bits = min(31, max(8, int(flat.size).bit_length() + 1))
    seen = np.zeros(1 << bits, dtype=bool) if buffers is None else buffers.cleared(1 << bits)
    mask = (1 << bits) - 1
    start, step = 0, 1 << 20 if enough is None else _next_step(enough, 0)
    # The keys as numpy's own index type, in a small buffer reused: an index array of another
    # integer type is converted before the scatter (half of the scatter's time).
    keys_buffer = np.empty(min(_KEYS, flat.size), dtype=np.intp)
    while start < flat.size:  # chunks: the index arrays stay small
        for low in range(start, min(start + step, flat.size), _KEYS):  # the same patterns, a part at a time
            chunk = flat[low : min(low + _KEYS, start + step)]
            keys = keys_buffer[: chunk.size]
            if chunk.dtype == np.float32:
                np.copyto(keys, chunk.view(np.uint32))
            else:
                wide = chunk.view(np.uint64)
                np.copyto(keys, (wide ^ (wide >> np.uint64(32))) & np.uint64(mask), casting="unsafe")  # below 2^31
            np.bitwise_and(keys, mask, out=keys)
            seen[keys] = True
        start += step
        if enough is not None and start < flat.size:
            count = int(np.count_nonzero(seen))  # the patterns of the elements read so far: a bound
            if count > enough:
                return count
            step = _next_step(enough, count)
    return int(np.count_nonzero(seen))


#: Keys scattered at once by :func:`_distinct_at_least` (512 KiB of indices, in cache).
_KEYS = 1 << 16


def _next_step(enough: float, count: int) -> int:
    """How many elements :func:`_distinct_at_least` reads before it counts its patterns again.

    Each element adds at most one pattern: with ``count`` seen, the count cannot pass
    ``enough`` before ``enough - count + 1`` more are read, so none is counted sooner (a
    noise-like weight then stops just past ``enough``, where chunks that doubled read up to
    twice as far). At least 2^16 (a count reads the whole table), at most 2^20 (the index
    arrays stay small). Where the bound passes ``enough`` only the callers' comparisons with
    thresholds up to ``enough`` read it, and those answer alike wherever the pass stops.
    """
    return min(max(math.floor(enough) - count + 1, 1 << 16), 1 << 20)


def _distinct_counts(
    ref: np.ndarray, sus: np.ndarray, same: bool, buffers: _Scratch | None = None
) -> tuple[int | None, int | None, bool]:
    """The suspect's and the reference's distinct values, and whether the suspect holds few.

    Each count is exact up to :data:`DISTINCT_CAP`, None (more) beyond it; "few" is exactly
    ``suspect <= QUANT_RATIO * reference`` (what the quantization vote reads): a count beyond
    the cap is made exact where the bounds do not settle it. A full sort of every weight on both
    sides was the largest cost of the forensics; a pass over the suspect's bit patterns
    (:func:`_distinct_at_least`) settles most tensors without one. ``same``: the values are
    equal element by element (one count serves both). ``buffers``: the pattern tables' memory.
    """
    if same:
        low = _distinct_at_least(ref, 4 * DISTINCT_CAP, DISTINCT_CAP, buffers)
        count = _distinct(ref) if low <= DISTINCT_CAP else None
        return count, count, count == 0  # n <= n / 4 only for n = 0
    # The bound is compared with the cap and with a quarter of the suspect's size below: counting
    # beyond both changes no answer.
    sus_low = _distinct_at_least(sus, enough=max(DISTINCT_CAP, QUANT_RATIO * sus.size), buffers=buffers)
    sus_count = _distinct(sus) if sus_low <= DISTINCT_CAP else None
    ref_low = _distinct_at_least(ref, 4 * DISTINCT_CAP, DISTINCT_CAP, buffers)
    ref_count = _distinct(ref) if ref_low <= DISTINCT_CAP else None
    if ref_count is None and sus_count is not None and sus_count > QUANT_RATIO * DISTINCT_CAP:
        ref_count = _distinct(ref)  # the vote needs the reference's count itself
    if ref_count is None and sus_count is None and sus_low <= QUANT_RATIO * sus.size:
        sus_count, ref_count = _distinct(sus), _distinct(ref)  # neither bound settles it
    if sus_count is None:  # more than the cap, and more than a quarter of the reference's
        return None, ref_count, False
    return sus_count, ref_count, ref_count is None or sus_count <= QUANT_RATIO * ref_count


def _count_text(count: int | None) -> int | str:
    """A distinct-value count as the report shows it: the number, or ``"> 65536"`` beyond the cap."""
    return count if count is not None else f"> {DISTINCT_CAP}"


def _power(gram: np.ndarray, iterations: int = 50) -> float:
    vector = np.asarray(np.random.default_rng(0).standard_normal(gram.shape[0]))
    value = 0.0
    for _ in range(iterations):
        vector = gram @ vector
        value = float(np.linalg.norm(vector))
        if not value:  # exactly zero: the division below needs it excluded
            return 0.0
        vector /= value
    return value


def _kept_match(r: np.ndarray, s: np.ndarray, rtol: float) -> float:
    """Fraction of the suspect's non-zero values equal (as a multiset) to the reference's largest magnitudes."""
    kept = _sorted(np.abs(s[s != 0]))
    if kept.size == 0:
        return 1.0
    largest = _sorted(np.abs(r))[r.size - kept.size :]
    return float(np.mean(np.abs(kept - largest) <= rtol * np.maximum(largest, 1e-30)))


def _sorted(values: np.ndarray) -> np.ndarray:
    """``np.sort(values)`` of a flat float64 array, sorted as float32 where every value is one.

    The narrowing is then exact and keeps the order, so the sorted values are the same; sorting
    half the bytes is about twice as fast (a float16 or float32 suspect's weights, widened).
    """
    with np.errstate(over="ignore"):  # out of float32's range: not equal, sorted in float64
        narrow = values.astype(np.float32)
    if not np.array_equal(narrow, values):  # False with a NaN too
        return np.sort(values)
    narrow.sort()
    return narrow.astype(np.float64)


def _same_multiset(a: np.ndarray, b: np.ndarray, rtol: float, floor: float = 0.0) -> bool:
    """Equal as multisets (sorted values), within tolerance.

    Each value within ``rtol`` of itself (at least ``rtol`` times a thousandth of the largest
    magnitude) plus ``floor``.
    """
    if a.shape != b.shape:
        return False
    if a.dtype.kind not in "fc" or b.dtype.kind not in "fc":
        return bool(np.array_equal(np.sort(a, axis=None), np.sort(b, axis=None)))
    x, y = np.sort(a.astype(np.float64), axis=None), np.sort(b.astype(np.float64), axis=None)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return bool(np.array_equal(x, y, equal_nan=True))
    scale = float(np.abs(x).max()) if x.size else 0.0
    return bool(np.all(np.abs(x - y) <= rtol * np.maximum(np.abs(x), scale * 1e-3) + floor + 1e-30))


def _measure(
    name: str,
    info: WeightInfo,
    ref: np.ndarray,
    sus: np.ndarray,
    storage: np.dtype[Any] | None = None,
    buffers: _Scratch | None = None,
    pool: Executor | None = None,
) -> dict[str, Any]:
    # Whole float64 arrays only for the reference and the change (the suspect is read in its own
    # dtype), and one scratch array that every step below reuses: temporaries the size of a
    # large weight were most of the forensics' time (page faults) and of the audit's peak.
    # Every figure is computed as before (same operations on the same contiguous arrays: the
    # same sums), only into buffers of our own, reused from tensor to tensor (see _Scratch).
    buffers = buffers if buffers is not None else _Scratch()
    n = ref.size
    native = sus.dtype in _NATIVE and ref.dtype in _NATIVE
    if not native:  # types numpy does not widen in a subtraction: both float64 copies at once, as before
        return _measure_widened(name, info, ref, sus, storage, buffers)
    # Two work arrays, the change and a scratch array. The Gram product of the spectral excess
    # (the largest single cost of the forensics) reads the change in ``pool``'s thread while this
    # one computes every figure of the change alone (their temporaries in the scratch array);
    # then the reference's float64 copy goes into the scratch array, and both are centred in
    # place for the correlation's dot products, the reference's centred copy then squared for
    # its std (see _std_mean_dots).
    # numpy widens either float exactly as the subtraction reads it: the values of
    # sus.astype(np.float64) - ref.astype(np.float64), computed the same way each time.
    d = buffers.get("change", n).reshape(ref.shape)
    flat_d = d.reshape(-1)
    scratch = buffers.get("scratch", n)  # sized first: the pattern tables below are its memory

    def change() -> None:
        np.subtract(sus, ref, out=d, dtype=np.float64)

    change()
    changed = int(np.count_nonzero(flat_d))
    axis = info.row_axis if 0 <= info.row_axis < d.ndim else 0
    rows = _matrix_view(d, axis) if changed else None  # a view of the change: its Gram product starts now
    product = _gram_later(rows, pool) if rows is not None else None
    std_d, mean_d = _std_mean(flat_d, scratch)
    if changed:
        center = median(flat_d)  # (the median absolute deviation below: the same values as np.median's)
        if math.isfinite(mean_d):
            # Every value finite: the deviations selected as they are computed, in ``pool``'s
            # thread after a small product (it reads the change only) beside the figures below;
            # after a large one here, where the worker's product and top eigenvalue take longer.
            large = rows is not None and min(rows.shape) > _POOLED_GRAM
            deviation = _in_pool(None if large else pool, median_deviation, flat_d, center)
        else:
            np.abs(np.subtract(flat_d, center, out=scratch), out=scratch)
            mad = float(median(scratch))
    # A float is zero where it equals 0 (either sign; NaN is not): what ``x == 0`` counts,
    # without its mask the size of the tensor.
    ref_zeros, sus_zeros = n - int(np.count_nonzero(ref)), n - int(np.count_nonzero(sus))
    sus_count, ref_count, few = _distinct_counts(
        ref if storage is None else ref.astype(storage), sus if storage is None else sus.astype(storage), not changed,
        buffers,
    )
    shape: dict[str, Any] = {}
    if rows is not None:
        row_dispersion, spectral_excess = _row_figures(rows, scratch, product, pool)
        column_dispersion = _column_dispersion(d, axis, scratch)
    if changed and math.isfinite(mean_d):  # waited for here: the change is centred in place below
        mad = float(deviation())
    if rows is not None:  # the product done (waited for here): the change's memory is free
        shape = {
            "row_dispersion": row_dispersion,
            "spectral_excess": spectral_excess(),
            "column_dispersion": column_dispersion,
        }
    flat_r = scratch  # the reference's float64 copy, in the scratch array
    np.copyto(flat_r, ref.reshape(-1), casting="unsafe")  # what astype(np.float64) computes: the exact widening
    kept_match = _kept_share(flat_r, sus) if changed and sus_zeros > ref_zeros else None
    dots = None
    if changed and n > 2 and std_d > 0:
        # The reference's copy and the change centred in place, their dot products taken, then the
        # reference's centred values squared in place for its std: what _std_mean (its centred
        # temporary is the same subtraction) and _correlation compute, without a third array
        # or computing the change again.
        std_r, _, dots = _std_mean_dots(flat_r, flat_d, mean_d)
    else:
        std_r = _std(flat_r, flat_d)
    entry = _entry_head(name, n, changed, (ref_zeros, sus_zeros), (sus_count, ref_count, few), std_d / std_r if std_r else 0.0)
    if not changed:
        return entry
    entry["kept_match"] = kept_match
    entry["robust_relative_change"] = 1.4826 * mad / std_r if std_r else 0.0
    if dots is not None and std_r > 0:
        xy, xx, yy = dots
        rho = max(-1.0, min(1.0, xy / math.sqrt(xx * yy))) if xx and yy else 0.0  # as _correlation
        entry["correlation"] = rho
        entry["correlation_z"] = rho * math.sqrt(n)
    del flat_r
    if not shape:  # rows that a transpose copies: measured now, one after the other
        change()
        shape = _shape_figures(d, axis, scratch, change)
    entry.update(shape)
    return entry


def _entry_head(
    name: str, n: int, changed: int, zeros: tuple[int, int], distinct: tuple[int | None, int | None, bool],
    relative_change: float,
) -> dict[str, Any]:
    """The figures of one tensor's entry every measurement path gives first (see _measure)."""
    ref_zeros, sus_zeros = zeros
    sus_count, ref_count, few = distinct
    return {
        "tensor": name,
        "elements": n,
        "changed": changed,
        "new_zeros": max(0, sus_zeros - ref_zeros),
        "reference_zeros": ref_zeros,
        # Counted in the stored dtype (float64 is exact for every stored type, so the count is
        # the same), up to DISTINCT_CAP (see _distinct_counts).
        "distinct_values": _count_text(sus_count),
        "reference_distinct_values": _count_text(ref_count),
        "few_distinct_values": few,
        "relative_change": relative_change,
    }


def _kept_share(flat_r: np.ndarray, sus: np.ndarray) -> float:
    """Of a pruned suspect's kept weights, the share that are the reference's.

    The kept weights are the reference's largest magnitudes (alignment-free), or the
    reference's own values in place (a compared form that folds per-row factors into the
    weights, a BatchNorm's, reorders magnitudes between rows).
    """
    flat_s = sus.astype(np.float64, copy=False).reshape(-1)
    kept = flat_s != 0
    in_place = np.abs(flat_s[kept] - flat_r[kept]) <= MULTISET_RTOL * np.abs(flat_r[kept]) + FLOAT16_TINY
    return max(_kept_match(flat_r, flat_s, MULTISET_RTOL), float(np.mean(in_place)) if kept.any() else 1.0)


_NATIVE = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _measure_widened(
    name: str,
    info: WeightInfo,
    ref: np.ndarray,
    sus: np.ndarray,
    storage: np.dtype[Any] | None = None,
    buffers: _Scratch | None = None,
) -> dict[str, Any]:
    """:func:`_measure` where a dtype is not numpy's own float: three work arrays (see _measure)."""
    buffers = buffers if buffers is not None else _Scratch()
    n = ref.size
    if ref.dtype == np.float64:
        r = ref  # read only: the array itself, as astype(copy=False) gave it
    else:
        r = buffers.get("reference", n).reshape(ref.shape)
        np.copyto(r, ref, casting="unsafe")  # what astype(np.float64) computes: the exact widening
    # numpy's own floats are widened as the subtraction reads them (exactly: the same values).
    native = sus.dtype in (np.float16, np.float32, np.float64)
    d = buffers.get("change", n).reshape(ref.shape)
    np.subtract(sus if native else sus.astype(np.float64), r, out=d, dtype=np.float64)
    flat_r, flat_d = r.reshape(-1), d.reshape(-1)
    changed = int(np.count_nonzero(flat_d))
    ref_zeros, sus_zeros = int(np.count_nonzero(ref == 0)), int(np.count_nonzero(sus == 0))
    scratch = buffers.get("scratch", n)  # sized first: the pattern tables below are its memory
    sus_count, ref_count, few = _distinct_counts(
        ref if storage is None else ref.astype(storage), sus if storage is None else sus.astype(storage), not changed,
        buffers,
    )
    (std_r, mean_r), (std_d, mean_d) = _std_mean(flat_r, scratch), _std_mean(flat_d, scratch)
    entry = _entry_head(name, n, changed, (ref_zeros, sus_zeros), (sus_count, ref_count, few), std_d / std_r if std_r else 0.0)
    if not changed:
        return entry
    entry["kept_match"] = _kept_share(flat_r, sus) if sus_zeros > ref_zeros else None
    # The median and the median absolute deviation, each selected without partitioning all of
    # the array (the same values as np.median).
    center = median(flat_d)
    np.abs(np.subtract(flat_d, center, out=scratch), out=scratch)
    mad = float(median(scratch))
    entry["robust_relative_change"] = 1.4826 * mad / std_r if std_r else 0.0
    if n > 2 and std_d > 0 and std_r > 0:
        # The reference's float64 copy is ours when the reference was not float64: centred in place.
        rho = _correlation(flat_r, flat_d, scratch, own_x=r is not ref, means=(mean_r, mean_d))
        entry["correlation"] = rho
        entry["correlation_z"] = rho * math.sqrt(n)
    del r, flat_r
    # The reference's array is free from here: the row or column matrix a transpose copies is
    # written into it (one of the two at a time, the rows done before the columns are read).
    spare = buffers.get("reference", n)
    axis = info.row_axis if 0 <= info.row_axis < d.ndim else 0
    rows = _matrix(d, axis, spare)
    squares = _squares(rows, scratch)
    entry["row_dispersion"] = _dispersion(rows, squares)
    entry["spectral_excess"] = _spectral_excess(rows, squares)
    del rows, squares
    if d.ndim >= 2:
        columns = _matrix(d, 1 if axis == 0 else 0, spare)
        entry["column_dispersion"] = _dispersion(columns, _squares(columns, scratch))
    else:
        entry["column_dispersion"] = None
    return entry


def _shape_figures(d: np.ndarray, axis: int, scratch: np.ndarray, change: Callable[[], None]) -> dict[str, Any]:
    """Row dispersion, spectral excess and column dispersion of the change ``d``, temporaries in ``scratch``.

    A row or column matrix that a transpose copies goes into ``scratch`` and its squares into
    ``d``'s memory, ``change`` computing ``d`` again where it is still needed: the values the
    copies of :func:`_matrix` and the squares in a scratch array give.
    """
    flat_d = d.reshape(-1)
    rows = _matrix_view(d, axis)
    if rows is not None:
        squares = _squares(rows, scratch)
    else:
        rows = _matrix(d, axis, scratch)
        squares = _squares(rows, flat_d)
    out = {"row_dispersion": _dispersion(rows, squares), "spectral_excess": _spectral_excess(rows, squares)}
    if not np.may_share_memory(rows, d):
        change()  # d held the squares
    del rows, squares
    out["column_dispersion"] = _column_dispersion(d, axis, scratch)
    return out


def _row_figures(
    rows: np.ndarray, work: np.ndarray, product: Future[np.ndarray] | None, pool: Executor | None = None
) -> tuple[float | None, Callable[[], float | None]]:
    """The row dispersion of ``rows``, and what returns their spectral excess (see :func:`_spectral_excess_later`).

    ``rows``' squares go into ``work`` (free once this returns); ``product``: their Gram
    product started already (:func:`_gram_later`) in ``pool``, or None.
    """
    squares = _squares(rows, work)
    return _dispersion(rows, squares), _spectral_excess_later(rows, squares, product, pool)


def _column_dispersion(d: np.ndarray, axis: int, work: np.ndarray) -> float | None:
    """The column dispersion of the change ``d`` (read only), temporaries in ``work``."""
    if d.ndim < 2:
        return None
    columns = _matrix_view(d, 1 if axis == 0 else 0)
    if columns is not None:
        return _dispersion(columns, _squares(columns, work))
    # The dispersion reads only the squares: the columns copied into ``work`` a kernel at a time
    # (see _moved_copy) and squared in place, in the C order the copy of :func:`_matrix` has
    # (the same products, the same row sums).
    moved = _moved_copy(d, 1 if axis == 0 else 0, work[: d.size])
    squares = moved.reshape((moved.shape[0], -1))
    np.multiply(squares, squares, out=squares)
    return _dispersion(squares, squares)


def _matrix_view(array: np.ndarray, axis: int) -> np.ndarray | None:
    """:func:`_matrix` where it is a view of ``array``, else None (nothing copied)."""
    if array.ndim == 0:
        return array.reshape(1, 1)
    try:
        return np.moveaxis(array, axis, 0).reshape((array.shape[axis], -1), copy=False)
    except ValueError:
        return None


def _squares(matrix: np.ndarray, scratch: np.ndarray) -> np.ndarray | None:
    """``matrix * matrix`` in ``scratch``, or None (the caller squares as before).

    Only where ``matrix`` is C-contiguous: so is its product, and numpy's reductions over the
    scratch copy then sum in the same order.
    """
    if not matrix.flags.c_contiguous or matrix.size != scratch.size:
        return None
    return np.multiply(matrix, matrix, out=scratch.reshape(matrix.shape))


def _std(flat: np.ndarray, scratch: np.ndarray) -> float:
    """``float(flat.std())`` of a contiguous float64 array, its temporary in ``scratch`` (see :func:`_std_mean`)."""
    return _std_mean(flat, scratch)[0]


def _std_mean(flat: np.ndarray, scratch: np.ndarray) -> tuple[float, float]:
    """``float(flat.std())`` and ``float(flat.mean())`` of a contiguous float64 array, the temporary in ``scratch``.

    numpy's ``_var`` step by step: the mean (one pairwise sum over the array), the squared
    deviations (elementwise), their pairwise sum over a contiguous array of the same length,
    over ``n``, the square root: the same operations in the same order, hence the same value.
    ``flat.mean()`` is that same sum over ``n`` (one IEEE division): the mean computed on the
    way is returned, so :func:`_correlation` need not sum the array again.
    """
    count = np.intp(flat.size)
    mean = np.add.reduce(flat, axis=None, keepdims=True)
    np.true_divide(mean, count, out=mean, casting="unsafe")
    np.subtract(flat, mean, out=scratch)
    np.square(scratch, out=scratch)
    total = np.add.reduce(scratch, axis=None)
    variance = total.dtype.type(total / count)
    return float(variance.dtype.type(np.sqrt(variance))), float(mean[0])


def _std_mean_dots(
    flat_r: np.ndarray, flat_d: np.ndarray, mean_d: float
) -> tuple[float, float, tuple[float, float, float]]:
    """:func:`_std_mean` of ``flat_r`` and :func:`_correlation`'s dot products of it with ``flat_d``.

    Both arrays are the caller's own and are overwritten: ``flat_d`` centred (``mean_d``: its
    mean), ``flat_r`` centred then squared. The centred reference is the temporary that
    :func:`_std_mean` computes (the same subtraction of the same mean), and the centred arrays
    are those :func:`_correlation` takes its three dot products of: every figure is the same value.

    Returns:
        ``(std_r, mean_r, (xy, xx, yy))``.
    """
    count = np.intp(flat_r.size)
    mean = np.add.reduce(flat_r, axis=None, keepdims=True)
    np.true_divide(mean, count, out=mean, casting="unsafe")
    mean_r = float(mean[0])
    cx = np.subtract(flat_r, mean_r, out=flat_r)
    cy = np.subtract(flat_d, mean_d, out=flat_d)
    dots = float(np.dot(cx, cy)), float(np.dot(cx, cx)), float(np.dot(cy, cy))
    np.square(cx, out=cx)
    total = np.add.reduce(cx, axis=None)
    variance = total.dtype.type(total / count)
    return float(variance.dtype.type(np.sqrt(variance))), mean_r, dots


def _correlation(
    x: np.ndarray, y: np.ndarray, scratch: np.ndarray, own_x: bool = False, means: tuple[float, float] | None = None
) -> float:
    """Pearson's correlation of two flat float64 arrays, as ``np.corrcoef(x, y)[0, 1]``.

    Without corrcoef's stacked 2 x n copy and its matrix product (the slowest step of the
    forensics on large tensors): two centred arrays, one of them in ``scratch`` (and ``x``
    itself centred in place when ``own_x``: the caller's copy, no longer needed), and three dot
    products. The sums run in another order, so the value may differ in its last digits.
    ``means``: ``x.mean()`` and ``y.mean()`` where the caller has them (:func:`_std_mean`).
    """
    mean_x, mean_y = means if means is not None else (x.mean(), y.mean())
    cx = np.subtract(x, mean_x, out=x if own_x else None)
    cy = np.subtract(y, mean_y, out=scratch)
    xy, xx, yy = float(np.dot(cx, cy)), float(np.dot(cx, cx)), float(np.dot(cy, cy))
    return max(-1.0, min(1.0, xy / math.sqrt(xx * yy))) if xx and yy else 0.0


def _median(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(median(finite)) if finite else None


# -- the decision -----------------------------------------------------------------------------
def classify_change(
    ref: Mapping[str, np.ndarray],
    sus: Mapping[str, np.ndarray],
    weights: dict[str, WeightInfo],
    rtol: float,
    allowed: dict[str, np.ndarray] | None = None,
    storage: dict[str, np.dtype[Any]] | None = None,
) -> dict[str, Any]:
    """The kind of change from ``ref`` to ``sus`` (arrays by reference tensor name, aligned).

    Args:
        ref: the reference's constants (in the compared form).
        sus: the re-synchronized suspect's constants, same names and form.
        weights: the weight tensors (:func:`weight_infos`).
        rtol: the audit's relative tolerance for float rounding.
        allowed: per tensor, the storage error a conversion may add (element by element).
        storage: per weight, the suspect's storage dtype when a conversion changed it: distinct
            values are counted in it on both sides (float16 holds few distinct values; that is
            not a quantization grid).

    Returns:
        ``{"kind", "reason", "evidence"}``: kind one of ``pruning``, ``quantization``,
        ``noise``, ``fine-tuning`` or ``uncertain`` (the audit's verdict is then ``modified``).
    """
    allowed = allowed or {}
    buffers = _Scratch()  # the work arrays of every tensor's measurements, allocated once
    # One worker thread: each tensor's Gram product beside its other figures (see _measure).
    with ThreadPoolExecutor(1, thread_name_prefix="onnxlady-forensics") as pool:
        per_tensor = [
            _measure(name, weights[name], ref[name], sus[name], (storage or {}).get(name), buffers, pool)
            for name in sorted(weights)
            if name in ref and name in sus and ref[name].shape == sus[name].shape
        ]
    del buffers
    others = _other_changes(ref, sus, set(weights), rtol, allowed)
    evidence = _summarize(per_tensor, others)
    evidence["converted"] = bool(allowed)
    evidence["non_weight_constants"] = sum(1 for name in ref if name not in weights and name in sus)
    kind, reason = decide(evidence)
    if kind == "uncertain" and evidence["changed_tensors"] and not others["changed"]:
        # Only here (an uncommon path): whether the changed weights hold the reference's own
        # values in other places, as a re-ordering outside the modelled permutations leaves them
        # (channels swapped inside one GroupNorm group): said, never claimed as equivalent.
        reordered = _reordered_weights(ref, sus, per_tensor, rtol)
        if reordered:  # (the evidence of every other audit stays as it was)
            evidence["weights_reordered"] = reordered
            kind, reason = decide(evidence)
    if kind == "uncertain" and evidence["changed_tensors"]:
        # Whole constants exchanged with others of their shape (held-out round 17, F5: a mixture
        # of experts' experts 0 and 1 swapped with their router's columns): said as such, never
        # claimed as equivalent (an order of whole layers is no permutation onnxlady models).
        changed = [entry["tensor"] for entry in per_tensor if entry["changed"]]
        exchanged = _exchanged_constants(ref, sus, changed + others["changed"], rtol)
        if exchanged:
            if "weights_reordered" not in evidence:
                evidence["weights_reordered"] = _reordered_weights(ref, sus, per_tensor, rtol)
            evidence["constants_exchanged"] = exchanged
            held = set(exchanged) | set(evidence["weights_reordered"])
            evidence["exchange_explains_all"] = set(changed) <= held and set(others["changed"]) <= set(exchanged)
            kind, reason = decide(evidence)
    return {"kind": kind, "reason": reason, "evidence": evidence}


def _exchanged_constants(
    ref: Mapping[str, np.ndarray], sus: Mapping[str, np.ndarray], names: list[str], rtol: float
) -> dict[str, str]:
    """The changed constants ``names`` whose suspect values are another reference constant's of their shape, re-ordered or not.

    ``{changed name: the reference constant whose values (as a multiset) it holds}``. Candidates
    are told apart by their sums and sums of squares first (order-free, one pass per tensor),
    then compared sorted (:func:`_same_multiset`); constants of one value throughout (a zero
    bias) say nothing and are no candidates.
    """
    wanted = {ref[name].shape for name in names if name in ref and name in sus}
    candidates: dict[tuple[int, ...], list[str]] = {}
    for name, value in ref.items():
        if value.shape in wanted and value.size > 1 and value.dtype.kind == "f" and name in sus:
            candidates.setdefault(value.shape, []).append(name)
    found: dict[str, str] = {}
    for name in names:
        if name not in ref or name not in sus or sus[name].dtype.kind != "f" or sus[name].shape != ref[name].shape:
            continue
        held = sus[name].reshape(-1)
        for other in candidates.get(ref[name].shape, []):
            values = ref[other].reshape(-1)
            if other == name or values.min() == values.max():
                continue
            if _moments_agree(values, held, rtol) and _same_multiset(values, held, rtol):
                found[name] = other
                break
    return found


def _reordered_weights(
    ref: Mapping[str, np.ndarray], sus: Mapping[str, np.ndarray], per_tensor: list[dict[str, Any]], rtol: float
) -> list[str]:
    """The changed weights whose changed elements are the reference's own values, re-ordered.

    Compared on the changed elements only (the others are equal in place, so the whole tensors
    are equal multisets exactly when those are), after a check of the first two moments that
    every re-ordering passes (their sums are order-free): a dense change, noise, is told apart
    without sorting its values.
    """
    names = []
    for entry in per_tensor:
        if not entry["changed"]:
            continue
        name = entry["tensor"]
        a, b = ref[name].reshape(-1), sus[name].reshape(-1)
        if not _moments_agree(a, b, rtol):
            continue
        moved = a != b
        x = a[moved].astype(np.float64)  # every stored type widens exactly
        if _same_multiset(x, b[moved].astype(np.float64), rtol):
            names.append(name)
    return names


#: Elements per step of :func:`_moments_agree` (its float64 temporaries stay in the cache).
_MOMENT_CHUNK = 1 << 16


def _moments_agree(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    """Whether the sums and sums of squares of flat ``a`` and ``b`` allow equal multisets within ``rtol``.

    :func:`_same_multiset` lets each sorted pair differ by ``t_i = rtol * max(|x_i|, scale / 1000)``:
    the sums then differ by at most ``sum t_i`` and the sums of squares by ``sum t_i (2 |x_i| + t_i)``,
    both independent of the order (a necessary condition; slack for the float sums' rounding).
    False where a value is not finite (no claim then).
    """
    if not a.size:
        return True
    floor = max(float(a.max()), -float(a.min())) * 1e-3
    totals = np.zeros(7)  # sum a, sum b, sum a^2, sum b^2, sum t, sum t (2|a| + t), sum |a|
    for start in range(0, a.size, _MOMENT_CHUNK):
        x = a[start : start + _MOMENT_CHUNK].astype(np.float64)
        y = b[start : start + _MOMENT_CHUNK].astype(np.float64)
        size = np.abs(x)
        t = rtol * np.maximum(size, floor) + 1e-30
        totals += (x.sum(), y.sum(), x @ x, y @ y, t.sum(), t @ (2 * size + t), size.sum())
    if not np.all(np.isfinite(totals)):
        return False
    slack = 1e-9 * (totals[6] + totals[2] + totals[3]) + 1e-30
    return bool(abs(totals[0] - totals[1]) <= totals[4] + slack and abs(totals[2] - totals[3]) <= totals[5] + slack)


def _other_changes(
    ref: Mapping[str, np.ndarray],
    sus: Mapping[str, np.ndarray],
    weights: set[str],
    rtol: float,
    allowed: dict[str, np.ndarray],
) -> dict[str, list[str]]:
    """Non-weight constants that differ in place, and those that differ even as multisets.

    Across a conversion (``allowed`` not empty) a constant without its own storage bound may be
    stored in float16: compared within :data:`MULTISET_RTOL` of the largest magnitude.
    """
    tolerance = max(rtol, MULTISET_RTOL) if allowed else rtol
    floor = FLOAT16_TINY if allowed else 0.0
    moved, changed = [], []
    for name in sorted(ref):
        if name in weights or name not in sus:
            continue
        a, b = ref[name], sus[name]
        if a.shape != b.shape:
            changed.append(name)
            continue
        if a.dtype.kind in "fc" and b.dtype.kind in "fc":
            a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
            if np.all(np.isfinite(a64)) and np.all(np.isfinite(b64)):
                scale = float(np.abs(a64).max()) if a64.size else 0.0
                extra = allowed.get(name, 0.0)
                if np.all(np.abs(a64 - b64) <= tolerance * scale + extra + floor + 1e-30):
                    continue
            elif np.array_equal(a64, b64, equal_nan=True):
                continue
        elif np.array_equal(a, b):
            continue
        moved.append(name)
        if not _same_multiset(a, b, tolerance, floor):
            changed.append(name)
    return {"differ_in_place": moved, "changed": changed}


def _summarize(per_tensor: list[dict[str, Any]], others: dict[str, list[str]]) -> dict[str, Any]:
    """Aggregate the per-tensor measurements into the evidence the rules read."""
    total = sum(t["elements"] for t in per_tensor)
    changed = sum(t["changed"] for t in per_tensor)
    touched = [t for t in per_tensor if t["changed"]]
    touched_elements = sum(t["elements"] for t in touched)
    dense = [t for t in touched if t["changed"] >= DENSE * t["elements"]]
    new_zeros = sum(t["new_zeros"] for t in touched)
    # A reference count beyond DISTINCT_CAP (a string) is beyond QUANT_MIN_DISTINCT too.
    voters = [
        t for t in touched
        if isinstance(t["reference_distinct_values"], str) or t["reference_distinct_values"] >= QUANT_MIN_DISTINCT
    ]  # fmt: skip
    voting = sum(t["elements"] for t in voters)
    quantized = sum(t["elements"] for t in voters if t["few_distinct_values"])
    pruned = [t for t in touched if t.get("kept_match") is not None]
    kept_match = (
        sum(t["kept_match"] * (t["elements"] - t["reference_zeros"] - t["new_zeros"]) for t in pruned)
        / max(1, sum(t["elements"] - t["reference_zeros"] - t["new_zeros"] for t in pruned))
        if pruned
        else None
    )
    robust = np.array([t["robust_relative_change"] for t in dense]) if dense else np.zeros(0)
    cv = float(robust.std() / robust.mean()) if robust.size > 1 and robust.mean() > 0 else 0.0
    z = [abs(t["correlation_z"]) for t in dense if "correlation_z" in t]
    return {
        "weight_elements": total,
        "weight_tensors": len(per_tensor),
        "changed_tensors": len(touched),
        "dense_tensors": len(dense),
        "changed_fraction": changed / total if total else 0.0,
        "changed_fraction_in_changed_tensors": changed / touched_elements if touched_elements else 0.0,
        "new_zeros": new_zeros,
        "new_zero_fraction": new_zeros / total if total else 0.0,
        "new_zero_fraction_in_changed_tensors": new_zeros / touched_elements if touched_elements else 0.0,
        "kept_match": kept_match,
        "tensors_with_few_distinct_values": sum(1 for t in voters if t["few_distinct_values"]),
        "quantized_fraction": quantized / voting if voting else None,
        "relative_change_median": float(median(robust)) if robust.size else 0.0,
        "relative_change_cv": cv,
        "row_dispersion_median": _median([t.get("row_dispersion") for t in dense]),
        "column_dispersion_median": _median([t.get("column_dispersion") for t in dense]),
        "spectral_excess_median": _median([t.get("spectral_excess") for t in dense]),
        "correlation_z_median": float(median(z)) if z else None,
        "max_abs_correlation_change_vs_weight": max((abs(t.get("correlation", 0.0)) for t in dense), default=0.0),
        "non_weight_constants_changed": others["changed"],
        "non_weight_constants_reordered": [n for n in others["differ_in_place"] if n not in others["changed"]],
        "per_tensor": per_tensor,
    }


def decide(evidence: dict[str, Any]) -> tuple[str, str]:
    """The kind and a one-line reason from :func:`classify_change`'s evidence (see the module docstring)."""
    ev = evidence
    others = ev["non_weight_constants_changed"]
    structure = _structure(ev)
    if not ev["changed_tensors"]:
        if others:
            return "uncertain", f"kind uncertain: the weights are unchanged but {len(others)} other constants changed ({', '.join(others[:3])})"
        return "uncertain", "kind uncertain: constants differ but not the weights"
    if (
        ev["new_zero_fraction_in_changed_tensors"] >= PRUNE_MIN_FRACTION
        and ev["kept_match"] is not None
        and ev["kept_match"] >= PRUNE_KEPT_MATCH
    ):
        return "pruning", (
            f"{ev['new_zeros']} weights ({100 * ev['new_zero_fraction']:.1f} %) became exact zeros the reference "
            f"did not have; {100 * ev['kept_match']:.1f} % of the kept weights are the reference's own (its largest magnitudes), untouched"
            + _besides(others)
        )
    if ev["quantized_fraction"] is not None and ev["quantized_fraction"] >= QUANT_VOTE:
        return "quantization", (
            f"{ev['tensors_with_few_distinct_values']} weight tensors ({100 * ev['quantized_fraction']:.0f} % of the "
            "weights that can tell) hold at most a quarter of the reference's distinct values: a quantization grid"
            + _besides(others)
        )
    dense_all = ev["dense_tensors"] == ev["changed_tensors"]
    # Across a conversion a few other constants may fail their storage bound next to noisy weights.
    stored_only = bool(ev.get("converted")) and len(others) <= NOISE_CONVERTED_OTHERS * ev.get("non_weight_constants", 0)
    if dense_all and (not others or stored_only) and structure["noise_like"]:
        untouched = (
            _constants_text(ev)
            if not others
            else f"{len(others)} of {ev['non_weight_constants']} other constants differ beyond their storage error "
            f"({', '.join(others[:3])}), too few to be a fine-tuning"
        )
        return "noise", (
            f"{100 * ev['changed_fraction']:.1f} % of weights changed, like i.i.d. Gaussian noise: relative change "
            f"{ev['relative_change_median']:.3g} x std in every tensor (CV {ev['relative_change_cv']:.2f}), "
            f"{structure['text']}, {untouched}"
        )
    if ev["dense_tensors"] and others and structure["gradient_like"]:
        return "fine-tuning", (
            f"{ev['dense_tensors']} weight tensors changed densely with the structure of gradient steps "
            f"({structure['text']}) and {len(others)} biases/normalisation constants changed too"
        )
    if (
        ev["dense_tensors"]
        and structure["strongly_gradient_like"]
        and ev["changed_tensors"] >= TUNE_STRONG_TOUCHED * ev["weight_tensors"]
    ):
        return "fine-tuning", (
            f"{ev['dense_tensors']} weight tensors changed densely with the strong structure of gradient steps "
            f"({structure['text']}); no bias/normalisation change seen (below the storage precision)"
        )
    seen = [f"{ev['changed_tensors']}/{ev['weight_tensors']} weight tensors changed ({ev['dense_tensors']} densely)"]
    if ev["new_zeros"]:
        seen.append(f"{ev['new_zeros']} new zeros")
    if ev["dense_tensors"]:
        seen.append(f"relative change {ev['relative_change_median']:.3g} x std")
        seen.append(structure["text"])
    seen.append(_constants_text(ev))
    reordered = ev.get("weights_reordered") or []
    exchanged: dict[str, str] = ev.get("constants_exchanged") or {}
    if exchanged:
        listing = ", ".join(f"'{name}' holds the values of '{other}'" for name, other in list(exchanged.items())[:3])
        listing += f" and {len(exchanged) - 3} more" if len(exchanged) > 3 else ""
        if ev.get("exchange_explains_all"):
            moved = f", the other {len(reordered)} changed weights hold their own values in other places" if reordered else ""
            seen.append(
                f"every changed constant holds reference values: {len(exchanged)} hold another constant's of their "
                f"shape ({listing}){moved}: whole layers exchanged (as when a mixture of experts' experts are swapped, "
                "with or without their router's columns), an order outside the permutations onnxlady models (verify tells whether "
                "it keeps the function)"
            )
            return "uncertain", "kind uncertain: " + "; ".join(seen)
        seen.append(f"{len(exchanged)} changed constants hold another reference constant's values ({listing})")
    if reordered and len(reordered) == ev["changed_tensors"]:
        seen.append(
            "every changed weight holds the reference's own values in other places: a re-ordering outside "
            "the permutations onnxlady models (verify tells whether it keeps the function)"
        )
    elif reordered:
        seen.append(f"{len(reordered)} of the changed weight tensors hold the reference's own values in other places")
    return "uncertain", "kind uncertain: " + "; ".join(seen)


def _constants_text(ev: dict[str, Any]) -> str:
    """What the biases and normalisation constants did: changed, only moved, or nothing.

    A constant whose values moved to other places (the multiset kept) is not untouched: the
    resync's permutation does not explain it (a re-ordering the rules do not model).
    """
    others = ev["non_weight_constants_changed"]
    if others:
        return f"{len(others)} biases/normalisation constants changed"
    moved = ev.get("non_weight_constants_reordered") or []
    if moved:
        return (
            f"{len(moved)} biases/normalisation constants re-ordered ({', '.join(moved[:3])}), "
            "holding the reference's values in other places"
        )
    return "biases and normalisation untouched"


def _besides(others: list[str]) -> str:
    return f"; besides, {len(others)} biases/normalisation constants changed ({', '.join(others[:3])})" if others else ""


def _structure(ev: dict[str, Any]) -> dict[str, Any]:
    """Whether the dense change looks like i.i.d. noise or like gradient steps, and the figures."""
    row, col, spec = ev["row_dispersion_median"], ev["column_dispersion_median"], ev["spectral_excess_median"]
    corr, cv = ev["correlation_z_median"], ev["relative_change_cv"]
    dispersion = max((v for v in (row, col) if v is not None), default=None)
    parts = [f"relative change CV {cv:.2f} across tensors"]
    if dispersion is not None:
        parts.append(f"row/column dispersion {dispersion:.2f}")
    if spec is not None:
        parts.append(f"spectral excess {spec:.2f}")
    if corr is not None:
        parts.append(f"correlation with the weight |z| {corr:.1f}")
    measurable = dispersion is not None or spec is not None
    noise_like = (
        measurable
        and cv <= NOISE_CV
        and (dispersion is None or dispersion <= NOISE_DISPERSION)
        and (spec is None or spec <= NOISE_SPECTRAL)
        and (corr is None or corr <= NOISE_CORRELATION_Z)
    )
    # SGD updates are sums of outer products (activations x errors): low rank, hence a top
    # singular value above i.i.d. noise's; with one more departure from i.i.d. to be clear.
    gradient_like = (spec is not None and spec >= TUNE_SPECTRAL) and (
        (dispersion is not None and dispersion >= TUNE_DISPERSION)
        or (corr is not None and corr >= TUNE_CORRELATION_Z)
        or cv >= TUNE_CV
    )
    strongly = dispersion is not None and spec is not None and min(dispersion, spec) >= TUNE_STRONG
    return {
        "noise_like": noise_like,
        "gradient_like": gradient_like,
        "strongly_gradient_like": strongly,
        "text": ", ".join(parts) + " (i.i.d. noise: CV 0, dispersion 1, spectral excess 1, |z| under 1)",
    }


# -- scaled neurons under noise ---------------------------------------------------------------
@dataclass(frozen=True)
class NoisyScale:
    """A neuron whose row is ``k`` times the reference's, up to the noise the rest carries."""

    tensor: str
    neuron: int
    k: float
    z: float


def find_scaled_under_noise(
    tensors: Iterable[tuple[str, Collection[np.ndarray] | np.ndarray | FittedRows, Collection[np.ndarray] | np.ndarray | FittedRows]],
) -> list[NoisyScale]:
    """Neurons scaled by ``k`` while every other neuron of the model is only noisy.

    ``tensors`` holds, per producer tensor, its name and its neurons' rows (flattened) in the
    reference's order, reference and suspect: collections of rows (lists, or rows computed as
    they are iterated, each once), float64 matrices with a row per neuron when the rows have
    one width (read at once), or the rows' least-squares figures (:class:`FittedRows`, the
    same object on both sides: the figures those matrices give); read once, so it may be a
    generator that builds one tensor's rows at a time. For each neuron: the least-squares ``k`` and its
    standard error ``sigma / |r|`` (``sigma`` the tensor's median residual std, so mis-paired
    rows do not widen it), as a z-score. A neuron is scaled when ``|k - 1|`` exceeds
    :data:`SCALE_Z` standard errors and :data:`SCALE_MIN`, ``0 < k <= SCALE_MAX_K``, its row is
    not negligible (at least a tenth of its tensor's median row norm: a near-zero row's ``k`` is
    meaningless) and its residual is that of the noise (not a mis-paired row); and only when the
    model's bulk is unscaled (median ``|z|`` over all neurons at most :data:`SCALE_BULK_Z`) and
    the scaled neurons are few (at most :data:`SCALE_MAX_FRACTION` of all neurons).
    """
    candidates: list[NoisyScale] = []
    bulk: list[np.ndarray] = []
    total = 0
    for tensor, ref_rows, sus_rows in tensors:
        count = len(ref_rows)
        if count < 2:
            continue
        if isinstance(ref_rows, np.ndarray) and isinstance(sus_rows, np.ndarray):  # rows of one width: at once
            found_k, norms, resid, scaled = least_squares_rows(ref_rows, sus_rows)
            ks = np.where(scaled, found_k, 1.0)  # an all-zero row has no scale
        elif isinstance(ref_rows, FittedRows):  # fitted already (a block of rows at a time)
            assert sus_rows is ref_rows  # the figures are of both sides
            norms, resid = ref_rows.norms, ref_rows.residuals
            ks = np.where(ref_rows.usable, ref_rows.k, 1.0)
        else:
            assert not isinstance(sus_rows, FittedRows)
            ks, norms, resid = np.ones(count), np.zeros(count), np.zeros(count)
            for j, (r, s) in enumerate(zip(ref_rows, sus_rows)):
                r64, s64 = r.astype(np.float64, copy=False), s.astype(np.float64, copy=False)  # read only
                norm2 = float(r64 @ r64)
                if not norm2 or r64.size < 2:  # an all-zero row has no scale
                    continue
                k = float(r64 @ s64) / norm2
                ks[j], norms[j] = k, math.sqrt(norm2)
                e = s64 - k * r64
                resid[j] = float(np.sqrt(e @ e / (r64.size - 1)))
        usable = norms > 0.1 * float(median(norms))
        if not np.any(usable):
            continue
        sigma = float(median(resid[usable]))
        if not sigma:
            continue  # exact rows: the exact scale analysis decides
        z = (ks - 1) * norms / sigma
        bulk.append(np.abs(z[usable]))
        total += count
        candidates += [
            NoisyScale(tensor, int(j), float(ks[j]), float(z[j]))
            for j in np.flatnonzero(usable)
            if abs(z[j]) > SCALE_Z
            and abs(ks[j] - 1) > SCALE_MIN
            and 0 < ks[j] <= SCALE_MAX_K
            and resid[j] <= 2.0 * sigma * max(1.0, ks[j])
        ]
    if not candidates or float(median(np.concatenate(bulk))) > SCALE_BULK_Z:
        return []  # none, or most neurons moved: not a few scaled ones
    return candidates if len(candidates) <= SCALE_MAX_FRACTION * total else []
