"""The floor of ``permute`` and ``unpermute`` on deep graphs: what Python itself spends (issue 15).

    python3 -m tools.permute_phases --nodes 1000,20000,50000 --repeats 3 --workdir DIR

Issue 15 asks permute and unpermute for at most 1.2 times the I/O floor (``onnx.load`` +
``onnx.save``) at every size. On ``fixtures.build_deep_model(N)`` (thousands of tensors of a
kilobyte) the floor is two calls into protobuf's C code, while any tool that moves the neurons
of every tensor and undoes it from a key must also, per tensor, read its bytes into numpy, move
them and write them back, and read a key naming every tensor. This tool times those parts bare,
each in Python with nothing around it, so a table can say how much of the ratio they take before
a command checks, analyses or hashes anything.

Each run is a fresh interpreter (``onnx``, ``numpy`` and ``json`` imported before the clock, as
``tools.bench`` times a command) on ``DIR/deepN.onnx`` (built when missing, the file
``tools.bench --workdir DIR`` uses) and ``DIR/deeppermN.onnx`` with its key (``permute --seed 1``
of it, made when missing), timing in wall-clock and CPU seconds:

- ``onnx.load`` and ``onnx.save`` of the deep model (their sum is the floor);
- one bare pass moving every initializer's ``raw_data`` through numpy: ``frombuffer``, one
  ``take`` along its first axis, ``tobytes`` and the assignment back (the least a permutation of
  every tensor costs, with the index arrays made once);
- ``sha256`` of every initializer's bytes (the key records the weights' digest; unpermute checks it);
- a bare ``json.loads`` of the key file's bytes (the least unpermute reads).

With ``--commands`` (the default) two more children time ``onnxlady permute`` and ``onnxlady
unpermute`` of the same files (the public API imported before the clock, as ``tools.bench``
does). The last rows give, per node count, the least ratio to the floor (CPU, min / median over
the runs) of a permute made of load + moves + save and of an unpermute made of load + key read +
moves + save: what the 1.2x goal leaves to everything else a command does.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tools._bench import BUILD_DEEP, FLOOR_PRELUDE, REPO, child_json, machine_load

_PARTS = FLOOR_PRELUDE + """
import hashlib
import numpy as np
key_path = sys.argv[2]
dtypes = {1: np.dtype("u1"), 2: np.dtype("u2"), 4: np.dtype("u4"), 8: np.dtype("u8")}
reversals = {}  # one index array per axis length, made once (as a key's group permutations are)
def move_all():
    moved = 0
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data"):
            continue
        dims = tuple(tensor.dims)
        raw = tensor.raw_data
        count = 1
        for dim in dims:
            count *= dim
        if not dims or count == 0 or len(raw) % count:
            continue
        array = np.frombuffer(raw, dtype=dtypes.get(len(raw) // count, np.dtype(f"V{len(raw) // count}"))).reshape(dims)
        index = reversals.get(dims[0])
        if index is None:
            index = reversals[dims[0]] = np.arange(dims[0] - 1, -1, -1, dtype=np.int64)
        tensor.raw_data = array.take(index, axis=0).tobytes()
        moved += 1
    return moved
moved = clock("move every initializer (frombuffer + take + tobytes + assign)", move_all)
def digest_all():
    return [hashlib.sha256(tensor.raw_data).digest() for tensor in model.graph.initializer]
clock("sha256 of every initializer", digest_all)
with open(key_path, "rb") as handle:
    raw_key = handle.read()
key = clock("json.loads of the key", lambda: json.loads(raw_key))
print(json.dumps({"phases": phases, "moved": moved, "initializers": len(model.graph.initializer),
                  "key_tensors": len(key["tensors"])}))
"""

_COMMAND = """
import contextlib, io, json, sys, time
import onnxlady
from onnxlady.cli import main
for name in onnxlady.__all__:
    getattr(onnxlady, name)
arguments = sys.argv[2:]
wall, cpu = time.perf_counter(), time.process_time()
with contextlib.redirect_stdout(io.StringIO()):
    code = main(arguments)
phases = {sys.argv[1]: (time.perf_counter() - wall, time.process_time() - cpu)}
assert code == 0, code
print(json.dumps({"phases": phases}))
"""

_PERMUTE = """
import sys
from onnxlady.cli import main
assert main(["permute", sys.argv[1], "-o", sys.argv[2], "--seed", "1", "--quiet"]) == 0
"""

#: The phase names (the test and the docs read them).
LOAD, SAVE, FLOOR = "onnx.load", "onnx.save", "floor (onnx.load + onnx.save)"
MOVES = "move every initializer (frombuffer + take + tobytes + assign)"
DIGESTS = "sha256 of every initializer"
KEY = "json.loads of the key"
PERMUTE, UNPERMUTE = "onnxlady permute", "onnxlady unpermute"
#: The sums whose least ratios to the floor close the table.
LEAST_PERMUTE = "load + moves + save"
LEAST_UNPERMUTE = "load + key read + moves + save"


def _child(script: str, *arguments: object) -> dict[str, Any]:
    """The JSON document ``script`` printed last, run in a fresh interpreter."""
    document: dict[str, Any] = child_json(script, *arguments)
    return document


def _models(workdir: Path, nodes: int) -> tuple[Path, Path]:
    """``deepN.onnx`` and ``deeppermN.onnx`` (with its key) in ``workdir``, made when missing."""
    path, permuted = workdir / f"deep{nodes}.onnx", workdir / f"deepperm{nodes}.onnx"
    if not path.exists():
        build = [sys.executable, "-c", BUILD_DEEP, str(path), str(nodes)]
        subprocess.run(build, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    if not permuted.exists() or not Path(f"{permuted}.key.json").exists():
        subprocess.run(
            [sys.executable, "-c", _PERMUTE, str(path), str(permuted)], check=True, cwd=REPO, stdout=subprocess.DEVNULL
        )
    return path, permuted


def _run(workdir: Path, nodes: int, commands: bool) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """One run's phases (wall, CPU seconds) and the parts child's counts."""
    path, permuted = _models(workdir, nodes)
    key = Path(f"{permuted}.key.json")
    parts = _child(_PARTS, path, key)
    phases: dict[str, tuple[float, float]] = {name: (wall, cpu) for name, (wall, cpu) in parts.pop("phases").items()}
    phases[FLOOR] = (phases[LOAD][0] + phases[SAVE][0], phases[LOAD][1] + phases[SAVE][1])
    for name, parts_of in ((LEAST_PERMUTE, (LOAD, MOVES, SAVE)), (LEAST_UNPERMUTE, (LOAD, KEY, MOVES, SAVE))):
        phases[name] = (sum(phases[p][0] for p in parts_of), sum(phases[p][1] for p in parts_of))
    if commands:
        out = workdir / "permute_phases.out.onnx"
        for name, arguments in (
            (PERMUTE, ["permute", path, "--seed", "1", "--quiet", "-o", out]),
            (UNPERMUTE, ["unpermute", permuted, "--key", key, "--quiet", "-o", out]),
        ):
            for stale in workdir.glob(out.name + "*"):
                stale.unlink()
            phases.update({part: (wall, cpu) for part, (wall, cpu) in _child(_COMMAND, name, *arguments)["phases"].items()})
        for stale in workdir.glob(out.name + "*"):
            stale.unlink()
    return phases, parts


def main(argv: list[str] | None = None) -> int:
    """Print one row per node count and part: wall and CPU seconds (median), ms per node, x floor."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.permute_phases", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="1000,20000,50000", help="node counts (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per node count and part")
    parser.add_argument("--workdir", type=Path, required=True, help="where the deep models are (built when missing)")
    parser.add_argument(
        "--no-commands", dest="commands", action="store_false", help="time the bare parts only, not onnxlady's commands"
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load before: `{machine_load()}`\n")
    print("| nodes | part | wall s (median) | CPU s (median) | CPU ms/node | x floor (CPU, median) |")
    print("|---|---|---|---|---|---|")
    for nodes in [int(n) for n in args.nodes.split(",") if n]:
        runs = [_run(args.workdir, nodes, args.commands) for _ in range(args.repeats)]
        phases = [phases for phases, _ in runs]
        for name in phases[0]:
            if name in (LEAST_PERMUTE, LEAST_UNPERMUTE):
                continue
            wall = statistics.median(run[name][0] for run in phases)
            cpu = statistics.median(run[name][1] for run in phases)
            ratio = statistics.median(run[name][1] / run[FLOOR][1] for run in phases if run[FLOOR][1] > 0)
            print(f"| {nodes} | {name} | {wall:.3f} | {cpu:.3f} | {1000 * cpu / nodes:.4f} | {ratio:.2f} |")
        counts = runs[0][1]
        print(f"| {nodes} | tensors moved / initializers / key's tensors | {counts['moved']} / "
              f"{counts['initializers']} / {counts['key_tensors']} | | | |")  # fmt: skip
        for name in (LEAST_PERMUTE, LEAST_UNPERMUTE):
            least = [run[name][1] / run[FLOOR][1] for run in phases if run[FLOOR][1] > 0]
            print(
                f"| {nodes} | least ratio of {name} (CPU, min / median) | | | | "
                f"{min(least):.2f} / {statistics.median(least):.2f} |"
            )
    print(f"\nload after: `{machine_load()}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
