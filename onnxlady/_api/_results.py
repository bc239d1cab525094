"""The base every public result shares: a JSON document, a text rendering and an exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from onnxlady._api._json_text import dumps_indented
from onnxlady._errors import OnnxladyError
from onnxlady._io._files import load_model


class Result:
    """A command's outcome, in the forms the command line prints.

    :meth:`to_json` is what ``onnxlady COMMAND --json`` prints, :meth:`to_text` what it prints
    without ``--json``, :attr:`exit_code` its exit status.
    """

    def to_json(self) -> dict[str, Any]:
        """The JSON document of this result: a dict of JSON types only (``json.dumps`` takes it)."""
        raise NotImplementedError

    def to_json_text(self) -> str:
        """What ``onnxlady COMMAND --json`` prints: ``json.dumps(self.to_json(), indent=2)``'s text.

        Written by :func:`onnxlady._api._json_text.dumps_indented`: the same characters, without
        the standard library's pure-Python indenting encoder (0.5 s on a 50,000-node ``inspect``).
        """
        return dumps_indented(self.to_json())

    def to_text(self) -> str:
        """The text the command line prints for this result."""
        raise NotImplementedError

    @property
    def exit_code(self) -> int:
        """0 for success; 1 for a negative verdict (outputs not equivalent, groups unmatched...)."""
        return 0


def read_back(output: Path | None, what: str) -> onnx.ModelProto:
    """The model a streamed command wrote to ``output``, read back (it never held it whole).

    Args:
        output: where the command wrote the model, or ``None`` when it wrote nothing.
        what: the model's description for the error (``"permuted"``).

    Returns:
        The written model, its external data loaded.

    Raises:
        OnnxladyError: nothing was written.
    """
    if output is None:
        raise OnnxladyError(f"the {what} model was neither kept nor written")
    return load_model(output).model
