"""The permutation algebra: unification, refinement, freezing and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxlady._errors import OnnxladyError
from onnxlady._graph._expr import (
    STRUCTURE,
    Atom,
    DirectSum,
    Fixed,
    FreezeReason,
    GroupSolver,
    Interleave,
    Transposed,
    canonical,
    describe,
    evaluate,
    interleave,
    labels,
    product,
)
from onnxlady._transforms._key import evaluate_tree, expr_to_tree

REASON = FreezeReason("graph-output", "graph output 'y'")


def _perms(solver: GroupSolver, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {root: rng.permutation(size) for root, size in enumerate(solver._size)}


def test_two_atoms_become_one_group() -> None:
    solver = GroupSolver()
    a, b = solver.new_atom(4), solver.new_atom(4)
    solver.unify(a, b)
    assert solver.find(a.id) == solver.find(b.id)
    perms = _perms(solver)
    assert np.array_equal(evaluate(solver, a, perms), evaluate(solver, b, perms))


def test_freezing_spreads_through_a_group_with_its_reason() -> None:
    solver = GroupSolver()
    a, b = solver.new_atom(3), solver.new_atom(3)
    solver.unify(a, b)
    solver.unify(b, Fixed(3, REASON))
    assert solver.is_frozen(a.id) and solver.reasons(a.id) == (REASON,)
    assert np.array_equal(evaluate(solver, a, _perms(solver)), np.arange(3))


def test_an_atom_is_refined_into_blocks() -> None:
    solver = GroupSolver()
    whole, left, right = solver.new_atom(6), solver.new_atom(2), solver.new_atom(4)
    solver.unify(whole, DirectSum((left, right)))
    perms = _perms(solver, 1)
    idx = evaluate(solver, whole, perms)
    assert sorted(idx[:2]) == [0, 1] and sorted(idx[2:]) == [2, 3, 4, 5]


def test_blocks_with_different_cuts_meet_at_a_common_refinement() -> None:
    solver = GroupSolver()
    a = DirectSum((solver.new_atom(2), solver.new_atom(4)))
    b = DirectSum((solver.new_atom(3), solver.new_atom(3)))
    solver.unify(a, b)
    perms = _perms(solver, 2)
    idx_a, idx_b = evaluate(solver, a, perms), evaluate(solver, b, perms)
    assert np.array_equal(idx_a, idx_b)
    for lo, hi in ((0, 2), (2, 3), (3, 6)):  # every piece stays inside its block
        assert sorted(idx_a[lo:hi]) == list(range(lo, hi))


def test_kronecker_index_map_matches_flatten() -> None:
    solver = GroupSolver()
    channels = solver.new_atom(3)
    flat = product(channels, Fixed(4, STRUCTURE))
    perm = np.array([2, 0, 1])
    idx = evaluate(solver, flat, {channels.id: perm})
    x = np.arange(12).reshape(3, 4)
    assert np.array_equal(x.reshape(-1)[idx], x[perm].reshape(-1))


def test_products_of_different_radices_align() -> None:
    solver = GroupSolver()
    heads = solver.new_atom(3)
    left = product(heads, Fixed(4, STRUCTURE))
    right = product(solver.new_atom(6), solver.new_atom(2))
    solver.unify(left, right)
    perms = _perms(solver, 3)
    assert np.array_equal(evaluate(solver, left, perms), evaluate(solver, right, perms))


def test_incompatible_maps_freeze_instead_of_guessing() -> None:
    solver = GroupSolver()
    a = product(solver.new_atom(2), Fixed(3, STRUCTURE))  # 2 x 3
    b = product(Fixed(3, STRUCTURE), solver.new_atom(2))  # 3 x 2
    solver.unify(a, b)
    assert all(solver.is_frozen(atom.id) for atom in solver.atoms(a))
    assert all(solver.is_frozen(atom.id) for atom in solver.atoms(b))


def test_size_mismatch_freezes_both_sides() -> None:
    solver = GroupSolver()
    a, b = solver.new_atom(3), solver.new_atom(4)
    solver.unify(a, b)
    assert solver.is_frozen(a.id) and solver.is_frozen(b.id)


def test_labels_and_description_locate_neurons() -> None:
    solver = GroupSolver()
    a, b = solver.new_atom(2), solver.new_atom(3)
    expr = DirectSum((product(a, Fixed(2, STRUCTURE)), b))
    lab = labels(solver, expr)
    assert lab[a.id].tolist() == [0, 0, 1, 1, -1, -1, -1]
    assert lab[b.id].tolist() == [-1, -1, -1, -1, 0, 1, 2]
    assert describe(solver.resolve(expr), a.id) == "[0:4] of 7: p (x) I_2"


def test_canonical_form_ignores_frozen_groups() -> None:
    solver = GroupSolver()
    a = solver.new_atom(3)
    solver.freeze(a, REASON)
    assert canonical(solver, a) == canonical(solver, Fixed(3, STRUCTURE))


@pytest.mark.parametrize("seed", range(5))
def test_evaluation_is_always_a_permutation(seed: int) -> None:
    solver = GroupSolver()
    expr = DirectSum((product(solver.new_atom(3), solver.new_atom(2)), Fixed(2, REASON), solver.new_atom(4)))
    idx = evaluate(solver, expr, _perms(solver, seed))
    assert sorted(idx.tolist()) == list(range(expr.size))


def test_atoms_are_values() -> None:
    assert Atom(1, 3) == Atom(1, 3)


# -- channel shuffle: transposed reading and interleaves ------------------------------------
def _transposed_index(idx: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A permutation of a [rows, cols] layout (``new = take(old, idx)``) read as [cols, rows]."""
    order = np.arange(rows * cols).reshape(rows, cols).T.reshape(-1)  # new position -> old position
    return np.argsort(order)[idx[order]]


