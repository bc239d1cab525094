"""Where ``inspect --json`` spends its time, phase by phase, at each node count (issue 15).

    python3 -m tools.inspect_phases --nodes 1000,5000,20000,50000 --repeats 3 --workdir DIR

Each run is a fresh interpreter (imports done before the clock starts, as in ``tools.bench``)
that reads ``fixtures.build_deep_model(N)`` saved in ``DIR/deepN.onnx`` (built when missing,
the same file ``tools.bench --workdir DIR`` uses) and times, in wall-clock and CPU seconds:
the floor (``onnx.load`` + ``onnx.save``), ``load_model`` (parse, validate, hash) and within it
the structural check alone (``validate_model`` run again on the loaded model, the garbage
collector paused as ``inspect`` pauses it), the graph
(``ModelGraph``: shapes, folding), the whole analysis (``analyze``, graph included) and within it,
measured in the same call, the graph it builds, the collection (``_collect``: the groups, their
members and the tensors to permute) and the rules (the rest: the walk over the nodes, the
freezes and joins after it), the JSON document (``to_json``) and its text (``to_json_text``).
Medians over the runs, with ms per node: CPU time tells the work's growth apart from a loaded
machine's waiting (wall time).

    python3 -m tools.inspect_phases --floor-parts --nodes 1000,20000,50000 --repeats 3 --workdir DIR

measures instead the parts any ``inspect`` built on a networkx dependency graph (the project
brief's requirement) pays, whatever its analysis: Python's start with ``import onnx, networkx,
numpy`` (a child of its own, timed from outside), then in one child with those imports done
before the clock (as ``tools.bench`` times a command): ``onnx.load``, ``onnx.save`` (with the
load, the floor issue 15's ratios divide by), one pass over the nodes in Python (each node's
inputs, outputs and operator read into tuples, the least any rule needs), and the
``nx.DiGraph`` of operators and tensors built from those tuples with ``add_edges_from`` (and the
smaller one of operators only, an edge per tensor one reads from another), and the least work
a table of rules does per node: a dispatch on the operator and one call of a rule that reads
its inputs' shapes and gives its outputs one (no rule decides anything with less). The last
lines say what load + pass + the cheaper graph, load + pass + dispatch (onnxlady builds no
graph for a graph listed in order) and all of them make of the floor: the least ratio an
inspect with such parts can reach, before it analyses anything or prints a line.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tools._bench import BUILD_DEEP, FLOOR_PRELUDE, REPO, child_json, machine_load

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
try:
    from onnxlady._io._validate import validate_model
except ImportError:  # (a tree from before the check had a module of its own)
    validate_model = None
if validate_model is not None:
    # With the collector paused, as inspect reads and checks a model: run again beside the loaded
    # model and its table, a collection would walk them all and time that instead.
    import gc
    gc.disable()
    try:
        clock("validate_model (in load_model)", lambda: validate_model(loaded.model, path, node_table=True))
    finally:
        gc.enable()
clock("graph", lambda: ModelGraph(loaded.model))
# The analysis's own parts, timed inside the one call (the module's names wrapped, then put back).
import onnxlady._analysis._channels as channels
inner = {}
def timed(name, work):
    def run(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return work(*args, **kwargs)
        finally:
            spent = inner.get(name, (0.0, 0.0))
            inner[name] = (spent[0] + time.perf_counter() - wall, spent[1] + time.process_time() - cpu)
    return run
parts = {"graph": "ModelGraph", "collect": "_collect"}
originals = {attribute: getattr(channels, attribute, None) for attribute in parts.values()}
for name, attribute in parts.items():
    if originals[attribute] is not None:
        setattr(channels, attribute, timed(name, originals[attribute]))
try:
    analysis = clock("analyze", lambda: analyze(loaded.model))
finally:
    for attribute, original in originals.items():
        if original is not None:
            setattr(channels, attribute, original)
if set(inner) == set(parts):
    phases["graph (in analyze)"] = inner["graph"]
    phases["collect (in analyze: groups, tensors to permute)"] = inner["collect"]
    phases["rules (in analyze: the rest, the node walk)"] = tuple(
        total - graph - collect for total, graph, collect in zip(phases["analyze"], inner["graph"], inner["collect"])
    )
result = InspectResult(analysis, loaded.path, loaded.sha256)
clock("to_json", result.to_json)
# (a tree from before to_json_text existed: the standard library's encoder, the same text)
clock("to_json_text", getattr(result, "to_json_text", lambda: json.dumps(result.to_json(), indent=2)))
print(json.dumps(phases))
"""

