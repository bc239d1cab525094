"""Issue 15, small models' fixed costs: syncs that run at once, inputs hashed only when recorded.

The output set runs the syncs of a commit that need not follow each other together, each in a
thread; these tests check that the order durability needs is kept (every staged file and
staging folder synced before the journal is written, the journal and its folder before the
first rename, the target folder after the renames) and that a failed sync, in whichever
thread, still aborts the whole set. Resync hashes only the input whose sha256 it records (the suspect, for its key).
Permute and unpermute hash their input in a thread of their own, beside the work that does not
need its sha256 (the analysis; the reading of the key), and wait for it only where it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

import onnxlady
from fixtures import FIXTURES
from onnxlady._api import _permute as _permute_api
from onnxlady._api import _resync as _resync_api
from onnxlady._api import _sources
from onnxlady._api import _unpermute as _unpermute_api
from onnxlady._errors import OnnxladyError
from onnxlady._io import _digest, _files, _outputs
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

    _hash_with(monkeypatch, counting)
    return hashed


def _hash_with(monkeypatch: pytest.MonkeyPatch, function: Callable[[str | os.PathLike[str]], str]) -> None:
    """``function`` as ``file_sha256`` wherever the commands call it."""
    for module in (_files, _sources, _digest):
        monkeypatch.setattr(module, "file_sha256", function)


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


def _hash_waiting_for(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[bool]:
    """Make every hash wait (10 s at most) until ``module.name`` is called: whether it was, per hash."""
    called, waited = threading.Event(), []
    real_function, real_hash = getattr(module, name), _files.file_sha256

    def calling(*args: Any, **kwargs: Any) -> Any:
        called.set()
        return real_function(*args, **kwargs)

    def hashing(path: str | os.PathLike[str]) -> str:
        waited.append(called.wait(timeout=10))
        return real_hash(path)

    monkeypatch.setattr(module, name, calling)
    _hash_with(monkeypatch, hashing)
    return waited


def test_permute_hashes_its_input_while_the_model_is_analysed(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load does not wait for the input's hash: the analysis starts while it runs; the key records it."""
    base, _ = models
    waited = _hash_waiting_for(monkeypatch, _permute_api, "analyze")
    result = onnxlady.permute(base, output=tmp_path / "p.onnx", seed=1)
    # (a load that waits for the hash never lets the analysis start first: the hash waits in vain)
    assert waited == [True]
    assert result.key.source_sha256 == hashlib.sha256(base.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "p.onnx.key.json").read_text())["source"]["sha256"] == result.key.source_sha256


def test_resync_hashes_the_suspect_while_it_resyncs(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suspect's sha256 (for the key) is awaited only when the key is written."""
    base, suspect = models
    waited = _hash_waiting_for(monkeypatch, _resync_api, "resync_model")
    onnxlady.resync(base, suspect, output=tmp_path / "r.onnx", key_out=tmp_path / "r.json")
    assert waited == [True]
    key = json.loads((tmp_path / "r.json").read_text())
    assert key["permuted"]["sha256"] == hashlib.sha256(suspect.read_bytes()).hexdigest()


def test_unpermute_hashes_its_model_while_the_key_is_read(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's hash starts before the key is read; a model that is not the key's is still refused."""
    _, suspect = models
    key = suspect.with_name(suspect.name + ".key.json")
    hashing, began = threading.Event(), []
    real_hash, real_open_key = _files.file_sha256, _unpermute_api.open_key

    def hash_file(path: str | os.PathLike[str]) -> str:
        hashing.set()
        return real_hash(path)

    def open_key(*args: Any, **kwargs: Any) -> Any:
        began.append(hashing.wait(timeout=10))
        return real_open_key(*args, **kwargs)

    _hash_with(monkeypatch, hash_file)
    monkeypatch.setattr(_unpermute_api, "open_key", open_key)
    restored = onnxlady.unpermute(suspect, key, output=tmp_path / "u.onnx")
    assert began == [True]
    assert restored.weights_identical_to_source and restored.output_identical_to_source_file is True
    changed = onnx.load(str(suspect))
    changed.doc_string = "changed after permuting"
    onnx.save(changed, str(tmp_path / "changed.onnx"))
    with pytest.raises(OnnxladyError, match="not the model the key was written for"):
        onnxlady.unpermute(tmp_path / "changed.onnx", key, output=tmp_path / "c.onnx")
    assert not (tmp_path / "c.onnx").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_path_that_is_no_regular_file_is_not_hashed_beside_its_load(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    """A FIFO would block its reader: no hash starts, and the load refuses it as before."""
    key = models[1].with_name(models[1].name + ".key.json")
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    assert _digest.PendingDigest.start(fifo) is None
    with pytest.raises(OnnxladyError, match="not a regular file"):
        onnxlady.permute(fifo, output=tmp_path / "p.onnx")
    with pytest.raises(OnnxladyError, match="not a regular file"):
        onnxlady.unpermute(fifo, key, output=tmp_path / "u.onnx")
