"""Resync across a conversion keeps less and copies less, and still reports the same numbers.

- A signature's quantiles come from :func:`onnxlady._resync._invariants._order_statistics`,
  which buckets the values by the top bits of an order-preserving key and sorts only the buckets
  holding an asked rank: it must give what ``np.partition`` gives, value for value.
- The suspect's error bounds are moved only when read, and its values in its own order are the
  aligned ones moved back (:class:`onnxlady._resync._across._Suspect`): both must equal the
  values read from the suspect and moved eagerly.
- The matching's signatures read values without their bounds: the same values.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures import FIXTURES
from fixtures.conversions import CONVERSIONS
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync import _invariants
from onnxlady._resync._across import AcrossResync, _pair_plans
from onnxlady._resync._entry import resync_model
from onnxlady._resync._values import Approx, read_constant
from onnxlady.testing import permute_copy


def _values(kind: str, size: int) -> np.ndarray:
    rng = np.random.default_rng(size)
    if kind == "normal":
        return rng.standard_normal(size)
    if kind == "float16":  # a converted weight: few distinct values
        return (rng.standard_normal(size) * 0.05).astype(np.float16).astype(np.float64)
    if kind == "wide":  # magnitudes over many binades, both signs
        return np.exp(rng.standard_normal(size) * 30) * rng.choice([-1.0, 1.0], size)
    if kind == "zeros":  # signed zeros among values
        values = rng.standard_normal(size)
        values[: size // 2] = 0.0
        values[size // 2 : 3 * size // 4] = -0.0
        return values
    if kind == "tiny":  # subnormals
        return rng.standard_normal(size) * 1e-310
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["normal", "float16", "wide", "zeros", "tiny"])
@pytest.mark.parametrize("size", [1 << 16, 100_003, 300_000])
def test_order_statistics_are_the_partitions(kind: str, size: int) -> None:
    values = _values(kind, size)
    ranks = np.unique(np.random.default_rng(1).integers(0, size, 70))
    ranks = np.union1d(ranks, [0, size - 1])
    assert np.array_equal(_invariants._order_statistics(values, ranks), np.partition(values, ranks)[ranks])


def test_order_statistics_do_not_partition_a_spread_weight(monkeypatch) -> None:
    """The bucketed path is the one taken (the test above would pass on partition alone)."""
    values = _values("normal", 200_000)
    ranks = np.arange(0, 200_000, 6250)
    expected = np.partition(values, ranks)[ranks]

    def refuse(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("partitioned")

    monkeypatch.setattr(_invariants.np, "partition", refuse)
    assert np.array_equal(_invariants._order_statistics(values, ranks), expected)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_order_statistics_partition_values_that_are_not_finite(bad: float) -> None:
    values = _values("normal", 100_000)
    values[17] = bad
    ranks = np.array([0, 50_000, 99_999])
    assert np.array_equal(
        _invariants._order_statistics(values, ranks), np.partition(values, ranks)[ranks], equal_nan=True
    )


def test_a_wrong_order_statistic_is_caught() -> None:
    values = _values("normal", 100_000)
    ranks = np.array([10, 50_000, 90_000])
    assert not np.array_equal(_invariants._order_statistics(values, ranks), np.sort(values)[ranks + 1])


def _same(first: Approx, second: Approx) -> bool:
    shape = first.value.shape
    return (
        first.value.shape == second.value.shape
        and np.array_equal(first.value, second.value)
        and np.array_equal(np.broadcast_to(first.error, shape), np.broadcast_to(second.error, shape))
    )


def _moved(details: AcrossResync, number: int, array: np.ndarray) -> np.ndarray:
    """``array`` (a suspect plan in its own order) moved eagerly into the reference's order."""
    analysis = details.match.reference
    for axis, expr in analysis.tensors[number].axes:
        array = np.take(array, analysis.index_array(expr, details.matches), axis=axis)
    return array


@pytest.mark.parametrize("conversion", ["float16", "qdq"])
def test_the_suspects_values_and_bounds_are_those_read_and_moved(conversion: str) -> None:
    reference = FIXTURES["resnet"](0)
    permuted, _, _, key = permute_copy(reference, 7)
    result = resync_model(reference, CONVERSIONS[conversion](permuted), true_key=key)
    details = result.across
    assert isinstance(details, AcrossResync)
    assert result.psi == pytest.approx(100.0)
    read = _pair_plans(details.match).suspect  # read again, in the suspect's own order
    assert len(details.suspect_before) == len(details.suspect_aligned) == len(read)
    moved_somewhere = False
    for number, value in enumerate(read):
        before, aligned = details.suspect_before[number], details.suspect_aligned[number]
        if number not in details.compared:
            assert before is None and aligned is None
            continue
        assert value is not None and before is not None and aligned is not None
        assert _same(before, value)
        eager = Approx(_moved(details, number, value.value), _moved(details, number, np.broadcast_to(value.error, value.value.shape)))
        assert _same(aligned, eager)
        moved_somewhere |= not np.array_equal(aligned.value, before.value)
    assert moved_somewhere  # the suspect was permuted: the comparison above can fail


def test_the_suspects_values_read_as_a_list() -> None:
    reference = FIXTURES["resnet"](0)
    permuted, _, _, _ = permute_copy(reference, 7)
    details = resync_model(reference, CONVERSIONS["float16"](permuted)).across
    assert isinstance(details, AcrossResync)
    aligned = details.suspect_aligned
    count = len(aligned)
    assert [item is None for item in aligned] == [number not in details.compared for number in range(count)]
    last, by_count = aligned[-1], aligned[count - 1]
    assert (last is None and by_count is None) or (last is not None and by_count is not None and _same(last, by_count))
    assert len(aligned[1:3]) == 2
    with pytest.raises(IndexError):
        aligned[count]


@pytest.mark.parametrize("conversion", ["float16", "qdq"])
def test_a_constant_read_without_its_bound_has_the_same_value(conversion: str) -> None:
    """The matching's signatures read values alone: the same numbers, no bound computed."""
    model = CONVERSIONS[conversion](FIXTURES["resnet"](0))
    graph = ModelGraph(model)
    names = sorted({name for node in model.graph.node for name in node.input if name})
    read = 0
    for name in names:
        full, alone = read_constant(graph, name), read_constant(graph, name, bounds=False)
        assert (full is None) == (alone is None)
        if full is None or alone is None:
            continue
        read += 1
        assert full.value.dtype == alone.value.dtype == np.float64
        assert np.array_equal(full.value, alone.value)
        assert not np.any(alone.error)
    assert read > 10
    weight = max((read_constant(graph, name) for name in names), key=lambda a: -1 if a is None else a.value.size)
    assert weight is not None and np.all(weight.error > 0)  # a bound is there to be left out
