"""Resync across a conversion reads each weight once and keeps no bound it is not asked for.

What it reports stays the same:

- :func:`onnxlady._resync._invariants._norms` sums a kernel's squares a few rows and columns at
  a time: the norms must be those of the whole-array formula, bit for bit, and the weight must
  not be written to.
- Within :func:`onnxlady._resync._sites.reading_once` an operand read without bounds is read
  once: the matching's signatures and the solver get the same arrays, which nobody writes to.
- Values read without bounds carry none; bounds made when first read are those an eager read
  gives.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from fixtures import FIXTURES
from fixtures.conversions import CONVERSIONS
from onnxlady._resync import _across, _invariants, _sites
from onnxlady._resync._entry import resync_model
from onnxlady._resync._values import Approx
from onnxlady.testing import permute_copy


def _whole_norms(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The formula :func:`_norms` must reproduce (whole arrays of squares)."""
    squares = flat * flat
    rows = np.sqrt(squares.reshape(flat.shape[0], -1).sum(axis=1))
    return rows, np.sqrt(np.moveaxis(squares, 1, 0).reshape(flat.shape[1], -1).sum(axis=1))


@pytest.mark.parametrize(
    "shape", [(640, 64, 3, 3), (64, 1, 3, 3), (5, 70000, 1), (70000, 3, 1, 1), (17, 33, 5), (300, 200), (2, 2, 2, 2, 2)]
)
def test_norms_are_the_whole_array_sums_and_leave_the_weight_alone(shape: tuple[int, ...]) -> None:
    weight = np.random.default_rng(len(shape)).standard_normal(shape) * 0.05
    kept = weight.copy()
    rows, columns = _invariants._norms(weight)
    expected_rows, expected_columns = _whole_norms(weight)
    assert rows.tobytes() == expected_rows.tobytes()
    assert columns.tobytes() == expected_columns.tobytes()
    assert weight.tobytes() == kept.tobytes()


def test_a_wrong_norm_is_caught() -> None:
    weight = np.random.default_rng(1).standard_normal((64, 32, 3, 3))
    rows, columns = _invariants._norms(weight)
    assert not np.array_equal(columns, _whole_norms(np.swapaxes(weight, 2, 3).copy()[:, ::-1])[1])
    assert rows.shape == (64,) and columns.shape == (32,)


def test_a_value_read_without_bounds_carries_none() -> None:
    plain = Approx(np.ones((2, 3)))
    assert not plain.bounded
    assert plain.error.shape == (2, 3) and not plain.error.any()
    assert not plain.reshaped((3, 2)).bounded and not plain.transposed((1, 0)).bounded and not plain.scaled(2.0).bounded
    calls = []
    lazy = Approx(np.ones(3), bound=lambda: calls.append(1) or np.full(3, 0.5))
    assert lazy.bounded and not calls
    assert np.array_equal(lazy.error, np.full(3, 0.5)) and np.array_equal(lazy.error, np.full(3, 0.5))
    assert calls == [1]  # made once, when first read


@pytest.mark.parametrize("conversion", ["float16", "qdq", "fold-bn"])
def test_reads_are_shared_read_only_and_give_what_separate_reads_give(monkeypatch, conversion: str) -> None:
    """Cached reads made read-only: nothing writes to them, and the result is the same as without the cache."""
    reference = FIXTURES["mobilenet"](0)
    permuted, _, _, key = permute_copy(reference, 7)
    suspect = CONVERSIONS[conversion](permuted)
    with monkeypatch.context() as patch:  # every reader reads for itself
        patch.setattr(_across, "reading_once", contextlib.nullcontext)
        plain = resync_model(reference, suspect, true_key=key)
    reads: list[int] = []
    original = _sites._read_operand

    def frozen(graph, operand, bounds, compact=False):  # type: ignore[no-untyped-def]
        value = original(graph, operand, bounds, compact)
        if value is not None and not bounds:
            reads.append(1)
            value.value.flags.writeable = False  # a reader writing to a shared read fails here
        return value

    monkeypatch.setattr(_sites, "_read_operand", frozen)
    shared = resync_model(reference, suspect, true_key=key)
    assert reads  # the shared path was taken
    assert shared.psi == plain.psi == pytest.approx(100.0)
    assert shared.key.to_json() == plain.key.to_json()
    for first, second in zip(shared.model.graph.initializer, plain.model.graph.initializer):
        assert first.SerializeToString() == second.SerializeToString()


def test_each_operand_is_read_once_within_reading_once(monkeypatch) -> None:
    reference = FIXTURES["resnet"](0)
    permuted, _, _, key = permute_copy(reference, 7)
    counts: dict[tuple[int, object], int] = {}
    original = _sites._read_operand

    def counted(graph, operand, bounds, compact=False):  # type: ignore[no-untyped-def]
        if not bounds:
            counts[(id(graph), operand)] = counts.get((id(graph), operand), 0) + 1
        return original(graph, operand, bounds, compact)

    monkeypatch.setattr(_sites, "_read_operand", counted)
    result = resync_model(reference, CONVERSIONS["float16"](permuted), true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert counts and max(counts.values()) == 1
    # Outside the block, every read is a read of its own.
    graph, operand = result.across.match.reference.graph, result.across.match.reference_sites[0].operands[0]
    _sites.read_operand(graph, operand, bounds=False)
    _sites.read_operand(graph, operand, bounds=False)
    assert counts[(id(graph), operand)] == 3


def test_the_reported_values_are_read_again_and_the_solver_arrays_go() -> None:
    reference = FIXTURES["resnet"](0)
    permuted, _, _, key = permute_copy(reference, 7)
    details = resync_model(reference, CONVERSIONS["qdq"](permuted), true_key=key).across
    assert isinstance(details, _across.AcrossResync)
    readings = details.reference._readings  # type: ignore[attr-defined]
    assert not hasattr(readings, "work") and not hasattr(readings, "_state")
    number = details.compared[0]
    first, again = details.reference[number], details.reference[number]
    assert first is not None and again is not None
    assert np.array_equal(first.value, again.value) and np.array_equal(first.error, again.error)
    assert first.error.any()  # a real bound: half a quantization step
