"""Shared by the benchmarks: where their children run.

The benchmark parent (``tools.bench``) stays small (standard library only) because a child
inherits its parent's peak RSS figure (``ru_maxrss`` survives fork and exec); every model is
built and every measurement run in a fresh interpreter started in :data:`REPO`.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root: children run there so that ``fixtures`` and ``onnxlady`` import.
REPO = Path(__file__).resolve().parents[1]
