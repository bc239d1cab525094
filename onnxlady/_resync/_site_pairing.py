"""Pairing two models' sites: structure, content and the forms a converter gives them.

The steps of item 3 of :mod:`onnxlady._resync._match`, in order: sites of one token paired by
content where decisive, else by the structural alignment, else in order
(:func:`onnxlady._resync._content.pair_class`); then the forms tokens alone miss: a BatchNorm
written as an NCHWc convolution, a table stored with other unit axes; then twins handed to the
counterpart of their kind, and sites content leaves interchangeable re-paired by the layers they
connect to. Every step reads and extends one :class:`SitePairing`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from onnxlady._assignment import linear_sum_assignment
from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._connections import CONNECTED_FAMILIES, successors
from onnxlady._resync._content import DECISIVE_RATIO, NEAR_EXACT, NEAR_QUANTIZED, Made, pair_class
from onnxlady._resync._invariants import distance, signature
from onnxlady._resync._signatures import Signatures, signature_key
from onnxlady._resync._sites import Site, read_operand

__all__ = ["SitePairing", "pair_sites"]


@dataclass(frozen=True)
class SitePairing:
    """Two models' sites, their signatures and the pairs made so far: what every pairing step reads and extends.

    Site indices are into ``ref_sites`` and ``sus_sites``. Each step adds to ``pairs`` and
    ``how`` or corrects them; two rewrite sites in place, read in another form (a lone BatchNorm
    as a convolution, a table without its unit axes). ``opcodes``: the structural alignment's,
    for the divergences.
    """

    reference: ModelGraph
    suspect: ModelGraph
    ref_sites: list[Site]
    sus_sites: list[Site]
    ref_sig: Signatures
    sus_sig: Signatures
    opcodes: Sequence[tuple[str, int, int, int, int]]
    pairs: dict[int, int] = field(default_factory=dict)  # reference index -> suspect index
    how: dict[int, Made] = field(default_factory=dict)  # reference index -> how the pair was made

def pair_sites(reference: ModelGraph, suspect: ModelGraph, ref_sites: list[Site], sus_sites: list[Site]) -> SitePairing:
    """Structure first, content where it is decisive, order for what is left (module docstring)."""
    ref_tokens, sus_tokens = [site.token for site in ref_sites], [site.token for site in sus_sites]
    matcher = difflib.SequenceMatcher(None, ref_tokens, sus_tokens, autojunk=False)
    structural: dict[int, int] = {}
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            structural[block.a + offset] = block.b + offset
    classes: dict[tuple[object, ...], tuple[list[int], list[int]]] = {}
    for number, token in enumerate(ref_tokens):
        classes.setdefault(token, ([], []))[0].append(number)
    for number, token in enumerate(sus_tokens):
        if token in classes:
            classes[token][1].append(number)
    scratch: list[np.ndarray] = []  # folded weights of both models, one at a time
    ref_sig, sus_sig = Signatures(reference, ref_sites, scratch), Signatures(suspect, sus_sites, scratch)
    state = SitePairing(reference, suspect, ref_sites, sus_sites, ref_sig, sus_sig, matcher.get_opcodes())
    pairs, how = state.pairs, state.how
    for rows, cols in classes.values():
        if not rows or not cols:
            continue
        if len(rows) == 1 and len(cols) == 1:
            pairs[rows[0]] = cols[0]
            d = distance(ref_sig[rows[0]], sus_sig[cols[0]])
            how[rows[0]] = ("structure", None, d if np.isfinite(d) else None)
            continue
        pair_class(rows, cols, structural, ref_sig, sus_sig, pairs, how)
    _pair_batchnorms_as_convs(state)
    _pair_across_unit_axes(state)
    _pair_weighing_twins(state)
    _settle_by_connections(state)
    return state


def _lone_batchnorm(graph: ModelGraph, site: Site) -> int | None:
    """The channels of a BatchNormalization no layer absorbs (a generic site of four vectors), else None."""
    if site.family != "other" or site.token[1] not in ("", "ai.onnx") or site.token[2] != "BatchNormalization":
        return None
    node = graph.nodes[site.node]
    if [o.slot for o in site.operands] != [1, 2, 3, 4] or sum(1 for name in node.output if name) != 1 or int(
        node_attribute(node, "training_mode", 0)
    ):
        return None
    sizes = {operand.size for operand in site.operands}
    if len(sizes) != 1 or any(sum(d != 1 for d in operand.shape) != 1 for operand in site.operands):
        return None
    return sizes.pop()


def _channel_conv(site: Site) -> int | None:
    """The channels of an NCHWc depthwise 1x1 convolution with no BatchNorm or scalar step of its own, else None.

    ONNX Runtime's NCHWc transformer writes a BatchNormalization no Conv absorbs so (ConvMixer's
    BatchNorm after the activation): weight ``gamma / sqrt(var + eps)`` ``[C, 1, 1, 1]``, bias
    ``beta - mean * that``, ``group`` C (with a residual Add after it as its fourth input).
    """
    weight = site.operand("weight")
    if site.family != "conv" or weight is None or not weight.blocked or site.batchnorm is not None or site.post or site.part:
        return None
    channels = weight.shape[0]
    if channels < 2 or any(d != 1 for d in weight.shape[1:]) or tuple(site.token[2:]) != (channels,):
        return None
    return channels


def _batchnorm_as_conv(site: Site, token: tuple[object, ...], channels: int) -> Site:
    """A lone BatchNorm's generic site as the per-channel 1x1 convolution it computes (:attr:`Site.lone_batchnorm`)."""
    gamma, beta, mean, var = site.operands
    weight_shape = token[1]
    assert isinstance(weight_shape, tuple)
    operands = (replace(gamma, role="weight", shape=weight_shape), replace(beta, role="bias", shape=(channels,)),
                replace(mean, role="bn3", shape=(channels,)), replace(var, role="bn4", shape=(channels,)))  # fmt: skip
    return Site(site.node, 0, "conv", token, operands, site.ops, site.tail, site.node, weighs=site.weighs, live=site.live)