def test_a_shuffled_block_sum_is_an_interleave() -> None:
    solver = GroupSolver()
    a, b = solver.new_atom(5), solver.new_atom(5)
    shuffled = solver.transposed(DirectSum((a, b)), 2, 5)
    assert shuffled == Interleave((a, b))
    perms = _perms(solver, 4)
    assert np.array_equal(evaluate(solver, shuffled, perms), _transposed_index(evaluate(solver, DirectSum((a, b)), perms), 2, 5))
    assert describe(shuffled, b.id) == "[1::2] of 10: p"
    assert labels(solver, shuffled)[a.id].tolist() == [0, -1, 1, -1, 2, -1, 3, -1, 4, -1]
    assert not solver.is_frozen(a.id) and not solver.is_frozen(b.id)


def test_a_shuffled_group_stays_whole_and_reads_transposed() -> None:
    solver = GroupSolver()
    whole = solver.new_atom(6)
    shuffled = solver.transposed(whole, 2, 3)
    assert solver.resolve(whole) == whole  # no restriction until an equation needs one
    assert shuffled == Transposed(whole, 3, 2)
    perms = _perms(solver, 6)
    assert np.array_equal(evaluate(solver, shuffled, perms), _transposed_index(evaluate(solver, whole, perms), 2, 3))
    assert labels(solver, shuffled)[whole.id].tolist() == [0, 3, 1, 4, 2, 5]
    assert solver.transposed(shuffled, 3, 2) == whole  # read back: the group itself


def test_a_grouped_conv_after_a_shuffle_restricts_the_group_exactly() -> None:
    """ShuffleNet v1: 15 channels of one group, shuffled as [3, 5], read by a conv of 3 groups.

    The conv takes the same permutation q inside each of its 3 input groups; before the shuffle
    that is q conjugated by the transpose (no product or block form), and all 5! choices of q stay.
    """
    solver = GroupSolver()
    whole = solver.new_atom(15)
    shuffled = solver.transposed(whole, 3, 5)
    q = solver.new_atom(5)
    solver.unify(shuffled, product(Fixed(3, REASON), q))
    assert not solver.is_frozen(q.id) and solver.find(q.id) == q.id
    assert solver.resolve(whole) == Transposed(product(Fixed(3, REASON), q), 3, 5)
    perms = {q.id: np.array([3, 0, 4, 2, 1])}
    before = evaluate(solver, whole, perms)
    after = evaluate(solver, shuffled, perms)
    assert np.array_equal(after, _transposed_index(before, 3, 5))
    assert np.array_equal(after, np.concatenate([perms[q.id] + 5 * k for k in range(3)]))
    assert sorted(before.tolist()) == list(range(15))


