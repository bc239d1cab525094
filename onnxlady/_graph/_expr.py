"""Permutation expressions over channel spaces, and the solver that couples them.

A *channel space* (a tensor and one of its axes) takes a permutation. Which permutation is
described by an expression over *groups* (free permutations the tool may choose):

- :class:`Atom` — one group, a free permutation of ``size`` elements;
- :class:`Fixed` — the identity, with the reason the space cannot move;
- :class:`DirectSum` — block-diagonal: the parts are laid end to end (Concat, Split, Slice);
- :class:`Product` — mixed radix ``index = o * inner.size + i`` with the permutation acting
  on both digits: ``p (x) I_S`` for Flatten after a conv, ``I_K (x) p`` for Tile or grouped
  convolution, ``heads (x) head_dim`` for attention;
- :class:`Interleave` — the parts dealt out with a stride: index ``t * n + j`` is element ``t``
  of part ``j`` (``n`` parts), which keeps its residue ``j``. A channel shuffle of a Concat
  (``[a; b]`` viewed as ``[2, C/2]`` and transposed) interleaves ``a`` and ``b`` this way;
- :class:`Transposed` — a permutation read in transposed order: the channel shuffle of a
  permutation that has no product, block or interleave form there (an undivided group, which
  a grouped convolution after the shuffle then restricts to ``I_g (x) q`` in its own order).
- :class:`Grouped` — ``p (x) {q_g}``: whole blocks move (``p``) and each block carries its own
  order (``q_g``, one per block of the source): GroupNorm's groups of channels, whose in-group
  orders are independent symmetries. Equated with anything but another such form of the same
  shape it is tied back to ``p (x) q`` (every ``q_g`` one group), the product it generalises.

Rules state equations between expressions (:meth:`GroupSolver.unify`). The solver keeps the
most general solution: two atoms become one group (union-find); an atom equated with a
structured expression is *refined* into it (its permutations are restricted to that form);
anything equated with :class:`Fixed` is frozen, remembering why. Refinement only ever
restricts, so every permutation the solver allows is valid for every equation it was given.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np


# The small value types below are made by the ten thousand on large graphs: their __init__
# fills the instance dict directly, which costs half of the frozen dataclass's generated one
# (one object.__setattr__ per field). Equality, hashing, repr and immutability are unchanged.
@dataclass(frozen=True, init=False)
class FreezeReason:
    """Why a group must keep the identity permutation.

    ``kind`` is one of: ``graph-input``, ``graph-output``, ``no-rule``, ``blocking``,
    ``unknown-shape``, ``index-map``, ``not-constant``, ``rule-error``, ``constant-only``.
    """

    kind: str
    message: str

    def __init__(self, kind: str, message: str) -> None:
        fields = self.__dict__
        fields["kind"] = kind
        fields["message"] = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True, init=False)
class Atom:
    """A group: one free permutation of ``size`` elements (identified by ``id``)."""

    id: int
    size: int

    def __init__(self, id: int, size: int) -> None:
        fields = self.__dict__
        fields["id"] = id
        fields["size"] = size


@dataclass(frozen=True, init=False)
class Fixed:
    """The identity permutation of ``size`` elements; ``reason`` says why it cannot move."""

    size: int
    reason: FreezeReason

    def __init__(self, size: int, reason: FreezeReason) -> None:
        fields = self.__dict__
        fields["size"] = size
        fields["reason"] = reason


@dataclass(frozen=True)
class DirectSum:
    """Block-diagonal permutation: the parts occupy consecutive index ranges."""

    parts: tuple[Expr, ...]

    @property
    def size(self) -> int:
        return sum(part.size for part in self.parts)


@dataclass(frozen=True)
class Product:
    """Mixed-radix permutation: index ``o * inner.size + i`` maps to ``p_o[o] * inner.size + p_i[i]``."""

    outer: Expr
    inner: Expr

    @property
    def size(self) -> int:
        return self.outer.size * self.inner.size


@dataclass(frozen=True)
class Interleave:
    """Strided block-diagonal permutation: index ``t * n + j`` is element ``t`` of part ``j``.

    With ``n`` parts and ``S`` positions in all, part ``j`` holds ``ceil((S - j) / n)`` of them
    (the residues ``j``, ``j + n``, ...); each part permutes its own positions, so position
    ``t * n + j`` goes to ``p_j[t] * n + j``. Build it with :func:`interleave` (normal form).
    """

    parts: tuple[Expr, ...]

    @property
    def size(self) -> int:
        return sum(part.size for part in self.parts)


@dataclass(frozen=True)
class Transposed:
    """``inner`` read in transposed order: ``inner`` permutes a ``[cols, rows]`` layout of the elements.

    Position ``i * cols + j`` here is position ``j * rows + i`` of ``inner``: the channels after
    a channel shuffle (split into ``[g, C/g]``, transpose, merge) when their permutation before
    it has no form that transposes (a product whose digits fall there, a block sum cut at every
    row, an interleave of ``rows`` parts). Build it with :func:`transpose` (normal form).
    """

    inner: Expr
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.inner.size


@dataclass(frozen=True)
class Grouped:
    """``p (x) {q_g}``: index ``o * k + i`` maps to ``p[o] * k + q_{p[o]}[i]`` (``k`` the inner size).

    ``outer`` (``p``) moves whole blocks of ``k`` positions; block ``g`` of the source keeps its
    own inner order ``inners[g]`` wherever it goes. With every inner the same this is
    :class:`Product` (``p (x) q``); build it with :func:`grouped` (normal form).
    """

    outer: Expr
    inners: tuple[Expr, ...]

    @property
    def size(self) -> int:
        return self.outer.size * self.inners[0].size


Expr: TypeAlias = Atom | Fixed | DirectSum | Product | Interleave | Transposed | Grouped

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
        if isinstance(expr, Interleave):
            return interleave([self.resolve(part) for part in expr.parts])
        if isinstance(expr, Transposed):
            return transpose(self.resolve(expr.inner), expr.rows, expr.cols)
        if isinstance(expr, Grouped):
            return grouped(self.resolve(expr.outer), [self.resolve(inner) for inner in expr.inners])
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
        if isinstance(left, Atom):
            self._unify_atom(left, right)
            return
        if isinstance(right, Atom):
            self._unify_atom(right, left)
            return
        if isinstance(left, Fixed):
            self.freeze(right, left.reason)
            return
        if isinstance(right, Fixed):
            self.freeze(left, right.reason)
            return
        if isinstance(left, Grouped) or isinstance(right, Grouped):
            self._unify_grouped(left, right, mismatch)
            return
        if isinstance(left, Transposed) or isinstance(right, Transposed):
            self._unify_transposed(left, right, mismatch)
            return
        if isinstance(left, DirectSum) or isinstance(right, DirectSum):
            self._unify_blocks(left, right, mismatch)
            return
        if isinstance(left, Interleave) or isinstance(right, Interleave):
            self._unify_interleaved(left, right, mismatch)
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

    def _unify_grouped(self, left: Expr, right: Expr, mismatch: FreezeReason | None) -> None:
        """Equate two expressions at least one of which is ``p (x) {q_g}`` (neither an atom nor fixed).

        Two such forms of the same shape equate part by part. Anything else ties every ``q_g``
        of each to one group, which makes it ``p (x) q`` (a restriction: always valid), and the
        equation is solved between the products as before.
        """
        if (
            isinstance(left, Grouped)
            and isinstance(right, Grouped)
            and left.outer.size == right.outer.size
            and left.inners[0].size == right.inners[0].size
        ):
            self.unify(left.outer, right.outer, mismatch)
            for a, b in zip(left.inners, right.inners):
                self.unify(a, b, mismatch)
            return
        for side in (left, right):
            if isinstance(side, Grouped):
                for inner in side.inners[1:]:
                    self.unify(side.inners[0], inner, mismatch)
        left, right = self.resolve(left), self.resolve(right)
        if isinstance(left, Grouped) or isinstance(right, Grouped):  # inners that could not be tied
            reason = mismatch or FreezeReason("index-map", "per-block orders that cannot be tied were coupled")
            self.freeze(left, reason)
            self.freeze(right, reason)
            return
        self.unify(left, right, mismatch)

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
        if isinstance(expr, Interleave):
            # Every part is cut where the prefix [0, cut) stops taking its residues.
            stride = len(expr.parts)
            for residue, part in enumerate(expr.parts):
                local = _part_cut(cut, residue, stride)
                if 0 < local < part.size and not self._split_at(part, local):
                    return False
            return True
        if isinstance(expr, Transposed):
            inner = self.resolve(expr.inner)
            if not isinstance(inner, Atom):
                return False
            # An undivided group read transposed: make it the transposed image of a cut one.
            cut_here = DirectSum((self.new_atom(cut), self.new_atom(expr.size - cut)))
            self._unify_atom(inner, transpose(cut_here, expr.cols, expr.rows))
            return True
        if isinstance(expr, Grouped):
            inner_size = expr.inners[0].size
            row = cut // inner_size
            if cut % inner_size == 0:
                return self._split_at(expr.outer, row)
            # Cut inside block ``row``: p keeps it in place, and its own order is cut there.
            if not (self._split_at(expr.outer, row) and self._split_at(expr.outer, row + 1)):
                return False
            return self._split_at(expr.inners[row], cut % inner_size)
        inner_size = expr.inner.size
        if cut % inner_size == 0:
            return self._split_at(expr.outer, cut // inner_size)
        if isinstance(expr.outer, Fixed):
            # I_K (x) p equals K copies of p: cutting inside one copy cuts p itself.
            return self._split_at(expr.inner, cut % inner_size)
        # p (x) q cut inside row r of q's copies: p keeps r in place (its rows before and after
        # move among themselves), and q is cut where the row is (heads x head_dim read as
        # blocks: each head then takes the same permutation of its blocks).
        row = cut // inner_size
        return (
            self._split_at(expr.outer, row)
            and self._split_at(expr.outer, row + 1)
            and self._split_at(expr.inner, cut % inner_size)
        )

    def _unify_products(self, left: Expr, right: Expr, mismatch: FreezeReason | None) -> None:
        """Equate two mixed-radix products by aligning their digit sizes.

        Where the digits cannot be aligned (a block sum in one, digits that do not divide in
        the other) but one side is block-diagonal (``I_K (x) p``), the blocks are aligned
        instead: heads laid side by side equal to ``heads (x) head_dim`` cut into q, k, v.
        A digit ``p (x) {q_g}`` that meets no digit of its place and size on the other side
        cannot be split: its blocks' orders are tied into one first (``p (x) q``).
        """
        left_factors, right_factors = _factors(left), _factors(right)
        if self._tie_unmatched_digits(left_factors, right_factors):
            self.unify(left, right, mismatch)
            return
        if not _alignable(left_factors, right_factors) and (len(_blocks(left)) > 1 or len(_blocks(right)) > 1):
            self._unify_blocks(left, right, mismatch)
            return
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

    def _tie_unmatched_digits(self, left: list[Expr], right: list[Expr]) -> bool:
        """Tie the blocks' orders of each ``p (x) {q_g}`` digit with no digit of its place and size opposite; True if any."""
        tied = False
        for mine, theirs in ((left, right), (right, left)):
            places = set(_places(theirs))
            for (below, size), factor in zip(_places(mine), mine):
                if isinstance(factor, Grouped) and (below, size) not in places:
                    for inner in factor.inners[1:]:
                        self.unify(factor.inners[0], inner)
                    tied = tied or not isinstance(self.resolve(factor), Grouped)
        return tied

    def _unify_interleaved(self, left: Expr, right: Expr, mismatch: FreezeReason | None) -> None:
        """Equate two expressions at least one of which is interleaved (and neither a block sum)."""
        inter, other = (left, right) if isinstance(left, Interleave) else (right, left)
        assert isinstance(inter, Interleave)
        stride = len(inter.parts)
        if isinstance(other, Interleave):
            if len(other.parts) == stride and all(a.size == b.size for a, b in zip(inter.parts, other.parts)):
                for a, b in zip(inter.parts, other.parts):
                    self.unify(a, b, mismatch)
                return
        elif len(_blocks(other)) > 1:
            self._unify_blocks(inter, other, mismatch)
            return
        elif isinstance(other, Product) and other.inner.size == stride:
            # p (x) q moves residue j to q[j]; an interleave keeps residues: q must be the
            # identity, and then every part is p.
            if len({part.size for part in inter.parts}) == 1:
                reason = mismatch or FreezeReason("index-map", "an interleave was coupled with a product")
                self.unify(other.inner, Fixed(stride, reason), mismatch)
                for part in inter.parts:
                    self.unify(part, other.outer, mismatch)
                return
        reason = mismatch or FreezeReason("index-map", "interleaves that cannot be aligned were coupled")
        self.freeze(left, reason)
        self.freeze(right, reason)

    def transposed(self, expr: Expr, rows: int, cols: int) -> Expr | None:
        """The permutation of ``expr`` read in transposed order, or None if the sizes disagree.

        ``expr`` permutes positions ``i * cols + j`` (a ``[rows, cols]`` layout); the result
        permutes the same elements laid out as ``[cols, rows]`` (position ``j * rows + i``),
        the last step of a channel shuffle. Nothing is refined: a product whose digits fall
        at ``rows`` swaps them, a block sum cut at every multiple of ``cols`` becomes the
        interleave of its ``rows`` chunks, and anything else is a :class:`Transposed` node
        that :meth:`unify` refines only when an equation needs it.
        """
        expr = self.resolve(expr)
        if rows * cols != expr.size or rows < 1 or cols < 1:
            return None
        return transpose(expr, cols, rows)

    def _unify_transposed(self, left: Expr, right: Expr, mismatch: FreezeReason | None) -> None:
        """Equate two expressions at least one of which is a :class:`Transposed` node (neither an atom)."""
        node, other = (left, right) if isinstance(left, Transposed) else (right, left)
        assert isinstance(node, Transposed)
        # Read ``other`` in the node's inner order: a Transposed node there unwraps.
        moved = transpose(other, node.cols, node.rows)
        inner = self.resolve(node.inner)
        if not isinstance(moved, Transposed) or isinstance(inner, Atom):
            self.unify(inner, moved, mismatch)
            return
        # Neither side reads transposed as it is: refine one of them into a form that does.
        refined = self._transposable(other, node.rows, node.cols)
        if refined is not None:
            self.unify(inner, refined, mismatch)
            return
        refined = self._transposable(inner, node.cols, node.rows)
        if refined is not None:
            self.unify(refined, other, mismatch)
            return
        reason = mismatch or FreezeReason("index-map", "permutations read in different orders were coupled")
        self.freeze(left, reason)
        self.freeze(right, reason)

    def _transposable(self, expr: Expr, rows: int, cols: int) -> Expr | None:
        """``expr`` refined so that it reads transposed without a :class:`Transposed` node, or None.

        ``expr`` permutes positions ``i * cols + j`` (a ``[rows, cols]`` layout); the result
        permutes the same elements laid out as ``[cols, rows]`` (position ``j * rows + i``),
        the last step of a channel shuffle. ``expr`` is refined where needed: a product whose
        high digits have ``rows`` positions swaps its digits (``a (x) b`` -> ``b (x) a``, an
        undivided group becomes such a product); block sums cut at every multiple of ``cols``
        become the interleave of the ``rows`` chunks. Refinement only restricts, so the answer
        is always valid.
        """
        expr = self.resolve(expr)
        if rows * cols != expr.size or rows < 1 or cols < 1:
            return None
        if rows == 1 or cols == 1:
            return expr
        if isinstance(expr, Fixed):
            return expr
        moved = transpose(expr, cols, rows)
        if not isinstance(moved, Transposed):
            return moved
        if isinstance(expr, (Atom, Product)):
            digits = self._leading_digits(expr, rows)
            if digits is not None:
                high, low = digits
                return product(low, high)
        if isinstance(expr, Product) and not _blocks(expr)[1:]:
            return None
        for k in range(1, rows):
            if not self._split_at(expr, k * cols):
                return None
            expr = self.resolve(expr)
        chunks = [_sub_range(expr, k * cols, (k + 1) * cols) for k in range(rows)]
        if any(chunk is None for chunk in chunks):
            return None
        return interleave([chunk for chunk in chunks if chunk is not None])

    def _leading_digits(self, expr: Expr, high_size: int) -> tuple[Expr, Expr] | None:
        """Refine ``expr`` into ``high (x) low`` with ``high.size == high_size``, or None."""
        factors = _factors(expr)
        high: list[Expr] = []
        taken = 1
        while factors and taken < high_size:
            factor = factors.pop(0)
            if high_size % (taken * factor.size) == 0:
                high.append(factor)
                taken *= factor.size
                continue
            wanted = high_size // taken
            split = self._split_radix(factor, wanted) if factor.size % wanted == 0 else None
            if split is None:
                return None
            high.append(split[0])
            factors.insert(0, split[1])
            taken *= split[0].size
        if taken != high_size or not factors:
            return None
        return _chain_product(high), _chain_product(factors)

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


