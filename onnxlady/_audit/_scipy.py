"""The two scipy routines the forensics needs, without importing the scipy packages that hold them.

The forensics needs ``scipy.special.gammaincinv`` (chi-square quartiles) and
``scipy.sparse.linalg.eigsh`` (the top eigenvalue of a Gram matrix). Importing ``scipy.special``
pulls in scipy's array-API layer (numpy.f2py, charset_normalizer...) and ``scipy.sparse.linalg``
scipy.linalg and scipy.sparse: 0.15 to 0.35 s together, a quarter of the audit of a 12 MB model.
Both routines are compiled code that the packages only wrap:

- ``gammaincinv`` *is* the ufunc of ``scipy/special/_special_ufuncs`` (the package re-exports
  that object), loaded here from its file;
- ``eigsh(A, k=1, which="LA", v0=..., tol=...)`` of a dense symmetric float64 matrix is
  scipy's reverse-communication loop around ARPACK's ``dsaupd``/``dseupd``
  (``scipy/sparse/linalg/_eigen/arpack/_arpacklib``): :func:`top_eigenvalue` runs the same
  calls with the same arguments and the same matrix products, so the same value comes out bit
  for bit (``tests/test_audit_scipy.py`` compares them).

Where a compiled module cannot be loaded (another scipy layout) or ARPACK reports anything but
a normal exit, the public functions are imported and called instead, so the result is always
what scipy's own functions give.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["gammaincinv", "top_eigenvalue"]

_LOADED: dict[str, ModuleType | None] = {}


def _compiled(package: str, stem: str) -> ModuleType | None:
    """The extension module ``scipy.<package>.<stem>`` loaded from its file alone, or None."""
    key = f"{package}.{stem}"
    if key in _LOADED:
        return _LOADED[key]
    module = None
    try:
        scipy_spec = importlib.util.find_spec("scipy")
        if scipy_spec is not None and scipy_spec.origin is not None:
            folder = Path(scipy_spec.origin).parent.joinpath(*package.split("."))
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = folder / f"{stem}{suffix}"
                if path.is_file():
                    name = f"scipy.{package}.{stem}"
                    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
                    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
                    if spec is not None:
                        module = importlib.util.module_from_spec(spec)
                        loader.exec_module(module)
                    break
    except (ImportError, OSError):
        module = None
    _LOADED[key] = module
    return module


def gammaincinv(a: float, y: float) -> float:
    """``scipy.special.gammaincinv(a, y)``: the inverse of the regularized lower incomplete gamma."""
    module = _compiled("special", "_special_ufuncs")
    function = getattr(module, "gammaincinv", None) if module is not None else None
    if function is None:
        import scipy.special

        function = scipy.special.gammaincinv
    return float(function(a, y))


#: ``scipy.sparse.linalg._eigen.arpack``: WHICH_DICT["LA"] and choose_ncv(1).
_WHICH_LA = 6
_NCV = 20


def top_eigenvalue(gram: np.ndarray, tol: float) -> float | None:
    """``eigsh(gram, k=1, which="LA", v0=np.ones(n), tol=tol, return_eigenvectors=False)[0]``.

    ``gram`` is a C-contiguous symmetric float64 matrix larger than :data:`_NCV`. None where
    ARPACK did not converge (scipy raises ``ArpackNoConvergence`` there) or could not start
    (``ArpackError`` -9, see :func:`_public`).
    """
    n = gram.shape[0]
    arpack = _compiled("sparse.linalg._eigen.arpack", "_arpacklib")
    solver = getattr(arpack, "dsaupd_wrap", None) if arpack is not None else None
    extract = getattr(arpack, "dseupd_wrap", None) if arpack is not None else None
    if solver is None or extract is None or gram.dtype != np.float64 or n <= _NCV:
        return _public(gram, tol)
    try:
        return _arpack(gram, tol, solver, extract)
    except _UnusualExitError:
        return _public(gram, tol)
    except (TypeError, KeyError, ValueError):  # the wrapper's arguments changed (another scipy)
        return _public(gram, tol)


class _UnusualExitError(Exception):
    """ARPACK asked for something other than products or ended other than normally."""


def _arpack(gram: np.ndarray, tol: float, solver: Any, extract: Any) -> float | None:
    """The loop of scipy's ``_SymmetricArpackParams`` (mode 1, one eigenvalue, largest algebraic), step by step."""
    n = gram.shape[0]
    state: dict[str, Any] = {
        "tol": tol, "getv0_rnorm0": 0.0, "aitr_betaj": 0.0, "aitr_rnorm1": 0.0, "aitr_wnorm": 0.0,
        "aup2_rnorm": 0.0, "ido": 0, "which": _WHICH_LA, "bmat": 0, "info": 1, "iter": 0,
        "maxiter": n * 10, "mode": 1, "n": n, "nconv": 0, "ncv": _NCV, "nev": 1, "np": 0, "shift": 1,
        "getv0_first": 0, "getv0_iter": 0, "getv0_itry": 0, "getv0_orth": 0, "aitr_iter": 0,
        "aitr_j": 0, "aitr_orth1": 0, "aitr_orth2": 0, "aitr_restart": 0, "aitr_step3": 0,
        "aitr_step4": 0, "aitr_ierr": 0, "aup2_initv": 0, "aup2_iter": 0, "aup2_getv0": 0,
        "aup2_cnorm": 0, "aup2_kplusp": 0, "aup2_nev": 0, "aup2_nev0": 0, "aup2_np0": 0,
        "aup2_numcnv": 0, "aup2_update": 0, "aup2_ushift": 0,
    }  # fmt: skip
    resid = np.ones(n)  # v0, which ARPACK overwrites (info 1: use it)
    v = np.zeros((n, _NCV))
    workd = np.zeros(3 * n)
    workl = np.zeros(_NCV * (_NCV + 8))
    ipntr = np.zeros(11, dtype=np.int32)
    while True:
        solver(state, resid, v, ipntr, workd, workl)
        ido = state["ido"]
        x = slice(int(ipntr[0]), int(ipntr[0]) + n)
        y = slice(int(ipntr[1]), int(ipntr[1]) + n)
        if ido in (1, 5):  # y = OP x (mode 1: A x both), as scipy's MatrixLinearOperator computes it
            workd[y] = gram.dot(workd[x].reshape(-1, 1)).reshape(n)
        elif ido == 2:  # y = B x, B the identity
            workd[y] = workd[x]
        elif ido in (3, 4):  # user shifts or a random restart: scipy's own loop
            raise _UnusualExitError
        elif state["info"] == 0:
            break
        else:  # 1: no convergence; anything else an error: as scipy reports them
            raise _UnusualExitError
    state["info"] = 0
    d = np.zeros(1)
    z = np.zeros((n, _NCV), order="F")
    extract(state, False, 0, np.zeros(_NCV, dtype=np.int32), d, z, 0, resid, v, ipntr, workd, workl)
    if state["info"] != 0 or state["nconv"] < 1:
        raise _UnusualExitError
    return float(d[0])


def _public(gram: np.ndarray, tol: float) -> float | None:
    """The top eigenvalue by scipy's own ``eigsh``: None where it does not converge or cannot start.

    ARPACK refuses a start vector the matrix sends to zero (error -9, "starting vector is
    zero": the all-ones start where every row of the matrix sums to exactly zero, as in the
    Gram matrix of a change whose columns each sum to zero): the caller's full decomposition
    answers then, as where it does not converge (it was an internal error).
    """
    from scipy.sparse.linalg import ArpackError, eigsh

    try:
        top = eigsh(gram, k=1, which="LA", v0=np.ones(gram.shape[0]), tol=tol, return_eigenvectors=False)
    except ArpackError:  # ArpackNoConvergence is one too
        return None
    return float(top[0])
