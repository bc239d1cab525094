"""Resync across a conversion keeps the weights it compares as stored, and computes in float64.

Whole float64 copies of both models' weights were most of its memory (issue 15). Now:

- :func:`onnxlady._resync._values.read_constant` with ``compact`` gives the float32 or float16
  array that its float64 read converts (a dequantized weight: the float32 its chain computes);
  :func:`~onnxlady._resync._values.widened` of it is that float64 read, bit for bit and in the
  same layout.
- The solver's state holds those arrays; :func:`onnxlady._resync._solver._gathered` converts
  each slice to float64 as it gathers it, and copies a kernel's taps as one element: the block is
  the one the float64 arrays gave, number for number and stride for stride.
- So the resync (output model, key, report) is the same as with float64 reads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures import FIXTURES
from fixtures.conversions import CONVERSIONS
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync import _sites, _solver
from onnxlady._resync._entry import resync_model
from onnxlady._resync._solver import _Slice
from onnxlady._resync._values import COMPACT_TYPES, read_constant, widened
from onnxlady.testing import permute_copy


def _moved_block(array: np.ndarray, piece: _Slice, widen: bool) -> np.ndarray:
    """The block the solver gathered before (float64 arrays moved and copied value by value)."""
    n, m = piece.index.shape
    wide = array.astype(np.float64) if widen else array
    moved = np.moveaxis(wide, piece.axis, 0)
    if not piece.identity:
        moved = np.take(moved, piece.index.ravel(), axis=0)
    return moved.reshape((n, m, *moved.shape[1:])).reshape(n, -1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize(
    ("shape", "axis"), [((64, 32, 3, 3), 1), ((16, 8, 5), 1), ((4, 6, 8, 3, 3), 2), ((16, 8, 3, 3), 0), ((10, 64), 1), ((6, 4, 1, 1), 1)]
)
def test_gathered_blocks_are_the_float64_blocks(shape: tuple[int, ...], axis: int, dtype: type) -> None:
    rng = np.random.default_rng(len(shape) + axis)
    array: np.ndarray = rng.standard_normal(shape).astype(dtype)
    size = shape[axis]
    for m in (1, 2):
        n = size // m
        for identity in (True, False):
            index = np.arange(size).reshape(n, m) if identity else rng.permutation(size).reshape(n, m)
            piece = _Slice(0, axis, index, identity, frozenset(), ())
            for widen in (False, True):
                block = _solver.gather_block(array, piece, (), widen)
                expected = _moved_block(array, piece, widen)
                assert block.dtype == expected.dtype
                assert block.strides == expected.strides
                assert block.tobytes() == expected.tobytes()
    # A wrong gather is caught: another order of the slice's neurons gives another block.
    in_order = _Slice(0, axis, np.arange(size).reshape(size, 1), True, frozenset(), ())
    wrong = _Slice(0, axis, np.roll(np.arange(size), 1).reshape(size, 1), False, frozenset(), ())
    assert not np.array_equal(_solver.gather_block(array, wrong, (), True), _moved_block(array, in_order, True))


@pytest.mark.parametrize("conversion", ["float16", "qdq", "bfloat16"])
def test_compact_reads_widen_to_the_float64_reads(conversion: str) -> None:
    permuted = permute_copy(FIXTURES["resnet"](0), 7)[0]
    graph = ModelGraph(CONVERSIONS[conversion](permuted))
    compact_types = set()
    names = {name for node in graph.nodes for name in node.input if name}
    for name in sorted(names):
        plain = read_constant(graph, name, bounds=False)
        compact = read_constant(graph, name, bounds=False, compact=True)
        assert (plain is None) == (compact is None), name
        if plain is None or compact is None:
            continue
        assert compact.value.dtype in (*COMPACT_TYPES, np.dtype(np.float64))
        compact_types.add(compact.value.dtype.name)
        wide = widened(compact).value
        assert wide.dtype == np.float64 and wide.strides == plain.value.strides
        assert wide.tobytes() == plain.value.tobytes(), name
    # The weights are kept compact: as stored (float16), or as the dequantization computes (float32).
    assert {"float16": "float16", "qdq": "float32", "bfloat16": "float64"}[conversion] in compact_types
    # Bounds are never compact (they are read whole, in float64).
    assert all(
        read_constant(graph, name, compact=True) is None or read_constant(graph, name, compact=True).value.dtype == np.float64  # type: ignore[union-attr]
        for name in sorted(names)
    )


def _digest(result: object) -> str:
    model, key = result.model, result.key  # type: ignore[attr-defined]
    return json.dumps(
        {
            "tensors": [tensor.SerializeToString().hex() for tensor in model.graph.initializer],
            "key": key.to_json(),
            "report": result.to_dict(),  # type: ignore[attr-defined]
        },
        sort_keys=True,
        default=str,
    )


@pytest.mark.parametrize(("fixture", "conversion"), [("resnet", "float16"), ("mobilenet", "qdq"), ("bert_like", "float16")])
def test_resync_across_is_the_same_with_float64_reads(monkeypatch, fixture: str, conversion: str) -> None:
    reference = FIXTURES[fixture](0)
    permuted, _, _, key = permute_copy(reference, 7)
    suspect = CONVERSIONS[conversion](permuted)
    seen: list[np.dtype] = []
    gathered = _solver._gathered

    def spied(array, piece, sort_dims, widen=False):  # type: ignore[no-untyped-def]
        seen.append(array.dtype)
        return gathered(array, piece, sort_dims, widen)

    monkeypatch.setattr(_solver, "_gathered", spied)
    compact = resync_model(reference, suspect, true_key=key)
    assert any(dtype != np.float64 for dtype in seen)  # the solver worked on compact arrays
    assert compact.psi == pytest.approx(100.0)
    original = _sites._read_operand
    with monkeypatch.context() as patch:  # every read in float64, as before
        patch.setattr(_sites, "_read_operand", lambda graph, operand, bounds, compact=False: original(graph, operand, bounds, False))
        seen.clear()
        wide = resync_model(reference, suspect, true_key=key)
        assert seen and all(dtype == np.float64 for dtype in seen)
    assert _digest(compact) == _digest(wide)


@pytest.mark.parametrize("shape", [(1, 8, 3, 3), (8, 1, 3, 3), (4, 6, 1, 3, 3)])
def test_a_block_that_views_the_weight_is_not_given_as_new(shape: tuple[int, ...]) -> None:
    """The solver centres new blocks in place: one that views the state's array must say so."""
    array = np.random.default_rng(3).standard_normal(shape)
    kept = array.copy()
    for axis in range(len(shape) - 2):
        size = shape[axis]
        piece = _Slice(0, axis, np.arange(size).reshape(size, 1), True, frozenset(), ())
        block, fresh = _solver._gathered(array, piece, ())
        assert fresh == (not np.may_share_memory(block, array))
        assert block.tobytes() == _moved_block(array, piece, False).tobytes()
    assert array.tobytes() == kept.tobytes()