def grouped(outer: Expr, inners: list[Expr]) -> Expr:
    """``outer (x) {inners[g]}`` in normal form.

    Every inner has the same size, one per position of ``outer``. Equal inners make the
    product ``outer (x) q``; an outer that keeps its blocks in place (identity) makes the block
    sum of the inners; a block-sum outer distributes (block ``g`` keeps ``inners[g]`` wherever it
    goes, so each block of the outer takes its own inners).
    """
    if len(inners) != outer.size or len({inner.size for inner in inners}) > 1:
        raise ValueError(f"{len(inners)} inner orders of sizes {sorted({i.size for i in inners})} for {outer.size} blocks")
    if len(inners) == 1:
        return inners[0]
    if inners[0].size == 1:
        return outer
    if all(inner == inners[0] for inner in inners[1:]):
        return product(outer, inners[0])
    if all(_is_identity(inner) for inner in inners):
        return product(outer, Fixed(inners[0].size, _first_reason(inners)))
    if _is_identity(outer):
        return direct_sum(list(inners))
    if isinstance(outer, DirectSum):
        pieces, offset = [], 0
        for part in outer.parts:
            pieces.append(grouped(part, inners[offset : offset + part.size]))
            offset += part.size
        return direct_sum(pieces)
    return Grouped(outer, tuple(inners))


