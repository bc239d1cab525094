"""Fresh memory for large arrays on ordinary pages, not transparent huge pages, while a command runs.

numpy asks the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on every array
of 4 MiB or more, each zeroed whole when first touched. On the benchmark machine (a virtual
machine, the kernel's ``transparent_hugepage`` in ``madvise`` mode), first touching 490 MB of
fresh arrays cost 0.57-1.4 s of system time with huge pages and 0.21 s with ordinary ones (five
and four runs). An audit allocates more than a model's worth of arrays (aligned copies of the
reference's weights, the re-synchronized suspect's moved tensors, the forensics' work arrays):
its system time was over a third of its time at 529 MB (6.9 of 18.7 s), 2.4 s with ordinary pages.

:func:`ordinary_pages` turns numpy's request off while a block runs and restores the setting
after (it is numpy's, process-wide: a caller's own arrays allocated meanwhile get ordinary
pages too; values are unchanged either way). Where numpy has no such switch, nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["ordinary_pages"]


def _switch() -> Callable[[bool], bool] | None:
    """The switch of numpy's huge page requests, ``_set_madvise_hugepage`` (it returns the previous setting), or None."""
    core: Any = getattr(np, "_core", None) or getattr(np, "core", None)
    multiarray = getattr(core, "multiarray", None)
    switch = getattr(multiarray, "_set_madvise_hugepage", None)
    return switch if callable(switch) else None


@contextmanager
def ordinary_pages() -> Generator[None, None, None]:
    """Large numpy arrays allocated inside the block get ordinary pages (see the module docstring)."""
    switch = _switch()
    if switch is None:
        yield
        return
    previous = bool(switch(False))
    try:
        yield
    finally:
        switch(previous)
