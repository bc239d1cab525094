"""Output sets: the files one command writes appear together, or none of them does.

A command that writes several files (a model and its key, a model and its external data,
reports and a canonicalized model) stages every file in a folder of its own beside the targets
(``.onnxlady-tmp-<pid>-<host>-<start>-<random>``, short whatever the targets' names), under the target's own
name, so a staged model finds its staged external data. Only when every file was written and
synced does :meth:`OutputSet.commit` write a journal (the commit point) and rename the files
into place; the staging folder is then removed. A set of one file needs no journal: its one
rename is atomic, and is the commit point (two fsyncs: the file, then its folder).

In a set of several files, syncs that need not follow each other run at once, each in a
thread (``fsync`` releases the GIL, and a journaling file system commits concurrent syncs
together): the staged files and the staging folders together, then the journal and its folder
together, then, after the renames, the target folders together. Every file is synced before
the journal is written, and the journal before the first rename.

Every way out cleans up: an exception, ``KeyboardInterrupt`` or a ``SystemExit`` raised by a
signal handler removes the staging folder. A run killed outright (SIGKILL, power loss) leaves
it behind; the next output set writing into that folder finds it (the process that made it is
provably gone: no process has its pid, or the one that has it started at another time or boot)
and completes it when its journal was written, or removes it when it was not. A folder of
another machine (its host tag differs: a shared file system) or of a running process is never
touched, nor any name onnxlady does not make (:data:`_NAME`). Between the
kill and that next run, a set killed in the middle of its renames may show some new files and
some old ones; keys record the sha256 of the model they belong to, so such a pair is refused.

Outputs must not be inputs: :func:`check_output_paths` compares resolved paths and, for files
that exist, device and inode numbers (so a symlink or a hard link to an input is caught too).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, final

import numpy as np
import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._io._external import has_mapped, has_mapped_external, model_tensors, write_external
from onnxlady._io._stream import Override, write_model

__all__ = [
    "TEMP_PREFIX",
    "OutputSet",
    "check_output_paths",
    "external_data_path",
    "recover_folder",
    "same_file",
]

#: Every temporary file or folder onnxlady makes starts with this; nothing else does.
TEMP_PREFIX = ".onnxlady-tmp-"
_JOURNAL = "journal.json"
_PRIMARY = "primary"  # in a staging folder on another device: where the journal will be
#: Leave room under protobuf's 2 GB limit for the graph itself.
_EXTERNAL_DATA_THRESHOLD = 1_900_000_000
#: Longest file name most file systems take (NAME_MAX).
_NAME_MAX = 255

#: Staging folders of output sets open in this process (another thread's must not be cleaned).
_ACTIVE: set[Path] = set()
_ACTIVE_LOCK = threading.Lock()


def external_data_path(model_path: Path) -> Path:
    """The external data file written beside ``model_path`` (``<name>.data``)."""
    return model_path.with_name(model_path.name + ".data")


# -- paths ------------------------------------------------------------------------------------
def _absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` with its folder resolved (symlinks followed) and its last component kept as is."""
    path = Path(os.path.abspath(os.fspath(path)))
    try:
        return path.parent.resolve() / path.name
    except (OSError, RuntimeError):
        return path


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name one file: equal resolved paths, or equal device and inode.

    A symlink and its target, and two hard links to one file, are the same file.
    """
    first, second = _absolute(a), _absolute(b)
    if first == second:
        return True
    try:
        if first.resolve() == second.resolve():
            return True
    except (OSError, RuntimeError):
        pass
    stat_a, stat_b = _stat(first), _stat(second)
    return (
        stat_a is not None and stat_b is not None and (stat_a.st_dev, stat_a.st_ino) == (stat_b.st_dev, stat_b.st_ino)
    )


def check_output_paths(
    outputs: Iterable[Path],
    inputs: Iterable[Path | None],
    *,
    replaceable: Iterable[Path] = (),
    companions: Iterable[Path] = (),
) -> None:
    """Refuse an output that is an input, two outputs that are one file, or an unwritable name.

    Args:
        outputs: every file the command writes.
        inputs: every file the command reads (``None`` entries, arguments in memory, skipped).
        replaceable: outputs allowed to be inputs (``--overwrite-input``).
        companions: files the command may write beside an output (``<model>.data``): they
            must not be inputs either, but their names are checked only when written.

    Raises:
        OnnxladyError: an output is an input (by path, symlink or hard link), two outputs are
            the same path, an output is a folder, its folder does not exist, or its name is
            longer than the file system allows.
    """
    written = [Path(path) for path in outputs]
    allowed = [_absolute(path) for path in replaceable]
    protected = [Path(path) for path in inputs if path is not None]
    seen: dict[Path, Path] = {}
    for target in written + [Path(path) for path in companions]:
        absolute = _absolute(target)
        if absolute in seen:
            raise OnnxladyError(f"{target}: two outputs would be written to the same file")
        seen[absolute] = target
        if absolute not in allowed:
            for source in protected:
                if same_file(target, source):
                    raise OnnxladyError(f"{target}: refusing to overwrite an input file ({source})")
    for target in written:
        absolute = _absolute(target)
        _check_name(target)
        folder = absolute.parent
        if not folder.is_dir():
            raise OnnxladyError(f"{target}: output folder '{folder}' does not exist")
        if os.path.isdir(absolute):
            raise OnnxladyError(f"{target}: is a folder")


def _check_name(target: Path) -> None:
    if "\0" in str(target):
        raise OnnxladyError(f"{target!r}: a file name cannot hold a NUL byte")
    if len(os.fsencode(target.name)) > _NAME_MAX:
        raise OnnxladyError(f"{target.name[:40]}...: file name longer than {_NAME_MAX} bytes")


# -- recovery ---------------------------------------------------------------------------------
#: A staging folder's name: ``<TEMP_PREFIX><pid>-<host>-<start>-<random>``, where ``host`` tags
#: the machine and ``start`` the process's start (boot and start time), so another machine's
#: folder on a shared file system, or a pid since reused by another process, is told apart.
#: Before session 19 names were ``<TEMP_PREFIX><pid>-<random>`` (owner checked by pid alone).
_NAME = re.compile(
    re.escape(TEMP_PREFIX) + r"(?P<pid>[0-9]{1,10})(?:-(?P<host>[0-9a-f]{8})-(?P<start>[0-9a-f]{8}))?-[0-9a-f]{8}"
)


def _tag(text: str) -> str:
    return hashlib.sha256(text.encode(errors="surrogateescape")).hexdigest()[:8]


def _process_stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat``'s fields after the command name (state first); ``None`` where unread."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_tag(pid: int) -> str:
    """A tag of process ``pid``'s start (this boot's id and its start time); ``0...`` where unknown."""
    fields = _process_stat(pid)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        start = fields[19] if fields is not None else ""  # field 22, starttime
    except (OSError, IndexError):
        return "0" * 8
    return _tag(f"{boot}:{start}") if start else "0" * 8


_HOST = _tag(socket.gethostname())
_STARTS: dict[int, str] = {}  # this process's start tag, by pid (a forked child has its own)


def _own_start() -> str:
    pid = os.getpid()
    if pid not in _STARTS:
        _STARTS[pid] = _start_tag(pid)
    return _STARTS[pid]


def _owner(name: str) -> int | None:
    """The process id in a staging folder's name, ``None`` for a name onnxlady did not make."""
    match = _NAME.fullmatch(name)
    return int(match["pid"]) if match else None


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (a number too large for a pid: no process)
        return False
    except OSError:
        return True  # someone else's process: alive
    fields = _process_stat(pid)
    return fields is None or fields[0] not in ("Z", "X")


