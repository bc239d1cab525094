"""Issue 15, small models' fixed costs: syncs that run at once, inputs hashed only when recorded.

The output set runs the syncs of a commit that need not follow each other together, each in a
thread; these tests check that the order durability needs is kept (every staged file and
staging folder synced before the journal is written, the journal and its folder before the
first rename, the target folder after the renames) and that a failed sync, in whichever
thread, still aborts the whole set. Resync hashes only the input whose sha256 it records (the suspect, for its key).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx
import pytest

import onnxlady
from fixtures import FIXTURES
from onnxlady._api import _sources
from onnxlady._errors import OnnxladyError
from onnxlady._io import _files, _outputs
from onnxlady._io._files import load_model
from onnxlady._io._outputs import TEMP_PREFIX, OutputSet
from onnxlady.testing import permute_producer_only


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """The vgg fixture and a permuted copy of it (the twin suspect)."""
    base, suspect = tmp_path / "base.onnx", tmp_path / "suspect.onnx"
    onnx.save(FIXTURES["vgg"](0), str(base))
    onnxlady.permute(base, output=suspect, seed=3)
    return base, suspect


def _record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record every fsync (by the path its descriptor names) and every rename, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)
        events.append(("fsync", path))  # once it returned: durable from here on

    def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        events.append(("rename", os.fspath(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a descriptor's file")
def test_a_set_of_files_syncs_everything_before_the_journal_and_the_journal_before_the_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = FIXTURES["vgg"](0)
    journals: list[list[tuple[str, str]]] = []
    real_write_file = _outputs._write_file

    def write_file(path: Path, data: bytes) -> None:
        if path.name == "journal.json":
            journals.append(list(events))  # what was durable when the journal was written
        real_write_file(path, data)

    events = _record_syncs(monkeypatch)
    monkeypatch.setattr(_outputs, "_write_file", write_file)
    with OutputSet() as outputs:
        outputs.write_model(tmp_path / "m.onnx", model)
        outputs.write_text(tmp_path / "m.key.json", "{}")
        staged = [outputs.staged(tmp_path / "m.onnx"), outputs.staged(tmp_path / "m.key.json")]
    staging = staged[0].parent.parent
    assert len(journals) == 1
    before_journal = {path for kind, path in journals[0] if kind == "fsync"}
    # Both staged files and the sub-folder holding them were durable when the journal was written.
    assert {str(staged[0]), str(staged[1]), str(staged[0].parent)} <= before_journal
    first_rename = next(i for i, (kind, _) in enumerate(events) if kind == "rename")
    synced_before_renames = {path for kind, path in events[:first_rename] if kind == "fsync"}
    assert {str(staging / "journal.json"), str(staging)} <= synced_before_renames
    last_rename = max(i for i, (kind, _) in enumerate(events) if kind == "rename")
    assert ("fsync", str(tmp_path)) in events[last_rename:]
    assert (tmp_path / "m.key.json").read_text() == "{}"
    assert onnx.load(str(tmp_path / "m.onnx")) == model
    assert not [name for name in os.listdir(tmp_path) if name.startswith(TEMP_PREFIX)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a descriptor's file")
def test_a_single_file_is_synced_before_its_rename_and_its_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _record_syncs(monkeypatch)
    with OutputSet() as outputs:
        outputs.write_text(tmp_path / "only.txt", "text")
        staged = outputs.staged(tmp_path / "only.txt")
    rename = events.index(("rename", str(tmp_path / "only.txt")))
    assert ("fsync", str(staged)) in events[:rename]
    assert ("fsync", str(tmp_path)) in events[rename:]
    assert (tmp_path / "only.txt").read_text() == "text"


@pytest.mark.parametrize("with_key", [False, True])
def test_a_failed_sync_aborts_the_whole_set(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_key: bool
) -> None:
    """Alone, the model is synced in the main thread; beside it, its key in another: either failing refuses the set."""
    base, _ = models
    real = _outputs._fsync_path
    failing_name = "k.json" if with_key else "out.onnx"

    def failing(path: Path) -> None:
        if path.name == failing_name:
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(_outputs, "_fsync_path", failing)
    out = tmp_path / "out.onnx"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OnnxladyError, match="Input/output error"):
        onnxlady.permute(base, output=out, seed=1, key_out=(tmp_path / "k.json") if with_key else None)
    assert sorted(os.listdir(tmp_path)) == before


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files hashed from now on (``file_sha256`` wherever the commands call it)."""
    hashed: list[str] = []
    real = _files.file_sha256

    def counting(path: str | os.PathLike[str]) -> str:
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(_files, "file_sha256", counting)
    monkeypatch.setattr(_sources, "file_sha256", counting)
    return hashed


def test_resync_hashes_only_the_suspect_and_only_for_its_key(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, suspect = models
    hashed = _count_hashes(monkeypatch)
    onnxlady.resync(base, suspect, output=tmp_path / "a.onnx")
    assert hashed == []  # the bytes of neither input are recorded: neither is read to be hashed
    onnxlady.resync(base, suspect, output=tmp_path / "b.onnx", key_out=tmp_path / "b.json")
    assert hashed == ["suspect.onnx"]
    key = json.loads((tmp_path / "b.json").read_text())
    assert key["permuted"]["sha256"] == hashlib.sha256(suspect.read_bytes()).hexdigest()
    # Both outputs are the same file; the key names it by its sha256.
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert key["source"]["sha256"] == hashlib.sha256((tmp_path / "b.onnx").read_bytes()).hexdigest()
    # And the resync is a real one: unpermuting the suspect with the key gives the output, which
    # computes what the base computes; a wrongly permuted copy of the output is caught.
    restored = onnxlady.unpermute(suspect, key=tmp_path / "b.json", output=tmp_path / "u.onnx")
    assert restored.output_identical_to_source_file is True
    check = onnxlady.verify(base, tmp_path / "b.onnx", provider="cpu")
    assert check.equivalent and check.exit_code == 0
    wrong = onnx.load(str(tmp_path / "b.onnx"))
    permute_producer_only(wrong, onnxlady.analyze(wrong))
    caught = onnxlady.verify(base, wrong, provider="cpu")
    assert not caught.equivalent and caught.exit_code == 1


def test_a_model_loaded_without_its_digest_hashes_its_file_when_asked(models: tuple[Path, Path]) -> None:
    base, _ = models
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    assert load_model(base).sha256 == digest
    assert load_model(base, digest=False).sha256 is None
    opened = _sources.open_model(base, digest=False)
    assert opened.sha256 is None
    # The file's sha256, never that of the model serialized again (which may differ).
    assert opened.content_sha256() == digest and opened.sha256 == digest


def test_perturb_and_match_read_no_input_to_hash_it(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither records a sha256 of its inputs: their files are parsed, never hashed."""
    base, suspect = models
    hashed = _count_hashes(monkeypatch)
    perturbed = onnxlady.perturb(base, output=tmp_path / "noisy.onnx", noise=0.1, seed=3)
    assert perturbed.exit_code == 0 and (tmp_path / "noisy.onnx").read_bytes() != base.read_bytes()
    matched = onnxlady.match(base, suspect)
    assert matched.exit_code == 0
    assert hashed == []
    # The loader still hashes when asked (the default): the counter counts.
    load_model(base)
    assert hashed == ["base.onnx"]