def _pair_batchnorms_as_convs(state: SitePairing) -> None:
    """Pair a BatchNormalization no layer absorbs with the NCHWc depthwise 1x1 Conv it was written as.

    ``ORT_ENABLE_ALL`` on an x86 CPU turns such a BatchNorm (one after an activation, which no
    Conv folds) into a ``com.microsoft.nchwc`` Conv of weight ``gamma / sqrt(var + eps)`` and
    bias ``beta - mean * gamma / sqrt(var + eps)``: the BatchNorm folded into a 1x1 convolution
    of weight ones and bias zeros. Among the sites both models left unpaired, each such BatchNorm
    (either model's) is read as that convolution (:attr:`Site.lone_batchnorm`, token the
    convolution's) and paired as sites of one token are: content where decisive, else the
    alignment of these sites in graph order, else order. Its weight and bias are then compared
    folded, as a folded BatchNorm's are (its mean and variance have no counterpart). Sites that
    stay unpaired keep their own form.
    """
    graphs, lists = (state.reference, state.suspect), (state.ref_sites, state.sus_sites)
    signatures, pairs, how = (state.ref_sig, state.sus_sig), state.pairs, state.how
    for norm_side in (0, 1):
        conv_side = 1 - norm_side
        taken = (set(pairs), set(pairs.values()))
        convs = {n: c for n, site in enumerate(lists[conv_side]) if n not in taken[conv_side] and (c := _channel_conv(site)) is not None}
        if not convs:  # (no model without the NCHWc layout has one)
            continue
        norms = {n: c for n, site in enumerate(lists[norm_side])
                 if n not in taken[norm_side] and (c := _lone_batchnorm(graphs[norm_side], site)) is not None}  # fmt: skip
        tokens = {c: lists[conv_side][n].token for n, c in convs.items()}
        rewritten = {n: _batchnorm_as_conv(lists[norm_side][n], tokens[c], c) for n, c in norms.items() if c in tokens}
        if not rewritten:
            continue
        trial = list(lists[norm_side])
        for number, site in rewritten.items():
            trial[number] = site
        trial_sig = Signatures(graphs[norm_side], trial)
        sides = [sorted(rewritten), sorted(convs)] if norm_side == 0 else [sorted(convs), sorted(rewritten)]
        channels = [[(norms if side == norm_side else convs)[n] for n in sides[side]] for side in (0, 1)]
        matcher = difflib.SequenceMatcher(None, channels[0], channels[1], autojunk=False)
        structural = {sides[0][b.a + k]: sides[1][b.b + k] for b in matcher.get_matching_blocks() for k in range(b.size)}
        classes: dict[int, tuple[list[int], list[int]]] = {}
        for side in (0, 1):
            for number, count in zip(sides[side], channels[side]):
                classes.setdefault(count, ([], []))[side].append(number)
        sigs = (trial_sig, signatures[1]) if norm_side == 0 else (signatures[0], trial_sig)
        found: dict[int, int] = {}
        for rows, cols in classes.values():
            if rows and cols:
                pair_class(rows, cols, structural, sigs[0], sigs[1], found, how)
        for mine, theirs in found.items():
            pairs[mine] = theirs
            number = mine if norm_side == 0 else theirs
            lists[norm_side][number] = rewritten[number]
            signatures[norm_side].forget(number)


