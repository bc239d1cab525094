"""A rule's commit freezes every input space it did not take, and only those (issue 15's faster commit).

The commit skips inputs whose spaces were all taken; these cases pin what it must still freeze:
an untaken axis, a joint space next to fully taken axes, a joint space alone, and nothing when
everything was taken.
"""

from __future__ import annotations

from onnx import TensorProto, helper

from onnxlady._graph._model_graph import ModelGraph
from onnxlady._rules._context import AnalysisState, JointSpace, RuleContext


def _state() -> AnalysisState:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="act")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return AnalysisState(ModelGraph(model))


def _messages(state: AnalysisState, atom_id: int) -> list[str]:
    return [reason.message for reason in state.solver.reasons(atom_id)]


def test_an_untaken_axis_freezes_and_a_taken_one_does_not() -> None:
    state = _state()
    channels, width = state.solver.new_atom(4), state.solver.new_atom(3)
    state.tracked["x"] = {1: channels, 2: width}
    ctx = RuleContext(state, 0)
    ctx.take(0, 1)
    ctx.commit()
    assert not state.solver.is_frozen(channels.id)
    assert _messages(state, width.id) == ["Relu 'act': no rule for axis 2 of 'x' (input 0)"]


def test_a_joint_space_freezes_beside_fully_taken_axes() -> None:
    state = _state()
    channels, joint = state.solver.new_atom(4), state.solver.new_atom(12)
    state.tracked["x"] = {1: channels}
    state.joint["x"] = [JointSpace((1, 2), (4, 3), joint)]
    ctx = RuleContext(state, 0)
    ctx.take(0, 1)
    ctx.commit()
    assert not state.solver.is_frozen(channels.id)
    assert _messages(state, joint.id) == ["Relu 'act': no rule for axes [1, 2] of 'x' taken together"]


def test_a_joint_space_alone_freezes() -> None:
    state = _state()
    joint = state.solver.new_atom(12)
    state.joint["x"] = [JointSpace((1, 2), (4, 3), joint)]
    RuleContext(state, 0).commit()
    assert _messages(state, joint.id) == ["Relu 'act': no rule for axes [1, 2] of 'x' taken together"]


def test_nothing_freezes_when_everything_is_taken() -> None:
    state = _state()
    channels, width, joint = state.solver.new_atom(4), state.solver.new_atom(3), state.solver.new_atom(12)
    state.tracked["x"] = {1: channels, 2: width}
    state.joint["x"] = [JointSpace((1, 2), (4, 3), joint)]
    ctx = RuleContext(state, 0)
    ctx.take_all(0)
    ctx.take_joint(0)
    ctx.emit(0, 1, channels)
    ctx.commit()
    assert not any(state.solver.is_frozen(atom.id) for atom in (channels, width, joint))
    assert state.tracked["y"] == {1: channels}
