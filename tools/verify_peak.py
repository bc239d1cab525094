"""verify's peak memory and CPU time on given pairs, optionally against another checkout (issue 15).

Each run is a fresh child that imports ``onnxlady.cli`` (ONNX Runtime is imported lazily, inside
the measured part, as in ``tools.bench``), then runs ``onnxlady verify REF CAND --provider cpu
--quiet --json`` and reports its peak resident memory above the baseline after its imports
(the process's ``VmHWM``: unlike ``ru_maxrss``, which ``tools.bench`` reads from a small
parent, it does not start at the parent's peak), its CPU seconds (user + system, every thread)
and its wall seconds. ``tools.bench`` measures verify on a correct permutation only (an ``equivalent``
verdict); a wrong one goes on to measure the reference's own rounding noise, which opens more
sessions: give both kinds of pair here.

With ``--baseline DIR`` (a checkout, e.g. the committed tree unpacked elsewhere) every pair is
also run with ``PYTHONPATH=DIR``, interleaved with the working tree's runs (old, new, new, old...),
and the verdict printed by both must agree.

Usage: ``python3 -m tools.verify_peak REF:CAND [REF:CAND ...] [--repeats 3] [--baseline DIR]``;
prints one Markdown row per pair and tree: the verdict, peak MB and peak / reference size
(median and max), CPU and wall seconds (median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tools._bench import REPO

_CHILD = """
import contextlib, io, json, resource, sys, time
from onnxlady.cli import main
def high_water_mark():  # this process's own peak: ru_maxrss would start at the parent's (fork keeps it)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
baseline = high_water_mark()
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["verify", sys.argv[1], sys.argv[2], "--provider", "cpu", "--quiet", "--json"])
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
verdict = json.loads(out.getvalue())["verdict"] if code in (0, 1) else f"exit {code}"
print(json.dumps({
    "verdict": verdict, "peak": high_water_mark() - baseline, "seconds": seconds,
    "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
}))
"""


def _run(reference: Path, candidate: Path, tree: Path | None) -> dict[str, object]:
    """One verify in a fresh child; ``tree`` (a checkout) is put first on its import path when given."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(reference), str(candidate)],
        check=True, capture_output=True, text=True, cwd=tree or REPO, env=env,
    )  # fmt: skip
    figures: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def _pair(text: str) -> tuple[Path, Path]:
    reference, separator, candidate = text.partition(":")
    if not separator or not reference or not candidate:
        raise argparse.ArgumentTypeError(f"expected REF:CAND, got {text!r}")
    return Path(reference), Path(candidate)


def main(argv: list[str] | None = None) -> int:
    """Print one row per pair and tree; exit 1 when the two trees' verdicts differ on a pair."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", type=_pair, help="REF:CAND model paths")
    parser.add_argument("--repeats", type=int, default=3, help="runs per pair and tree (medians reported)")
    parser.add_argument("--baseline", type=Path, help="another checkout to run the same pairs with, interleaved")
    args = parser.parse_args(argv)
    trees: list[tuple[str, Path | None]] = [("working tree", None)]
    if args.baseline is not None:
        trees.insert(0, ("baseline", args.baseline.resolve()))
    print(
        "| reference | candidate | tree | verdict | peak MB (median / max) | peak / reference (median) | CPU s (median) "
        "| wall s (median) |\n|---|---|---|---|---|---|---|---|"
    )
    agreed = True
    for reference, candidate in args.pairs:
        runs: dict[str, list[dict[str, object]]] = {label: [] for label, _ in trees}
        for number in range(args.repeats):
            order = trees if number % 2 == 0 else trees[::-1]
            for label, tree in order:
                runs[label].append(_run(reference.resolve(), candidate.resolve(), tree))
        size = reference.stat().st_size
        verdicts = set()
        for label, _ in trees:
            measured = runs[label]
            peaks = [float(str(run["peak"])) for run in measured]
            verdict = ", ".join(sorted({str(run["verdict"]) for run in measured}))
            verdicts.add(verdict)
            cpu = statistics.median(float(str(run["cpu"])) for run in measured)
            wall = statistics.median(float(str(run["seconds"])) for run in measured)
            print(
                f"| {reference.name} | {candidate.name} | {label} | {verdict} | {statistics.median(peaks) / 1e6:.0f} / "
                f"{max(peaks) / 1e6:.0f} | {statistics.median(peaks) / size:.2f} x | {cpu:.2f} | {wall:.2f} |",
                flush=True,
            )
        agreed = agreed and len(verdicts) == 1
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(main())
