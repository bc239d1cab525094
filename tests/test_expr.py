"""The permutation algebra: unification, refinement, freezing and evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlady._expr import (
    STRUCTURE,
    Atom,
    DirectSum,
    Fixed,
    FreezeReason,
    GroupSolver,
    canonical,
    describe,
    evaluate,
    labels,
    product,
)

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
