"""Errors that onnxlady reports to its users.

Every problem caused by the input (a file that is not ONNX, a key made for another model, a
missing external-data file, an unusable option) is raised as :class:`OnnxladyError`. The
command line prints its message as one line on stderr and exits with code 2, so callers never
see a traceback for bad input.
"""

from __future__ import annotations


class OnnxladyError(Exception):
    """Bad input or usage: the message is one line that says what is wrong and where."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        # One line on stderr: fold any newline a wrapped library message carries.
        super().__init__(" ".join(str(message).split()))
