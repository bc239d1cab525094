"""A command's ``--max-memory`` estimate against the memory it really takes (issue 15, session 19).

``python3 -m tools.memory_estimates [--repeats N] -- COMMAND ARGS...`` runs ``onnxlady COMMAND
ARGS`` once with ``--max-memory 1`` (refused up front: the refusal names the estimate), then
``--repeats`` times as given, sampling ``/proc/PID/status`` every 10 ms for the peak anonymous
memory (``RssAnon``: what the estimate bounds) and the peak resident size (``VmHWM``: also the
page cache of weight files read through memory maps). It prints one Markdown row: estimate, the
peaks (median over the runs), and the estimate over the anonymous peak, which must be at least 1
(docs/results.md, "--max-memory estimates against measured peaks"). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

#: How often the child's memory is sampled, in seconds.
POLL_SECONDS = 0.01


def _run(arguments: list[str], watch: bool) -> tuple[int, str, float, float]:
    """Exit code, stderr, and peak RssAnon / VmHWM in MiB (0 when not watched) of one run."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen([sys.executable, "-m", "onnxlady", *arguments], env=env, stdout=subprocess.DEVNULL,
                                 stderr=errors, text=True)
        peak = {"RssAnon": 0, "VmHWM": 0}
        while watch and child.poll() is None:
            try:
                with open(f"/proc/{child.pid}/status") as status:
                    for line in status:
                        key, _, value = line.partition(":")
                        if key in peak:
                            peak[key] = max(peak[key], int(value.split()[0]))
            except (OSError, ValueError):
                pass  # the child ended between poll() and open()
            time.sleep(POLL_SECONDS)
        child.wait()
        errors.seek(0)
        return child.returncode, errors.read(), peak["RssAnon"] / 1024, peak["VmHWM"] / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="measured runs (the median is printed)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the onnxlady command and its arguments")
    args = parser.parse_args(argv)
    command = [item for item in args.command if item != "--"]
    if not command:
        parser.error("give the onnxlady command after --")
    _, refusal, _, _ = _run([*command, "--max-memory", "1"], watch=False)
    found = re.search(r"needs about ([\d.,]+) (GiB|MiB)", refusal)
    if found is None:
        print(f"no estimate in the refusal: {refusal.strip()[-300:]}", file=sys.stderr)
        return 2
    estimate = float(found[1].replace(",", "")) * (1024 if found[2] == "GiB" else 1)
    runs = [_run(command, watch=True) for _ in range(max(1, args.repeats))]
    codes = {code for code, *_ in runs}
    anon = statistics.median(run[2] for run in runs)
    resident = statistics.median(run[3] for run in runs)
    print("| command | estimate MiB | peak anon MiB | max RSS MiB | estimate / peak anon | exit codes |")
    print("|---|---|---|---|---|---|")
    print(f"| {' '.join(command)} | {estimate:.0f} | {anon:.0f} | {resident:.0f} | {estimate / anon:.2f} | "
          f"{', '.join(map(str, sorted(codes)))} |")
    return 0 if codes <= {0, 1} else 1


if __name__ == "__main__":
    sys.exit(main())
