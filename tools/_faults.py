"""Fault injection for the reliability tests and campaign: run the CLI in a child, kill it, fill its disk.

Children are forked from a "zygote", a process that imported onnxlady once (``python3 -m
tools._faults`` reading jobs on stdin), so a run costs its work, not Python's and onnxlady's
start-up, and the zygote reaps every child at once (a killed run leaves no zombie behind). A child runs ``onnxlady.cli.main`` with stdout and stderr
in files; it can be killed with SIGKILL after a delay, limited in the file size it may write
(``RLIMIT_FSIZE``: writing past it fails with ``EFBIG``, as a full disk would with ``ENOSPC``) and
stopped by a timeout (a hang is a failure, not a wait).

:func:`outcome_problems` lists what is wrong with how a run ended (exit codes 0/1/2 or killed,
exactly one stderr line on exit 2, no traceback); :func:`output_set_problems` what is wrong with
the files it left (an output without its companions, a key that does not belong to its model,
temporaries).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxlady._io._outputs import TEMP_PREFIX

REPO = Path(__file__).resolve().parents[1]


class _Zygote:
    """A process that imported onnxlady once and forks one child per run (see :func:`serve`)."""

    def __init__(self) -> None:
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tools._faults"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            cwd=REPO, env=environment,
        )  # fmt: skip
        self._buffer = b""

    def send(self, message: dict[str, object]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()

    def receive(self, timeout: float | None) -> dict[str, int] | None:
        """The next message, or ``None`` when none came within ``timeout`` seconds."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the fault-injection zygote died")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return dict(json.loads(line))

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)


_ZYGOTE: _Zygote | None = None


class _Drain:
    """A FIFO read to its end by a thread of its own (the child writes; the parent keeps the text)."""

    def __init__(self, path: str) -> None:
        os.mkfifo(path, 0o600)
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # open before the writer: never blocks
        os.set_blocking(self._fd, True)
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                try:
                    chunk = os.read(self._fd, 65536)
                except BlockingIOError:  # no writer yet
                    time.sleep(0.01)
                    continue
                if chunk:
                    self._chunks.append(chunk)
                elif self._chunks or self._writer_gone():
                    break
                else:
                    time.sleep(0.01)
        finally:
            os.close(self._fd)

    def _writer_gone(self) -> bool:
        return getattr(self, "_done", False)

    def text(self) -> str:
        self._done = True
        self._thread.join(10)
        return b"".join(self._chunks).decode(errors="replace")


def _zygote() -> _Zygote:
    global _ZYGOTE
    if _ZYGOTE is None or _ZYGOTE.process.poll() is not None:
        _ZYGOTE = _Zygote()
        atexit.register(_ZYGOTE.close)
    return _ZYGOTE


@dataclass
class Outcome:
    """How a child run ended."""

    args: list[str]
    code: int | None  # the exit code; None when killed or timed out
    killed: bool
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float


def _slow_renames(delay: float) -> None:
    """Make every rename out of a staging folder wait ``delay`` seconds: kills then land in the commit."""
    real_replace = os.replace

    def replace(source: Any, target: Any, **kwargs: Any) -> None:
        if TEMP_PREFIX in os.fspath(source):
            time.sleep(delay)
        real_replace(source, target, **kwargs)

    os.replace = replace  # type: ignore[assignment]


