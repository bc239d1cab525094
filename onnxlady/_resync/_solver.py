"""Re-synchronize a permuted (and perturbed) copy of a model to its reference.

This is Algorithm 1 of "Find the Lady" (AAAI 2024) generalised to whole channel groups. The
groups come from the *reference*'s analysis; the suspect must have the same architecture, and
its tensors are found by *use site* (the consumer node's output name and input slot), so a
suspect whose shared constants were untied into copies by ``permute`` still matches.

Groups are solved in the reference's group order (producers before consumers). Every neuron of
a group gets a *signature*: each tensor slice the group permutes (producer rows, biases,
normalisation parameters and statistics, per-channel constants, consumer columns) whose other
axes are already aligned, one *block* per slice. Once a group is solved its inverse is applied
to the suspect's working copies, so downstream groups compare aligned input channels; a slice
whose other axes still wait for a later group is left out of the first pass (``refine=True``
re-solves every group with all its slices, as Git Re-Basin's weight matching does, until
nothing changes).

How blocks are weighted and compared, and why (measured on the fixtures and on trained models
from PyPI wheels -- PP-OCR text detector and classifier, YOLOv8n -- under the paper's weight
noise, noise on every permuted tensor, 2-bit quantization and 99 % pruning):

- Each block is centred over neurons, scaled to unit norm (one large tensor must not drown the
  small ones) and the group is matched. That match then gives each block's *residual noise*
  ``|R - a S|^2`` (``a`` the least-squares scale of the matched suspect block); every block is
  re-weighted by ``1 / noise`` (its Gaussian log-likelihood weight, capped at ``1 /
  NOISE_FLOOR`` times its signal) and the group matched again, until the match stops changing.
  An unperturbed bias or BatchNorm block then counts fully, a pruned or noisy weight little.
  With noise of 2 x std on every tensor this took the first pass from 22-55 % to 57-99 % on
  the fixtures and from 7-21 % to 53-82 % on the trained models.
- Neurons are compared by the squared distance of their weighted signatures (Hungarian on it
  is Hungarian on the sum of per-block dot products, as in Git Re-Basin). The cosine of the
  concatenation divides by each neuron's norm, which couples the blocks: a pruned or
  quantized block shrinks a neuron's norm and skews all its similarities. With 99 % pruning
  of the trained models' weights the distance recovered 99.8-100 % where the cosine got
  54-99 %; with 2-bit quantization 99.7-100 % against 59-100 %.
- The reported *similarity* is ``1 - d^2 / (|a|^2 + mean |b|^2)``: 1 for an exact copy, about
  0 for an unrelated neuron; margins and ambiguity are measured on it.
- A block whose exact product would be expensive (a 704 x 6336 conv weight of a 100 MB model)
  is compared through count sketches, and the neurons whose match the sketch error could
  change are then scored exactly. On the noisy fixtures a sketch of only 64 buckets came
  within 0.5 point of the exact Psi; 512 are used.

Assignment is Hungarian (``scipy.optimize.linear_sum_assignment``, always a bijection) or the
paper's argmax with greedy conflict repair. The output is the suspect with its stored elements
moved bit for bit (structure, dtypes and storage untouched), together with a
:class:`~onnxlady._key.PermutationKey` that :func:`~onnxlady._permute.unpermute_model` applies
to the suspect to produce the same tensors.
"""

from __future__ import annotations

import contextvars
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from numpy.random import default_rng  # with the module: numpy loads it lazily, on a command's first draw

from onnxlady._analysis._channels import ChannelAnalysis, ChannelGroup
from onnxlady._assignment import linear_sum_assignment
from onnxlady._errors import OnnxladyError
from onnxlady._io._progress import advance
from onnxlady._transforms._key import PermutationKey

__all__ = [
    "AMBIGUITY_MARGIN",
    "DEAD_NEURON_SCALE",
    "MAX_REFINE_ROUNDS",
    "METHODS",
    "NOISE_FLOOR",
    "GroupResync",
    "PsiTally",
    "ResyncOptions",
    "ResyncResult",
    "ResyncState",
    "gather_block",
    "group_report",
    "group_slices",
    "key_group",
    "percent",
    "say",
    "true_permutations",
]

#: A reference neuron whose best similarity beats its second best by less than this is
#: *ambiguous*. Measured over 4700 neurons of noisy resyncs: 29 % of those below were matched
#: wrongly, 2 % of those above (identical neurons have margin 0, exact copies about 0.5).
AMBIGUITY_MARGIN: float = 0.1
#: Refinement stops after this many rounds even if some group still changes.
MAX_REFINE_ROUNDS: int = 10
#: A block's estimated noise energy is at least this fraction of its signal energy, so an
#: unperturbed block weighs at most 100 times more than one as noisy as its signal.
NOISE_FLOOR: float = 1e-2
#: Re-weighting rounds after the unit-norm match, at most (they stop when the match does).
REWEIGHT_ROUNDS: int = 8
METHODS: tuple[str, ...] = ("hungarian", "argmax")

#: Products of reference and suspect rows are kept for re-weighting up to this many elements.
_KEPT_PRODUCTS = 1 << 26
#: A block whose exact product would cost more multiply-adds than this is sketched, and its
#: best candidates are then scored exactly: a 100 MB conv net resyncs ~10x faster.
_EXACT_PRODUCT = 1 << 28
_SKETCH_DIM = 512
#: Bytes of one band of :func:`_count_sketch`'s signed rows (reused while in cache).
_SKETCH_BAND_BYTES = 1 << 20
#: Within :meth:`ResyncState.run`: the thread a sketched block's suspect side is centred in.
_BESIDE: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("onnxlady_centring", default=None)
#: Elements of a score matrix handled at once: a band of rows whose float64 temporaries stay in cache.
_BAND = 1 << 16
_CANDIDATES = 8


#: New bytes of a tensor, or a function computing them when the output is written.
Override = bytes | memoryview | Callable[[], np.ndarray]


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupResync:
    """How one group was re-synchronized (statistics of its last solve)."""

    id: str
    size: int
    #: Per reference neuron, best minus second-best similarity: mean and minimum.
    mean_margin: float
    min_margin: float
    #: Reference neurons whose margin is below :data:`AMBIGUITY_MARGIN`.
    ambiguous: int
    #: Suspect neurons whose signature is all zeros (pruned): similarity 0, matched last.
    zero_neurons: int
    #: ``method="argmax"`` only: suspect neurons claimed by several reference neurons.
    duplicate_claims: int
    #: % of neurons put back in their original position (only with a true key naming the group).
    psi: float | None
    #: The same over neurons not exactly duplicated in the reference (those are interchangeable).
    psi_distinguishable: float | None
    #: Mean similarity of the chosen matches (1: exact copies).
    mean_similarity: float


