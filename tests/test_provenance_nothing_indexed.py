"""``index build`` that could read none of the files it was given fails (issue 17, session 13).

An index of nothing makes every later ``find`` answer "nothing derived": a build whose every
file is unreadable exits 2 with one line on stderr, the files still listed as unreadable.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from fixtures import FIXTURES
from onnxlady.cli import main


def _bad_files(folder: Path) -> list[Path]:
    folder.mkdir()
    junk = folder / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    cut = folder / "cut.onnx"
    cut.write_bytes(FIXTURES["vgg"](0).SerializeToString()[:200])  # a truncated download
    return [junk, cut]


def test_a_build_that_reads_no_file_exits_2_and_lists_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad_files(tmp_path / "registry")
    index = tmp_path / "r.idx"
    assert main(["index", "build", str(tmp_path / "registry"), "-o", str(index), "--workers", "1"]) == 2
    out, err = capsys.readouterr()
    for path in bad:
        assert f"unreadable: {path}" in out
    assert (
        len(err.strip().splitlines()) == 1
        and err.startswith("onnxlady: error: nothing indexed")
        and "Traceback" not in err
    )
    assert not index.exists()  # the index the failed build created is not left behind
    # Again, for one of the files: still nothing indexed.
    assert main(["index", "build", str(bad[0]), "-o", str(index), "--workers", "1", "--json"]) == 2
    out, err = capsys.readouterr()
    assert '"errors"' in out and "the only file given could not be read" in err


def test_a_build_with_one_readable_file_or_an_empty_folder_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _bad_files(tmp_path / "registry")
    onnx.save(FIXTURES["vgg"](0), tmp_path / "registry" / "good.onnx")
    index = tmp_path / "r.idx"
    assert main(["index", "build", str(tmp_path / "registry"), "-o", str(index), "--workers", "1"]) == 0
    assert capsys.readouterr().err == ""
    # Nothing changed: the good file is unchanged, the bad ones listed again, and that is no failure.
    assert main(["index", "build", str(tmp_path / "registry"), "-o", str(index), "--workers", "1"]) == 0
    (tmp_path / "empty").mkdir()
    assert main(["index", "build", str(tmp_path / "empty"), "-o", str(tmp_path / "e.idx")]) == 0
