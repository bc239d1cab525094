"""Pairing the sites of one token: decisive content, then the alignment, then order.

Among sites of the same token (family and canonical shapes), the distances between their
content signatures (:mod:`onnxlady._resync._signatures`) say which weight is which where they
are decisive; the structural alignment decides the rest, and what both leave is paired in graph
order. Twins compete for counterparts as a block. Every pair says how it was made
(:data:`Made`).
"""

from __future__ import annotations

import numpy as np

from onnxlady._assignment import linear_sum_assignment
from onnxlady._resync._invariants import distance
from onnxlady._resync._signatures import Signatures, twins

__all__ = ["DECISIVE_RATIO", "NEAR_EXACT", "NEAR_QUANTIZED", "Made", "pair_class"]

#: How a site pair was made: the method (``structure``, ``content`` or ``order``), the content
#: margin (1 - best / second-best distance; None without a competitor) and the signature
#: distance (None where the signatures do not compare).
Made = tuple[str, float | None, float | None]
#: Content decides between candidates when the best is at most this share of the second best.
DECISIVE_RATIO = 0.5
#: A signature distance at most this is an equal counterpart within storage rounding (float16
#: tables: about 1e-4; noise of 0.1 x std: above 1e-2).
NEAR_EXACT = 1e-3
#: The same for a table stored in 8 bits (a static quantizer's uint8 sin table: about 4e-3),
#: still below noise's; used only to rule out a counterpart decisively farther.
NEAR_QUANTIZED = 6e-3


def pair_class(
    rows: list[int],
    cols: list[int],
    structural: dict[int, int],
    ref_sig: Signatures | dict[int, list[np.ndarray]],
    sus_sig: Signatures | dict[int, list[np.ndarray]],
    pairs: dict[int, int],
    how: dict[int, Made],
) -> None:
    """Pair the sites of one token: decisive content, then the alignment, then order."""
    table = np.array([[distance(ref_sig[r], sus_sig[s]) for s in cols] for r in rows], dtype=np.float64)
    table = np.where(np.isfinite(table), table, 4.0)
    row_twins, col_twins = twins([ref_sig[r] for r in rows]), twins([sus_sig[c] for c in cols])
    content, decisive, confined = _content_decisions(table, row_twins, col_twins)
    position = {s: j for j, s in enumerate(cols)}
    taken: set[int] = set()
    decided: dict[int, tuple[int, str]] = {}
    for i, j in content.items():
        if i in decisive:
            method = "structure" if structural.get(rows[i]) == cols[j] else "content"
            decided[i] = (j, method)
            taken.add(j)
    own_table, by_own, own_confined = _decided_by_own_weights(rows, cols, ref_sig, sus_sig, decisive | set(confined), taken)
    for i, j in by_own.items():
        decided[i] = (j, "structure" if structural.get(rows[i]) == cols[j] else "content")
        taken.add(j)
    confined.update(own_confined)
    # A counterpart content rules out: the site has a counterpart equal within storage rounding
    # and this one is decisively farther. Identical copies (a rotary table read by the queries
    # and by the keys) leave content undecided between them, yet still rule out the other table
    # of the same shape, whatever the order says. Under noise no counterpart is that close, and
    # content, unreliable there, rules nothing out.
    # The same holds from the other side: a counterpart with an equal site among these rules
    # out the sites decisively farther (one table stored again in another layout leaves one
    # suspect site of the reference's shape, which the reference's other table must not take).
    # Equal here means within an 8-bit quantizer's rounding too (a rotary table put through
    # QuantizeLinear/DequantizeLinear by a static quantizer: held-out round 12, F8).
    nearest, nearest_col = table.min(axis=1), table.min(axis=0)
    ruled_out = (table > 1e-9) & (
        ((nearest[:, None] <= NEAR_QUANTIZED) & (nearest[:, None] <= DECISIVE_RATIO * table))
        | ((nearest_col[None, :] <= NEAR_QUANTIZED) & (nearest_col[None, :] <= DECISIVE_RATIO * table))
    )
    for i, block in confined.items():  # within its block a twin rules nothing out: one float, one quantized
        ruled_out[i] = ~block
    for i, r in enumerate(rows):
        if i in decided or r not in structural or structural[r] not in position:
            continue
        j = position[structural[r]]
        if j not in taken and not ruled_out[i, j]:
            decided[i] = (j, "structure")
            taken.add(j)
    left_rows = [i for i in range(len(rows)) if i not in decided]
    left_cols = [j for j in range(len(cols)) if j not in taken]
    if left_rows and left_cols and len(left_rows) != len(left_cols):
        # Some site left stays unpaired (its counterpart fused away or frozen on the other
        # side): which one is the nearest content's to say, not the graph order's (a changed
        # row made a Perceiver's self-attention query lose its counterpart to the cross-
        # attention query before it, whose own was fused away: held-out round 18).
        sub = table[np.ix_(left_rows, left_cols)]
        for a, b in zip(*linear_sum_assignment(np.where(ruled_out[np.ix_(left_rows, left_cols)], 8.0, sub))):
            i, j = left_rows[int(a)], left_cols[int(b)]
            if not ruled_out[i, j]:
                decided[i] = (j, "order")
        left_cols = [j for j in left_cols if j not in {d for d, _ in decided.values()}]
    for i in left_rows:  # in graph order: the first counterpart left that content allows
        if i in decided:
            continue
        allowed = next((j for j in left_cols if not ruled_out[i, j]), None)
        if allowed is not None:
            decided[i] = (allowed, "order")
            left_cols.remove(allowed)
    # Then what content rules out, in order: only where no other site left could take it (a
    # site whose every counterpart is ruled out must not take the one another site equals).
    for i in left_rows:
        if i not in decided and left_cols:
            decided[i] = (left_cols.pop(0), "order")
    for i, (j, method) in decided.items():
        pairs[rows[i]] = cols[j]
        best = float(table[i, j])
        # How much closer the chosen counterpart is than any other candidate of either site
        # (negative: content preferred another, and the structure or the order decided); for
        # a pair its own weights decided, by those (the distance stays the whole signature's).
        margins = own_table if i in by_own and own_table is not None else table
        others = np.concatenate([np.delete(margins[i], j), np.delete(margins[:, j], i)])
        second = float(others.min()) if others.size else float("inf")
        margin = 1.0 - float(margins[i, j]) / second if 0 < second < 4.0 else None
        how[rows[i]] = (method, margin, best if best < 4.0 else None)


