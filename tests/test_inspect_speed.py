"""The fast paths of ``inspect`` (issue 15) give the same results as the general ones.

``InspectResult.to_json_text`` writes the groups straight from the analysis: its text must be
``json.dumps(to_json(), indent=2)``'s on models with frozen groups, reasons, untied constants,
subgraphs and none of them, and fall back to the general writer on values of unusual types.
The collector pause moves what it made to the oldest generation: garbage cycles made during
it are still freed, and a process's own frozen objects stay frozen.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import weakref

import pytest
from onnx import TensorProto, helper

from fixtures import FIXTURES, build_deep_model
from onnxlady import inspect
from onnxlady._api._inspect import _groups_text
from onnxlady._errors import OnnxladyError
from onnxlady._io._collector import collector_paused

#: Fixtures with frozen groups and reasons, shared and untied constants, a subgraph, contrib ops.
_MODELS = ["resnet", "shared_initializer", "unruled_op", "if_branch", "tied_lm_head", "qdq_convnet",
           "channel_shuffle", "lstm_head", "contrib_attention", "bert_like"]  # fmt: skip


@pytest.mark.parametrize("name", _MODELS)
def test_json_text_is_json_dumps_of_the_document(name: str) -> None:
    result = inspect(FIXTURES[name](0))
    assert result.to_json_text() == json.dumps(result.to_json(), indent=2)


def test_json_text_with_untied_constants_and_reasons() -> None:
    result = inspect(build_deep_model(120))
    document = result.to_json()
    assert any(group["reasons"] for group in document["groups"])  # frozen groups are written too
    assert result.to_json_text() == json.dumps(document, indent=2)


def test_json_text_of_a_model_without_groups() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    result = inspect(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert result.groups == [] and _groups_text([]) == "[]"
    assert result.to_json_text() == json.dumps(result.to_json(), indent=2)


class _Name(str):
    """A str subclass: json writes it as a string, the fast writer hands it to json."""

    __slots__ = ()


def test_json_text_falls_back_on_values_of_other_types() -> None:
    result = inspect(FIXTURES["resnet"](0))
    group = result.analysis.groups[0]
    member = dataclasses.replace(group.members[0], tensor=_Name("renamed \u00e9"))
    result.analysis.groups[0] = dataclasses.replace(group, members=(member, *group.members[1:]))
    assert _groups_text(result.analysis.groups) is None
    text = result.to_json_text()
    assert text == json.dumps(result.to_json(), indent=2) and "renamed \\u00e9" in text


def test_garbage_cycles_made_in_a_pause_are_still_collected() -> None:
    class Node:
        other: object = None

    @collector_paused
    def make_cycle() -> weakref.ref[Node]:
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    ref = make_cycle()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert ref() is not None  # a cycle: reference counting alone does not free it
    gc.collect()
    assert ref() is None


def test_a_process_own_frozen_objects_stay_frozen() -> None:
    kept = [object() for _ in range(10)]
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        inspect(FIXTURES["resnet"](0))
        # Not released (some may have been freed since), and the analysis's objects not frozen.
        assert 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
    assert kept


def test_validation_still_names_the_first_problem() -> None:
    """Labels are made only for messages now: the messages are the same."""
    weight = helper.make_tensor("w", TensorProto.STRING, [1], [b"x"])  # type: ignore[list-item]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "strings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OnnxladyError, match=r"node 'mm' \(MatMul\) needs numbers, but its input 'w' holds strings"):
        inspect(model)
    bad_axis = helper.make_node("Concat", ["x", "x"], ["y"], axis=5000)
    graph = helper.make_graph(
        [bad_axis],
        "axis",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OnnxladyError, match=r"node Concat -> \['y'\]: attribute axis = 5000 is no tensor axis"):
        inspect(model)
