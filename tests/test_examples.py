"""The scripts in examples/ run as a user would run them and print the figures they promise.

Each runs in a fresh interpreter from a folder outside the repository (the package found only
through ``PYTHONPATH``, as an installed one would be): exit code 0 and the lines that carry its
figures, with the values a working onnxlady gives.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

#: Per example: patterns every one of which must match a line of its output.
EXPECTED: dict[str, list[str]] = {
    "permute_and_verify.py": [
        r"^groups: \d+, permutable: [1-9]\d*, permutable producer neurons: \d+\.\d %$",
        r"^permuted [1-9]\d* groups \([1-9]\d* neurons\) -> shuffled\.onnx, key shuffled\.onnx\.key\.json$",
        r"^equivalent: True \(max abs error \d\.\d\de-\d\d\)$",
        r"^wrong permutation caught: True$",
        r"^restored bit-identical: True, same file: True$",
    ],
    "resync_a_perturbed_copy.py": [
        r"^suspect: [1-9]\d* neurons permuted, noise on [1-9]\d* weight tensors",
        r"^argmax: Psi = \d+\.\d\d %",
        r"^hungarian: Psi = 100\.00 %, \d+ ambiguous neurons$",
        r"^resynced copy equivalent to the suspect: True$",
    ],
    "audit_a_suspect.py": [
        r"^permuted: verdict permuted \(exit code 0\)",
        r"^permuted \+ noise: verdict perturbed \(exit code 1\): .*likely noise",
        r"^permuted \+ pruned: verdict perturbed \(exit code 1\): .*likely pruning",
        r"^Markdown report: [1-9]\d* lines$",
    ],
    "watermark_survives_permutation.py": [
        r"^embedded 64 bits in block\.conv2\.conv: weight change \d+\.\d\d %, output change \d+\.\d\d %$",
        r"^bit error rate after permutation: (?:[2-9]\d|100)\.\d %$",
        r"^bit error rate after resync: 0\.0 %$",
    ],
}


def test_every_example_is_tested() -> None:
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ONNXLADY_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], check=False, capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    for pattern in EXPECTED[name]:
        assert any(re.search(pattern, line) for line in lines), f"no line matches {pattern!r} in:\n{result.stdout}"
    assert os.listdir(tmp_path) == []  # the examples write into temporary folders only
