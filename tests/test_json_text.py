"""The fast indented JSON writer prints exactly what ``json.dumps(value, indent=N)`` prints."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest

from fixtures import build_deep_model
from onnxlady import inspect
from onnxlady._api._json_text import dumps_indented
from onnxlady._api._sources import jsonable

_CASES: list[Any] = [
    {},
    [],
    0,
    -3.5,
    "text",
    None,
    True,
    {"a": {}, "b": [], "c": [[]], "d": [{}], "e": {"f": {}}},
    {"nested": {"deep": {"deeper": [1, [2, [3, {"x": None}]]]}}},
    {"floats": [0.1, 1e-05, 1e300, -0.0, float("nan"), float("inf"), -math.inf]},
    {"text": ["é", "\u2028", "\x00", '"quoted", {braces}: [x]', "\\", "a\nb", "日本"]},
    {"é": 1, "\n": {"k": [True, False, None]}},
    ({"tuple": (1, 2, (3, 4))}),
    [{"a": 1, "b": "two"}, {"a": 2, "b": [3]}, [], {}, 5, "s", None],
    {1: "int key", 2.5: "float key", True: "bool key", None: "none key"},  # json turns them into text
    {"mixed": {3: "int key inside", "s": [1, {"k": {}}]}},
]


@pytest.mark.parametrize("value", _CASES)
@pytest.mark.parametrize("indent", [1, 2, 4])
def test_same_text_as_json_dumps(value: Any, indent: int) -> None:
    assert dumps_indented(value, indent) == json.dumps(value, indent=indent)


def test_random_documents() -> None:
    rng = random.Random(0)

    def make(depth: int) -> Any:
        kind = rng.randrange(8 if depth < 4 else 5)
        if kind == 0:
            return rng.randrange(-1000, 1000)
        if kind == 1:
            return rng.uniform(-1e6, 1e6)
        if kind == 2:
            return "".join(rng.choice('ab{}[],:" \\\n\u00e9\u4e2d') for _ in range(rng.randrange(6)))
        if kind == 3:
            return rng.choice([True, False, None])
        if kind == 4:
            return []
        if kind in (5, 6):
            return {"k" + str(i) + rng.choice(["", '"', "é"]): make(depth + 1) for i in range(rng.randrange(5))}
        return [make(depth + 1) for _ in range(rng.randrange(5))]

    for _ in range(300):
        value = make(0)
        assert dumps_indented(value) == json.dumps(value, indent=2)


def test_values_json_cannot_write_raise_as_json_does() -> None:
    for value in ({"a": np.int64(1)}, [object()], {("tuple", "key"): 1}):
        with pytest.raises(TypeError):
            json.dumps(value, indent=2)
        with pytest.raises(TypeError):
            dumps_indented(value)


def test_inspect_document_is_plain_json_and_prints_as_before() -> None:
    result = inspect(build_deep_model(300))
    document = result.to_json()
    # Nothing left for jsonable to convert: to_json skips walking the groups.
    assert jsonable(document) == document
    assert result.to_json_text() == json.dumps(document, indent=2)
    assert document["groups"] and document["groups"][0]["members"]