def _squeezed_token(site: Site) -> tuple[object, ...]:
    """A generic site's token with the unit axes of its operands' shapes left out."""
    return ("other", site.token[1], site.token[2], tuple((o.slot, tuple(d for d in o.shape if d != 1)) for o in site.operands))


def _telling_signature(graph: ModelGraph, site: Site) -> list[np.ndarray] | None:
    """The signature of a generic site's operands without their unit axes; None where they cannot tell sites apart.

    An operand that cannot be read, or holds one value throughout (a zero initial state, a
    tensor of ones), says nothing about which site is which: such sites are left unpaired.
    """
    parts: list[np.ndarray] = []
    for operand in site.operands:
        if (operand.axes is not None or operand.split is not None or operand.block is not None or operand.nbits
                or operand.quantized or operand.blocked):  # fmt: skip
            return None  # laid out by its own reader: its canonical shape is not the stored one's
        read = read_operand(graph, operand, bounds=False)
        if read is None or read.value.size < 2:
            return None
        value = np.asarray(read.value, dtype=np.float64)
        first = value.flat[0]
        if not np.all(np.isfinite(value)) or bool(np.all(value == first)):
            return None
        parts.extend(signature(value.reshape(tuple(d for d in value.shape if d != 1))))
    return parts


def _pair_across_unit_axes(state: SitePairing) -> None:
    """Pair generic sites left over by both models whose constants differ only by unit axes.

    ONNX Runtime's transpose optimizer stores a rotary table ``[1, 1, S, D]`` as ``[1, S, 1, D]``
    (the Transpose moved past the Mul folded into the table): the same numbers, another token.
    Only sites left unpaired by the tokens as stored are considered, only those whose every
    operand varies (:func:`_telling_signature`: a constant tensor, a zero initial state, of the
    same non-unit shape as another would pair with it on shape alone, which decides nothing),
    and only pairs equal within storage rounding (:data:`NEAR_EXACT`): a layout is all that
    tells them apart, so anything more is left to the divergences, as before. Except where
    another table of the same token pairs so (the layout did move): a table there that differs
    beyond any storage's rounding (:data:`NEAR_QUANTIZED`) and that the graph order pairs is
    kept, so the audit compares it and says ``modified`` rather than "different models" (a
    scaled rotary table under ORT's optimizer, held-out round 11). Paired sites are rewritten in
    place with the unit axes left out of their operands' canonical shapes, so both sides
    compare in one layout.
    """
    reference, suspect, ref_sites, sus_sites = state.reference, state.suspect, state.ref_sites, state.sus_sites
    pairs, how = state.pairs, state.how
    paired_suspect = set(pairs.values())
    left_over = [
        {n: _squeezed_token(site) for n, site in enumerate(sites) if n not in taken and site.family == "other"}
        for sites, taken in ((ref_sites, set(pairs)), (sus_sites, paired_suspect))
    ]
    both = set(left_over[0].values()) & set(left_over[1].values())  # read values only where a counterpart may be
    sides: list[dict[int, list[np.ndarray]]] = [{}, {}]
    ref_left: list[int] = []
    sus_left: list[int] = []
    for graph, sites, tokens, signatures, left in (
        (reference, ref_sites, left_over[0], sides[0], ref_left),
        (suspect, sus_sites, left_over[1], sides[1], sus_left),
    ):
        for number, token in tokens.items():
            if token not in both:
                continue
            found = _telling_signature(graph, sites[number])
            if found is not None:
                signatures[number] = found
                left.append(number)
    if not ref_left or not sus_left:
        return
    ref_tokens = [_squeezed_token(ref_sites[n]) for n in ref_left]
    sus_tokens = [_squeezed_token(sus_sites[n]) for n in sus_left]
    matcher = difflib.SequenceMatcher(None, ref_tokens, sus_tokens, autojunk=False)
    structural = {ref_left[b.a + k]: sus_left[b.b + k] for b in matcher.get_matching_blocks() for k in range(b.size)}
    classes: dict[tuple[object, ...], tuple[list[int], list[int]]] = {}
    for number, token in zip(ref_left, ref_tokens):
        classes.setdefault(token, ([], []))[0].append(number)
    for number, token in zip(sus_left, sus_tokens):
        if token in classes:
            classes[token][1].append(number)
    found_pairs: dict[int, int] = {}
    moved: set[int] = set()  # rows of a class in which a table is the same numbers in another layout
    for rows, cols in classes.values():
        if rows and cols:
            pair_class(rows, cols, structural, sides[0], sides[1], found_pairs, how)
            made_here = [how[row][2] for row in rows if row in found_pairs]
            if any(made is not None and made <= NEAR_EXACT for made in made_here):
                moved.update(rows)
    for mine, theirs in found_pairs.items():
        method, _, made = how[mine]
        # The same numbers; or, in a class where a table is (so the layout moved), a table
        # changed beyond any storage's rounding that the graph order puts there: compared, and
        # found changed (a scaled rotary table), rather than left unpaired and the models
        # refused as different. One within a quantizer's rounding stays unpaired, as before.
        changed = made is not None and made > NEAR_QUANTIZED and method in ("structure", "order") and mine in moved
        if made is None or (made > NEAR_EXACT and not changed):
            del how[mine]
            continue
        pairs[mine] = theirs
        ref_sites[mine], sus_sites[theirs] = _without_unit_axes(ref_sites[mine]), _without_unit_axes(sus_sites[theirs])


