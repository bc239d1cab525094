"""Constants read when the audit asks for them: bounded memory for weights left in their files.

A model loaded with ``map_external=True`` keeps its large tensors in their data files
(:mod:`onnxlady._io._external`). The audit reads its constants by name, one tensor (or one
group) at a time; holding every array of the reference, the suspect and the re-synchronized
suspect at once was its peak memory (2.1-2.4x such a model). For such models:

- :class:`LazyConstants` maps names to arrays computed when indexed (a memory map of the file,
  or the re-synchronized suspect's tensor moved from the suspect's file) and not kept, except
  the last one read where asked (a tensor is often indexed several times in a row);
- :class:`Overlay` is a mapping's values with some replaced by arrays of the caller's own (the
  float64 copies the scale analysis undoes scales in), the mapping itself never changed.

The reference of an inline model (views of its file) is read per step, not held
(:func:`reference_constants`): as views where a step only gathers rows or compares values
(:class:`FileViews`), as an aligned copy of one tensor at a time where it needs aligned arrays
(:class:`ReadEachTime`); a step that reads a few tensors per neuron holds them for its own
length (:class:`Held`). The moved tensors are then the audit's only model's worth held.

Other inline models keep plain dicts (:func:`constants_of`): their arrays are views of the model's
bytes, in memory or mapped from the ``.onnx`` file (:func:`onnxlady._io._external.map_inline_payloads`),
each read once; the re-synchronized suspect of such a model keeps each moved tensor once computed,
until its last reader (the classification of the change) has it let go (:meth:`LazyConstants.release`).
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping

import numpy as np
import onnx
from onnx import helper

from onnxlady._io._external import has_mapped, has_mapped_external, is_mapped, mapped_bytes
from onnxlady._io._tensors import read_array, read_constants, require_loaded, tensor_holders
from onnxlady._resync._solver import ResyncResult
from onnxlady._resync._twin import MovedTensor

__all__ = [
    "FileViews",
    "Held",
    "LazyConstants",
    "Overlay",
    "ReadEachTime",
    "constants_of",
    "gather",
    "reference_constants",
    "resynced_constants",
]


class LazyConstants(Mapping[str, np.ndarray]):
    """Arrays by name, each computed by its loader when indexed; none kept but (optionally) the last.

    ``in``, ``len`` and iteration read no array.
    """

    def __init__(
        self, loaders: dict[str, Callable[[], np.ndarray]], *, keep_last: bool = False, keep_all: bool = False
    ) -> None:
        """Read nothing yet.

        Args:
            loaders: per name, in iteration order, what computes its array.
            keep_last: keep the last array read until another name is read (for arrays costly to
                compute, indexed several times in a row).
            keep_all: keep every array once read (arrays costly to compute, read in no
                particular order, where holding them all is no more than the model itself).
        """
        self._loaders = loaders
        self._keep_last = keep_last
        self._kept: dict[str, np.ndarray] | None = {} if keep_all else None
        self._last: tuple[str, np.ndarray] | None = None
        # Two threads of the audit may read arrays kept all (see _beside): each computed once.
        self._computing = threading.Lock()

    @property
    def keeps_all(self) -> bool:
        """Whether every array is kept once read (until :meth:`release`)."""
        return self._kept is not None

    def __getitem__(self, name: str) -> np.ndarray:
        kept_all = self._kept  # (read once: the fields are read by one thread as another sets them)
        if kept_all is not None:
            kept = kept_all.get(name)
            if kept is None:
                with self._computing:
                    kept = kept_all.get(name)
                    if kept is None:
                        kept = kept_all[name] = self._loaders[name]()
            return kept
        last = self._last
        if last is not None and last[0] == name:
            return last[1]
        self._last = None  # the previous array goes before the next one is computed
        value = self._loaders[name]()
        if self._keep_last:
            self._last = (name, value)
        return value

    def release(self) -> None:
        """Let go of every array kept: from here each is computed when indexed, only the last one kept.

        For a caller whose remaining reads take each array once (or a few times in a row).
        """
        self._kept, self._keep_last = None, True

    def __contains__(self, name: object) -> bool:
        return name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


class Overlay(MutableMapping[str, np.ndarray]):
    """``base``'s arrays, with those set on the overlay replacing them (``base`` is never changed).

    Iteration follows ``base``'s order, then names only the overlay holds: what ``dict(base)``
    updated in place gives.
    """

    def __init__(self, base: Mapping[str, np.ndarray], own: dict[str, np.ndarray] | None = None) -> None:
        self._base = base
        self._own: dict[str, np.ndarray] = {} if own is None else own

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._own:
            return self._own[name]
        return self._base[name]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self._own[name] = value

    def __delitem__(self, name: str) -> None:
        if name in self._base:
            raise KeyError(f"{name} belongs to the underlying mapping")
        del self._own[name]

    def __contains__(self, name: object) -> bool:
        return name in self._own or name in self._base

    def __iter__(self) -> Iterator[str]:
        yield from self._base
        yield from (name for name in self._own if name not in self._base)

    def __len__(self) -> int:
        return len(self._base) + sum(1 for name in self._own if name not in self._base)

    def copy(self) -> Overlay:
        """The same arrays; names set on the copy later do not reach this overlay (``dict.copy``)."""
        return Overlay(self._base, dict(self._own))


def _reader(holder: onnx.TensorProto, label: str, aligned: bool = False) -> Callable[[], np.ndarray]:
    """What reads ``holder``: as a plain array, an aligned copy of it with ``aligned`` (see :func:`_plain`)."""
    if aligned:
        return lambda: _plain(read_array(holder, label))
    return lambda: np.asarray(read_array(holder, label))  # read anew at each index: never copied


def _plain(values: np.ndarray) -> np.ndarray:
    """``values`` as a plain, aligned array: a view where it is one, else a copy.

    numpy's memmap subclass wraps the result of every operation on it (a gather per neuron row)
    at a cost beyond the gather's own. A tensor mapped from an inline ``.onnx`` file starts
    wherever protobuf put its bytes, often at an address its item size does not divide: numpy
    reads such an array element by element (one neuron row's gather took milliseconds, the
    audit of a 118 MB model a minute), so it is copied once instead.
    """
    plain = np.asarray(values)
    return plain if plain.flags.aligned else np.array(plain)


def constants_of(model: onnx.ModelProto, which: str, *, aligned: bool = True) -> Mapping[str, np.ndarray]:
    """Every constant of the main graph, as :func:`read_constants` reads them.

    For a model with tensors left in their files, a :class:`LazyConstants` that reads each one
    (a memory map) when indexed; a plain dict otherwise.

    Args:
        model: the model (views of its file, weights left in their files, or loaded).
        which: the model's role, for messages.
        aligned: copy the views of an inline file that are not aligned (see :func:`_plain`).
            False leaves them as views, for a caller that compares whole arrays or gathers a
            few rows through :func:`gather` only: copies of most of a model cost their page
            faults (fresh memory: a large audit's system time is mostly those) and the memory.

    Raises:
        OnnxladyError: a constant's external data was not loaded.
    """
    if not has_mapped(model):
        return read_constants(model, which)
    if not has_mapped_external(model) and not aligned:
        return {
            name: np.asarray(read_array(holder, f"tensor '{name}' of the {which}"))
            for name, holder in tensor_holders(model).items()
        }
    if not has_mapped_external(model):
        # Views of the inline file itself: each one mapped once and kept, as plain aligned arrays
        # (see _plain). Mapped again at every index, gathers per neuron row cost more than the
        # rest of the audit.
        # One tensor at a time: a copied view's mapping (its pages count as the process's
        # memory once read) goes before the next one is read.
        return {
            name: _plain(read_array(holder, f"tensor '{name}' of the {which}"))
            for name, holder in tensor_holders(model).items()
        }
    loaders = {}
    for name, holder in tensor_holders(model).items():
        label = f"tensor '{name}' of the {which}"
        require_loaded(holder, label)  # refused up front, as read_constants does
        loaders[name] = _reader(holder, label)
    return LazyConstants(loaders)


class FileViews(LazyConstants):
    """Views of an inline file's tensors, each mapped when indexed and not kept: never copied.

    For readers exact whatever an array's alignment: those that gather rows (:func:`gather`)
    or compare values element by element (equality, maxima). The pages a view touched leave
    the process's memory with the view.
    """


class ReadEachTime(LazyConstants):
    """The reference's constants from views of its inline file, an aligned copy made at each index.

    Each copy is what :func:`constants_of` keeps for the tensor (the same array); only the
    last one read is kept. The audit holds the re-synchronized suspect's moved tensors whole;
    holding the reference's copies whole beside them made its peak twice the model. ``views``
    reads the same tensors uncopied (:class:`FileViews`).
    """

    def __init__(self, model: onnx.ModelProto, which: str) -> None:
        holders = tensor_holders(model)
        labels = {name: f"tensor '{name}' of the {which}" for name in holders}
        super().__init__({name: _reader(holders[name], labels[name], aligned=True) for name in holders}, keep_last=True)
        self.views = FileViews({name: _reader(holders[name], labels[name]) for name in holders})


class Held(Mapping[str, np.ndarray]):
    """``base``'s arrays, each kept once read, for one step that reads a few tensors many times.

    A step that reads them per neuron (the scale analysis of one group) then maps each once.
    """

    def __init__(self, base: Mapping[str, np.ndarray]) -> None:
        self._base = base
        self._held: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        held = self._held.get(name)
        if held is None:
            held = self._held[name] = self._base[name]
        return held

    def __contains__(self, name: object) -> bool:
        return name in self._base

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def reference_constants(model: onnx.ModelProto, which: str) -> Mapping[str, np.ndarray]:
    """The reference's constants for the audit: :class:`ReadEachTime` for views of an inline file.

    Otherwise what :func:`constants_of` gives (loaded arrays, or weights left in their files).
    """
    if has_mapped(model) and not has_mapped_external(model):
        return ReadEachTime(model, which)
    return constants_of(model, which)


def gather(array: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
    """``np.take(array, indices, axis=axis)``, the same elements, also fast where ``array`` is not aligned.

    numpy copies the elements of an array its item size does not align one at a time (a view of
    an inline file, see :func:`_plain`): the bytes are gathered instead, as an array of single
    bytes with the element's bytes as a last axis, then read as the element type again (a new
    array, aligned). The same bits, hence the same values.
    """
    if array.flags.aligned or not array.flags.c_contiguous or array.dtype.hasobject or not array.ndim:
        return np.take(array, indices, axis=axis)
    size = array.dtype.itemsize
    raw = array.reshape(-1).view(np.uint8).reshape((*array.shape, size))
    taken = np.take(raw, indices, axis=axis if axis >= 0 else axis + array.ndim)
    return taken.view(array.dtype).reshape(taken.shape[:-1])


def _moved(compute: Callable[[], np.ndarray], dtype: np.dtype, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    # The moved elements are opaque (bytes of the stored type): read as the stored type.
    return lambda: compute().view(dtype).reshape(shape)


def resynced_constants(result: ResyncResult) -> Mapping[str, np.ndarray] | None:
    """The re-synchronized twin suspect's constants computed on demand, or None where it cannot.

    A twin of a model whose weights stay in their files comes back unbuilt with a function per
    moved tensor (see :attr:`ResyncResult.unbuilt`): each tensor is computed from the suspect's
    file and the match when indexed, the last one kept (every one, for views of an inline
    file); every other constant is read from the suspect. None for any other result (built, bytes overrides, packed sub-byte types, a
    big-endian machine).
    """
    unbuilt = result.unbuilt if result.built is None else None
    if unbuilt is None or sys.byteorder != "little":
        return None
    suspect, overrides = unbuilt
    if not any(callable(value) for value in overrides.values()):
        return None
    # Views of an inline suspect (no external data file): every array computed once and kept,
    # the moved tensors as the moved bytes of a suspect read whole would be. Computed anew
    # whenever another tensor was read in between, they were moved once per neuron row.
    inline = not has_mapped_external(suspect)
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    for name, holder in tensor_holders(suspect).items():
        value = overrides.get(name)
        label = f"tensor '{name}' of the re-synchronized suspect"
        if value is None:
            loaders[name] = _reader(holder, label, aligned=inline)
            continue
        if not callable(value):
            return None
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(holder.data_type))
        shape = tuple(int(d) for d in holder.dims)
        stored = mapped_bytes(holder).nbytes if is_mapped(holder) else len(holder.raw_data)
        if dtype.itemsize * math.prod(shape) != stored:  # packed sub-byte types: onnx unpacks them
            return None
        # The audit never writes the key: the moved tensor is not hashed for its digest (the
        # digest stays pending, computed if ever read): sha256 of every moved weight, 5 % of a twin's audit.
        loaders[name] = _moved(value.unhashed if isinstance(value, MovedTensor) else value, dtype, shape)
    return LazyConstants(loaders, keep_last=True, keep_all=inline)
