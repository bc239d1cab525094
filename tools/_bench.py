"""Shared by the benchmarks: where their children run, and what every one of them runs alike.

The benchmark parent (``tools.bench``) stays small (standard library only) because a child
inherits its parent's peak RSS figure (``ru_maxrss`` survives fork and exec); every model is
built and every measurement run in a fresh interpreter started in :data:`REPO`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

#: The repository root: children run there so that ``fixtures`` and ``onnxlady`` import.
REPO = Path(__file__).resolve().parents[1]

#: A child's script that saves ``fixtures.build_deep_model(NODES)`` to PATH (arguments: PATH NODES).
BUILD_DEEP = """
import sys, onnx
from fixtures import build_deep_model
onnx.save(build_deep_model(int(sys.argv[2])), sys.argv[1])
"""

#: The start of a phase-timing child's script (arguments: PATH ...): ``clock(name, work)`` records
#: ``work``'s wall and CPU seconds in ``phases``; the floor's two parts (``onnx.load`` of PATH,
#: ``onnx.save`` of it) are timed first, the loaded model left in ``model``.
FLOOR_PRELUDE = """
import json, os, sys, tempfile, time
import onnx
path = sys.argv[1]
phases = {}
def clock(name, work):
    wall, cpu = time.perf_counter(), time.process_time()
    value = work()
    phases[name] = (time.perf_counter() - wall, time.process_time() - cpu)
    return value
model = clock("onnx.load", lambda: onnx.load(path))
with tempfile.TemporaryDirectory() as folder:
    clock("onnx.save", lambda: onnx.save(model, os.path.join(folder, "floor.onnx")))
"""


def child_json(script: str, *arguments: object) -> Any:
    """The JSON document ``script`` printed last, run in a fresh interpreter in :data:`REPO`."""
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, arguments)], check=True, capture_output=True, text=True, cwd=REPO
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_load() -> str:
    """``uptime``'s line (the load the figures were taken under), or a note that it is unavailable."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable"