def _without_unit_axes(site: Site) -> Site:
    """A generic site with its operands' canonical shapes (and its token) free of unit axes."""
    operands = tuple(replace(o, shape=tuple(d for d in o.shape if d != 1)) for o in site.operands)
    return replace(site, operands=operands, token=_squeezed_token(site))


def _pair_weighing_twins(state: SitePairing) -> None:
    """Give a layer that reads activations the counterpart that reads activations, among twins.

    DeBERTa-v2 projects its relative-position table through each layer's query and key
    weights: two MatMuls of one weight, one on the hidden states, one on constants (a layer of
    constants, which does not weigh). Content cannot tell the two apart, and a quantizer
    reorders or folds the constant one (``quantize_dynamic`` leaves it in float after the
    quantized ones; ``quant_pre_process`` folds it away), so the order may pair the hidden
    states' layer with the constants' one, and every connection of both then counts as lost.
    Where a pair joins a weighing site to a non-weighing one and the side's twin (same token,
    same content) matches the other's kind, the twin takes the counterpart: swapped with the
    twin's own, or moved where the twin had none. Twins read equal weights, so no weight is
    paired with another value than before.
    """
    ref_sites, sus_sites, pairs, how = state.ref_sites, state.sus_sites, state.pairs, state.how
    back = {b: a for a, b in pairs.items()}
    for mine in sorted(pairs):
        theirs = pairs.get(mine)
        if theirs is None or ref_sites[mine].weighs == sus_sites[theirs].weighs:
            continue
        twin = _hand_to_twin(ref_sites, state.ref_sig, sus_sites, pairs, back, mine, theirs)
        if twin is not None:  # the distances stay with the pairs: the twins' contents are equal
            made, other = how.pop(mine), how.pop(twin, None)
            how[twin] = made
            if other is not None:
                how[mine] = other
            continue
        _hand_to_twin(sus_sites, state.sus_sig, ref_sites, back, pairs, theirs, mine)


def _hand_to_twin(
    sites: list[Site],
    signatures: Signatures,
    counterparts: list[Site],
    forward: dict[int, int],
    backward: dict[int, int],
    mine: int,
    theirs: int,
) -> int | None:
    """Give ``mine``'s counterpart ``theirs`` to a twin of ``mine`` of its kind (see :func:`_pair_weighing_twins`).

    ``forward`` pairs ``sites`` with ``counterparts`` (``backward`` the other way). The twin's
    own counterpart, if of ``mine``'s kind, goes to ``mine``; without one, ``mine`` is left
    unpaired. Returns the twin, or None where there is none.
    """
    key = signature_key(signatures[mine])
    for twin, site in enumerate(sites):
        if twin == mine or site.token != sites[mine].token or site.weighs != counterparts[theirs].weighs:
            continue
        partner = forward.get(twin)
        if partner is not None and counterparts[partner].weighs != sites[mine].weighs:
            continue
        if signature_key(signatures[twin]) != key:
            continue
        if partner is None:
            del forward[mine]
        else:
            forward[mine], backward[partner] = partner, mine
        forward[twin], backward[theirs] = theirs, twin
        return twin
    return None


