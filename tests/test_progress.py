"""Progress: a tqdm bar on terminals, periodic lines elsewhere, nothing with --quiet."""

from __future__ import annotations

import io
import time
from pathlib import Path

import onnx
import pytest

from fixtures import FIXTURES
from onnxlady._io import _progress
from onnxlady._io._progress import ProgressReporter, advance
from onnxlady.cli import main


def test_a_plain_callable_gets_a_line_per_tenth() -> None:
    lines: list[str] = []
    for done in range(101):
        advance(lines.append, "permuting tensors", done, 100)
    assert lines == [f"permuting tensors {k}/100" for k in range(0, 101, 10)]
    advance(lines.append, "empty loop", 0, 0)  # nothing to count: nothing said
    assert len(lines) == 11


def test_lines_every_interval_when_not_a_terminal() -> None:
    stream = io.StringIO()
    reporter = ProgressReporter(stream, bar=False, interval=0.02)
    reporter("loading the model m.onnx")
    time.sleep(0.1)
    reporter.update("analysing nodes", 250, 1000)
    time.sleep(0.1)
    reporter.close()
    lines = stream.getvalue().splitlines()
    assert any(line.endswith("loading the model m.onnx") for line in lines)
    assert any(line.endswith("analysing nodes: 25% (250/1000)") for line in lines)
    assert all(line.startswith("onnxlady: [") for line in lines)
    reporter.close()  # closing twice is harmless
    after = len(stream.getvalue())
    time.sleep(0.06)
    assert len(stream.getvalue()) == after, "the line printer stopped"


def test_quick_commands_print_nothing_when_not_a_terminal() -> None:
    stream = io.StringIO()
    reporter = ProgressReporter(stream, bar=False, interval=60)
    reporter.update("analysing nodes", 1, 2)
    reporter.close()
    assert stream.getvalue() == ""


def test_a_bar_on_terminals() -> None:
    stream = io.StringIO()
    reporter = ProgressReporter(stream, bar=True)
    reporter("loading the model m.onnx")
    for done in range(0, 101, 20):
        reporter.update("permuting tensors", done, 100)
    reporter.close()
    shown = stream.getvalue()
    # tqdm redraws at most every 0.1 s: the bar is there, with its count.
    assert "loading the model m.onnx" in shown and "permuting tensors" in shown and "/100" in shown


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_progress_and_quiet(
    quiet: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_progress, "LINE_INTERVAL_S", 0.001)
    onnx.save(FIXTURES["resnet"](0), tmp_path / "m.onnx")
    argv = ["permute", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--json"]
    assert main(argv + (["--quiet"] if quiet else [])) == 0
    captured = capsys.readouterr()
    assert captured.out.lstrip().startswith("{")  # stdout holds only the document
    if quiet:
        assert captured.err == ""
    else:
        assert "onnxlady: [" in captured.err
