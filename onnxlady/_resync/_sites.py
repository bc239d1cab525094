"""Sites: the weights of a graph as its computation reads them, whichever operators hold them.

Converters rewrite a graph without changing what it computes: ONNX Runtime's optimizer writes
``MatMul`` + ``Add`` as one ``Gemm`` (or ``FusedGemm``, ``FusedMatMul`` with its scale), folds a
BatchNorm into the ``Conv`` before it and a ``Relu`` into ``FusedConv``, a decomposed
LayerNorm and the residual ``Add`` before it into ``SkipLayerNormalization`` (which then also
holds the bias of the linear layer that feeds it), three Q/K/V projections into one packed
``Attention`` weight; int4 quantizers write ``MatMulNBits``. A *site* is one such weight as the
computation uses it, in a *canonical layout* shared by every operator family that computes it:

==================  ===========================================================================
family              canonical operands (token)
==================  ===========================================================================
``dense``           weight ``[out, in]`` (times ``alpha``), bias ``[out]`` (times ``beta``):
                    MatMul with a constant weight and the Add after it, Gemm, FusedGemm,
                    FusedMatMul, MatMulNBits (dequantized), one third of an Attention's packed
                    QKV weight, one piece of a weight concatenated in the graph (onnxoptimizer's
                    ``Concat(Wq, Wk, Wv)``, its product Split); a bias fused into the next
                    SkipLayerNormalization, BiasGelu, FastGelu or MultiHeadAttention (or, past
                    a Reshape, SkipGroupNorm) belongs to its layer
``conv``            weight ``[out, in / group, k...]`` and bias: Conv, FusedConv, NhwcConv
                    (its weight ``[out, k..., in / group]`` transposed); a Conv's weight and
                    bias computed from constants (onnxoptimizer's BatchNorm fold written as
                    arithmetic in the graph, a weight standardized or normalized in the graph;
                    a Gemm's weight likewise) are read evaluated (``Operand.computed``)
``conv-transpose``  weight ``[out, in / group, k...]`` and bias: ConvTranspose (its weight
                    ``[in, out / group, k...]`` transposed per group)
``scale``           a per-channel factor ``[C]``: a LayerNorm's (Skip-, Simplified-, RMS-,
                    EmbedLayer-) scale, a Mul by a channel vector
``shift``           a per-channel offset ``[C]``: a LayerNorm's bias, an Add (or Sub) of a
                    channel vector that is no layer's bias
``table``           an embedding table ``[rows, C]``: Gather, EmbedLayerNormalization's tables
``other``           any other node reading float constants: its operator and their shapes
                    (a recurrent layer's W, R, B and P in the float layout, all-zero optional
                    inputs left out: ``DynamicQuantizeLSTM`` reads as the ``LSTM`` it came from)
==================  ===========================================================================

A linear layer followed by a BatchNormalization keeps it as part of its site
(``Site.batchnorm``), and so with a Mul and an Add of scalar constants right after it
(``Site.post``), so folded and unfolded copies have the same sites. Every operand knows
where it is stored (node, input slot, a block of it) and how its stored layout maps to the
canonical one (a transpose, a factor), both ways: :func:`read_operand` reads it in canonical
layout, :func:`place_operand` writes a canonical value back into the stored layout (so the
suspect's numbers can be compared in the reference's layout).
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._graph._shape_scalars import shape_values
from onnxlady._resync._computed import computed_shape, read_computed
from onnxlady._resync._nchwc_forms import blocked_conv, is_reorder, read_blocked
from onnxlady._resync._quantized_forms import (
    quantized_bias,
    quantized_channel_op,
    quantized_linear,
    quantized_table,
    quantized_tail,
    read_quantized,
)
from onnxlady._resync._values import COMPACT_TYPES, Approx, nbits_layout, read_constant, read_nbits, widened
from onnxlady._rules._derived import slice_cut

__all__ = [
    "Operand",
    "Site",
    "activation_rounding",
    "beyond_factor",
    "find_sites",
    "place_operand",
    "input_scalar",
    "post_affine",
    "read_operand",
    "reading_once",
    "site_operand_axis",
    "stored_operand",
]

MICROSOFT = "com.microsoft"
_STANDARD = ("", "ai.onnx")
_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
)
#: Operators that only change an activation's type: a float16 converter runs a BatchNorm in
#: float32 between two Casts, and the BatchNorm still follows its Conv.
_TYPE_ONLY_OPS = frozenset({"Cast", "Identity"})
#: Operators that only reshape an activation; a scalar Mul or Add commutes with them.
_RESHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
#: Normalisations: (domain, op) -> (scale slot, shift slot or None).
_NORMS: dict[tuple[str, str], tuple[int, int | None]] = {
    ("", "LayerNormalization"): (1, 2),
    ("", "SimplifiedLayerNormalization"): (1, None),  # ONNX Runtime registers it in the ONNX domain
    ("", "RMSNormalization"): (1, None),
    (MICROSOFT, "SkipLayerNormalization"): (2, 3),
    (MICROSOFT, "SkipSimplifiedLayerNormalization"): (2, None),
    (MICROSOFT, "SimplifiedLayerNormalization"): (1, None),
    ("", "GroupNormalization"): (1, 2),  # (opset 18: one scale and shift per group)
    (MICROSOFT, "GroupNorm"): (1, 2),  # ORT's diffusion fusions: gamma and beta per channel
    (MICROSOFT, "SkipGroupNorm"): (1, 2),
}
#: Operators that add a linear layer's bias to its output: (domain, op) -> (data slots, bias slot).
_BIAS_HOSTS: dict[tuple[str, str], tuple[tuple[int, ...], int]] = {
    (MICROSOFT, "SkipLayerNormalization"): ((0, 1), 4),
    (MICROSOFT, "SkipSimplifiedLayerNormalization"): ((0, 1), 4),
    (MICROSOFT, "BiasGelu"): ((0,), 1),
    (MICROSOFT, "FastGelu"): ((0,), 1),
    (MICROSOFT, "BiasAdd"): ((0,), 1),
    (MICROSOFT, "SkipGroupNorm"): ((0, 3), 4),
}


@dataclass(frozen=True)
class Operand:
    """One constant a site reads, and how its stored layout maps to the canonical one.

    The value as the node reads it (``read_shape``; for ``MatMulNBits`` the dequantized
    ``[N, blocks, bytes, values per byte]``) is cut to ``block`` (axis, start, stop), its axes
    reordered by ``axes`` (``np.transpose``), reshaped to ``shape`` and multiplied by
    ``factor``.
    """

    role: str  # "weight", "bias", "scale", "shift", "table", "bn1".."bn4", "post", "post_shift", "c0"...
    node: int
    slot: int
    read_shape: tuple[int, ...]
    shape: tuple[int, ...]
    block: tuple[int, int, int] | None = None
    axes: tuple[int, ...] | None = None
    factor: float = 1.0
    nbits: bool = False
    #: Integers of ONNX Runtime's QOperator or dynamic form, read dequantized by their node
    #: (:func:`~onnxlady._resync._quantized_forms.read_quantized`).
    quantized: bool = False
    #: A weight or bias of ONNX Runtime's NCHWc layout, read un-blocked and cut to the true
    #: channels by its node (:func:`~onnxlady._resync._nchwc_forms.read_blocked`); no canonical
    #: axis is one axis of what is stored.
    blocked: bool = False
    #: The shape the cut value is reshaped to before ``axes`` reorders it: a grouped
    #: ConvTranspose weight ``[in, out / group, k...]`` read as ``[group, in / group, out /
    #: group, k...]``, so that its output channels become one canonical axis. No canonical
    #: axis is then one axis of what is stored.
    split: tuple[int, ...] | None = None
    #: A float tensor the graph computes from constants alone (onnxoptimizer's BatchNorm fold
    #: written as arithmetic on the Conv's weight and bias), read by evaluating that computation
    #: (:func:`~onnxlady._resync._computed.read_computed`); its axes move with the constants
    #: it is made of (:func:`~onnxlady._resync._computed.computed_use`).
    computed: bool = False

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def _cut_shape(self) -> tuple[int, ...]:
        shape = list(self.read_shape)
        if self.block is not None:
            axis, start, stop = self.block
            shape[axis] = stop - start
        return tuple(shape)

    def read_axis(self, canonical_axis: int) -> int | None:
        """The axis of the value as read that canonical axis ``canonical_axis`` is, if one is."""
        if self.nbits:
            return 0 if canonical_axis == 0 else None
        if self.blocked or self.split is not None:
            return None
        cut = self._cut_shape()
        moved = tuple(cut[a] for a in self.axes) if self.axes is not None else cut
        if moved == self.shape:
            return self.axes[canonical_axis] if self.axes is not None else canonical_axis
        wide = [axis for axis, size in enumerate(cut) if size != 1]
        if len(self.shape) == 1 and len(wide) == 1:  # a vector read as [1, C, 1, 1]
            return wide[0]
        if self.axes is None and tuple(cut[axis] for axis in wide) == self.shape:  # unit axes left out
            return wide[canonical_axis]
        return None


@dataclass(frozen=True)
class Site:
    """One weight-reading computation, in canonical form (see the module docstring)."""

    node: int  # the node whose weight it is (for a unit: the linear node)
    part: int  # which of the node's sites (an Attention's q, k, v; a LayerNorm's scale, shift)
    family: str
    token: tuple[object, ...]
    operands: tuple[Operand, ...]
    #: The operators that hold it, in order (``("MatMul", "Add")``, ``("Gemm",)``,
    #: ``("Conv", "BatchNormalization")``, ``("MatMul", "SkipLayerNormalization")``).
    ops: tuple[str, ...]
    #: The node whose output is the site's result (the bias Add or BatchNorm of a unit).
    tail: int
    batchnorm: int | None = None
    #: Whether it holds what a permutation moves: a layer, a norm, a table, or another operator
    #: reading a constant the analysis permutes. Constant tables nothing permutes (a rotary
    #: embedding's cos/sin, which exporters write in many forms) pair if they can, but do not
    #: count for or against the confidence.
    weighs: bool = True
    #: Affine steps after the layer (``("mul" | "scale" | "add" | "sub" | "shift", node, slot)``;
    #: ``"scale"`` and ``"shift"`` are per output channel, their constants the operands ``"post"``
    #: and ``"post_shift"``), folded into its weight and bias wherever they are compared.
    post: tuple[tuple[str, int, int], ...] = ()
    #: Some graph output depends on it (dead code pairs with dead code; a simplifier removes it).
    live: bool = True
    #: A scalar step past the Reshapes and Transposes that alone read its result, which
    #: converters treat differently (see :func:`_scalar_beyond`): ``("mul", node, constant's
    #: slot)`` or ``("alpha", node, -1)``. Not folded in: compared per pair, on the evidence.
    beyond: tuple[str, int, int] | None = None
    #: Parallel convolutions summed with this one over its input, which the other model holds
    #: re-parameterised into this layer's one kernel (RepVGG's deploy form): read merged, see
    #: :mod:`onnxlady._resync._branch_merges`. Set by the matching, never by :func:`find_sites`.
    branches: tuple[Site, ...] = ()
    #: Where an identity branch summed with it enters, ``(BatchNormalization, 0)``: merged in
    #: as a unit kernel with that BatchNorm folded.
    identity: tuple[int, int] | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.node, self.part)

    @property
    def size(self) -> int:
        """Elements of its operands: how much of the model it holds."""
        return sum(operand.size for operand in self.operands)

    def operand(self, role: str) -> Operand | None:
        return next((operand for operand in self.operands if operand.role == role), None)

    @property
    def lone_batchnorm(self) -> bool:
        """A BatchNormalization of its own, read as the per-channel 1x1 convolution it computes.

        Made by the matching where the other model holds it so (ONNX Runtime's NCHWc layout
        writes such a BatchNorm as a depthwise 1x1 Conv): its ``weight`` and ``bias`` operands
        store gamma and beta, but the layer it stands for has weight ones and bias zeros, and
        the BatchNorm folds into them (``Site.batchnorm`` is the site's own node).
        """
        return self.batchnorm is not None and self.batchnorm == self.node

    @property
    def form(self) -> str:
        """How the model writes it: ``MatMul+Add``, ``FusedConv``, ``Attention[1]``..."""
        text = "+".join(self.ops)
        return f"{text}[{self.part}]" if self.part and self.family in ("dense", "table") else text


# -- reading and writing operands -------------------------------------------------------------
#: Within :func:`reading_once`: values read without bounds, by (graph id, operand), with their graph.
_SHARED_READS: contextvars.ContextVar[dict[tuple[int, Operand], tuple[ModelGraph, Approx | None]] | None] = (
    contextvars.ContextVar("onnxlady_shared_reads", default=None)
)


@contextmanager
def reading_once() -> Generator[None, None, None]:
    """Within it, each operand read without bounds is read once, and every reader gets that read.

    Resync across conversions reads every weight for the matching's signatures, then again for
    the solver: converting a model's weights to float64 twice costs as much as the rest of the
    pairing. Readers must treat what they get as read-only (they all do: signatures, folding
    and the solver make new arrays). What was read is let go when the block ends.
    """
    token = _SHARED_READS.set({} if _SHARED_READS.get() is None else _SHARED_READS.get())
    try:
        yield
    finally:
        _SHARED_READS.reset(token)


def read_operand(graph: ModelGraph, operand: Operand, bounds: bool = True, compact: bool = False) -> Approx | None:
    """An operand's value in canonical layout, with its storage error bound.

    Args:
        graph: the model holding it.
        operand: one of a site's operands.
        bounds: compute the bound (see :func:`~onnxlady._resync._values.read_constant`);
            without, the value carries none (its ``error`` reads zeros), and within
            :func:`reading_once` it is read once for all its readers.
        compact: without bounds, the value may come in a narrower type that float64 holds
            exactly (``read_constant``'s ``compact``: float32, float16), a read-only array: for
            readers that convert what they compute with
            (:func:`~onnxlady._resync._values.widened`). Otherwise it is float64.

    Returns:
        The value, or None when it cannot be read as numbers (computed, packed otherwise).
    """
    shared = _SHARED_READS.get() if not bounds else None
    if shared is None:
        return _read_operand(graph, operand, bounds, compact and not bounds)
    key = (id(graph), operand)
    if key not in shared:  # the graph is kept with its value: its id is not reused meanwhile
        # Kept compact: whole float64 copies of both models' weights were most of a resync's memory.
        shared[key] = (graph, _read_operand(graph, operand, bounds, compact=True))
    value = shared[key][1]
    return value if compact or value is None else widened(value)


def _read_operand(graph: ModelGraph, operand: Operand, bounds: bool, compact: bool = False) -> Approx | None:
    if operand.nbits:
        full = read_nbits(graph, operand.node)
        if full is None or full.value.shape != operand.read_shape:
            return None
        rows = slice(operand.block[1], operand.block[2]) if operand.block is not None else slice(None)
        n, k = operand.read_shape[0], operand.shape[1]
        if not bounds:
            return Approx(full.value.reshape(n, -1)[rows, :k])
        return Approx(full.value.reshape(n, -1)[rows, :k], full.error.reshape(n, -1)[rows, :k])
    name = graph.nodes[operand.node].input[operand.slot]
    if operand.quantized:
        full = read_quantized(graph, operand.node, operand.slot)
    elif operand.computed:
        full = read_computed(graph, name, bounds)
    elif operand.blocked:
        full = read_blocked(graph, operand.node, operand.slot)
    else:
        # Compact only where nothing computes on it here (a factor scales in float64, as read).
        full = read_constant(graph, name, bounds, compact=compact and operand.factor == 1.0)  # ruff: ignore[float-equality-comparison] - exactly 1: no scaling to do
    if full is None or full.value.shape != operand.read_shape:
        return None
    if not bounds:  # what the forms' own readers computed is left behind, as no bound is wanted
        value = full.value
        if operand.block is not None:
            axis, start, stop = operand.block
            value = np.take(value, range(start, stop), axis=axis)
        part = Approx(value)
    else:
        value, error = full.value, full.full_error()  # the bound itself where it is whole: writable like the value
        if operand.block is not None:
            axis, start, stop = operand.block
            value, error = np.take(value, range(start, stop), axis=axis), np.take(error, range(start, stop), axis=axis)
        part = Approx(value, error)
    if operand.split is not None:
        part = part.reshaped(operand.split)
    if operand.axes is not None:
        part = part.transposed(operand.axes)
    part = part.reshaped(operand.shape)
    return part.scaled(operand.factor) if operand.factor != 1.0 else part  # ruff: ignore[float-equality-comparison] - exactly 1: no scaling to do


def post_affine(graph: ModelGraph, site: Site, shifts: bool = True) -> tuple[Approx, Approx] | None:
    """The affine steps after a layer combined: ``y -> scale * y + shift``.

    1-element, or per output channel (``[C]``) when a step is a per-channel scale (kind
    ``"scale"``: timm's layer scale ``gamma * (x @ W + b)``, which onnxslim folds into the
    weight and bias) or shift (kind ``"shift"``: NoNorm's ``b``). Without ``shifts``, per-channel
    shifts are left out. None when the site has no step (left in), or one cannot be read.
    """
    steps = [step for step in site.post if shifts or step[0] != "shift"]
    if not steps:
        return None
    scale, shift = Approx(np.ones(1), np.zeros(1)), Approx(np.zeros(1), np.zeros(1))
    for kind, node, slot in steps:
        read = _step_read(graph, graph.nodes[node].input[slot])
        if read is None:
            return None
        value, error = read.value.reshape(-1), np.broadcast_to(read.error, read.value.shape).reshape(-1)
        if kind in ("mul", "scale"):
            scale = Approx(scale.value * value, scale.error * np.abs(value) + np.abs(scale.value) * error)
            shift = Approx(shift.value * value, shift.error * np.abs(value) + np.abs(shift.value) * error)
        else:
            sign = -1.0 if kind == "sub" else 1.0
            shift = Approx(shift.value + sign * value, shift.error + error)
    return scale, shift


def place_operand(operand: Operand, canonical: Approx, value: np.ndarray, error: np.ndarray) -> None:
    """Write a canonical value into ``value``/``error`` where the operand is stored.

    ``value``/``error`` are shaped ``operand.read_shape``: the inverse of :func:`read_operand`.
    """
    part = canonical.scaled(1.0 / operand.factor) if operand.factor != 1.0 else canonical  # ruff: ignore[float-equality-comparison] - exactly 1: no scaling to undo
    if operand.nbits:  # rows of [N, blocks, bytes, values per byte], K padded to whole blocks
        rows = slice(operand.block[1], operand.block[2]) if operand.block is not None else slice(None)
        _, blocks, width, per_byte = operand.read_shape
        count = part.value.shape[0]
        padded_value = np.zeros((count, blocks * width * per_byte))
        padded_error = np.zeros_like(padded_value)
        padded_value[:, : operand.shape[1]] = part.value
        padded_error[:, : operand.shape[1]] = np.broadcast_to(part.error, part.value.shape)
        value[rows] = padded_value.reshape((count, *operand.read_shape[1:]))
        error[rows] = padded_error.reshape((count, *operand.read_shape[1:]))
        return
    part = _stored_layout(operand, part)
    index: list[slice] = [slice(None)] * len(operand.read_shape)
    if operand.block is not None:
        axis, start, stop = operand.block
        index[axis] = slice(start, stop)
    value[tuple(index)] = part.value
    error[tuple(index)] = part.error


def _stored_layout(operand: Operand, part: Approx) -> Approx:
    """A canonical value (its factor already undone) in the operand's stored axes (its cut shape)."""
    cut = operand._cut_shape()
    if operand.axes is not None:
        moved = operand.split if operand.split is not None else cut
        stored = part.reshaped(tuple(moved[a] for a in operand.axes)).transposed(tuple(np.argsort(operand.axes)))
        return stored.reshaped(cut) if operand.split is not None else stored
    return part.reshaped(cut)


def stored_operand(operand: Operand, canonical: Approx) -> Approx | None:
    """A canonical value as the operand stores it, when it fills all of what its node reads.

    What :func:`place_operand` writes into zeroed arrays of ``operand.read_shape``, without
    them: the same numbers, as writable C-contiguous float64 arrays (the zeroed arrays and
    their filling cost seconds on a 100 MB model). ``canonical`` must be what
    :func:`read_operand` read (or computed from it): its arrays are fresh, owned by no model
    (see :func:`~onnxlady._resync._values.read_constant`), so where they already are in the
    stored layout they are returned as they are, not copied. None for an operand that fills
    only a block of what is read, or a packed ``MatMulNBits`` weight (use :func:`place_operand`).
    """
    if operand.nbits or operand.block is not None:
        return None
    if operand.factor != 1.0:  # ruff: ignore[float-equality-comparison] - exactly 1: no scaling to undo
        # Undone in float64, as on the float64 read (a compact partner read is converted first).
        canonical = widened(canonical).scaled(1.0 / operand.factor)
    part = _stored_layout(operand, canonical)
    if part.value.shape != operand.read_shape:
        return None
    if not part.bounded and part.value.dtype in COMPACT_TYPES and not (operand.quantized or operand.blocked):
        # A compact read (read_operand's ``compact``) stays compact, C-contiguous as the float64
        # one would be made; its readers convert what they compute with and never write it.
        return Approx(np.ascontiguousarray(part.value))
    if operand.quantized or operand.blocked:  # read by their own readers: copied, whatever those keep
        value = np.array(part.value, dtype=np.float64, order="C")
        return Approx(value, np.array(part.error, dtype=np.float64, order="C")) if part.bounded else Approx(value)
    return Approx(_writable(part.value), _writable(part.error)) if part.bounded else Approx(_writable(part.value))


def _writable(array: np.ndarray) -> np.ndarray:
    """``array`` as a writable C-contiguous float64 array: itself when it is one, else a copy."""
    if array.dtype == np.float64 and array.flags.c_contiguous and array.flags.writeable:
        return array
    return np.array(array, dtype=np.float64, order="C")


def site_operand_axis(graph: ModelGraph, operand: Operand, canonical_axis: int) -> tuple[int, slice] | None:
    """Where a canonical axis of an operand sits in its stored leaf: (leaf axis, range of it).

    None when the axis is not one axis of the leaf (a MatMulNBits weight's packed input axis).
    """
    read = operand.read_axis(canonical_axis)
    if read is None or operand.computed:  # no leaf: see computed_use
        return None
    name = graph.nodes[operand.node].input[operand.slot]
    leaf_axis = graph.leaf_axis(name, read) if not operand.nbits else 0
    if leaf_axis is None:
        return None
    if operand.block is not None and operand.block[0] == read:
        return leaf_axis, slice(operand.block[1], operand.block[2])
    return leaf_axis, slice(None)


# -- helpers ----------------------------------------------------------------------------------
#: Stored types an initializer read as it is (no chain) holds real numbers in (numpy kind "f"),
#: and types it holds integers in: told from the type, without reading (and keeping) the values.
_REAL_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})
_INTEGER_TYPES = frozenset({
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
})  # fmt: skip


def _float_constant(graph: ModelGraph, name: str) -> bool:
    """A constant operand whose values are real numbers (weights, scales), not indices or shapes."""
    leaf = graph.constant_leaf(name) if name else None
    tensor = graph.leaf_tensor_or_none(leaf) if leaf is not None else None
    if leaf is None or tensor is None:
        return False
    if not leaf.chain and leaf.constant_node is None:
        # Read whole, a weight would stay in the graph's cache of values for the whole command.
        if tensor.data_type in _REAL_TYPES:
            return True
        if tensor.data_type in _INTEGER_TYPES:
            return False
    value = graph.constant_value(name)
    return value is not None and value.dtype.kind == "f"


def _shape(graph: ModelGraph, name: str) -> tuple[int, ...] | None:
    return graph.constant_shape(name) if _float_constant(graph, name) else None


def _single_consumer(graph: ModelGraph, name: str, accept: tuple[str, ...]) -> tuple[int, int] | None:
    """The only reader of ``name`` (through Casts) if its operator is one of ``accept``.

    None when anything on the way is a graph output. A ``Shape`` or ``Size`` the graph folds
    (a static shape) reads no value: a converter removes it, so it is no reader here.
    """
    while True:
        readers = graph.consumers.get(name, [])
        if len(readers) > 1:
            readers = [reader for reader in readers if not _folded_shape_reader(graph, reader[0])]
        if len(readers) != 1 or name in graph.graph_outputs:
            return None
        index, slot = readers[0]
        node = graph.nodes[index]
        if slot >= 0 and node.op_type in accept:
            return index, slot
        rounded = activation_rounding(graph, index) if slot == 0 else None
        if rounded is not None:
            name = rounded
            continue
        if slot != 0 or not (node.op_type in _TYPE_ONLY_OPS or is_reorder(node)) or len(node.output) != 1:
            return None
        name = node.output[0]


def _folded_shape_reader(graph: ModelGraph, index: int) -> bool:
    """Whether node ``index`` is a ``Shape`` or ``Size`` that a converter knowing the shapes folds.

    Its input's shape is static (the graph folded it), or its readers pick known dims out of it
    (the head size, the last axis of q, with a dynamic batch): see :mod:`onnxlady._graph._shape_scalars`.
    """
    node = graph.nodes[index]
    if node.op_type not in ("Shape", "Size") or (node.domain or "") not in _STANDARD:
        return False
    return node.output[0] in graph.folded or shape_values(graph).known_shape_read(index)


def activation_rounding(graph: ModelGraph, index: int) -> str | None:
    """The DequantizeLinear output when node ``index`` is a per-tensor QuantizeLinear read only by it.

    A QDQ quantizer rounds the activation between a layer and its bias Add (MatMul -> Q -> DQ
    -> Add): with one scale for the whole tensor that rounding is element-wise and acts alike
    on every neuron, so the bias still belongs to the layer.
    """
    node = graph.nodes[index]
    if node.op_type != "QuantizeLinear" or len(node.output) != 1 or node.output[0] in graph.graph_outputs:
        return None
    scale = graph.constant_shape(node.input[1]) if len(node.input) > 1 else None
    if scale is None or int(np.prod(scale, dtype=np.int64)) != 1:
        return None
    readers = graph.consumers.get(node.output[0], [])
    if len(readers) != 1 or readers[0][1] != 0:
        return None
    dequantize = graph.nodes[readers[0][0]]
    if dequantize.op_type != "DequantizeLinear" or len(dequantize.output) != 1:
        return None
    return dequantize.output[0]


def _vector_operand(graph: ModelGraph, index: int, slot: int, size: int, role: str, factor: float = 1.0,
                    block: tuple[int, int, int] | None = None) -> Operand | None:
    """A float constant input read as a vector of ``size`` (or a block of one)."""
    node = graph.nodes[index]
    if slot >= len(node.input) or not node.input[slot]:
        return None
    shape = _shape(graph, node.input[slot])
    if shape is None:
        return None
    if block is not None:
        if len(shape) != 1 or block[2] > shape[0] or block[2] - block[1] != size:
            return None
    elif int(np.prod(shape)) != size or sum(d != 1 for d in shape) > 1:
        return None
    return Operand(role, index, slot, shape, (size,), block=block, factor=factor)


def _channel_vector(graph: ModelGraph, name: str) -> int | None:
    """The size of a float constant that varies along one axis only (a per-channel vector)."""
    shape = _shape(graph, name)
    if shape is None:
        return None
    wide = [d for d in shape if d != 1]
    return wide[0] if len(wide) == 1 and wide[0] > 1 else None


# -- linear layers ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Linear:
    family: str
    weight: Operand
    extra: tuple[object, ...]  # token beyond the canonical weight shape (conv groups)
    #: A weight concatenated in the graph from constants along its output neurons (see
    #: :func:`_concatenated_weight`): each piece's own weight, in order. ``weight`` itself is
    #: then no constant, and the layer is a site only where its parts are these pieces.
    pieces: tuple[Operand, ...] | None = None


def _linear(graph: ModelGraph, index: int) -> _Linear | None:
    """A node computing a linear map of its input with a constant weight, in canonical form."""
    node = graph.nodes[index]
    op, domain = node.op_type, node.domain or ""
    if len(node.input) < 2:
        return None
    weight_name = node.input[1]
    if (op == "Conv" and domain in _STANDARD) or (op == "FusedConv" and domain == MICROSOFT):
        shape = _shape(graph, weight_name)
        computed = shape is None and op == "Conv"  # onnxoptimizer's BatchNorm fold: computed in the graph
        shape = computed_shape(graph, weight_name) if computed else shape
        if shape is None or len(shape) < 3:
            return None
        weight = Operand("weight", index, 1, shape, shape, computed=computed)
        return _Linear("conv", weight, (int(node_attribute(node, "group", 1)),))
    if op == "NhwcConv" and domain == MICROSOFT:  # ORT's diffusion optimizer: W [out, k..., in / group]
        shape = _shape(graph, weight_name)
        if shape is None or len(shape) < 3:
            return None
        axes = (0, len(shape) - 1, *range(1, len(shape) - 1))
        canonical = tuple(shape[a] for a in axes)
        return _Linear("conv", Operand("weight", index, 1, shape, canonical, axes=axes), (int(node_attribute(node, "group", 1)),))
    blocked = blocked_conv(graph, index)  # ONNX Runtime's NCHWc layout (ORT_ENABLE_ALL on x86)
    if blocked is not None:
        return _Linear("conv", Operand("weight", index, 1, blocked.shape, blocked.shape, blocked=True), (blocked.group,))
    if op == "ConvTranspose" and domain in _STANDARD:
        shape = _shape(graph, weight_name)
        group = int(node_attribute(node, "group", 1))
        if shape is None or len(shape) < 3 or group < 1 or shape[0] % group:
            return None
        if group == 1:
            axes = (1, 0, *range(2, len(shape)))
            return _Linear("conv-transpose", Operand("weight", index, 1, shape, tuple(shape[a] for a in axes), axes=axes), ())
        return _Linear("conv-transpose", _grouped_transpose_weight(index, shape, group), (group,))
    if (op == "Gemm" and domain in _STANDARD) or (op == "FusedGemm" and domain == MICROSOFT):
        shape = _shape(graph, weight_name)
        computed = shape is None and op == "Gemm"  # normalized in the graph (weight norm), like a Conv's
        shape = computed_shape(graph, weight_name) if computed else shape
        if shape is None or len(shape) != 2 or _float_constant(graph, node.input[0]):
            return None
        alpha = float(node_attribute(node, "alpha", 1.0))
        if int(node_attribute(node, "transB", 0)):
            return _Linear("dense", Operand("weight", index, 1, shape, shape, factor=alpha, computed=computed), ())
        canonical = (shape[1], shape[0])
        return _Linear("dense", Operand("weight", index, 1, shape, canonical, axes=(1, 0), factor=alpha, computed=computed), ())
    if op == "MatMul" and domain in _STANDARD:
        left, right = (_float_constant(graph, name) for name in node.input[:2])
        transposed = _transposed_weight(graph, index) if not left and not right else None
        if transposed is not None:  # a tied LM head, torch's in_proj: MatMul(x, Transpose(W [N, K]))
            return _Linear("dense", transposed, ())
        if not left and not right:  # onnxoptimizer's fuse_qkv: MatMul(x, Concat(Wq, Wk, Wv))
            return _concatenated_weight(graph, index)
        if left == right:
            return None
        if right:
            shape = _shape(graph, weight_name)
            if shape is None or len(shape) != 2:
                return None
            return _Linear("dense", Operand("weight", index, 1, shape, (shape[1], shape[0]), axes=(1, 0)), ())
        shape = _shape(graph, node.input[0])
        if shape is None or len(shape) != 2:
            return None
        return _Linear("dense", Operand("weight", index, 0, shape, shape), ())
    if op == "FusedMatMul" and domain == MICROSOFT:
        shape = _shape(graph, weight_name)
        if (shape is None or len(shape) != 2 or _float_constant(graph, node.input[0])
                or int(node_attribute(node, "transBatchB", 0))):  # fmt: skip
            return None
        alpha = float(node_attribute(node, "alpha", 1.0))
        if int(node_attribute(node, "transB", 0)):
            return _Linear("dense", Operand("weight", index, 1, shape, shape, factor=alpha), ())
        return _Linear("dense", Operand("weight", index, 1, shape, (shape[1], shape[0]), axes=(1, 0), factor=alpha), ())
    if op == "MatMulNBits" and domain == MICROSOFT:
        layout = nbits_layout(node)
        leaf = graph.constant_leaf(weight_name)
        if layout is None or leaf is None or leaf.chain or len(node.input) < 3 or not graph.is_constant(node.input[2]):
            return None
        n, k, bits, block, blocks = layout
        read_shape = (n, blocks, block * bits // 8, 8 // bits)
        return _Linear("dense", Operand("weight", index, 1, read_shape, (n, k), nbits=True), ())
    integer = quantized_linear(graph, index)  # ONNX Runtime's QOperator and dynamic forms
    if integer is not None:
        weight = Operand("weight", index, integer.slot, integer.shape, integer.canonical, axes=integer.axes,
                         factor=integer.factor, quantized=True)  # fmt: skip
        return _Linear(integer.family, weight, integer.extra)
    return None


def _grouped_transpose_weight(index: int, shape: tuple[int, ...], group: int) -> Operand:
    """A grouped ConvTranspose's weight ``[in, out / group, k...]`` as ``[out, in / group, k...]``.

    Output channel ``g * (out / group) + j`` reads ``W[g * (in / group) : (g + 1) * (in / group), j]``:
    in that canonical form its weight is a row, as a grouped Conv's, and a BatchNorm after it
    folds along canonical axis 0 (as ONNX Runtime's ConvBnFusion folds it).
    """
    per_in, per_out, kernel = shape[0] // group, shape[1], tuple(shape[2:])
    canonical = (group * per_out, per_in, *kernel)
    if canonical == shape:  # depthwise, one output per input channel: stored as it reads
        return Operand("weight", index, 1, shape, canonical)
    split = (group, per_in, per_out, *kernel)
    axes = (0, 2, 1, *range(3, len(split)))
    return Operand("weight", index, 1, shape, canonical, axes=axes, split=split)


def _transposed_weight(graph: ModelGraph, index: int) -> Operand | None:
    """The weight of ``MatMul(x, Transpose(W))``, W a 2-D float constant ``[N, K]`` read there alone.

    The analysis binds such a weight at the Transpose (its input slot 0), as ``W`` is stored:
    already the canonical ``[out, in]``.
    """
    produced = graph.producer.get(graph.nodes[index].input[1])
    if produced is None:
        return None
    transpose = graph.nodes[produced[0]]
    if transpose.op_type != "Transpose" or (transpose.domain or "") not in _STANDARD or not transpose.input:
        return None
    shape = _shape(graph, transpose.input[0])
    perm = [int(p) for p in node_attribute(transpose, "perm", [1, 0])]
    if shape is None or len(shape) != 2 or perm != [1, 0] or len(graph.consumers.get(transpose.output[0], [])) != 1:
        return None
    return Operand("weight", produced[0], 0, shape, shape)


def _concatenated_weight(graph: ModelGraph, index: int) -> _Linear | None:
    """``MatMul(x, Concat(W1 .. Wn, axis=1))``, each ``Wi`` a 2-D float constant ``[K, Ni]``, read there alone.

    onnxoptimizer's ``fuse_qkv`` packs the Q, K and V projections that read one input so, and
    Splits the product: each piece is a layer of its own, as in the unpacked graph, its weight
    stored where it was (the analysis binds each at the Concat, see
    :func:`~onnxlady._rules._derived.derived_uses`).
    """
    node = graph.nodes[index]
    name = node.input[1]
    produced = graph.producer.get(name)
    if produced is None or name in graph.graph_outputs or len(graph.consumers.get(name, [])) != 1:
        return None
    concat = graph.nodes[produced[0]]
    if concat.op_type != "Concat" or (concat.domain or "") not in _STANDARD or len(concat.input) < 2:
        return None
    shapes = [_shape(graph, piece) if piece else None for piece in concat.input]
    if any(shape is None or len(shape) != 2 for shape in shapes) or int(node_attribute(concat, "axis", 0)) % 2 != 1:
        return None
    rows = {shape[0] for shape in shapes if shape is not None}
    if len(rows) != 1:
        return None
    pieces = tuple(Operand("weight", produced[0], slot, shape, (shape[1], shape[0]), axes=(1, 0))
                   for slot, shape in enumerate(shapes) if shape is not None)  # fmt: skip
    total, inner = sum(piece.shape[0] for piece in pieces), rows.pop()
    return _Linear("dense", Operand("weight", index, 1, (inner, total), (total, inner), axes=(1, 0)), (), pieces)


def _concatenated_bias(graph: ModelGraph, add: int, slot: int, linear: _Linear) -> list[Operand] | None:
    """The biases of a concatenated weight's pieces, where its Add adds a ``Concat`` of one per piece.

    ``Add(MatMul(x, Concat(Wq, Wk, Wv)), Concat(bq, bk, bv))``: each bias a 1-D float constant as
    wide as its piece, the Concat read by that Add alone.
    """
    name = graph.nodes[add].input[slot]
    produced = graph.producer.get(name)
    if linear.pieces is None or produced is None or name in graph.graph_outputs or len(graph.consumers.get(name, [])) != 1:
        return None
    concat = graph.nodes[produced[0]]
    if concat.op_type != "Concat" or (concat.domain or "") not in _STANDARD or len(concat.input) != len(linear.pieces):
        return None
    found = []
    for position, (piece, weight) in enumerate(zip(concat.input, linear.pieces)):
        shape = _shape(graph, piece) if piece else None
        if shape is None or shape != (weight.shape[0],):
            return None
        found.append(Operand("bias", produced[0], position, shape, shape))
    return found


def _piece_weights(linear: _Linear, parts: list[_Part] | None) -> list[Operand] | None:
    """The pieces of a concatenated weight (:func:`_concatenated_weight`) that its parts are, one each.

    None where a part spans more or less than one piece (the product is then cut elsewhere).
    """
    if linear.pieces is None or not parts or len(parts) != len(linear.pieces):
        return None
    start = 0
    for part, piece in zip(parts, linear.pieces):
        if (part.start, part.stop) != (start, start + piece.shape[0]):
            return None
        start = part.stop
    return list(linear.pieces)


def _own_bias(graph: ModelGraph, index: int, size: int) -> Operand | None:
    node = graph.nodes[index]
    op = node.op_type
    if blocked_conv(graph, index) is not None:
        present = len(node.input) > 2 and bool(node.input[2])
        return Operand("bias", index, 2, (size,), (size,), blocked=True) if present else None
    computed = computed_shape(graph, node.input[2]) if op == "Conv" and len(node.input) > 2 else None
    if computed is not None:  # a BatchNorm folded in by graph arithmetic (see _linear)
        if int(np.prod(computed)) != size or sum(d != 1 for d in computed) > 1:
            return None
        return Operand("bias", index, 2, computed, (size,), computed=True)
    if op in ("Conv", "FusedConv", "ConvTranspose", "NhwcConv"):
        return _vector_operand(graph, index, 2, size, "bias")
    if op in ("Gemm", "FusedGemm"):
        if len(node.input) > 2 and node.input[2]:
            shape = _shape(graph, node.input[2])
            if shape is None or shape[-1:] != (size,) or any(d != 1 for d in shape[:-1]):
                return None
            return _vector_operand(graph, index, 2, size, "bias", float(node_attribute(node, "beta", 1.0)))
        return None
    if op == "MatMulNBits":
        return _vector_operand(graph, index, 5, size, "bias")
    return None


def _out_size(linear: _Linear) -> int:
    return linear.weight.shape[0]


def _is_bias_add(graph: ModelGraph, add: onnx.NodeProto, slot: int, linear: _Linear, rank_known: int | None) -> bool:
    """The Add's other operand is a constant over the layer's output channels only."""
    shape = _shape(graph, add.input[1 - slot])
    if shape is None:
        return False
    channels = _out_size(linear)
    if linear.family == "dense":
        return shape[-1:] == (channels,) and all(d == 1 for d in shape[:-1])
    rank = rank_known if rank_known is not None else len(linear.weight.read_shape)
    if len(shape) > rank:
        return False
    aligned = (1,) * (rank - len(shape)) + tuple(shape)
    return aligned[1] == channels and all(d == 1 for axis, d in enumerate(aligned) if axis != 1)


@dataclass
class _Unit:
    linear: _Linear
    bias: Operand | None
    ops: list[str]
    tail: int
    batchnorm: int | None = None
    #: A packed projection's parts (Q, K, V written as one MatMul and split afterwards).
    parts: list[_Part] | None = None
    #: Scalar Mul / Add / Sub right after the layer, which simplifiers fold into its weights.
    post: list[tuple[str, int, int]] | None = None
    #: A concatenated weight's biases, one per piece, added as a Concat (:func:`_concatenated_bias`).
    bias_pieces: list[Operand] | None = None


@dataclass
class _Part:
    """Output neurons ``start:stop`` of a packed layer, the bias added to them alone, its end."""

    start: int
    stop: int
    bias: Operand | None
    tail: int
    ops: list[str]
    #: Scalar Mul / Add / Sub after the part (onnx-simplifier packs Whisper's scaled query so).
    post: tuple[tuple[str, int, int], ...] = ()


def _split_sizes(graph: ModelGraph, node: onnx.NodeProto, total: int) -> list[int] | None:
    """The sizes a Split cuts, from its input, its attribute or its number of outputs."""
    if len(node.input) > 1 and node.input[1]:
        value = graph.constant_value(node.input[1])
        sizes = None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
    else:
        sizes = [int(v) for v in node_attribute(node, "split", [])] or None
    if sizes is None:
        count = len(node.output)
        sizes = [total // count] * count if count and total % count == 0 else None
    return sizes if sizes is not None and sum(sizes) == total and all(v > 0 for v in sizes) else None


def _slice_blocks(graph: ModelGraph, name: str, size: int) -> list[tuple[int, int, int]] | None:
    """The Slices that cut ``name``'s last axis (``size`` neurons) into blocks covering it once, as (start, stop, node).

    Every reader of ``name`` must be such a Slice (step 1, constant or folded bounds, no other axis
    cut) or a Shape; None otherwise, or where the blocks overlap, leave a gap or are fewer than two.
    """
    rank = graph.rank(name)
    if not rank or name in graph.graph_outputs:
        return None
    blocks = []
    for index, slot in graph.consumers.get(name, []):
        node = graph.nodes[index] if index >= 0 else None
        if node is None or slot != 0 or (node.domain or "") not in _STANDARD:
            return None
        if node.op_type == "Shape":
            continue
        block = slice_cut(graph, node, rank - 1) if node.op_type == "Slice" else None
        if block is None:
            return None
        blocks.append((*block, index))
    blocks.sort()
    edges = [0, *(stop for _, stop, _ in blocks)]
    if len(blocks) < 2 or edges[-1] != size or any(start != edge for (start, _, _), edge in zip(blocks, edges)):
        return None
    return blocks


def _part(graph: ModelGraph, linear: _Linear, start: int, stop: int, host: int, name: str, absorbed: set[int]) -> _Part:
    """Neurons ``start:stop`` of a packed layer, cut by node ``host`` into ``name``, with its own bias and scalars."""
    width = stop - start
    node = graph.nodes[host]
    part = _Part(start, stop, None, host, [node.op_type])
    reader = _single_consumer(graph, name, ("Add",)) if name else None
    if reader is not None and reader[1] in (0, 1):
        add = graph.nodes[reader[0]]
        operand = _vector_operand(graph, reader[0], 1 - reader[1], width, "bias")
        constant = _shape(graph, add.input[1 - reader[1]])
        if operand is not None and constant is not None and constant[-1:] == (width,):
            part.bias, part.tail = operand, reader[0]
            part.ops.append("Add")
            absorbed.add(reader[0])
    if name:
        end = graph.nodes[part.tail].output[0] if part.tail != host else name
        steps = _scalar_affine(graph, end, set(), linear)
        if steps and all(kind != "scale" for kind, _, _ in steps):  # scalars only: a part has its own width
            part.post = tuple(steps)
            part.ops.extend(graph.nodes[step].op_type for _, step, _ in steps)
            part.tail = steps[-1][1]
            absorbed.update(step for _, step, _ in steps)
    return part


def _packed_parts(graph: ModelGraph, linear: _Linear, tail: str, absorbed: set[int]) -> list[_Part] | None:
    """The parts of a layer whose output is split along its neurons right away.

    A simplifier packs the Q, K and V projections that read one input into one MatMul and a
    Split (onnx-simplifier does); ONNX Runtime GenAI's builder feeds one packed projection to
    GroupQueryAttention. Each part is then a layer of its own, as in the unpacked graph, with
    the bias an Add right after its Split output holds.
    """
    if linear.family != "dense":
        return None
    size = _out_size(linear)
    reader = _single_consumer(graph, tail, ("Split", "GroupQueryAttention"))
    if reader is None:  # GPT-2's Gemm reshapes [tokens, 3 x width] back to [batch, length, 3 x width] first
        beyond = _reshaped_keeping_last(graph, tail, size)
        if beyond != tail:
            reader, tail = _single_consumer(graph, beyond, ("Split",)), beyond
    if reader is None:
        sliced = _slice_blocks(graph, tail, size)
        if sliced is None:
            return None
        # The legacy torch exporter chunks in_proj's output with Slices (bounds from folded Shape
        # arithmetic) where the dynamo exporter writes a Split: the same parts.
        return [_part(graph, linear, start, stop, index, graph.nodes[index].output[0], absorbed) for start, stop, index in sliced]
    host, slot = reader
    node = graph.nodes[host]
    rank = graph.rank(tail)
    if node.op_type == "Split" and (node.domain or "") in _STANDARD and slot == 0 and rank:
        if int(node_attribute(node, "axis", 0)) % rank != rank - 1:
            return None
        sizes = _split_sizes(graph, node, size)
        if sizes is None or len(sizes) != len(node.output):
            return None
        parts, start = [], 0
        for width, name in zip(sizes, node.output):
            parts.append(_part(graph, linear, start, start + width, host, name, absorbed))
            start += width
        return parts
    if node.op_type == "GroupQueryAttention" and node.domain == MICROSOFT and slot == 0:
        if len(node.input) > 1 and node.input[1]:
            return None  # separate Q, K and V
        heads, kv_heads = int(node_attribute(node, "num_heads", 0)), int(node_attribute(node, "kv_num_heads", 0))
        if heads <= 0 or kv_heads <= 0 or size % (heads + 2 * kv_heads):
            return None
        head_size = size // (heads + 2 * kv_heads)
        bounds = [0, heads * head_size, (heads + kv_heads) * head_size, size]
        return [_Part(a, b, None, host, ["GroupQueryAttention"]) for a, b in itertools.pairwise(bounds)]
    return None


def _units(graph: ModelGraph) -> tuple[dict[int, _Unit], set[int], set[tuple[int, int]]]:
    """Every linear layer with its bias and BatchNorm.

    Also the nodes absorbed into them (bias Adds, BatchNorms) and the bias inputs of fused operators
    they claimed.
    """
    units: dict[int, _Unit] = {}
    absorbed: set[int] = set()
    claimed: set[tuple[int, int]] = set()
    for index in graph.order:
        linear = _linear(graph, index)
        if linear is None:
            continue
        node = graph.nodes[index]
        size = _out_size(linear)
        unit = _Unit(linear, _own_bias(graph, index, size), [node.op_type], index)
        if linear.pieces is not None:  # (so a conversion finding names the form: Concat+MatMul+Split)
            unit.ops.insert(0, "Concat")
            kept = (set(absorbed), set(claimed))  # restored where the parts are not the pieces
        tail = node.output[0]
        if linear.weight.quantized:
            tail = _quantized_unit(graph, index, unit, absorbed)
        if unit.bias is None:
            reader = _single_consumer(graph, tail, ("Add", *(op for _, op in _BIAS_HOSTS), "MultiHeadAttention"))
            if reader is None and linear.family == "dense":
                # ORT's SkipGroupNorm fusion moves a projection's bias past its Reshape to [N, H, W, C].
                beyond = _reshaped_keeping_last(graph, tail, size)
                reader = _single_consumer(graph, beyond, ("SkipGroupNorm",)) if beyond != tail else None
            if reader is not None:
                host, slot = reader
                host_node = graph.nodes[host]
                key = (host_node.domain or "", host_node.op_type)
                if host_node.op_type == "Add" and key[0] in _STANDARD and slot in (0, 1):
                    operand = _vector_operand(graph, host, 1 - slot, size, "bias")
                    if operand is not None and _is_bias_add(graph, host_node, slot, linear, graph.rank(tail)):
                        unit.bias = operand
                    elif operand is None:
                        unit.bias_pieces = _concatenated_bias(graph, host, 1 - slot, linear)
                    if unit.bias is not None or unit.bias_pieces is not None:
                        unit.ops.append("Add")
                        unit.tail = host
                        absorbed.add(host)
                        tail = host_node.output[0]
                elif key in _BIAS_HOSTS and slot in _BIAS_HOSTS[key][0]:
                    bias_slot = _BIAS_HOSTS[key][1]
                    operand = _vector_operand(graph, host, bias_slot, size, "bias")
                    if operand is not None and (host, bias_slot) not in claimed:
                        unit.bias = operand
                        unit.ops.append(host_node.op_type)
                        claimed.add((host, bias_slot))
                elif host_node.op_type == "MultiHeadAttention" and key[0] == MICROSOFT and slot in (0, 1, 2):
                    operand = _vector_operand(graph, host, 3, size, "bias", block=(0, slot * size, (slot + 1) * size))
                    if operand is not None and _shape(graph, host_node.input[3]) == (3 * size,):
                        unit.bias = operand
                        unit.ops.append("MultiHeadAttention")
                        claimed.add((host, 3))
        unit.parts = _packed_parts(graph, linear, tail, absorbed)
        if linear.pieces is not None and _piece_weights(linear, unit.parts) is None:
            # A concatenated weight is no constant: a site only where each part is one piece.
            absorbed, claimed = kept
            continue
        foldable_ops = ("Conv", "ConvTranspose", "Gemm", "QLinearConv", "ConvInteger")
        if unit.parts is None and node.op_type in foldable_ops and (node.domain or "") in _STANDARD:
            foldable = node.op_type != "Gemm" or graph.rank(node.output[0]) == 2
            reader = _single_consumer(graph, tail, ("BatchNormalization",)) if foldable else None
            if reader is not None and reader[1] == 0:
                if all(_vector_operand(graph, reader[0], slot, size, "bn") is not None for slot in range(1, 5)):
                    unit.batchnorm = reader[0]
                    unit.ops.append("BatchNormalization")
                    unit.tail = reader[0]
                    absorbed.add(reader[0])
        if unit.parts is None and linear.family in ("conv", "dense"):
            unit.post = _scalar_affine(graph, graph.nodes[unit.tail].output[0], absorbed, linear, unit.bias is not None)
            if unit.post:
                unit.ops.extend(graph.nodes[node].op_type for _, node, _ in unit.post)
                unit.tail = unit.post[-1][1]
        units[index] = unit
    return units, absorbed, claimed


def _quantized_unit(graph: ModelGraph, index: int, unit: _Unit, absorbed: set[int]) -> str:
    """An integer layer of ONNX Runtime's quantizer: where its float result is, its bias.

    The Cast and scale Mul after a MatMulInteger / ConvInteger (or the DequantizeLinear after a
    QLinear layer) are part of the layer; the bias is the layer's own int32 input or the
    constant operand of the QLinearAdd after it. Returns the name of the float result.
    """
    tail = graph.nodes[index].output[0]
    after = quantized_tail(graph, index)
    if after is not None:
        nodes, ops = after
        absorbed.update(nodes)
        unit.ops.extend(ops)
        unit.tail = nodes[-1]
        tail = graph.nodes[nodes[-1]].output[0]
    held = quantized_bias(graph, index, _out_size(unit.linear)) if unit.bias is None else None
    if held is not None and (held[0] == index or after is None):
        host, slot, shape = held
        unit.bias = Operand("bias", host, slot, shape, (_out_size(unit.linear),), quantized=True)
        if host != index:
            unit.ops.append(graph.nodes[host].op_type)
            unit.tail = host
            absorbed.add(host)
            tail = graph.nodes[host].output[0]
    return tail


def _scalar_affine(
    graph: ModelGraph, name: str, absorbed: set[int], linear: _Linear, biased: bool = False
) -> list[tuple[str, int, int]]:
    """A Mul by a scalar constant and an Add (or Sub) of one, each optional, right after a layer.

    ``(kind, node, constant's slot)`` each. onnx-simplifier folds the Mul into the layer's
    weight and bias (Paddle's exporter writes MobileOne's branch scales this way). The Mul may
    also be by a constant over the layer's output channels (kind ``"scale"``): timm's layer
    scale, which onnxslim folds into the weight and bias as a BatchNorm is. The Add may be of
    one too (kind ``"shift"``, only where the layer has a bias, ``biased``): MobileBERT's NoNorm
    ``y * w + b``, whose Mul and Add onnxslim folds into the weight and that bias (or the Mul
    alone, the Add kept: both forms then have the same sites).
    """
    found: list[tuple[str, int, int]] = []
    for kinds in (("Mul",), ("Add", "Sub")):
        reader = _single_consumer(graph, name, kinds)
        reshaped = False
        if reader is None:  # a scalar commutes with a reshape: ORT's MatMulAddFusion puts one before the Mul
            beyond = _past_reshapes(graph, name)
            reader = _single_consumer(graph, beyond, kinds) if beyond != name else None
            reshaped = True
        if reader is None or reader[1] not in (0, 1):
            continue
        node = graph.nodes[reader[0]]
        other = 1 - reader[1]
        value = _step_value(graph, node.input[other]) if len(node.input) == 2 else None
        if value is None or value.dtype.kind != "f" or (node.op_type == "Sub" and other != 1):
            continue
        kind = node.op_type.lower()
        if value.size != 1 and reshaped and not (
            # A per-channel scale past Reshapes that keep the channels last (ORT's MatMulAddFusion
            # writes a 3-D MatMul + Add as Reshape, Gemm, Reshape): each channel stays where it was.
            # A QDQ quantizer rounds the activation on the way (Reshape -> Q -> DQ -> Mul): per tensor, alike
            # on every channel.
            linear.family == "dense"
            and _past_rounding(graph, _reshaped_keeping_last(graph, name, _out_size(linear))) == node.input[reader[1]]
        ):
            continue
        if value.size != 1:
            size = _out_size(linear)
            # A per-channel shift folds into the bias: only a layer with one has a counterpart for it.
            shift = node.op_type == "Add" and biased
            per_channel = (node.op_type == "Mul" or shift) and size > 1 and value.size == size
            if not per_channel or not _is_bias_add(graph, node, reader[1], linear, graph.rank(name)):
                continue
            kind = "scale" if node.op_type == "Mul" else "shift"
        found.append((kind, reader[0], other))
        absorbed.add(reader[0])
        name = node.output[0]
    return found


#: Operators whose output a scalar Mul right after belongs to (a layer's scalar step, see ``post``).
_LAYER_ENDS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul",
                         "BatchNormalization", "Add"})  # fmt: skip


def input_scalar(graph: ModelGraph, site: Site) -> float | None:
    """The scalar constant a layer's input is multiplied by right before it, or None.

    GELU's trailing ``0.5`` before the next layer is one, which onnx-simplifier folds into that
    layer's weight. Only a Mul whose product nothing else reads (through reshapes), and that
    does not directly follow another layer (then it is that layer's scalar step).
    """
    if site.family not in ("conv", "dense") or site.part != 0:
        return None
    name = graph.nodes[site.node].input[0]
    while True:
        produced = graph.producer.get(name)
        if produced is None or name in graph.graph_outputs or len(graph.consumers.get(name, [])) != 1:
            return None
        node = graph.nodes[produced[0]]
        if node.op_type not in _RESHAPE_OPS or (node.domain or "") not in _STANDARD:
            break
        name = node.input[0]
    if node.op_type != "Mul" or (node.domain or "") not in _STANDARD or len(node.input) != 2:
        return None
    for slot in (0, 1):
        value = graph.constant_value(node.input[slot])
        if value is not None and value.dtype.kind == "f" and value.size == 1:
            data = graph.producer.get(node.input[1 - slot])
            if data is None or graph.nodes[data[0]].op_type in _LAYER_ENDS:
                return None
            factor = float(value.reshape(-1)[0])
            return factor if np.isfinite(factor) and abs(factor) > 0.0 else None
    return None


def _step_read(graph: ModelGraph, name: str) -> Approx | None:
    """A scalar step's constant as read, with its bound: stored, or computed from shapes (:func:`_step_value`)."""
    read = read_constant(graph, name)
    if read is None and name:
        shape = computed_shape(graph, name, shapes=True)
        if shape is not None and int(np.prod(shape)) == 1:  # a scalar; computed weights are read as operands
            read = read_computed(graph, name, shapes=True)
    return read


def _step_value(graph: ModelGraph, name: str) -> np.ndarray | None:
    """The constant of a step after a layer: stored, or one float the graph computes from constants and shapes.

    torch's MultiheadAttention scales q and k^T by a scalar computed at run time from the head
    size (``Shape -> Slice -> Cast -> Sqrt -> Div -> Sqrt``); a converter that knows the shapes
    folds it into a stored constant, kept in a Mul or folded into a projection's weight
    (onnxslim). Read as the constant it folds to, the step is the same on both sides. The head
    size is known with a dynamic batch too (:mod:`onnxlady._graph._shape_scalars`); where a dim
    the scalar needs is not known, nothing is evaluated and there is no step (no guess).
    """
    value = graph.constant_value(name)
    if value is not None or not name:
        return value
    read = _step_read(graph, name)
    return read.value if read is not None and read.value.size == 1 and read.value.dtype.kind == "f" else None


def _past_reshapes(graph: ModelGraph, name: str) -> str:
    """The tensor after a chain of reshapes that alone read ``name`` (or ``name`` itself)."""
    while True:
        reader = _single_consumer(graph, name, _RESHAPE_OPS)
        if reader is None or reader[1] != 0 or len(graph.nodes[reader[0]].output) != 1:
            return name
        name = graph.nodes[reader[0]].output[0]


def _past_moves(graph: ModelGraph, name: str) -> str:
    """The tensor after a chain of reshapes and Transposes that alone read ``name`` (or ``name`` itself).

    They only move elements: a scalar step after them acts on every element as right after the layer.
    """
    while True:
        reader = _single_consumer(graph, name, (*_RESHAPE_OPS, "Transpose"))
        if reader is None or reader[1] != 0 or len(graph.nodes[reader[0]].output) != 1:
            return name
        if (graph.nodes[reader[0]].domain or "") not in _STANDARD:
            return name
        name = graph.nodes[reader[0]].output[0]


def _scalar_beyond(graph: ModelGraph, name: str) -> tuple[str, int, int] | None:
    """A scalar step past the moves that alone read a layer's result ``name`` (``Site.beyond``).

    HF's eager attention scales q after splitting its heads (Reshape, Transpose, Mul by
    ``d ** -0.25``). A scalar commutes with moves: onnxslim folds it into q's weight and bias
    (SegFormer's one-head stage, held-out round 14 F2), ONNX Runtime moves it into the scores'
    ``FusedMatMul`` (its ``alpha``), others keep it. So it is not read as the layer's step on
    both sides (ONNX Runtime's copy would then differ): the resync decides per pair, from the
    values, and a ``FusedMatMul`` with an ``alpha`` past the moves counts as a step held there
    (``("alpha", node, -1)``). A Mul past reshapes alone is the layer's ``post`` step already;
    one the next layer reads is that layer's input scalar (:func:`input_scalar`).
    """
    beyond = _past_moves(graph, name)
    reader = _single_consumer(graph, beyond, ("Mul", "FusedMatMul"))
    if reader is None or reader[1] not in (0, 1):
        return None
    node = graph.nodes[reader[0]]
    if node.op_type == "FusedMatMul":
        alpha = float(node_attribute(node, "alpha", 1.0))
        return ("alpha", reader[0], -1) if node.domain == MICROSOFT and alpha != 1.0 else None  # ruff: ignore[float-equality-comparison] - exactly 1: no step
    if (node.domain or "") not in _STANDARD or len(node.input) != 2 or beyond == _past_reshapes(graph, name):
        return None
    value = _step_value(graph, node.input[1 - reader[1]])
    if value is None or value.dtype.kind != "f" or value.size != 1 or not np.all(np.isfinite(value)):
        return None
    if _reads_as_input(graph, node.output[0]):
        return None  # the next layer's input scalar
    return ("mul", reader[0], 1 - reader[1])


def _reads_as_input(graph: ModelGraph, name: str) -> bool:
    """Whether a layer reads ``name`` (through reshapes that alone read it) as its input: see :func:`input_scalar`."""
    while True:
        readers = graph.consumers.get(name, [])
        if len(readers) != 1 or name in graph.graph_outputs or readers[0][1] != 0:
            return False
        node = graph.nodes[readers[0][0]]
        if node.op_type not in _RESHAPE_OPS or (node.domain or "") not in _STANDARD:
            return _linear(graph, readers[0][0]) is not None
        name = node.output[0]


def beyond_factor(graph: ModelGraph, site: Site) -> float | None:
    """The factor of a site's Mul past the moves (its ``beyond`` step of kind ``"mul"``), or None."""
    if site.beyond is None or site.beyond[0] != "mul":
        return None
    value = _step_value(graph, graph.nodes[site.beyond[1]].input[site.beyond[2]])
    return float(np.asarray(value).reshape(-1)[0]) if value is not None else None


def _past_rounding(graph: ModelGraph, name: str) -> str:
    """The tensor after the per-tensor activation roundings (Q -> DQ) that alone read ``name``."""
    while True:
        readers = graph.consumers.get(name, [])
        if len(readers) != 1 or readers[0][1] != 0 or name in graph.graph_outputs:
            return name
        rounded = activation_rounding(graph, readers[0][0])
        if rounded is None:
            return name
        name = rounded


def _reshaped_keeping_last(graph: ModelGraph, name: str, size: int) -> str:
    """The tensor after Reshapes of ``name`` (last axis ``size``) whose constant targets end in ``size``.

    Row-major order keeps an element's index along a last axis of the same length on both sides,
    so each neuron stays where it was.
    """
    while True:
        reader = _single_consumer(graph, name, ("Reshape",))
        if reader is None or reader[1] != 0:
            return name
        node = graph.nodes[reader[0]]
        target = graph.constant_value(node.input[1]) if len(node.input) > 1 else None
        if target is None or target.size == 0 or int(np.asarray(target).reshape(-1)[-1]) != size:
            return name
        name = node.output[0]


def _unit_sites(graph: ModelGraph, index: int, unit: _Unit) -> list[Site]:
    """A layer's site, or one per part of a packed layer."""
    if not unit.parts:
        return [_unit_site(graph, index, unit)]
    weight = unit.linear.weight
    axis = weight.read_axis(0)
    assert axis is not None
    pieces = _piece_weights(unit.linear, unit.parts)
    sites = []
    for number, part in enumerate(unit.parts):
        width = part.stop - part.start
        if pieces is not None:
            operands = [pieces[number]]
        else:
            operands = [replace(weight, shape=(width, *weight.shape[1:]), block=(axis, part.start, part.stop))]
        bias = part.bias if unit.bias_pieces is None else unit.bias_pieces[number]
        if bias is None and unit.bias is not None and len(unit.bias.read_shape) == 1 and unit.bias.block is None:
            bias = replace(unit.bias, shape=(width,), block=(0, part.start, part.stop))
        if bias is not None:
            operands.append(bias)
        token = ("dense", (width, *weight.shape[1:]))
        sites.append(Site(index, number, "dense", token, tuple(operands), (*unit.ops, *part.ops), part.tail,
                          post=part.post))  # fmt: skip
    return sites


def _unit_site(graph: ModelGraph, index: int, unit: _Unit) -> Site:
    linear = unit.linear
    operands = [linear.weight]
    if unit.bias is not None:
        operands.append(unit.bias)
    if unit.batchnorm is not None:
        size = _out_size(linear)
        for slot in range(1, 5):
            operand = _vector_operand(graph, unit.batchnorm, slot, size, f"bn{slot}")
            assert operand is not None
            operands.append(operand)
    for kind, node, slot in unit.post or ():
        if kind in ("scale", "shift"):  # per channel: folds like a BatchNorm; compared as is where both keep it
            step = _vector_operand(graph, node, slot, _out_size(linear), "post" if kind == "scale" else "post_shift")
            assert step is not None
            operands.append(step)
    token = (linear.family, linear.weight.shape, *linear.extra)
    beyond = _scalar_beyond(graph, graph.nodes[unit.tail].output[0]) if linear.family in ("conv", "dense") else None
    return Site(index, 0, linear.family, token, tuple(operands), tuple(unit.ops), unit.tail, unit.batchnorm,
                post=tuple(unit.post or ()), beyond=beyond)  # fmt: skip


# -- operators holding several sites ----------------------------------------------------------
def _attention_sites(graph: ModelGraph, index: int) -> list[Site]:
    """com.microsoft Attention: its packed weight ``[in, q + k + v]`` is three dense layers."""
    node = graph.nodes[index]
    if len(node.input) < 2:
        return []
    shape = _shape(graph, node.input[1])
    if shape is None or len(shape) != 2:
        return []
    sizes = [int(s) for s in node_attribute(node, "qkv_hidden_sizes", [])] or [shape[1] // 3] * 3
    if sum(sizes) != shape[1]:
        return []
    bias_shape = _shape(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sites = []
    start = 0
    for part, size in enumerate(sizes):
        block = (1, start, start + size)
        operands = [Operand("weight", index, 1, shape, (size, shape[0]), block=block, axes=(1, 0))]
        if bias_shape == (shape[1],):
            operands.append(Operand("bias", index, 2, bias_shape, (size,), block=(0, start, start + size)))
        sites.append(Site(index, part, "dense", ("dense", (size, shape[0])), tuple(operands), ("Attention",), index))
        start += size
    return sites


def _embed_sites(graph: ModelGraph, index: int) -> list[Site]:
    """com.microsoft EmbedLayerNormalization: word, position, segment tables, then a LayerNorm."""
    node = graph.nodes[index]
    sites = []
    # Positions given by no input or by a constant (slot 8): the position rows read are fixed, as
    # an unfused graph's Gather of the table by a constant range, which is computed from constants
    # and no site. So the position table pairs where it can but does not weigh.
    positions = node.input[8] if len(node.input) > 8 else ""
    fixed_positions = not positions or graph.constant_leaf(positions) is not None
    for part, slot in enumerate((2, 3, 4)):
        shape = _shape(graph, node.input[slot]) if len(node.input) > slot and node.input[slot] else None
        if shape is not None and len(shape) == 2:
            operand = Operand("table", index, slot, shape, shape)
            weighs = not (slot == 3 and fixed_positions)
            sites.append(Site(index, part, "table", ("table", shape), (operand,), (node.op_type,), index, weighs=weighs))
    for part, (slot, role) in ((3, (5, "scale")), (4, (6, "shift"))):
        sites.extend(_vector_site(graph, index, slot, role, part))
    return sites


def _vector_site(graph: ModelGraph, index: int, slot: int, role: str, part: int, factor: float = 1.0) -> list[Site]:
    node = graph.nodes[index]
    if slot >= len(node.input) or not node.input[slot]:
        return []
    size = _channel_vector(graph, node.input[slot])
    if size is None:
        return []
    operand = _vector_operand(graph, index, slot, size, role, factor)
    if operand is None:
        return []
    # A scale of ones or a shift of zeros does nothing (an untrained norm's): a simplifier may
    # remove it, so it pairs where both models keep it but does not count against them.
    value = graph.constant_value(node.input[slot])
    identity = value is not None and bool(np.all(value == (1.0 if role == "scale" else 0.0)))  # ruff: ignore[float-equality-comparison] - exactly the identity (scale 1, bias 0) is what a converter removes
    return [Site(index, part, role, (role, size), (operand,), (node.op_type,), index, weighs=not identity)]


# -- sites ------------------------------------------------------------------------------------
#: Recurrent layers: (domain, op) -> whether W and R are ONNX Runtime's 8-bit transposed form
#: (``DynamicQuantizeLSTM``: ``[dirs, in, 4*H]`` and ``[dirs, H, 4*H]``, dequantized by the
#: scales and zero points at slots 8 to 11), which reads as the float LSTM it came from.
_RECURRENT: dict[tuple[str, str], bool] = {
    ("", "LSTM"): False, ("", "GRU"): False, ("", "RNN"): False, (MICROSOFT, "DynamicQuantizeLSTM"): True,
}  # fmt: skip
#: Optional inputs of a recurrent layer whose absence means zeros: B, initial_h, initial_c, P.
_ZERO_WHEN_ABSENT = (3, 5, 6, 7)


def _recurrent_site(graph: ModelGraph, index: int, computed: set[str], planned: set[str]) -> list[Site]:
    """An LSTM, GRU, RNN or DynamicQuantizeLSTM: its W, R, B and P in the float LSTM's layout.

    An optional input that is all zeros is left out, as an absent one means zeros: onnx-simplifier
    drops the zero initial states an exporter writes, and the layer computes the same. A
    ``DynamicQuantizeLSTM``'s W and R are read dequantized and transposed back to ``[dirs, 4*H,
    in]``, so the quantized layer is the same site as the float LSTM (token ``LSTM``).
    """
    node = graph.nodes[index]
    quantized = _RECURRENT[(MICROSOFT if node.domain == MICROSOFT else "", node.op_type)]
    operands: list[Operand] = []
    shapes: list[tuple[int, tuple[int, ...]]] = []
    for slot, name in enumerate(node.input[:8]):
        if not name or slot in (0, 4):  # the sequence and its lengths are activations
            continue
        if quantized and slot in (1, 2):
            stored = graph.constant_shape(name)
            if stored is None or len(stored) != 3:
                return []
            operand = Operand(f"c{len(operands)}", index, slot, stored, (stored[0], stored[2], stored[1]),
                              axes=(0, 2, 1), quantized=True)  # fmt: skip
            operands.append(operand)
            shapes.append((slot, operand.shape))
            continue
        shape = _operand_shape(graph, name, computed)
        if shape is None:
            continue
        if slot in _ZERO_WHEN_ABSENT:
            value = graph.constant_value(name)
            if value is not None and not np.any(value):
                continue
        operands.append(Operand(f"c{len(operands)}", index, slot, shape, shape))
        shapes.append((slot, shape))
    return _other_site(graph, index, "", "LSTM" if quantized else node.op_type, operands, shapes, planned)


def _operand_shape(graph: ModelGraph, name: str, computed: set[str], planned: set[str] | None = None) -> tuple[int, ...] | None:
    """The shape of a constant operand a generic or recurrent site reads, if it is one and holds more than one number.

    A float constant, one the analysis permutes (``planned``: integer one-hot tables too), or a
    float tensor computed from constants alone (``computed``, its shape statically known).
    """
    leaf = graph.constant_leaf(name) if planned is not None else None
    shape: tuple[int, ...] | None = None
    if _float_constant(graph, name) or (leaf is not None and planned is not None and leaf.name in planned):
        shape = graph.constant_shape(name)
    elif name in computed and graph.dtypes.get(name) in _FLOAT_TYPES:
        found = graph.shape(name)
        if found is not None and all(isinstance(d, int) for d in found):
            shape = tuple(int(d) for d in found)  # type: ignore[arg-type]
    return None if shape is None or int(np.prod(shape)) <= 1 else shape


def _other_site(
    graph: ModelGraph,
    index: int,
    domain: str,
    op_type: str,
    operands: list[Operand],
    shapes: list[tuple[int, tuple[int, ...]]],
    planned: set[str],
) -> list[Site]:
    """The ``other`` site of a node reading ``operands`` (none without), weighing where the analysis permutes one."""
    if not operands:
        return []
    token = ("other", domain, op_type, tuple(shapes))
    weighs = any(
        (leaf := graph.constant_leaf(graph.nodes[index].input[operand.slot])) is not None and leaf.name in planned
        for operand in operands
    )
    return [Site(index, 0, "other", token, tuple(operands), (graph.nodes[index].op_type,), index, weighs=weighs)]


def constant_computed(graph: ModelGraph) -> set[str]:
    """Tensors computed from constants only (a Gather of a constant table at constant indices).

    A simplifier folds them into stored constants, so they count as constants on both sides.
    """
    known = set(graph.initializers) | set(graph.constant_nodes) | set(graph.folded)
    computed: set[str] = set()
    for index in graph.order:
        node = graph.nodes[index]
        if index in graph.implicit_inputs or not node.input or node.op_type.startswith("Random"):
            continue
        if all(not name or name in known or name in computed or graph.is_constant(name) for name in node.input):
            computed.update(name for name in node.output if name)
    return computed


def _generic_site(
    graph: ModelGraph, index: int, computed: set[str], planned: set[str], claimed: set[tuple[int, int]]
) -> list[Site]:
    """Any other node reading numbers: its operator and the shapes of the constants it reads."""
    node = graph.nodes[index]
    operands: list[Operand] = []
    shapes: list[tuple[int, tuple[int, ...]]] = []
    for slot, name in enumerate(node.input):
        if not name or (index, slot) in claimed:  # a layer's bias held here belongs to that layer
            continue
        shape = _operand_shape(graph, name, computed, planned)
        if shape is None:
            continue
        operands.append(Operand(f"c{len(operands)}", index, slot, shape, shape))
        shapes.append((slot, shape))
    return _other_site(graph, index, node.domain or "", node.op_type, operands, shapes, planned)


def _constant_summand_site(graph: ModelGraph, index: int, computed: set[str], planned: set[str]) -> list[Site]:
    """A SkipLayerNormalization summand that is a constant: the ``Add`` site it was fused from.

    BART's learned positions, ``Gather(table, constant positions)``, are a constant computed from
    constants; ONNX Runtime (EXTENDED) folds them and fuses ``Add`` + LayerNorm into
    SkipLayerNormalization with the folded table as its ``skip``. The reference's ``Add`` is a
    generic site reading that constant; here the same site, so the two pair and their values
    are compared (a changed table would otherwise pass unseen).
    """
    key = (graph.nodes[index].domain or "", graph.nodes[index].op_type)
    data = _BIAS_HOSTS.get(key, ((), -1))[0]
    if key not in _NORMS or len(data) != 2:
        return []
    node = graph.nodes[index]
    shapes = {slot: _operand_shape(graph, node.input[slot], computed, planned) for slot in data if slot < len(node.input)}
    constant = [slot for slot, shape in shapes.items() if shape is not None]
    if len(constant) != 1 or len(shapes) != 2:  # one constant summand and one computed
        return []
    slot = constant[0]
    shape = shapes[slot] or ()
    found = _other_site(graph, index, "", "Add", [Operand("c0", index, slot, shape, shape)], [(slot, shape)], planned)
    return [replace(site, part=3) for site in found]  # parts 0 to 2: the scale, shift and bias


def _identity_affine(graph: ModelGraph, index: int) -> bool:
    """Whether a normalisation's scale (slot 1) is all ones and its bias (slot 2) all zeros."""
    node = graph.nodes[index]
    if len(node.input) < 3:
        return False
    scale, bias = graph.constant_value(node.input[1]), graph.constant_value(node.input[2])
    return scale is not None and bias is not None and bool(np.all(scale == 1.0)) and bool(np.all(bias == 0.0))  # ruff: ignore[float-equality-comparison] - exactly the identity


def _channel_op_site(graph: ModelGraph, index: int, computed: set[str] | None = None) -> list[Site] | None:
    """Mul, Add or Sub of a computed tensor and a per-channel constant: a scale or a shift."""
    node = graph.nodes[index]
    if (node.domain or "") not in _STANDARD or node.op_type not in ("Mul", "Add", "Sub") or len(node.input) != 2:
        return None
    constant = [slot for slot, name in enumerate(node.input) if _float_constant(graph, name)]
    if not constant and computed:
        return _folded_channel_site(graph, index, computed)
    if len(constant) != 1 or (node.op_type == "Sub" and constant[0] != 1):
        return None
    role = "scale" if node.op_type == "Mul" else "shift"
    return _vector_site(graph, index, constant[0], role, 0, -1.0 if node.op_type == "Sub" else 1.0) or None


def _folded_channel_site(graph: ModelGraph, index: int, computed: set[str]) -> list[Site] | None:
    """A Mul, Add or Sub by a channel vector computed from constants alone: a scale or shift that does not weigh.

    ConViT's gating ``1 - sigmoid(gating_param)``: ONNX Runtime and the simplifiers fold it into
    a stored vector, which the other model then reads as a scale. Here it is the same site, so
    the two pair; its values are not read, and it counts neither for nor against the match
    (like a layer computed from constants alone).
    """
    node = graph.nodes[index]
    slots = [slot for slot, name in enumerate(node.input) if name in computed and graph.dtypes.get(name) in _FLOAT_TYPES]
    if len(slots) != 1 or (node.op_type == "Sub" and slots[0] != 1):
        return None
    shape = graph.shape(node.input[slots[0]])
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    dims = tuple(int(d) for d in shape)  # type: ignore[arg-type]
    wide = [d for d in dims if d != 1]
    if len(wide) != 1 or wide[0] < 2:
        return None
    role = "scale" if node.op_type == "Mul" else "shift"
    operand = Operand(role, index, slots[0], dims, (wide[0],), factor=-1.0 if node.op_type == "Sub" else 1.0)
    return [Site(index, 0, role, (role, wide[0]), (operand,), (node.op_type,), index, weighs=False)]


def _live_nodes(graph: ModelGraph) -> set[int]:
    """The nodes some graph output depends on: what a simplifier's dead-code removal keeps.

    (ONNX Runtime GenAI's builder can leave a layer whose result no output reads.)
    """
    live: set[int] = set()
    stack = [name for name in graph.graph_outputs if name]
    seen = set(stack)
    while stack:
        produced = graph.producer.get(stack.pop())
        if produced is None or produced[0] in live:
            continue
        live.add(produced[0])
        for name in graph.inputs_of(produced[0]):
            if name[1] and name[1] not in seen:
                seen.add(name[1])
                stack.append(name[1])
    return live | {index for index in range(len(graph.nodes)) if index >= graph.main_count}


def find_sites(graph: ModelGraph, planned: set[str]) -> list[Site]:
    """Every site of a graph, in topological order (a node's parts in order).

    Args:
        graph: the model.
        planned: the constants its analysis permutes (integer ones, like one-hot tables, are
            sites too; other integer constants are shapes and axes, which converters move).

    Returns:
        The sites (those no graph output depends on marked ``live=False``); chain nodes (that
        only carry a constant to its user), nodes computed from constants alone, and the bias
        Adds and BatchNorms absorbed into linear layers are none.
    """
    units, absorbed, claimed = _units(graph)
    computed = constant_computed(graph)
    live = _live_nodes(graph)
    sites: list[Site] = []
    for index in graph.order:
        if index in absorbed:
            continue
        node = graph.nodes[index]
        key = (node.domain or "", node.op_type)
        if index in units:
            found = _unit_sites(graph, index, units[index])
            if node.output and node.output[0] in computed:  # a layer of constants (a positional
                # encoding's projection): a simplifier folds it away, so it does not weigh
                found = [replace(site, weighs=False) for site in found]
            sites.extend(found if index in live else [replace(site, live=False) for site in found])
            continue
        carries_constant = graph.is_chain_node(index) and graph.constant_leaf(node.output[0]) is not None
        if carries_constant or (node.output and node.output[0] in computed):
            continue
        if key == (MICROSOFT, "Attention"):
            found = _attention_sites(graph, index)
        elif key == (MICROSOFT, "EmbedLayerNormalization"):
            found = _embed_sites(graph, index)
        elif node.op_type == "InstanceNormalization" and key[0] in _STANDARD and _identity_affine(graph, index):
            # The legacy export's GroupNorm (scale ones, bias zeros per group): nothing learned
            # here, and a fused GroupNorm has no such constants: pairs where both keep it.
            found = _vector_site(graph, index, 1, "scale", 0) + _vector_site(graph, index, 2, "shift", 1)
        elif key in _NORMS or (key[0] == "ai.onnx" and ("", key[1]) in _NORMS):
            scale, shift = _NORMS.get(key, _NORMS.get(("", key[1]), (1, None)))
            found = _vector_site(graph, index, scale, "scale", 0)
            if shift is not None:
                found += _vector_site(graph, index, shift, "shift", 1)
            bias_slot = _BIAS_HOSTS.get(key, ((), -1))[1]
            if bias_slot >= 0 and (index, bias_slot) not in claimed:
                found = _vector_site(graph, index, bias_slot, "shift", 2) + found
            found = _constant_summand_site(graph, index, computed, planned) + found
        elif key in _RECURRENT or (key[0] == "ai.onnx" and ("", key[1]) in _RECURRENT):
            found = _recurrent_site(graph, index, computed, planned)
        elif key == ("", "Gather") or key == ("ai.onnx", "Gather"):
            shape = _shape(graph, node.input[0])
            table = quantized_table(graph, index) if shape is None else None
            if table is not None:  # integers dequantized after the Gather (ONNX Runtime's dynamic form)
                dequantize, dims = table
                operand = Operand("table", index, 0, dims, dims, quantized=True)
                ops: tuple[str, ...] = (node.op_type,)
                tail = index
                if dequantize is not None:
                    absorbed.add(dequantize)
                    ops, tail = (node.op_type, "DequantizeLinear"), dequantize
                    if len(graph.consumers.get(node.output[0], [])) > 1:  # integer layers read the rows too:
                        tail = index  # the site ends at the Gather, so its connections reach them
                found = [Site(index, 0, "table", ("table", dims), (operand,), ops, tail)]
            elif shape is not None and len(shape) == 2 and int(node_attribute(node, "axis", 0)) == 0:
                found = [Site(index, 0, "table", ("table", shape), (Operand("table", index, 0, shape, shape),),
                              (node.op_type,), index)]  # fmt: skip
            else:
                found = _generic_site(graph, index, computed, planned, claimed)
        else:
            channel = _channel_op_site(graph, index, computed)
            integer = quantized_channel_op(graph, index) if channel is None else None
            if integer is not None:  # QOperator's QLinearMul / QLinearAdd of an integer channel vector
                role, slot, shape, size = integer
                operand = Operand(role, index, slot, shape, (size,), quantized=True)
                channel = [Site(index, 0, role, (role, size), (operand,), (node.op_type,), index)]
            found = channel if channel is not None else _generic_site(graph, index, computed, planned, claimed)
        if key in _BIAS_HOSTS and key not in _NORMS:  # a bias no layer claimed is a shift of its own
            bias_slot = _BIAS_HOSTS[key][1]
            found = [] if (index, bias_slot) in claimed else _vector_site(graph, index, bias_slot, "shift", 0)
        sites.extend(found if index in live else [replace(site, live=False) for site in found])
    return sites