def leading(expr: Expr, size: int) -> Expr | None:
    """``q`` where ``expr`` is ``q (x) I`` with ``q`` of ``size`` positions (the rest kept in place), else None."""
    if expr.size % size:
        return None
    if _is_identity(expr):
        return Fixed(size, _first_reason([expr]))
    factors, taken, count = _factors(expr), 1, 0
    while count < len(factors) and taken < size:
        taken *= factors[count].size
        count += 1
    if taken != size or not all(_is_identity(factor) for factor in factors[count:]):
        return None
    return _chain_product(factors[:count])


def interleave(parts: list[Expr]) -> Expr:
    """Interleaved expression in normal form.

    Sizes must follow the residues (part ``j`` of ``n`` holds ``ceil((S - j) / n)``). Where
    every part has a block boundary at the same prefix ``[0, c)`` the result is a block sum of
    smaller interleaves, so block structures stay visible to :meth:`GroupSolver.unify`; a
    single part, or parts that are all identities, collapse.
    """
    stride = len(parts)
    total = sum(part.size for part in parts)
    if [part.size for part in parts] != [_part_cut(total, j, stride) for j in range(stride)]:
        raise ValueError(f"interleave of parts {[p.size for p in parts]} does not follow the residues of {total}")
    if stride == 1:
        return parts[0]
    if total <= stride:
        return direct_sum(parts)
    if all(_is_identity(part) for part in parts):
        return Fixed(total, _first_reason(parts))
    cuts = _interleave_cuts(parts, total)
    if cuts:
        bounds = [0, *cuts, total]
        segments: list[Expr] = []
        for start, stop in itertools.pairwise(bounds):
            pieces = []
            for residue in range(stride):
                j = (residue + start) % stride  # the part whose residue lands on local residue
                piece = _sub_range(parts[j], _part_cut(start, j, stride), _part_cut(stop, j, stride))
                assert piece is not None  # the cut was checked against every part
                pieces.append(piece)
            segments.append(interleave(pieces))
        return direct_sum(segments)
    return Interleave(tuple(parts))