def _content_decisions(
    table: np.ndarray, row_twins: np.ndarray, col_twins: np.ndarray
) -> tuple[dict[int, int], set[int], dict[int, np.ndarray]]:
    """What content decides in a table of signature distances (rows: reference sites, columns: suspect's).

    Returns the least-distance assignment, the rows it pairs decisively (the best at most
    :data:`DECISIVE_RATIO` of the second best) and the twin rows it confines to a block of
    counterparts (by their columns).
    """
    chosen_rows, chosen_cols = linear_sum_assignment(table)
    content = {int(i): int(j) for i, j in zip(chosen_rows, chosen_cols)}
    decisive: set[int] = set()
    # Twins (sites of one model reading equal weights: ALBERT's layers, DeBERTa's query read by
    # two MatMuls) compete for the same counterparts: a site's second best is looked for outside
    # its twins and theirs (without twins: the row and column less the pair itself). Content
    # then only confines the site to that block; which twin takes which is the alignment's and
    # the order's to say, content being blind to it.
    confined: dict[int, np.ndarray] = {}
    assigned_col = np.full(table.shape[0], -1)
    assigned_row = np.full(table.shape[1], -1)
    for i, j in content.items():
        assigned_col[i], assigned_row[j] = j, i
    for i, j in content.items():
        same_rows, same_cols = row_twins == row_twins[i], col_twins == col_twins[j]
        block_cols = same_cols.copy()
        block_cols[assigned_col[same_rows & (assigned_col >= 0)]] = True
        block_rows = same_rows.copy()
        block_rows[assigned_row[same_cols & (assigned_row >= 0)]] = True
        others = np.concatenate([table[i, ~block_cols], table[~block_rows, j]])
        second = float(others.min()) if others.size else float("inf")
        if second > 1e-9 and table[i, j] <= DECISIVE_RATIO * second:
            if np.count_nonzero(same_rows) > 1 or np.count_nonzero(same_cols) > 1:
                confined[i] = block_cols
            else:
                decisive.add(i)
    return content, decisive, confined


def _decided_by_own_weights(
    rows: list[int],
    cols: list[int],
    ref_sig: Signatures | dict[int, list[np.ndarray]],
    sus_sig: Signatures | dict[int, list[np.ndarray]],
    settled: set[int],
    taken: set[int],
) -> tuple[np.ndarray | None, dict[int, int], dict[int, np.ndarray]]:
    """Sites whose own weights, their bias and shift left out, decide a counterpart the whole signature did not.

    A converter stores equal biases once (ONNX Runtime's extended level and onnxslim
    deduplicate BART's and CLIP's zero biases, read by a dozen layers); one element changed
    there moves every reader's signature by the same large amount (a zero bias made nonzero
    is as far as two signatures get), so no reader's counterpart is decisively nearer than
    the others, the structure and the order pair a reordered graph crosswise, and the two
    models are refused as different (held-out round 14, F7). A layer's own weight still tells
    it apart: where it decides (:func:`_content_decisions`) it decides, or confines twins to
    their block (DeBERTa's query and key, each read by two MatMuls), and the audit then
    compares the changed bias. Only rows not ``settled`` (decided or confined by the whole
    signature) and counterparts not ``taken``; the whole signature's decisions are kept.

    Returns:
        The table of the own weights' distances (None where none was needed), the rows it
        decides and the twin rows it confines (by position in ``rows`` and ``cols``).
    """
    if not isinstance(ref_sig, Signatures) or not isinstance(sus_sig, Signatures) or len(rows) + len(cols) < 3:
        return None, {}, {}
    open_rows = [i for i in range(len(rows)) if i not in settled]
    if not any(len(ref_sig.own(rows[i])) < len(ref_sig[rows[i]]) for i in open_rows):
        return None, {}, {}  # no site left open reads a bias or shift: its own weights are its whole signature
    ref_own, sus_own = [ref_sig.own(r) for r in rows], [sus_sig.own(c) for c in cols]
    if not all(ref_own) or not all(sus_own):
        return None, {}, {}
    table = np.array([[distance(a, b) for b in sus_own] for a in ref_own], dtype=np.float64)
    table = np.where(np.isfinite(table), table, 4.0)
    row_twins = twins(ref_own)
    content, decisive, confined = _content_decisions(table, row_twins, twins(sus_own))
    decided = {i: j for i, j in content.items() if i in decisive and i not in settled and j not in taken}
    # A twin the assignment left out (more twins than counterparts) is confined with its twin.
    blocks = {int(row_twins[i]): block for i, block in confined.items()}
    return table, decided, {i: blocks[int(t)] for i, t in enumerate(row_twins) if int(t) in blocks and i not in settled}
