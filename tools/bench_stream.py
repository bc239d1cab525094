"""Benchmark: streaming model I/O (``onnxlady._io._stream``) against the ``onnx.load`` + ``onnx.save`` floor.

On a generated model (``fixtures.build_large_model``) saved to a temporary file, each scenario
runs in a fresh subprocess and reports its wall time and its peak resident memory above the
interpreter's baseline (``ru_maxrss`` after imports). The parent only uses the standard library
and builds the model in a child of its own, because ``ru_maxrss`` survives fork and exec.

Scenarios (``load`` is ``onnx.load``; ``read`` is ``read_model``):

* ``floor``            load, ``onnx.save``
* ``load+write``       load, ``write_model`` without overrides
* ``load+perm+write``  load, every initializer permuted on axis 0 into an ``overrides`` dict
                       (``np.frombuffer`` + ``np.take`` + ``tobytes``), ``write_model``
* ``read+write``       read, ``write_model``
* ``read+perm+write``  read, the same eager permutation, ``write_model``
* ``read+lazy+write``  read, the same permutation as callables run while writing (each returns
                       its ``np.take`` array, written through the buffer protocol: no ``tobytes``)

Ratios: time over the floor's median time; peak memory over the model file's size.

    python3 -m tools.bench_stream [--megabytes 120] [--repeats 5] [--check] [--json]
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
onnx.save(build_large_model(int(sys.argv[1])), sys.argv[2])
"""

# argv: scenario, model path, output path. Prints "seconds peak_bytes".
_RUN = """
import resource, sys, time
import numpy as np
import onnx
from onnx import helper
from onnxlady._io._stream import read_model, write_model

scenario, path, out = sys.argv[1:4]


def permutation(tensor):
    return np.random.default_rng(len(tensor.name)).permutation(tensor.dims[0])


def permuted(tensor):
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    array = np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return np.take(array, permutation(tensor), axis=0)


def targets(model):
    return [t for t in model.graph.initializer if t.dims and t.HasField("raw_data")]


base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
model = read_model(path) if scenario.startswith("read") else onnx.load(path)
if scenario == "floor":
    onnx.save(model, out)
elif scenario.endswith("+perm+write"):
    write_model(model, out, overrides={t.name: permuted(t).tobytes() for t in targets(model)})
elif scenario.endswith("+lazy+write"):
    write_model(model, out, overrides={t.name: (lambda t=t: permuted(t)) for t in targets(model)})
else:
    write_model(model, out)
elapsed = time.perf_counter() - start
print(elapsed, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""

# argv: model path, output of a +perm+ scenario. Checks the file against the in-memory recipe.
_CHECK = """
import sys
import numpy as np
import onnx
from onnx import helper

model, written = onnx.load(sys.argv[1]), onnx.load(sys.argv[2])
for tensor in model.graph.initializer:
    if tensor.dims and tensor.HasField("raw_data"):
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        array = np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
        perm = np.random.default_rng(len(tensor.name)).permutation(tensor.dims[0])
        tensor.raw_data = np.take(array, perm, axis=0).tobytes()
assert written.SerializeToString() == model.SerializeToString(), "written model differs"
onnx.checker.check_model(written)
print("ok")
"""

SCENARIOS = ("floor", "load+write", "load+perm+write", "read+write", "read+perm+write", "read+lazy+write")


def _run(scenario: str, model: Path, out: Path) -> tuple[float, int]:
    """One scenario in a fresh interpreter: (seconds, peak bytes above its baseline)."""
    seconds, peak = run_fresh(_RUN, scenario, model, out)[-2:]
    return float(seconds), int(float(peak))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.bench_stream", description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=120, help="size of the generated model (default 120)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="also verify a permuted output (slow, untimed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="onnxlady-bench-stream-") as folder:
        model = Path(folder) / "large.onnx"
        subprocess.run([sys.executable, "-c", _BUILD, str(args.megabytes), str(model)], check=True, cwd=REPO)
        size = model.stat().st_size
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in SCENARIOS}
        for _ in range(args.repeats):  # interleaved, so drift in the machine hits all alike
            for name in SCENARIOS:
                runs[name].append(_run(name, model, Path(folder) / "out.onnx"))
        if args.check:
            for name in ("load+perm+write", "read+lazy+write"):
                _run(name, model, Path(folder) / "out.onnx")
                subprocess.run([sys.executable, "-c", _CHECK, str(model), str(Path(folder) / "out.onnx")],
                               check=True, cwd=REPO, capture_output=True)  # fmt: skip

    floor = statistics.median(s for s, _ in runs["floor"])
    report = {
        "model_bytes": size,
        "repeats": args.repeats,
        "checked": args.check,
        "scenarios": {
            name: {
                "seconds": statistics.median(s for s, _ in results),
                "peak_bytes": statistics.median(p for _, p in results),
                "time_vs_floor": statistics.median(s for s, _ in results) / floor,
                "peak_vs_model": statistics.median(p for _, p in results) / size,
            }
            for name, results in runs.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model {size / 1e6:.1f} MB, median of {args.repeats} runs" + (", outputs checked" if args.check else ""))
        print(f"{'scenario':<18} {'seconds':>8} {'x floor':>8} {'peak MB':>8} {'x model':>8}")
        for name, row in report["scenarios"].items():
            print(f"{name:<18} {row['seconds']:8.3f} {row['time_vs_floor']:8.2f} "
                  f"{row['peak_bytes'] / 1e6:8.1f} {row['peak_vs_model']:8.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