def transpose(inner: Expr, rows: int, cols: int) -> Expr:
    """``inner`` (a permutation of a ``[cols, rows]`` layout) read in ``[rows, cols]`` order, in normal form.

    Forms that transpose are rewritten without a :class:`Transposed` node: a product whose
    leading digits make ``cols`` swaps its digits, a block sum cut at every multiple of ``rows``
    becomes the interleave of its chunks, an interleave of ``rows`` parts becomes their block sum,
    identities stay identities and a transposed node read back is its inner expression.
    """
    if rows == 1 or cols == 1:
        return inner
    if _is_identity(inner):
        return inner if isinstance(inner, Fixed) else Fixed(inner.size, _first_reason([inner]))
    if isinstance(inner, Transposed) and inner.rows == cols and inner.cols == rows:
        return inner.inner
    factors = _factors(inner)
    taken, count = 1, 0
    while count < len(factors) and taken < cols:
        taken *= factors[count].size
        count += 1
    if taken == cols and count < len(factors):
        return product(_chain_product(factors[count:]), _chain_product(factors[:count]))
    if isinstance(inner, Interleave) and len(inner.parts) == rows:
        return direct_sum(list(inner.parts))
    if len(_blocks(inner)) > 1:
        chunks = [_sub_range(inner, k * rows, (k + 1) * rows) for k in range(cols)]
        if all(chunk is not None for chunk in chunks):
            return interleave([chunk for chunk in chunks if chunk is not None])
    return Transposed(inner, rows, cols)


