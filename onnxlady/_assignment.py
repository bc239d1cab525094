"""The linear assignment solver: scipy's, without importing ``scipy.optimize``.

Resync, match and provenance search need only ``scipy.optimize.linear_sum_assignment``, a
compiled module (``scipy/optimize/_lsap``) that the package re-exports as is. Importing the
package to reach it also imports linprog, scipy.linalg, scipy.fft, scipy.special and the array
API layer: 0.5 to 1 s, more than resynchronizing a small model takes. The compiled module is
loaded on its own here; if that ever fails (another scipy layout), the public import is used,
so the function is always scipy's own.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_SOLVER: list[Callable[..., tuple[np.ndarray, np.ndarray]]] = []


def _load_compiled() -> Callable[..., tuple[np.ndarray, np.ndarray]] | None:
    """``scipy.optimize._lsap.linear_sum_assignment`` loaded from its file, or None."""
    name = "scipy.optimize._lsap"
    loaded = sys.modules.get(name)
    if loaded is not None:
        return getattr(loaded, "linear_sum_assignment", None)
    try:
        scipy_spec = importlib.util.find_spec("scipy")
        if scipy_spec is None or scipy_spec.origin is None:
            return None
        folder = Path(scipy_spec.origin).parent / "optimize"
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = folder / f"_lsap{suffix}"
            if path.is_file():
                loader = importlib.machinery.ExtensionFileLoader(name, str(path))
                spec = importlib.util.spec_from_file_location(name, path, loader=loader)
                if spec is None:
                    return None
                module = importlib.util.module_from_spec(spec)
                loader.exec_module(module)
                solver = getattr(module, "linear_sum_assignment", None)
                return solver if callable(solver) else None
    except (ImportError, OSError):
        return None
    return None


def linear_sum_assignment(cost: Any, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``scipy.optimize.linear_sum_assignment(cost, maximize)``: rows and their assigned columns.

    Args:
        cost: A 2-D cost (or, with ``maximize``, score) matrix.
        maximize: Find the assignment of largest total instead of smallest.

    Returns:
        The row indices and the column assigned to each, as scipy returns them.
    """
    if not _SOLVER:
        compiled = _load_compiled()
        if compiled is None:
            from scipy.optimize import linear_sum_assignment as public

            compiled = public
        _SOLVER.append(compiled)
    return _SOLVER[0](cost, maximize)
