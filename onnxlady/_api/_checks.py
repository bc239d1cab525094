"""Checks of the public functions' scalar options, shared so every command says the same thing.

The command line hands its arguments to the public functions unchanged, so these checks are the
only ones: a bad value raises :class:`~onnxlady._errors.OnnxladyError` (one line, exit 2 on the
command line) before any file is read or written, never a NumPy error deep inside a step (exit 3).
Messages name the option as the command line spells it (``--seed``), which a Python caller
recognizes as the keyword of the same name.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np

from onnxlady._errors import OnnxladyError

#: Seeds are stored as int64 (watermark keys) and fed to ``numpy.random.default_rng``: 0 to 2**63 - 1.
SEED_LIMIT: int = 2**63


def check_seed(value: Any, option: str = "--seed") -> int:
    """A seed: a whole number from 0 to 2**63 - 1.

    Args:
        value: the seed given.
        option: the option's name, for the message.

    Returns:
        The seed as a Python ``int``.

    Raises:
        OnnxladyError: not a whole number, negative, or 2**63 or more.
    """
    if not _is_whole(value) or not 0 <= int(value) < SEED_LIMIT:
        raise OnnxladyError(f"{option} must be a whole number from 0 to {SEED_LIMIT - 1}, got {value!r}")
    return int(value)


def check_whole(value: Any, option: str, least: int, most: int | None = None) -> int:
    """A whole number in ``[least, most]`` (no upper bound when ``most`` is None).

    Raises:
        OnnxladyError: not a whole number (a bool or a float is not), or out of range.
    """
    if not _is_whole(value) or int(value) < least or (most is not None and int(value) > most):
        bound = f"from {least} to {most}" if most is not None else f">= {least}"
        raise OnnxladyError(f"{option} must be a whole number {bound}, got {value!r}")
    return int(value)


def check_number(value: Any, option: str, least: float = 0.0, most: float | None = None) -> float:
    """A finite real number in ``[least, most]`` (no upper bound when ``most`` is None).

    Raises:
        OnnxladyError: not a real number, NaN or infinite, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise OnnxladyError(f"{option} must be a finite number, got {value!r}")
    number = float(value)
    if number < least or (most is not None and number > most):
        bound = f"from {least:g} to {most:g}" if most is not None else f">= {least:g}"
        raise OnnxladyError(f"{option} must be a number {bound}, got {value!r}")
    return number


def _is_whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