def _stale(name: str) -> bool:
    """Whether the staging folder ``name`` is onnxlady's and its process provably gone.

    Never a name onnxlady does not make, nor another machine's folder (its pid means nothing
    here), nor one whose process runs; a running pid whose start differs from the one in the
    name was reused by another process after the owner died: the folder is stale.
    """
    match = _NAME.fullmatch(name)
    if match is None or (match["host"] is not None and match["host"] != _HOST):
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return True  # not open here (the caller checked): an earlier set's, or a dead process's of our pid
    if not _running(pid):
        return True
    start = match["start"]
    if start is None or start == "0" * 8:
        return False
    running = _start_tag(pid)
    return running != "0" * 8 and running != start


def recover_folder(folder: str | os.PathLike[str]) -> list[str]:
    """Complete or remove what output sets killed in ``folder`` left behind.

    A staging folder whose process is gone is completed (its files renamed into place) when
    its journal was written, which means every file was ready, and removed otherwise. Staging
    folders of running processes are left alone.

    Args:
        folder: the folder to clean.

    Returns:
        One line per thing done, for a report.
    """
    notes: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return notes
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue  # onnxlady stages in folders only: a file or a link of that name is not its own
        path = Path(entry.path)
        with _ACTIVE_LOCK:
            active = _absolute(path) in _ACTIVE
        if active or not _stale(entry.name):
            continue
        notes.extend(_recover(path))
    return notes


