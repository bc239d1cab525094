"""Permutation expressions over channel spaces, and the solver that couples them.

A *channel space* (a tensor and one of its axes) takes a permutation. Which permutation is
described by an expression over *groups* (free permutations the tool may choose):

- :class:`Atom` — one group, a free permutation of ``size`` elements;
- :class:`Fixed` — the identity, with the reason the space cannot move;
- :class:`DirectSum` — block-diagonal: the parts are laid end to end (Concat, Split, Slice);
- :class:`Product` — mixed radix ``index = o * inner.size + i`` with the permutation acting
  on both digits: ``p (x) I_S`` for Flatten after a conv, ``I_K (x) p`` for Tile or grouped
  convolution, ``heads (x) head_dim`` for attention.

Rules state equations between expressions (:meth:`GroupSolver.unify`). The solver keeps the
most general solution: two atoms become one group (union-find); an atom equated with a
structured expression is *refined* into it (its permutations are restricted to that form);
anything equated with :class:`Fixed` is frozen, remembering why. Refinement only ever
restricts, so every permutation the solver allows is valid for every equation it was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Union

import numpy as np


@dataclass(frozen=True)
class FreezeReason:
    """Why a group must keep the identity permutation.

    ``kind`` is one of: ``graph-input``, ``graph-output``, ``no-rule``, ``blocking``,
    ``unknown-shape``, ``index-map``, ``not-constant``, ``rule-error``.
    """

    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True)
class Atom:
    """A group: one free permutation of ``size`` elements (identified by ``id``)."""

    id: int
    size: int


@dataclass(frozen=True)
class Fixed:
    """The identity permutation of ``size`` elements; ``reason`` says why it cannot move."""

    size: int
    reason: FreezeReason


@dataclass(frozen=True)
class DirectSum:
    """Block-diagonal permutation: the parts occupy consecutive index ranges."""

    parts: tuple["Expr", ...]

    @property
    def size(self) -> int:
        return sum(part.size for part in self.parts)


@dataclass(frozen=True)
class Product:
    """Mixed-radix permutation: index ``o * inner.size + i`` maps to ``p_o[o] * inner.size + p_i[i]``."""

    outer: "Expr"
    inner: "Expr"

    @property
    def size(self) -> int:
        return self.outer.size * self.inner.size


Expr = Union[Atom, Fixed, DirectSum, Product]

STRUCTURE = FreezeReason("index-map", "positions that an index map keeps in place")


class GroupSolver:
    """Union-find over atoms, with refinement and freezing; see the module docstring."""

    def __init__(self) -> None:
        self._size: list[int] = []
        self._parent: list[int] = []
        self._definition: dict[int, Expr] = {}
        self._reasons: dict[int, list[FreezeReason]] = {}

    # -- atoms ---------------------------------------------------------------------------
    def new_atom(self, size: int) -> Atom:
        """A fresh free group of ``size`` elements."""
        atom_id = len(self._size)
        self._size.append(size)
        self._parent.append(atom_id)
        return Atom(atom_id, size)

    def find(self, atom_id: int) -> int:
        """The representative of ``atom_id``'s union-find class (with path halving)."""
        parent = self._parent
        while parent[atom_id] != atom_id:
            parent[atom_id] = parent[parent[atom_id]]
            atom_id = parent[atom_id]
        return atom_id

    def is_frozen(self, atom_id: int) -> bool:
        return self.find(atom_id) in self._reasons

    def reasons(self, atom_id: int) -> tuple[FreezeReason, ...]:
        return tuple(self._reasons.get(self.find(atom_id), ()))

    def _add_reasons(self, root: int, reasons: list[FreezeReason] | tuple[FreezeReason, ...]) -> None:
        kept = self._reasons.setdefault(root, [])
        for reason in reasons:
            if reason not in kept and len(kept) < 8:
                kept.append(reason)

    # -- resolution ----------------------------------------------------------------------
    def resolve(self, expr: Expr) -> Expr:
        """``expr`` with every refined atom replaced by its definition, in normal form."""
        if isinstance(expr, Atom):
            root = self.find(expr.id)
            definition = self._definition.get(root)
            if definition is not None:
                return self.resolve(definition)
            return expr if root == expr.id else Atom(root, self._size[root])
        if isinstance(expr, Fixed):
            return expr
        if isinstance(expr, DirectSum):
            return direct_sum([self.resolve(part) for part in expr.parts])
        return product(self.resolve(expr.outer), self.resolve(expr.inner))

    def atoms(self, expr: Expr) -> Iterator[Atom]:
        """The group atoms a resolved expression is made of (with repetition)."""
        expr = self.resolve(expr)
        yield from _atoms_of(expr)

    # -- equations -----------------------------------------------------------------------
    def freeze(self, expr: Expr, reason: FreezeReason) -> None:
        """Every group in ``expr`` keeps the identity, for ``reason``."""
        for atom in list(self.atoms(expr)):
            self._add_reasons(atom.id, [reason])

    def unify(self, left: Expr, right: Expr, mismatch: FreezeReason | None = None) -> None:
        """Require ``left`` and ``right`` to be the same permutation.

        Where no common refinement exists (incompatible index maps), both sides are frozen
        with ``mismatch`` (or a generic index-map reason): the safe answer, never a guess.
        """
        left, right = self.resolve(left), self.resolve(right)
        if left.size != right.size:
            reason = mismatch or FreezeReason(
                "index-map", f"spaces of sizes {left.size} and {right.size} were coupled"
            )
            self.freeze(left, reason)
            self.freeze(right, reason)
            return
        if left == right:
            return
        if isinstance(left, Atom) or isinstance(right, Atom):
            atom, other = (left, right) if isinstance(left, Atom) else (right, left)
            self._unify_atom(atom, other)
            return
        if isinstance(left, Fixed) or isinstance(right, Fixed):
            fixed, other = (left, right) if isinstance(left, Fixed) else (right, left)
            self.freeze(other, fixed.reason)
            return
        if isinstance(left, DirectSum) or isinstance(right, DirectSum):
            self._unify_blocks(left, right, mismatch)
            return
        self._unify_products(left, right, mismatch)

    def _unify_atom(self, atom: Atom, other: Expr) -> None:
        root = atom.id  # resolved: a root without definition
        if isinstance(other, Atom):
            other_root = other.id
            merged_reasons = self._reasons.pop(other_root, []) + self._reasons.pop(root, [])
            self._parent[other_root] = root
            if merged_reasons:
                self._add_reasons(root, merged_reasons)
            return
        if isinstance(other, Fixed):
            self._add_reasons(root, [other.reason])
            return
        if any(self.find(a.id) == root for a in _atoms_of(other)):
            reason = FreezeReason("index-map", "a group was coupled with a structured copy of itself")
            self._add_reasons(root, [reason])
            self.freeze(other, reason)
            return
        # Refinement: the atom becomes the structured expression (a restriction of its choices).
        inherited = self._reasons.pop(root, None)
        self._definition[root] = other
        if inherited:
            for inner in _atoms_of(other):
                self._add_reasons(self.find(inner.id), inherited)

    def _unify_blocks(self, left: Expr, right: Expr, mismatch: FreezeReason | None) -> None:
        """Equate two expressions at least one of which is block-diagonal."""
        for _ in range(4 * left.size + 4):
            left, right = self.resolve(left), self.resolve(right)
            left_parts, right_parts = _blocks(left), _blocks(right)
            left_cuts, right_cuts = _cuts(left_parts), _cuts(right_parts)
            if left_cuts == right_cuts:
                for a, b in zip(left_parts, right_parts):
                    self.unify(a, b, mismatch)
                return
            missing_left = sorted(right_cuts - left_cuts)
            missing_right = sorted(left_cuts - right_cuts)
            if missing_left and not self._split_at(left, missing_left[0]):
                break
            if missing_right and not self._split_at(right, missing_right[0]):
                break
        reason = mismatch or FreezeReason("index-map", "block structures that cannot be aligned were coupled")
        self.freeze(left, reason)
        self.freeze(right, reason)

    def _split_at(self, expr: Expr, cut: int) -> bool:
        """Refine ``expr`` so that ``cut`` becomes a block boundary; False if impossible."""
        expr = self.resolve(expr)
        if isinstance(expr, Fixed):
            return True  # identity splits anywhere
        if isinstance(expr, Atom):
            left, right = self.new_atom(cut), self.new_atom(expr.size - cut)
            self._unify_atom(expr, DirectSum((left, right)))
            return True
        if isinstance(expr, DirectSum):
            offset = 0
            for part in expr.parts:
                if offset < cut < offset + part.size:
                    return self._split_at(part, cut - offset)
                offset += part.size
            return True
        inner_size = expr.inner.size
        if cut % inner_size == 0:
            return self._split_at(expr.outer, cut // inner_size)
        if isinstance(expr.outer, Fixed):
            # I_K (x) p equals K copies of p: cutting inside one copy cuts p itself.
            return self._split_at(expr.inner, cut % inner_size)
        return False

    def _unify_products(self, left: Expr, right: Expr, mismatch: FreezeReason | None) -> None:
        """Equate two mixed-radix products by aligning their digit sizes."""
        left_factors, right_factors = _factors(left), _factors(right)
        i = j = 0
        pairs: list[tuple[Expr, Expr]] = []
        aligned = True
        while i < len(left_factors) and j < len(right_factors):
            a, b = left_factors[i], right_factors[j]
            if a.size == b.size:
                pairs.append((a, b))
                i += 1
                j += 1
                continue
            big = a if a.size > b.size else b
            split = self._split_radix(big, min(a.size, b.size))
            if split is None:
                aligned = False
                break
            if big is a:
                left_factors[i : i + 1] = list(split)
            else:
                right_factors[j : j + 1] = list(split)
        if aligned and i == len(left_factors) and j == len(right_factors):
            for a, b in pairs:
                self.unify(a, b, mismatch)
            return
        reason = mismatch or FreezeReason("index-map", "index maps of different radices were coupled")
        self.freeze(left, reason)
        self.freeze(right, reason)

    def _split_radix(self, expr: Expr, high_size: int) -> tuple[Expr, Expr] | None:
        """Refine ``expr`` into ``Product(high, low)`` with ``high.size == high_size``."""
        if expr.size % high_size:
            return None
        low_size = expr.size // high_size
        if isinstance(expr, Fixed):
            return Fixed(high_size, expr.reason), Fixed(low_size, expr.reason)
        if isinstance(expr, Atom):
            high, low = self.new_atom(high_size), self.new_atom(low_size)
            self._unify_atom(expr, Product(high, low))
            return high, low
        return None


# -- normal forms -------------------------------------------------------------------------
def direct_sum(parts: list[Expr]) -> Expr:
    """Block-diagonal expression in normal form (flat, no empty parts, merged identities)."""
    flat: list[Expr] = []
    for part in parts:
        for piece in part.parts if isinstance(part, DirectSum) else (part,):
            if piece.size == 0:
                continue
            if isinstance(piece, Fixed) and flat and isinstance(flat[-1], Fixed) and flat[-1].reason == piece.reason:
                flat[-1] = Fixed(flat[-1].size + piece.size, piece.reason)
            else:
                flat.append(piece)
    if len(flat) == 1:
        return flat[0]
    if not flat:
        return Fixed(0, STRUCTURE)
    return DirectSum(tuple(flat))


def product(outer: Expr, inner: Expr) -> Expr:
    """Mixed-radix expression in normal form (trivial digits dropped, sums distributed)."""
    if outer.size == 1:
        return inner
    if inner.size == 1:
        return outer
    if isinstance(outer, Fixed) and isinstance(inner, Fixed) and outer.reason == inner.reason:
        return Fixed(outer.size * inner.size, outer.reason)
    if isinstance(outer, DirectSum):
        # (a + b) (x) q is (a (x) q) + (b (x) q): blocks stay contiguous.
        return direct_sum([product(part, inner) for part in outer.parts])
    if isinstance(outer, Product):
        return product(outer.outer, product(outer.inner, inner))
    return Product(outer, inner)


def _atoms_of(expr: Expr) -> Iterator[Atom]:
    if isinstance(expr, Atom):
        yield expr
    elif isinstance(expr, DirectSum):
        for part in expr.parts:
            yield from _atoms_of(part)
    elif isinstance(expr, Product):
        yield from _atoms_of(expr.outer)
        yield from _atoms_of(expr.inner)


def _blocks(expr: Expr) -> list[Expr]:
    if isinstance(expr, DirectSum):
        return list(expr.parts)
    if isinstance(expr, Product) and isinstance(expr.outer, Fixed) and not isinstance(expr.inner, Fixed):
        return _blocks(expr.inner) * expr.outer.size
    return [expr]


def _cuts(parts: list[Expr]) -> set[int]:
    cuts, offset = set(), 0
    for part in parts[:-1]:
        offset += part.size
        cuts.add(offset)
    return cuts


def _factors(expr: Expr) -> list[Expr]:
    if isinstance(expr, Product):
        return _factors(expr.outer) + _factors(expr.inner)
    return [expr]


# -- evaluation ---------------------------------------------------------------------------
def evaluate(solver: GroupSolver, expr: Expr, perms: Mapping[int, np.ndarray]) -> np.ndarray:
    """Index array ``idx`` with ``new = take(old, idx)`` for the permutations ``perms`` (by root)."""
    expr = solver.resolve(expr)
    return _evaluate(solver, expr, perms)


def _evaluate(solver: GroupSolver, expr: Expr, perms: Mapping[int, np.ndarray]) -> np.ndarray:
    if isinstance(expr, Atom):
        perm = None if solver.is_frozen(expr.id) else perms.get(expr.id)
        return np.arange(expr.size, dtype=np.int64) if perm is None else np.asarray(perm, dtype=np.int64)
    if isinstance(expr, Fixed):
        return np.arange(expr.size, dtype=np.int64)
    if isinstance(expr, DirectSum):
        pieces, offset = [], 0
        for part in expr.parts:
            pieces.append(_evaluate(solver, part, perms) + offset)
            offset += part.size
        return np.concatenate(pieces)
    outer = _evaluate(solver, expr.outer, perms)
    inner = _evaluate(solver, expr.inner, perms)
    return (outer[:, None] * expr.inner.size + inner[None, :]).reshape(-1)


def labels(solver: GroupSolver, expr: Expr) -> dict[int, np.ndarray]:
    """For each group in ``expr``: which of its neurons governs each index (``-1`` where none)."""
    return _labels(solver.resolve(expr))


def _labels(expr: Expr) -> dict[int, np.ndarray]:
    if isinstance(expr, Atom):
        return {expr.id: np.arange(expr.size, dtype=np.int64)}
    if isinstance(expr, Fixed):
        return {}
    if isinstance(expr, DirectSum):
        total, offset = expr.size, 0
        result: dict[int, np.ndarray] = {}
        for part in expr.parts:
            for root, lab in _labels(part).items():
                arr = result.setdefault(root, np.full(total, -1, dtype=np.int64))
                span = arr[offset : offset + part.size]
                arr[offset : offset + part.size] = np.where(lab >= 0, lab, span)
            offset += part.size
        return result
    outer_size, inner_size = expr.outer.size, expr.inner.size
    result = {root: np.repeat(lab, inner_size) for root, lab in _labels(expr.outer).items()}
    for root, lab in _labels(expr.inner).items():
        tiled = np.tile(lab, outer_size)
        result[root] = np.where(tiled >= 0, tiled, result[root]) if root in result else tiled
    return result


def describe(expr: Expr, root: int) -> str:
    """How group ``root`` sits inside ``expr``: ``p``, ``[64:128] of 192: p``, ``p (x) I_49`` ..."""
    if isinstance(expr, Atom):
        return "p" if expr.id == root else "other group"
    if isinstance(expr, Fixed):
        return "identity"
    if isinstance(expr, DirectSum):
        offset, found = 0, []
        for part in expr.parts:
            if any(a.id == root for a in _atoms_of(part)):
                found.append(f"[{offset}:{offset + part.size}] of {expr.size}: {describe(part, root)}")
            offset += part.size
        return "; ".join(found)
    in_outer = any(a.id == root for a in _atoms_of(expr.outer))
    in_inner = any(a.id == root for a in _atoms_of(expr.inner))
    outer = describe(expr.outer, root) if in_outer else f"I_{expr.outer.size}"
    inner = describe(expr.inner, root) if in_inner else f"I_{expr.inner.size}"
    return f"{outer} (x) {inner}"


def canonical(solver: GroupSolver, expr: Expr) -> Expr:
    """Resolved expression with frozen groups replaced by the identity: equal iff same permutation."""
    expr = solver.resolve(expr)
    return _canonical(solver, expr)


_IDENTITY = FreezeReason("index-map", "identity")


def _canonical(solver: GroupSolver, expr: Expr) -> Expr:
    if isinstance(expr, Atom):
        return Fixed(expr.size, _IDENTITY) if solver.is_frozen(expr.id) else expr
    if isinstance(expr, Fixed):
        return Fixed(expr.size, _IDENTITY)
    if isinstance(expr, DirectSum):
        return direct_sum([_canonical(solver, part) for part in expr.parts])
    return product(_canonical(solver, expr.outer), _canonical(solver, expr.inner))
