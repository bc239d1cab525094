"""The HTML audit report is the same bytes whatever Python's string hashing (PYTHONHASHSEED).

The group graph's edges come from sets of group ids, whose iteration order follows the hash
seed; the spanning tree drawn for a graph with cycles (heads and head dims written by one
Reshape, channel shuffles) followed that order, so two runs of one audit drew two layouts.
Each run here is its own interpreter with its own seed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = """
import hashlib, sys
from fixtures import FIXTURES
from onnxlady import analyze, draw_permutations, permute_model
from onnxlady._audit._render import render_html
from onnxlady._audit._verdicts import audit_models
name = sys.argv[1]
reference, suspect = FIXTURES[name](0), FIXTURES[name](0)
moved = analyze(suspect)
permute_model(moved, draw_permutations(moved, 1))
report = audit_models(reference, suspect)
page = render_html(report, analyze(reference))
assert "<h2>Group graph</h2><svg" in page
print(hashlib.sha256(page.encode()).hexdigest())
"""


def _page_digest(name: str, seed: int) -> str:
    environment = {**os.environ, "PYTHONHASHSEED": str(seed)}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, name], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.parametrize("name", ["shufflenet_v2", "contrib_gqa"])
def test_html_report_does_not_depend_on_the_hash_seed(name: str) -> None:
    digests = {_page_digest(name, seed) for seed in (0, 1, 2, 3)}
    assert len(digests) == 1, digests


def test_the_group_graph_follows_the_groups_order_not_the_edges_order() -> None:
    """Two orders of one edge set (as two hash seeds give them) draw the same picture."""
    from fixtures import FIXTURES
    from onnxlady import analyze
    from onnxlady._audit._render import _group_graph

    analysis = analyze(FIXTURES["shufflenet_v2"](0))
    edges = analysis.group_edges()

    class Reordered:
        groups = analysis.groups

        def __init__(self, reverse: bool) -> None:
            self.reverse = reverse

        def group_edges(self) -> dict[tuple[str, str], set[str]]:
            return dict(reversed(list(edges.items()))) if self.reverse else dict(edges)

    drawn = {hashlib.sha256(_group_graph(Reordered(reverse)).encode()).hexdigest() for reverse in (False, True)}
    assert len(drawn) == 1
