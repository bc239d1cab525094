"""Psi against a true key reads the reference one slice at a time (held-out round 18, F1).

Telling interchangeable neurons apart (``psi_distinguishable``) compares every neuron's full
signature. Built as one float64 matrix of all the group's slices, a residual stream's signature
is most of the model: ``resync --true-key`` of a 673 MB external-data decoder took 6.5 GB and
218 s (without the key 650 MB, 38 s). The rows are now compared slice by slice.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest

from fixtures.decoder import build_decoder
from onnxlady import permute, resync
from onnxlady._resync import _solver


@pytest.fixture
def traced_duplicates(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int, int]]]:
    """(group, slices, traced peak bytes) of each distinguishability check."""
    calls: list[tuple[str, int, int]] = []
    original = _solver._duplicated

    def traced(state: _solver.ResyncState, gid: str) -> np.ndarray:
        tracemalloc.start()
        try:
            return original(state, gid)
        finally:
            calls.append((gid, len(state.slices[gid]), tracemalloc.get_traced_memory()[1]))
            tracemalloc.stop()

    monkeypatch.setattr(_solver, "_duplicated", traced)
    yield calls


def test_psi_of_a_residual_stream_stays_within_a_slice(traced_duplicates: list[tuple[str, int, int]]) -> None:
    reference = build_decoder(0, layers=4)
    weight_bytes = sum(len(t.raw_data) for t in reference.graph.initializer)
    permuted = permute(reference, seed=3)
    result = resync(reference, permuted.model, true_key=permuted.key)
    assert result.psi == 100.0 and result.details.psi_distinguishable == 100.0
    widest = max(traced_duplicates, key=lambda call: call[1])
    assert widest[1] > 20  # the hidden size's group: a slice in every layer
    # Whole signature in float64: 12x the weights (session 17); one slice at a time: 0.44x.
    assert max(peak for _, _, peak in traced_duplicates) < weight_bytes
