"""``tools.inspect_phases --floor-parts`` times the least per-node work of a rule table (issue 15).

Besides load, save, one pass over the nodes and the networkx graphs, the tool times a dispatch
on each node's operator with one rule call that reads its inputs' shapes and gives its outputs
one, and says what load + pass + that dispatch (with and without the graph) make of the floor:
the least ratio an inspect made of such parts can reach. The sums are each run's own parts, so
adding the dispatch never lowers a ratio.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools import inspect_phases


def _rows(text: str) -> dict[str, list[str]]:
    """Each table row's phase -> its other cells (one node count)."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            rows[cells[1]] = cells[2:]
    return rows


def test_floor_parts_time_the_rule_dispatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect_phases.main(["--floor-parts", "--nodes", "60", "--repeats", "1", "--workdir", str(tmp_path)]) == 0
    rows = _rows(capsys.readouterr().out)
    dispatch = rows[inspect_phases._DISPATCH]
    assert float(dispatch[1]) >= 0.0  # its CPU seconds
    least = {}
    for parts in ("load + pass + graph", "load + pass + dispatch", "load + pass + graph + dispatch"):
        assert parts in rows
        found = re.fullmatch(r"([\d.]+) / ([\d.]+)", rows[f"least ratio of {parts} (CPU, min / median)"][3])
        assert found is not None
        least[parts] = float(found.group(1))
    assert least["load + pass + graph + dispatch"] >= least["load + pass + graph"]
