"""Content signatures of sites: what matching compares to tell which weight is which.

A site's signature (:mod:`onnxlady._resync._invariants`) is invariant to the permutations being
solved, and is taken of its weights as the computation uses them: a BatchNorm and the scalar
steps after the layer folded in, so a folded copy signs like the unfolded one. Sites whose
signatures are bitwise equal are *twins* (one weight read twice, or an equal copy).
"""

from __future__ import annotations

import contextvars
from collections.abc import Generator
from contextlib import contextmanager

import numpy as np

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._external import release_pages
from onnxlady._resync._invariants import RowScaled, signature
from onnxlady._resync._sites import Operand, Site, post_affine, read_operand
from onnxlady._resync._values import read_constant

__all__ = ["FiniteArrays", "Signatures", "proving_finite", "signature_key", "twins"]

#: Operand roles a converter may store once for several sites (ONNX Runtime and onnxslim
#: deduplicate equal zero biases and shifts): a change to one then moves the signature of
#: every reader alike (:func:`onnxlady._resync._content._decided_by_own_weights`).
_SHAREABLE_ROLES = frozenset({"bias", "shift"})


class Signatures:
    """Content signatures of one model's sites, computed when first asked for."""

    def __init__(self, graph: ModelGraph, sites: list[Site], scratch: list[np.ndarray] | None = None) -> None:
        self.graph = graph
        self.sites = sites
        self._cache: dict[int, list[np.ndarray]] = {}
        self._own: dict[int, list[np.ndarray]] = {}  # the same without the shareable operands' parts
        # Where folded weights are written (see _folded_for_signature): shared by both models' signatures.
        self._scratch: list[np.ndarray] = [] if scratch is None else scratch

    def __getitem__(self, number: int) -> list[np.ndarray]:
        if number not in self._cache:
            parts: list[np.ndarray] = []
            own: list[np.ndarray] = []
            site = self.sites[number]
            for operand in site.operands:
                if operand.role.startswith(("bn", "post")):
                    continue
                value = read_operand(self.graph, operand, bounds=False, compact=True)  # the value alone is signed
                if value is None:
                    continue
                signed = signature(_folded_for_signature(self.graph, site, operand, value.value, self._scratch))
                # A lone BatchNorm signs a layer of ones and zeros in place of its parameters.
                replaced = operand.role in ("weight", "bias") and site.batchnorm is not None and site.lone_batchnorm
                if not replaced:
                    _note_finite(value.value, signed)
                parts.extend(signed)
                if operand.role not in _SHAREABLE_ROLES:
                    own.extend(signed)
                # The solver reads it again (reading_once) in a while: its file pages need not stay meanwhile.
                release_pages(value.value)
            self._cache[number] = parts
            self._own[number] = own
        return self._cache[number]

    def own(self, number: int) -> list[np.ndarray]:
        """A site's signature without the parts of its bias and shift (see :mod:`onnxlady._resync._content`)."""
        self[number]
        return self._own[number]

    def forget(self, number: int) -> None:
        """Drop a site's signature (its site was rewritten in place)."""
        self._cache.pop(number, None)
        self._own.pop(number, None)


class FiniteArrays:
    """Arrays a signature proved to hold no NaN and no infinity (see :func:`proving_finite`)."""

    def __init__(self) -> None:
        self._arrays: list[np.ndarray] = []  # kept alive: their memory is not reused meanwhile

    def add(self, array: np.ndarray) -> None:
        if (array.flags.c_contiguous or array.flags.f_contiguous) and array.size:  # (a weight read transposed)
            self._arrays.append(array)

    def covers(self, array: np.ndarray) -> bool:
        """Whether every element of ``array`` is an element of one array proved finite.

        The same type, its memory inside that array's (which is contiguous: every byte in it
        belongs to an element) and on its elements' boundaries: the array, or a view of it.
        """
        if array.size == 0 or any(stride % array.itemsize for stride in array.strides):
            return False
        low, high = _extent(array)
        for proved in self._arrays:
            start, stop = _extent(proved)
            if proved.dtype == array.dtype and start <= low and high <= stop and (low - start) % array.itemsize == 0:
                return True
        return False


def _extent(array: np.ndarray) -> tuple[int, int]:
    """The addresses of an array's first byte and one past its last (a non-empty array)."""
    low = high = int(array.__array_interface__["data"][0])
    for count, stride in zip(array.shape, array.strides):
        if stride > 0:
            high += (count - 1) * stride
        else:
            low += (count - 1) * stride
    return low, high + array.itemsize


#: Within :func:`proving_finite`: where the signatures note the weights they proved finite.
_PROVED_FINITE: contextvars.ContextVar[FiniteArrays | None] = contextvars.ContextVar("onnxlady_proved_finite", default=None)


@contextmanager
def proving_finite() -> Generator[FiniteArrays, None, None]:
    """Within it, each weight a signature read whole and found finite is noted in the arrays yielded.

    A signature's sorted values start with the weight's smallest value and end with its largest
    (any NaN sorts last, an infinity is one of them): both finite, every value is. Resync across
    conversions then does not test those weights for NaN and infinity a second time, a pass
    over both models' weights (and the reference's file pages, read again). Values scaled by a
    BatchNorm or a scalar step prove it too: a product or a sum of an infinity or a NaN is
    never finite, and each value is one of the factors or terms of a value signed.
    """
    token = _PROVED_FINITE.set(FiniteArrays())
    try:
        yield _PROVED_FINITE.get()  # type: ignore[misc]
    finally:
        _PROVED_FINITE.reset(token)


