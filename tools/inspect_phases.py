"""Where ``inspect --json`` spends its time, phase by phase, at each node count (issue 15).

    python3 -m tools.inspect_phases --nodes 1000,5000,20000,50000 --repeats 3 --workdir DIR

Each run is a fresh interpreter (imports done before the clock starts, as in ``tools.bench``)
that reads ``fixtures.build_deep_model(N)`` saved in ``DIR/deepN.onnx`` (built when missing,
the same file ``tools.bench --workdir DIR`` uses) and times, in wall-clock and CPU seconds:
the floor (``onnx.load`` + ``onnx.save``), ``load_model`` (parse, validate, hash), the graph
(``ModelGraph``: shapes, folding), the whole analysis (``analyze``, graph included), the JSON
document (``to_json``) and its text (``to_json_text``). Medians over the runs, with ms per node:
CPU time tells the work's growth apart from a loaded machine's waiting (wall time).
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
import json, sys, time, os, tempfile
import onnx
from onnxlady._io._files import load_model
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._analysis._channels import analyze
from onnxlady._api._inspect import InspectResult
path = sys.argv[1]
phases = {}
def clock(name, work):
    wall, cpu = time.perf_counter(), time.process_time()
    value = work()
    phases[name] = (time.perf_counter() - wall, time.process_time() - cpu)
    return value
with tempfile.TemporaryDirectory() as folder:
    clock("floor", lambda: onnx.save(onnx.load(path), os.path.join(folder, "floor.onnx")))
loaded = clock("load_model", lambda: load_model(path))
clock("graph", lambda: ModelGraph(loaded.model))
analysis = clock("analyze", lambda: analyze(loaded.model))
result = InspectResult(analysis, loaded.path, loaded.sha256)
clock("to_json", result.to_json)
# (a tree from before to_json_text existed: the standard library's encoder, the same text)
clock("to_json_text", getattr(result, "to_json_text", lambda: json.dumps(result.to_json(), indent=2)))
print(json.dumps(phases))
"""

_BUILD = """
import sys, onnx
from fixtures import build_deep_model
onnx.save(build_deep_model(int(sys.argv[2])), sys.argv[1])
"""


def main(argv: list[str] | None = None) -> int:
    """Print one row per node count and phase: wall and CPU seconds (median), ms per node."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.inspect_phases", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="1000,5000,20000,50000", help="node counts (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per node count")
    parser.add_argument("--workdir", type=Path, required=True, help="where the deep models are (built when missing)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"load before: `{uptime}`\n")
    print("| nodes | phase | wall s (median) | CPU s (median) | CPU ms/node | x floor (wall) |")
    print("|---|---|---|---|---|---|")
    for nodes in [int(n) for n in args.nodes.split(",") if n]:
        path = args.workdir / f"deep{nodes}.onnx"
        if not path.exists():
            subprocess.run([sys.executable, "-c", _BUILD, str(path), str(nodes)], check=True, cwd=REPO)
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(path)], check=True, capture_output=True, text=True, cwd=REPO
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        floor = statistics.median(run["floor"][0] for run in runs)
        for phase in runs[0]:
            wall = statistics.median(run[phase][0] for run in runs)
            cpu = statistics.median(run[phase][1] for run in runs)
            print(f"| {nodes} | {phase} | {wall:.3f} | {cpu:.3f} | {1000 * cpu / nodes:.4f} | {wall / floor:.2f} |")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"\nload after: `{uptime}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
