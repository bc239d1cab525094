"""The base every public result shares: a JSON document, a text rendering and an exit code."""

from __future__ import annotations

from typing import Any

from onnxlady._api._json_text import dumps_indented


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
