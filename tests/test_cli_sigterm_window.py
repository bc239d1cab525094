"""SIGTERM while the command line is parsed ends like SIGTERM during a command: one line, exit 143.

The handler that turns SIGTERM into an unwinding exception is set before the arguments are
parsed; a signal landing there (a fast command signalled early: the reliability test's SIGTERM
at a fifth of a 0.24 s permute) escaped ``main`` as a traceback instead.
"""

from __future__ import annotations

import signal

import pytest

from onnxlady import cli


def test_sigterm_while_parsing_is_one_line_and_143(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def terminated(_name: str | None) -> object:
        cli._terminate(signal.SIGTERM, None)
        raise AssertionError("unreachable")

    monkeypatch.setattr(cli, "build_parser", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["inspect", "model.onnx"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "onnxlady: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