def _child(args: list[str], cwd: str, out: str, err: str, fsize: int | None, commit_delay: float = 0.0) -> None:
    """The forked child: redirect stdout and stderr, set the file size limit, run the CLI, exit with its code."""
    try:
        os.chdir(cwd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, name in ((1, out), (2, err)):
            handle = os.open(name, os.O_WRONLY)
            os.dup2(handle, fd)
            os.close(handle)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if commit_delay:
            _slow_renames(commit_delay)
        from onnxlady.cli import main

        try:
            code = main(args)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # never return into the zygote's loop
        traceback.print_exc()
        code = 99
    os._exit(int(code))


def serve() -> None:
    """The zygote's loop: read one job per line on stdin, fork it, report its pid and its wait status."""
    import onnxlady.cli  # ruff: ignore[unused-import] - imported once here, inherited by every child

    for line in sys.stdin.buffer:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job["args"], job["cwd"], job["out"], job["err"], job["fsize"], job.get("commit_delay", 0.0))
        os.write(1, json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        os.write(1, json.dumps({"status": status}).encode() + b"\n")


def run_cli(
    args: Sequence[object],
    cwd: str | os.PathLike[str],
    *,
    kill_after: float | None = None,
    signal_after: tuple[int, float] | None = None,
    fsize: int | None = None,
    commit_delay: float = 0.0,
    timeout: float = 120.0,
) -> Outcome:
    """Run ``onnxlady ARGS`` in a child forked from the zygote.

    Args:
        args: the command line after ``onnxlady``.
        cwd: the child's working folder (stdout and stderr are captured beside it, not in it).
        kill_after: send SIGKILL after this many seconds if the child still runs.
        signal_after: (signal, seconds): send that signal (SIGTERM, SIGINT) instead.
        fsize: the largest file the child may write (``RLIMIT_FSIZE``, bytes).
        commit_delay: seconds each rename out of a staging folder waits (widens the commit window).
        timeout: kill the child and report a hang after this many seconds.

    Returns:
        How it ended, with its stdout and stderr.
    """
    argv = [str(arg) for arg in args]
    # stdout and stderr go through FIFOs: a file size limit must not silence the child's messages.
    capture = Path(tempfile.mkdtemp(prefix="onnxlady-faults-"))
    out, err = str(capture / "out"), str(capture / "err")
    readers = [_Drain(out), _Drain(err)]
    zygote = _zygote()
    zygote.send({"args": argv, "cwd": str(cwd), "out": out, "err": err, "fsize": fsize, "commit_delay": commit_delay})
    started = zygote.receive(120.0)  # the zygote's own start-up, the first time
    if started is None:
        raise RuntimeError("the fault-injection zygote does not answer")
    pid = started["pid"]
    start = time.perf_counter()
    killed = timed_out = False
    reply = None
    if kill_after is not None or signal_after is not None:
        number, delay = signal_after if signal_after is not None else (signal.SIGKILL, kill_after or 0.0)
        reply = zygote.receive(delay)
        if reply is None:
            os.kill(pid, number)
            killed = number == signal.SIGKILL
    if reply is None:
        reply = zygote.receive(timeout)
    if reply is None:
        os.kill(pid, signal.SIGKILL)
        timed_out = True
        reply = zygote.receive(None)
    assert reply is not None
    seconds = time.perf_counter() - start
    status = reply["status"]
    texts = [reader.text() for reader in readers]
    shutil.rmtree(capture, ignore_errors=True)
    signalled = os.WIFSIGNALED(status)
    killed = killed and signalled and os.WTERMSIG(status) == signal.SIGKILL
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    return Outcome(argv, None if (killed or timed_out) else code, killed, timed_out, texts[0], texts[1], seconds)


def outcome_problems(outcome: Outcome, *, expect: Iterable[int] = (0, 1, 2)) -> list[str]:
    """What is wrong with how a run ended: a hang, an unexpected exit, a traceback, a noisy failure."""
    problems = []
    if outcome.timed_out:
        problems.append("hang (timed out)")
    elif not outcome.killed and outcome.code not in set(expect):
        problems.append(f"exit {outcome.code} (expected one of {sorted(set(expect))}): {outcome.stderr.strip()[:200]}")
    if "Traceback" in outcome.stdout + outcome.stderr:
        problems.append("traceback printed")
    if outcome.code == 2:
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines on exit 2: {outcome.stderr[:200]!r}")
    return problems


# -- files ------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def snapshot(paths: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """sha256 of each existing file among ``paths`` (symlinks followed), to check inputs later."""
    return {str(path): file_sha256(path) for path in paths if os.path.isfile(path)}


def changed_inputs(before: dict[str, str]) -> list[str]:
    """The inputs of ``before`` that were removed or changed."""
    problems = []
    for path, digest in before.items():
        if not os.path.isfile(path):
            problems.append(f"input {Path(path).name} removed")
        elif file_sha256(path) != digest:
            problems.append(f"input {Path(path).name} changed")
    return problems


def temporaries(folder: str | os.PathLike[str]) -> list[str]:
    """Temporary files or folders left in ``folder`` (onnxlady's own and the old ``.NAME.XXXX.tmp`` kind)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(name for name in names if name.startswith(TEMP_PREFIX) or name.endswith(".tmp"))


def permute_set_problems(model: Path, key: Path, *, previous: dict[str, str] | None = None) -> list[str]:
    """A model and its permutation key: both absent, or both present and the key naming the model.

    ``previous`` (file -> sha256 before the run) allows the earlier complete set to stay as it was.
    """
    data = model.with_name(model.name + ".data")
    present = [path.exists() for path in (model, key)]
    if not any(present):
        return []
    if not all(present):
        return [f"partial output set: {'model' if present[0] else 'key'} without its companion"]
    if (
        previous is not None
        and {str(model): file_sha256(model), str(key): file_sha256(key)}.items() <= previous.items()
    ):
        return []  # the earlier, complete set, untouched
    try:
        document = json.loads(key.read_text())
        recorded = document["permuted"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"key unreadable: {exc}"]
    problems = []
    if recorded != file_sha256(model):
        problems.append("partial output set: the key names another model (sha256 differs)")
    recorded_data = document["permuted"].get("data_sha256", "")
    if recorded_data and (not data.exists() or file_sha256(data) != recorded_data):
        problems.append("partial output set: the external data file is not the key's")
    return problems


def resync_set_problems(model: Path, key: Path) -> list[str]:
    """The re-ordered model and its recovered key: both or neither, the key naming the model."""
    present = [path.exists() for path in (model, key)]
    if not any(present):
        return []
    if not all(present):
        return [f"partial output set: {'model' if present[0] else 'key'} without its companion"]
    try:
        recorded = json.loads(key.read_text())["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"key unreadable: {exc}"]
    return [] if recorded == file_sha256(model) else ["partial output set: the key names another model"]


def all_or_none(paths: Sequence[Path]) -> list[str]:
    """Files written as one set: all present or none."""
    present = [path.name for path in paths if path.exists()]
    if present and len(present) != len(paths):
        return [f"partial output set: only {', '.join(present)} of {len(paths)} files"]
    return []


if __name__ == "__main__":
    serve()
