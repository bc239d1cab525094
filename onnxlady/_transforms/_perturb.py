"""Perturb the weights of a model the way the paper's robustness study does (noise, quantization, pruning).

"Find the Lady" measures how well re-synchronization survives a suspect model that was not
only permuted but also modified. :func:`perturb_model` applies those modifications to an ONNX
model in place, reproducibly, and returns a :class:`PerturbReport` saying what changed.

Which tensors
    Only *weight tensors* are perturbed: input 1 of ``Conv``, ``ConvTranspose`` and ``Gemm`` and
    the constant operand of ``MatMul`` (input 1, else input 0), found through any
    ``Identity``/``Cast`` chain down to the initializer or ``Constant`` node (Paddle style) that
    holds it. Biases, BatchNorm/InstanceNorm parameters and every other constant are NOT
    perturbed. A weight shared by several operators is perturbed once. Tensors are taken in
    graph (topological) order of their first use; :func:`weight_tensors` lists them.

Definitions, for each weight tensor ``t`` with ``n`` elements (computed in float64)
    * **noise OMEGA** (``noise``, OMEGA >= 0): ``t' = t + N(0, (OMEGA * std(t))^2)`` elementwise,
      ``std`` the population standard deviation of ``t``. The normals come from one
      ``numpy.random.default_rng(seed)`` that draws ``n`` standard normals per tensor, tensors in
      graph order, so the same model, parameters and seed give the same result.
    * **quantization B bits** (``quantize_bits``, 1 <= B <= 32): uniform min-max quantization per
      tensor with ``2^B`` levels, ``q = round((t - min) / (max - min) * (2^B - 1))`` (round half to
      even) and ``t' = min + q * (max - min) / (2^B - 1)``. A constant tensor (``max == min``) is
      left alone. B at or above the dtype's precision is still applied (it then changes little
      or nothing).
    * **pruning T %** (``prune_percent``, 0 <= T <= 100): the ``floor(T / 100 * n)`` entries of
      smallest magnitude are set to zero, exactly that many: ties in magnitude are broken by
      position (flat, row-major index, lower first). T is read as the decimal number it prints
      as, so T = 0.3 on 1000 entries zeroes 3 of them.

Combining
    Several perturbations may be requested at once; each tensor then goes through **prune, then
    quantize, then noise**, each step working on the previous step's result (so the noise std
    is that of the pruned and quantized tensor, and quantization may move pruned zeros onto
    the nearest level, since the grid is min-max and not anchored at zero). After each step
    the tensor is rounded to its own dtype, so a combined call gives exactly what separate
    calls in that order (the noise call with the same seed) would give.

Storage
    Values are read with ``onnx.numpy_helper.to_array`` and written back in the tensor's own
    dtype and storage field (``raw_data`` stays ``raw_data``, typed fields stay typed fields);
    float16 and bfloat16 weights are rounded (to nearest even) to their dtype. Only
    float32/float64/float16/bfloat16 weights are supported: integer (already quantized) and
    other weights are refused with :class:`OnnxladyError` naming the tensor, as are weights
    whose external data was not loaded and weights holding NaN or infinity. Every check runs
    before anything is modified, so a refused call leaves the model untouched.

Streaming
    :func:`perturb_streamed` gives the same perturbation as overrides a writer calls as it
    writes each weight (``raw_data`` or a tensor left in its external file), so a model written
    to a file is never perturbed whole in memory: tensors are still perturbed in graph order
    (one noise stream), one at a time when the writer goes in that order. Values are then
    checked as they are reached; a refused weight aborts the write (nothing is written).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from numbers import Integral, Real
from typing import Any

import numpy as np
import onnx
from numpy.random import default_rng  # with the module: numpy loads it lazily, on a command's first draw

from onnxlady._errors import OnnxladyError
from onnxlady._graph._functions import inlined_view
from onnxlady._graph._model_graph import ModelGraph, node_label
from onnxlady._io._external import is_mapped, mapped_array
from onnxlady._io._progress import advance
from onnxlady._io._tensors import all_finite, read_array, tensor_holders

#: Operators whose weight operand (input 1; MatMul's and Einsum's constant one) is perturbed.
WEIGHT_OPS: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")
#: Order in which combined perturbations are applied to each tensor.
STEP_ORDER: tuple[str, ...] = ("prune", "quantize", "noise")
MAX_BITS: int = 32

_FLOAT_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
}
_GROUP_ID = re.compile(r"g\d+")

Detail = dict[str, float | int | bool | None]


@dataclass(frozen=True)
class TensorChange:
    """What one perturbation step did to one weight tensor.

    ``changed_elements`` and ``relative_l2_change`` (``||new - old|| / ||old||``, 0 for an
    all-zero tensor) compare the tensor before and after *this step*, both in the stored dtype.
    ``detail`` holds the step's parameters for this tensor: ``{"std", "sigma"}`` for noise,
    ``{"levels", "scale", "min", "max", "constant"}`` for quantization (``scale`` is the step
    between levels) and ``{"zeroed", "threshold"}`` for pruning (``threshold``: the largest
    magnitude among the zeroed entries, None when none was zeroed).
    """

    tensor: str
    op_type: str
    kind: str  # "noise" | "quantize" | "prune"
    elements: int
    changed_elements: int
    relative_l2_change: float
    detail: Detail


@dataclass
class PerturbReport:
    """Every step applied to every weight tensor, in the order applied, and the parameters."""

    changes: list[TensorChange]
    seed: int
    noise: float | None
    quantize_bits: int | None
    prune_percent: float | None

    @property
    def order(self) -> list[str]:
        """The requested steps in the order they were applied."""
        requested = {"prune": self.prune_percent, "quantize": self.quantize_bits, "noise": self.noise}
        return [step for step in STEP_ORDER if requested[step] is not None]

    @property
    def tensors(self) -> list[str]:
        """The weight tensors that were processed, in graph order."""
        return list(dict.fromkeys(change.tensor for change in self.changes))

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready view (for ``--json`` output and pipelines)."""
        return {
            "seed": self.seed,
            "noise": self.noise,
            "quantize_bits": self.quantize_bits,
            "prune_percent": self.prune_percent,
            "order": self.order,
            "tensors": len(self.tensors),
            "changed_elements": sum(change.changed_elements for change in self.changes),
            "changes": [asdict(change) for change in self.changes],
        }


