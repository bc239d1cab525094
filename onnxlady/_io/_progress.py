"""Progress of long commands: a tqdm bar on terminals, one line every few seconds elsewhere.

Every layer reports through the ``progress`` callable the public API takes (``progress=``):

- ``progress(message)`` says a new stage began (``"resync: analysing the reference"``);
- :func:`advance` says how far a loop is (``advance(progress, "analysing nodes", 500, 2000)``).
  With a :class:`ProgressReporter` it moves the bar; with any other callable (a user's ``print``, a
  test's ``list.append``) it calls it with one line at every tenth of the loop, so plain
  callables never get a line per item.

The command line makes one :class:`ProgressReporter` per command (none with ``--quiet``). On a terminal
it draws a tqdm bar per loop and a status line per stage. On anything else (CI logs, pipes) a
bar is useless: it prints the current stage and fraction as one line every ``interval``
seconds, from a background thread, so a step that reports nothing for a minute (loading a
large model, an ONNX Runtime session) still shows the command is alive; commands that end
within ``interval`` print nothing.

This module sits in the lowest layer (``_io``) so that every layer can report.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

#: The callable every layer takes as ``progress``: called with one message per stage.
ProgressCallback = Callable[[str], None]

#: Seconds between two lines when stderr is not a terminal.
LINE_INTERVAL_S: float = 10.0


def advance(progress: Callable[..., object] | None, step: str, done: int, total: int) -> None:
    """Report that ``done`` of the ``total`` items of ``step`` are finished.

    Args:
        progress: the caller's progress callable, or ``None`` (nothing is reported); a callable
            without ``update`` gets ``"STEP DONE/TOTAL"`` lines.
        step: what the loop does, the same string for every call of one loop
            (``"permuting tensors"``).
        done: items finished so far (0 when the loop starts, ``total`` when it ends).
        total: items in the loop.
    """
    if progress is None or total <= 0:
        return
    update = getattr(progress, "update", None)
    if callable(update):
        update(step, done, total)
        return
    # A plain callable: one line when the loop starts, ends, or crosses a tenth.
    if done in (0, total) or done * 10 // total != (done - 1) * 10 // total:
        progress(f"{step} {done}/{total}")


def say(progress: ProgressCallback | None, message: str) -> None:
    """Report that a new stage begins (nothing when ``progress`` is ``None``)."""
    if progress is not None:
        progress(message)


class ProgressReporter:
    """The command line's progress display, called like any progress callable.

    Args:
        stream: where to write (default ``sys.stderr``).
        bar: draw tqdm bars (default: whether ``stream`` is a terminal); otherwise one line
            every ``interval`` seconds.
        interval: seconds between two lines when ``bar`` is false (default
            :data:`LINE_INTERVAL_S`).
        prefix: the start of each line (the program's name).

    Call :meth:`close` when the command ends: it removes the bar and stops the line printer.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        bar: bool | None = None,
        interval: float | None = None,
        prefix: str = "onnxlady",
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._bar_mode = _is_terminal(self._stream) if bar is None else bar
        self._interval = LINE_INTERVAL_S if interval is None else interval
        self._prefix = prefix
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._stage = ""  # the last stage message
        self._step: tuple[str, int, int] | None = None  # the loop in progress: (step, done, total)
        self._bar: Any = None  # the tqdm bar of the loop or stage shown
        self._bar_key: tuple[str, int] | None = None
        self._closed = threading.Event()
        self._printer: threading.Thread | None = None
        if not self._bar_mode:
            self._printer = threading.Thread(target=self._print_lines, name="onnxlady-progress", daemon=True)
            self._printer.start()

    def __call__(self, message: str) -> None:
        """A new stage begins: ``message`` says which."""
        with self._lock:
            self._stage = message
            self._step = None
            if self._bar_mode:
                self._show_bar(message, None, 0)

    def update(self, step: str, done: int, total: int) -> None:
        """``done`` of the ``total`` items of the loop ``step`` are finished.

        Args:
            step: what the loop does, as the bar shows it.
            done: the items finished so far.
            total: the items in the loop.
        """
        with self._lock:
            self._step = (step, done, total)
            if self._bar_mode:
                self._show_bar(step, total, done)

    def line(self) -> str:
        """The current state as one line (what a non-terminal gets every ``interval`` seconds)."""
        with self._lock:
            return self._line()

    def close(self) -> None:
        """Remove the bar (terminal) or stop the line printer; idempotent."""
        self._closed.set()
        if self._printer is not None:
            self._printer.join()
            self._printer = None
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    # -- internals -----------------------------------------------------------------------------
    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        text = self._stage
        if self._step is not None:
            step, done, total = self._step
            text = f"{step}: {100 * done / total:.0f}% ({done}/{total})"
        return f"{self._prefix}: [{elapsed:7.1f}s] {text}"

    def _print_lines(self) -> None:
        """Every ``interval`` seconds, the state as one line, until :meth:`close`."""
        while not self._closed.wait(self._interval):
            with self._lock:
                if not (self._stage or self._step):
                    continue
                line = self._line()
            # The same stage still prints, with its elapsed time: the command is alive.
            print(line, file=self._stream, flush=True)

    def _show_bar(self, description: str, total: int | None, done: int) -> None:
        """Show ``description`` in the bar: a new bar for a new loop or stage, else move it."""
        key = (description, -1 if total is None else total)
        if self._bar is None or self._bar_key != key:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(
                total=total,
                desc=description,
                file=self._stream,
                leave=False,
                dynamic_ncols=True,
                # A stage has no count: show only its name and the time spent.
                bar_format=None if total is not None else "{desc} [{elapsed}]",
            )
            self._bar_key = key
        if total is not None and done != self._bar.n:
            self._bar.update(done - self._bar.n)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