@dataclass
class ResyncResult:
    """The re-synchronized suspect, the recovered key and per-group statistics.

    The suspect re-ordered is :attr:`model`. A twin's is not built until asked for: it is the
    suspect with new bytes for the tensors that move (:attr:`unbuilt`), which a streaming
    writer writes as they are (no copy of a large model is ever made just to be saved).
    """

    key: PermutationKey
    groups: list[GroupResync]
    method: str
    refined_rounds: int
    psi: float | None
    psi_distinguishable: float | None
    #: Set when the suspect was matched across conversions (see :mod:`onnxlady._resync._across`).
    across: Any = None
    #: The re-ordered suspect, once built (see :attr:`model`).
    built: onnx.ModelProto | None = field(default=None, repr=False)
    #: Until it is built: the suspect (never changed) and the new ``raw_data`` of each
    #: initializer that moves, by name (or a function computing it, for weights still in
    #: their external files).
    unbuilt: tuple[onnx.ModelProto, dict[str, Override]] | None = field(default=None, repr=False)
    #: Builds the model from :attr:`unbuilt` (a copy of the suspect with those bytes).
    builder: Callable[[onnx.ModelProto, dict[str, Override]], onnx.ModelProto] | None = field(
        default=None, repr=False
    )

    @property
    def model(self) -> onnx.ModelProto:
        """The suspect with its neurons in the reference's order (built on first use)."""
        if self.built is None:
            if self.unbuilt is None or self.builder is None:
                raise ValueError("a ResyncResult holds neither its model nor what builds it")
            self.built = self.builder(*self.unbuilt)
            self.unbuilt = None
        return self.built

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the model and the key are written separately)."""
        return {
            "across_conversions": self.across is not None,
            **({"conversions": [asdict(c) for c in self.across.match.conversions]} if self.across else {}),
            **(self.across.to_dict() if self.across else {}),
            "method": self.method,
            "refined_rounds": self.refined_rounds,
            "ambiguity_margin": AMBIGUITY_MARGIN,
            "psi": self.psi,
            "psi_distinguishable": self.psi_distinguishable,
            "neurons": sum(g.size for g in self.groups),
            "ambiguous": sum(g.ambiguous for g in self.groups),
            "zero_neurons": sum(g.zero_neurons for g in self.groups),
            "groups": [asdict(g) for g in self.groups],
        }


@dataclass(frozen=True)
class ResyncOptions:
    """Design choices; :func:`resync_model` uses the defaults, experiments vary them.

    ``misaligned``: first-pass slices whose other axes wait for later groups are ``"skip"``-ped
    (unless no slice is aligned) or kept in a permutation-invariant ``"sorted"`` form (sorting
    helped some fixtures a little and cost up to 80 points on a trained text detector).
    ``weighting``: ``"residual"`` (see the module docstring) or plain ``"unit"`` norms.
    ``similarity``: ``"distance"`` or ``"cosine"``.
    ``settle_ties``: across conversions, re-solve the groups the first pass leaves with ties
    (off: the first pass alone, which ``find --confirm`` reads to refuse an unrelated candidate
    before the minutes an unrelated pair's ties take to settle).
    """

    method: str = "hungarian"
    refine: bool = False
    misaligned: str = "skip"
    weighting: str = "residual"
    similarity: str = "distance"
    settle_ties: bool = True


# -- slices -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slice:
    """The part of one planned tensor that one group's neurons govern along one axis."""

    plan: int  # index into the analysis's tensor plans
    axis: int
    index: np.ndarray  # [n, m]: positions along ``axis`` governed by each neuron, ascending
    identity: bool  # index.ravel() is the whole axis in order: no gather needed
    inner: frozenset[str]  # other groups that reorder positions within one neuron's part
    others: tuple[tuple[int, frozenset[str]], ...]  # other axes and the groups permuting them

    def misaligned_dims(self, solved: frozenset[str]) -> list[int]:
        """Dimensions of the gathered ``[n, m, other axes...]`` array not aligned yet."""
        dims = [1] if self.inner - solved else []
        for axis, groups in self.others:
            if groups - solved:
                dims.append(2 + (axis if axis < self.axis else axis - 1))
        return dims


def _neuron_positions(labels: np.ndarray, size: int) -> np.ndarray | None:
    """``[size, m]`` positions where each neuron's label occurs, or None if counts differ."""
    order = np.argsort(labels, kind="stable")
    order = order[labels[order] >= 0]
    counts = np.bincount(labels[order], minlength=size)
    if counts.size != size or counts[0] == 0 or not np.all(counts == counts[0]):
        return None
    return order.reshape(size, int(counts[0]))


def group_slices(
    analysis: ChannelAnalysis, permutable: set[str]
) -> tuple[dict[str, list[_Slice]], dict[str, list[int]]]:
    """Every slice of every permutable group, in plan order; and the plans each group touches."""
    slices: dict[str, list[_Slice]] = {gid: [] for gid in permutable}
    touched: dict[str, list[int]] = {gid: [] for gid in permutable}
    for number, plan in enumerate(analysis.tensors):
        labels = {axis: analysis.neuron_labels(expr) for axis, expr in plan.axes}
        groups_on = {axis: frozenset(g for g in lab if g in permutable) for axis, lab in labels.items()}
        for gid in sorted(frozenset().union(*groups_on.values())):
            touched[gid].append(number)
        for axis, lab in labels.items():
            for gid in sorted(groups_on[axis]):
                index = _neuron_positions(lab[gid], analysis.group(gid).size)
                if index is None:
                    continue
                inner = frozenset(h for h in groups_on[axis] if h != gid and np.any(lab[h][index] >= 0))
                others = tuple((b, groups_on[b]) for b in labels if b != axis and groups_on[b])
                identity = bool(np.array_equal(index.ravel(), np.arange(lab[gid].size)))
                slices[gid].append(_Slice(number, axis, index, identity, inner, others))
    return slices, touched


def gather_block(array: np.ndarray, piece: _Slice, sort_dims: Sequence[int], widen: bool = False) -> np.ndarray:
    """The slice as an ``[n, D]`` matrix (one gather), sorted along ``sort_dims`` (float64 with ``widen``)."""
    return _gathered(array, piece, sort_dims, widen)[0]


def _gathered(array: np.ndarray, piece: _Slice, sort_dims: Sequence[int], widen: bool = False) -> tuple[np.ndarray, bool]:
    """:func:`gather_block`, and whether the block is a new array (False: it may view ``array``).

    The slice's axis is moved first and gathered as the leading one: the result comes out
    already laid out ``[n, D]`` (gathering along the axis and then reshaping the moved view
    copied a consumer's weight twice). With ``widen``, a block of another float type is
    converted to float64 before it is sorted or returned, keeping its layout (``order="K"``):
    the block a float64 ``array`` gives, number for number and stride for stride.
    """
    n, m = piece.index.shape
    axis = piece.axis
    lead, tail = int(np.prod(array.shape[:axis], dtype=np.int64)), int(np.prod(array.shape[axis + 1 :], dtype=np.int64))
    if not sort_dims and lead > 1 and tail > 1 and array.flags.c_contiguous:
        # The axes after the slice's as one opaque element (a kernel's taps): the same C-contiguous
        # block as moving and copying below gives, copied a kernel at a time, not a value at a time.
        cells = array.reshape(lead, array.shape[axis] * tail).view(np.dtype((np.void, array.itemsize * tail))).T
        cells = np.take(cells, piece.index.ravel(), axis=0) if not piece.identity else np.ascontiguousarray(cells)
        block = cells.view(array.dtype).reshape(n, -1)
        if widen and block.dtype != np.float64:
            return block.astype(np.float64), True
        return block, not np.may_share_memory(block, array)  # one neuron: a view of ``array``
    moved = np.moveaxis(array, axis, 0)
    fresh = not piece.identity
    if fresh:
        moved = np.take(moved, piece.index.ravel(), axis=0)
    moved = moved.reshape((n, m, *moved.shape[1:]))
    if widen and moved.dtype != np.float64:
        moved, fresh = moved.astype(np.float64), True
    for dim in sort_dims:
        moved = np.sort(moved, axis=dim)
        fresh = True
    block = moved.reshape(n, -1)
    return block, fresh or not np.may_share_memory(block, array)


# -- block weights and scores -----------------------------------------------------------------
@dataclass
class _Block:
    """One slice of one solve: centred reference and suspect rows, and their products.

    ``product()`` is ``ref @ sus.T``: exact, or, for a block too large to multiply out, from
    count sketches (each column randomly signed and summed into one of ``_SKETCH_DIM``
    buckets: unbiased, error about ``|a||b| / sqrt(_SKETCH_DIM)``) with exact values wherever
    :meth:`_Blocks.rescore` computed them.
    """

    ref: np.ndarray | _CentredRows
    sus: np.ndarray | _CentredRows
    ref_sq: np.ndarray  # squared norm of each neuron's row
    sus_sq: np.ndarray
    sketch: tuple[np.ndarray, np.ndarray] | None = None
    exact: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # (rows, cols, values)
    cached: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        ref: np.ndarray,
        sus: np.ndarray,
        rng: np.random.Generator,
        owned: tuple[bool, bool] = (False, False),
        stored: bool = False,
        buffers: tuple[_CentredBuffer, _CentredBuffer] | None = None,
    ) -> _Block:
        """The block of one slice; ``owned``: whether ``ref`` / ``sus`` may be centred in place.

        ``stored``: ``ref`` and ``sus`` are float32 or float16 blocks as gathered (see
        :func:`_keeps_stored`), a sketched one's: it is centred, sketched and measured a band
        of rows at a time in float64 (the numbers its float64 copy gives), and its rows are kept
        as gathered (:class:`_CentredRows`), not as a float64 copy.
        ``buffers``: where ``ref`` / ``sus`` are centred when they may not be centred in place
        (see :class:`_CentredBuffer`).
        """
        if stored:
            sign = rng.choice(np.array([-1.0, 1.0]), ref.shape[1])  # float64, as the widened block's
            # The two sides are independent (numpy's passes let go of the GIL): within a run, the
            # suspect's is centred in the run's second thread meanwhile (the same numbers).
            worker = _BESIDE.get()
            beside = worker.submit(_centred_sketch, sus, sign) if worker is not None else None
            ref_rows, ref_sketch, ref_sq = _centred_sketch(ref, sign)
            sus_rows, sus_sketch, sus_sq = beside.result() if beside is not None else _centred_sketch(sus, sign)
            return cls(ref_rows, sus_rows, ref_sq, sus_sq, (ref_sketch, sus_sketch))
        if ref.shape[0] > 1:  # centring removes what all neurons share (BatchNorm variances near 1)
            ref_buffer, sus_buffer = buffers if buffers is not None else (None, None)
            ref, sus = _centred(ref, owned[0], ref_buffer), _centred(sus, owned[1], sus_buffer)
        n, width = ref.shape
        sketch = None
        if n * n * width > _EXACT_PRODUCT and width > 2 * _SKETCH_DIM:
            sign = rng.choice(np.array([-1.0, 1.0], dtype=ref.dtype), width)
            sketch = (_count_sketch(ref, sign), _count_sketch(sus, sign))
        return cls(ref, sus, _row_energy(ref), _row_energy(sus), sketch)  # type: ignore[arg-type]

    def product(self, keep: bool) -> np.ndarray:
        """``ref @ sus.T`` (see the class docstring); kept for the next call when ``keep``."""
        if self.cached is not None:
            return self.cached
        if self.sketch is not None:
            left, right = self.sketch
        else:  # (only a sketched block keeps its rows as gathered)
            assert isinstance(self.ref, np.ndarray) and isinstance(self.sus, np.ndarray)
            left, right = self.ref, self.sus
        gram = left @ right.T
        for rows, cols, values in self.exact:
            gram[rows, cols] = values
        if keep:
            self.cached = gram
        return gram

    def cross(self, step: np.ndarray) -> float:
        """``sum_j <ref_j, sus_step[j]>``.

        From the sketch when one is kept: summing ``n`` entries averages its error away.
        """
        if self.cached is not None:
            return float(self.cached[np.arange(step.size), step].sum(dtype=np.float64))
        ref = self.ref.whole() if isinstance(self.ref, _CentredRows) else self.ref
        return float(np.einsum("ij,ij->", ref, self.sus[step], dtype=np.float64))


