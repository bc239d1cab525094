"""Shared by the benchmarks: run one measurement in a fresh interpreter.

The benchmark parents stay small (standard library only) because a child inherits its
parent's peak RSS figure (``ru_maxrss`` survives fork and exec).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_fresh(script: str, *arguments: str | Path) -> list[str]:
    """Run ``python -c script ARGUMENTS`` from the repository root; its stdout's words.

    The last argument is the output path: files starting with its name are removed first,
    since unlinking a previous output of the same size is not the measured tool's cost.

    Raises:
        RuntimeError: the child failed; the message ends with its standard error.
    """
    out = Path(arguments[-1])
    for stale in out.parent.glob(out.name + "*"):
        stale.unlink()
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, arguments)],
        check=False, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    if result.returncode != 0:  # the child's own error, not only its exit status
        raise RuntimeError(f"measurement failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout.split()