#: Rounds of :func:`_settle_by_connections` at most (each strictly gains connections, so it ends anyway).
_SETTLE_ROUNDS = 8


def _settle_by_connections(state: SitePairing) -> None:
    """Re-pair layer sites that content cannot tell apart by the layers they connect to.

    One table read twice (BART's token embedding, shared by its encoder and decoder) gives two
    sites of equal content; where a converter reorders the graph (ONNX Runtime puts the decoder's
    Gather first) the alignment and the order pair them crosswise, and every layer each feeds
    then counts as a lost connection. Among the sites of one token whose counterparts content
    leaves interchangeable (none decisively farther than the site's own), the assignment that
    keeps the most connections to the other paired layers (both ways) is taken, only where it
    keeps strictly more than the pairing made so far.
    """
    ref_sites, sus_sites, pairs, how = state.ref_sites, state.sus_sites, state.pairs, state.how
    classes: dict[tuple[object, ...], list[int]] = {}
    for mine in sorted(pairs):
        margin = how[mine][1] if mine in how else None
        if margin is not None and margin >= 1.0 - DECISIVE_RATIO:  # content decided it
            continue
        if ref_sites[mine].family in CONNECTED_FAMILIES and sus_sites[pairs[mine]].token == ref_sites[mine].token:
            classes.setdefault(ref_sites[mine].token, []).append(mine)
    candidates: list[tuple[list[int], list[int], np.ndarray]] = []  # rows, their counterparts then, distances
    for rows in classes.values():
        if len(rows) < 2:
            continue
        table = np.array([[distance(state.ref_sig[r], state.sus_sig[pairs[c]]) for c in rows] for r in rows], dtype=np.float64)
        table = np.where(np.isfinite(table), table, 4.0)
        own = np.diag(table)[:, None]
        allowed = (table * DECISIVE_RATIO <= own) | (table <= NEAR_EXACT)
        if np.count_nonzero(allowed) > len(rows):  # some site has an interchangeable counterpart
            candidates.append((rows, [pairs[r] for r in rows], np.where(allowed, table, np.inf)))
    if not candidates:
        return
    ref_edges, sus_edges = successors(state.reference, ref_sites), successors(state.suspect, sus_sites)
    ref_next: dict[int, set[int]] = {}
    ref_prev: dict[int, set[int]] = {}
    for a, b in ref_edges:
        ref_next.setdefault(a, set()).add(b)
        ref_prev.setdefault(b, set()).add(a)
    # A class's neighbours may be among the crosswise pairs of another class (a Siamese model's
    # two branches: each layer's neighbours are the other branch's until that class is settled):
    # classes are settled in turn, each against the pairing as it stands, until none gains.
    for _ in range(_SETTLE_ROUNDS):
        changed = False
        for rows, first, table in candidates:
            back = {b: a for a, b in pairs.items()}
            sus_next: dict[int, set[int]] = {}
            sus_prev: dict[int, set[int]] = {}
            for a, b in sus_edges:  # keyed by the suspect's site, its neighbours in the reference's numbering
                if a in back and b in back:
                    sus_next.setdefault(a, set()).add(back[b])
                    sus_prev.setdefault(b, set()).add(back[a])
            cols = [pairs[r] for r in rows]
            score = np.array(
                [
                    [len(ref_next.get(r, set()) & sus_next.get(c, set())) + len(ref_prev.get(r, set()) & sus_prev.get(c, set()))
                     for c in cols]
                    for r in rows
                ],
                dtype=np.float64,
            )  # fmt: skip
            current = table[:, [first.index(c) for c in cols]]  # the distances' columns in the current pairing's order
            cost = np.where(np.isfinite(current), -score, 1e9)
            chosen_rows, chosen_cols = linear_sum_assignment(cost)
            if float(score[chosen_rows, chosen_cols].sum()) <= float(np.trace(score)):
                continue
            if any(not np.isfinite(current[i, j]) for i, j in zip(chosen_rows, chosen_cols)):
                continue
            for i, j in zip(chosen_rows, chosen_cols):
                if i != j:
                    pairs[rows[int(i)]] = cols[int(j)]
                    how[rows[int(i)]] = ("structure", None, float(current[i, j]) if current[i, j] < 4.0 else None)
                    changed = True
        if not changed:
            break
