"""Benchmark: ``onnxlady permute`` against the I/O floor, on a generated model of >= 100 MB.

The floor is what any tool that rewrites a model must pay: ``onnx.load`` plus ``onnx.save`` of
the same file. The figure reported is permute's wall time divided by that floor (goal: at most
1.5), and permute's peak resident memory above the interpreter's baseline divided by the model
size (goal: at most 2). Each measurement runs in a fresh subprocess so caches and allocator
state from one run do not help the next; the median of ``--repeats`` runs is reported.

    python3 -m tools.bench_permute [--megabytes 120] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tools._bench import REPO, run_fresh

_BUILD = """
import sys, onnx
from fixtures import build_large_model
onnx.save(build_large_model(int(sys.argv[2])), sys.argv[1])
"""

_FLOOR = """
import resource, sys, time, onnx
path, out = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
model = onnx.load(path)
onnx.save(model, out)
print(time.perf_counter() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""

_PERMUTE = """
import resource, sys, time
from onnxlady.cli import main
path, out = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
code = main(["permute", path, "-o", out, "--seed", "1", "--quiet"])
elapsed = time.perf_counter() - start
assert code == 0, code
print(elapsed, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def _run(script: str, path: Path, out: Path) -> tuple[float, int]:
    seconds, peak = run_fresh(script, path, out)[-2:]
    return float(seconds), int(float(peak))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.bench_permute", description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=120, help="size of the generated model (default 120)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="onnxlady-bench-") as folder:
        model_path = Path(folder) / "large.onnx"
        # Built in a child: ru_maxrss survives fork and exec, so this process must stay small.
        subprocess.run([sys.executable, "-c", _BUILD, str(model_path), str(args.megabytes)], check=True, cwd=REPO)
        size = model_path.stat().st_size
        floors, permutes = [], []
        for _ in range(args.repeats):
            floors.append(_run(_FLOOR, model_path, Path(folder) / "floor.onnx"))
            permutes.append(_run(_PERMUTE, model_path, Path(folder) / "permuted.onnx"))
        floor_time = statistics.median(t for t, _ in floors)
        permute_time = statistics.median(t for t, _ in permutes)
        permute_peak = max(p for _, p in permutes)
        floor_peak = max(p for _, p in floors)
    document = {
        "model_megabytes": round(size / 1e6, 1),
        "repeats": args.repeats,
        "floor_seconds": round(floor_time, 3),
        "permute_seconds": round(permute_time, 3),
        "time_ratio": round(permute_time / floor_time, 2),
        "permute_peak_megabytes": round(permute_peak / 1e6, 1),
        "floor_peak_megabytes": round(floor_peak / 1e6, 1),
        "memory_ratio": round(permute_peak / size, 2),
        "floor_memory_ratio": round(floor_peak / size, 2),
    }
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(
            f"model {document['model_megabytes']} MB; load+save {floor_time:.3f} s, permute {permute_time:.3f} s "
            f"-> time ratio {document['time_ratio']} (goal <= 1.5)\n"
            f"peak memory above baseline: permute {document['permute_peak_megabytes']} MB = "
            f"{document['memory_ratio']} x model (goal <= 2); load+save alone {document['floor_memory_ratio']} x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
