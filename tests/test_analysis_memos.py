"""The analysis reads its bindings and its constant-derived tensors once (issue 15), with the same results.

Joining shared constants and planning the tensors both group the bindings by constant leaf:
the grouping is made once per number of bindings (a binding added later makes it again). The
check for groups only constants carry asks the set of constant-derived tensors once, not
once per tracked tensor. Work is counted (calls, reads), never timed.
"""

from __future__ import annotations

import cProfile
import pstats

import pytest

import onnxlady._analysis._channels as channels
from fixtures import FIXTURES, build_deep_model
from onnxlady._analysis._channels import analyze
from onnxlady._rules._context import AnalysisState, Binding


class _CountingBindings(dict):  # type: ignore[type-arg]
    """A bindings table that counts how often it is read whole."""

    reads = 0

    def items(self):  # type: ignore[no-untyped-def, override]
        type(self).reads += 1
        return super().items()


def _counting_state(graph):  # type: ignore[no-untyped-def]
    state = AnalysisState(graph)
    state.bindings = _CountingBindings()
    return state


@pytest.mark.parametrize("name", ["shared_initializer", "tied_lm_head", "resnet"])
def test_bindings_are_grouped_once_per_analysis(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _CountingBindings.reads = 0
    monkeypatch.setattr(channels, "AnalysisState", _counting_state)
    counted = analyze(FIXTURES[name](0))
    assert isinstance(counted.state.bindings, _CountingBindings) and counted.state.bindings
    assert _CountingBindings.reads == 1  # joining and planning share one grouping
    monkeypatch.undo()
    plain = analyze(FIXTURES[name](0))
    assert counted.tensors == plain.tensors
    assert [(g.id, g.size, g.frozen, g.members) for g in counted.groups] == [
        (g.id, g.size, g.frozen, g.members) for g in plain.groups
    ]


def test_a_binding_added_later_is_grouped_too() -> None:
    state = analyze(FIXTURES["shared_initializer"](0)).state
    grouped = channels._bindings_by_leaf(state)
    assert channels._bindings_by_leaf(state) is grouped  # the memo
    first = next(iter(state.bindings.values()))
    extra = Binding(first.node, first.slot + 100, first.leaf, first.axis, first.expr, "test")
    state.bindings[(extra.node, extra.slot, extra.axis)] = extra
    regrouped = channels._bindings_by_leaf(state)
    assert regrouped[first.leaf][(extra.node, extra.slot)] == {extra.axis: extra}


def test_constant_only_check_does_not_ask_tensor_by_tensor() -> None:
    analysis = analyze(build_deep_model(300))
    state = analysis.state
    assert len(state.tracked) > 200
    profile = cProfile.Profile()
    profile.enable()
    channels._freeze_constant_only(state)
    profile.disable()
    # One question for the whole set, not one per tracked tensor (there are hundreds).
    assert int(pstats.Stats(profile).total_calls) < 20  # type: ignore[attr-defined]
