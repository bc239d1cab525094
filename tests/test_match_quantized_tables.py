"""Tables stored in 8 bits still rule out a decisively farther counterpart (held-out round 12, F8).

ONNX Runtime's static quantizer put a dynamo-exported Mistral's rotary sin table through
QuantizeLinear/DequantizeLinear (uint8): the sin table's sites then sat at signature distance
about 4e-3 from their counterparts, above the "equal within storage rounding" threshold (1e-3),
so nothing ruled out the cos table's sites (distance 0.86) and the quantized graph's order paired
the queries' sin with the keys' cos: an untouched quantized copy was audited ``modified``. Here
``_pair_class`` is given that table of distances directly.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxlady._resync import _content


@pytest.mark.parametrize(("near", "paired_by_content"), [(0.0036, True), (0.02, False)])
def test_a_quantized_table_rules_out_the_other_table(monkeypatch: pytest.MonkeyPatch, near: float, paired_by_content: bool) -> None:
    # Reference sites: cos (q), sin (q), cos (k), sin (k); the suspect's order: cos, cos, sin, sin.
    ref_kind = {0: "cos", 1: "sin", 2: "cos", 3: "sin"}
    sus_kind = {0: "cos", 1: "cos", 2: "sin", 3: "sin"}

    def fake_distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return near if ref_kind[int(a[0][0])] == sus_kind[int(b[0][0])] else 0.86

    monkeypatch.setattr(_content, "distance", fake_distance)
    signatures = {number: [np.array([number])] for number in range(4)}
    structural = {number: number for number in range(4)}  # the alignment pairs them in order
    pairs: dict[int, int] = {}
    how: dict[int, tuple[str, float | None, float | None]] = {}
    _content.pair_class([0, 1, 2, 3], [0, 1, 2, 3], structural, signatures, signatures, pairs, how)
    crosswise = [r for r, c in pairs.items() if ref_kind[r] != sus_kind[c]]
    if paired_by_content:  # within 8-bit rounding: each table takes a counterpart of its own kind
        assert not crosswise, pairs
    else:  # as far as noise puts it, content rules nothing out: the order stands
        assert crosswise, pairs
