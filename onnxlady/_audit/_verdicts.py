"""Audit a suspect model against a reference, neuron by neuron, after re-synchronization.

:func:`audit_models` runs :func:`~onnxlady._resync.resync_model`, then compares every producer
neuron (a row of a Conv/Gemm/MatMul weight along its output axis) of the reference with the
re-synchronized suspect: cosine similarity and L2-norm ratio. Cosine alone misses the integrity
attack of *Find the Lady*: scaling a neuron's weights by ``k`` keeps cosine 1 but changes the
output; the norm ratio exposes it, and the consumers' input columns tell a function-preserving
rescale (``s`` on the producer row and bias before a positively homogeneous activation, ``1/s``
on the consumer columns, or absorbed by a BatchNorm's statistics) from the attack.

Verdicts (:attr:`AuditReport.verdict`), first that applies:

``identical``         every constant bit-equal, before any resync;
``permuted``          after resync every constant equal up to float rounding: the suspect is
                      the reference with its neurons re-ordered (functionally equivalent);
``permuted-rescaled`` equal once function-preserving positive per-neuron scales are undone
                      (``report.rescaled`` lists them; :func:`canonicalize` undoes them);
``scaled``            some neurons' rows are scaled by ``k`` with no compensation, everything
                      else is equal up to rounding (``report.scaled_neurons``);
``perturbed``         anything else, with ``report.perturbation`` = the likely kind and evidence
                      (under noise, ``report.rescaled`` lists the compensated rescales read
                      through it: both findings);
``converted``         every constant equals the reference's within storage error, in the
                      reference's order already (no neuron moved): a converter's output, or a
                      rewrite that leaves no converter's signature (a simplifier's folded
                      Constant nodes, dropped zero inputs, float rounding).

A suspect that went through a converter (float16, folded BatchNorm, QDQ, simplifier, opset; see
:mod:`onnxlady._resync._across`) is compared in a form both models share, each value within the error
its storage allows; :attr:`AuditReport.conversions` lists what the converter did, separately
from the verdict: a model only permuted and converted is ``permuted``, not modified.

A suspect of another architecture raises :class:`OnnxladyError` (from resync).
Exit codes: 0 for identical/permuted/permuted-rescaled, 1 for scaled/perturbed.

Thresholds (module constants):

- *float rounding*: ``|a - b| <= rtol * max|ref| + atol`` per tensor (``rtol`` 1e-5 by default);
- a row is an *exact rescale* of the reference row when its cosine is above ``1 - COS_EXACT``
  (1e-6) and its least-squares scale ``k`` differs from 1 by more than ``SCALE_TOL`` (1e-4);
- compensation holds when every consumer column of the neuron has scale ``1/k`` (same rtol
  ``SCALE_MATCH`` 1e-3) and, when the producer has a bias, the bias is scaled by ``k`` too, and
  every op between producer and consumers is positively homogeneous (Relu, LeakyRelu, PRelu,
  pooling, reshapes...); or a BatchNorm right after the producer has mean ``k x`` and variance
  ``k^2 x`` (rtol ``BN_MATCH`` 1e-2, its epsilon makes it inexact).

Perturbation kinds, on the Conv/Gemm/MatMul weights (what ``perturb_model`` touches):

- *pruning*: suspect zeros that the reference did not have amount to at least
  ``PRUNE_MIN_FRACTION`` (5 %) of the weight elements and at least 90 % of changed elements
  became 0;
- *quantization*: the suspect's distinct values per tensor are at most ``QUANT_RATIO`` (1/4) of
  the reference's, in at least half the tensors (counts reported);
- *noise*: at least 90 % of weight elements changed, non-weight constants (biases, BN) unchanged,
  the per-tensor relative change (std of difference / std of reference) roughly uniform
  (coefficient of variation below 0.5) and the change uncorrelated with the weight (|rho| < 0.2);
- *fine-tuning*: dense changes that fail the noise test: biases/BN stats changed too,
  non-uniform per-tensor change or change correlated with the weights;
- *unknown* otherwise.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxlady._analysis._channels import COPY_SUFFIX, ChannelAnalysis, analyze
from onnxlady._audit._activation_quantization import (
    activation_scales,
    mismatched_activation_quantization,
    unclamped_fused_activations,
)
from onnxlady._audit._added_operators import added_operators, approximated_gelus, changed_operators
from onnxlady._audit._beside import Beside
from onnxlady._audit._bypassed_branches import bypassed_branches
from onnxlady._audit._derived_values import changed_copies, changed_derived_constants
from onnxlady._audit._folded_inputs import changed_folded_inputs
from onnxlady._audit._forensics import (
    SCALE_MAX_K,
    SCALE_MIN,
    classify_change,
    find_scaled_under_noise,
    weight_infos,
)
from onnxlady._audit._graph_edits import graph_edits, rewired_operators
from onnxlady._audit._kept_order import kept_in_place, two_orders
from onnxlady._audit._lazy import (
    FileViews,
    Held,
    LazyConstants,
    Overlay,
    ReadEachTime,
    constants_of,
    gather,
    reference_constants,
    resynced_constants,
)
from onnxlady._audit._operator_constants import changed_operator_constants
from onnxlady._audit._relatedness import check_related
from onnxlady._audit._renamed_constants import renamed_constants
from onnxlady._audit._rowwise import FittedRows, cos_ratio_of, least_squares_blocks, row_dots
from onnxlady._audit._select import median
from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._functions import inlined_view
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._files import copy_model
from onnxlady._io._pages import ordinary_pages
from onnxlady._io._progress import say
from onnxlady._io._tensors import all_finite, read_array, read_constants, tensor_holders
from onnxlady._resync._across import AcrossResync, Approx, pair_unplanned
from onnxlady._resync._branch_merges import merged_sums
from onnxlady._resync._conversions import FLOAT16_IN_FLOAT32
from onnxlady._resync._entry import resync_model
from onnxlady._resync._match import ConversionFinding, analyze_with_state
from onnxlady._resync._solver import ResyncResult
from onnxlady._resync._values import half_ulp
from onnxlady._rules.einsum import einsum_equation, einsum_weight_axes

__all__ = [
    "VERDICTS",
    "AuditReport",
    "NeuronScale",
    "TensorAudit",
    "audit_models",
    "canonicalize",
]

VERDICTS = ("identical", "permuted", "permuted-rescaled", "scaled", "perturbed", "modified", "converted")
#: Relative tolerance of the audit's float comparisons (rounding, not change); verify's is VERIFY_RTOL.
AUDIT_RTOL = 1e-5
COS_EXACT = 1e-6
SCALE_TOL = 1e-4
SCALE_MATCH = 1e-3
BN_MATCH = 1e-2
PRUNE_MIN_FRACTION = 0.05
QUANT_RATIO = 0.25
NOISE_DENSE = 0.9
NOISE_CV = 0.5
NOISE_CORR = 0.2

PRODUCER_OPS = ("Conv", "Gemm", "MatMul")
#: Kinds of change against which scaled neurons are reported as an attack (both findings).
MIXED_BACKGROUNDS = ("noise", "quantization", "pruning")
#: Ops through which a positive per-channel scale passes unchanged (f(s x) = s f(x), s > 0).
HOMOGENEOUS_OPS = {
    "Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "Flatten", "Reshape", "Identity", "Transpose", "Concat", "Split", "Slice", "Dropout", "Squeeze",
    "Unsqueeze", "Pad", "Add",
}  # fmt: skip


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeuronScale:
    """One neuron whose producer row is the reference's times ``k``."""

    group: str
    neuron: int  # index in the reference's order
    tensor: str  # the producer weight
    k: float
    compensated_by: str | None  # "consumer columns", "batchnorm" or None (the attack)


@dataclass
class TensorAudit:
    """Per producer tensor: cosine and L2-norm ratio of every neuron's row (reference order)."""

    tensor: str
    group: str | None
    axis: int
    cosine: list[float]
    norm_ratio: list[float]
    flagged: list[int]  # neurons whose norm ratio is off 1 (scaled or rescaled)


@dataclass
class AuditReport:
    verdict: str
    summary: str
    rtol: float
    resync: ResyncResult | None
    tensors: list[TensorAudit] = field(default_factory=list)
    rescaled: list[NeuronScale] = field(default_factory=list)
    scaled_neurons: list[NeuronScale] = field(default_factory=list)
    perturbation: dict[str, Any] | None = None
    differing_tensors: list[str] = field(default_factory=list)
    #: Per group: similarity matrices (reference x suspect neurons) before/after resync under
    #: "before"/"after" (lists of rows), and "step", the sampling stride of their neurons (an int).
    similarity: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: What a converter did to either model (float16, folded BatchNorm...): not an integrity change.
    conversions: list[ConversionFinding] = field(default_factory=list)
    #: Operators changed, inserted or removed in a node-for-node copy (:mod:`onnxlady._audit._graph_edits`).
    graph_edits: list[str] = field(default_factory=list)
    #: The suspect's activation scales of a static quantization the float reference has no
    #: counterpart for and no relation checks (:mod:`onnxlady._audit._activation_quantization`).
    unchecked_activation_scales: list[str] = field(default_factory=list)
    #: The reference's analysis, kept so that rendering and canonicalizing do not analyse it again.
    analysis: ChannelAnalysis | None = field(default=None, repr=False, compare=False)

    @property
    def exit_code(self) -> int:
        """0 when the suspect is the reference up to neuron order, scales or conversion; else 1."""
        return (
            0 if self.verdict in ("identical", "permuted", "permuted-rescaled", "converted") else 1
        )

    @property
    def scales(self) -> dict[str, dict[int, float]]:
        """Function-preserving scales by producer tensor and neuron (for :func:`canonicalize`)."""
        out: dict[str, dict[int, float]] = {}
        for item in self.rescaled:
            out.setdefault(item.tensor, {})[item.neuron] = item.k
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``onnxlady audit --json`` prints it beside the two paths).

        Returns:
            A dict of plain values: the verdict, its exit code, the summary, the findings and the
            per-group resync details.
        """
        groups = self.resync.to_dict()["groups"] if self.resync is not None else []
        # Only where a static quantization left activation scales uncompared (the key is new).
        unchecked = {"unchecked_activation_scales": list(self.unchecked_activation_scales)} if self.unchecked_activation_scales else {}
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "summary": self.summary,
            "rtol": self.rtol,
            "functionally_equivalent": self.exit_code == 0,
            "conversions": [asdict(c) for c in self.conversions],
            "differing_tensors": list(self.differing_tensors),
            "graph_edits": list(self.graph_edits),
            "rescaled": [asdict(s) for s in self.rescaled],
            "scaled_neurons": [asdict(s) for s in self.scaled_neurons],
            "perturbation": self.perturbation,
            "groups": groups,
            "tensors": [_tensor_dict(t) for t in self.tensors],
            **unchecked,
        }


def _tensor_dict(audit: TensorAudit) -> dict[str, Any]:
    """``asdict(audit)`` without its deep copy of every float (a second per large model's report)."""
    return {
        "tensor": audit.tensor,
        "group": audit.group,
        "axis": audit.axis,
        "cosine": list(audit.cosine),
        "norm_ratio": list(audit.norm_ratio),
        "flagged": list(audit.flagged),
    }


# -- helpers ----------------------------------------------------------------------------------
def _close(a: np.ndarray, b: np.ndarray, rtol: float, allowed: np.ndarray | None = None) -> bool:
    """Equal up to ``rtol`` times the largest magnitude of ``a``, plus ``allowed``.

    ``allowed``, added element by element, is the error a conversion's storage may add.
    """
    if a.shape != b.shape:
        return False
    if a.dtype.kind not in "fc" and b.dtype.kind not in "fc":
        return bool(np.array_equal(a, b))
    if a.dtype in _NATIVE_FLOATS and b.dtype in _NATIVE_FLOATS and (allowed is None or allowed.shape == a.shape):
        return _close_chunked(a, b, rtol, allowed)
    a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)  # read only: no copies
    if not np.all(np.isfinite(a64)) or not np.all(np.isfinite(b64)):
        return bool(np.array_equal(a64, b64, equal_nan=True))
    scale = float(np.abs(a64).max()) if a64.size else 0.0
    extra = 0.0 if allowed is None else allowed
    return bool(np.all(np.abs(a64 - b64) <= rtol * scale + extra + 1e-30))