def test_a_transposed_group_coupled_to_blocks_takes_their_transposed_image() -> None:
    solver = GroupSolver()
    whole = solver.new_atom(8)
    shuffled = solver.transposed(whole, 2, 4)  # [2, 4] read as [4, 2]
    halves = DirectSum((solver.new_atom(4), solver.new_atom(4)))
    solver.unify(shuffled, halves)
    # Each half of the [4, 2] layout is channels {0, 1, 4, 5} and {2, 3, 6, 7} before the
    # shuffle: no block form there, the exact map is the halves read transposed.
    assert solver.resolve(whole) == Transposed(halves, 2, 4)
    lab = labels(solver, whole)
    assert [int(lab[halves.parts[0].id][k]) >= 0 for k in range(8)] == [True, True, False, False] * 2
    perms = _perms(solver, 9)
    assert np.array_equal(evaluate(solver, shuffled, perms), evaluate(solver, halves, perms))
    assert np.array_equal(evaluate(solver, shuffled, perms), _transposed_index(evaluate(solver, whole, perms), 2, 4))


def test_a_transposed_group_in_the_key_evaluates_as_in_the_solver() -> None:
    solver = GroupSolver()
    whole = solver.new_atom(6)
    shuffled = solver.transposed(whole, 2, 3)
    perms = _perms(solver, 7)
    tree = expr_to_tree(solver.resolve(shuffled), {whole.id: "g0"}, solver.find)
    assert tree == {"transposed": {"rows": 3, "cols": 2, "of": {"group": "g0"}}}
    assert np.array_equal(evaluate_tree(tree, {"g0": perms[whole.id]}, {"g0": 6}), evaluate(solver, shuffled, perms))


def test_cutting_an_interleave_cuts_every_part_where_its_residues_stop() -> None:
    solver = GroupSolver()
    a, b = solver.new_atom(5), solver.new_atom(5)
    halves = DirectSum((solver.new_atom(5), solver.new_atom(5)))
    solver.unify(Interleave((a, b)), halves)
    # [0:5] takes a[0:3] (positions 0, 2, 4) and b[0:2]; [5:10] starts on an odd position, so
    # its even local positions are b's (b[2:5], 3 of them) and its odd ones a's (a[3:5]).
    resolved = solver.resolve(Interleave((a, b)))
    assert isinstance(resolved, DirectSum) and [p.size for p in resolved.parts] == [5, 5]
    first, second = resolved.parts
    assert [part.size for part in first.parts] == [3, 2] and [part.size for part in second.parts] == [3, 2]
    lab = labels(solver, Interleave((a, b)))
    assert [int(lab[solver.find(atom.id)][k]) >= 0 for atom in second.parts for k in (5, 6)] == [True, False, False, True]
    perms = _perms(solver, 5)
    idx = evaluate(solver, Interleave((a, b)), perms)
    assert np.array_equal(idx, evaluate(solver, halves, perms))
    assert sorted(idx[:5]) == list(range(5)) and sorted(idx[5:]) == list(range(5, 10))


