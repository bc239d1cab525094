"""Resync across a conversion does not keep both models' files resident.

Its weights are memory maps of the files (views of an inline model's bytes, or its external
data): every page read for the matching's signatures, then for the solver, stayed resident
until the end, both models whole (the float16 pair of the benchmark peaked at 2.3 times the
reference's size). :func:`onnxlady._io._external.release_pages` lets a map's pages go once
read; the next read maps them again, with the same bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import build_large_model
from fixtures.conversions import CONVERSIONS
from onnxlady import permute, perturb
from onnxlady._io._external import release_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _resident_kb(array: np.ndarray) -> int:
    """The resident size of the mapping that holds ``array``'s first byte (``/proc/self/smaps``)."""
    address = array.ctypes.data
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, stop = (int(part, 16) for part in head.split("-"))
            inside = start <= address < stop
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError("no mapping holds the array")


def test_release_pages_lets_a_maps_pages_go_and_keeps_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "values.bin"
    values = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", offset=4096, shape=(values.size - 1024,))
    view = mapped.reshape(-1, 1024).T[::2]  # a strided view of the map: released through its bases
    expected = np.array(view).tobytes()  # read: every page of the map touched
    assert _resident_kb(mapped) >= 3000  # read: 4 MB resident
    release_pages(view)
    assert _resident_kb(mapped) < 100
    assert np.array(view).tobytes() == expected  # mapped again from the file, the same bytes
    # A copy-on-write map keeps what was written into it; arrays in memory (and anything else)
    # are left alone.
    written = np.memmap(path, dtype=np.float32, mode="c", shape=(values.size,))
    written[:4] = -1.0
    release_pages(written)
    assert written[:5].tolist() == [-1.0] * 4 + [float(values[4])]
    kept = values.copy()
    release_pages(kept)
    release_pages(None)
    assert kept.tobytes() == values.tobytes()


_PEAK = """
import io, contextlib, json, re, sys
import onnxlady
from onnxlady.cli import main

for name in onnxlady.__all__:  # imported before the baseline: the package's modules load on first use
    getattr(onnxlady, name)

def kilobytes(field):  # VmHWM is this process's own (ru_maxrss would carry the pytest parent's)
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

before = kilobytes("VmRSS")
with contextlib.redirect_stdout(io.StringIO()):
    assert main(sys.argv[1:]) == 0
print(json.dumps((kilobytes("VmHWM") - before) * 1024))
"""

def test_resync_across_float16_keeps_neither_file_resident(tmp_path: Path) -> None:
    model = build_large_model(24)
    suspect = CONVERSIONS["float16"](perturb(permute(model, seed=1).model, noise=0.1, seed=1).model)
    reference_path, suspect_path = tmp_path / "ref.onnx", tmp_path / "sus.onnx"
    onnx.save(model, reference_path)
    onnx.save(suspect, suspect_path)
    run = subprocess.run(
        [sys.executable, "-c", _PEAK, "resync", str(reference_path), str(suspect_path), "-o", str(tmp_path / "out.onnx"), "--quiet"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    peak = json.loads(run.stdout.strip().splitlines()[-1])
    # Both files held resident made 3.2 times the reference (1.5 of it the two maps); let go
    # once read, 1.9 (the solver's float64 blocks, the signatures' scratch).
    assert peak < 2.5 * reference_path.stat().st_size
