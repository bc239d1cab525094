"""One command's fixed costs, old tree against new: CPU and wall seconds, interleaved.

Issue 15's small-model goals hinge on costs of a few milliseconds (hashing, syncs, shape
inference), which wall time on a shared machine hides: this runs one ``onnxlady`` command in
fresh interpreters, alternately from two source trees (``--old``, e.g. the committed tree
unpacked somewhere, and ``--new``, default this checkout), and prints the median CPU seconds
(user + system, every thread) and wall seconds of the command alone (imports not timed), old
and new. ``--commit`` instead times an output set of an 11 MB model and its key (the durable
commit: writes, syncs, journal, renames) in each tree.

    python3 -m tools.bench_fixed --old /tmp/base12 --runs 5 -- resync ref10.onnx sus10.onnx -o /tmp/out.onnx --quiet
    python3 -m tools.bench_fixed --old /tmp/base12 --runs 5 --commit /tmp/commit-bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tools._bench import REPO

# The child: runs the command once, prints "WALL CPU" (of the command alone).
_COMMAND = """
import contextlib, io, resource, sys, time
from onnxlady.cli import main
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
assert code == 0, code
print(seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
"""

# The child for --commit: one output set of an 11 MB model and a 60 kB key, timed.
_COMMIT = """
import os, resource, sys, time
from pathlib import Path
from onnxlady._io._outputs import OutputSet
folder = Path(sys.argv[1])
data, key = os.urandom(11 << 20), os.urandom(30000).hex()
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
with OutputSet() as outputs:
    outputs.write_bytes(folder / "model.onnx", data)
    outputs.write_text(folder / "model.onnx.key.json", key)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
print(seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
"""


def _run(tree: Path, script: str, arguments: list[str]) -> tuple[float, float]:
    environment = dict(os.environ, PYTHONPATH=str(tree))
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        environment.setdefault(variable, "1")
    # Started outside both trees, so that PYTHONPATH alone says which onnxlady is imported.
    done = subprocess.run(
        [sys.executable, "-c", script, *arguments], cwd="/", env=environment, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    wall, cpu = done.stdout.split()[-2:]
    return float(wall), float(cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.bench_fixed", description=__doc__.split("\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the source tree to compare against")
    parser.add_argument("--new", type=Path, default=REPO, help="the source tree measured (default: this checkout)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each side (default 5)")
    parser.add_argument("--commit", type=Path, metavar="FOLDER", help="time an output set's commit in FOLDER instead")
    parser.add_argument("command", nargs="*", help="the onnxlady command line (paths absolute)")
    args = parser.parse_args(argv)
    if args.commit is None and not args.command:
        parser.error("give a command, or --commit FOLDER")
    script, arguments = (_COMMIT, [str(args.commit)]) if args.commit is not None else (_COMMAND, args.command)
    if args.commit is not None:
        args.commit.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for number in range(args.runs):
        # The order alternates: neither side always runs right after the other's writes.
        for side in ("old", "new") if number % 2 == 0 else ("new", "old"):
            runs[side].append(_run(args.old if side == "old" else args.new, script, arguments))
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1, 5, 15 min)")
    what = "commit of an 11 MB model and its key" if args.commit is not None else " ".join(args.command)
    cpu = {side: statistics.median(c for _, c in values) for side, values in runs.items()}
    wall = {side: statistics.median(w for w, _ in values) for side, values in runs.items()}
    print(f"{what}: {args.runs} runs each, medians")
    print(f"  CPU s   old {cpu['old']:.3f}  new {cpu['new']:.3f}  new/old {cpu['new'] / cpu['old']:.2f}")
    print(f"  wall s  old {wall['old']:.3f}  new {wall['new']:.3f}  new/old {wall['new'] / wall['old']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
