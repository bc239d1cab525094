"""``tools.inspect_phases`` splits the analysis into its graph, its rules and its collection (issue 15).

Within one ``analyze`` call the tool times the graph it builds and the collection of the groups
and tensors to permute; the rules are the rest. The structural check is timed alone too. The
parts are each run's own, so graph + collect + rules is the analysis's time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import inspect_phases

_PARTS = (
    "graph (in analyze)",
    "collect (in analyze: groups, tensors to permute)",
    "rules (in analyze: the rest, the node walk)",
)


def _rows(text: str) -> dict[str, list[float]]:
    """Each table row's phase -> its wall s, CPU s, CPU ms/node (one node count)."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            rows[cells[1]] = [float(cell) for cell in cells[2:5]]
    return rows


def test_phases_split_the_analysis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect_phases.main(["--nodes", "60", "--repeats", "1", "--workdir", str(tmp_path)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert "validate_model (in load_model)" in rows
    for part in _PARTS:
        assert part in rows, sorted(rows)
    # (one run: its median is its own time, so the parts add up to the analysis, to the rounding)
    for column in (0, 1):
        total = sum(rows[part][column] for part in _PARTS)
        assert abs(total - rows["analyze"][column]) <= 0.002
        assert min(rows[part][column] for part in _PARTS[:2]) >= 0.0
