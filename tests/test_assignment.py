"""The assignment solver is scipy's own, reached without importing ``scipy.optimize``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from onnxlady._assignment import linear_sum_assignment


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (5, 9), (40, 40)])
def test_same_answer_as_scipy(shape: tuple[int, int], maximize: bool) -> None:
    from scipy.optimize import linear_sum_assignment as scipy_solver

    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    cost = rng.normal(size=shape)
    cost[0, :] = 0.5  # ties, where a different solver could choose differently
    ours = linear_sum_assignment(cost, maximize=maximize)
    theirs = scipy_solver(cost, maximize=maximize)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1], theirs[1])


def test_optimal_where_greedy_is_not() -> None:
    cost = np.array([[1.0, 2.0], [1.5, 10.0]])  # greedy takes (0, 0) then (1, 1): 11; best is 2 + 1.5
    rows, cols = linear_sum_assignment(cost)
    assert cost[rows, cols].sum() == 3.5


def test_does_not_import_scipy_optimize() -> None:
    script = (
        "import sys, numpy as np\n"
        "from onnxlady._assignment import linear_sum_assignment\n"
        "print(linear_sum_assignment(np.eye(3), maximize=True)[1].tolist())\n"
        "print('scipy.optimize' in sys.modules)\n"
    )
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert lines == ["[0,", "1,", "2]", "False"]
