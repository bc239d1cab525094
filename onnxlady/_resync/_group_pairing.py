"""Pairing two models' groups through their paired sites (item 4 of :mod:`onnxlady._resync._match`).

Paired sites pair the groups of their operands axis by axis, position by position (both
analyses' bindings). A group pairs with exactly one group of the same size, by every vote, or it
is unmatched with the reason; where the suspect holds its neurons in groups of another
structure, it is paired as not permutable and solved in the reference's form.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._resync._computed import computed_use
from onnxlady._resync._content import Made
from onnxlady._resync._match_results import GroupPair, UnmatchedGroup
from onnxlady._resync._sites import Operand, Site, site_operand_axis

__all__ = ["axis_labels", "pair_groups"]

def axis_labels(analysis: ChannelAnalysis, operand: Operand, axis: int) -> dict[str, np.ndarray]:
    """Per group on one canonical axis of an operand: which of its neurons sits at each position."""
    if operand.computed:  # bound where the constants it is computed from are
        read = operand.read_axis(axis)
        name = analysis.graph.nodes[operand.node].input[operand.slot]
        use = computed_use(analysis.graph, name, read, operand.node, operand.slot) if read is not None else None
        binding = analysis.state.bindings.get(use) if use is not None else None
        positions = slice(None)
    else:
        found = site_operand_axis(analysis.graph, operand, axis)
        if found is None:
            return {}
        leaf_axis, positions = found
        binding = analysis.state.bindings.get((operand.node, operand.slot, leaf_axis))
    if binding is None:
        return {}
    return {gid: lab[positions] for gid, lab in analysis.neuron_labels(binding.expr).items()}


def _vote_groups(match_sites: list[tuple[Site, Site]], reference: ChannelAnalysis, suspect: ChannelAnalysis) -> _Votes:
    """Which groups of the two models sit at the same positions of paired operands."""
    votes = _Votes()
    for number, (mine, theirs) in enumerate(match_sites):
        for operand in mine.operands:
            other = theirs.operand(operand.role)
            if other is None or other.shape != operand.shape:
                continue
            for axis in range(len(operand.shape)):
                ref_labels = axis_labels(reference, operand, axis)
                if not ref_labels:
                    continue
                sus_labels = axis_labels(suspect, other, axis)
                if not sus_labels:  # the suspect's analysis gave up on the operator holding it
                    for a in ref_labels:
                        votes.unbound.setdefault(a, []).append(number)
                alike = {
                    (a, b)
                    for a, lab_a in ref_labels.items()
                    for b, lab_b in sus_labels.items()
                    if lab_a.shape == lab_b.shape and np.any(lab_a >= 0) and np.array_equal(lab_a, lab_b)
                }
                for a, b in alike:
                    votes.voters.setdefault((a, b), []).append(number)
                    votes.overlap.setdefault(a, set()).add(b)
                    votes.overlap_back.setdefault(b, set()).add(a)
                    votes.exact.setdefault(a, Counter())[b] += 1
                    votes.exact_back.setdefault(b, Counter())[a] += 1
                # A group held alike by none here (the other side holds these positions in
                # groups of another structure) touches every group it shares positions with.
                lonely_ref = set(ref_labels) - {a for a, _ in alike}
                lonely_sus = set(sus_labels) - {b for _, b in alike}
                for a, lab_a in ref_labels.items():
                    for b, lab_b in sus_labels.items():
                        if (a in lonely_ref or b in lonely_sus) and lab_a.shape == lab_b.shape and np.any(
                            (lab_a >= 0) & (lab_b >= 0)
                        ):
                            votes.voters.setdefault((a, b), []).append(number)
                            votes.overlap.setdefault(a, set()).add(b)
                            votes.overlap_back.setdefault(b, set()).add(a)
    return votes


@dataclass
class _Votes:
    """Group pairs seen at the same positions, and the site pairs behind each.

    ``exact`` where both hold the positions alike (same neuron at each), ``overlap`` wherever they
    share positions at all; ``voters``: the site pairs (by number) behind each.
    """

    exact: dict[str, Counter[str]] = field(default_factory=dict)
    exact_back: dict[str, Counter[str]] = field(default_factory=dict)
    overlap: dict[str, set[str]] = field(default_factory=dict)
    overlap_back: dict[str, set[str]] = field(default_factory=dict)
    voters: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    #: Reference groups at positions where the suspect binds no permutation, and the site pairs.
    unbound: dict[str, list[int]] = field(default_factory=dict)


def pair_groups(
    reference: ChannelAnalysis,
    suspect: ChannelAnalysis,
    match_sites: list[tuple[Site, Site]],
    how: list[Made],
) -> tuple[list[GroupPair], list[UnmatchedGroup]]:
    """Pair each reference group with the suspect group holding its neurons alike, or say why not.

    Where the suspect holds a group's neurons in groups of another structure (frozen by its
    form, restricted to whole quantization blocks by MatMulNBits, split or merged), the group
    is paired as not permutable in both: resync solves it in the reference's form and leaves
    it in place in the output.
    """
    votes = _vote_groups(match_sites, reference, suspect)
    pairs: list[GroupPair] = []
    unmatched: list[UnmatchedGroup] = []
    paired_suspect: set[str] = set()
    other_way: set[str] = set()  # suspect groups listed as solved the other way round
    alike_ids: set[str] = set()  # suspect groups paired alike (solved in the reference's form)

    def made(a: str, bs: list[str]) -> Made:
        """How the sites behind a pairing were paired (the weakest of them)."""
        numbers = {n for b in bs for n in votes.voters.get((a, b), [])} or set(votes.unbound.get(a, []))
        methods = {how[n][0] for n in numbers}
        method = next((m for m in ("order", "content") if m in methods), "structure")
        margins = [m for n in numbers if (m := how[n][1]) is not None]
        distances = [d for n in numbers if (d := how[n][2]) is not None]
        return method, (min(margins) if margins else None), (max(distances) if distances else None)

    for group in reference.groups:
        exact = votes.exact.get(group.id, Counter())
        touching = votes.overlap.get(group.id, set())
        if not touching:
            if group.id not in votes.unbound:
                unmatched.append(_unmatched("reference", group, "no paired operator writes it"))
                continue
            # The suspect's analysis froze the operators holding these neurons (it binds nothing
            # there): solved in the reference's form, its values are still paired.
            pairs.append(GroupPair(group.id, "-", group.size, False, *made(group.id, []), alike=False))
            if group.permutable:
                why = "frozen in the suspect: its analysis binds no permutation where the paired operators hold it"
                unmatched.append(_unmatched("reference", group, why))
            continue
        if len(exact) == 1 and set(exact) == touching:
            (other_id,) = exact
            other = suspect.group(other_id)
            alike = set(votes.exact_back.get(other_id, ())) == {group.id} == votes.overlap_back.get(other_id, set())
            if alike and other.size == group.size:
                paired_suspect.add(other_id)
                alike_ids.add(other_id)
                pairs.append(GroupPair(group.id, other_id, group.size, group.permutable and other.permutable,
                                       *made(group.id, [other_id])))  # fmt: skip
                if group.permutable and not other.permutable:
                    reasons = "; ".join(str(r) for r in other.reasons) or "fewer than two neurons"
                    unmatched.append(_unmatched("reference", group, f"frozen in the suspect (as {other_id}): {reasons}"))
                elif other.permutable and not group.permutable:
                    reasons = "; ".join(str(r) for r in group.reasons) or "fewer than two neurons"
                    unmatched.append(_unmatched("suspect", other, f"frozen in the reference (as {group.id}): {reasons}"))
                continue
        # The suspect holds these neurons otherwise: solved in the reference's form (its values
        # are paired tensor by tensor) and left in place in the output.
        partners = sorted(touching)
        ids = ", ".join(partners)
        pairs.append(GroupPair(group.id, ids, group.size, False, *made(group.id, partners), alike=False))
        others = [suspect.group(other) for other in partners]
        if group.permutable:
            paired_suspect.update(partners)
            if all(other.frozen for other in others):
                reasons = "; ".join(str(r) for other in others for r in other.reasons) or "fewer than two neurons"
                why = f"frozen in the suspect (as {ids}): {reasons}"
            else:
                why = (
                    f"the suspect holds its neurons in groups of another structure ({ids}): "
                    "solved in the reference's form, left in place in the output"
                )
            unmatched.append(_unmatched("reference", group, why))
            # A movable suspect group that is a factor of this one (the query heads within one
            # key/value head of GroupQueryAttention, which the reference's form pins) moves
            # neurons the reference's form cannot say: solved the other way round.
            for other in others:
                if other.permutable and other.id not in other_way:
                    other_way.add(other.id)
                    unmatched.append(_unmatched(
                        "suspect", other,
                        f"the reference holds its neurons in a group of another structure (as {group.id}): "
                        "solved in the suspect's form",
                    ))  # fmt: skip
        else:  # only the suspect's form can move them: left to be solved the other way round
            reasons = "; ".join(str(r) for r in group.reasons) or "fewer than two neurons"
            for other in others:
                if other.permutable and other.id not in paired_suspect and other.id not in other_way:
                    paired_suspect.add(other.id)
                    other_way.add(other.id)
                    unmatched.append(_unmatched("suspect", other, f"frozen in the reference (as {group.id}): {reasons}"))
    for group in suspect.groups:
        if group.id not in paired_suspect and group.permutable:
            unmatched.append(_unmatched("suspect", group, "no reference group holds its neurons"))
    # Frozen groups with no counterpart matter to nobody: keep only permutable ones. A suspect
    # group some reference group holds alike is solved in the reference's form, not mirrored.
    unmatched = [
        item
        for item in unmatched
        if ((reference if item.model == "reference" else suspect).group(item.group).permutable
            or item.reason.startswith("frozen in"))
        and not (item.model == "suspect" and item.group in alike_ids and item.reason.startswith("the reference holds"))
    ]  # fmt: skip
    return pairs, unmatched


def _unmatched(model: str, group: Any, reason: str) -> UnmatchedGroup:
    return UnmatchedGroup(model, group.id, group.size, reason)