def _recover(staging: Path) -> list[str]:
    notes = []
    journal = _read_journal(staging)
    primary = None
    if journal is None and (staging / _PRIMARY).is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            primary = Path((staging / _PRIMARY).read_text())
    if journal is None and primary is not None and _read_journal(primary) is not None:
        return _recover(primary) + _remove(staging)
    if journal is not None:
        for staged, target in journal:
            if os.path.lexists(staged):
                try:
                    os.replace(staged, target)
                    notes.append(f"completed an interrupted write: {target}")
                except OSError as exc:
                    notes.append(f"could not complete an interrupted write of {target} ({exc.strerror or exc})")
        for other in {Path(staged).parent.parent for staged, _ in journal} - {staging}:
            if _owner(other.name) is not None:
                _remove(other)
    return notes + _remove(staging)


def _read_journal(staging: Path) -> list[tuple[str, str]] | None:
    """The journal's (staged, target) pairs; ``None`` when absent or incomplete (not committed)."""
    try:
        document = json.loads((staging / _JOURNAL).read_text())
        pairs = [(str(staged), str(target)) for staged, target in document["entries"]]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return pairs if document.get("complete") is True else None


def _remove(path: Path) -> list[str]:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
    return [] if os.path.lexists(path) else [f"removed an interrupted write's temporary files: {path}"]


# -- the output set ---------------------------------------------------------------------------
@dataclass
class _Entry:
    staged: Path
    target: Path
    shown: Path  # the target as the caller spelled it, for messages


