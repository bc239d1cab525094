"""Python's cyclic garbage collector paused while a model is read and its graph's bookkeeping is built.

Analysing a graph allocates a few hundred container objects per node (index maps, rule
contexts, member records) and frees almost none of them until it ends. Each time enough
objects have been allocated, the collector walks the surviving ones again; over a graph of
50,000 nodes those walks were a quarter to a third of ``inspect``'s time, and a growing share
as the graph grows (``tools.bench``: 0.29 ms per node at 5,000 nodes, 0.46 at 50,000). The
analysis creates no reference cycles that must be freed while it runs, so it runs with the
collector paused; plain reference counting still frees everything else, and the collector
resumes when the analysis ends, with or without an error, and what the analysis made waits in
its oldest generation (see :func:`_age_survivors`) instead of being walked again at once.
Loading and validating a model is the same (a few containers per node, kept until it is read):
a tenth of ``load_model``'s time at 50,000 nodes went to the collector's walks.
(In ``_io``, the lowest layer, so that loading can use it.)
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["collector_paused"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_lock = threading.Lock()
_depth = 0  # calls inside a pause (nested, or from several threads)
_was_enabled = False  # the collector's state when the outermost pause began


def collector_paused(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``function`` with the cyclic garbage collector disabled, restored afterwards.

    Nested and concurrent calls share one pause: the collector is restored to the state it had
    before the first of them only when the last one ends, so a caller that had disabled it
    itself finds it still disabled.
    """

    @functools.wraps(function)
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        global _depth, _was_enabled
        with _lock:
            if _depth == 0:
                _was_enabled = gc.isenabled()
                gc.disable()
            _depth += 1
        try:
            return function(*args, **kwargs)
        finally:
            with _lock:
                _depth -= 1
                if _depth == 0 and _was_enabled:
                    _age_survivors()
                    gc.enable()

    return paused


def _age_survivors() -> None:
    """Move every object the collector tracks into its oldest generation, without walking them.

    The objects made during a pause are all young: left there, the first collection after it
    walks every one of them, and the next older one again (a quarter of a second each at
    50,000 nodes), to find the garbage cycles the analysis does not make. In the oldest
    generation they wait for the next full collection, which comes as often as it would have
    (it is paced by the objects that survive younger collections, not by these): cycles are
    freed later, never leaked. ``gc.freeze`` then ``gc.unfreeze`` is that move; it is skipped
    when the process froze objects of its own (``unfreeze`` would release those too).
    """
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()
