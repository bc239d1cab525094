"""Ctrl-C at any moment of the command line, imports included: exit 130, one line, no traceback.

The child is interrupted while it is still importing onnxlady (numpy mapped, the command not
yet started) and at later moments. Python's own start-up (``site``) is not onnxlady's: the
signal is sent only once numpy's extension is mapped into the child, which onnxlady's import
loads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from fixtures import build_large_model

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps (Linux)")


def _importing_numpy(pid: int) -> bool:
    try:
        return "_multiarray_umath" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _interrupt(command: list[str], after: float) -> tuple[int, str]:
    """Start ``command``, send SIGINT ``after`` seconds once numpy is mapped; (exit code, stderr)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not _importing_numpy(child.pid) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(after)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    return child.returncode, stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("interrupt") / "model.onnx"
    onnx.save(build_large_model(8), path)
    return path


@pytest.mark.parametrize("after", [0.0, 0.05, 0.2, 0.5, 1.5])
def test_ctrl_c_at_any_moment_says_one_line(model: Path, tmp_path: Path, after: float) -> None:
    command = [sys.executable, "-m", "onnxlady", "permute", str(model), "-o", str(tmp_path / "out.onnx"), "--quiet"]
    code, stderr = _interrupt(command, after)
    if code == 0:  # finished before the signal came: nothing to check at this moment
        pytest.skip(f"the command ended within {after} s")
    assert "Traceback" not in stderr, stderr
    assert code == 130 and stderr == "onnxlady: interrupted\n", (code, stderr)
    assert not (tmp_path / "out.onnx").exists()
