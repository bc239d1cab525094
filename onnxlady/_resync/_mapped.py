"""Twin resync of models whose weights stay in their external files: arrays read on demand.

A model loaded with :func:`onnxlady._io._files.load_model` (``map_external=True``) keeps its
large tensors in their data files. The twin solver (:class:`~onnxlady._resync._solver.ResyncState`)
holds one array per planned tensor for each model, the suspect's moved as groups are solved;
for such models these lists hold no arrays at all:

- :class:`StoredArrays` reads a tensor (:func:`~onnxlady._io._tensors.read_float`: a memory map
  of its file, or a view of its inline bytes) each time the solver asks for it, and keeps
  nothing: the pages are released as soon as the solver drops the array;
- :class:`AlignedArrays` gives the suspect's tensor with every match found so far applied in
  one gather (``take`` by ``index_array(expr, match)`` on each axis), which is what the solver's
  chain of per-group gathers holds, element for element; :class:`MappedState` therefore
  applies nothing when a group is solved.

Memory is then the graph and the tensors of the group being solved, not both models.

An inline reference gets the same treatment in part (:class:`ReleasedArrays`,
:class:`ReleasingState`): each of its tensors is read when a group first needs it and dropped
once the last group permuting it is solved, so the reference's weights are not held whole
beside the suspect's working copies (a model's size less, of the peak).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import SupportsIndex, overload

import numpy as np

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._resync._solver import ResyncState
from onnxlady._transforms._permute import _take_axes

__all__ = ["AlignedArrays", "MappedState", "ReleasedArrays", "ReleasingState", "StoredArrays", "final_axes"]

_NOTHING = np.zeros(0)


class StoredArrays(list[np.ndarray]):
    """Per plan, a tensor's values read when asked for (``read(plan)``), never kept.

    A list (the solver's type) whose items are computed: indexing by a plan number calls
    ``read``; the stored items are placeholders.
    """

    def __init__(self, count: int, read: Callable[[int], np.ndarray]) -> None:
        super().__init__([_NOTHING] * count)
        self._read = read

    @overload
    def __getitem__(self, index: SupportsIndex) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: SupportsIndex | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        position = index.__index__()
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(index)
        return self._read(position)

    def __iter__(self) -> Iterator[np.ndarray]:  # list's own iterator would give the placeholders
        return (self[i] for i in range(len(self)))


def final_axes(analysis: ChannelAnalysis, plan: int, match: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """The gathers that put plan ``plan``'s stored tensor in the order ``match`` gives (identity axes left out)."""
    axes = []
    perms = analysis.perms_from_match(match)  # (the blocks' own orders named by their blocks)
    for axis, expr in analysis.tensors[plan].axes:
        index = analysis.index_array(expr, perms)
        if not np.array_equal(index, np.arange(index.size)):
            axes.append((axis, index))
    return axes


class AlignedArrays(StoredArrays):
    """Per plan, the suspect's stored tensor with the current matches of a :class:`MappedState` applied."""

    def __init__(self, count: int, read: Callable[[int], np.ndarray], analysis: ChannelAnalysis) -> None:
        super().__init__(count, self._aligned)
        self._stored = read
        self._analysis = analysis
        self._state: ResyncState | None = None  # bound by MappedState (its match is reassigned by run)

    def bind(self, state: ResyncState) -> None:
        self._state = state

    def _aligned(self, plan: int) -> np.ndarray:
        match = self._state.match if self._state is not None else {}
        axes = final_axes(self._analysis, plan, match)
        stored = self._stored(plan)
        return _take_axes(stored, axes) if axes else stored

    def __setitem__(self, index: SupportsIndex | slice, value: Iterable[np.ndarray] | np.ndarray) -> None:
        # The aligned arrays follow the matches: nothing to store.
        return


@dataclass
class MappedState(ResyncState):
    """A :class:`ResyncState` whose ``work`` is an :class:`AlignedArrays`: solving moves no array."""

    def __post_init__(self) -> None:
        if isinstance(self.work, AlignedArrays):
            self.work.bind(self)

    def _apply(self, plan_index: int, gid: str, step: np.ndarray) -> None:
        if isinstance(self.work, AlignedArrays):
            return  # solve() updated self.match first: the work arrays follow it
        super()._apply(plan_index, gid, step)


class ReleasedArrays(StoredArrays):
    """Per plan, a tensor's values read when first asked for, kept until :meth:`release`.

    A released plan asked for again is read again (the Psi report reads every group's slices
    once more after the solve).
    """

    def __init__(self, count: int, read: Callable[[int], np.ndarray]) -> None:
        super().__init__(count, self._kept)
        self._source = read
        self._cache: dict[int, np.ndarray] = {}
        self._released: set[int] = set()

    def _kept(self, plan: int) -> np.ndarray:
        cached = self._cache.get(plan)
        if cached is not None:
            return cached
        values = self._source(plan)
        if plan not in self._released:
            self._cache[plan] = values
        return values

    def release(self, plan: int) -> None:
        """Drop plan ``plan``'s values (read anew, and not kept, if asked for later)."""
        self._cache.pop(plan, None)
        self._released.add(plan)


@dataclass
class ReleasingState(ResyncState):
    """A :class:`ResyncState` whose ``reference`` is a :class:`ReleasedArrays`.

    Each plan's values are dropped once every group permuting it is solved; never with
    ``refine`` (its rounds solve every group again).
    """

    def __post_init__(self) -> None:
        self._left: dict[int, int] = {}  # per plan: groups still to solve that permute it
        for group in self.order:
            for plan in self.touched[group.id]:
                self._left[plan] = self._left.get(plan, 0) + 1

    def solve(self, gid: str, solved: frozenset[str], aligned: bool) -> bool:
        changed = super().solve(gid, solved, aligned)
        if not self.options.refine and isinstance(self.reference, ReleasedArrays):
            for plan in self.touched[gid]:
                self._left[plan] -= 1
                if self._left[plan] == 0:
                    self.reference.release(plan)
        return changed
