"""The allocator warm-up of fingerprinting's workers keeps the layer arithmetic's temporaries on the heap.

A fresh process (a build's pool worker) first frees one :data:`~onnxlady._provenance._read.WARM_BYTES`
block, so glibc raises its mmap and trim thresholds; a temporary as large as a stack of large
layers (16 MiB) is then reused from the heap instead of being mapped, page-faulted in and
unmapped again on every batch. Whether values change is tested in test_provenance_throughput.py
(fresh processes and batches give the same fingerprints).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxlady._provenance._fingerprint import _STACK_WEIGHTS
from onnxlady._provenance._read import WARM_BYTES

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator thresholds"
)

_REPO = Path(__file__).resolve().parent.parent
#: The largest temporary of the layer arithmetic: the squares of a stack of float32 layers.
STACK_BYTES = _STACK_WEIGHTS * 4

# The page faults saved (each batch's temporaries reused from the heap) are measured by
# ``python3 -m tools.registry_experiment --throughput-only --fresh``, not counted here: a count of a
# child's page faults failed in a full test run and passed alone (it moves with the machine's state).


def test_the_warm_block_covers_a_stack() -> None:
    assert STACK_BYTES < WARM_BYTES < 32 << 20  # under glibc's largest dynamic threshold


def test_the_fresh_process_pass_fingerprints_every_file(tmp_path: Path) -> None:
    """``tools.registry_experiment --fresh``: both methods timed in children, a bad file fails the pass."""
    from fixtures import FIXTURES
    from tools.registry_experiment import fresh_pass

    paths = []
    for name in ("vgg", "matmul_mlp"):
        onnx.save(FIXTURES[name](1), tmp_path / f"{name}.onnx")
        paths.append(str(tmp_path / f"{name}.onnx"))
    timed = fresh_pass(paths, repeats=1)
    assert timed["files"] == 2 and timed["load_seconds"] > 0 and timed["fingerprint_seconds"] > 0
    assert timed["ratio"] == timed["fingerprint_seconds"] / timed["load_seconds"]
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(subprocess.CalledProcessError):  # a file that cannot be read fails its pass
        fresh_pass([*paths, str(tmp_path / "bad.onnx")], repeats=1)