def _transpose_order(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``(forward, back)``: position ``i * cols + j`` of ``[rows, cols]`` is ``forward[...] = j * rows + i``."""
    forward = (np.arange(cols, dtype=np.int64)[None, :] * rows + np.arange(rows, dtype=np.int64)[:, None]).reshape(-1)
    back = (np.arange(rows, dtype=np.int64)[None, :] * cols + np.arange(cols, dtype=np.int64)[:, None]).reshape(-1)
    return forward, back


def _part_cut(cut: int, residue: int, stride: int) -> int:
    """How many positions of residue ``residue`` lie in ``[0, cut)``: ``ceil((cut - residue) / stride)``."""
    return max(0, -(-(cut - residue) // stride))


def _is_identity(expr: Expr) -> bool:
    return next(_atoms_of(expr), None) is None


def _first_reason(parts: list[Expr] | tuple[Expr, ...]) -> FreezeReason:
    for part in parts:
        if isinstance(part, Fixed):
            return part.reason
        inner = (
            part.parts if isinstance(part, (DirectSum, Interleave))
            else (part.outer, *part.inners) if isinstance(part, Grouped)
            else (part.outer, part.inner) if isinstance(part, Product)
            else (part.inner,) if isinstance(part, Transposed) else ()
        )
        if inner:
            return _first_reason(inner)
    return STRUCTURE


def _can_cut(expr: Expr, cut: int) -> bool:
    """Whether ``cut`` is a block boundary of ``expr`` (identity blocks cut anywhere)."""
    if cut <= 0 or cut >= expr.size:
        return True
    offset = 0
    for block in _blocks(expr):
        if cut == offset:
            return True
        if offset < cut < offset + block.size:
            return _is_identity(block)
        offset += block.size
    return False


def _local_cuts(expr: Expr) -> list[int]:
    """Every inner position where ``expr`` can be cut: block boundaries, and inside identity blocks."""
    found: list[int] = []
    offset = 0
    for block in _blocks(expr):
        if offset:
            found.append(offset)
        if _is_identity(block):
            found.extend(range(offset + 1, offset + block.size))
        offset += block.size
    return found


def _interleave_cuts(parts: list[Expr], total: int) -> list[int]:
    """The prefixes ``[0, c)`` of an interleave that every part can be cut at."""
    stride = len(parts)
    # Candidates come from the places where one moving part (the one with fewest) can be cut.
    pivot, locals_ = min(
        ((j, _local_cuts(part)) for j, part in enumerate(parts) if not _is_identity(part)),
        key=lambda item: len(item[1]),
    )
    candidates: set[int] = set()
    for local in (0, *locals_, parts[pivot].size):  # a cut may also leave the pivot whole
        # The prefixes that take exactly ``local`` positions of residue ``pivot``.
        candidates.update(range((local - 1) * stride + pivot + 1, local * stride + pivot + 1))
    return sorted(
        c for c in candidates
        if 0 < c < total and all(_can_cut(part, _part_cut(c, j, stride)) for j, part in enumerate(parts))
    )


def _sub_range(expr: Expr, start: int, stop: int) -> Expr | None:
    """Positions ``[start, stop)`` of ``expr`` as an expression, or None if they split a block."""
    if start == 0 and stop == expr.size:
        return expr
    if _is_identity(expr):
        return Fixed(stop - start, _first_reason([expr]))
    pieces: list[Expr] = []
    offset = 0
    for block in _blocks(expr):
        lo, hi = max(start, offset), min(stop, offset + block.size)
        if lo < hi:
            if lo == offset and hi == offset + block.size:
                pieces.append(block)
            elif _is_identity(block):
                pieces.append(Fixed(hi - lo, _first_reason([block])))
            else:
                return None
        offset += block.size
    return direct_sum(pieces)


def _chain_product(factors: list[Expr]) -> Expr:
    """Row-major digits, most significant first, as one mixed-radix expression."""
    result = factors[-1]
    for factor in reversed(factors[:-1]):
        result = product(factor, result)
    return result


def _atoms_of(expr: Expr) -> Iterator[Atom]:
    if isinstance(expr, Atom):
        yield expr
    elif isinstance(expr, (DirectSum, Interleave)):
        for part in expr.parts:
            yield from _atoms_of(part)
    elif isinstance(expr, Product):
        yield from _atoms_of(expr.outer)
        yield from _atoms_of(expr.inner)
    elif isinstance(expr, Transposed):
        yield from _atoms_of(expr.inner)
    elif isinstance(expr, Grouped):
        yield from _atoms_of(expr.outer)
        for inner in expr.inners:
            yield from _atoms_of(inner)


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


def _alignable(left: list[Expr], right: list[Expr]) -> bool:
    """Whether two digit lists have a common mixed radix, splitting only atoms and identities."""
    queue_left = [(factor.size, isinstance(factor, (Atom, Fixed))) for factor in left]
    queue_right = [(factor.size, isinstance(factor, (Atom, Fixed))) for factor in right]
    while queue_left and queue_right:
        a, b = queue_left[0][0], queue_right[0][0]
        if a == b:
            queue_left.pop(0)
            queue_right.pop(0)
            continue
        big, small = (queue_left, queue_right) if a > b else (queue_right, queue_left)
        (size, splits), low = big[0], small[0][0]
        if not splits or size % low:
            return False
        big[0:1] = [(low, True), (size // low, True)]
    return not queue_left and not queue_right


def _places(factors: list[Expr]) -> list[tuple[int, int]]:
    """Each digit's ``(positions below it, size)`` in a row-major digit list."""
    below, found = 1, []
    for factor in reversed(factors):
        found.append((below, factor.size))
        below *= factor.size
    return found[::-1]


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
    if isinstance(expr, Interleave):
        stride = len(expr.parts)
        result = np.empty(expr.size, dtype=np.int64)
        for residue, part in enumerate(expr.parts):
            result[residue::stride] = _evaluate(solver, part, perms) * stride + residue
        return result
    if isinstance(expr, Transposed):
        forward, back = _transpose_order(expr.rows, expr.cols)
        return back[_evaluate(solver, expr.inner, perms)[forward]]
    if isinstance(expr, Grouped):
        # Block o of the result is block outer[o] of the source, in that block's own order.
        blocks = _evaluate(solver, expr.outer, perms)
        orders = np.stack([_evaluate(solver, inner, perms) for inner in expr.inners])
        return (blocks[:, None] * orders.shape[1] + orders[blocks]).reshape(-1)
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
    if isinstance(expr, Interleave):
        stride, total = len(expr.parts), expr.size
        dealt: dict[int, np.ndarray] = {}
        for residue, part in enumerate(expr.parts):
            for root, lab in _labels(part).items():
                arr = dealt.setdefault(root, np.full(total, -1, dtype=np.int64))
                arr[residue::stride] = np.where(lab >= 0, lab, arr[residue::stride])
        return dealt
    if isinstance(expr, Transposed):
        forward, _ = _transpose_order(expr.rows, expr.cols)
        return {root: lab[forward] for root, lab in _labels(expr.inner).items()}
    if isinstance(expr, Grouped):
        # As the source lays them out: block g's positions carry its own order's neurons.
        inner_size = expr.inners[0].size
        found = {root: np.repeat(lab, inner_size) for root, lab in _labels(expr.outer).items()}
        for block, inner in enumerate(expr.inners):
            for root, lab in _labels(inner).items():
                if root not in found:
                    found[root] = np.full(expr.size, -1, dtype=np.int64)
                arr = found[root]
                span = arr[block * inner_size : (block + 1) * inner_size]
                arr[block * inner_size : (block + 1) * inner_size] = np.where(lab >= 0, lab, span)
        return found
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
    if isinstance(expr, Interleave):
        stride = len(expr.parts)
        return "; ".join(
            f"[{j}::{stride}] of {expr.size}: {describe(part, root)}"
            for j, part in enumerate(expr.parts)
            if any(a.id == root for a in _atoms_of(part))
        )
    if isinstance(expr, Transposed):
        return f"transposed [{expr.cols}, {expr.rows}] -> [{expr.rows}, {expr.cols}] of ({describe(expr.inner, root)})"
    if isinstance(expr, Grouped):
        inner_size = expr.inners[0].size
        if any(a.id == root for a in _atoms_of(expr.outer)):
            return f"{describe(expr.outer, root)} (x) {{q_g}}: {expr.outer.size} blocks of {inner_size}, each its own order"
        return "; ".join(
            f"block {g} of {expr.outer.size} ([{g * inner_size}:{(g + 1) * inner_size}] as the source holds it): "
            + describe(inner, root)
            for g, inner in enumerate(expr.inners)
            if any(a.id == root for a in _atoms_of(inner))
        )
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
    if isinstance(expr, Interleave):
        return interleave([_canonical(solver, part) for part in expr.parts])
    if isinstance(expr, Transposed):
        return transpose(_canonical(solver, expr.inner), expr.rows, expr.cols)
    if isinstance(expr, Grouped):
        return grouped(_canonical(solver, expr.outer), [_canonical(solver, inner) for inner in expr.inners])
    return product(_canonical(solver, expr.outer), _canonical(solver, expr.inner))
