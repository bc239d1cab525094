"""Benchmark: ``onnxlady resync`` against the I/O floor, on a generated model of >= 100 MB.

The floor is loading both models and saving one (``onnx.load`` twice, ``onnx.save`` once): any
resync must pay it. The reference is ``fixtures.build_large_model``; the suspect is that model
permuted (seed 1) with Gaussian noise of 0.1 x std on every weight. Each measurement runs in a
fresh subprocess (ru_maxrss survives fork and exec, so this parent stays small); medians of
``--repeats`` runs. Goal: resync time at most 3 x the floor. Peak resident memory above the
child's baseline (after its imports) is reported against the reference model's size.
``--convert NAME`` also passes the suspect through one conversion of ``fixtures/conversions.py``
(fold-bn, float16...), so resync works across conversions (structural matching, common form,
output in the suspect's form).

    python3 -m tools.bench_resync [--megabytes 120] [--repeats 3] [--convert NAME] [--json]
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
from onnxlady import permute, perturb
model = build_large_model(int(sys.argv[3]))
onnx.save(model, sys.argv[1])
suspect = perturb(permute(model, seed=1).model, noise=0.1, seed=1).model
if sys.argv[4]:
    from fixtures.conversions import CONVERSIONS
    suspect = CONVERSIONS[sys.argv[4]](suspect)
onnx.save(suspect, sys.argv[2])
"""

_FLOOR = """
import resource, sys, time, onnx
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
reference = onnx.load(sys.argv[1])
suspect = onnx.load(sys.argv[2])
onnx.save(suspect, sys.argv[3])
print(time.perf_counter() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""

_RESYNC = """
import resource, sys, time
from onnxlady.cli import main
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
code = main(["resync", sys.argv[1], sys.argv[2], "-o", sys.argv[3], "--quiet"])
elapsed = time.perf_counter() - start
assert code == 0, code
print(elapsed, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def _run(script: str, *paths: Path) -> tuple[float, float]:
    """(seconds, peak resident bytes above the child's baseline after its imports)."""
    seconds, peak = run_fresh(script, *paths)[-2:]
    return float(seconds), float(peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.bench_resync", description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--convert", default="", metavar="NAME", help="a conversion of fixtures/conversions.py")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxlady-bench-") as folder:
        reference, suspect = Path(folder) / "reference.onnx", Path(folder) / "suspect.onnx"
        subprocess.run(
            [sys.executable, "-c", _BUILD, str(reference), str(suspect), str(args.megabytes), args.convert],
            check=True,
            cwd=REPO,
        )
        floors, resyncs = [], []
        for _ in range(args.repeats):
            floors.append(_run(_FLOOR, reference, suspect, Path(folder) / "floor.onnx"))
            resyncs.append(_run(_RESYNC, reference, suspect, Path(folder) / "resynced.onnx"))
        size = reference.stat().st_size
    floor, resync = statistics.median(t for t, _ in floors), statistics.median(t for t, _ in resyncs)
    floor_peak, resync_peak = statistics.median(m for _, m in floors), statistics.median(m for _, m in resyncs)
    document = {
        "model_megabytes": round(size / 1e6, 1),
        "conversion": args.convert or None,
        "repeats": args.repeats,
        "floor_seconds": round(floor, 3),
        "resync_seconds": round(resync, 3),
        "time_ratio": round(resync / floor, 2),
        "floor_memory_ratio": round(floor_peak / size, 2),
        "memory_ratio": round(resync_peak / size, 2),
    }
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(
            f"model {document['model_megabytes']} MB; load both + save one {floor:.3f} s, resync {resync:.3f} s "
            f"-> time ratio {document['time_ratio']} (goal <= 3); peak memory above baseline: resync "
            f"{document['memory_ratio']} x reference model, load both + save one {document['floor_memory_ratio']} x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
