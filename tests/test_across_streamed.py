"""Resync across conversions without whole copies: the same results, less memory.

- a float32 or float16 weight is signed as stored (:func:`onnxlady._resync._invariants.signature`):
  its signature is the one of its float64 copy, to the bit;
- the re-ordered suspect comes back unbuilt (the suspect and the moved bytes of each tensor that
  moves, streamed when written), and its key is the one permuting a copy back gives;
- a QDQ suspect's dequantized weights are not kept by its graph while the solver moves them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fixtures import FIXTURES
from fixtures.conversions import CONVERSIONS
from onnxlady._analysis._channels import analyze
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync import _across
from onnxlady._resync._entry import resync_model
from onnxlady._resync._invariants import _BUCKETED_FROM, sharing_scratch, signature
from onnxlady._transforms._permute import unpermute_model
from onnxlady.testing import copy_model, permute_copy, permute_producer_only


def _same_bits(first: list[np.ndarray], second: list[np.ndarray]) -> bool:
    """Equal component by component, in float64 (a zero's sign aside, as partition gives either)."""
    return len(first) == len(second) and all(
        a.dtype == b.dtype == np.float64 and a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first, second)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(
    "shape", [(7,), (40,), (64, 48), (96, 32, 3, 3), (2, _BUCKETED_FROM + 3), (300, 400), (24, 3000, 3)]
)
def test_a_narrow_weight_signs_as_its_float64_copy(dtype: type, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    value = (rng.standard_normal(shape) * 0.05).astype(dtype)
    value.reshape(-1)[::5] = 0  # ties and zeros, as quantized or pruned weights have
    with sharing_scratch():
        narrow = signature(value)
        wide = signature(value.astype(np.float64))
    assert _same_bits(narrow, wide)
    # A weight moved by one value is signed differently: the comparison can fail.
    changed = value.copy()
    changed.reshape(-1)[0] = dtype(3.0)
    assert not _same_bits(signature(changed), wide)


def test_a_transposed_narrow_kernel_signs_as_its_float64_copy() -> None:
    value = np.random.default_rng(3).standard_normal((24, 16, 3)).astype(np.float32).transpose(1, 0, 2)
    assert _same_bits(signature(value), signature(value.astype(np.float64)))


@pytest.fixture(scope="module")
def converted() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A reference and its permuted copy converted to float16."""
    reference = FIXTURES["resnet"](0)
    model, _, _, _ = permute_copy(reference, 7)
    return reference, CONVERSIONS["float16"](model)


def test_the_streamed_output_and_key_are_those_of_the_permuted_copy(converted, monkeypatch) -> None:
    reference, suspect = converted
    before = suspect.SerializeToString()
    streamed = resync_model(reference, suspect)
    assert streamed.built is None and streamed.unbuilt is not None  # nothing copied yet
    assert suspect.SerializeToString() == before  # the suspect is never changed
    # The same resync with the suspect copied and permuted twice, as it was done before.
    monkeypatch.setattr(_across, "_streamed_reorder", lambda *args, **kwargs: None)
    copied = resync_model(reference, suspect)
    assert copied.built is not None
    assert streamed.key.to_json() == copied.key.to_json()
    assert streamed.model.SerializeToString() == copied.model.SerializeToString()
    # Unpermuting the suspect by the key gives the output, its digest checked bit for bit.
    restored = copy_model(suspect)
    assert unpermute_model(restored, streamed.key)
    assert restored.SerializeToString() == streamed.model.SerializeToString()
    # A suspect re-ordered wrongly (one producer alone) does not give it.
    wrong = copy_model(suspect)
    permute_producer_only(wrong, analyze(wrong))
    assert not unpermute_model(wrong, streamed.key)


def test_a_qdq_suspects_graph_lets_its_dequantized_weights_go() -> None:
    reference = FIXTURES["resnet"](0)
    model, _, _, _ = permute_copy(reference, 7)
    suspect = CONVERSIONS["qdq"](model)
    graph = ModelGraph(suspect)
    dequantized = [node.output[0] for node in suspect.graph.node if node.op_type == "DequantizeLinear"]
    first = {name: graph.constant_value(name) for name in dequantized}
    assert any(value is not None and value.size > 16 for value in first.values())
    graph.forget_values()
    for name, value in first.items():
        again = graph.constant_value(name)
        assert (again is None) == (value is None)
        if value is not None and again is not None:
            assert again is not value and np.array_equal(again, value)
    # The resync of that suspect still recovers the permutation (the values are read again).
    result = resync_model(reference, suspect)
    assert result.built is None
    assert all(group.ambiguous == 0 for group in result.groups)