# -- which tensors ------------------------------------------------------------------------
def weight_tensors(model: onnx.ModelProto, only: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(leaf tensor name, op type) of each weight tensor, deduplicated, in graph order.

    A weight is input 1 of Conv/ConvTranspose/Gemm or the constant operand of MatMul, traced
    through Identity/Cast to its initializer or Constant node; a weight stored as integers
    behind a ``DequantizeLinear`` is listed too (so that :func:`perturb_model` can refuse it).
    ``only`` restricts the list to the weight tensors of the named channel groups (ids ``g0``,
    ``g1``... from :func:`onnxlady.analyze`) and to the named tensors (a leaf name or any name
    that leads to one through Identity/Cast); a name that is neither raises OnnxladyError.
    """
    return _model_weights(model, only)


def _model_weights(model: onnx.ModelProto, only: Sequence[str] | None) -> list[tuple[str, str]]:
    """:func:`_weights` of ``model``, looked for through its local functions' calls.

    The weights of layers inside local functions come in as call inputs: they are found on the
    model with its calls inlined, and only those the model itself holds are kept (a weight
    living inside a function body is one tensor shared by every call site: not perturbed).
    """
    view = inlined_view(model)
    if view is None:
        return _weights(ModelGraph(model, infer_shapes=False), model, only)
    found = _weights(ModelGraph(view.model, infer_shapes=False), model, only)
    return [(name, op_type) for name, op_type in found if name in view.writable]


def _weights(graph: ModelGraph, model: onnx.ModelProto, only: Sequence[str] | None) -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    # The main graph in order, then the operators of opened If/Loop/Scan bodies: a weight read
    # inside a branch is a weight too.
    for index in [*graph.order, *range(graph.main_count, len(graph.nodes))]:
        node = graph.nodes[index]
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        slots: Sequence[int] = (1, 0) if node.op_type == "MatMul" else (1,)
        if node.op_type == "Einsum":  # its constant operands, where it reads a computed one
            constant = [bool(name) and graph.is_constant(name) for name in node.input]
            slots = [slot for slot, is_const in enumerate(constant) if is_const] if not all(constant) else []
        for slot in slots:
            if slot < len(node.input) and node.input[slot]:
                leaf = _weight_leaf(graph, node.input[slot])
                if leaf is not None:
                    found.setdefault(leaf, node.op_type)
                    break
    weights = list(found.items())
    if only is None:
        return weights
    wanted = _resolve_only(graph, model, only, found)
    return [(name, op) for name, op in weights if name in wanted]


def _weight_leaf(graph: ModelGraph, operand: str) -> str | None:
    """The leaf tensor behind a weight operand: through Identity/Cast, or a DequantizeLinear's input."""
    leaf = graph.constant_leaf(operand)
    if leaf is not None:
        return leaf.name
    produced = graph.producer.get(operand)
    if produced is not None:
        node = graph.nodes[produced[0]]
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and node.input:
            quantized = graph.constant_leaf(node.input[0])
            if quantized is not None:
                return quantized.name
    return None


def _resolve_only(
    graph: ModelGraph, model: onnx.ModelProto, only: Sequence[str], weights: dict[str, str]
) -> set[str]:
    """The weight leaves named by ``only`` (group ids and tensor names)."""
    if isinstance(only, str):
        only = [only]
    names = list(only)
    if not names:
        raise OnnxladyError("the list of groups/tensors to perturb is empty")
    group_weights: dict[str, list[str]] | None = None
    wanted: set[str] = set()
    for name in names:
        leaf = graph.constant_leaf(name) if name else None
        if leaf is not None and not _GROUP_ID.fullmatch(name):
            wanted.add(_only_tensor(name, leaf.name, weights))
            continue
        if _GROUP_ID.fullmatch(name):
            if group_weights is None:
                group_weights = _group_weights(model, weights)
            if name in group_weights:
                if not group_weights[name]:
                    raise OnnxladyError(f"group {name} has no Conv/ConvTranspose/Gemm/MatMul weight to perturb")
                wanted.update(group_weights[name])
                continue
            if leaf is not None:  # a tensor that happens to be called like a group id
                wanted.add(_only_tensor(name, leaf.name, weights))
                continue
            raise OnnxladyError(f"no group '{name}' in this model (see 'onnxlady inspect')")
        raise OnnxladyError(f"'{name}' is neither a group id nor a constant tensor of this model")
    return wanted


def _only_tensor(name: str, leaf: str, weights: dict[str, str]) -> str:
    if leaf not in weights:
        raise OnnxladyError(
            f"tensor '{name}' is not a weight of Conv/ConvTranspose/Gemm/MatMul "
            "(biases, normalisation parameters and other constants are never perturbed)"
        )
    return leaf


def _group_weights(model: onnx.ModelProto, weights: dict[str, str]) -> dict[str, list[str]]:
    """Group id -> the weight tensors (source leaf names) among that group's members."""
    # Imported late: the (costly) analysis is only needed when group ids are given.
    from onnxlady._analysis._channels import analyze

    analysis = analyze(model)
    source = {plan.tensor: plan.source for plan in analysis.tensors}
    result: dict[str, list[str]] = {}
    for group in analysis.groups:
        leaves = (source.get(m.tensor, m.tensor) for m in group.members if m.is_weight)
        result[group.id] = list(dict.fromkeys(leaf for leaf in leaves if leaf in weights))
    return result


# -- parameters ---------------------------------------------------------------------------
def _check_parameters(
    noise: float | None, quantize_bits: int | None, prune_percent: float | None, seed: int
) -> tuple[float | None, int | None, float | None, int]:
    if noise is None and quantize_bits is None and prune_percent is None:
        raise OnnxladyError(
            "nothing to perturb: give a noise level, a number of quantization bits or a pruning percent"
        )
    if noise is not None:
        if isinstance(noise, bool) or not isinstance(noise, Real) or not math.isfinite(noise) or noise < 0:
            raise OnnxladyError(f"the noise level must be a finite number >= 0 (got {noise!r})")
        noise = float(noise)
    if quantize_bits is not None:
        if isinstance(quantize_bits, bool) or not isinstance(quantize_bits, Integral) or not (
            1 <= quantize_bits <= MAX_BITS
        ):
            raise OnnxladyError(
                f"the number of quantization bits must be an integer from 1 to {MAX_BITS} (got {quantize_bits!r})"
            )
        quantize_bits = int(quantize_bits)
    if prune_percent is not None:
        if (
            isinstance(prune_percent, bool)
            or not isinstance(prune_percent, Real)
            or not math.isfinite(prune_percent)
            or not 0 <= prune_percent <= 100
        ):
            raise OnnxladyError(f"the pruning percent must be a number from 0 to 100 (got {prune_percent!r})")
        prune_percent = float(prune_percent)
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise OnnxladyError(f"the seed must be an integer >= 0 (got {seed!r})")
    return noise, quantize_bits, prune_percent, int(seed)


# -- perturbation -------------------------------------------------------------------------
def perturb_model(
    model: onnx.ModelProto,
    *,
    noise: float | None = None,
    quantize_bits: int | None = None,
    prune_percent: float | None = None,
    seed: int = 0,
    only: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PerturbReport:
    """Perturb the weight tensors of ``model`` in place and report every step applied.

    The module docstring gives the exact definitions; every step applied to every tensor is
    reported.

    ``only`` restricts the perturbation to the weights of some groups or tensors (see
    :func:`weight_tensors`). Bad parameters, an unsupported weight dtype or a model without
    weights raise :class:`OnnxladyError` before the model is touched.
    """
    noise, quantize_bits, prune_percent, seed = _check_parameters(noise, quantize_bits, prune_percent, seed)
    holders = _holders(model, only)
    values = [holder.read() for holder in holders]  # every check before any change
    steps = _steps(noise, quantize_bits, prune_percent, seed)
    changes: list[TensorChange] = []
    for number, (holder, value) in enumerate(zip(holders, values)):
        advance(progress, "perturbing tensors", number, len(holders))
        new = _perturb_tensor(holder, value, steps, changes)
        if new is not None:
            holder.write(new)
    if progress is not None:
        progress(f"perturbed {len(holders)} weight tensors")
    return PerturbReport(changes, seed, noise, quantize_bits, prune_percent)


def perturb_streamed(
    model: onnx.ModelProto,
    *,
    noise: float | None = None,
    quantize_bits: int | None = None,
    prune_percent: float | None = None,
    seed: int = 0,
    only: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PerturbStream | None:
    """:func:`perturb_model` as overrides a streaming writer computes as it writes each tensor.

    ``model`` is not changed. The result's :attr:`PerturbStream.overrides` give each weight's
    new ``raw_data`` when called; the writer calls them as it writes (see
    :func:`onnxlady._io._stream.write_model` and :func:`onnxlady._io._external.write_external`),
    so only the tensors in flight are held, not a float64 copy of every weight. The file written
    is byte for byte what :func:`perturb_model` and a save give: tensors are still perturbed in
    graph order (the noise stream is drawn in that order), a tensor the writer asks for early
    being computed after those before it, whose results wait for their turn to be written.

    Returns:
        The stream, or ``None`` when a weight is stored where no override reaches it (typed
        fields such as ``float_data``, a Constant's ``value_floats``): then use
        :func:`perturb_model`.

    Raises:
        OnnxladyError: as :func:`perturb_model`, for everything checkable without the values
            (parameters, no weight, a weight dtype); a weight holding NaN or infinity raises
            when the writer reaches it (nothing is then written).
    """
    noise, quantize_bits, prune_percent, seed = _check_parameters(noise, quantize_bits, prune_percent, seed)
    holders = _holders(model, only)
    if not all(holder.streamable() for holder in holders):
        return None
    for number, holder in enumerate(holders):
        if holder.dtype not in _FLOAT_TYPES:
            for earlier in holders[:number]:  # the error perturb_model gives: the first in graph order
                earlier.read()
            holder.read()
    report = PerturbReport([], seed, noise, quantize_bits, prune_percent)
    return PerturbStream(holders, _steps(noise, quantize_bits, prune_percent, seed), report, progress)


class PerturbStream:
    """Weights perturbed one at a time, as a writer asks for them (see :func:`perturb_streamed`)."""

    def __init__(
        self, holders: list[_Holder], steps: list[_Step], report: PerturbReport, progress: Callable[[str], None] | None
    ) -> None:
        self._holders = holders
        self._steps = steps
        self._report = report
        self._progress = progress
        self._next = 0  # the next holder to perturb, in graph order
        self._ready: dict[int, Any] = {}  # stored bytes perturbed but not yet written
        #: Tensor (initializer or Constant output) name -> callable giving its new raw bytes.
        self.overrides: dict[str, Callable[[], Any]] = {
            holder.name: functools.partial(self._stored, number)
            for number, holder in enumerate(holders)
            if holder.element_count() > 0
        }

    def _stored(self, number: int) -> Any:
        self._perturb_through(number)
        return self._ready.pop(number)

    def _perturb_through(self, number: int) -> None:
        while self._next <= number:
            index = self._next
            holder = self._holders[index]
            advance(self._progress, "perturbing tensors", index, len(self._holders))
            value = holder.read()
            new = _perturb_tensor(holder, value, self._steps, self._report.changes)
            if value.size:
                self._ready[index] = holder.original() if new is None else holder.stored(new)
            del value, new
            self._next += 1

    def finish(self) -> PerturbReport:
        """The report, once the writer has written every tensor (any it skipped is perturbed now)."""
        self._perturb_through(len(self._holders) - 1)
        self._ready.clear()
        if self._progress is not None:
            self._progress(f"perturbed {len(self._holders)} weight tensors")
        return self._report


_Step = tuple[str, Callable[[np.ndarray], tuple[np.ndarray, Detail]]]


def _holders(model: onnx.ModelProto, only: Sequence[str] | None) -> list[_Holder]:
    graph = ModelGraph(model, infer_shapes=False)  # the holders are the model's own tensors
    weights = _model_weights(model, only)
    if not weights:
        raise OnnxladyError("the model has no Conv/ConvTranspose/Gemm/MatMul weight tensor to perturb")
    main_graph = tensor_holders(model, subgraphs=False)
    return [_Holder(graph, name, op_type, in_main_graph=name in main_graph) for name, op_type in weights]


def _steps(noise: float | None, quantize_bits: int | None, prune_percent: float | None, seed: int) -> list[_Step]:
    """The requested steps in :data:`STEP_ORDER`; the noise draws from one generator for all tensors."""
    rng = default_rng(seed)
    steps: list[_Step] = []
    if prune_percent is not None:
        steps.append(("prune", functools.partial(_prune, percent=prune_percent)))
    if quantize_bits is not None:
        steps.append(("quantize", functools.partial(_quantize, bits=quantize_bits)))
    if noise is not None:
        steps.append(("noise", functools.partial(_add_noise, omega=noise, rng=rng)))
    return steps


def _perturb_tensor(
    holder: _Holder, value: np.ndarray, steps: list[_Step], changes: list[TensorChange]
) -> np.ndarray | None:
    """Apply every step to one tensor, recording each in ``changes``; the new values, None when unchanged."""
    if value.size == 0:  # nothing to perturb, and min/max/std are undefined
        return None
    current = value
    for kind, step in steps:
        new, detail = step(current)
        new = holder.round(new)  # each step's result is a tensor of the stored dtype
        changes.append(_change(holder.name, holder.op_type, kind, current, new, detail))
        current = new
    return None if np.array_equal(current, value) else current


def _prune(t: np.ndarray, percent: float) -> tuple[np.ndarray, Detail]:
    """Zero exactly floor(percent / 100 * n) smallest-magnitude entries, ties by position."""
    n = t.size
    count = math.floor(Fraction(repr(percent)) * n / 100)
    flat = t.reshape(-1).copy()
    threshold: float | None = None
    if count:
        chosen = np.argsort(np.abs(flat), kind="stable")[:count]
        threshold = float(np.abs(flat[chosen[-1]]))
        flat[chosen] = 0.0
    return flat.reshape(t.shape), {"zeroed": count, "threshold": threshold}


def _quantize(t: np.ndarray, bits: int) -> tuple[np.ndarray, Detail]:
    """Uniform min-max quantization to 2**bits levels; a constant tensor is returned unchanged."""
    low, high = float(t.min()), float(t.max())
    levels = 2**bits
    if high == low:
        return t, {"levels": levels, "scale": 0.0, "min": low, "max": high, "constant": True}
    steps = float(levels - 1)
    q = np.rint((t - low) / (high - low) * steps)
    scale = (high - low) / steps
    return low + q * scale, {"levels": levels, "scale": scale, "min": low, "max": high, "constant": False}


def _add_noise(t: np.ndarray, omega: float, rng: np.random.Generator) -> tuple[np.ndarray, Detail]:
    """T + N(0, (omega * std(t))^2); always draws t.size normals so the stream stays aligned."""
    std = float(np.std(t))
    sigma = omega * std
    draws = rng.standard_normal(t.shape)
    if not sigma > 0:
        return t, {"std": std, "sigma": sigma}
    # In place, t + draws * sigma without a third tensor-sized array (the same values: the
    # product is rounded first either way, and addition commutes).
    draws *= sigma
    draws += t
    return draws, {"std": std, "sigma": sigma}


def _change(tensor: str, op_type: str, kind: str, old: np.ndarray, new: np.ndarray, detail: Detail) -> TensorChange:
    diff = float(np.linalg.norm((new - old).reshape(-1)))
    norm = float(np.linalg.norm(old.reshape(-1)))
    relative = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    return TensorChange(tensor, op_type, kind, int(old.size), int(np.count_nonzero(new != old)), relative, detail)


# -- reading and writing tensors in their own storage -------------------------------------
class _Holder:
    """One weight leaf's storage: an initializer, a Constant's ``value`` or ``value_float(s)``."""

    def __init__(self, graph: ModelGraph, name: str, op_type: str, *, in_main_graph: bool = True) -> None:
        leaf = graph.constant_leaf(name)
        assert leaf is not None
        self.name = name
        self.tensor: onnx.TensorProto | None = None
        self.attribute: onnx.AttributeProto | None = None
        if leaf.constant_node is None:
            self.tensor = graph.initializers[name]
        else:
            node = graph.nodes[leaf.constant_node]
            for attribute in node.attribute:
                if attribute.name == "value":
                    self.tensor = attribute.t
                elif attribute.name in ("value_float", "value_floats"):
                    self.attribute = attribute
                elif attribute.name in ("value_int", "value_ints"):
                    raise OnnxladyError(
                        f"weight '{name}' of {op_type} is an integer Constant "
                        f"('{node_label(node, leaf.constant_node)}'): perturbing integer weights is not supported"
                    )
        self.op_type = op_type
        self.dtype = onnx.TensorProto.FLOAT if self.tensor is None else self.tensor.data_type
        #: Held by the main graph (a streaming writer's overrides reach only those).
        self.in_main_graph = in_main_graph

    def read(self) -> np.ndarray:
        """The values as float64, after checking they can be perturbed and written back."""
        if self.attribute is not None:
            if self.attribute.name == "value_float":
                values = np.array(self.attribute.f, dtype=np.float32)
            else:
                values = np.array(list(self.attribute.floats), dtype=np.float32)
            return self._finite(values.astype(np.float64))
        tensor = self.tensor
        assert tensor is not None
        if tensor.data_type not in _FLOAT_TYPES:
            kind = onnx.helper.tensor_dtype_to_string(tensor.data_type).removeprefix("TensorProto.")
            raise OnnxladyError(
                f"weight '{self.name}' of {self.op_type} is stored as {kind}: only float32, float64, "
                "float16 and bfloat16 weights can be perturbed (integer, already quantized weights are out of scope)"
            )
        return self._finite(np.asarray(read_array(tensor, f"weight '{self.name}'")).astype(np.float64))

    def _finite(self, values: np.ndarray) -> np.ndarray:
        if not all_finite(values):
            raise OnnxladyError(f"weight '{self.name}' holds NaN or infinite values and cannot be perturbed")
        return values

    def streamable(self) -> bool:
        """Whether new values can be written as ``raw_data`` overrides (see :func:`perturb_streamed`).

        So for a tensor in ``raw_data`` or left in its external file; not for typed fields or a
        Constant's float attributes (an override would change how they are stored).
        """
        tensor = self.tensor
        if tensor is None or not self.in_main_graph:
            return False
        return self.element_count() == 0 or tensor.HasField("raw_data") or is_mapped(tensor)

    def element_count(self) -> int:
        """Elements of the tensor, from its shape (1 for ``value_float``)."""
        if self.tensor is None:
            assert self.attribute is not None
            return 1 if self.attribute.name == "value_float" else len(self.attribute.floats)
        return math.prod(int(d) for d in self.tensor.dims)

    def original(self) -> Any:
        """The tensor's stored bytes as they are (a streamable tensor that no step changed)."""
        tensor = self.tensor
        assert tensor is not None
        return mapped_array(tensor) if is_mapped(tensor) else tensor.raw_data

    def stored(self, values: np.ndarray) -> np.ndarray:
        """``values`` as the tensor stores them: its dtype, little-endian (C-contiguous)."""
        stored = _to_bits(values, self.dtype)
        return np.ascontiguousarray(stored.astype(stored.dtype.newbyteorder("<"), copy=False))

    def round(self, values: np.ndarray) -> np.ndarray:
        """``values`` rounded to the tensor's dtype, back as float64."""
        return _from_bits(_to_bits(values, self.dtype), self.dtype)

    def write(self, values: np.ndarray) -> None:
        """Store ``values`` in the tensor's own dtype and storage field."""
        if self.attribute is not None:
            stored = values.astype(np.float32)
            if self.attribute.name == "value_float":
                self.attribute.f = float(stored.reshape(-1)[0])
            else:
                del self.attribute.floats[:]
                self.attribute.floats.extend(stored.reshape(-1).tolist())
            return
        tensor = self.tensor
        assert tensor is not None
        if tensor.HasField("raw_data"):
            tensor.raw_data = self.stored(values).tobytes()
            return
        stored = _to_bits(values, self.dtype)
        if self.dtype == onnx.TensorProto.FLOAT:
            del tensor.float_data[:]
            tensor.float_data.extend(stored.reshape(-1).tolist())
        elif self.dtype == onnx.TensorProto.DOUBLE:
            del tensor.double_data[:]
            tensor.double_data.extend(stored.reshape(-1).tolist())
        else:  # float16 / bfloat16: bit patterns in int32_data
            del tensor.int32_data[:]
            tensor.int32_data.extend(stored.reshape(-1).astype(np.int32).tolist())


def _to_bits(values: np.ndarray, dtype: int) -> np.ndarray:
    """The stored representation: float32/float64 values, or uint16 bits for float16/bfloat16."""
    if dtype == onnx.TensorProto.DOUBLE:
        return values.astype(np.float64)
    if dtype == onnx.TensorProto.FLOAT16:
        return values.astype(np.float16).view(np.uint16)
    if dtype == onnx.TensorProto.BFLOAT16:
        # Round to nearest even on the upper 16 bits of float32 (values are finite). Rounding
        # float64 -> float32 first can double-round, at most one bfloat16 ulp in rare ties.
        bits = np.ascontiguousarray(values.astype(np.float32)).view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return values.astype(np.float32)


def _from_bits(stored: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == onnx.TensorProto.FLOAT16:
        return stored.view(np.float16).astype(np.float64)
    if dtype == onnx.TensorProto.BFLOAT16:
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return stored.astype(np.float64)
