"""A large weight's norms are computed in a worker thread beside its quantiles, to the same bits (issue 15).

Resync across a conversion signs every weight of a token class (about 40 % of a 118 MB float16
or QDQ resync); within :func:`sharing_scratch` the row and column norms of a weight of a
million values or more run in the worker thread while this one selects its quantiles.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from onnxlady._resync import _invariants
from onnxlady._resync._invariants import distance, sharing_scratch, signature


def _weights() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    kernel = (rng.standard_normal((256, 128, 3, 3)) * rng.uniform(0.5, 2.0, (256, 1, 1, 1))).astype(np.float32)
    return [
        kernel,  # float32, 295k values: signed in this thread
        kernel.astype(np.float64) * rng.uniform(0.5, 1.5, (256, 1, 1, 1)),  # a folded float64 kernel
        np.repeat(kernel, 4, axis=0),  # 1.2 M float32 values: norms beside
        rng.standard_normal((1100, 1024)).astype(np.float16),  # a float16 matrix of 1.1 M values
        (rng.standard_normal((1200, 960)) * 0.02),  # a float64 matrix
    ]


def test_norms_beside_are_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    alone = [signature(weight) for weight in _weights()]  # no worker outside the block
    threads: list[str] = []
    norms = _invariants._norms

    def spy(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        threads.append(threading.current_thread().name)
        return norms(flat)

    monkeypatch.setattr(_invariants, "_norms", spy)
    with sharing_scratch():
        beside = [signature(weight) for weight in _weights()]
    for one, other in zip(alone, beside):
        assert len(one) == len(other) == 3
        assert all(a.tobytes() == b.tobytes() for a, b in zip(one, other))
    # The two small kernels in this thread, the three large weights in the worker.
    assert [name.startswith("onnxlady-signature") for name in threads] == [False, False, True, True, True]


def test_norms_beside_still_tell_a_permuted_copy_from_a_changed_one() -> None:
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((1024, 1100)).astype(np.float32)
    permuted = weight[rng.permutation(1024)][:, rng.permutation(1100)]
    changed = weight.copy()
    changed[:, :40] *= 1.5  # forty input columns scaled: values and column norms move
    with sharing_scratch():
        reference, same, other = signature(weight), signature(permuted), signature(changed)
    assert distance(reference, same) < 1e-12  # (norms summed in another order: equal within rounding)
    assert distance(reference, other) > 1e-2
