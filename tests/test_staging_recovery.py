"""Staging folders a SIGKILL left behind: the next write removes those whose owner is provably gone.

Provably gone: no process has the pid in the folder's name, or the process that has it started
at another time (the pid was reused). Never touched: a running owner's folder, another machine's
(a shared file system: a pid there means nothing here), anything whose name onnxlady does not make.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from onnxlady._io._outputs import TEMP_PREFIX, OutputSet

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times come from /proc")


def _write(folder: Path) -> None:
    with OutputSet() as outputs:
        outputs.write_text(folder / "out.txt", "new")


def _staged(folder: Path, name: str) -> Path:
    path = folder / name
    (path / "0").mkdir(parents=True)
    (path / "0" / "out.txt").write_text("half written")
    return path


def _dead_pid() -> int:
    """The pid of a process that ran and was reaped (so no process has it, barring reuse)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _tag(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


#: The name's host tag: this machine's name, hashed.
HOST = _tag(socket.gethostname())


def _start(pid: int) -> str:
    """The name's start tag of process ``pid``: this boot's id and the process's start time, hashed."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return _tag(f"{boot}:{Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]}")


def test_the_staging_name_carries_pid_host_and_start(tmp_path: Path) -> None:
    outputs = OutputSet()
    outputs.stage(tmp_path / "out.txt")
    (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    match = re.fullmatch(
        re.escape(TEMP_PREFIX) + r"(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-(?P<start>[0-9a-f]{8})-[0-9a-f]{8}", staging.name
    )
    assert match is not None and int(match["pid"]) == os.getpid()
    assert match["host"] == HOST and match["start"] == _start(os.getpid())
    outputs.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_owners_folder_is_removed_a_live_ones_kept(tmp_path: Path) -> None:
    host, parent = HOST, os.getppid()
    dead = _staged(tmp_path, f"{TEMP_PREFIX}{_dead_pid()}-{host}-{'1' * 8}-deadbeef")
    old_style = _staged(tmp_path, f"{TEMP_PREFIX}{_dead_pid()}-0badf00d")  # a pre-session-19 name: pid alone
    alive = _staged(tmp_path, f"{TEMP_PREFIX}{parent}-{host}-{_start(parent)}-cafebabe")
    _write(tmp_path)
    assert not dead.exists() and not old_style.exists()
    assert (alive / "0" / "out.txt").read_text() == "half written"
    assert (tmp_path / "out.txt").read_text() == "new"


def test_a_reused_pid_does_not_keep_a_dead_owners_folder(tmp_path: Path) -> None:
    # The pid runs (our parent), but the process that has it started at another time than the
    # folder's owner: the owner is gone. HEAD kept such a folder for as long as the pid ran.
    reused = _staged(tmp_path, f"{TEMP_PREFIX}{os.getppid()}-{HOST}-{'2' * 8}-0123abcd")
    assert _start(os.getppid()) != "2" * 8
    _write(tmp_path)
    assert not reused.exists()


def test_what_is_not_provably_ours_and_stale_is_never_touched(tmp_path: Path) -> None:
    other_host = "0" * 8 if HOST != "0" * 8 else "1" * 8
    kept = [
        # another machine's folder on a shared file system: its pid cannot be checked here
        _staged(tmp_path, f"{TEMP_PREFIX}{_dead_pid()}-{other_host}-{'1' * 8}-deadbeef"),
        # names onnxlady does not make (HEAD removed any name under the prefix)
        _staged(tmp_path, f"{TEMP_PREFIX}notes"),
        _staged(tmp_path, f"{TEMP_PREFIX}{_dead_pid()}-backup-deadbeef"),
    ]
    a_file = tmp_path / f"{TEMP_PREFIX}{_dead_pid()}-deadbeef"  # a file: onnxlady stages in folders only
    a_file.write_text("someone's")
    _write(tmp_path)
    assert all((path / "0" / "out.txt").read_text() == "half written" for path in kept)
    assert a_file.read_text() == "someone's"
