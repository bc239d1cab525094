"""Shortcuts of ``find``'s exact stage and index read: each gives what the plain computation gives.

``find`` against 100,000 fingerprints compares about 80 candidates two to four times each; the
per-layer copy classes (``np.unique`` over structured rows) and the degenerate-layer test (a
reduction per field) were most of that stage's cost, and reading the packed search vectors
through a query result took twice the time of SQLite's blob handle. A shortcut that groups other
layers, flags other layers, or reads other vectors changes a ranking or a call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxlady._provenance import _index
from onnxlady._provenance._fingerprint import (
    FIELDS,
    LAYER_WIDTH,
    SLICES,
    ModelFingerprint,
    _copy_classes,
    degenerate_layers,
)
from onnxlady._provenance._index import add_fingerprints, open_index, search_matrix


def _fingerprint(records: np.ndarray, shapes: np.ndarray | None = None) -> ModelFingerprint:
    layers = records.shape[0]
    if shapes is None:
        shapes = np.tile(np.array([[16, 32, 1, 1]], dtype=np.int64), (layers, 1))
    return ModelFingerprint(records.astype(np.float32), shapes, ("MatMul",) * layers, tuple(map(str, range(layers))))


def _unique_classes(fingerprint: ModelFingerprint) -> np.ndarray:
    """The plain computation: ``np.unique`` over the (shape, record) rows as structured items."""
    rows = np.concatenate([fingerprint.shapes.astype(np.float64), fingerprint.records.astype(np.float64)], axis=1)
    _, classes = np.unique(np.ascontiguousarray(rows).view([("", rows.dtype)] * rows.shape[1]), return_inverse=True)
    return classes.reshape(-1)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :]))


def test_copy_classes_group_the_layers_np_unique_groups() -> None:
    rng = np.random.default_rng(0)
    records = rng.standard_normal((9, LAYER_WIDTH))
    records[4] = records[1]  # one weight read twice (ALBERT's shared layer)
    records[7] = records[1]
    records[2] = records[5]
    records[3, 0], records[6] = 0.0, records[3]
    records[6, 0] = -0.0  # equal values: np.unique groups -0.0 with 0.0
    shapes = np.tile(np.array([[16, 32, 1, 1]], dtype=np.int64), (9, 1))
    shapes[5, 0] = 8  # same record, another shape: not a copy
    fingerprint = _fingerprint(records, shapes)
    classes = _copy_classes(fingerprint)
    assert _same_partition(classes, _unique_classes(fingerprint))
    assert classes[1] == classes[4] == classes[7] and classes[3] == classes[6] and classes[2] != classes[5]


def test_copy_classes_of_rows_holding_nan_are_np_uniques() -> None:
    records = np.zeros((4, LAYER_WIDTH))
    records[:, 0] = [1.0, 1.0, 2.0, 2.0]
    records[2:, 5] = np.nan  # NaN equals nothing, not even itself: two classes, not one
    fingerprint = _fingerprint(records)
    classes = _copy_classes(fingerprint)
    assert _same_partition(classes, _unique_classes(fingerprint))
    assert classes[0] == classes[1] and classes[2] != classes[3]


def test_degenerate_layers_test_every_sorted_field() -> None:
    rng = np.random.default_rng(1)
    sorted_fields = [name for name, length in FIELDS if length > 1]
    records = np.zeros((12, LAYER_WIDTH))
    for name, value in zip(sorted_fields, rng.standard_normal(len(sorted_fields))):
        records[:, SLICES[name]] = value  # every neuron alike: flat fields
    for layer, name in enumerate(sorted_fields, start=1):  # layer 0 stays flat; each other moves one field
        records[layer, SLICES[name]] = np.linspace(0.0, 1.0, SLICES[name].stop - SLICES[name].start)
    records[len(sorted_fields) + 1, SLICES["level"]] = 5.0  # level is no sorted field: still flat
    expected = np.ones(len(records), dtype=bool)
    for name in sorted_fields:  # the plain computation: one reduction per field
        values = records[:, SLICES[name]]
        expected &= (values.max(axis=1) - values.min(axis=1)) <= 1e-4
    found = degenerate_layers(records.astype(np.float32))
    assert np.array_equal(found, expected)
    assert found[0] and found[len(sorted_fields) + 1] and not found[1 : len(sorted_fields) + 1].any()
    assert degenerate_layers(np.zeros((0, LAYER_WIDTH))).shape == (0,)


class _WithoutBlobs:
    """A connection without ``blobopen`` (Python 3.10's sqlite3)."""

    def __init__(self, connection: object) -> None:
        self._connection = connection

    def execute(self, *args: object) -> object:
        return self._connection.execute(*args)  # type: ignore[attr-defined]


@pytest.mark.parametrize("part_rows", [1000, 7])
def test_search_matrix_reads_the_vectors_the_rows_hold(tmp_path: Path, part_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_index, "_SEARCH_PART_ROWS", part_rows)  # 7: several parts
    rng = np.random.default_rng(2)
    entries = [(f"model{i}", _fingerprint(rng.standard_normal((3 + i % 4, LAYER_WIDTH)))) for i in range(20)]
    index = tmp_path / "synthetic.idx"
    add_fingerprints(index, entries)
    with open_index(index) as connection:
        rows = connection.execute("SELECT id, vector FROM models ORDER BY id").fetchall()
        ids, matrix = search_matrix(connection)
        plain_ids, plain = search_matrix(_WithoutBlobs(connection))  # type: ignore[arg-type]
        parts = connection.execute("SELECT count(*) FROM search").fetchone()[0]
    assert parts == -(-len(entries) // part_rows)
    expected = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), -1)
    assert ids.tolist() == plain_ids.tolist() == [row[0] for row in rows]
    assert np.array_equal(matrix, expected) and np.array_equal(plain, expected)
