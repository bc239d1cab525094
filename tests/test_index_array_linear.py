"""``ChannelAnalysis.index_array`` reads only the groups its expression holds (issue 15).

Permuting a model asks for one index array per permuted tensor axis. Each call once turned the
whole ``perms`` mapping (one entry per group) into a dict keyed by group root: work of groups
times tensors, quadratic in the size of a deep network (permute of a 20,000-node model spent
half its time there). These tests check that a call reads the permutations of its own groups
only, that its arrays are those of the whole-dict form on models with structured index maps,
and that ``permute``'s work (counted in function calls, as ``tests/test_linear_analysis.py``
does) grows linearly with the node count.
"""

from __future__ import annotations

import cProfile
import pstats
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
import pytest

import onnxlady
from fixtures import FIXTURES, build_deep_model
from onnxlady._graph._expr import evaluate

SMALL, LARGE = 300, 1200
#: Linear work grows by LARGE / SMALL = 4; allow fixed costs and rounding, far below quadratic's 16.
MAX_GROWTH = 4.6


class _Recording(Mapping[str, np.ndarray]):
    """Group permutations by id that remember which ids were read (any way of reading them)."""

    def __init__(self, perms: dict[str, np.ndarray]) -> None:
        self._perms = perms
        self.read: set[str] = set()

    def __getitem__(self, gid: str) -> np.ndarray:
        self.read.add(gid)
        return self._perms[gid]

    def __iter__(self) -> Iterator[str]:
        self.read.update(self._perms)  # iterating hands out every id
        return iter(self._perms)

    def __len__(self) -> int:
        return len(self._perms)


def _permutations(analysis: onnxlady.ChannelAnalysis, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {group.id: rng.permutation(group.size) for group in analysis.permutable_groups}


def test_a_call_reads_only_the_groups_of_its_expression() -> None:
    analysis = onnxlady.inspect(build_deep_model(150)).analysis
    perms = _permutations(analysis, 0)
    assert len(perms) > 20  # many groups: reading them all is visible
    plan = next(plan for plan in analysis.tensors if plan.axes)
    _, expr = plan.axes[0]
    own = {analysis.group_of_root(atom.id).id for atom in analysis.solver.atoms(expr)}  # type: ignore[union-attr]
    recording = _Recording(perms)
    found = analysis.index_array(expr, recording)
    assert recording.read <= own
    assert not np.array_equal(found, np.arange(len(found)))  # a permutation was applied, not the identity


def _whole_dict(analysis: onnxlady.ChannelAnalysis, expr: object, perms: Mapping[str, np.ndarray]) -> np.ndarray:
    """The index array as the whole-dict form computed it: every group's permutation by root."""
    by_id = {group.id: group for group in analysis.groups}
    by_root = {by_id[gid].root: np.asarray(p) for gid, p in perms.items() if gid in by_id}
    return evaluate(analysis.solver, expr, by_root)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["deep", "resnet", "bert_like", "channel_shuffle", "tied_lm_head", "contrib_attention"])
def test_arrays_are_those_of_the_whole_dict(name: str) -> None:
    analysis = onnxlady.inspect(build_deep_model(60) if name == "deep" else FIXTURES[name](0)).analysis
    perms = _permutations(analysis, 1)
    other = _permutations(analysis, 2)
    compared = moved = 0
    for plan in analysis.tensors:
        for _, expr in plan.axes:
            found = analysis.index_array(expr, perms)
            assert np.array_equal(found, _whole_dict(analysis, expr, perms))
            # Other permutations give other arrays: the comparison above can tell them apart.
            moved += not np.array_equal(found, _whole_dict(analysis, expr, other))
            compared += 1
    assert compared and moved


def _calls(work: object) -> int:
    profile = cProfile.Profile()
    profile.enable()
    try:
        work()  # type: ignore[operator]
    finally:
        profile.disable()
    return int(pstats.Stats(profile).total_calls)  # type: ignore[attr-defined]


def test_permute_work_is_linear_in_the_node_count() -> None:
    small, large = build_deep_model(SMALL), build_deep_model(LARGE)
    assert len(large.graph.node) >= 3.9 * len(small.graph.node)

    def work(model: onnx.ModelProto) -> None:
        onnxlady.permute(model, seed=1)

    work(small)  # first-call costs (imports, caches) are not the command's
    growth = _calls(lambda: work(large)) / _calls(lambda: work(small))
    assert growth <= MAX_GROWTH, growth