def _note_finite(value: np.ndarray, parts: list[np.ndarray]) -> None:
    """Note ``value`` as finite where ``parts``, the signature of its values as signed, proves it.

    Every value is signed, as it is or scaled and shifted element by element
    (:func:`_folded_for_signature`, see :func:`proving_finite`).
    """
    proved = _PROVED_FINITE.get()
    if proved is None or not parts:
        return
    ordered = parts[0]  # the sorted values, resampled: the first is the smallest, the last the largest
    if ordered.size and np.isfinite(ordered[0]) and np.isfinite(ordered[-1]):
        proved.add(value)


def _folded_for_signature(
    graph: ModelGraph, site: Site, operand: Operand, value: np.ndarray, scratch: list[np.ndarray] | None = None
) -> np.ndarray | RowScaled:
    """A unit's weight and bias with its BatchNorm, then its scalar steps, folded in.

    A folded copy then signs the same as the unfolded one. With ``scratch`` (a list holding at
    most one float64 array, grown as needed), a folded weight is written into that array, reused
    from weight to weight: the result is then only valid until the next call with the same
    scratch (a signature is computed from it at once). A fresh array per weight cost its page
    faults, more than the products themselves. A kernel :meth:`RowScaled.fits` is not written
    at all: it comes back as the weight and its factors, folded a piece at a time as it is
    signed (:class:`~onnxlady._resync._invariants.RowScaled`: about the same time, and no
    float64 copy as large as the largest kernel held through the matching).
    """
    if operand.role not in ("weight", "bias"):
        return value
    folded: np.ndarray | RowScaled = value
    if site.batchnorm is not None:
        if site.lone_batchnorm:  # a BatchNorm of its own: a layer of weight ones and bias zeros, folded
            value = np.ones(value.shape) if operand.role == "weight" else np.zeros(value.shape)
            node = graph.nodes[site.node]
            gamma, beta, mean, var = (read_constant(graph, name) for name in node.input[1:5])
        else:
            gamma, beta, mean, var = (read_operand(graph, site.operand(f"bn{slot}")) for slot in range(1, 5))  # type: ignore[arg-type]
        if gamma is not None and beta is not None and mean is not None and var is not None:
            eps = float(node_attribute(graph.nodes[site.batchnorm], "epsilon", 1e-5))
            scale = gamma.value / np.sqrt(var.value + eps)
            if operand.role == "weight":
                folded = _product(value, scale.reshape((-1,) + (1,) * (value.ndim - 1)), scratch)
            else:
                folded = (value - mean.value) * scale + beta.value
        else:
            folded = value
    post = post_affine(graph, site)
    if post is not None:
        if operand.role == "weight":
            folded = _product(folded, post[0].value.reshape((-1,) + (1,) * (folded.ndim - 1)), scratch)
            if isinstance(folded, RowScaled):
                return folded.plus_zeros()
            return np.add(folded, 0.0, out=folded) if scratch is not None and _in_scratch(folded, scratch) else folded + 0.0
        assert not isinstance(folded, RowScaled)  # (only a weight is kept so)
        return folded * post[0].value + post[1].value
    return folded


def _in_scratch(array: np.ndarray, scratch: list[np.ndarray]) -> bool:
    """Whether ``array`` is written in the scratch array (and so may be overwritten in place)."""
    return bool(scratch) and np.shares_memory(array, scratch[0])


def _product(value: np.ndarray | RowScaled, factor: np.ndarray, scratch: list[np.ndarray] | None) -> np.ndarray | RowScaled:
    """``value * factor``, written into ``scratch`` (see :func:`_folded_for_signature`) when it may be.

    Only where the plain product would be a C-contiguous float64 array of ``value``'s shape: the
    same numbers in the same layout, so the signature sums them in the same order. With a
    scratch, a kernel and a factor per neuron (:meth:`RowScaled.fits`) are kept as such instead.
    """
    if isinstance(value, RowScaled):  # (made from a kernel that fits, by a factor that fits)
        if np.asarray(factor).dtype == np.float64 and factor.shape[0] in (1, value.shape[0]):
            return value.times(factor)
        value = value.whole()  # (not met: every factor here is a float64 vector over the neurons)
    elif scratch is not None and RowScaled.fits(value, np.asarray(factor)):
        return RowScaled(value, (), False).times(factor)
    if (
        scratch is None
        or not value.flags.c_contiguous
        or np.result_type(value, factor) != np.float64
        or np.broadcast_shapes(value.shape, factor.shape) != value.shape
    ):
        return value * factor
    if _in_scratch(value, scratch):  # already folded once: the second step is done in place
        return np.multiply(value, factor, out=value)
    if not scratch or scratch[0].size < value.size:
        scratch[:] = [np.empty(value.size)]
    return np.multiply(value, factor, out=scratch[0][: value.size].reshape(value.shape))


def signature_key(signature: list[np.ndarray]) -> tuple[tuple[tuple[int, ...], bytes], ...]:
    """A signature as a hashable value: bitwise equal ones are the same weight (or an equal copy) read twice."""
    return tuple((part.shape, part.tobytes()) for part in signature)


def twins(signatures: list[list[np.ndarray]]) -> np.ndarray:
    """Per site, the first site of the list whose signature is bitwise equal to its own."""
    first: dict[tuple[tuple[tuple[int, ...], bytes], ...], int] = {}
    return np.array([first.setdefault(signature_key(sig), n) for n, sig in enumerate(signatures)], dtype=np.int64)
