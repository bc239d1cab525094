"""The twin solver centres a view's rows in memory reused from one solve to the next (issue 15).

Where a block's rows are a view of the model (a twin's weights as stored), the solver centres
them into a new array per solve: at 529 MB that was over 1 GB of fresh memory and its page
faults, a quarter of the resync's system time. The rows are now written into a buffer per
block side (:class:`onnxlady._resync._solver._CentredBuffer`), reused by the next solve and let
go when the solver's run ends. The numbers must be those of the plain difference, bit for bit
(resync reports its margins to the last digit, and the key must not change): compared here on
the centring itself and on a whole resync, whose key must still restore the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

import onnxlady
import onnxlady._resync._solver as solver
from fixtures import build_large_model


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit (the sign of zeros included), same type and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_centred_in_a_buffer_is_the_plain_difference(dtype: type) -> None:
    rng = np.random.default_rng(0)
    buffer = solver._CentredBuffer()
    first = rng.standard_normal((64, 300)).astype(dtype)
    first.flags.writeable = False  # a view of a model: never centred in place
    centred = solver._centred(first, False, buffer)
    assert _same(centred, first - first.mean(axis=0, keepdims=True))
    assert np.shares_memory(centred, buffer._array)
    # A smaller block of the next solve is written in the same memory.
    second = rng.standard_normal((32, 100)).astype(dtype)
    again = solver._centred(second, False, buffer)
    assert np.shares_memory(again, centred)
    assert _same(again, second - second.mean(axis=0, keepdims=True))
    # Rows that are not C-contiguous keep the plain difference's own layout: a new array.
    strided = first.T
    plain = solver._centred(strided, False, buffer)
    assert not np.shares_memory(plain, buffer._array)
    assert _same(plain, strided - strided.mean(axis=0, keepdims=True))


def test_twin_resync_reuses_the_centred_memory_and_keeps_its_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = build_large_model(1)
    suspect = onnxlady.permute(reference, seed=3).model
    noisy = onnxlady.perturb(suspect, noise=0.05, seed=1).model
    seen: list[tuple[solver.ResyncState, int, int]] = []  # per solve: state, wide blocks, those centred in its buffers
    real = solver.ResyncState.blocks

    def recording(self: solver.ResyncState, gid: str, solved: frozenset[str]) -> solver._Blocks:
        blocks = real(self, gid, solved)
        memory = [side._array for pair in self._centred or [] for side in pair if side._array is not None]
        # The body layers' kernels (64 x 64 x 3 x 3): rows as stored, a view of the suspect.
        wide = [block.ref for block in blocks.blocks if isinstance(block.ref, np.ndarray) and block.ref.shape[1] == 576]
        kept = sum(any(np.shares_memory(rows, array) for array in memory) for rows in wide)
        seen.append((self, len(wide), kept))
        return blocks

    monkeypatch.setattr(solver.ResyncState, "blocks", recording)
    result = onnxlady.resync(reference, noisy)
    # Every such block is centred in the state's buffers.
    assert sum(wide for _, wide, _ in seen) >= 8
    assert all(kept == wide for _, wide, kept in seen)
    # The run let them go.
    assert all(state._centred is None for state, _, _ in seen)
    # The answer: the key restores the permuted suspect's order, and a wrong one does not.
    truth = onnxlady.resync(reference, suspect).key
    assert result.key.permutations().keys() == truth.permutations().keys()
    assert all(np.array_equal(result.key.permutations()[g], p) for g, p in truth.permutations().items())
    wrong = dict(truth.permutations())
    group = next(iter(wrong))
    wrong[group] = np.roll(wrong[group], 1)
    assert not all(np.array_equal(result.key.permutations()[g], p) for g, p in wrong.items())