class _CentredRows:
    """A sketched block's centred rows (float64), kept as gathered: each read is widened then centred.

    Its rows are read again only for a few neurons (:meth:`_Blocks.rescore`), or all of them
    where the products are not kept (:meth:`_Block.cross`): kept in their stored type, they take
    a half or a quarter of a float64 copy's memory, and every read gives the numbers of the
    float64 copy centred in place (``float64(x) - mean``, element by element).
    """

    def __init__(self, stored: np.ndarray, mean: np.ndarray) -> None:
        self.stored = stored  # [n, D], float32 or float16
        self.mean = mean  # [1, D], float64
        self.shape: tuple[int, ...] = stored.shape
        self.size = stored.size

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        rows = self.stored[index].astype(np.float64)
        return np.subtract(rows, self.mean, out=rows)

    def whole(self) -> np.ndarray:
        """Every row, centred: the float64 block itself."""
        return self[np.arange(self.shape[0])]


def _keeps_stored(array: np.ndarray, piece: _Slice) -> bool:
    """Whether a slice of ``array`` (float32 or float16) may be gathered unwidened for a sketched block.

    Where :func:`_gathered`'s widened block is C-contiguous (its layout decides the order of
    the sums made over it): gathered kernel by kernel, taken along the moved axis, or a moved
    axis that is already the leading one.
    """
    if array.dtype not in (np.float32, np.float16):
        return False
    n, m = piece.index.shape
    axis = piece.axis
    width = m * (array.size // max(array.shape[axis], 1))
    if not (n > 1 and n * n * width > _EXACT_PRODUCT and width > 2 * _SKETCH_DIM):
        return False  # not sketched: widened and kept whole, as before
    lead, tail = int(np.prod(array.shape[:axis], dtype=np.int64)), int(np.prod(array.shape[axis + 1 :], dtype=np.int64))
    if lead > 1 and tail > 1 and array.flags.c_contiguous:
        return True
    return not piece.identity or np.moveaxis(array, axis, 0).flags.c_contiguous


def _nonzero_rows(block: np.ndarray) -> np.ndarray:
    """Per row of ``block``, whether it holds a value that is not zero: ``np.any(block != 0, axis=1)``.

    A float16 block is compared on its bits (numpy compares half floats value by value in
    software, ten times slower): a value is zero, ``0.0`` or ``-0.0``, exactly when its bits
    but the sign are all zeros (a NaN is not zero either way).
    """
    if block.dtype == np.float16 and block.flags.c_contiguous:
        return np.any(block.view(np.uint16) & np.uint16(0x7FFF), axis=1)
    return np.any(block != 0, axis=1)


def _centred_sketch(stored: np.ndarray, sign: np.ndarray) -> tuple[_CentredRows, np.ndarray, np.ndarray]:
    """What :func:`_centred`, :func:`_count_sketch` and :func:`_row_energy` give on ``stored`` widened.

    A band of rows at a time, widened into one small float64 buffer: the column sums run row
    after row as ``sum(axis=0)`` runs them (each band's sums continue from the previous total,
    the buffer's first row), and each row is centred, measured and sketched as the whole block
    would be. Returns the rows (kept as gathered), the sketch and the squared norms.
    """
    n, width = stored.shape
    band = max(1, _SKETCH_BAND_BYTES // (width * 8))
    buffer = np.empty((band + 1, width))
    total: np.ndarray | None = None
    for start in range(0, n, band):
        count = min(band, n - start)
        np.copyto(buffer[1 : count + 1], stored[start : start + count])
        if total is None:
            total = buffer[1 : count + 1].sum(axis=0)
        else:
            buffer[0] = total
            total = buffer[: count + 1].sum(axis=0)
    assert total is not None
    mean = np.true_divide(total, n).reshape(1, width)  # as ``mean(axis=0, keepdims=True)``
    sketch = np.empty((n, _SKETCH_DIM))
    energy = np.empty(n)
    whole = width // _SKETCH_DIM * _SKETCH_DIM
    for start in range(0, n, band):
        count = min(band, n - start)
        rows = buffer[:count]
        np.copyto(rows, stored[start : start + count])
        np.subtract(rows, mean, out=rows)
        energy[start : start + count] = _row_energy(rows)
        np.multiply(rows, sign, out=rows)
        piece = sketch[start : start + count]
        np.sum(rows[:, :whole].reshape(count, -1, _SKETCH_DIM), axis=1, out=piece)
        piece[:, : width - whole] += rows[:, whole:]
    return _CentredRows(stored, mean), sketch, energy


@dataclass
class _Blocks:
    """The blocks of one solve and the scores they give for a choice of block weights."""

    blocks: list[_Block]
    zero_ref: np.ndarray  # neurons whose raw signature is all zeros
    zero_sus: np.ndarray
    keep: bool  # whether every block's product fits in memory at once

    @classmethod
    def build(
        cls,
        pairs: list[tuple[np.ndarray, np.ndarray]],
        n: int,
        seed: int,
        owned: Sequence[tuple[bool, bool]] = (),
        stored: Sequence[bool] = (),
        buffers: Sequence[tuple[_CentredBuffer, _CentredBuffer]] = (),
    ) -> _Blocks:
        """The blocks of ``pairs``; ``owned[i]``: whether pair ``i``'s arrays may be overwritten.

        ``stored[i]``: pair ``i`` is a sketched block as gathered (see :meth:`_Block.build`);
        ``buffers[i]``: where pair ``i``'s arrays are centred when not in place.
        """
        rng = default_rng(seed)
        zero_ref, zero_sus = np.ones(n, dtype=bool), np.ones(n, dtype=bool)
        for r, s in pairs:  # (widening keeps every zero a zero and every other value not)
            zero_ref &= ~_nonzero_rows(r)
            zero_sus &= ~_nonzero_rows(s)
        owned = list(owned) or [(False, False)] * len(pairs)
        kinds = list(stored) or [False] * len(pairs)
        spaces: list[tuple[_CentredBuffer, _CentredBuffer] | None] = list(buffers) or [None] * len(pairs)
        blocks = [
            _Block.build(r, s, rng, mine, kind, space)
            for (r, s), mine, kind, space in zip(pairs, owned, kinds, spaces)
        ]
        return cls(blocks, zero_ref, zero_sus, len(pairs) * n * n <= _KEPT_PRODUCTS)

    @property
    def sketched(self) -> bool:
        return any(block.sketch is not None for block in self.blocks)

    def unit_weights(self) -> list[tuple[float, float]]:
        """Reference and suspect factors scaling every block to unit norm."""
        return [(_inverse_root(b.ref_sq.sum()), _inverse_root(b.sus_sq.sum())) for b in self.blocks]

    def residual_weights(self, step: np.ndarray) -> list[tuple[float, float]]:
        """Factors ``(1/sigma, a/sigma)`` per block.

        ``sigma^2`` is the block's residual noise per element under the match ``step``, ``a`` the
        least-squares scale of the matched suspect block.
        """
        weights = []
        for block in self.blocks:
            e_ref, e_sus = float(block.ref_sq.sum()), float(block.sus_sq.sum())
            if e_ref == 0 or e_sus == 0:
                weights.append((0.0, 0.0))
                continue
            cross = block.cross(step)
            scale = max(0.0, cross / e_sus)
            noise = max(e_ref - 2 * scale * cross + scale * scale * e_sus, NOISE_FLOOR * e_ref) / block.ref.size
            weights.append((1.0 / np.sqrt(noise), scale / np.sqrt(noise)))
        return weights

    def scores(self, weights: list[tuple[float, float]], similarity: str) -> _Scores:
        """The scores of every (reference, suspect) pair for these block weights.

        ``gram`` is ``0 + w_1 P_1 + w_2 P_2 + ...`` in float32, block by block in this order,
        whatever the path: the sums are the same bit for bit. Kept products are summed a band
        of rows at a time, all blocks per band, and the band's decision computed while it is
        in cache: no ``n x n`` temporary (one per block and round, before) is ever allocated.
        """
        n = self.zero_ref.size
        gram = np.zeros((n, n), dtype=np.float32)
        ref_sq, sus_sq = np.zeros(n), np.zeros(n)
        active: list[tuple[np.float32, _Block]] = []
        for (u, v), block in zip(weights, self.blocks):
            if u == 0 and v == 0:
                continue
            active.append((np.float32(u * v), block))
            ref_sq += (u * u) * block.ref_sq
            sus_sq += (v * v) * block.sus_sq
        scores = _Scores(gram, ref_sq, sus_sq, similarity, self.zero_ref, self.zero_sus)
        if not self.keep:
            for weight, block in active:
                product = block.product(False)  # a fresh array: weighted in place
                np.multiply(product, weight, out=product)
                np.add(gram, product, out=gram)
                del product
            return scores
        products = [(weight, block.product(True)) for weight, block in active]
        band = _band_rows(n)
        spare = np.empty((min(band, n), n), dtype=np.float32)
        decision = np.empty((n, n), dtype=np.float32) if similarity == "distance" else None
        for start in range(0, n, band):
            stop = min(start + band, n)
            rows, scratch = gram[start:stop], spare[: stop - start]
            for weight, product in products:
                np.multiply(product[start:stop], weight, out=scratch)
                np.add(rows, scratch, out=rows)
            if decision is not None:
                scores.decide(start, stop, decision)
        scores.decided = decision
        return scores

    def rescore(self, weights: list[tuple[float, float]], decision: np.ndarray, step: np.ndarray) -> bool:
        """Exact products, in sketched blocks, for the neurons whose match the sketch error could change.

        Their best candidates and current match are computed exactly. False if there are none.
        """
        n = step.size
        # Per reference neuron, a bound (5 standard deviations) on the sketch's error in ``decision``.
        variance = np.zeros(n)
        for (u, v), block in zip(weights, self.blocks):
            if block.sketch is not None:
                variance += (u * v) ** 2 * block.ref_sq * float(block.sus_sq.max()) / _SKETCH_DIM
        bound = 2.0 * 5.0 * np.sqrt(variance)
        chosen = decision[np.arange(n), step]
        others = decision.copy()
        others[np.arange(n), step] = -np.inf
        rows = np.flatnonzero(chosen - others.max(axis=1) <= 2.0 * bound)
        if rows.size == 0:
            return False
        count = min(n, _CANDIDATES)
        best = np.argpartition(-decision[rows], count - 1, axis=1)[:, :count]
        cols = np.concatenate([best, step[rows, None]], axis=1)
        grid = np.repeat(rows[:, None], cols.shape[1], axis=1)
        for block in self.blocks:
            if block.sketch is None:
                continue
            values = np.stack([np.einsum("ij,ij->i", block.ref[rows], block.sus[c]) for c in cols.T], axis=1)
            block.exact.append((grid, cols, values))
            if block.cached is not None:
                block.cached[grid, cols] = values
        return True


def _centred(rows: np.ndarray, in_place: bool, buffer: _CentredBuffer | None = None) -> np.ndarray:
    """``rows - rows.mean(axis=0, keepdims=True)``, written over ``rows`` when ``in_place``.

    Otherwise written into ``buffer``'s memory where one is given and ``rows`` is C-contiguous
    (the plain difference is then a C-contiguous array of the same type: the same numbers in
    the same layout).
    """
    mean = rows.mean(axis=0, keepdims=True)
    if in_place and rows.flags.writeable and np.issubdtype(rows.dtype, np.floating):
        return np.subtract(rows, mean, out=rows)
    if buffer is None or not rows.flags.c_contiguous:
        return rows - mean
    return np.subtract(rows, mean, out=buffer.get(rows.shape, np.result_type(rows, mean)))


class _CentredBuffer:
    """The memory one side of one block of a solve is centred in, reused from solve to solve.

    A block's centred rows are a new array per solve where its rows are a view of the model
    (a twin's weights, as stored), as large as the weight: about 1 GB of fresh memory in the
    resync of a 529 MB twin, whose first touch was a quarter of its audit's page faults
    (240,000 of 900,000) and 0.5 s of its system time. A solve's blocks are let go when it
    returns, so the next solve writes its rows in the same memory. The array only grows;
    :meth:`ResyncState.run` lets every buffer go when it is done.
    """

    def __init__(self) -> None:
        self._array: np.ndarray | None = None

    def get(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype`` (contents undefined), in this buffer's memory."""
        size = math.prod(shape) * dtype.itemsize
        if self._array is None or self._array.size < size:
            self._array = None  # the smaller one goes before the larger is allocated
            self._array = np.empty(size, dtype=np.uint8)
        return self._array[:size].view(dtype).reshape(shape)


def _count_sketch(rows: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Column ``c`` of ``rows``, times ``sign[c]``, summed into bucket ``c % _SKETCH_DIM``.

    Columns sharing a bucket lie ``_SKETCH_DIM`` apart (other input channels, not neighbouring
    kernel taps), and the sums run over contiguous memory. A band of rows at a time: each row's
    sums are the whole block's (the same additions in the same order), without a signed copy
    of the whole block (its page faults cost more than the sums).
    """
    n, width = rows.shape
    whole = width // _SKETCH_DIM * _SKETCH_DIM
    sketch = np.empty((n, _SKETCH_DIM), dtype=np.result_type(rows, sign))
    band = max(1, _SKETCH_BAND_BYTES // max(width * sketch.itemsize, 1))
    for start in range(0, n, band):
        signed = rows[start : start + band] * sign
        piece = sketch[start : start + band]
        np.sum(signed[:, :whole].reshape(signed.shape[0], -1, _SKETCH_DIM), axis=1, out=piece)
        piece[:, : width - whole] += signed[:, whole:]
    return sketch


@dataclass
class _Scores:
    """Weighted products of one solve: what assignment maximises and what is reported.

    Zero signatures score 0 against everything (a constant row or column never sways the
    Hungarian method).
    """

    gram: np.ndarray  # sum over blocks of weighted <ref_j, sus_i>
    ref_sq: np.ndarray  # weighted squared norms
    sus_sq: np.ndarray
    kind: str  # "distance" or "cosine"
    zero_ref: np.ndarray
    zero_sus: np.ndarray

    #: The decision, when :meth:`_Blocks.scores` computed it along with ``gram`` (never changed).
    decided: np.ndarray | None = None
    _sus32: np.ndarray | None = field(default=None, repr=False)
    _zero_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    _zero_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)

    @property
    def decision(self) -> np.ndarray:
        """What assignment maximises; not to be changed (it may be kept)."""
        if self.decided is not None:
            return self.decided
        if self.kind == "cosine":
            return self._masked(self._cosine())
        n = self.gram.shape[0]
        decision = np.empty_like(self.gram)
        band = _band_rows(n)
        for start in range(0, n, band):
            self.decide(start, min(start + band, n), decision)
        self.decided = decision
        return decision

    def decide(self, start: int, stop: int, decision: np.ndarray) -> None:
        """Rows ``start:stop`` of the (distance) decision, from those of ``gram``.

        The largest ``2<a,b> - |b|^2`` is the nearest suspect neuron (``|a|^2`` is the same in a
        row); float32, as ``2.0 * gram - sus_sq.astype(float32)`` over the whole matrix gives.
        """
        if self._sus32 is None:  # once per matrix, not per band
            self._sus32 = self.sus_sq.astype(np.float32)
            self._zero_rows = np.flatnonzero(self.zero_ref)
            self._zero_cols = np.flatnonzero(self.zero_sus)
        rows = decision[start:stop]
        np.multiply(self.gram[start:stop], 2.0, out=rows)
        np.subtract(rows, self._sus32, out=rows)
        if self._zero_rows.size:
            rows[self._zero_rows[(self._zero_rows >= start) & (self._zero_rows < stop)] - start, :] = 0.0
        if self._zero_cols.size:
            rows[:, self._zero_cols] = 0.0

    def similarity(self) -> np.ndarray:
        """Cosine, or ``1 - d^2 / (|a|^2 + mean |b|^2)``: 1 for an exact copy, ~0 for a stranger."""
        if self.kind == "cosine":
            return self._masked(self._cosine())
        distance = np.maximum(self.ref_sq[:, None] + self.sus_sq[None, :] - 2.0 * self.gram, 0.0)
        scale = self.ref_sq[:, None] + self.sus_sq.mean()
        return self._masked(1.0 - distance / np.where(scale > 0, scale, 1.0))

    def margins(self) -> np.ndarray:
        """:func:`_margins` of :meth:`similarity`, one band of rows at a time.

        Each band is computed with the same float64 operations, element for element, as
        :meth:`similarity`: the same values, without its ``n x n`` float64 matrix and the
        temporaries of its expression (75 MB each for a 3072-neuron MLP group).
        """
        n = self.gram.shape[0]
        if self.kind == "cosine" or n < 2:
            return _margins(self.similarity())
        scale = self._scale()
        margins = np.empty(n)
        band = _band_rows(n)
        any_zero_sus = bool(self.zero_sus.any())
        for start in range(0, n, band):
            stop = min(start + band, n)
            rows = np.add(self.ref_sq[start:stop, None], self.sus_sq[None, :])
            np.subtract(rows, 2.0 * self.gram[start:stop], out=rows)
            np.maximum(rows, 0.0, out=rows)
            np.divide(rows, scale[start:stop], out=rows)
            np.subtract(1.0, rows, out=rows)
            rows[self.zero_ref[start:stop], :] = 0.0
            if any_zero_sus:
                rows[:, self.zero_sus] = 0.0
            margins[start:stop] = _margins_in_place(rows)
        return margins

    def chosen(self, step: np.ndarray) -> np.ndarray:
        """``similarity()[j, step[j]]`` for every ``j``, computed for those entries only (same operations)."""
        n = self.gram.shape[0]
        if self.kind == "cosine":
            return self.similarity()[np.arange(n), step]
        distance = self.ref_sq + self.sus_sq[step] - 2.0 * self.gram[np.arange(n), step]
        values = 1.0 - np.maximum(distance, 0.0) / self._scale()[:, 0]
        values[self.zero_ref | self.zero_sus[step]] = 0.0
        return values

    def _scale(self) -> np.ndarray:
        """``[n, 1]``: the denominator of every row's similarity."""
        scale = self.ref_sq[:, None] + self.sus_sq.mean()
        return np.where(scale > 0, scale, 1.0)

    def _cosine(self) -> np.ndarray:
        norms = np.sqrt(np.outer(self.ref_sq, self.sus_sq))
        return self.gram / np.where(norms > 0, norms, 1.0)

    def _masked(self, matrix: np.ndarray) -> np.ndarray:
        matrix[self.zero_ref, :] = 0.0
        matrix[:, self.zero_sus] = 0.0
        return matrix


def _band_rows(n: int) -> int:
    """Rows of an ``n``-column score matrix processed together: about :data:`_BAND` elements."""
    return max(1, _BAND // max(n, 1))


def _row_energy(block: np.ndarray) -> np.ndarray:
    """Squared norm of every row, accumulated in float64."""
    if block.shape[1] == 0:
        return np.zeros(block.shape[0])
    return np.einsum("ij,ij->i", block, block, dtype=np.float64)


def _inverse_root(energy: float) -> float:
    return 1.0 / np.sqrt(energy) if energy > 0 else 0.0


# -- assignment -------------------------------------------------------------------------------
def _hungarian(decision: np.ndarray, zero_ref: np.ndarray, zero_sus: np.ndarray) -> tuple[np.ndarray, int]:
    """Best bijection: ``match[j]`` is the suspect neuron for reference neuron ``j``."""
    best = decision.argmax(axis=1)
    # Distinct maxima (counted by bincount: np.unique imports numpy.ma, 80 ms, on first use).
    if best.size == 0 or np.bincount(best).max() == 1:
        return best.astype(np.int64), 0  # every row at its maximum: nothing can beat it
    _, cols = linear_sum_assignment(decision, maximize=True)
    return cols.astype(np.int64), 0


def _argmax(decision: np.ndarray, zero_ref: np.ndarray, zero_sus: np.ndarray) -> tuple[np.ndarray, int]:
    """The paper's rule: each reference neuron claims its best suspect neuron.

    A suspect neuron claimed several times goes to its best claimant; the losers are then
    matched greedily (best remaining score first) so the result is a permutation. Zero
    signatures claim nothing and are claimed by nobody before the repair. Returns the match
    and how many suspect neurons were claimed more than once.
    """
    n = decision.shape[0]
    masked = decision.astype(np.float64, copy=True)
    masked[:, zero_sus] = -np.inf
    best = masked.argmax(axis=1)
    claimants = np.flatnonzero(~zero_ref & np.isfinite(masked[np.arange(n), best]))
    duplicates = int(np.sum(np.bincount(best[claimants], minlength=n) > 1))
    match = np.full(n, -1, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    for j in claimants[np.argsort(-masked[claimants, best[claimants]], kind="stable")]:
        if not taken[best[j]]:
            match[j], taken[best[j]] = best[j], True
    losers, free = np.flatnonzero(match < 0), np.flatnonzero(~taken)
    if losers.size:
        sub = masked[np.ix_(losers, free)]
        finite = np.isfinite(sub)
        sub[~finite] = sub[finite].min() - 1.0 if finite.any() else 0.0  # zero signatures go last
        used_rows, used_cols = np.zeros(losers.size, dtype=bool), np.zeros(free.size, dtype=bool)
        for flat in np.argsort(-sub, axis=None, kind="stable"):
            r, c = divmod(int(flat), free.size)
            if not used_rows[r] and not used_cols[c]:
                match[losers[r]] = free[c]
                used_rows[r] = used_cols[c] = True
    return match, duplicates


_ASSIGN = {"hungarian": _hungarian, "argmax": _argmax}


def _margins(similarity: np.ndarray) -> np.ndarray:
    """Best minus second-best similarity per reference neuron (1 for a single neuron)."""
    n = similarity.shape[1]
    if n < 2:
        return np.ones(similarity.shape[0])
    top = np.partition(similarity, n - 2, axis=1)[:, -2:]
    return (top.max(axis=1) - top.min(axis=1)).astype(np.float64)


def _margins_in_place(similarity: np.ndarray) -> np.ndarray:
    """:func:`_margins`, by two row maxima instead of a partition; ``similarity`` is overwritten.

    The second maximum is taken with one occurrence of the first set to -inf: the same two
    largest values (as a multiset) as the partition's, so the same differences, at a quarter
    of the cost. A row holding NaN or +inf (nothing finite weights give) goes to :func:`_margins`.
    """
    rows, n = similarity.shape
    if n < 2:
        return np.ones(rows)
    best = similarity.max(axis=1)
    if not np.all(np.isfinite(best)):
        return _margins(similarity)
    similarity[np.arange(rows), similarity.argmax(axis=1)] = -np.inf
    return (best - similarity.max(axis=1)).astype(np.float64)


# -- the solver -------------------------------------------------------------------------------
@dataclass
class _Solve:
    """Statistics of one group's latest solve."""

    margins: np.ndarray
    zero_neurons: int
    duplicate_claims: int
    mean_similarity: float


@dataclass
class ResyncState:
    """Working state: reference arrays, the suspect's progressively aligned copies, matches."""

    analysis: ChannelAnalysis
    order: list[ChannelGroup]
    slices: dict[str, list[_Slice]]
    touched: dict[str, list[int]]  # per group: the plans it permutes
    reference: list[np.ndarray]  # per plan
    work: list[np.ndarray]  # per plan: the suspect's array with current alignments applied
    options: ResyncOptions
    match: dict[str, np.ndarray] = field(default_factory=dict)  # aligned[j] = suspect[match[j]]
    stats: dict[str, _Solve] = field(default_factory=dict)
    #: Whether ``reference`` and ``work`` may hold values in a narrower float type than float64
    #: holds exactly (resync across conversions keeps them as stored): every slice is then
    #: converted to float64 when gathered, and computed with as before. A twin's float32 arrays
    #: are computed with as they are.
    widen: bool = False
    #: Per (group, plan, axis): whether that reference slice varies between the group's neurons
    #: (the reference never changes: asked once, not on every solve of the group).
    _varies: dict[tuple[str, int, int], bool] = field(default_factory=dict, repr=False)
    #: Per block of a solve (its place in the solve's list), the memory of its two sides'
    #: centred rows: reused by the next solve of :meth:`run`, let go when it returns (a solve
    #: outside it allocates its own, as before).
    _centred: list[tuple[_CentredBuffer, _CentredBuffer]] | None = field(default=None, repr=False)
    #: Outer group -> the groups of its blocks' own orders (``p (x) {q_g}``), set by :meth:`run`.
    _block_orders: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def blocks(self, gid: str, solved: frozenset[str]) -> _Blocks:
        """The blocks of the slices usable once the groups in ``solved`` are aligned.

        Slices with misaligned axes are left out (or sorted along those axes, per the options);
        a group with no aligned slice at all (attention heads, whose slices all wait for the
        head dimension's group, and vice versa) gets the sorted forms of all of them.
        """
        pieces = [(piece, piece.misaligned_dims(solved)) for piece in self.slices[gid]]
        if self.options.misaligned == "skip" and self._aligned_tell_apart(gid, [p for p, dims in pieces if not dims]):
            pieces = [(piece, dims) for piece, dims in pieces if not dims]
        pairs, owned, stored = [], [], []
        for piece, dims in pieces:
            reference, work = self.reference[piece.plan], self.work[piece.plan]
            # A sketched block of narrower floats is widened a band at a time, not copied whole.
            keep = self.widen and not dims and _keeps_stored(reference, piece) and _keeps_stored(work, piece)
            (ref, ref_fresh), (sus, sus_fresh) = (
                _gathered(reference, piece, dims, self.widen and not keep),
                _gathered(work, piece, dims, self.widen and not keep),
            )
            pairs.append((ref, sus))
            owned.append((ref_fresh, sus_fresh))
            stored.append(keep)
        buffers = self._centred if self._centred is not None else []
        # A solve with fewer blocks than the last lets the others' memory go.
        del buffers[len(pairs) :]
        buffers += [(_CentredBuffer(), _CentredBuffer()) for _ in range(len(pairs) - len(buffers))]
        return _Blocks.build(
            pairs, self.analysis.group(gid).size, seed=zlib.crc32(gid.encode()), owned=owned, stored=stored,
            buffers=buffers,
        )  # fmt: skip

    def _aligned_tell_apart(self, gid: str, aligned: list[_Slice]) -> bool:
        """Whether the aligned slices alone can tell the group's neurons apart.

        A group-level factor ``p (x) I_k`` (GroupNorm's G groups of k channels) may have no
        aligned slice but the normalisation's per-group scale and shift, which a legacy export
        stores as constant ones and zeros: every neuron alike there, the match would be a tie.
        Its weights' rows then wait for the channels-within-a-group factor; they are used,
        sorted along it, instead of nothing.
        """
        n = self.analysis.group(gid).size
        # Smallest first (a bias or a scale usually answers), each slice asked once per resync.
        for piece in sorted(aligned, key=lambda piece: self.reference[piece.plan].size):
            key = (gid, piece.plan, piece.axis)
            if key not in self._varies:
                block = gather_block(self.reference[piece.plan], piece, ())
                self._varies[key] = bool(block.shape[0] == n and np.any(block != block[:1]))
            if self._varies[key]:
                return True
        return False

    def exact_match(
        self, gid: str, solved: frozenset[str], step: np.ndarray | None = None, margins: np.ndarray | None = None
    ) -> np.ndarray | None:
        """The matching by bit-equal signatures, when every neuron has exactly one twin.

        A permuted but otherwise untouched copy is matched exactly even where neurons are
        nearly alike (trained models hold near-duplicates that similarity cannot separate).
        """
        n = self.analysis.group(gid).size
        pieces = [piece for piece in self.slices[gid] if not piece.misaligned_dims(solved)]
        if not pieces:
            return None
        ref = np.concatenate([gather_block(self.reference[p.plan], p, (), self.widen).reshape(n, -1) for p in pieces], axis=1)
        sus = np.concatenate([gather_block(self.work[p.plan], p, (), self.widen).reshape(n, -1) for p in pieces], axis=1)
        ref_keys = [row.tobytes() for row in np.ascontiguousarray(ref)]
        lookup = {row.tobytes(): index for index, row in enumerate(np.ascontiguousarray(sus))}
        if len(set(ref_keys)) < n or len(lookup) < n:
            return None
        matched = [lookup.get(key) for key in ref_keys]
        if any(index is None for index in matched):
            return None
        return np.asarray(matched, dtype=np.int64)

    def solve(self, gid: str, solved: frozenset[str], aligned: bool) -> bool:
        """Match one group and apply the correction to the working copies; True if it changed.

        ``aligned``: the working copies already hold a match for this group (refinement), so
        block weights are estimated from it rather than bootstrapped with unit norms.
        """
        blocks = self.blocks(gid, solved)
        n = blocks.zero_ref.size
        identity = np.arange(n)
        residual = self.options.weighting == "residual"
        previous = identity if aligned and residual else None
        weights = blocks.unit_weights() if previous is None else blocks.residual_weights(previous)
        rounds = 1 + (REWEIGHT_ROUNDS if residual else 0)
        assign = _ASSIGN[self.options.method]
        for number in range(rounds):
            scores = blocks.scores(weights, self.options.similarity)
            step, duplicates = assign(scores.decision, blocks.zero_ref, blocks.zero_sus)
            if (previous is not None and np.array_equal(step, previous)) or number == rounds - 1:
                break
            previous = step
            weights = blocks.residual_weights(step)
        if blocks.sketched and blocks.rescore(weights, scores.decision, step):
            scores = blocks.scores(weights, self.options.similarity)
            step, duplicates = assign(scores.decision, blocks.zero_ref, blocks.zero_sus)
        margins = scores.margins()
        if margins.size and margins.min() < AMBIGUITY_MARGIN:  # only ties need the (costly) exact test
            exact = self.exact_match(gid, solved, step, margins)
            if exact is not None:
                step, duplicates = exact, 0  # bit-equal signatures: no similarity can do better
        chosen = scores.chosen(step)
        self.stats[gid] = _Solve(margins, int(blocks.zero_sus.sum()), duplicates, float(chosen.mean()))
        if np.array_equal(step, identity):
            return False
        self._take(gid, step)
        return True

    def _take(self, gid: str, step: np.ndarray) -> None:
        """Re-order group ``gid`` by ``step`` (its new neuron ``j`` is its current ``step[j]``)."""
        self.match[gid] = self.match[gid][step]
        for plan_index in self.touched[gid]:
            self._apply(plan_index, gid, step)
        inners = self._block_orders.get(gid)
        if inners is not None:
            # Whole blocks moved with the orders already matched inside them: block g now holds
            # what block step[g] held, so its order's match is that block's.
            held = [self.match[inner] for inner in inners if inner in self.match]
            if len(held) == len(inners):
                for block, inner in enumerate(inners):
                    self.match[inner] = held[int(step[block])]

    def keep_stored_orders(self, unchanged: frozenset[str] = frozenset()) -> list[str]:
        """Put back in the suspect's stored order each group that order explains as well as its match.

        The suspect as stored is the null hypothesis: a group is moved only on evidence the
        stored order lacks. With every group solved, a moved group's slices are compared in both
        orders; it goes back where the stored order

        - agrees with the reference exactly on at least as many elements (and on some), for a
          group carrying a tensor the suspect stores bit for bit as the reference does
          (``unchanged``, reference names): a copy whose one layer's heads were swapped keeps the
          other layer's tensors, which moving the heads group (shared through a stacked KV cache)
          would re-order, as much as it puts the swapped layer back (held-out round 17, F6). A
          true permutation agrees exactly in its own order only;
        - or, where the match has ties (a margin below :data:`AMBIGUITY_MARGIN`), is at least as
          close to the reference (a distance no larger, each slice scaled by its energy so that
          no large tensor drowns a bias): the first pass broke the tie on what it could see (an
          attention head dimension on its biases alone, the weights waiting for the hidden
          size's group), and ties are no evidence of a move.

        An audit then does not report as re-ordered the tensors the resync itself re-ordered.

        Returns:
            The groups put back (their statistics re-measured with every slice).
        """
        everything = frozenset(self.match)
        kept = []
        for group in self.order:
            gid = group.id
            stats, match = self.stats.get(gid), self.match.get(gid)
            if stats is None or match is None:
                continue
            identity = np.arange(match.size)
            if np.array_equal(match, identity):
                continue
            back = np.argsort(match)  # match[back] is the stored order
            steps = (identity, back)
            exact = any(self.analysis.tensors[piece.plan].source in unchanged for piece in self.slices[gid])
            tied = bool(stats.margins.size and stats.margins.min() < AMBIGUITY_MARGIN)
            if not (exact and 0 < (agreed := self._agreements(gid, everything, steps))[1] >= agreed[0]) and not (
                tied and (distance := self._distances(gid, everything, steps))[1] <= distance[0]
            ):
                continue
            self._take(gid, back)
            blocks = self.blocks(gid, everything)
            scores = blocks.scores(blocks.unit_weights(), self.options.similarity)
            self.stats[gid] = _Solve(
                scores.margins(), int(blocks.zero_sus.sum()), 0, float(scores.chosen(identity).mean())
            )
            kept.append(gid)
        return kept

    def _aligned_pairs(self, gid: str, solved: frozenset[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The reference's and the suspect's block of each of the group's aligned slices (as stored)."""
        for piece in self.slices[gid]:
            if not piece.misaligned_dims(solved):
                yield gather_block(self.reference[piece.plan], piece, ()), gather_block(self.work[piece.plan], piece, ())

    def _agreements(self, gid: str, solved: frozenset[str], steps: tuple[np.ndarray, np.ndarray]) -> list[int]:
        """Per step, the elements of the group's aligned slices equal to the reference's, where the steps differ.

        Only the elements the two orders place differently count: a tensor the move leaves as it
        is (a shift of zeros, a constant scale) says nothing of which order is right.
        """
        totals = [0, 0]
        for ref, sus in self._aligned_pairs(gid, solved):
            first, second = sus[steps[0]], sus[steps[1]]
            apart = first != second
            if apart.any():
                ref = ref[apart]
                totals[0] += int(np.count_nonzero(ref == first[apart]))
                totals[1] += int(np.count_nonzero(ref == second[apart]))
        return totals

    def _distances(self, gid: str, solved: frozenset[str], steps: Sequence[np.ndarray]) -> list[float]:
        """Per step, the squared distance of the group's aligned slices, each scaled by its energy."""
        totals = [0.0] * len(steps)
        for ref_stored, sus_stored in self._aligned_pairs(gid, solved):
            ref, sus = ref_stored.astype(np.float64), sus_stored.astype(np.float64)
            energy = float(np.vdot(ref, ref) + np.vdot(sus, sus))
            if not energy > 0:
                continue
            for number, step in enumerate(steps):
                difference = ref - sus[step]
                totals[number] += float(np.vdot(difference, difference)) / energy
        return totals

    def _apply(self, plan_index: int, gid: str, step: np.ndarray) -> None:
        self.work[plan_index] = self._moved(self.work[plan_index], plan_index, gid, step)

    def _moved(self, array: np.ndarray, plan_index: int, gid: str, step: np.ndarray) -> np.ndarray:
        """``array`` (laid out like plan ``plan_index``) with group ``gid`` re-ordered by ``step``."""
        for axis, expr in self.analysis.tensors[plan_index].axes:
            idx = self.analysis.index_array(expr, {gid: step})
            if not np.array_equal(idx, np.arange(idx.size)):
                array = np.take(array, idx, axis=axis)
        return array

    def run(self, progress: Callable[[str], None] | None) -> int:
        """First pass in group order, then refinement rounds; returns the rounds run.

        Within it, a sketched block's two sides are centred side by side (see :meth:`_Block.build`).
        """
        self._centred = []
        token = None
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="onnxlady-centring") as worker:
                token = _BESIDE.set(worker)
                return self._run(progress)
        finally:
            if token is not None:
                _BESIDE.reset(token)
            self._centred = None

    def _run(self, progress: Callable[[str], None] | None) -> int:
        self._block_orders = self.analysis.block_orders()
        ids = _outer_first([g.id for g in self.order], self._block_orders)
        self.match = {g.id: np.arange(g.size, dtype=np.int64) for g in self.order}
        solved: set[str] = set()
        for number, gid in enumerate(ids):
            advance(progress, "resync: matching groups", number, len(ids))
            self.solve(gid, frozenset(solved), aligned=False)
            solved.add(gid)
        advance(progress, "resync: matching groups", len(ids), len(ids))
        rounds = 0
        everything = frozenset(ids)
        while self.options.refine and ids and rounds < MAX_REFINE_ROUNDS:
            rounds += 1
            say(progress, f"resync: refinement round {rounds}")
            changed = [self.solve(gid, everything, aligned=True) for gid in ids]
            if not any(changed):
                break
        return rounds


def _outer_first(ids: list[str], block_orders: Mapping[str, tuple[str, ...]]) -> list[str]:
    """``ids`` with each block-moving group before its blocks' own orders (the order otherwise kept).

    A block's own order is read where the source holds the block: its slices are meaningless
    until the group moving whole blocks has put them back there.
    """
    owner = {inner: outer for outer, inners in block_orders.items() for inner in inners}
    if not owner:
        return ids
    result: list[str] = []
    placed: set[str] = set()

    def place(gid: str, depth: int = 0) -> None:
        if gid in placed:
            return
        outer = owner.get(gid)
        if outer is not None and outer in ids_set and depth < len(ids):
            place(outer, depth + 1)
        placed.add(gid)
        result.append(gid)

    ids_set = set(ids)
    for gid in ids:
        place(gid)
    return result


def say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


# -- ground truth -----------------------------------------------------------------------------
def true_permutations(analysis: ChannelAnalysis, true_key: PermutationKey | None) -> dict[str, np.ndarray]:
    """The true permutations by group id (suspect neuron i = reference neuron perm[i])."""
    if true_key is None:
        return {}
    perms: dict[str, np.ndarray] = {}
    known = {g.id for g in analysis.groups}
    # A key written for another model fails one of these checks: say which model it was written for.
    written_for = f" (is it this reference's key? it was written for '{true_key.source_file}')" if true_key.source_file else ""
    for gid, perm in true_key.permutations().items():
        if gid not in known:
            raise OnnxladyError(f"the true key names group '{gid}', which the reference does not have{written_for}")
        group = analysis.group(gid)
        if group.frozen:
            raise OnnxladyError(f"the true key permutes group {gid}, which is frozen in the reference{written_for}")
        if perm.size != group.size:
            raise OnnxladyError(
                f"the true key's group {gid} has {perm.size} neurons, the reference's {group.size}{written_for}"
            )
        if group.permutable:
            perms[gid] = perm
    return perms


#: A neuron whose every slice is below this fraction of the group's largest is dead: trained
#: models hold neurons whose weights decayed to ~1e-20 (denormals), interchangeable in effect.
DEAD_NEURON_SCALE = 1e-6


def _duplicated(state: ResyncState, gid: str) -> np.ndarray:
    """Reference neurons that are interchangeable.

    Their full signature (every slice, raw) equals another neuron's, or they are dead (every slice
    negligible, see DEAD_NEURON_SCALE) while another neuron of the group is dead too.

    Rows are compared one slice at a time: each slice's distinct rows refine a label per neuron, so
    memory stays within one tensor's slice (a residual stream's signature is most of the model;
    concatenated in float64 it took several times the model, and minutes to sort).
    """
    n = state.analysis.group(gid).size
    if not state.slices[gid]:
        return np.ones(n, dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    dead = np.ones(n, dtype=bool)
    for piece in state.slices[gid]:
        block = gather_block(state.reference[piece.plan], piece, ()).astype(np.float64).reshape(n, -1)
        if not block.shape[1]:
            continue  # no values: equal rows, and dead (nothing above the scale)
        magnitude = np.abs(block).max(axis=1)
        dead &= magnitude <= DEAD_NEURON_SCALE * max(float(magnitude.max()), 1e-300)
        # + 0.0 makes -0.0 the bytes of 0.0: equal rows (the values are finite) are equal bytes.
        rows = np.ascontiguousarray(block + 0.0).view(np.dtype((np.void, block.shape[1] * 8))).ravel()
        del block
        _, block_labels = np.unique(rows, return_inverse=True)
        _, labels = np.unique(labels * n + block_labels.reshape(-1), return_inverse=True)
        labels = labels.reshape(-1)
    counts = np.bincount(labels, minlength=n)
    duplicated = counts[labels] > 1
    if dead.sum() > 1:
        duplicated |= dead
    return duplicated


def percent(hits: int, total: int) -> float | None:
    return 100.0 * hits / total if total else None


@dataclass
class PsiTally:
    """Psi counts over all groups."""

    hits: int = 0
    total: int = 0
    hits_distinguishable: int = 0
    total_distinguishable: int = 0

    def add(self, state: ResyncState, gid: str, true: np.ndarray) -> tuple[float | None, float | None]:
        """Count one group; returns its Psi and distinguishable Psi."""
        correct = np.argsort(state.match[gid]) == true
        distinguishable = ~_duplicated(state, gid)[true]
        hits, hits_d, total_d = int(correct.sum()), int(correct[distinguishable].sum()), int(distinguishable.sum())
        self.hits, self.total = self.hits + hits, self.total + correct.size
        self.hits_distinguishable += hits_d
        self.total_distinguishable += total_d
        return percent(hits, correct.size), percent(hits_d, total_d)


def group_report(state: ResyncState, group: ChannelGroup, tally: PsiTally, true: np.ndarray | None) -> GroupResync:
    stats = state.stats[group.id]
    psi, psi_d = tally.add(state, group.id, true) if true is not None else (None, None)
    return GroupResync(
        id=group.id,
        size=group.size,
        mean_margin=float(stats.margins.mean()),
        min_margin=float(stats.margins.min()),
        ambiguous=int(np.sum(stats.margins < AMBIGUITY_MARGIN)),
        zero_neurons=stats.zero_neurons,
        duplicate_claims=stats.duplicate_claims,
        psi=psi,
        psi_distinguishable=psi_d,
        mean_similarity=stats.mean_similarity,
    )


def key_group(group: ChannelGroup, match: np.ndarray) -> dict[str, Any]:
    """A key entry: the suspect was the output permuted by ``argsort(match)``."""
    members = [
        {"tensor": m.tensor, "axis": m.axis, "role": m.role, "index_map": m.index_map}
        for m in group.members
        if m.is_weight
    ]
    return {"id": group.id, "size": group.size, "members": members, "perm": [int(i) for i in np.argsort(match)]}
