"""The channel analysis does work linear in the node count (issue 15), measured by counting calls.

``inspect`` once rebuilt a position table over every node for every bound constant: quadratic,
62 s at 50,000 nodes. These tests count the Python and builtin function calls (``cProfile``'s
call count, which does not depend on the machine or its load) that analysing
``fixtures.build_deep_model`` makes at two sizes four times apart: linear work grows about 4
times, quadratic work 16 times. No wall time is measured.
"""

from __future__ import annotations

import cProfile
import gc
import pstats
from collections.abc import Callable

import numpy as np
import onnx
import pytest

import onnxlady
from fixtures import build_deep_model
from onnxlady._analysis._channels import analyze
from onnxlady._io._collector import collector_paused
from onnxlady.testing import GraphBuilder

SMALL, LARGE = 300, 1200
#: Linear work grows by LARGE / SMALL = 4; allow fixed costs and rounding, far below quadratic's 16.
MAX_GROWTH = 4.6


def _calls(work: Callable[[], object]) -> int:
    """How many function calls ``work`` makes (Python functions and builtins alike)."""
    profile = cProfile.Profile()
    profile.enable()
    try:
        work()
    finally:
        profile.disable()
    return int(pstats.Stats(profile).total_calls)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    return build_deep_model(SMALL), build_deep_model(LARGE)


def _growth(models: tuple[onnx.ModelProto, onnx.ModelProto], work: Callable[[onnx.ModelProto], object]) -> float:
    small, large = models
    assert len(large.graph.node) >= 3.9 * len(small.graph.node)
    work(small)  # first-call costs (imports, caches) are not the analysis's
    return _calls(lambda: work(large)) / _calls(lambda: work(small))


def test_analysis_work_is_linear_in_the_node_count(models: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    assert _growth(models, analyze) <= MAX_GROWTH


def test_inspect_with_its_documents_is_linear(models: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    """What ``onnxlady inspect --json`` does: validation, analysis, the JSON document and the text."""

    def inspect(model: onnx.ModelProto) -> None:
        result = onnxlady.inspect(model)
        result.to_json()
        result.to_text()

    assert _growth(models, inspect) <= MAX_GROWTH


def test_the_count_catches_quadratic_work(models: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    """The measure can fail: a position table rebuilt per node (the old bug's shape) grows 16 times."""

    def quadratic(model: onnx.ModelProto) -> None:
        nodes = list(model.graph.node)
        for node in nodes:
            positions = {id(other): k for k, other in enumerate(nodes)}
            positions.get(id(node))
            len(positions)

    assert _growth(models, quadratic) > 10


def test_many_constants_sharing_one_consumer_chain_stay_linear() -> None:
    """Bound constants (the old bug's trigger): a chain of Adds each reading its own initializer."""

    def chain(length: int) -> onnx.ModelProto:
        b = GraphBuilder(f"chain_{length}", 0)
        x = b.matmul(b.input("input", (1, 8)), 8, name="fc")
        for i in range(length):
            x = b.add(x, np.full((1, 8), 0.01 * i, dtype=np.float32), name=f"add{i}")
        return b.build(b.matmul(x, 4, name="head"))

    growth = _growth((chain(SMALL), chain(LARGE)), analyze)
    assert growth <= MAX_GROWTH


def test_the_collector_is_paused_during_analysis_and_restored() -> None:
    """Collector passes over a growing heap made analysis time grow faster than the graph."""
    seen: list[bool] = []

    @collector_paused
    def inner() -> None:
        seen.append(gc.isenabled())

    @collector_paused
    def outer(fail: bool) -> None:
        inner()
        seen.append(gc.isenabled())
        if fail:
            raise ValueError("stop")

    assert gc.isenabled()
    outer(False)
    assert seen == [False, False] and gc.isenabled()
    with pytest.raises(ValueError):
        outer(True)
    assert gc.isenabled()
    gc.disable()  # a caller that turned it off itself keeps it off
    try:
        outer(False)
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert getattr(analyze, "__wrapped__", None) is not None  # the analysis runs inside the pause
