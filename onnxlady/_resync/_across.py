"""Resync across conversions: the suspect's graph is not a node-for-node copy of the reference.

:mod:`onnxlady._resync._match` pairs the two models' sites and groups. Resync then runs the same solver
as for twin graphs (:class:`~onnxlady._resync._solver.ResyncState`, groups in the reference's order, block
signatures, Hungarian), on arrays that both models hold in one common form:

- every compared constant is read as its user reads it (:class:`Approx`): float16, bfloat16 and
  int8-behind-``DequantizeLinear`` become real numbers, reshaped to the reference tensor's
  layout;
- where one model folded a linear layer's BatchNorm and the other kept it, the layer's weight
  and bias are taken with the BatchNorm folded in (``W s`` and ``(b - mean) s + beta`` with
  ``s = gamma / sqrt(var + eps)``): a folded and an unfolded copy then hold the same numbers,
  per-neuron scales, signs included. Where both kept it, weight, bias and statistics are
  compared as stored, as between twin graphs: folding would merge a rescale that the
  statistics absorb (weight times ``k``, mean times ``k``, variance times ``k^2``) into
  numbers that differ only through ``eps``, which the audit could then not name; a BatchNorm
  of its own that the other model holds as an NCHWc depthwise 1x1 Conv is that convolution's
  weight ones and bias zeros with the BatchNorm folded in (``s`` and ``beta - mean s``); a
  fold written as arithmetic in the graph (onnxoptimizer) is read evaluated
  (:mod:`onnxlady._resync._computed`), and the constants that make such a weight in the
  reference are solved through its value;
- a reference constant with no counterpart (the statistics of a BatchNorm the suspect folded,
  a quantization scale) is left out of the signatures.

Every value carries a bound on how far its storage may be from the exact number (half a unit
in the last place of float16/bfloat16/float32, half a quantization step behind
DequantizeLinear, propagated through folding): the audit calls two aligned models equal when
every difference is within the sum of the bounds (plus its ``rtol``), so a model that was only
permuted and converted is not "modified".

The result is the *suspect* re-ordered by :func:`~onnxlady._permute.permute_model` on its own
analysis: it keeps its form (float16, folded, QDQ) and is equivalent to the suspect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, overload

import numpy as np
import onnx

from onnxlady._analysis._channels import ChannelAnalysis, analyze
from onnxlady._assignment import linear_sum_assignment
from onnxlady._errors import OnnxladyError
from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._external import has_mapped, is_mapped, load_mapped, mapped_bytes, release_pages
from onnxlady._io._files import copy_model
from onnxlady._io._tensors import all_finite, tensor_holders
from onnxlady._resync import _solver as solver
from onnxlady._resync._branch_merges import merged_value
from onnxlady._resync._computed import aligned_uses
from onnxlady._resync._invariants import sharing_scratch
from onnxlady._resync._match import ModelMatch, Unit, analyze_with_state, check_same_model, match_analyses
from onnxlady._resync._signatures import proving_finite
from onnxlady._resync._sites import (
    Operand,
    Site,
    beyond_factor,
    input_scalar,
    place_operand,
    post_affine,
    read_operand,
    reading_once,
    stored_operand,
)
from onnxlady._resync._solver import Override
from onnxlady._resync._twin import _MovedTensors, _PendingDigestKey, build_output
from onnxlady._resync._values import Approx, read_constant, widened
from onnxlady._resync._values import half_ulp as _half_ulp
from onnxlady._transforms._key import PermutationKey, graph_fingerprint
from onnxlady._transforms._permute import (
    _PACKED_TYPES,
    SourceDigest,
    _check_perms,
    _group_records,
    _state_records,
    _tensor_record,
    permute_model,
)

__all__ = ["AcrossResync", "Approx", "analyze_with_state", "read_constant", "resync_across", "unit_bias", "unit_weight"]

#: Re-exported: the storage bound of one value (tests and older callers import it from here).
half_ulp = _half_ulp

# -- units in folded form ---------------------------------------------------------------------
@dataclass(frozen=True)
class _BatchNorm:
    scale: Approx  # gamma / sqrt(var + eps)
    shift: Approx  # beta
    mean: Approx


def _batchnorm(graph: ModelGraph, index: int) -> _BatchNorm | None:
    node = graph.nodes[index]
    read = [read_constant(graph, name) for name in node.input[1:5]]
    parts = [part for part in read if part is not None]
    if len(parts) != 4:
        return None
    gamma, beta, mean, var = parts
    eps = float(node_attribute(node, "epsilon", 1e-5))
    root = np.sqrt(var.value + eps)
    scale = gamma.value / root
    # d(g / sqrt(v + e)) = dg / sqrt(v + e) - g dv / (2 (v + e)^1.5)
    scale_error = gamma.error / root + np.abs(gamma.value) * 0.5 * var.error / root**3
    return _BatchNorm(Approx(scale, scale_error), beta, mean)


#: Relative rounding a converter's float32 folding adds to each term it computes (a few units
#: in the last place).
_FOLD_ROUNDING = 2.0**-22


def _along(vector: np.ndarray, axis: int, rank: int) -> np.ndarray:
    view = [1] * rank
    view[axis] = -1
    return vector.reshape(view)


def unit_weight(graph: ModelGraph, unit: Unit, fold: bool = True) -> Approx | None:
    """The unit's weight as read, with its BatchNorm folded in along the output axis.

    The BatchNorm is not folded in when ``fold`` is false.
    """
    weight = read_constant(graph, graph.nodes[unit.node].input[unit.weight_slot])
    if weight is None or unit.batchnorm is None or not fold:
        return weight
    bn = _batchnorm(graph, unit.batchnorm)
    if bn is None or weight.value.shape[unit.out_axis] != bn.scale.value.size:
        return None
    rank = weight.value.ndim
    scale = _along(bn.scale.value, unit.out_axis, rank)
    scale_error = _along(bn.scale.error, unit.out_axis, rank)
    folded = weight.value * scale
    # Plus what a converter folding in float32 may add to its stored product (one rounding).
    error = weight.error * np.abs(scale) + np.abs(weight.value) * scale_error + _FOLD_ROUNDING * np.abs(folded)
    return Approx(folded, error)


def unit_bias(graph: ModelGraph, unit: Unit, size: int, fold: bool = True) -> Approx | None:
    """The unit's bias as a vector over its output neurons, with its BatchNorm folded in.

    When ``fold`` is false: the bias as stored, zeros where the layer has none.
    """
    if unit.bias is not None:
        node, slot = unit.bias
        bias = read_constant(graph, graph.nodes[node].input[slot])
        if bias is None or bias.value.size != size:
            return None
        bias = bias.reshaped((size,))
    else:
        bias = Approx(np.zeros(size), np.zeros(size))
    if unit.batchnorm is None or not fold:
        return bias
    bn = _batchnorm(graph, unit.batchnorm)
    if bn is None or bn.scale.value.size != size:
        return None
    centred = bias.value - bn.mean.value
    product = centred * bn.scale.value
    value = product + bn.shift.value
    error = (bias.error + bn.mean.error) * np.abs(bn.scale.value) + np.abs(centred) * bn.scale.error + bn.shift.error
    # A float32 fold rounds each term; the result may cancel far below them.
    error = error + _FOLD_ROUNDING * (np.abs(bias.value) + np.abs(bn.mean.value) + np.abs(product) + np.abs(bn.shift.value))
    return Approx(value, error)


# -- the reference's planned tensors in the common form ---------------------------------------
def _fold_weight(weight: Approx, bn: _BatchNorm) -> Approx:
    """A canonical weight (neurons on axis 0) with its BatchNorm folded in (a bound if it has one)."""
    rank = weight.value.ndim
    scale = _along(bn.scale.value, 0, rank)
    folded = weight.value * scale
    if not weight.bounded:
        return Approx(folded)
    scale_error = _along(bn.scale.error, 0, rank)
    # Plus what a converter folding in float32 may add to its stored product (one rounding).
    error = weight.error * np.abs(scale) + np.abs(weight.value) * scale_error + _FOLD_ROUNDING * np.abs(folded)
    return Approx(folded, error)


def _fold_bias(bias: Approx, bn: _BatchNorm) -> Approx:
    """A bias over neurons with its BatchNorm folded in: ``(b - mean) s + beta``."""
    centred = bias.value - bn.mean.value
    product = centred * bn.scale.value
    value = product + bn.shift.value
    error = (bias.error + bn.mean.error) * np.abs(bn.scale.value) + np.abs(centred) * bn.scale.error + bn.shift.error
    # A float32 fold rounds each term; the result may cancel far below them.
    error = error + _FOLD_ROUNDING * (np.abs(bias.value) + np.abs(bn.mean.value) + np.abs(product) + np.abs(bn.shift.value))
    return Approx(value, error)


def _site_value(
    graph: ModelGraph, site: Site, role: str, fold: bool, bounds: bool = True, shifts: bool = True
) -> Approx | None:
    """One operand of a site in canonical layout, in the form both models share.

    With ``fold``, a unit's weight and bias are read with its BatchNorm folded in (and its
    BatchNorm's own parameters have no counterpart, except its beta standing for a missing
    bias); without, everything as stored. A unit without a bias reads zeros. Without
    ``bounds`` the value carries no bound (the same numbers, a whole array less per weight).
    Without ``shifts``, per-channel shifts after the layer are not folded into its bias: where
    both models keep them they are compared as stored (folded, a bias several layers share, a
    zero vector through Identity nodes, would read another value per layer).
    """
    if (site.branches or site.identity is not None) and role in ("weight", "bias"):
        # Parallel branches the other model re-parameterised into one kernel: summed here.
        own = _site_value(graph, replace(site, branches=(), identity=None), role, fold, bounds, shifts)
        parts = [_site_value(graph, branch, role, fold, bounds, shifts) for branch in site.branches]
        if own is None or any(part is None for part in parts):
            return None
        return merged_value(graph, site, role, own, [part for part in parts if part is not None])
    weight = site.operand("weight")
    size = weight.shape[0] if weight is not None else 0
    bn = _batchnorm(graph, site.batchnorm) if site.batchnorm is not None and fold else None
    if site.batchnorm is not None and fold and bn is None:
        return None
    # Scalar steps after the layer fold into it wherever its BatchNorm does (or it has none).
    folds = bn is not None or site.batchnorm is None
    post = post_affine(graph, site, shifts) if folds else None
    if folds and post is None and any(shifts or kind != "shift" for kind, _, _ in site.post):
        return None
    if site.lone_batchnorm and role in ("weight", "bias"):
        # A BatchNorm of its own as a 1x1 convolution: weight ones and bias zeros, the BatchNorm
        # folded in (its gamma and beta are what they store; folded only, never read as is).
        shape = weight.shape if role == "weight" and weight is not None else (size,)
        if bn is None:
            return None
        if role == "weight":
            return _fold_weight(Approx(np.ones(shape), np.zeros(shape)) if bounds else Approx(np.ones(shape)), bn)
        return _fold_bias(Approx(np.zeros(shape), np.zeros(shape)), bn)
    if role == "weight":
        assert weight is not None
        value = read_operand(graph, weight, bounds, compact=not bounds)
        value = _fold_weight(value, bn) if value is not None and bn is not None else value
        if value is not None and post is not None:
            rank = value.value.ndim
            factor, factor_error = _along(post[0].value, 0, rank), _along(post[0].error, 0, rank)
            product = value.value * factor
            if not value.bounded:
                value = Approx(product)
            else:
                error = value.error * np.abs(factor) + np.abs(value.value) * factor_error
                if post[0].value.size > 1:  # folded per channel, like a BatchNorm: one float32 rounding
                    error = error + _FOLD_ROUNDING * np.abs(product)
                value = Approx(product, error)
        return value
    operand = site.operand(role)
    if role == "bias" and weight is not None:
        if operand is None:
            bias: Approx | None = Approx(np.zeros(size), np.zeros(size))
        else:
            bias = read_operand(graph, operand, bounds, compact=not bounds)
        bias = _fold_bias(bias, bn) if bias is not None and bn is not None else bias
        if bias is not None and post is not None:
            scale, shift = post
            product = bias.value * scale.value
            error = bias.error * np.abs(scale.value) + np.abs(bias.value) * scale.error + shift.error
            if scale.value.size > 1:  # folded per channel, like a BatchNorm: float32 roundings
                error = error + _FOLD_ROUNDING * (np.abs(product) + np.abs(shift.value))
            bias = Approx(product + shift.value, error)
        return bias
    if role.startswith("bn"):
        if bn is not None:  # folded: only beta, standing for a missing bias, has a counterpart
            return _site_value(graph, site, "bias", fold, bounds, shifts) if role == "bn2" and site.operand("bias") is None else None
    return read_operand(graph, operand, bounds, compact=not bounds) if operand is not None else None


def _partner_role(site: Site, role: str, fold: bool) -> str:
    """The role a reference operand's numbers have in a partner of another form.

    A folded BatchNorm's beta standing for a missing bias is compared with the partner's bias.
    """
    if fold and role == "bn2" and site.operand("bias") is None:
        return "bias"
    return role


@dataclass
class _Pairing:
    """Per reference plan: both models' values in the reference tensor's layout, or None."""

    reference: list[Approx | None]
    suspect: list[Approx | None]
    dropped: list[str]  # reference tensors with no counterpart (left out of the signatures)
    #: Per plan, its use read again for bounds and reports (None where not compared): kept apart
    #: from the values, which are freed once the solver is done with them.
    readers: list[_PlanReader | None] = field(default_factory=list)


def _pair_use(
    match: ModelMatch, entries: list[tuple[Site, Operand]], bounds: bool = True
) -> tuple[Approx, Approx] | None:
    """Both models' values of one reference use, or None when a part has no counterpart.

    All its operands, blocks assembled, in the layout the reference's node reads it; without
    ``bounds``, the values alone (the same numbers: whether a use pairs never depends on them).
    """
    ref, sus = match.reference.graph, match.suspect.graph
    shape = entries[0][1].read_shape
    values: list[tuple[Operand, Approx, Approx]] = []
    for site, operand in entries:
        partner_key = match.sites.get(site.key)
        if partner_key is None:
            return None
        partner = match.suspect_site(partner_key)
        fold = not (site.batchnorm is not None and partner.batchnorm is not None)
        role = _partner_role(site, operand.role, fold)
        if role.startswith("bn") and partner.batchnorm is None:
            return None
        if role.startswith("post") and partner.operand(role) is None:  # a per-channel scale (or shift) folded away
            return None
        # A per-channel shift both keep is compared as stored; one folded away, folded into both biases.
        shifts = site.operand("post_shift") is None or partner.operand("post_shift") is None
        mine = _site_value(ref, site, operand.role, fold, bounds, shifts)
        theirs = _site_value(sus, partner, role, fold, bounds, shifts)
        if mine is None or theirs is None or mine.value.shape != theirs.value.shape:
            return None
        if operand.role == "weight":
            mine, theirs = _scalar_moved_in(ref, site, mine, sus, partner, theirs)
        if role in ("weight", "bias") and (site.beyond is not None or partner.beyond is not None):
            mine, theirs = _scalar_folded_beyond(ref, site, mine, sus, partner, theirs, fold, shifts)
        values.append((operand, mine, theirs))
    if len(values) == 1:  # one operand read whole (the usual case): no zeroed arrays to fill
        operand, mine, theirs = values[0]
        whole_mine, whole_theirs = stored_operand(operand, mine), stored_operand(operand, theirs)
        if whole_mine is not None and whole_theirs is not None:
            return whole_mine, whole_theirs
    # Reference value and error, suspect value and error, scratch; and what the parts cover.
    # Without bounds, the errors go to the scratch array (they read zeros).
    scratch = np.zeros(shape)
    arrays = [np.zeros(shape) if bounds or number % 2 == 0 else scratch for number in range(4)] + [scratch]
    covered = np.zeros(shape)
    for operand, mine, theirs in values:
        place_operand(operand, mine, arrays[0], arrays[1])
        place_operand(operand, theirs, arrays[2], arrays[3])
        place_operand(operand, Approx(np.ones(mine.value.shape), np.zeros(mine.value.shape)), covered, arrays[4])
        if operand.nbits:  # K padded to whole blocks: the padding (zeros on both sides) is no part of the weight
            covered[slice(operand.block[1], operand.block[2]) if operand.block is not None else slice(None)] = 1.0
    if not covered.all():
        return None
    if not bounds:
        return Approx(arrays[0]), Approx(arrays[2])
    return Approx(arrays[0], arrays[1]), Approx(arrays[2], arrays[3])


#: A scalar before one model's layer counts as folded into the other's weight when the weights'
#: norms differ by it within this relative tolerance (and are farther from equal).
_FOLDED_SCALAR_TOLERANCE = 1e-2


def _scalar_moved_in(
    ref: ModelGraph, site: Site, mine: Approx, sus: ModelGraph, partner: Site, theirs: Approx
) -> tuple[Approx, Approx]:
    """Both weights as the layers compute, where one model folded the scalar before its layer into it.

    onnx-simplifier removes GELU's trailing ``Mul 0.5`` and multiplies the next layer's weight by
    it; ONNX Runtime's Gelu fusion removes the Mul and keeps the weight. Which one happened is read
    from the weights' norms (order-free: the suspect may be permuted): the side that kept the Mul
    has its weight scaled by it only when the other's norm is that much apart.
    """
    mine_factor, theirs_factor = input_scalar(ref, site), input_scalar(sus, partner)
    if (mine_factor is None) == (theirs_factor is None):
        return mine, theirs
    mine, theirs = widened(mine), widened(theirs)  # norms and scaling in float64, as read
    mine_norm, theirs_norm = float(np.linalg.norm(mine.value)), float(np.linalg.norm(theirs.value))
    if not (mine_norm > 0.0 and theirs_norm > 0.0):
        return mine, theirs
    if mine_factor is not None:
        expected = abs(mine_factor)
    else:
        assert theirs_factor is not None
        expected = 1.0 / abs(theirs_factor)
    ratio = theirs_norm / mine_norm
    if abs(ratio / expected - 1.0) > _FOLDED_SCALAR_TOLERANCE or abs(ratio - 1.0) <= abs(ratio / expected - 1.0):
        return mine, theirs
    if mine_factor is not None:
        return mine.scaled(mine_factor), theirs
    assert theirs_factor is not None
    return mine, theirs.scaled(theirs_factor)


def _scalar_folded_beyond(
    ref: ModelGraph, site: Site, mine: Approx, sus: ModelGraph, partner: Site, theirs: Approx, fold: bool, shifts: bool
) -> tuple[Approx, Approx]:
    """A weight or bias as the layer computes, where one model folded the scalar past its moves into it.

    ``Site.beyond``: onnxslim folds an attention's query scale (past the heads' Reshape and
    Transpose) into q's weight and bias; ONNX Runtime moves it into the scores' FusedMatMul
    (``alpha``: a step held there, so no fold). The scalar counts as folded only where the other
    model holds no step there and its weight *and* bias both differ from this model's by that
    factor (:func:`_typical_ratio`); the values are then compared with it applied, so a weight
    or a bias changed alone, or a neuron of them, is still caught.
    """
    kinds = tuple(step[0] if step is not None else None for step in (site.beyond, partner.beyond))
    if kinds not in (("mul", None), (None, "mul")):
        return mine, theirs
    mine_side = kinds[0] == "mul"
    factor = beyond_factor(ref, site) if mine_side else beyond_factor(sus, partner)
    if factor is None or not (np.isfinite(factor) and abs(factor) > 0.0):
        return mine, theirs
    expected = abs(factor) if mine_side else 1.0 / abs(factor)
    for role in ("weight", "bias"):
        ours, yours = _site_value(ref, site, role, fold, False, shifts), _site_value(sus, partner, role, fold, False, shifts)
        if ours is None or yours is None or ours.value.shape != yours.value.shape:
            return mine, theirs
        if role == "bias" and not (np.any(ours.value) or np.any(yours.value)):  # no bias: the weight decides
            continue
        ratio = _typical_ratio(widened(ours).value, widened(yours).value)
        if ratio is None or abs(ratio / expected - 1.0) > _FOLDED_SCALAR_TOLERANCE or abs(ratio - 1.0) <= abs(ratio / expected - 1.0):
            return mine, theirs
    if mine_side:
        return widened(mine).scaled(factor), theirs
    return mine, widened(theirs).scaled(factor)


def _typical_ratio(ours: np.ndarray, yours: np.ndarray) -> float | None:
    """The median ratio of two canonical values' neuron norms (axis 0), each sorted.

    Order-free (the suspect may be permuted), and one neuron changed does not move it: the
    fold is then still read, and that neuron is caught when the values are compared.
    """
    mine_norms = np.sort(np.linalg.norm(ours.reshape(ours.shape[0], -1), axis=1)) if ours.ndim else np.abs(ours.reshape(1))
    your_norms = np.sort(np.linalg.norm(yours.reshape(yours.shape[0], -1), axis=1)) if yours.ndim else np.abs(yours.reshape(1))
    kept = (mine_norms > 0.0) & (your_norms > 0.0)
    return float(np.median(your_norms[kept] / mine_norms[kept])) if kept.any() else None


def _operands_by_use(
    sites: Iterable[Site], graph: ModelGraph | None = None
) -> dict[tuple[int, int], list[tuple[Site, Operand]]]:
    """The sites' operands by the input they read, ``(node, slot)``: a packed weight has several.

    With ``graph``, a computed operand (a BatchNorm folded in by graph arithmetic) also stands
    for each constant that holds it element for element (:func:`aligned_uses`), by their uses:
    a permutation moves them as it moves the operand, so their plans are solved through its
    value. (Not for constants no permutation moves: the operand's value moves with the others.)
    """
    by_use: dict[tuple[int, int], list[tuple[Site, Operand]]] = {}
    for site in sites:
        for operand in site.operands:
            by_use.setdefault((operand.node, operand.slot), []).append((site, operand))
            if operand.computed and graph is not None:
                name = graph.nodes[operand.node].input[operand.slot]
                for use in aligned_uses(graph, name, operand.node, operand.slot):
                    by_use.setdefault(use, []).append((site, operand))
    return by_use


class _PlanReader:
    """One plan's use, read again when asked for: both models' values with their bounds.

    The resync reads values alone; a bound is needed only where ties are broken by storage
    error, and by the audit, which also reads the values again once the resync has let its
    arrays go. Reading the plan's use again gives what an eager read would have: the same code
    on the same constants (whether a use pairs never depends on its bounds).
    """

    def __init__(self, match: ModelMatch, entries: list[tuple[Site, Operand]], shape: tuple[int, ...] | None) -> None:
        self._match = match
        self._entries = entries
        self._shape = shape  # the plan's shape, None to keep the read one (MatMulNBits)
        self._made: dict[str, np.ndarray] = {}

    def read(self) -> tuple[Approx, Approx]:
        """Both models' values and bounds, in the plan's layout (the suspect in its own order)."""
        values = _pair_use(self._match, self._entries)
        assert values is not None, "a use that paired without its bounds pairs with them"
        mine, theirs = values
        if self._shape is not None:
            mine, theirs = mine.reshaped(self._shape), theirs.reshaped(self._shape)
        return mine, theirs

    def _take(self, which: str) -> np.ndarray:
        if which not in self._made:
            mine, theirs = self.read()
            self._made = {"reference": mine.error, "suspect": theirs.error}
        return self._made.pop(which)

    def reference(self) -> np.ndarray:
        """The reference's bound, in the plan's layout."""
        return self._take("reference")

    def suspect(self) -> np.ndarray:
        """The suspect's bound, in the plan's layout (the suspect's own order)."""
        return self._take("suspect")


def _pair_plans(match: ModelMatch) -> _Pairing:
    """Both models' values per reference plan, their bounds made when first read (:class:`_PlanReader`)."""
    ref = match.reference
    holders = tensor_holders(ref.graph.model)
    by_use = _operands_by_use(match.reference_sites, ref.graph)
    references: list[Approx | None] = []
    suspects: list[Approx | None] = []
    dropped: list[str] = []
    plan_bounds: list[_PlanReader | None] = []
    for plan in ref.tensors:
        shape = tuple(int(d) for d in holders[plan.source].dims)
        size = int(np.prod(shape)) if shape else 1
        found: tuple[Approx, Approx] | None = None
        bounds: _PlanReader | None = None
        for use in plan.uses:
            entries = by_use.get(use)
            if not entries:
                continue
            values = _pair_use(match, entries, bounds=False)
            if values is None:
                continue
            mine, theirs = values
            if entries[0][1].nbits:  # dequantized: [N, blocks, bytes, values per byte], B's axes first
                bounds = _PlanReader(match, entries, None)
            elif mine.value.size == size:
                mine, theirs = mine.reshaped(shape), theirs.reshaped(shape)
                bounds = _PlanReader(match, entries, shape)
            else:
                continue
            found = (Approx(mine.value, bound=bounds.reference), Approx(theirs.value, bound=bounds.suspect))
            break
        if found is None:
            dropped.append(plan.source)
            references.append(None)
            suspects.append(None)
            plan_bounds.append(None)
        else:
            references.append(found[0])
            suspects.append(found[1])
            plan_bounds.append(bounds)
    return _Pairing(references, suspects, dropped, plan_bounds)


def pair_unplanned(match: ModelMatch) -> dict[str, tuple[Approx, Approx]]:
    """Both models' values of the reference constants no permutation moves, by constant name.

    A constant on frozen groups only (a bias of the residual stream pinned by the graph input)
    has no plan, so the resync never reads it; the audit must still compare it, or a change to
    it made before a conversion would read ``converted``. Neither model moves it, so the
    suspect's value as stored, read through its paired site in the reference's layout, is
    compared as is. Constants whose site does not weigh (rotary tables, layers of constants a
    simplifier folds) or does not pair, and values of another size, are left out.
    """
    graph = match.reference.graph
    planned = {plan.source for plan in match.reference.tensors}
    holders = tensor_holders(graph.model)
    by_use = _operands_by_use(site for site in match.reference_sites if site.weighs)
    found: dict[str, tuple[Approx, Approx]] = {}
    for (node, slot), entries in by_use.items():
        leaf = graph.constant_leaf(graph.nodes[node].input[slot])
        if leaf is None or leaf.name in planned or leaf.name in found or leaf.name not in holders:
            continue
        values = _pair_use(match, entries)
        if values is not None and entries[0][1].nbits:
            # Dequantized ([N, blocks, bytes, values per byte]), not the packed bytes' shape: an
            # int4 weight of frozen groups is compared too (held-out round 19, F1).
            found[leaf.name] = values
            continue
        shape = tuple(int(d) for d in holders[leaf.name].dims)
        if values is None or values[0].value.size != (int(np.prod(shape)) if shape else 1):
            continue
        found[leaf.name] = (values[0].reshaped(shape), values[1].reshaped(shape))
    return found


# -- the resync -------------------------------------------------------------------------------
@dataclass
class AcrossResync:
    """What resync across conversions found, beyond the usual result."""

    match: ModelMatch
    compared: list[int]  # reference plans compared (the others had no counterpart)
    reference: Sequence[Approx | None]
    suspect_aligned: Sequence[Approx | None]  # the suspect's values in the reference's order
    suspect_before: Sequence[Approx | None]  # the suspect's values in its own order
    dropped: list[str] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)  # paired groups with nothing to compare
    #: Groups solved in the common form but left in place in the output: the suspect's own
    #: analysis freezes them (its form hides a shape, say), so its tensors cannot be moved.
    unwritten: list[str] = field(default_factory=list)
    #: Per solved reference group: aligned[j] = suspect neuron matches[gid][j].
    matches: dict[str, np.ndarray] = field(default_factory=dict)
    #: Suspect groups solved with the roles exchanged (the reference's form freezes them); the
    #: common-form arrays above do not hold them in the reference's order.
    mirrored: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "matching": self.match.to_dict(),
            "compared_tensors": len(self.compared),
            "tensors_without_counterpart": list(self.dropped),
            "unresolved_groups": list(self.unresolved),
            "groups_left_in_place": list(self.unwritten),
            "suspect_groups_solved_mirrored": list(self.mirrored),
        }