def test_interleave_normal_form() -> None:
    solver = GroupSolver()
    a, b = solver.new_atom(2), solver.new_atom(2)
    assert interleave([a]) == a
    assert interleave([Fixed(3, REASON), Fixed(2, REASON)]) == Fixed(5, REASON)
    c, d = solver.new_atom(2), solver.new_atom(2)
    # Both parts cut after 2 of their positions: the first 4 positions are a block.
    split = interleave([DirectSum((a, b)), DirectSum((c, d))])
    assert split == DirectSum((Interleave((a, c)), Interleave((b, d))))
    # An identity part can be cut anywhere: its positions 3 and 7 are blocks of their own.
    split = interleave([DirectSum((a, b)), Fixed(4, REASON)])
    assert isinstance(split, DirectSum) and [p.size for p in split.parts] == [3, 1, 3, 1]
    with pytest.raises(ValueError):
        interleave([solver.new_atom(2), solver.new_atom(4)])


def test_an_interleave_equals_a_product_only_with_the_identity_inside() -> None:
    solver = GroupSolver()
    a, b, p, q = solver.new_atom(3), solver.new_atom(3), solver.new_atom(3), solver.new_atom(2)
    solver.unify(Interleave((a, b)), product(p, q))
    assert solver.is_frozen(q.id) and not solver.is_frozen(p.id)
    assert solver.find(a.id) == solver.find(b.id) == solver.find(p.id)


def test_interleaves_of_different_shapes_freeze() -> None:
    solver = GroupSolver()
    left = Interleave((solver.new_atom(2), solver.new_atom(2), solver.new_atom(2)))
    right = Interleave((solver.new_atom(3), solver.new_atom(3)))
    solver.unify(left, right)
    assert all(solver.is_frozen(atom.id) for atom in [*solver.atoms(left), *solver.atoms(right)])


def test_an_interleave_in_the_key_evaluates_as_in_the_solver() -> None:
    solver = GroupSolver()
    a, b = solver.new_atom(3), solver.new_atom(2)
    expr = Interleave((a, b))
    perms = _perms(solver, 6)
    ids = {a.id: "g0", b.id: "g1"}
    tree = expr_to_tree(expr, ids, solver.find)
    assert tree == {"interleave": [{"group": "g0"}, {"group": "g1"}]}
    by_id = {ids[root]: perm for root, perm in perms.items() if root in ids}
    assert np.array_equal(evaluate_tree(tree, by_id, {"g0": 3, "g1": 2}), evaluate(solver, expr, perms))
    with pytest.raises(OnnxladyError, match="interleave"):
        evaluate_tree({"interleave": [{"identity": 1}, {"identity": 3}]}, {}, {})


@settings(max_examples=40, deadline=None)
@given(
    halves=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=3),
    units=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_shufflenet_units_keep_every_group_free_and_every_split(halves: list[int], units: int, seed: int) -> None:
    """Stage after stage of ShuffleNetV2: Concat(kept half, branch) -> shuffle -> split in halves.

    Nothing freezes (the structure always has a solution), each shuffle's output is exactly the
    transposed reading of its input, and each split keeps its halves apart.
    """
    solver = GroupSolver()
    checks: list[tuple[str, object, object, int, int]] = []
    for half in halves:
        stage = solver.transposed(DirectSum((solver.new_atom(half), solver.new_atom(half))), 2, half)
        assert stage is not None
        for _ in range(units):
            kept, branch_in = solver.new_atom(half), solver.new_atom(half)
            solver.unify(stage, DirectSum((kept, branch_in)))
            checks.append(("split", stage, DirectSum((kept, branch_in)), 2, half))
            concat = DirectSum((kept, solver.new_atom(half)))
            stage = solver.transposed(concat, 2, half)
            assert stage is not None
            checks.append(("shuffle", concat, stage, 2, half))
    assert not any(solver.is_frozen(root) for root in range(len(solver._size)))
    perms = _perms(solver, seed % 1000)
    for kind, before, after, rows, cols in checks:
        old, new = evaluate(solver, before, perms), evaluate(solver, after, perms)  # type: ignore[arg-type]
        assert sorted(old.tolist()) == list(range(rows * cols))
        expected = _transposed_index(old, rows, cols) if kind == "shuffle" else old
        assert np.array_equal(new, expected), kind
