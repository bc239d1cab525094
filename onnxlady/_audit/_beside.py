"""A step of the audit computed in a thread beside the main one, its value the same as in line.

The audit's steps run one after another on one core: the similarity of the suspect as stored
waited for nothing but ran before the resync, and that of the re-synchronized suspect before
the comparison of its constants, each reading its own rows only. numpy lets go of the GIL in
the gathers and products they are made of, so on a machine of two cores (the benchmark's) either
runs beside the other step at no cost in CPU time. The value is the one the same call gives in
line (the same operations on the same arrays, in the same order within the step), and an
error is raised where the caller asks for the value (with :meth:`Beside.error`, a caller whose
own step failed meanwhile raises the earlier step's error first, as in line).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Beside"]

_T = TypeVar("_T")


class Beside(Generic[_T]):
    """``function(*args)`` computed in a thread of its own from now on; :meth:`result` waits for it."""

    def __init__(self, function: Callable[..., _T], *args: Any) -> None:
        self._value: _T | None = None
        self._error: BaseException | None = None
        # A daemon: an interrupted audit exits without waiting for a step whose value nobody reads.
        self._thread = threading.Thread(target=self._run, args=(function, args), name="onnxlady-beside", daemon=True)
        self._thread.start()

    def _run(self, function: Callable[..., _T], args: tuple[Any, ...]) -> None:
        try:
            self._value = function(*args)
        except BaseException as error:  # handed to the caller by result(), as the call in line raises it
            self._error = error

    def result(self) -> _T:
        """The value, once computed; the step's own error raised here where it raised one."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def error(self) -> BaseException | None:
        """The step's error (None when it returned), once it is done."""
        self._thread.join()
        return self._error
