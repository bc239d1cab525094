"""The twin solver's score matrices computed a band of rows at a time: the same numbers, bit for bit.

:meth:`onnxlady._resync._solver._Blocks.scores` sums the blocks' products and derives the decision
one band of rows at a time, and :meth:`~onnxlady._resync._solver._Scores.margins` /
:meth:`~onnxlady._resync._solver._Scores.chosen` never build the ``n x n`` float64 similarity.
Resync reports those figures (margins, mean similarity) to the last digit, so each is compared
with the whole-matrix expression it replaces, with ``==`` on every bit, on scores that hold
pruned (all-zero) neurons and exact ties. The reference arrays of an inline twin are read per
group and released (:class:`~onnxlady._resync._mapped.ReleasingState`): the result is the same
as with every array kept.
"""

from __future__ import annotations

import numpy as np
import pytest

import onnxlady
import onnxlady._resync._solver as solver
from fixtures import FIXTURES
from onnxlady._resync import _mapped


def _blocks(n: int, widths: list[int], seed: int, zeros: int) -> solver._Blocks:
    """Blocks of a noisy permuted copy, ``zeros`` neurons pruned in the suspect and the reference."""
    rng = np.random.default_rng(seed)
    pairs = []
    perm = rng.permutation(n)
    for width in widths:
        ref = rng.standard_normal((n, width)).astype(np.float32)
        sus = ref[perm] + np.float32(0.3) * rng.standard_normal((n, width)).astype(np.float32)
        ref[:zeros] = 0.0
        sus[n - zeros :] = 0.0
        pairs.append((ref, sus))
    return solver._Blocks.build(pairs, n, seed=seed)


def _whole_gram(blocks: solver._Blocks, weights: list[tuple[float, float]]) -> np.ndarray:
    """The sum as it was written before bands: one weighted ``n x n`` temporary per block."""
    n = blocks.zero_ref.size
    gram = np.zeros((n, n), dtype=np.float32)
    for (u, v), block in zip(weights, blocks.blocks):
        if u == 0 and v == 0:
            continue
        gram += np.float32(u * v) * block.product(False)
    return gram


def _whole_decision(scores: solver._Scores) -> np.ndarray:
    matrix = 2.0 * scores.gram - scores.sus_sq[None, :].astype(np.float32)
    return scores._masked(matrix)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit (the sign of zeros included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize(("n", "widths", "zeros", "band"), [(300, [40, 1, 7], 3, 1 << 12), (97, [5000], 0, 1 << 16), (64, [9, 9], 2, 64)])
@pytest.mark.parametrize("keep", [True, False])
def test_banded_scores_equal_the_whole_matrix_expressions(
    n: int, widths: list[int], zeros: int, band: int, keep: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(solver, "_BAND", band)
    blocks = _blocks(n, widths, seed=n, zeros=zeros)
    blocks.keep = keep
    weights = [(0.7, 1.3), (0.0, 0.0), (2.5, 0.25)][: len(widths)]
    scores = blocks.scores(weights, "distance")
    assert _same(scores.gram, _whole_gram(blocks, weights))
    assert _same(scores.decision, _whole_decision(scores))
    similarity = scores.similarity()
    assert _same(scores.margins(), solver._margins(similarity))
    step = np.argsort(-similarity, axis=1)[:, 0]  # not a permutation: every row's best
    assert _same(scores.chosen(step), similarity[np.arange(n), step])
    assert not scores.margins()[:zeros].any()  # pruned rows: every similarity 0, margin 0


def test_a_wrong_band_sum_is_caught() -> None:
    """The comparison above can fail: summing the blocks in another order changes some bits."""
    blocks = _blocks(200, [64, 64, 64], seed=5, zeros=0)
    weights = [(0.7, 1.3), (1.1, 0.9), (2.5, 0.25)]
    reordered = solver._Blocks(blocks.blocks[::-1], blocks.zero_ref, blocks.zero_sus, True)
    assert not _same(reordered.scores(weights[::-1], "distance").gram, _whole_gram(blocks, weights))


def test_margins_by_two_maxima_equal_the_partition() -> None:
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((50, 40))
    matrix[3, [4, 9]] = 10.0  # a tie at the top: margin 0
    matrix[7] = -np.inf
    matrix[8, 2] = -np.inf
    with np.errstate(invalid="ignore"):  # a row of -inf: -inf - -inf, in both
        for rows in (matrix, matrix[:, :2], np.full((4, 5), 0.25)):
            assert _same(solver._margins_in_place(rows.copy()), solver._margins(rows))
        assert not solver._margins_in_place(matrix.copy())[3]
        with_nan = matrix.copy()
        with_nan[0, 0] = np.nan
        assert _same(solver._margins_in_place(with_nan.copy()), solver._margins(with_nan))


@pytest.mark.parametrize("name", ["resnet", "encoder_prenorm"])
def test_an_inline_reference_is_released_group_by_group_with_the_same_result(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = FIXTURES[name](0)
    permuted = onnxlady.permute(model, seed=3)
    suspect = onnxlady.perturb(permuted.model, noise=0.05, seed=2).model
    released: list[int] = []
    original = _mapped.ReleasedArrays.release

    def release(self: _mapped.ReleasedArrays, plan: int) -> None:
        released.append(plan)
        original(self, plan)

    monkeypatch.setattr(_mapped.ReleasedArrays, "release", release)
    result = onnxlady.resync(model, suspect, true_key=permuted.key)  # Psi reads every group again
    assert released and len(set(released)) == len(released)  # each plan released once
    count = len(released)
    onnxlady.resync(model, suspect, refine=True)  # refinement solves every group again: nothing released
    assert len(released) == count
    monkeypatch.setattr(_mapped.ReleasedArrays, "release", lambda self, plan: None)  # every array kept
    whole = onnxlady.resync(model, suspect, true_key=permuted.key)
    assert result.to_json() == whole.to_json()
    assert result.key.to_json() == whole.key.to_json()
    assert result.psi == pytest.approx(100.0)
    for ours, theirs in zip(result.model.graph.initializer, whole.model.graph.initializer):
        assert ours.SerializeToString() == theirs.SerializeToString()