_NATIVE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: Elements compared at once by :func:`_close_chunked`: its float64 temporaries (three of 512
#: KiB) stay in cache, and add little to the peak of the step they run beside (see _beside).
_CHUNK = 1 << 16


def _close_chunked(a: np.ndarray, b: np.ndarray, rtol: float, allowed: np.ndarray | None) -> bool:
    """:func:`_close` of two float arrays, computed the same way (float64) a chunk at a time.

    Without float64 copies of whole tensors, and it stops at the first chunk that differs (a
    perturbed weight's first one).
    """
    if not a.size:
        return True
    # max |a| as the largest of max(a) and -min(a) (finite: the same value), without an array of
    # |a| (fresh memory the size of a weight, per tensor compared). Both are finite exactly when
    # every value is (a NaN or an infinity reaches one of them): a's test on the way.
    high, low = a.max(), a.min()
    if not (np.isfinite(high) and np.isfinite(low)):
        return bool(np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True))
    scale = float(max(high, -low))  # a float16/32 maximum is the float64 one
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    flat_allowed = allowed.reshape(-1) if allowed is not None else None
    for start in range(0, flat_a.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        extra = 0.0 if flat_allowed is None else flat_allowed[part]
        difference = np.abs(flat_a[part].astype(np.float64) - flat_b[part].astype(np.float64))
        if not np.all(difference <= rtol * scale + extra + 1e-30):
            # With a finite, a NaN or an infinity of b is no equal value either: not close.
            return False
    # Close where b is finite; where it is not, a (finite) does not equal it value for value.
    return all_finite(b)


def _source(name: str) -> str:
    return name.split(COPY_SUFFIX)[0]


def _axes_of(node: onnx.NodeProto, slot: int, rank: int, graph: ModelGraph | None = None) -> tuple[int, int] | None:
    """(producer axis, consumer axis) of a weight operand, or None."""
    if node.op_type == "Conv" and slot == 1:
        return 0, 1
    if node.op_type == "Gemm" and slot == 1 and rank == 2:
        trans_b = int(node_attribute(node, "transB", 0))
        return (0, 1) if trans_b else (1, 0)
    if node.op_type == "MatMul" and slot == 1 and rank >= 2:
        return rank - 1, rank - 2
    if node.op_type == "Einsum" and graph is not None:
        found = einsum_weight_axes(einsum_equation(node), len(node.input), slot, rank, lambda i: graph.is_constant(node.input[i]))
        if found is not None and len(found[0]) == 1 and len(found[1]) == 1:
            return found[0][0], found[1][0]  # a matrix-like weight: one neuron axis, one input axis
    return None


def _positions(lab: np.ndarray, size: int) -> list[np.ndarray]:
    """Per neuron ``j < size``, the indices where ``lab == j``, ascending (one sort, not one scan per neuron)."""
    order = np.argsort(lab, kind="stable")
    ordered = lab[order]
    neurons = np.arange(size)
    starts, ends = np.searchsorted(ordered, neurons, "left"), np.searchsorted(ordered, neurons, "right")
    return [order[start:end] for start, end in zip(starts.tolist(), ends.tolist())]


def _rows(array: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """The slices ``pos`` along ``axis``, that axis first, flattened.

    ``np.moveaxis`` spelled as a transpose: called once per neuron and use, its argument
    checks cost more than the gather on small slices (same values, same order).
    """
    # A view that is not aligned (the suspect as stored) is gathered as bytes: the same values.
    taken = np.take(array, pos, axis=axis) if array.flags.aligned else gather(array, pos, axis)
    if axis == 0 or taken.ndim < 2:
        return taken.reshape(-1)
    return taken.transpose((axis, *range(axis), *range(axis + 1, taken.ndim))).reshape(-1)


def _row64(array: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """:func:`_rows` in float64: the values of a float64 copy's slices, without copying the array."""
    return _rows(array, axis, pos).astype(np.float64, copy=False)


def _cos_ratio(r: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """Cosine, norm ratio |s|/|r| and least-squares scale <r,s>/<r,r> of two rows."""
    nr, ns = float(np.linalg.norm(r)), float(np.linalg.norm(s))
    return cos_ratio_of(nr, ns, float(np.dot(r, s)) if nr and ns else 0.0)


#: Rows gathered into one matrix at a time: at most this many values (float64: 256 KiB). Twice
#: as many added 1.6 MB to the peak of an 11 MB model's audit (the heap keeps what such blocks
#: leave); half as many cost a tenth more time on wide rows (a row per block).
_BLOCK_VALUES = 1 << 15


def _block_width(use: _Use, array: np.ndarray) -> int | None:
    """How many slices each neuron of ``use`` has, where its rows are read a block at a time.

    That is where every neuron has the same number; None otherwise. Wide rows too (a few
    numpy calls per neuron were most of the scale analysis and of the searches for scaled
    neurons on models of wide layers): a block holds at most :data:`_BLOCK_VALUES` values, so a
    whole tensor's rows are never held at once.
    """
    if not use.positions or not array.ndim or not array.shape[use.axis]:
        return None
    width = use.positions[0].size
    if not width or any(pos.size != width for pos in use.positions):
        return None
    # Rows of one value stay per row: np.dot of one-element vectors multiplies (a zero
    # product keeps its sign), where BLAS's dot of longer rows sums from +0.
    return width if width * (array.size // array.shape[use.axis]) >= 2 else None


def _row_blocks(array: np.ndarray, use: _Use, width: int) -> Iterator[np.ndarray]:
    """The neurons' rows of ``use`` in float64, a block of neurons at a time (a matrix, a row per neuron).

    Row ``j`` of the blocks, in order, holds the values of ``_row64(array, use.axis,
    use.positions[j])``, in the same order (see :func:`_picked_rows`); ``width`` from
    :func:`_block_width`. Each row of a block is C-contiguous, as each per-row copy was: BLAS's
    dot reads it in the same order (its sums depend on the length, not on where the row starts).
    """
    step = max(1, _BLOCK_VALUES // (width * (array.size // array.shape[use.axis])))
    for start in range(0, len(use.positions), step):
        positions = use.positions[start : start + step]
        # A view that is not aligned (the suspect as stored) is gathered as bytes, as in _rows.
        indices = np.concatenate(positions)
        taken = np.take(array, indices, axis=use.axis) if array.flags.aligned else gather(array, indices, use.axis)
        # C order: each row contiguous, as the per-row copies were (BLAS's dot of strided
        # vectors sums in another order).
        yield np.moveaxis(taken, use.axis, 0).reshape(len(positions), -1).astype(np.float64, order="C")


def _cos_ratios(r_arr: np.ndarray, s_arr: np.ndarray, use: _Use) -> tuple[list[float], list[float], list[float]]:
    """Per neuron of ``use``: :func:`_cos_ratio` of its rows in the two arrays, as three lists.

    A block of rows at a time (the same dot products, see :mod:`onnxlady._audit._rowwise`).
    """
    width = _block_width(use, r_arr) if r_arr.shape == s_arr.shape else None
    if width is None:
        triples = [_cos_ratio(_row64(r_arr, use.axis, pos), _row64(s_arr, use.axis, pos)) for pos in use.positions]
    else:
        norms_r, norms_s, dots = [], [], []
        for r, s in zip(_row_blocks(r_arr, use, width), _row_blocks(s_arr, use, width)):
            norms_r.append(np.sqrt(row_dots(r, r)))
            norms_s.append(np.sqrt(row_dots(s, s)))
            dots.append(row_dots(r, s))
        triples = [
            cos_ratio_of(nr, ns, dot)
            for nr, ns, dot in zip(
                np.concatenate(norms_r).tolist(), np.concatenate(norms_s).tolist(), np.concatenate(dots).tolist()
            )
        ]
    return [t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples]


@dataclass
class _Use:
    plan: int
    tensor: str  # name in the suspect/resynced model
    source: str  # name in the reference
    node: int
    slot: int
    axis: int
    positions: list[np.ndarray]


#: The last :func:`_group_uses` computed: (its analysis, held weakly, the names, the uses).
_LAST_USES: list[tuple[weakref.ref[ChannelAnalysis], frozenset[str], dict[str, dict[str, list[_Use]]]]] = []


def _group_uses(
    analysis: ChannelAnalysis, names: set[str]
) -> dict[str, dict[str, list[_Use]]]:
    """Per group: its producer rows, biases, BN statistics and consumer columns (read only).

    The same for the same analysis and names: one audit asks five times (similarity before and
    after, the scale analysis, noisy scales and rescales), and each answer sorts every
    tensor's neuron labels, so the last one is kept.
    """
    key = frozenset(names)
    for known, known_names, uses in _LAST_USES:
        if known() is analysis and known_names == key:
            return uses
    uses = _find_group_uses(analysis, names)
    _LAST_USES[:] = [(weakref.ref(analysis), key, uses)]
    return uses


def _find_group_uses(analysis: ChannelAnalysis, names: set[str]) -> dict[str, dict[str, list[_Use]]]:
    """:func:`_group_uses`, computed."""
    nodes = analysis.graph.nodes
    out: dict[str, dict[str, list[_Use]]] = {}
    for number, plan in enumerate(analysis.tensors):
        tensor = plan.tensor if plan.tensor in names else plan.source
        node_index, slot = plan.uses[0]
        if node_index < 0:
            continue
        node = nodes[node_index]
        rank = len(analysis.graph.shape(plan.source) or ())
        axes = _axes_of(node, slot, rank, analysis.graph)
        biased = _biased_producer(analysis, node, slot)
        for axis, expr in plan.axes:
            for gid, lab in analysis.neuron_labels(expr).items():
                group = analysis.group(gid)
                if not group.permutable:
                    continue
                use = _Use(
                    number,
                    tensor,
                    plan.source,
                    node_index,
                    slot,
                    axis,
                    _positions(lab, group.size),
                )
                kinds = out.setdefault(
                    gid, {"producer": [], "bias": [], "bn": [], "consumer": []}
                )
                if axes is not None and axis == axes[0]:
                    kinds["producer"].append(use)
                elif axes is not None and axis == axes[1]:
                    kinds["consumer"].append(use)
                elif node.op_type in ("Conv", "Gemm") and slot == 2:
                    kinds["bias"].append(use)
                elif biased is not None:  # read as the producer's bias: its node the producer's
                    kinds["bias"].append(_Use(number, tensor, plan.source, biased, slot, axis, use.positions))
                elif node.op_type == "BatchNormalization" and slot in (3, 4):
                    kinds["bn"].append(use)
    return out


def _biased_producer(analysis: ChannelAnalysis, node: onnx.NodeProto, slot: int) -> int | None:
    """The producer (Conv, Gemm, MatMul) whose output an ``Add`` adds its constant at ``slot`` to, if any.

    An exporter writes a MatMul's bias as an ``Add`` after it: a compensated rescale scales it
    with the row, and a rescale that leaves it as it was is no longer undone by the next layer
    (the bias is then added before the scale). Read as the producer's bias, it is checked and
    undone as a Conv's or Gemm's is (session 16: with it left out, the first read ``modified``
    and the second ``permuted-rescaled``).
    """
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or slot not in (0, 1) or len(node.input) != 2:
        return None
    produced = analysis.graph.producer.get(node.input[1 - slot])
    if produced is None or not 0 <= produced[0] < len(analysis.graph.nodes):
        return None
    producer = analysis.graph.nodes[produced[0]]
    return produced[0] if producer.op_type in PRODUCER_OPS and producer.domain in ("", "ai.onnx") else None


def _homogeneous_path(analysis: ChannelAnalysis, node_index: int) -> bool:
    """Every op from the producer's output to the next producers is positively homogeneous."""
    graph = analysis.graph
    outputs = set(graph.graph_outputs)
    todo, seen = list(graph.nodes[node_index].output), set()
    while todo:
        name = todo.pop()
        if name in outputs:
            return False
        # The graph's consumer lists (slot -1: a body's outer-scope read, not an input): a scan
        # of every node per producer would make the audit quadratic in the node count.
        for index in (index for index, slot in graph.consumers.get(name, ()) if slot >= 0):
            if index in seen:
                continue
            seen.add(index)
            node = graph.nodes[index]
            if node.op_type in PRODUCER_OPS:
                continue
            if node.op_type not in HOMOGENEOUS_OPS:
                return False
            todo.extend(node.output)
    return True


def _bn_after(analysis: ChannelAnalysis, node_index: int) -> int | None:
    graph = analysis.graph
    out = graph.nodes[node_index].output[0]
    readers = [index for index, slot in graph.consumers.get(out, ()) if slot == 0]
    return min((index for index in readers if graph.nodes[index].op_type == "BatchNormalization"), default=None)


# -- the scale analysis -----------------------------------------------------------------------
def _scale_analysis(
    analysis: ChannelAnalysis,
    ref: Mapping[str, np.ndarray],
    work: MutableMapping[str, np.ndarray],
    bounds: _Bounds | None = None,
) -> tuple[list[NeuronScale], list[NeuronScale], list[TensorAudit]]:
    """Find rescaled neurons group by group, undoing compensated scales in ``work`` as it goes.

    So later groups see aligned, unscaled input columns; ``bounds``, across a conversion, are
    widened to match. Returns (rescaled, attacked, tensors).

    ``work``'s arrays are read as they are (float32 for a twin): each slice is compared in
    float64, and an array is replaced by a float64 copy of its own only when a scale is undone
    in it (copies of every weight were the audit's largest memory).
    """
    uses = _group_uses(analysis, set(work))
    rescaled: list[NeuronScale] = []
    attacked: list[NeuronScale] = []
    audits: list[TensorAudit] = []
    owned: set[str] = set()  # the arrays of work that are copies of our own, float64
    whole = ref
    for group in analysis.permutable_groups:
        kinds = uses.get(group.id)
        if not kinds:
            continue
        # Views of the reference's file, mapped anew at each index: each mapped once per group
        # here, where a scaled neuron's compensation reads a few tensors per neuron.
        ref = Held(whole) if isinstance(whole, FileViews) else whole
        for prod in kinds["producer"]:
            r_arr, s_arr = ref[prod.source], work[prod.tensor]
            cos, ratio, ks = _cos_ratios(r_arr, s_arr, prod)
            flagged = []
            node = prod.node
            biases = [b for b in kinds["bias"] if b.node == node]
            bn_node = _bn_after(analysis, node)
            bn = (
                [b for b in kinds["bn"] if b.node == bn_node]
                if bn_node is not None
                else []
            )
            # Undoing neuron j's scale changes only row j of the producer, unless another use of
            # the group lives in the same tensor: then each row is read again once it is its turn.
            shared = any(
                use.tensor == prod.tensor and use is not prod
                for use in (*kinds["producer"], *kinds["bias"], *kinds["bn"], *kinds["consumer"])
            )
            for j in range(group.size):
                k = ks[j]
                if not (k > 0 and abs(k - 1) > SCALE_TOL):
                    # Not scaled whatever the row's exactness and slack (slack >= 0; a NaN one fails
                    # the test below too): a converted model's rows, read one at a time, are not read.
                    continue
                if bounds is None and not shared:
                    exact, slack = cos[j] > 1 - COS_EXACT, 0.0  # what _exact_multiple computes
                else:
                    row = None if bounds is None else bounds.rows(prod, j)
                    exact, slack = _exact_multiple(
                        _row64(r_arr, prod.axis, prod.positions[j]),
                        _row64(work[prod.tensor], prod.axis, prod.positions[j]),
                        k,
                        row,
                    )
                if not (exact and k > 0 and abs(k - 1) > SCALE_TOL + slack):
                    continue
                flagged.append(j)
                how = _compensation(analysis, kinds, prod, biases, bn, ref, work, j, k, bounds, slack)
                item = NeuronScale(group.id, j, prod.source, float(k), how)
                if how is None:
                    attacked.append(item)
                    _scale(work, [prod], j, 1 / k, bounds, slack, owned)  # judge the rest as if undone
                    if _agree(_ratio_of(biases, ref, work, j, bounds), k, SCALE_MATCH, slack):
                        _scale(work, biases, j, 1 / k, bounds, slack, owned)  # the whole neuron scaled
                    continue
                rescaled.append(item)
                _scale(work, [prod], j, 1 / k, bounds, slack, owned)
                if how == "batchnorm":
                    for b in bn:
                        slot_k = k if b.slot == 3 else k * k
                        _scale(work, [b], j, 1 / slot_k, bounds, slack, owned)
                else:
                    _scale(work, biases, j, 1 / k, bounds, slack, owned)
                    _scale(work, kinds["consumer"], j, k, bounds, slack, owned)
            audits.append(
                TensorAudit(prod.source, group.id, prod.axis, cos, ratio, flagged)
            )
    return rescaled, attacked, audits


def _ratio_of(
    uses: list[_Use],
    ref: Mapping[str, np.ndarray],
    work: Mapping[str, np.ndarray],
    j: int,
    bounds: _Bounds | None = None,
) -> list[tuple[float, float]]:
    """Per use: the scale of neuron ``j``'s slice against the reference and its uncertainty.

    The uncertainty is relative; the scale is NaN where the slice is not an exact multiple (a zero
    slice reads as exact).
    """
    out = []
    for use in uses:
        r = _row64(ref[use.source], use.axis, use.positions[j])  # the slice, not the tensor
        s = _row64(work[use.tensor], use.axis, use.positions[j])
        k = _cos_ratio(r, s)[2]
        exact, slack = _exact_multiple(r, s, k, None if bounds is None else bounds.rows(use, j))
        out.append((k, slack) if exact or not np.any(r) else (float("nan"), 0.0))
    return out


def _exact_multiple(r: np.ndarray, s: np.ndarray, k: float, bound: np.ndarray | None) -> tuple[bool, float]:
    """Whether ``s`` is ``k r`` exactly, and the relative uncertainty of ``k``.

    Between twin graphs: cosine above ``1 - COS_EXACT``. Across a conversion the storage error
    decides (coarse storage, bfloat16 or int8, lowers the cosine of equal rows below that):
    every element of ``s - k r`` within ``max(1, k)`` times its bound, plus what the error of
    the least-squares ``k`` itself explains (see :class:`_Bounds`).
    """
    if bound is None:
        return _cos_ratio(r, s)[0] > 1 - COS_EXACT, 0.0
    norm = float(np.linalg.norm(r))
    if not norm or not k:  # exact zeros: the division below needs them excluded
        return False, 0.0
    slack = float(np.linalg.norm(bound)) / (abs(k) * norm)
    limit = max(1.0, abs(k)) * bound + slack * abs(k) * np.abs(r) + 1e-30
    return bool(np.all(np.abs(s - k * r) <= limit)), slack


def _agree(ratios: list[tuple[float, float]], target: float, tolerance: float, slack: float) -> bool:
    """Every ratio equals ``target`` within ``tolerance`` plus both relative uncertainties."""
    return all(abs(x / target - 1) <= tolerance + own + slack for x, own in ratios)


def _compensation(
    analysis: ChannelAnalysis,
    kinds: dict[str, list[_Use]],
    prod: _Use,
    biases: list[_Use],
    bn: list[_Use],
    ref: Mapping[str, np.ndarray],
    work: Mapping[str, np.ndarray],
    j: int,
    k: float,
    bounds: _Bounds | None = None,
    slack: float = 0.0,
) -> str | None:
    if bn:
        means = [u for u in bn if u.slot == 3]
        variances = [u for u in bn if u.slot == 4]
        ok = _agree(_ratio_of(means, ref, work, j, bounds), k, BN_MATCH, slack)
        ok &= _agree(_ratio_of(variances, ref, work, j, bounds), k * k, BN_MATCH, 2 * slack)
        return "batchnorm" if ok and means and variances else None
    if not _agree(_ratio_of(biases, ref, work, j, bounds), k, SCALE_MATCH, slack):
        return None
    # Every producer of the group must carry the same scale for the consumers to undo it.
    others = [other for other in kinds["producer"] if other is not prod]
    if not _agree(_ratio_of(others, ref, work, j, bounds), k, SCALE_MATCH, slack):
        return None
    consumers = kinds["consumer"]
    if not consumers:
        return None
    ratios = _ratio_of(consumers, ref, work, j, bounds)
    if not _agree(ratios, 1 / k, SCALE_MATCH, slack):
        return None
    # Coarse storage (int4 blocks) leaves k uncertain by tens of percent: columns left as they
    # were agree with 1 / k within that too. A compensation is read only where the columns are
    # nearer 1 / k than unchanged (held-out round 19, F1: one block's scale x1.5 read as a
    # rescale that the next layer undoes).
    if not all(abs(x - 1 / k) < abs(x - 1) for x, _ in ratios):
        return None
    if not _homogeneous_path(analysis, prod.node):
        return None
    return "consumer columns"


def _scale(
    work: MutableMapping[str, np.ndarray],
    uses: list[_Use],
    j: int,
    factor: float,
    bounds: _Bounds | None = None,
    slack: float = 0.0,
    owned: set[str] | None = None,
) -> None:
    """Multiply neuron ``j``'s slices by ``factor``, widening the storage bounds to match.

    With ``owned`` (the names of ``work``'s arrays that are float64 copies of the caller's own),
    an array not in it is first replaced by such a copy: the caller's inputs are never changed.
    """
    for use in uses:
        if owned is not None and use.tensor not in owned:
            work[use.tensor] = np.array(work[use.tensor], dtype=np.float64)
            owned.add(use.tensor)
        array = work[use.tensor]
        index: list[slice | np.ndarray] = [slice(None)] * array.ndim
        index[use.axis] = use.positions[j]
        array[tuple(index)] *= factor
        if bounds is not None:
            bounds.widen(use.source, tuple(index), factor, slack)


@dataclass
class _Bounds:
    """The storage error allowed per element across a conversion (see :func:`_common_form`).

    It is kept valid while the scale analysis undoes per-neuron scales.

    A stored value ``v`` within ``e`` of ``k x`` becomes ``v / k``, within ``e / k`` of ``x``
    once the exact ``k`` is used (bounds widen by ``max(1, 1/k)``, which covers both sides); the least-squares ``k`` of a row is itself off by at most
    ``|e| / |r|`` (Cauchy-Schwarz), which adds ``|x|`` times that relative error (``slack``).
    """

    allowed: dict[str, np.ndarray]
    reference: Mapping[str, np.ndarray]

    def rows(self, use: _Use, j: int) -> np.ndarray | None:
        """The bounds of neuron ``j``'s slice of one use, flattened like :func:`_rows`."""
        bound = self.allowed.get(use.source)
        return None if bound is None else _rows(bound, use.axis, use.positions[j])

    def widen(self, source: str, index: tuple[Any, ...], factor: float, slack: float) -> None:
        bound = self.allowed.get(source)
        if bound is None:
            return
        bound[index] = bound[index] * max(1.0, abs(factor)) + slack * np.abs(self.reference[source][index])


# -- perturbation kind ------------------------------------------------------------------------
def _weight_names(analysis: ChannelAnalysis) -> set[str]:
    names = set()
    for node in analysis.graph.nodes:
        if node.op_type in PRODUCER_OPS and len(node.input) > 1:
            leaf = analysis.graph.constant_leaf(node.input[1])
            if leaf is not None:
                names.add(leaf.name)
    return names


def _classify(
    ref: dict[str, np.ndarray],
    sus: dict[str, np.ndarray],
    weights: set[str],
    rtol: float,
) -> dict[str, Any]:
    per_tensor = []
    total = changed = new_zeros = zeros_changed = 0
    quant_votes = 0
    rel_changes, corrs = [], []
    for name in sorted(weights):
        if name not in ref or name not in sus or ref[name].shape != sus[name].shape:
            continue
        r, s = (
            ref[name].astype(np.float64).ravel(),
            sus[name].astype(np.float64).ravel(),
        )
        diff = s - r
        ch = diff != 0
        nz = int(np.sum((s == 0) & (r != 0)))
        ref_distinct, sus_distinct = int(np.unique(r).size), int(np.unique(s).size)
        quant = sus_distinct <= QUANT_RATIO * ref_distinct
        quant_votes += quant
        std_r = float(r.std())
        rel = float(diff.std() / std_r) if std_r else 0.0
        if ch.sum() > 2 and np.std(diff) > 0 and np.std(r) > 0:
            corrs.append(float(np.corrcoef(r, diff)[0, 1]))
        rel_changes.append(rel)
        total += r.size
        changed += int(ch.sum())
        new_zeros += nz
        zeros_changed += int(np.sum(ch & (s == 0)))
        per_tensor.append(
            {
                "tensor": name,
                "elements": int(r.size),
                "changed": int(ch.sum()),
                "new_zeros": nz,
                "reference_zeros": int(np.sum(r == 0)),
                "distinct_values": sus_distinct,
                "reference_distinct_values": ref_distinct,
                "relative_change": rel,
            }
        )
    others_changed = sorted(
        n
        for n in ref
        if n not in weights and n in sus and not _close(ref[n], sus[n], rtol)
    )
    evidence: dict[str, Any] = {
        "weight_elements": total,
        "changed_fraction": changed / total if total else 0.0,
        "new_zeros": new_zeros,
        "new_zero_fraction": new_zeros / total if total else 0.0,
        "tensors_with_few_distinct_values": quant_votes,
        "weight_tensors": len(per_tensor),
        "non_weight_constants_changed": others_changed,
        "per_tensor": per_tensor,
    }
    rel_arr = np.array(rel_changes) if rel_changes else np.zeros(1)
    cv = float(rel_arr.std() / rel_arr.mean()) if rel_arr.mean() > 0 else 0.0
    max_corr = float(np.max(np.abs(corrs))) if corrs else 0.0
    evidence["relative_change_cv"] = cv
    evidence["max_abs_correlation_change_vs_weight"] = max_corr
    if (
        total
        and new_zeros >= PRUNE_MIN_FRACTION * total
        and zeros_changed >= 0.9 * max(changed, 1)
    ):
        kind = "pruning"
        why = f"{new_zeros} weights ({100 * new_zeros / total:.1f} %) became exact zeros the reference did not have"
    elif per_tensor and quant_votes >= 0.5 * len(per_tensor):
        kind = "quantization"
        pairs = ", ".join(
            f"{t['distinct_values']} vs {t['reference_distinct_values']}"
            for t in per_tensor[:4]
        )
        why = f"{quant_votes}/{len(per_tensor)} weight tensors hold few distinct values (suspect vs reference: {pairs}...)"
    elif (
        total
        and changed >= NOISE_DENSE * total
        and not others_changed
        and cv < NOISE_CV
        and max_corr < NOISE_CORR
    ):
        kind = "noise"
        why = (
            f"{100 * changed / total:.1f} % of weights changed, relative change "
            f"{rel_arr.mean():.3g} x std per tensor (CV {cv:.2f}), uncorrelated with the weights, biases untouched"
        )
    elif changed or others_changed:
        kind = "fine-tuning"
        why = (
            f"{100 * changed / max(total, 1):.1f} % of weights changed with structure: non-uniform per-tensor change "
            f"(CV {cv:.2f}) or change correlated with the weights (|rho| up to {max_corr:.2f}) "
            f"or biases/BatchNorm changed too ({len(others_changed)} non-weight constants)"
        )
    else:
        kind, why = "unknown", "constants differ but not in the weights"
    return {"kind": kind, "reason": why, "evidence": evidence}


# -- similarity matrices ----------------------------------------------------------------------
MAX_MATRIX = 64


def _similarity(
    analysis: ChannelAnalysis,
    ref: Mapping[str, np.ndarray],
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
) -> dict[str, dict[str, Any]]:
    """Per group, cosine similarity of reference rows against suspect rows, before and after resync.

    At most :data:`MAX_MATRIX` neurons per side (every ``step``-th). Only the sampled rows are
    converted to float64, never whole tensors.
    """
    names = set(after)
    return _joined(_similarity_side(analysis, ref, before, names), _similarity_side(analysis, ref, after, names))


def _similarity_side(
    analysis: ChannelAnalysis, ref: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray], names: set[str]
) -> dict[str, tuple[list[list[float]], int]]:
    """Per group, the sampled reference rows' cosines against ``model``'s and the sampling step.

    ``names``: the suspect's constants (they name the tensors, see :func:`_group_uses`).
    """
    uses = _group_uses(analysis, names)
    out = {}
    for group in analysis.permutable_groups:
        prods = uses.get(group.id, {}).get("producer", [])
        if not prods:
            continue
        n = group.size
        step = max(1, int(np.ceil(n / MAX_MATRIX)))
        pick = np.arange(0, n, step)
        a = _side_by_side([_picked_rows(ref[p.source], p, pick) for p in prods])
        b = _side_by_side([_picked_rows(model[p.tensor if p.tensor in model else p.source], p, pick) for p in prods])
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-300)
        out[group.id] = (np.round(a @ b.T, 4).tolist(), step)
    return out


def _side_by_side(parts: list[np.ndarray]) -> np.ndarray:
    """``np.hstack(parts)``: one part as it is where it is C-contiguous (``hstack`` copied it).

    The same values in the same layout (the products read it as they read the copy), without a
    second array of the sampled rows (fresh memory, beside the first, for every group).
    """
    return np.ascontiguousarray(parts[0]) if len(parts) == 1 and parts[0].ndim == 2 else np.hstack(parts)


def _joined(
    before: dict[str, tuple[list[list[float]], int]], after: dict[str, tuple[list[list[float]], int]]
) -> dict[str, dict[str, Any]]:
    """The similarity matrices of :func:`_similarity`: per group ``before``, ``after`` and ``step``."""
    return {gid: {"before": before[gid][0], "after": matrix, "step": step} for gid, (matrix, step) in after.items()}


def _picked_rows(array: np.ndarray, use: _Use, pick: np.ndarray) -> np.ndarray:
    """Row ``k`` is ``_rows(array, use.axis, use.positions[pick[k]])`` in float64: one gather for all."""
    positions = [use.positions[j] for j in pick]
    width = positions[0].size if positions else 0
    if any(p.size != width for p in positions):  # neurons of unequal extent: one row at a time
        return np.array([_rows(array, use.axis, p).astype(np.float64) for p in positions])
    taken = np.moveaxis(gather(array, np.concatenate(positions), use.axis), use.axis, 0)
    return taken.reshape(len(positions), -1).astype(np.float64)


# -- entry points -----------------------------------------------------------------------------
def canonicalize(
    suspect_resynced: onnx.ModelProto,
    scales: dict[str, dict[int, float]] | AuditReport,
    reference: onnx.ModelProto | None = None,
) -> onnx.ModelProto:
    """A copy of the re-synchronized suspect with function-preserving scales undone.

    ``scales`` is ``report.scales`` (producer tensor -> {neuron: s}) or the report itself. The
    groups come from ``reference`` when given, else from the model itself (same architecture).
    Producer rows and biases are divided by ``s``; consumer columns multiplied by ``s`` (or,
    when a BatchNorm follows the producer, its mean divided by ``s`` and variance by ``s^2``).
    """
    known = scales.analysis if isinstance(scales, AuditReport) and reference is not None else None
    if isinstance(scales, AuditReport):
        scales = scales.scales
    model = copy_model(suspect_resynced)
    # The audit's analysis of the same reference, when there is one: analysed once per command.
    analysis = known if known is not None else analyze(reference if reference is not None else model)
    holders = tensor_holders(model)
    work = {n: read_array(t, f"tensor '{n}'").astype(np.float64) for n, t in holders.items()}
    uses = _group_uses(analysis, set(work))
    touched: set[str] = set()
    for group in analysis.permutable_groups:
        kinds = uses.get(group.id)
        if not kinds:
            continue
        for prod in kinds["producer"]:
            for j, s in scales.get(prod.source, {}).items():
                _scale(work, [prod], j, 1 / s)
                touched.add(prod.tensor)
                bn_node = _bn_after(analysis, prod.node)
                bn = (
                    [b for b in kinds["bn"] if b.node == bn_node]
                    if bn_node is not None
                    else []
                )
                if bn:
                    for b in bn:
                        _scale(work, [b], j, 1 / (s if b.slot == 3 else s * s))
                        touched.add(b.tensor)
                else:
                    biases = [b for b in kinds["bias"] if b.node == prod.node]
                    _scale(work, biases, j, 1 / s)
                    _scale(work, kinds["consumer"], j, s)
                    touched.update(u.tensor for u in biases + kinds["consumer"])
    for name in touched:
        old = holders[name]
        new = numpy_helper.from_array(
            work[name].astype(read_array(old, f"tensor '{name}'").dtype), name
        )
        old.CopyFrom(new)
    return model


def _edit_forms(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The two models as their operators are compared: both inlined where only one calls local functions.

    A model and its inlined form (onnx's inliner, ONNX Runtime) hold the same operators, one side
    inside function bodies: compared as they are, no operator would pair and an edit made in a
    function body before inlining would pass unseen. Where both (or neither) call local
    functions, the models are compared as they are (function bodies with function bodies).
    """
    reference_view, suspect_view = inlined_view(reference), inlined_view(suspect)
    if (reference_view is None) == (suspect_view is None):
        return reference, suspect
    return (
        reference_view.model if reference_view is not None else reference,
        suspect_view.model if suspect_view is not None else suspect,
    )


def audit_models(
    reference: onnx.ModelProto,
    suspect: onnx.ModelProto,
    *,
    rtol: float = AUDIT_RTOL,
    method: str = "hungarian",
    refine: bool = False,
    progress: Callable[[str], None] | None = None,
    mirrored: bool = False,
) -> AuditReport:
    """Compare ``suspect`` with ``reference`` neuron by neuron (see the module docstring).

    When some groups only the suspect's converted form can move (see
    :mod:`onnxlady._resync._across`), the comparison in the reference's form cannot hold them in
    order; if it then finds differences, the pair is compared the other way round as well
    (``mirrored`` marks that inner audit) and a clean result there is the verdict.

    A verdict that the suspect computes what the reference does (exit 0) also needs the
    suspect's activation quantization to be a converter's: a DequantizeLinear undoing its
    QuantizeLinear with other constants (:mod:`onnxlady._audit._activation_quantization`) makes
    it ``modified``.
    """
    # Constants read under a name the reference lacks: renamed back to be compared, or compared here.
    suspect, renamed_reads = renamed_constants(reference, suspect)
    # A model's worth of fresh arrays, on ordinary pages: half a large audit's system time (see _pages).
    with ordinary_pages():
        report = _audit_weights(
            reference, suspect, rtol=rtol, method=method, refine=refine, progress=progress, mirrored=mirrored
        )
    if report.exit_code != 0:
        return report
    # A node-for-node copy, or a suspect matched across forms with no converter's signature at
    # all (an edited graph is no twin): the same operators are expected.
    node_for_node = report.resync is None or report.resync.across is None
    edited_reference, edited_suspect = _edit_forms(reference, suspect)
    if node_for_node or not report.conversions:
        edits = graph_edits(edited_reference, edited_suspect, node_for_node=node_for_node) or changed_folded_inputs(
            edited_reference, edited_suspect
        )
        if edits:
            report.verdict = "modified"
            report.graph_edits = edits
            listing = "; ".join(edits[:5]) + ("; ..." if len(edits) > 5 else "")
            report.summary = (
                f"graph edited with the weights kept: {len(edits)} operator{'s differ' if len(edits) != 1 else ' differs'} "
                f"({listing}): the suspect computes something else; the weights: {report.summary}"
            )
            return report
    unwired: str | None = None
    if not node_for_node:
        # Matched across forms: operators are a converter's to rewrite, but a converter does not
        # add nonlinear ones, nor change what one computes (a Relu made a Clip(0, 6), a slope or
        # an epsilon edited).
        # Nor make an operator it keeps read another operator's output (a residual rewired).
        rewired, unwired = rewired_operators(edited_reference, edited_suspect)
        # Nor skip an operator that joins two branches (a residual Add, a gate's Mul), losing one.
        # Nor store another value than the one a folded chain computed (a token shift's pads).
        checks = ((added_operators, "added", "adds"), (changed_operators, "changed", "changes"),
                  (changed_folded_inputs, "changed", "changes"), (lambda *_: rewired, "rewired", "rewires"),
                  (lambda mine, theirs: bypassed_branches(mine, theirs, _merged_sums(report)), "removed", "removes"))
        for check, done, does in checks:
            found = check(edited_reference, edited_suspect)
            if found:
                report.verdict = "modified"
                report.graph_edits = found
                report.summary = (
                    f"operators {done} with the weights kept: {'; '.join(found[:3])}{'; ...' if len(found) > 3 else ''}: "
                    f"no converter {does} them, the suspect computes something else; the weights: {report.summary}"
                )
                return report
        # ONNX Runtime's gelu approximation: a converter's (held-out round 15, F2), in either model.
        for model, pair in (("suspect", (edited_reference, edited_suspect)), ("reference", (edited_suspect, edited_reference))):
            approximated = approximated_gelus(*pair)
            if approximated:
                detail = f"gelu approximated (tanh form, FastGelu) at {approximated} operator{'s' if approximated != 1 else ''}"
                report.conversions.append(ConversionFinding("gelu-approximated", model, detail))
                report.summary += f"; the {model}'s {detail}"
    if renamed_reads and node_for_node:  # a twin: a conversion is compared across forms
        report.verdict = "modified"
        listing = "; ".join(renamed_reads[:3]) + ("; ..." if len(renamed_reads) > 3 else "")
        report.summary = (
            f"constants read under new names changed: {listing}: the suspect computes something else; "
            f"the weights: {report.summary}"
        )
        return report
    across = report.resync.across if report.resync is not None else None
    if across is not None:
        # Constants no site of the resync compares, compared here by value: those one model
        # computes from constants and the other stores (folded); a constant the suspect stores
        # twice (a tied output layer folded, a table in two layouts), which the resync reads
        # through one copy; the arithmetic's constants outside the weights (a scale, an
        # exponent, an epsilon, a folded mask), by the kind of operation that reads them.
        comparisons: tuple[tuple[str, Callable[[], list[str]]], ...] = (
            ("constants computed from constants changed", lambda: changed_derived_constants(across.match, across.matches)),
            ("a stored copy of a constant changed", lambda: changed_copies(across.match)),
            ("a constant outside the weights changed", lambda: changed_operator_constants(across.match)),
            ("a clamp fused into activation quantization undone", lambda: unclamped_fused_activations(across.match)),
        )
        for what, compare in comparisons:
            found = compare()
            if found:
                report.verdict = "modified"
                report.summary = (
                    f"{what}: {'; '.join(found[:3])}{'; ...' if len(found) > 3 else ''}: "
                    f"the suspect computes something else; the weights: {report.summary}"
                )
                return report
    if not node_for_node and unwired and report.verdict in ("converted", "permuted"):
        # The weights hold, the wiring was compared in part or not at all: no claim beyond the evidence.
        report.summary = report.summary.replace("the suspect is the reference", "the suspect's weights are the reference's")
        report.summary = report.summary.replace(", functionally equivalent", "") + f"; {unwired}"
    known = set(mismatched_activation_quantization(reference))
    changed = [name for name in mismatched_activation_quantization(suspect) if name not in known]
    if changed:
        report.verdict = "modified"
        report.differing_tensors = sorted(set(report.differing_tensors) | set(changed))
        report.summary = (
            f"activation quantization changed: {len(changed)} DequantizeLinear read a QuantizeLinear's output "
            f"with another scale or zero point ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}), "
            f"which no converter writes and which changes the outputs; the weights: {report.summary}"
        )
        return report
    return _checked_activation_scales(reference, suspect, report)


def _merged_sums(report: AuditReport) -> set[str]:
    """The reference's Adds of parallel branches that the suspect holds merged into one kernel (RepVGG's deploy form)."""
    across = report.resync.across if report.resync is not None else None
    if across is None:
        return set()
    return merged_sums(across.match.reference.graph, across.match.reference_sites)


def _checked_activation_scales(reference: onnx.ModelProto, suspect: onnx.ModelProto, report: AuditReport) -> AuditReport:
    """A float reference's static-quantized copy: its activation scales checked where a relation holds, else said unchecked.

    A layer's bias scale ties the scale of its input (:func:`activation_scales`): a broken tie
    is an activation scale no converter wrote (``modified``). The others were calibrated on
    data the reference does not hold; a verdict of equivalence says that it did not compare them.
    """
    if activation_scales(reference).scales:
        return report  # both quantized: not a float reference's calibration
    found = activation_scales(suspect)
    if not found.scales:
        return report
    if found.broken:
        report.verdict = "modified"
        report.differing_tensors = sorted(set(report.differing_tensors) | {scale for scale, _ in found.broken})
        lines = [line for _, line in found.broken]
        report.summary = (
            f"activation quantization changed: {'; '.join(lines[:3])}{'; ...' if len(lines) > 3 else ''} "
            f"(a static quantizer scales a layer's int32 bias by its input's scale times its weight's): the suspect "
            f"computes something else; the weights: {report.summary}"
        )
        return report
    report.unchecked_activation_scales = found.unchecked
    if report.exit_code == 0 and found.unchecked:
        what = (f"the suspect's {len(found.scales)} activation scales (static quantization, calibrated on data the "
                "reference does not hold)")
        report.summary += (
            f"; of {what}, {len(found.tied)} agree with their layers' bias scales (input scale x weight scale); "
            f"the other {len(found.unchecked)}, and the zero points, were not compared"
            if found.tied else f"; {what} and its zero points were not compared"
        )
    return report


def _audit_weights(
    reference: onnx.ModelProto,
    suspect: onnx.ModelProto,
    *,
    rtol: float,
    method: str,
    refine: bool,
    progress: Callable[[str], None] | None,
    mirrored: bool,
) -> AuditReport:
    """:func:`audit_models` on the constants the analysis and the sites hold."""
    # Weights left in their files are read as each comparison asks, one tensor at a time; views
    # of an inline file likewise (copied when a step needs aligned arrays, see ReadEachTime):
    # the re-synchronized suspect is held whole below, the reference beside it made the peak 2x.
    ref = reference_constants(reference, "reference")
    # Where a step only gathers rows or compares values, the reference's views, never copied.
    viewed = ref.views if isinstance(ref, ReadEachTime) else ref
    # The suspect as stored is compared whole (identical?) and sampled (similarity before the
    # resync), then let go: its views of an inline file are read as they are, not copied
    # (aligned copies of three quarters of a model, in fresh memory: its page faults).
    before = constants_of(suspect, "suspect", aligned=False)
    analysis = analyze_with_state(reference)  # as resync analyses it: KV caches as state
    if (
        set(ref) == set(before)
        and all(_bit_equal(viewed[n], before[n]) for n in ref)
        and len(reference.graph.node) == len(suspect.graph.node)
    ):
        before = constants_of(suspect, "suspect")  # read row by row below: aligned
        ref = constants_of(reference, "reference")  # both held: nothing was moved
        sim = _similarity(analysis, ref, before, before)
        _, _, audits = _scale_analysis(analysis, ref, Overlay(before))  # copies only what it changes
        return AuditReport(
            "identical",
            "every constant is bit-identical to the reference",
            rtol,
            None,
            audits,
            similarity=sim,
            analysis=analysis,
        )
    # A twin's rows as stored are compared now (sampled): the suspect's arrays are not held
    # through resync, which reads the suspect itself and lets each weight go as it moves it (the
    # peak one model lower); a suspect matched across conversions is read again afterwards.
    names = set(before)
    # Of models held in memory or mapped whole (not weights left in their files, read a tensor at
    # a time: two readers would hold two), the sampled rows are compared in a thread beside the
    # resync (see _beside): the same value, the resync's time.
    beside = not isinstance(before, LazyConstants) and (isinstance(ref, ReadEachTime) or not isinstance(ref, LazyConstants))
    sampled = Beside(_similarity_side, analysis, viewed, before, names) if beside else None
    twin_before: dict[str, tuple[list[list[float]], int]] | None = None
    if sampled is None:
        try:
            twin_before = _similarity_side(analysis, viewed, before, names)
        except (KeyError, IndexError, ValueError):  # tensors named or shaped otherwise: no twin, compared later
            twin_before = None
    del before
    try:
        result = resync_model(
            reference, suspect, method=method, refine=refine, progress=progress, analysis=analysis,
            constants=(ref if isinstance(ref, dict) else {}, {}),
        )
    except Exception:  # (an interruption is not waited for: the step beside is a daemon)
        _raise_earlier(sampled, (KeyError, IndexError, ValueError))
        raise
    if sampled is not None:
        try:
            twin_before = sampled.result()
        except (KeyError, IndexError, ValueError):  # (as in line above)
            twin_before = None
    check_related(result)  # structure pairs, weights unrelated: not a derivative to audit
    say(progress, "audit: comparing neurons (similarity before and after resync)")
    allowed: dict[str, np.ndarray] = {}  # per tensor, the storage error a conversion may add
    stored_suspect: dict[str, np.ndarray] = {}  # as stored: forensics compares the constants no plan moves from it
    after: Mapping[str, np.ndarray]
    aligned: Mapping[str, np.ndarray]
    resampled: Beside[dict[str, dict[str, Any]]] | None = None
    if result.across is not None:
        stored_suspect = read_constants(suspect, "suspect")
        if isinstance(ref, ReadEachTime):  # the compared form is computed from copies of every tensor
            ref = constants_of(reference, "reference")
        ref, before, after, aligned, allowed = _common_form(result.across, analysis, ref)
        viewed = ref
        sim = _similarity(analysis, ref, before, after)
        del before
    else:
        # Weights left in their files: each moved tensor computed from the suspect's file when asked.
        lazy = resynced_constants(result)
        after = aligned = lazy if lazy is not None else _resynced_constants(result)
        if twin_before is None:  # as the comparison of the suspect as stored fails, once more
            twin_before = _similarity_side(analysis, viewed, constants_of(suspect, "suspect", aligned=False), names)
        # Beside the comparisons below where the re-synchronized arrays are each computed once
        # and kept (both threads read them): joined before the report is made.
        if beside and (isinstance(after, dict) or (isinstance(after, LazyConstants) and after.keeps_all)):
            resampled = Beside(_similarity_after, twin_before, analysis, viewed, after, names)
        else:
            sim = _joined(twin_before, _similarity_side(analysis, viewed, after, names))
    conversions = list(result.across.match.conversions) if result.across is not None else []
    done = " and converted" if conversions else ""

    # Without a conversion's bounds (which the scale analysis widens) an array compared once
    # compares the same again: the second pass, over the arrays the scale analysis left as
    # they were, is answered from the first (the array itself, not its name, is the key).
    compared: dict[str, tuple[weakref.ref[np.ndarray], bool]] = {}

    def close(name: str, values: np.ndarray) -> bool:
        source = _source(name)
        known = compared.get(name)
        if known is not None and known[0]() is values:
            return known[1]
        result = _close(viewed[source], values, rtol, allowed.get(source))
        if not allowed:
            compared[name] = (weakref.ref(values), result)
        return result

    def differing(values: Mapping[str, np.ndarray]) -> list[str]:
        return sorted(n for n, a in values.items() if _source(n) in ref and not close(n, a))

    say(progress, "audit: comparing constants with the reference's")
    try:
        diff = differing(after)
        say(progress, "audit: looking for scaled neurons")
        work = Overlay(aligned)  # the scale analysis copies (float64) only the arrays it changes
        rescaled, attacked, audits = _scale_analysis(analysis, viewed, work, _Bounds(allowed, ref) if allowed else None)
    except Exception:
        _raise_earlier(resampled)
        raise
    if resampled is not None:
        sim = resampled.result()
    report = AuditReport(
        "permuted", "", rtol, result, audits, rescaled, attacked, similarity=sim, conversions=conversions,
        analysis=analysis,
    )  # fmt: skip
    if not diff:
        report.rescaled, report.scaled_neurons = [], []
        # In the reference's order everywhere: no neuron moved, so only the form changed (a
        # simplifier that folds or drops what computes nothing new leaves no other trace).
        if all(np.array_equal(m, np.arange(m.size)) for m in _matches(result)):
            report.verdict = "converted"
            how = (
                _conversion_text(conversions)
                if conversions
                else "no converter's signature found: its graph or its float rounding differs, no neuron moved"
            )
            report.summary = (
                "every compared constant equals the reference's within the error its storage allows, in the "
                f"reference's order: the suspect is the reference converted ({how})"
            )
            return report
        rounding = "within the error its storage allows" if conversions else "up to float rounding"
        report.summary = (
            f"after resync every constant equals the reference's {rounding}: the suspect is the "
            f"reference with its neurons re-ordered{done}, functionally equivalent"
            + (f" ({_conversion_text(conversions)})" if conversions else "")
        )
        return report
    remaining = differing(work)
    report.differing_tensors = remaining or diff
    # Stored bit for bit as the reference's, yet out of the order the resync found for their
    # groups: the suspect holds a group in two orders; never named as changed (round 17, F6).
    kept = kept_in_place(suspect, viewed, remaining) if result.across is None else []  # compared bit for bit
    if kept:
        two, held_moved = two_orders(suspect, viewed, analysis, result, kept)
        for name in kept:
            work[name] = ref[name]
        remaining = [name for name in remaining if name not in kept]
        report.differing_tensors = sorted(set(remaining) | set(held_moved))
        if not remaining:
            report.verdict, report.summary = "modified", two
            report.rescaled, report.scaled_neurons = [], []
            return report
    # A k beyond SCALE_MAX_K (or below its inverse) is a near-zero row within a conversion's
    # storage error, not a scaled neuron.
    if not remaining:
        attacked = report.scaled_neurons = [a for a in attacked if 1 / SCALE_MAX_K <= a.k <= SCALE_MAX_K]
    if not remaining and attacked:
        report.verdict = "scaled"
        listing = ", ".join(f"{s.group}[{s.neuron}] x{s.k:.4g}" for s in attacked[:20])
        report.summary = (
            f"{len(attacked)} neurons have their weights scaled with no compensation (cosine 1, norm ratio k): "
            f"the outputs change; {listing}"
        )
        return report
    if not remaining and rescaled:
        report.verdict = "permuted-rescaled"
        report.summary = (
            f"permuted, and {len(rescaled)} neurons rescaled by positive factors that the next layer or a "
            "BatchNorm undoes: functionally equivalent; canonicalize() removes the scales"
        )
        return report
    if result.across is not None and result.across.mirrored and not mirrored:
        other = audit_models(suspect, reference, rtol=rtol, method=method, refine=refine, progress=progress, mirrored=True)
        if other.verdict in ("permuted", "converted"):
            report.verdict = other.verdict
            report.differing_tensors, report.rescaled, report.scaled_neurons = [], [], []
            moved = "re-ordered and converted" if other.verdict == "permuted" else "converted, in the same order"
            report.summary = (
                "every compared constant equals the reference's within the error its storage allows, compared "
                "in the suspect's form (the reference's own form freezes the suspect's groups "
                f"{', '.join(result.across.mirrored)}): the suspect is the reference {moved}, functionally "
                f"equivalent ({_conversion_text(conversions)})"
            )
            return report
    say(progress, "audit: naming the change (noise, quantization, pruning, fine-tuning)")
    _forensics_verdict(report, analysis, ref, work, after, allowed, attacked, rtol, stored_suspect if conversions else None)
    if kept:
        report.summary = f"{two}; besides, {report.summary}"
    if conversions:
        report.summary += f"; besides, converted ({_conversion_text(conversions)})"
    return report


def _similarity_after(
    before: dict[str, tuple[list[list[float]], int]],
    analysis: ChannelAnalysis,
    ref: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    names: set[str],
) -> dict[str, dict[str, Any]]:
    """:func:`_similarity` of a twin whose side ``before`` (the suspect as stored) is computed already."""
    return _joined(before, _similarity_side(analysis, ref, after, names))


def _raise_earlier(step: Beside[Any] | None, swallowed: tuple[type[BaseException], ...] = ()) -> None:
    """Raise the error of ``step`` (begun before the caller's own step failed), once it is done.

    In line it came first: the caller's error is raised only where the step returned, or
    raised one of ``swallowed`` (what the caller catches of it, in line as beside).
    """
    error = step.error() if step is not None else None
    if error is not None and not isinstance(error, swallowed):
        raise error


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """The same dtype and the same values (each array read once: a view of a file is mapped at each index)."""
    return a.dtype == b.dtype and bool(np.array_equal(a, b))


def _resynced_constants(result: ResyncResult) -> dict[str, np.ndarray]:
    """The re-synchronized twin suspect's constants (``read_constants`` of ``result.model``).

    A twin's result is the suspect with new ``raw_data`` bytes for the tensors that move
    (:attr:`ResyncResult.unbuilt`): those bytes are read as they are, every other constant from
    the suspect, so the model itself is never built (a copy of the whole suspect, its constants
    read once more).
    """
    unbuilt = result.unbuilt if result.built is None else None
    if unbuilt is None or sys.byteorder != "little" or any(callable(raw) for raw in unbuilt[1].values()):
        return read_constants(result.model, "re-synchronized suspect")
    suspect, overrides = unbuilt
    out: dict[str, np.ndarray] = {}
    for name, holder in tensor_holders(suspect).items():
        raw = overrides.get(name)
        if raw is None:
            out[name] = read_array(holder, f"tensor '{name}' of the re-synchronized suspect")
            continue
        assert not callable(raw)  # tells mypy what the test above made sure of
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(holder.data_type))
        shape = tuple(int(d) for d in holder.dims)
        if dtype.itemsize * math.prod(shape) != memoryview(raw).nbytes:  # packed sub-byte types: onnx unpacks them
            return read_constants(result.model, "re-synchronized suspect")
        # raw_data is little-endian, as onnx's own reader reads it on this machine.
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return out


def _forensics_verdict(
    report: AuditReport,
    analysis: ChannelAnalysis,
    ref: Mapping[str, np.ndarray],
    work: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    allowed: dict[str, np.ndarray],
    attacked: list[NeuronScale],
    rtol: float,
    stored_suspect: dict[str, np.ndarray] | None = None,
) -> None:
    """Name what was done to a suspect that differs by more than a permutation and compensated scales.

    ``work`` is the re-synchronized suspect with every scale the exact analysis found undone
    (``attacked`` lists the uncompensated ones), ``after`` the same before any undoing. Neurons scaled while the rest of their tensor
    carries noise are found next and undone (:func:`find_scaled_under_noise`), then what remains
    is classified (:func:`classify_change`). Verdict ``scaled`` when neurons are scaled with no
    compensation (the rest of the change in ``report.perturbation``: both findings), else
    ``perturbed`` when the kind is clear, ``modified`` (kind uncertain) otherwise.
    ``stored_suspect`` (across a conversion) supplies the float constants the compared form
    leaves out (no plan moves them: output layers' biases...), by name and shape.
    """
    if allowed or stored_suspect:
        found: dict[str, np.ndarray] = {}
        for name, value in work.items():
            source = _source(name)
            if source not in ref:
                continue
            bound = allowed.get(source)
            if bound is not None and ref[source].shape == value.shape:
                # Across a conversion, storage error is no change: read such values as the reference's.
                value = np.where(np.abs(value - ref[source]) <= bound, ref[source], value)
            found[source] = value
        for name, value in (stored_suspect or {}).items():
            if name not in found and name in ref and value.dtype.kind == "f" and value.shape == ref[name].shape:
                found[name] = _as_stored(ref[name], value)
        sus = Overlay(found)
    else:
        # A twin: work's arrays by reference name, read as asked (weights left in their files
        # are then computed one at a time, never all held).
        sus = Overlay(_renamed(work, [name for name in work if _source(name) in ref]))
    infos = weight_infos(analysis)
    storage = {
        name: stored_suspect[name].dtype
        for name in infos
        if stored_suspect and name in stored_suspect and stored_suspect[name].dtype.kind == "f"
    }
    # A row the exact analysis read as scaled by k within SCALE_MIN of 1 is what noise does to a
    # row of large norm, and a k beyond SCALE_MAX_K (or below its inverse) that of a near-zero
    # row within a conversion's storage error: put such rows back as they were, not an attack.
    original = _renamed(after, list(after))
    plausible = [a for a in attacked if abs(a.k - 1) > SCALE_MIN and 1 / SCALE_MAX_K <= a.k <= SCALE_MAX_K]
    _restore(analysis, sus, original, [a for a in attacked if a not in plausible])
    attacked = plausible
    unscaled = sus.copy()  # as found, before any noisy scale is undone (the helpers copy what they change)
    # The producers' rows fitted once for both searches (where neither undid a scale). They read
    # rows only: the reference's views where it has them, never copied.
    searched = ref.views if isinstance(ref, ReadEachTime) else ref
    fits = _Fits(reread_reference=isinstance(searched, FileViews))
    rescales = _noisy_rescales(analysis, searched, sus, fits)
    plain = sus.copy()
    noisy = _noisy_scales(analysis, searched, sus, fits)
    del fits
    if not (noisy or rescales) and isinstance(after, LazyConstants):
        # No second classification follows: the next one reads each weight of the twin's
        # re-synchronized suspect once, the last reader. Computed again as it reads them, not
        # kept all: the work arrays of its measurements then take the place of a model's worth
        # of kept arrays, not come on top of them (the audit's peak memory).
        after.release()
    perturbation = classify_change(ref, sus, infos, rtol, allowed, storage)
    kind = perturbation["kind"]
    # Scaled rows are an attack only against a background of a clear kind (noisy ones against
    # noise, the only background their test models): fine-tuning scales whole rows too
    # (BatchNorm statistics folded into the weights, weight decay), pruning and quantization
    # shrink or grow rows of small weights. Compensated rescales under noise likewise.
    if (noisy or rescales) and kind != "noise":
        perturbation = classify_change(ref, unscaled if rescales else plain, infos, rtol, allowed, storage)
        kind = perturbation["kind"]
        perturbation["evidence"]["scaled_rows_not_reported"] = len(noisy) + len(rescales)
        noisy, rescales = [], []
    report.rescaled = rescales
    if attacked and kind not in MIXED_BACKGROUNDS:
        perturbation["evidence"]["scaled_rows_not_reported"] = len(attacked)
        attacked = []
    report.scaled_neurons = attacked + noisy
    report.perturbation = perturbation
    kind, reason = perturbation["kind"], perturbation["reason"]
    change = (
        f"weights modified, {reason}" if kind == "uncertain" else f"weights modified; likely {kind}: {reason}"
    )
    if kind == "quantization" and any(c.kind == "quantized" and c.model == "suspect" for c in report.conversions):
        # The converter itself stores the suspect's weights on an integer grid: the grid is its
        # signature and says nothing of the change beyond its rounding (noise 0.1 then int8 looks so).
        perturbation["evidence"]["grid_of_the_conversion"] = True
        change = (
            "weights modified beyond the rounding of the conversion, which quantizes them itself: "
            f"{reason}, the converter's own, so the kind of the change underneath is not named (noise, "
            "fine-tuning or a coarser quantization look alike through it)"
        )
    if report.scaled_neurons:
        report.verdict = "scaled"
        listing = ", ".join(f"{s.group}[{s.neuron}] x{s.k:.4g}" for s in report.scaled_neurons[:20])
        report.summary = (
            f"{len(report.scaled_neurons)} neurons have their weights scaled with no compensation (the outputs "
            f"change): {listing}; besides, {change}"
        )
        return
    report.verdict = "modified" if kind == "uncertain" else "perturbed"
    report.summary = change
    if report.rescaled:
        listing = ", ".join(f"{s.group}[{s.neuron}] x{s.k:.4g}" for s in report.rescaled[:20])
        report.summary += (
            f"; besides, {len(report.rescaled)} neurons rescaled by positive factors that the next layer or a "
            f"BatchNorm undoes (function-preserving, read through the noise): {listing}"
        )


def _renamed(arrays: Mapping[str, np.ndarray], names: list[str]) -> LazyConstants:
    """``{_source(n): arrays[n] for n in names}``, each array read from ``arrays`` when indexed."""

    def getter(name: str) -> Callable[[], np.ndarray]:
        return lambda: arrays[name]

    return LazyConstants({_source(name): getter(name) for name in names})


def _as_stored(reference: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """A suspect constant as stored (float64), where it is the reference's value in its storage, that value.

    A float16 converter rounds every value and clamps those beyond the type's range to its
    largest finite one (a causal mask's -3.4e38 becomes -65504): that is the conversion, not a
    change of the constant.
    """
    value = stored.astype(np.float64)
    try:
        info = np.finfo(stored.dtype)
    except ValueError:  # not a numpy float type: compared as stored
        return value
    expected = np.clip(reference.astype(np.float64), float(info.min), float(info.max))
    return np.where(np.abs(value - expected) <= half_ulp(expected, stored.dtype), reference, value)


class _Rows(Collection[np.ndarray]):
    """The float64 rows ``_rows(array, use.axis, pos).astype(np.float64)`` of ``use``'s neurons, in order.

    Each row is computed when iteration reaches it and not kept: the values a list of them
    holds, without holding them all.
    """

    def __init__(self, array: np.ndarray, use: _Use) -> None:
        self._array, self._use = array, use

    def __len__(self) -> int:
        return len(self._use.positions)

    def __iter__(self) -> Iterator[np.ndarray]:
        for pos in self._use.positions:
            yield _rows(self._array, self._use.axis, pos).astype(np.float64)

    def __contains__(self, value: object) -> bool:
        return any(row is value for row in self)


def _noisy_scales(
    analysis: ChannelAnalysis, ref: Mapping[str, np.ndarray], sus: MutableMapping[str, np.ndarray], fits: _Fits | None = None
) -> list[NeuronScale]:
    """Neurons scaled with no compensation while the rest of the model carries noise, undone in ``sus``.

    The arrays it changes are replaced by copies; their bias is undone with them when it carries
    the same scale. ``fits``: the rows' least-squares figures known already (:class:`_Fits`).
    """
    fits = fits if fits is not None else _Fits()
    uses = _group_uses(analysis, set(sus))
    producers: list[tuple[str, _Use, list[_Use]]] = []

    def rows() -> Iterator[tuple[str, Collection[np.ndarray] | FittedRows, Collection[np.ndarray] | FittedRows]]:
        # One producer's rows at a time: float64 copies of every weight at once were the
        # audit's peak memory (4x the model).
        for group in analysis.permutable_groups:
            kinds = uses.get(group.id)
            if not kinds:
                continue
            for prod in kinds["producer"]:
                r_arr, s_arr = ref.get(prod.source), sus.get(prod.tensor)
                if r_arr is None or s_arr is None or r_arr.shape != s_arr.shape or np.array_equal(r_arr, s_arr):
                    continue
                producers.append((group.id, prod, [b for b in kinds["bias"] if b.node == prod.node]))
                if _block_width(prod, r_arr) is not None:  # fitted a block of rows at a time, or known
                    fitted = fits.fit(prod, r_arr, s_arr)
                    yield str(len(producers) - 1), fitted, fitted
                    continue
                # Neurons of unequal extent: each row read as the search reaches it (float64
                # copies of a whole tensor's rows, both sides, were the largest transient of the
                # forensics).
                yield str(len(producers) - 1), _Rows(r_arr, prod), _Rows(s_arr, prod)

    found: list[NeuronScale] = []
    copied: set[str] = set()
    held = Held(ref) if isinstance(ref, FileViews) else ref  # views mapped once (biases: read per neuron)
    for item in find_scaled_under_noise(rows()):
        gid, prod, biases = producers[int(item.tensor)]
        found.append(NeuronScale(gid, item.neuron, prod.source, item.k, None))
        whole = _agree(_ratio_of(biases, held, sus, item.neuron), item.k, SCALE_MATCH, 0.0) if biases else False
        for use in [prod] + (biases if whole else []):
            if use.tensor not in copied:
                sus[use.tensor] = np.array(sus[use.tensor], dtype=np.float64)
                copied.add(use.tensor)
            _scale(sus, [use], item.neuron, 1 / item.k)
    return found


#: Compensated rescale under noise: a group reads rescaled when at least this fraction of its
#: neurons moved by more than the noise explains (NOISY_RESCALE_Z standard errors: i.i.d. noise
#: moves 0.3 % of them so far, the attack's few neurons are not half a group)...
NOISY_RESCALE_MOVED = 0.5
NOISY_RESCALE_Z = 3.0
#: ...and at least this fraction of those carry the compensation (within NOISY_RESCALE_MATCH).
NOISY_RESCALE_AGREE = 0.9
#: Relative agreement of the producer's noisy scale with its compensation (plus 3 standard errors).
NOISY_RESCALE_MATCH = 0.05


class _Fits:
    """Per use, the least-squares figures of its rows in two arrays (:class:`FittedRows`), kept for one audit.

    The search for compensated rescales under noise and the one for scaled neurons fit the same
    producers' rows in the same arrays (where the first undid a scale, the array is a copy:
    another object, fitted anew); the second reads the first's figures. The arrays are held
    weakly: one computed anew at each read (weights left in their files) is fitted again, as
    before, and none is kept alive.
    """

    def __init__(self, *, reread_reference: bool = False) -> None:
        """Nothing fitted yet.

        Args:
            reread_reference: the reference's arrays are read anew at each index
                (:class:`~onnxlady._audit._lazy.FileViews`): for one use, the same values in
                another array each time, so the figures are known by the suspect's array alone
                (the reference is never changed).
        """
        self._known: dict[int, tuple[_Use, weakref.ref[np.ndarray], weakref.ref[np.ndarray], FittedRows]] = {}
        self._reread_reference = reread_reference

    def fit(self, use: _Use, r_arr: np.ndarray, s_arr: np.ndarray) -> FittedRows:
        """The figures of ``use``'s rows, ``s_arr``'s against ``r_arr``'s (read a block at a time; see :func:`_block_width`)."""
        known = self._known.get(id(use))
        if known is not None and known[0] is use and known[2]() is s_arr and (self._reread_reference or known[1]() is r_arr):
            return known[3]
        width = _block_width(use, r_arr)
        assert width is not None and r_arr.shape == s_arr.shape
        fitted = least_squares_blocks(_row_blocks(r_arr, use, width), _row_blocks(s_arr, use, width))
        self._known[id(use)] = (use, weakref.ref(r_arr), weakref.ref(s_arr), fitted)
        return fitted


def _row_scales(
    r_arr: np.ndarray, s_arr: np.ndarray, use: _Use, size: int, fits: _Fits | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron: the least-squares scale of the suspect's slice against the reference's, and its standard error.

    The error is the tensor's median residual std over the slice's norm (mis-paired rows do
    not widen it); a negligible slice (under a tenth of the median norm: a dead filter, whose
    scale is meaningless) has scale NaN. ``fits``: where the figures are kept (:class:`_Fits`).
    """
    width = _block_width(use, r_arr) if len(use.positions) == size and r_arr.shape == s_arr.shape else None
    if width is not None:  # a block of rows at a time: the same figures (see _rowwise)
        fitted = (fits if fits is not None else _Fits()).fit(use, r_arr, s_arr)
        norms, resid = fitted.norms, fitted.residuals
        ks = np.where(fitted.usable, fitted.k, np.nan)  # no scale from a zero slice
    else:
        ks, norms, resid = np.full(size, np.nan), np.zeros(size), np.zeros(size)
        for j in range(size):
            r = _rows(r_arr, use.axis, use.positions[j]).astype(np.float64)
            s = _rows(s_arr, use.axis, use.positions[j]).astype(np.float64)
            norm2 = float(r @ r)
            if not norm2 or r.size < 2:  # no scale to read from a zero slice
                continue
            ks[j], norms[j] = float(r @ s) / norm2, math.sqrt(norm2)
            e = s - ks[j] * r
            resid[j] = math.sqrt(float(e @ e) / (r.size - 1))
    usable = norms > 0
    usable &= norms > 0.1 * (float(median(norms[usable])) if np.any(usable) else 0.0)
    sigma = float(median(resid[usable])) if np.any(usable) else 0.0
    return np.where(usable, ks, np.nan), np.where(usable, sigma / np.maximum(norms, 1e-300), np.inf)


def _noisy_rescales(
    analysis: ChannelAnalysis, ref: Mapping[str, np.ndarray], sus: MutableMapping[str, np.ndarray], fits: _Fits | None = None
) -> list[NeuronScale]:
    """Groups rescaled by positive factors with compensation while the weights also carry noise; undone in ``sus``.

    The exact analysis needs rows that are exact multiples; noise on top hides a compensated
    rescale, and the change would read as uneven noise (kind uncertain). Per group with one
    producer: the producer rows' noisy scales ``k``; most neurons moved beyond the noise
    (:data:`NOISY_RESCALE_MOVED`) and nearly all of them (:data:`NOISY_RESCALE_AGREE`)
    compensated: by the BatchNorm right after (mean ``k``, variance ``k^2``; statistics ``perturb``
    never touches, so exact), or by the consumer columns (scale ``1/k``, noisy too) through
    positively homogeneous ops. The scale undone is the exact one where there is one (the
    BatchNorm mean's, the producer bias's), else the producer's estimate. The arrays it changes
    are replaced by copies. ``fits``: the rows' least-squares figures, kept (:class:`_Fits`).
    """
    uses = _group_uses(analysis, set(sus))
    found: list[NeuronScale] = []
    copied: set[str] = set()
    whole = ref
    for group in analysis.permutable_groups:
        kinds = uses.get(group.id)
        if not kinds or len(kinds["producer"]) != 1 or group.size < 8:
            continue
        ref = Held(whole) if isinstance(whole, FileViews) else whole  # views mapped once per group: read per neuron
        prod = kinds["producer"][0]
        r_arr, s_arr = ref.get(prod.source), sus.get(prod.tensor)
        if r_arr is None or s_arr is None or r_arr.shape != s_arr.shape:
            continue
        ks, errors = _row_scales(r_arr, s_arr, prod, group.size, fits)
        with np.errstate(invalid="ignore"):
            moved = (np.abs(ks - 1) > NOISY_RESCALE_Z * errors) & (np.abs(ks - 1) > SCALE_MIN) & (ks > 0)
        if not np.any(moved) or np.count_nonzero(moved) < NOISY_RESCALE_MOVED * np.count_nonzero(np.isfinite(ks)):
            continue
        biases = [b for b in kinds["bias"] if b.node == prod.node]
        bn_node = _bn_after(analysis, prod.node)
        bn = [b for b in kinds["bn"] if b.node == bn_node] if bn_node is not None else []
        means = [b for b in bn if b.slot == 3]
        exact = np.full(group.size, np.nan)
        for use in (means or biases)[:1]:  # the statistics perturb never touches: exact ratios
            exact = np.array([_ratio_of([use], ref, sus, j)[0][0] for j in range(group.size)])
        if bn:
            how, target = "batchnorm", exact
        elif kinds["consumer"] and _homogeneous_path(analysis, prod.node):
            how = "consumer columns"
            c_arr = ref.get(kinds["consumer"][0].source)
            c_sus = sus.get(kinds["consumer"][0].tensor)
            if c_arr is None or c_sus is None or c_arr.shape != c_sus.shape:
                continue
            column, column_errors = _row_scales(c_arr, c_sus, kinds["consumer"][0], group.size)
            with np.errstate(divide="ignore", invalid="ignore"):
                target = 1 / column
                errors = np.hypot(errors, column_errors / np.abs(column) ** 2)
        else:
            continue
        with np.errstate(invalid="ignore"):
            agree = np.abs(ks / target - 1) <= NOISY_RESCALE_MATCH + 3 * errors / np.abs(target)
        if np.count_nonzero(agree & moved) < NOISY_RESCALE_AGREE * np.count_nonzero(moved):
            continue
        scales = np.where(np.isfinite(exact) & (exact > 0), exact, ks)
        for j in range(group.size):
            k = float(scales[j])
            if not (np.isfinite(k) and k > 0) or abs(k - 1) <= SCALE_TOL:
                continue
            if bn:
                undo = [(prod, k), *[(b, k if b.slot == 3 else k * k) for b in bn]]
            else:
                undo = [(prod, k), *[(b, k) for b in biases], *[(c, 1 / k) for c in kinds["consumer"]]]
            for use, factor in undo:
                if use.tensor not in copied:
                    sus[use.tensor] = np.array(sus[use.tensor], dtype=np.float64)
                    copied.add(use.tensor)
                _scale(sus, [use], j, 1 / factor)
            if moved[j]:
                found.append(NeuronScale(group.id, j, prod.source, k, how))
    return found


def _restore(
    analysis: ChannelAnalysis, sus: MutableMapping[str, np.ndarray], original: Mapping[str, np.ndarray], items: list[NeuronScale]
) -> None:
    """Put back, from ``original``, the rows (and biases) of neurons the exact analysis undid."""
    uses = _group_uses(analysis, set(sus))
    copied: set[str] = set()  # each array copied once, not once per neuron (whole tensors)
    for item in items:
        kinds = uses.get(item.group)
        if not kinds:
            continue
        for prod in kinds["producer"]:
            if prod.source != item.tensor:
                continue
            for use in [prod] + [b for b in kinds["bias"] if b.node == prod.node]:
                source = original.get(use.source)
                if use.tensor not in sus or source is None or source.shape != sus[use.tensor].shape:
                    continue
                if use.tensor not in copied:
                    sus[use.tensor] = np.array(sus[use.tensor], dtype=np.float64)
                    copied.add(use.tensor)
                array = sus[use.tensor]
                index: list[Any] = [slice(None)] * array.ndim
                index[use.axis] = use.positions[item.neuron]
                array[tuple(index)] = source[tuple(index)]


def _matches(result: ResyncResult) -> list[np.ndarray]:
    """The recovered permutation of every group (identity where the suspect was in order)."""
    if result.across is not None:
        return list(result.across.matches.values())
    return [np.asarray(group["perm"]) for group in result.key.groups]


def _conversion_text(conversions: list[ConversionFinding]) -> str:
    return "; ".join(f"{c.model}: {c.detail}" for c in conversions)


#: The largest finite float16: a converter clamps every larger magnitude to it.
_FLOAT16_MAX = 65504.0


def _storage_bound(reference: Approx, suspect: Approx, float16: frozenset[str] = frozenset()) -> np.ndarray:
    """How far two values of one constant may differ by their storage alone, per element.

    Both values' storage errors, one float32 rounding of the largest magnitude, and a float16
    clamp: a suspect value at float16's largest magnitude stands for any reference value beyond
    it of the same sign (a causal mask's -3.4e38 stored as -65504). A side in ``float16`` holds
    a float16 model's weights as float32 (the match's ``float16-as-float32`` conversion): where
    its values are all float16 numbers, they carry float16's rounding (of the folds ONNX
    Runtime computed in float16 before it cast them), not float32's.
    """
    scale = float(np.abs(reference.value).max()) if reference.value.size else 0.0
    errors = [_float16_error(value) if side in float16 else value.error
              for side, value in (("reference", reference), ("suspect", suspect))]  # fmt: skip
    bound = errors[0] + errors[1] + 2.0**-24 * scale
    clamped = (np.abs(suspect.value) == _FLOAT16_MAX) & (reference.value * np.sign(suspect.value) >= _FLOAT16_MAX)
    if clamped.any():
        bound = np.where(clamped, np.abs(reference.value - suspect.value), bound)
    return bound


def _float16_error(value: Approx) -> np.ndarray:
    """``value``'s storage error, float16's where every one of its numbers is a float16 number."""
    numbers = value.value
    if numbers.size and np.array_equal(numbers.astype(np.float16).astype(numbers.dtype), numbers):
        return np.maximum(value.error, half_ulp(numbers, np.dtype(np.float16)))
    return value.error


def _common_form(
    details: AcrossResync, analysis: ChannelAnalysis, raw: Mapping[str, np.ndarray]
) -> tuple[
    dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]
]:
    """The arrays the audit compares, by reference tensor name, and the storage error allowed.

    Reference, suspect-before, suspect-after (cleaned) and suspect-after (as stored) arrays, in the
    form both models share (folded, dequantized, float64; see :mod:`onnxlady._resync._across`), and
    the storage error allowed per element.

    In the cleaned arrays, suspect values within the storage error of the reference's are
    replaced by the reference's, so what differs there is a real change; the scale analysis
    reads the stored values (cleaning some elements of a scaled row would break its
    proportionality). Tensors with no counterpart read as equal.
    """
    ref: dict[str, np.ndarray] = {}
    before: dict[str, np.ndarray] = {}
    after: dict[str, np.ndarray] = {}
    stored: dict[str, np.ndarray] = {}
    allowed: dict[str, np.ndarray] = {}
    float16 = frozenset(c.model for c in details.match.conversions if c.kind == FLOAT16_IN_FLOAT32)
    for number, plan in enumerate(analysis.tensors):
        reference = details.reference[number]
        aligned = details.suspect_aligned[number]
        original = details.suspect_before[number]
        if reference is None or aligned is None or original is None:
            value = raw[plan.source].astype(np.float64)
            ref[plan.source] = before[plan.source] = after[plan.source] = stored[plan.source] = value
            continue
        ref[plan.source] = reference.value
        allowed[plan.source] = _storage_bound(reference, aligned, float16)
        within = np.abs(reference.value - aligned.value) <= allowed[plan.source]
        after[plan.source] = np.where(within, reference.value, aligned.value)
        stored[plan.source] = aligned.value
        before[plan.source] = original.value
    # Constants no plan moves (frozen groups only): compared in place, through their paired sites.
    for name, (reference, suspect) in pair_unplanned(details.match).items():
        ref[name] = reference.value
        allowed[name] = _storage_bound(reference, suspect, float16)
        within = np.abs(reference.value - suspect.value) <= allowed[name]
        after[name] = np.where(within, reference.value, suspect.value)
        stored[name] = before[name] = suspect.value
    for name, value in raw.items():  # constants with no counterpart: as stored
        ref.setdefault(name, value)
    return ref, before, after, stored, allowed