@dataclass
class _State(solver.ResyncState):
    """The solver's state, with the suspect's error bounds moved along with its values.

    Each solve's re-ordering of a plan is composed into one index per axis (``moves``): the
    bounds stay in the suspect's order and are moved only when read (:meth:`aligned_error`:
    ties), and what the resync reports is read again and moved by them (:class:`_Readings`), so
    a resync alone copies neither and keeps no array once solved.
    """

    errors: Sequence[np.ndarray] = field(default_factory=list)  # in the suspect's order
    reference_errors: Sequence[np.ndarray] = field(default_factory=list)
    #: Per plan, per axis: the index taking the suspect's order to the current one.
    moves: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)

    def solve(self, gid: str, solved: frozenset[str], aligned: bool) -> bool:
        """The solver's step, then the file pages the group read let go (the next group maps its own).

        Both models' weights are memory maps or views of their files (compact reads): each
        page touched would otherwise stay resident until the solver ends, both models whole.
        """
        changed = super().solve(gid, solved, aligned)
        for plan in {piece.plan for piece in self.slices[gid]} | set(self.touched[gid]):
            release_pages(self.reference[plan])
            release_pages(self.work[plan])
        return changed

    def _apply(self, plan_index: int, gid: str, step: np.ndarray) -> None:
        super()._apply(plan_index, gid, step)
        moves = self.moves.setdefault(plan_index, {})
        for axis, expr in self.analysis.tensors[plan_index].axes:
            idx = self.analysis.index_array(expr, {gid: step})
            if not np.array_equal(idx, np.arange(idx.size)):
                # take(take(a, first), then) == take(a, first[then]) along one axis
                moves[axis] = moves[axis][idx] if axis in moves else idx

    def aligned_error(self, plan_index: int) -> np.ndarray:
        """The suspect's bound of a plan in the current order (what moving it with the values gives)."""
        array = self.errors[plan_index]
        for axis, idx in self.moves.get(plan_index, {}).items():  # takes along distinct axes commute
            array = np.take(array, idx, axis=axis)
        return array

    def exact_match(
        self, gid: str, solved: frozenset[str], step: np.ndarray | None = None, margins: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Ties broken by storage error.

        The ambiguous reference neurons are matched among their suspect neurons so that every aligned
        value lies within both storage errors (a conversion's bit equality); None if no such matching
        exists (a perturbed copy).
        """
        exact = super().exact_match(gid, solved)  # bit-equal twins: an opset upgrade, renames
        if exact is not None or step is None or margins is None:
            return exact
        ambiguous = np.flatnonzero(margins < solver.AMBIGUITY_MARGIN)
        pieces = [piece for piece in self.slices[gid] if not piece.misaligned_dims(solved)]
        if not pieces or not 0 < ambiguous.size <= _MAX_TIES:
            return None
        n = self.analysis.group(gid).size

        def rows(arrays: Sequence[np.ndarray] | dict[int, np.ndarray]) -> np.ndarray:
            blocks = [solver.gather_block(arrays[p.plan], p, (), widen=self.widen) for p in pieces]
            return np.concatenate([block.reshape(n, -1) for block in blocks], axis=1)

        ref, ref_error = rows(self.reference), rows(self.reference_errors)
        errors = {plan: self.aligned_error(plan) for plan in {piece.plan for piece in pieces}}
        sus, sus_error = rows(self.work), rows(errors)
        candidates = step[ambiguous]  # the others keep the neurons the similarity gave them
        sus, sus_error = sus[candidates], sus_error[candidates]  # gathered once, not per neuron
        fits = np.stack([np.all(np.abs(sus - ref[j]) <= sus_error + ref_error[j], axis=1) for j in ambiguous])
        # A bijection inside the fits, keeping the similarity's choice where it fits: neurons
        # fitting each other both ways are the same within storage error, interchangeable.
        cost = np.where(fits, 1.0, float(ambiguous.size + 1))
        current = candidates[None, :] == step[ambiguous][:, None]
        cost[current & fits] = 0.0
        rows_taken, cols = linear_sum_assignment(cost)
        if not np.all(fits[rows_taken, cols]):
            return None
        chosen = step.copy()
        chosen[ambiguous[rows_taken]] = candidates[cols]
        return chosen


class _Bounds(Sequence[np.ndarray]):
    """Per plan, a bound made by its function when first read, then kept; empty where none."""

    def __init__(self, makers: list[Callable[[], np.ndarray] | None]) -> None:
        self._makers = makers
        self._made: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._makers)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[number] for number in range(len(self._makers))[index]]
        number = range(len(self._makers))[index]  # IndexError past the end, as a list
        if number not in self._made:
            maker = self._makers[number]
            self._made[number] = maker() if maker is not None else np.zeros(0)
        return self._made[number]


def _moved(array: np.ndarray, moves: dict[int, np.ndarray]) -> np.ndarray:
    """``array`` (a plan in the suspect's order) in the aligned order: the composed takes."""
    for axis, idx in moves.items():  # takes along distinct axes commute
        array = np.take(array, idx, axis=axis)
    return array


class _Readings:
    """What the resync compared, per reference plan, read again when asked for.

    The reference's values, the suspect's in its own order ("before") and in the reference's
    ("aligned": moved by the solver's composed re-orderings), each with its bound. Nothing is
    kept but the last plan read (the audit asks for the three of one plan in a row): the resync
    lets its arrays go before it writes its output.
    """

    def __init__(self, readers: list[_PlanReader | None], moves: dict[int, dict[int, np.ndarray]]) -> None:
        self.readers = readers
        self.moves = moves
        self._last: tuple[int, Approx, Approx] | None = None

    def get(self, number: int, which: str) -> Approx | None:
        """``which`` (``reference``, ``before`` or ``aligned``) of plan ``number``; None where not compared."""
        reader = self.readers[number]
        if reader is None:
            return None
        if self._last is None or self._last[0] != number:
            self._last = (number, *reader.read())
        _, mine, theirs = self._last
        if which == "reference":
            return mine
        if which == "before":
            return theirs
        moves = self.moves.get(number, {})
        return Approx(_moved(theirs.value, moves), _moved(theirs.full_error(), moves))


class _Plans(Sequence[Approx | None]):
    """One of :class:`_Readings`' lists (None where a plan is not compared), read when indexed."""

    def __init__(self, readings: _Readings, which: str) -> None:
        self._readings = readings
        self._which = which

    def __len__(self) -> int:
        return len(self._readings.readers)

    @overload
    def __getitem__(self, index: int) -> Approx | None: ...

    @overload
    def __getitem__(self, index: slice) -> list[Approx | None]: ...

    def __getitem__(self, index: int | slice) -> Approx | list[Approx | None] | None:
        if isinstance(index, slice):
            return [self[number] for number in range(len(self))[index]]
        number = range(len(self))[index]  # IndexError past the end, as a list
        return self._readings.get(number, self._which)


#: Ties broken by storage error in one group, at most (each costs a pass over their signatures).
_MAX_TIES = 1024


def _true_perms(match: ModelMatch, true_key: PermutationKey | None) -> dict[str, np.ndarray]:
    """The true permutations by reference group id, whichever model's groups the key names."""
    if true_key is None:
        return {}
    ref_model, sus_model = match.reference.model, match.suspect.model  # as given, not inlined views
    if true_key.source_fingerprint == graph_fingerprint(ref_model):
        return solver.true_permutations(match.reference, true_key)
    if graph_fingerprint(sus_model) in (true_key.permuted_fingerprint, true_key.source_fingerprint):
        by_suspect = solver.true_permutations(match.suspect, true_key)
        return {pair.reference: by_suspect[pair.suspect] for pair in match.groups if pair.alike and pair.suspect in by_suspect}
    raise OnnxladyError("the true key was made for neither the reference nor the suspect (graph fingerprints differ)")


def _true_suspect_perms(match: ModelMatch, true_key: PermutationKey | None) -> dict[str, np.ndarray]:
    """The true permutations by suspect group id when the key was made on the suspect, else none.

    A group only the suspect's form holds (no reference group holds its neurons alike) is
    scored against these.
    """
    if true_key is None:
        return {}
    if graph_fingerprint(match.suspect.model) not in (true_key.permuted_fingerprint, true_key.source_fingerprint):
        return {}
    return solver.true_permutations(match.suspect, true_key)


def resync_across(
    reference: onnx.ModelProto,
    suspect: onnx.ModelProto,
    options: solver.ResyncOptions,
    true_key: PermutationKey | None,
    progress: Callable[[str], None] | None,
    *,
    mirrored: bool = False,
    ref_analysis: ChannelAnalysis | None = None,
    sus_analysis: ChannelAnalysis | None = None,
) -> tuple[solver.ResyncResult, AcrossResync]:
    """Resync a converted suspect (see the module docstring): (ResyncResult, details).

    Groups that only the suspect's form can move (the reference's own analysis freezes them: an
    opset upgrade wrapped a Softmax in reshapes over dynamic sizes, say) are solved the other
    way round, with the suspect as the reference (``mirrored`` marks that inner run).
    ``ref_analysis`` and ``sus_analysis`` are the models' analyses when the caller has them
    (read only here: each model is analysed once per command).
    """
    solver.say(progress, "resync: the suspect is not a twin of the reference; matching across conversions")
    ref_analysis = analyze_with_state(reference, true_key) if ref_analysis is None else ref_analysis
    sus_analysis = analyze_with_state(suspect, true_key) if sus_analysis is None else sus_analysis
    # The signatures' reads are the solver's; the weights they found finite are not tested again.
    with reading_once(), sharing_scratch(), proving_finite() as proved:
        match = match_analyses(ref_analysis, sus_analysis)
        # A converter keeps every weight: where most do not pair, these are different models.
        check_same_model(match)
        # Solved wherever the reference can move a paired group (written where the suspect can too).
        if not any(ref_analysis.group(pair.reference).permutable for pair in match.groups):
            raise OnnxladyError("suspect and reference structures cannot be matched: no permutable group pairs")
        true_perms = _true_perms(match, true_key)
        pairing = _pair_plans(match)
    kept = {number for number, value in enumerate(pairing.reference) if value is not None}
    for values, which in ((pairing.reference, "reference"), (pairing.suspect, "suspect")):
        for number in kept:
            approx = values[number]
            assert approx is not None
            if not (proved.covers(approx.value) or all_finite(approx.value)):
                raise OnnxladyError(
                    f"tensor '{ref_analysis.tensors[number].source}' of the {which} holds NaN or Inf values"
                )
            release_pages(approx.value)  # read again by the solver, a group at a time
    del proved  # (it holds the arrays it proved: each is to be freed once the solver moved it)
    # Solved wherever the reference can move the group; written where the suspect can too.
    permutable = {pair.reference for pair in match.groups if ref_analysis.group(pair.reference).permutable}
    slices, touched = solver.group_slices(ref_analysis, permutable)
    slices = {gid: [piece for piece in pieces if piece.plan in kept] for gid, pieces in slices.items()}
    touched = {gid: [plan for plan in plans if plan in kept] for gid, plans in touched.items()}
    order = [group for group in ref_analysis.permutable_groups if group.id in permutable and slices[group.id]]
    unresolved = sorted(permutable - {group.id for group in order})
    empty = np.zeros(0)
    state = _State(
        analysis=ref_analysis,
        order=order,
        slices=slices,
        touched=touched,
        # No copies: the solver only ever moves the suspect's values (np.take makes new ones).
        reference=[value.value if value is not None else empty for value in pairing.reference],
        work=[value.value if value is not None else empty for value in pairing.suspect],
        options=options,
        # The values are compact reads (float32, float16 as stored; see read_operand): each
        # slice is converted to float64 when gathered, as the float64 reads were before.
        widen=True,
        # Made when first read (ties, the audit): a resync alone reads none.
        errors=_Bounds([reader.suspect if reader is not None else None for reader in pairing.readers]),
        reference_errors=_Bounds([reader.reference if reader is not None else None for reader in pairing.readers]),
    )
    # The state holds both models' arrays now: each suspect value read is freed once moved, and
    # all once solved (what is reported is read again, see _Readings).
    readers, dropped = pairing.readers, pairing.dropped
    pairing.reference.clear()  # in place: the lists checked above are the same
    pairing.suspect.clear()
    del pairing
    # A chain's values (a QDQ suspect's dequantized weights) are the graph's cached arrays: let
    # go there, each is freed once the solver has moved it (they are read again when reported).
    match.suspect.graph.forget_values()
    approx = None  # the last value checked: freed with the rest once moved
    rounds = state.run(progress)
    rounds += _settle_ties(state, progress)
    state.keep_stored_orders()  # ties are no evidence of a move (see the method)
    tally = solver.PsiTally()
    groups = [solver.group_report(state, group, tally, true_perms.get(group.id)) for group in order]
    for gid, perm in true_perms.items():  # permuted but never solved: only fixed points are in place
        if gid not in state.match:
            fixed = int(np.sum(perm == np.arange(perm.size)))
            tally.hits += fixed
            tally.total += perm.size
            tally.hits_distinguishable += fixed
            tally.total_distinguishable += perm.size
    solver.say(progress, "resync: re-ordering the suspect in its own form")
    matches, readings = dict(state.match), _Readings(readers, state.moves)
    del state  # its arrays go before the output is made (what is reported is read again)
    pairs = {gid: match.suspect_group(gid) for gid in matches}
    aligned = match.reference.perms_from_match(matches)  # (the blocks' own orders named by their blocks)
    perms = {pair.suspect: aligned[gid] for gid, pair in pairs.items() if pair is not None and pair.permutable}
    unwritten = sorted(gid for gid, pair in pairs.items() if pair is not None and not pair.permutable)
    mirrored_groups = {} if mirrored else _solve_mirrored(match, reference, suspect, options, progress)
    suspect_truth = _true_suspect_perms(match, true_key) if mirrored_groups else {}
    for sus_gid, (ref_gid, perm, report) in mirrored_groups.items():
        perms[sus_gid] = perm
        true = true_perms.get(ref_gid) if ref_gid is not None else None
        if true is not None:  # it was counted above as never solved: count what the mirror did
            fixed = int(np.sum(true == np.arange(true.size)))
            hits = int(np.sum(true[perm] == np.arange(perm.size)))
            tally.hits += hits - fixed
            tally.hits_distinguishable += hits - fixed
            report = replace(report, psi=solver.percent(hits, perm.size), psi_distinguishable=solver.percent(hits, perm.size))
        elif sus_gid in suspect_truth:  # a group of the suspect's form alone: counted here
            true = suspect_truth[sus_gid]
            hits = int(np.sum(true[perm] == np.arange(perm.size)))
            tally.hits += hits
            tally.hits_distinguishable += hits
            tally.total += perm.size
            tally.total_distinguishable += perm.size
            report = replace(report, psi=solver.percent(hits, perm.size), psi_distinguishable=solver.percent(hits, perm.size))
        groups.append(replace(report, id=f"{ref_gid or sus_gid} (solved in the suspect's form)"))
    output, key = _reorder_suspect(suspect, perms, reference, options, kv_state=bool(sus_analysis.states))
    details = AcrossResync(
        match, sorted(kept), _Plans(readings, "reference"), _Plans(readings, "aligned"), _Plans(readings, "before"),
        dropped, unresolved, unwritten, matches, sorted(mirrored_groups),
    )
    result = solver.ResyncResult(
        built=output if isinstance(output, onnx.ModelProto) else None,
        unbuilt=None if isinstance(output, onnx.ModelProto) else output,
        builder=build_output,
        key=key,
        groups=groups,
        method=options.method,
        refined_rounds=rounds,
        psi=solver.percent(tally.hits, tally.total) if tally.total else None,
        psi_distinguishable=(
            solver.percent(tally.hits_distinguishable, tally.total_distinguishable) if tally.total_distinguishable else None
        ),
        across=details,
    )
    return result, details


def _solve_mirrored(
    match: ModelMatch,
    reference: onnx.ModelProto,
    suspect: onnx.ModelProto,
    options: solver.ResyncOptions,
    progress: Callable[[str], None] | None,
) -> dict[str, tuple[str | None, np.ndarray, solver.GroupResync]]:
    """Suspect groups only the suspect's form can move, solved with the roles exchanged.

    Suspect group id -> (reference group id if paired, permutation putting the suspect in the
    reference's order, the mirrored solve's statistics).
    """
    orphans = sorted(
        item.group for item in match.unmatched if item.model == "suspect" and match.suspect.group(item.group).permutable
    )
    if not orphans:
        return {}
    solver.say(progress, f"resync: {len(orphans)} groups only the suspect's form can move: solving them mirrored")
    back, details = resync_across(
        suspect, reference, options, None, progress, mirrored=True, ref_analysis=match.suspect, sus_analysis=match.reference
    )
    reports = {report.id: report for report in back.groups}
    partner = {pair.suspect: pair.reference for pair in match.groups if pair.alike}
    # Mirrored, suspect neuron j holds reference neuron matches[j]: the reference's order is argsort.
    putting = match.suspect.inverse_perms(match.suspect.perms_from_match(details.matches))
    return {
        gid: (partner.get(gid), putting[gid], reports[gid])
        for gid in orphans
        if gid in details.matches
    }


def _settle_ties(state: _State, progress: Callable[[str], None] | None) -> int:
    """Re-solve, with every slice aligned, the groups left with ambiguous neurons.

    A conversion rounds near-dead neurons (weights of 1e-10) to the same stored numbers in the
    slices the first pass can use; their consumer columns still tell them apart once the next
    group is aligned. Only those groups are re-solved (``refine`` re-solves all of them).
    """
    if state.options.refine or not state.options.settle_ties:
        return 0
    everything = frozenset(group.id for group in state.order)
    rounds = 0
    while rounds < solver.MAX_REFINE_ROUNDS:
        tied = [
            gid for gid, stats in state.stats.items()
            if stats.margins.size and stats.margins.min() < solver.AMBIGUITY_MARGIN
        ]  # fmt: skip
        if not tied:
            break
        rounds += 1
        solver.say(progress, f"resync: settling ties in {len(tied)} groups (round {rounds})")
        # A list, not a generator: every tied group is solved each round, whatever the first ones give.
        changed = [state.solve(gid, everything, aligned=True) for gid in tied]
        if not any(changed):
            break
    return rounds


def _reorder_suspect(
    suspect: onnx.ModelProto,
    perms: dict[str, np.ndarray],
    reference: onnx.ModelProto,
    options: solver.ResyncOptions,
    *,
    kv_state: bool = False,
) -> tuple[onnx.ModelProto | tuple[onnx.ModelProto, dict[str, Override]], PermutationKey]:
    """The suspect permuted by ``perms`` (its own group ids), and the key back.

    The key is what ``unpermute_model`` applies to the suspect to give it (as for twin graphs).
    ``kv_state``: the suspect's group ids are those of its analysis with KV caches as state.
    The suspect is returned unbuilt where it can be (see :func:`_streamed_reorder`).
    """
    streamed = _streamed_reorder(suspect, perms, reference, options, kv_state=kv_state)
    if streamed is not None:
        return streamed
    output = copy_model(suspect)
    if has_mapped(output):  # permuted in place below: its weights are read in from their files
        load_mapped(output)
    permute_model(analyze(output, kv_state=kv_state), perms)
    back = copy_model(output)
    back_analysis = analyze(back, kv_state=kv_state)
    key = permute_model(back_analysis, back_analysis.inverse_perms(perms))
    key.extra["resync"] = _resync_record(reference, options)
    return output, key


def _stored_bytes(tensor: onnx.TensorProto) -> bytes | memoryview:
    """A tensor's bytes as stored (read from its file when it was left there)."""
    return mapped_bytes(tensor) if is_mapped(tensor) else tensor.raw_data


def _hash_stored(digest: SourceDigest, source: str, tensor: onnx.TensorProto) -> None:
    """Add a tensor that does not move to the key's digest, as it is stored."""
    digest.add_now(source, _stored_bytes(tensor))


def _resync_record(reference: onnx.ModelProto, options: solver.ResyncOptions) -> dict[str, Any]:
    """What the key records of the resync that made it."""
    return {
        "reference_fingerprint": graph_fingerprint(reference),
        "method": options.method,
        "refine": options.refine,
        "across_conversions": True,
    }


def _streamed_reorder(
    suspect: onnx.ModelProto,
    perms: dict[str, np.ndarray],
    reference: onnx.ModelProto,
    options: solver.ResyncOptions,
    *,
    kv_state: bool,
) -> tuple[tuple[onnx.ModelProto, dict[str, Override]], PermutationKey] | None:
    """:func:`_reorder_suspect`'s output and key, without the suspect copied or permuted twice.

    Where the suspect shares no constant that its uses move apart (nothing is untied) and every
    tensor that moves is a main-graph initializer stored as raw bytes (or left in its file), the
    output is the suspect with new bytes for those tensors, computed when a streaming writer
    asks for them (``(suspect, overrides)``, as a twin's ``ResyncResult.unbuilt``); the key back is the one
    ``permute_model`` gives on the permuted copy (the same analysis, the inverse permutations,
    the digest of the output's bytes), made here without that copy. Each moved tensor is
    computed once: its digest is taken when the writer first computes it, and the key's
    ``source_weights_sha256`` computes only those never asked for when it is read. None where
    this does not apply: the suspect is then copied and permuted as before.
    """
    analysis = analyze(suspect, kv_state=kv_state)
    plans = analysis.tensors
    initializers = {tensor.name: tensor for tensor in suspect.graph.initializer}
    names = [plan.tensor for plan in plans]
    if len(set(names)) != len(names) or any(
        plan.copy > 0
        or plan.tensor != plan.source
        or (tensor := initializers.get(plan.tensor)) is None
        or not (tensor.HasField("raw_data") or is_mapped(tensor))
        or tensor.data_type in _PACKED_TYPES
        or tensor.data_type == onnx.TensorProto.STRING
        for plan in plans
    ):
        return None
    _check_perms(analysis, perms)
    back = analysis.inverse_perms(perms)
    fingerprint = graph_fingerprint(suspect)
    group_ids = {group.root: group.id for group in analysis.groups if group.id in back}
    digest = SourceDigest()
    # The digest covers the output's bytes (what permuting it back starts from): a moved
    # tensor is hashed when the writer (or the audit) first computes it, not computed here once
    # more only to be hashed (see _twin._MovedTensors).
    moved = _MovedTensors(digest)
    overrides: dict[str, Override] = {}
    tensors: list[dict[str, object]] = []
    for plan in plans:
        tensor = initializers[plan.tensor]
        axes = [(axis, analysis.index_array(expr, perms)) for axis, expr in plan.axes]
        moving = [(axis, index) for axis, index in axes if not np.array_equal(index, np.arange(index.size))]
        hashed = digest.expect(plan.source)  # in plan order, as the digest combines them
        if moving:
            overrides[plan.tensor] = moved.later(plan.tensor, tensor, moving, hashed=hashed)
        elif hashed:  # hashed when the digest is read (a key written), as it is stored
            moved.pending[plan.source] = partial(_hash_stored, digest, plan.source, tensor)
        tensors.append(_tensor_record(analysis, plan, group_ids))
    groups = _group_records(analysis, back)
    states = _state_records(analysis, back, group_ids)
    key = (_PendingDigestKey if moved.pending else PermutationKey)(
        source_sha256="",
        source_fingerprint=fingerprint,
        permuted_fingerprint=fingerprint,
        groups=groups,
        tensors=tensors,
        untied=[],
        source_weights_sha256="" if moved.pending else digest.hexdigest(),
        extra={"kv_state": states} if states else {},
    )
    if isinstance(key, _PendingDigestKey):
        key.pending_digest = moved.hexdigest
    key.extra["resync"] = _resync_record(reference, options)
    return (suspect, overrides), key
