"""Where one CPU ONNX Runtime session's memory goes: the figures behind verify's memory work (issue 15).

For each model and each way of opening it, a fresh child opens one CPU session and reports, in
MB above its baseline after importing onnxruntime and onnxlady: the peak while the session was built, what
it keeps once built, what it keeps after ``malloc_trim(0)`` (glibc: freed memory the heap
still held), and the minor page faults and CPU seconds (user, system) the build cost. Ways:

- ``ort-path``: ``InferenceSession(path)``, as a plain ORT user (and verify before session 10) opens it;
- ``ort-path-no-opt``: the same at ``ORT_DISABLE_ALL`` (what the graph optimizations cost; they
  change results, verify keeps them);
- ``verify``: ``onnxlady._verify._session.create_session(path, "cpu")``, as verify opens it now
  (weights read by ORT from the file);
- ``verify-mapped``: the same with glibc's mmap threshold pinned at 1 MiB first (``mallopt``:
  every larger block its own mapping, returned to the system when freed), which verify does
  not do: its build peak is what ORT holds at once, its faults and CPU seconds what that costs.

Usage: ``python3 -m tools.verify_memory MODEL.onnx [MODEL.onnx ...] [--repeats 3]``; prints one
Markdown row per model and way (medians over the repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from tools._bench import REPO

_CHILD = """
import ctypes, json, resource, sys, threading, time
import onnxruntime as ort
from onnxlady._verify._session import create_session  # imported before the baseline, as ORT is
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
base = rss()
peak = [0]
done = False
def sample():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
path, way = sys.argv[1], sys.argv[2]
sampler = threading.Thread(target=sample)
before = resource.getrusage(resource.RUSAGE_SELF)
sampler.start()
if way == "verify-mapped":
    ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
if way.startswith("verify"):
    session = create_session(path, "cpu")[0]
else:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if way == "ort-path-no-opt":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
done = True
sampler.join()
after = resource.getrusage(resource.RUSAGE_SELF)
kept = rss()
ctypes.CDLL(None).malloc_trim(0)
print(json.dumps({
    "peak": max(peak[0], kept) - base, "kept": kept - base, "trimmed": rss() - base,
    "faults": after.ru_minflt - before.ru_minflt,
    "user": after.ru_utime - before.ru_utime, "system": after.ru_stime - before.ru_stime,
}))
"""

WAYS = ("ort-path", "ort-path-no-opt", "verify", "verify-mapped")


def _measure(model: Path, way: str) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model), way], check=True, capture_output=True, text=True, cwd=REPO
    )
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def main(argv: list[str] | None = None) -> int:
    """Print one row per model and way: peak, kept, kept after trim (x the model), faults, CPU seconds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files (inline weights show the heap's effect)")
    parser.add_argument("--repeats", type=int, default=3, help="children per model and way (medians reported)")
    args = parser.parse_args(argv)
    print(
        "| model | MB | way | build peak x | kept x | kept after malloc_trim x | minor faults | user s | system s |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for model in args.models:
        size = model.stat().st_size
        for way in WAYS:
            runs = [_measure(model, way) for _ in range(args.repeats)]

            def median(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(run[key] for run in runs)

            print(
                f"| {model.name} | {size / 1e6:.0f} | {way} | {median('peak') / size:.2f} | {median('kept') / size:.2f} | "
                f"{median('trimmed') / size:.2f} | {median('faults'):.0f} | {median('user'):.2f} | {median('system'):.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