@final
class OutputSet:
    """Files written as one: staged beside their targets, renamed into place all together.

    Use it as a context manager: leaving the block normally commits, leaving it by an
    exception (``KeyboardInterrupt`` included) removes everything staged::

        with OutputSet() as outputs:
            digest = outputs.write_model(path, model, digest=True)
            outputs.write_text(key_path, key_json(digest))
    """

    def __init__(self) -> None:
        self._token = f"{TEMP_PREFIX}{os.getpid()}-{_HOST}-{_own_start()}-{secrets.token_hex(4)}"
        self._staging: dict[int, Path] = {}  # device -> staging folder
        self._primary: Path | None = None
        self._folders: dict[Path, Path] = {}  # target folder -> its sub-folder in the staging folder
        self._entries: list[_Entry] = []
        self._digests: dict[Path, str] = {}
        self._closed = False
        #: What cleaning the target folders did (interrupted writes completed or removed).
        self.recovered: list[str] = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.commit()
            return
        self.abort()
        if isinstance(error, OSError):  # a writer of someone else's (np.savez...) ran out of space
            shown = self._entries[-1].shown if self._entries else "output"
            raise OnnxladyError(f"{shown}: cannot write ({_reason(error)})") from error

    # -- staging ------------------------------------------------------------------------------
    def stage(self, target: str | os.PathLike[str], staged_name: str | None = None) -> Path:
        """Reserve ``target`` and return the staged path to write it at (same name, other folder).

        Args:
            target: the final path of the file.
            staged_name: stage it under this name instead of the target's (for a writer that
                makes temporaries of its own from the name, which a 255-byte name leaves no room for).

        Returns:
            Where to write the file; it is renamed to ``target`` on commit.

        Raises:
            OnnxladyError: the set is closed, ``target`` is already in it, its folder does not
                exist, it is a folder, or its name is too long.
        """
        if self._closed:
            raise OnnxladyError("internal: output set already committed or aborted")
        shown = Path(target)
        absolute = _absolute(shown)
        if any(entry.target == absolute for entry in self._entries):
            raise OnnxladyError(f"{shown}: two outputs would be written to the same file")
        _check_name(shown)
        folder = absolute.parent
        if not folder.is_dir():
            raise OnnxladyError(f"{shown}: output folder '{folder}' does not exist")
        if os.path.isdir(absolute):
            raise OnnxladyError(f"{shown}: is a folder")
        staged = self._folder_for(folder, shown) / (staged_name or absolute.name)
        if any(entry.staged == staged for entry in self._entries):
            raise OnnxladyError(f"{shown}: staged twice under the name {staged.name!r}")
        self._entries.append(_Entry(staged, absolute, shown))
        return staged

    def _folder_for(self, folder: Path, shown: Path) -> Path:
        if folder in self._folders:
            return self._folders[folder]
        self.recovered += recover_folder(folder)
        device = os.stat(folder).st_dev
        try:
            staging = self._staging.get(device)
            if staging is None:
                staging = folder / self._token
                os.mkdir(staging)
                with _ACTIVE_LOCK:
                    _ACTIVE.add(staging)
                self._staging[device] = staging
                if self._primary is None:
                    self._primary = staging
                else:  # another device: its recovery must look for the journal in the primary
                    (staging / _PRIMARY).write_text(str(self._primary))
            sub = staging / str(len(self._folders))
            os.mkdir(sub)
        except OSError as exc:
            self.abort()
            raise OnnxladyError(f"{shown}: cannot write ({exc.strerror or exc})") from exc
        self._folders[folder] = sub
        return sub

    def staged(self, target: str | os.PathLike[str]) -> Path:
        """Where ``target`` was staged (to read a staged model back before committing)."""
        absolute = _absolute(target)
        for entry in self._entries:
            if entry.target == absolute:
                return entry.staged
        raise KeyError(str(target))

    def write_bytes(self, target: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
        """Stage ``data`` as the content of ``target``.

        Raises:
            OnnxladyError: see :meth:`stage`, or the file cannot be written (disk full...).
        """
        staged = self.stage(target)
        self._guard(target, lambda: _write_file(staged, data))  # (synced by the commit)

    def write_text(self, target: str | os.PathLike[str], text: str) -> None:
        """Stage ``text`` (UTF-8) as the content of ``target``."""
        self.write_bytes(target, text.encode())

    def write_model(
        self,
        target: str | os.PathLike[str],
        model: onnx.ModelProto,
        *,
        external_data: bool = False,
        digest: bool = False,
        overrides: Mapping[str, Override] | None = None,
    ) -> str:
        """Stage ``model`` as ``target`` (and its weights as ``<target>.data`` with external data).

        Args:
            target: the model file.
            model: the model (not changed).
            external_data: write the weights to ``<name>.data`` beside the model (always so when
                the model exceeds protobuf's 2 GB limit).
            digest: compute the sha256 of the model file.
            overrides: tensor names mapped to their new ``raw_data`` (or to functions computing
                it as each tensor is written): the model in memory is not changed.

        Returns:
            The sha256 of the model file when ``digest``, else ``""``.

        Raises:
            OnnxladyError: see :meth:`stage`, or a file cannot be written.
        """
        # A model whose weights are still in their external data files (mapped) is written with
        # external data; one whose weights are views of the inline file it came from is written
        # inline as that file held them, streamed from the views.
        tensors = model_tensors(model)  # listed once for the three questions below
        if not external_data and (
            _estimated_size(model, tensors) > _EXTERNAL_DATA_THRESHOLD or has_mapped_external(model, tensors)
        ):
            external_data = True
        staged = self.stage(target)
        if not external_data:
            if overrides or has_mapped(model, tensors):
                sha = self._guard(target, lambda: _stream(model, staged, overrides or {}, digest))
            else:
                data = model.SerializeToString()  # protobuf's encoding: a model that round-trips keeps its bytes
                self._guard(target, lambda: _write_file(staged, data))
                sha = hashlib.sha256(data).hexdigest() if digest else ""
                del data
        else:
            data_target = external_data_path(Path(target))
            data_staged = self.stage(data_target)
            # Streamed, one tensor at a time, with the data file named by its final name.
            sha = self._guard(
                target,
                lambda: write_external(model, staged, data_staged, overrides, location=data_staged.name, digest=digest),
            )
            if digest:
                self._digests[_absolute(data_target)] = self._guard(data_target, lambda: file_digest(data_staged))
        if digest:
            self._digests[_absolute(target)] = sha
        return str(sha)

    def digest_of(self, target: str | os.PathLike[str]) -> str:
        """The sha256 of a file :meth:`write_model` wrote with ``digest=True`` (its data file too)."""
        return self._digests.get(_absolute(target), "")

    def _guard(self, target: str | os.PathLike[str], work: Any) -> Any:
        """Run ``work``; on any failure abort the whole set (an OS error becomes one clear line)."""
        try:
            return work()
        except OSError as exc:
            self.abort()
            raise OnnxladyError(f"{target}: cannot write ({_reason(exc)})") from exc
        except BaseException:
            self.abort()
            raise

    # -- commit and abort --------------------------------------------------------------------
    def commit(self) -> None:
        """Rename every staged file into place, then remove the staging folders.

        Raises:
            OnnxladyError: a rename failed; the files already renamed are put back as they were
                (nothing of this set stays).
        """
        if self._closed:
            return
        if not self._entries:
            self.abort()
            return
        if len(self._entries) == 1:
            self._commit_one(self._entries[0])
            return
        try:
            self._write_journal()  # (syncs the staged files)
        except OSError as exc:
            self.abort()
            raise OnnxladyError(f"{self._entries[0].shown}: cannot write ({_reason(exc)})") from exc
        except BaseException:
            self.abort()
            raise
        done: list[tuple[_Entry, Path | None]] = []
        try:
            for number, entry in enumerate(self._entries):
                done.append((entry, self._backup(entry, number)))
                os.replace(entry.staged, entry.target)
            _sync_all([partial(_fsync_folder, folder) for folder in {entry.target.parent for entry in self._entries}])
        except OSError as exc:
            self._roll_back(done)
            self.abort()
            raise OnnxladyError(f"{done[-1][0].shown}: cannot write ({_reason(exc)})") from exc
        self.abort()  # removes the (now empty) staging folders and the journal

    def _commit_one(self, entry: _Entry) -> None:
        """Commit a set of one file: synced, renamed into place, its folder synced (two fsyncs).

        One rename is atomic by itself: no journal is needed (nor the staging folders synced
        for it). A run killed before the rename leaves a staging folder without a journal, which
        the next run into the folder removes; the target keeps its old content.
        """
        def rename() -> None:
            _fsync_path(entry.staged)
            os.replace(entry.staged, entry.target)
            _fsync_folder(entry.target.parent)

        self._guard(entry.shown, rename)
        self.abort()  # removes the (now empty) staging folder

    def _write_journal(self) -> None:
        assert self._primary is not None
        # Every staged file and every staging sub-folder synced, all at once.
        syncs: list[Callable[[], None]] = [partial(_fsync_path, entry.staged) for entry in self._entries]
        for staging in self._staging.values():
            syncs += [partial(_fsync_folder, sub) for sub in staging.iterdir() if sub.is_dir()]
        _sync_all(syncs)
        # Then the journal, the commit point: its content and its name in the folder, together.
        document = {"complete": True, "entries": [[str(e.staged), str(e.target)] for e in self._entries]}
        journal = self._primary / _JOURNAL
        _write_file(journal, json.dumps(document).encode())
        _sync_all([partial(_fsync_path, journal), partial(_fsync_folder, self._primary)])

    def _backup(self, entry: _Entry, number: int) -> Path | None:
        """A hard link to the file ``entry`` replaces, to put it back if a later rename fails."""
        if not os.path.lexists(entry.target):
            return None
        assert self._primary is not None
        backup = entry.staged.parent.parent / f"backup-{number}"
        try:
            os.link(entry.target, backup, follow_symlinks=False)
        except OSError:
            return None
        return backup

    def _roll_back(self, done: list[tuple[_Entry, Path | None]]) -> None:
        # The journal goes first: a run killed while rolling back must not be completed later.
        if self._primary is not None:
            with contextlib.suppress(OSError):
                (self._primary / _JOURNAL).unlink()
        for entry, backup in reversed(done):
            with contextlib.suppress(OSError):
                if os.path.lexists(entry.staged):
                    continue  # this rename never happened
                if backup is not None:
                    os.replace(backup, entry.target)
                else:
                    os.unlink(entry.target)

    def abort(self) -> None:
        """Remove everything staged; the targets stay as they were. Safe to call twice."""
        self._closed = True
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
            with _ACTIVE_LOCK:
                _ACTIVE.discard(staging)
        self._staging.clear()

    @property
    def targets(self) -> list[Path]:
        """The files of this set, as their callers named them."""
        return [entry.shown for entry in self._entries]


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EFBIG:
        return "file too large for this file system or limit"
    return str(exc.strerror or exc)


# -- writing ----------------------------------------------------------------------------------
def _new_file(path: Path) -> int:
    """A new file with the permissions a plain ``open`` would give."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def _write_file(path: Path, data: bytes | bytearray | memoryview) -> None:
    """A new file holding ``data``; its caller syncs it (with others, at once: see the commit)."""
    with os.fdopen(_new_file(path), "wb") as handle:
        handle.write(data)


def _sync_all(syncs: Sequence[Callable[[], object]]) -> None:
    """Run ``syncs`` at once: the first in this thread, each other one in a thread of its own.

    Raises:
        OSError: one of them failed (the first failure, once all have ended).
    """
    if len(syncs) <= 1:
        for sync in syncs:
            sync()
        return
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=len(syncs) - 1, thread_name_prefix="onnxlady-sync") as threads:
        started = [threads.submit(sync) for sync in syncs[1:]]
        try:
            syncs[0]()
        except BaseException as exc:  # the others are waited for all the same
            failure = exc
        for future in started:
            try:
                future.result()
            except BaseException as exc:
                failure = failure or exc
    if failure is not None:
        raise failure


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (not every file system can sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingWriter:
    """A file wrapper that hashes what passes through it."""

    def __init__(self, handle: Any, digest: bool) -> None:
        self._handle = handle
        self._digest = hashlib.sha256() if digest else None
        # Hash beside the writer: hashlib releases the GIL, and one worker keeps the order.
        self._pool = ThreadPoolExecutor(max_workers=1) if digest else None
        self._hashing: Future[None] | None = None

    def write(self, data: Any) -> int:
        if self._pool is not None and self._digest is not None:
            # At most one buffer waits for the hasher: a writer faster than it (a loaded machine)
            # would otherwise queue every tensor it wrote, and memory would grow with the model.
            if self._hashing is not None:
                self._hashing.result()
            self._hashing = self._pool.submit(self._digest.update, data)
        return int(self._handle.write(data))

    def hexdigest(self) -> str:
        if self._pool is None or self._digest is None:
            return ""
        self._pool.shutdown(wait=True)
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _stream(model: onnx.ModelProto, staged: Path, overrides: Mapping[str, Override], digest: bool) -> str:
    with os.fdopen(_new_file(staged), "wb") as handle:
        writer = _HashingWriter(handle, digest)
        try:
            write_model(model, writer, overrides=overrides)  # type: ignore[arg-type]
        finally:
            writer.close()
    return writer.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _estimated_size(model: onnx.ModelProto, tensors: Sequence[onnx.TensorProto] | None = None) -> int:
    """Bytes of tensor data, from shapes alone (``ByteSize`` walks every byte and is slow).

    ``tensors``: the model's :func:`~onnxlady._io._external.model_tensors`, when listed already.
    """
    total = 0
    itemsizes: dict[int, int] = {}  # by data type: numpy's dtype is asked once per type, not per tensor
    for tensor in model_tensors(model) if tensors is None else tensors:
        itemsize = itemsizes.get(tensor.data_type)
        if itemsize is None:
            try:
                itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            except (KeyError, TypeError, ValueError):
                itemsize = 8
            itemsizes[tensor.data_type] = itemsize
        count = 1
        for dim in tensor.dims:
            count *= max(0, int(dim))
        total += count * itemsize
    return total