_PARTS = FLOOR_PRELUDE + """
import networkx as nx, numpy
def one_pass():
    return [(tuple(node.input[:]), tuple(node.output[:]), (node.op_type, node.domain)) for node in model.graph.node]
table = clock("node pass", one_pass)
def dependency_graph():
    edges = []
    for index, (inputs, outputs, _) in enumerate(table):
        op = ("op", index)
        edges.extend([(("tensor", name), op) for name in inputs if name])
        edges.extend([(op, ("tensor", name)) for name in outputs if name])
    dag = nx.DiGraph()
    dag.add_edges_from(edges)
    return dag
dag = clock("nx.DiGraph", dependency_graph)
assert dag.number_of_nodes() >= len(table)
def operator_graph():
    # (the smallest such graph: operators only, an edge per tensor read from another operator)
    producer = {name: index for index, (_, outputs, _) in enumerate(table) for name in outputs if name}
    edges = [(producer[name], index) for index, (inputs, _, _) in enumerate(table) for name in inputs if name in producer]
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(table)))
    dag.add_edges_from(edges)
    return dag
clock("nx.DiGraph (operators only)", operator_graph)
# The least a rule table does per node: a dispatch on the operator, and one rule call that reads
# its inputs' shapes and gives its outputs one (what every rule needs before it decides anything).
shapes = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
shapes.update({value.name: tuple(d.dim_value for d in value.type.tensor_type.shape.dim) for value in model.graph.input})
def least_rule(inputs, outputs, shapes):
    shape = None
    for name in inputs:
        found = shapes.get(name)
        if found is not None:
            shape = found
    for name in outputs:
        shapes[name] = shape
rules = {key: least_rule for _, _, key in table}
def dispatch():
    for inputs, outputs, key in table:
        rules[key](inputs, outputs, shapes)
clock("rule dispatch (a call per node reading its inputs' shapes)", dispatch)
assert len(shapes) >= len(table)
print(json.dumps(phases))
"""

#: The row of the rule table's own per-node work (see ``_PARTS``).
_DISPATCH = "rule dispatch (a call per node reading its inputs' shapes)"
#: Python's start and the imports an inspect with a networkx graph cannot do without.
_START = "import onnx, networkx, numpy"

def _child(script: str, path: Path) -> dict[str, tuple[float, float]]:
    """The phases ``script`` printed, run in a fresh interpreter on ``path``."""
    return {name: (wall, cpu) for name, (wall, cpu) in child_json(script, path).items()}


def _started() -> tuple[float, float]:
    """Wall and CPU seconds of a fresh interpreter that imports onnx, networkx and numpy, then exits."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    subprocess.run([sys.executable, "-c", _START], check=True, cwd=REPO)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Print one row per node count and phase: wall and CPU seconds (median), ms per node."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.inspect_phases", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="1000,5000,20000,50000", help="node counts (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per node count")
    parser.add_argument("--workdir", type=Path, required=True, help="where the deep models are (built when missing)")
    parser.add_argument(
        "--floor-parts", action="store_true", help="time the parts an inspect with a networkx graph cannot avoid"
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load before: `{machine_load()}`\n")
    print("| nodes | phase | wall s (median) | CPU s (median) | CPU ms/node | x floor (wall) |")
    print("|---|---|---|---|---|---|")
    for nodes in [int(n) for n in args.nodes.split(",") if n]:
        path = args.workdir / f"deep{nodes}.onnx"
        if not path.exists():
            subprocess.run([sys.executable, "-c", BUILD_DEEP, str(path), str(nodes)], check=True, cwd=REPO)
        runs = []
        for _ in range(args.repeats):
            if args.floor_parts:
                runs.append({"python start + imports": _started(), **_child(_PARTS, path)})
            else:
                runs.append(_child(_CHILD, path))
        if args.floor_parts:
            for run in runs:
                run["floor"] = tuple(a + b for a, b in zip(run["onnx.load"], run["onnx.save"]))
                graph = min(run["nx.DiGraph"], run["nx.DiGraph (operators only)"], key=lambda part: part[1])
                run["load + pass + graph"] = tuple(
                    a + b + c for a, b, c in zip(run["onnx.load"], run["node pass"], graph)
                )
                rules = run[_DISPATCH]
                run["load + pass + dispatch"] = tuple(
                    a + b + c for a, b, c in zip(run["onnx.load"], run["node pass"], rules)
                )
                run["load + pass + graph + dispatch"] = tuple(
                    a + b for a, b in zip(run["load + pass + graph"], rules)
                )
        floor = statistics.median(run["floor"][0] for run in runs)
        for phase in runs[0]:
            wall = statistics.median(run[phase][0] for run in runs)
            cpu = statistics.median(run[phase][1] for run in runs)
            print(f"| {nodes} | {phase} | {wall:.3f} | {cpu:.3f} | {1000 * cpu / nodes:.4f} | {wall / floor:.2f} |")
        if args.floor_parts:
            for parts in ("load + pass + graph", "load + pass + dispatch", "load + pass + graph + dispatch"):
                least = [run[parts][1] / run["floor"][1] for run in runs]
                print(
                    f"| {nodes} | least ratio of {parts} (CPU, min / median) | | | | "
                    f"{min(least):.2f} / {statistics.median(least):.2f} |"
                )
    print(f"\nload after: `{machine_load()}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
