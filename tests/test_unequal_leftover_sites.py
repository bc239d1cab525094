"""Sites left over in unequal numbers are paired by nearest content, not by graph order (round 18).

A Perceiver through ONNX Runtime's extended optimizer: the cross-attention query is fused into a
FusedMatMul (no counterpart of its token in the suspect), so two reference queries compete for
the suspect's one. With the self-attention query's weight changed in one row, content no longer
decided that pair, and graph order gave the suspect's query to the cross-attention query that
came first: the connections then disagreed and the audit refused the pair as "different models"
(82 %) instead of calling it `modified`. One site must stay unpaired; the nearest content says
which, and where the numbers are equal the order still decides as before.
"""

from __future__ import annotations

import numpy as np

from onnxlady._resync._content import DECISIVE_RATIO, Made, pair_class
from onnxlady._resync._invariants import distance


def _signatures() -> tuple[dict[int, list[np.ndarray]], dict[int, list[np.ndarray]]]:
    """Reference: a cross query (0), a self query (1), a key (2); suspect: the self query changed (10), the key (11)."""
    rng = np.random.default_rng(0)
    query, key = rng.normal(size=64), rng.normal(size=64)
    changed = query.copy()
    changed[:3] *= 1.5  # one row of the weight changed: its signature moves a little
    cross = changed + 0.08 * np.random.default_rng(1).normal(size=64)  # farther, yet content is not decisive
    return {0: [cross], 1: [query], 2: [key]}, {10: [changed], 11: [key.copy()]}


def test_the_nearest_of_two_leftover_sites_takes_the_one_counterpart() -> None:
    ref, sus = _signatures()
    near, far = distance(ref[1], sus[10]), distance(ref[0], sus[10])
    assert DECISIVE_RATIO * far < near < far, (near, far)  # content alone does not decide it
    pairs: dict[int, int] = {}
    how: dict[int, Made] = {}
    # The structural alignment is off by the fused site: it names the key's counterpart for the
    # cross query, which content gives to the key.
    pair_class([0, 1, 2], [10, 11], {0: 11}, ref, sus, pairs, how)
    assert pairs == {1: 10, 2: 11}, (pairs, how)
    assert how[1][0] == "order" and how[2][0] == "content"


def test_equal_numbers_left_over_are_still_paired_in_graph_order() -> None:
    ref, sus = _signatures()
    sus[12] = [ref[0][0].copy() * 1.001 + 0.3]  # a third suspect site: as many left on each side
    pairs: dict[int, int] = {}
    how: dict[int, Made] = {}
    pair_class([0, 1, 2], [10, 12, 11], {}, ref, sus, pairs, how)
    assert pairs[2] == 11
    assert {pairs[0], pairs[1]} == {10, 12}
