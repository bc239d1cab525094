"""The forensics' Gram product runs in a worker thread beside the other figures, and gives their values bit for bit.

``classify_change`` hands each weight's Gram product (the top singular value of the change, the
largest single cost of the forensics) to one worker thread while the main thread computes the
median, the reference's figures, the correlation and the column dispersion; the product's top
eigenvalue follows it there, and so does the change's median absolute deviation where the
product is small (the worker has time for it; a wide product keeps the deviation in the main
thread). The change they read must stay as it is until they are done: here each task is held
back until the main thread has waited for it, so any write into the change's memory before the
wait would show in the deviation or the spectral excess. Each figure is compared with the
sequential three-array path (``_measure_widened``). Rows that a transpose copies (a kernel's input
axis) are measured one step after the other, as before, their deviation in the worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from onnxlady._audit._forensics import (
    _POOLED_GRAM,
    WeightInfo,
    _measure,
    _measure_widened,
    _Scratch,
    classify_change,
)


class _LatePool(ThreadPoolExecutor):
    """One worker that starts each task only once the submitting thread has waited for it (or after 0.3 s)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.threads: list[str] = []
        self.tasks: list[str] = []  # the functions run, in order

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def late() -> Any:
            time.sleep(0.15)  # the main thread is done with its other figures by then
            self.threads.append(threading.current_thread().name)
            self.tasks.append(fn.__name__)
            return fn(*args, **kwargs)

        return super().submit(late)


def _pairs(wide: bool = False) -> list[tuple[WeightInfo, np.ndarray, np.ndarray]]:
    """Noisy weights whose rows are a view of the change (axis 0, a matrix's axis 1) and one whose rows a transpose copies.

    ``wide``: also one whose Gram product is wider than the worker takes the deviation beside.
    """
    rng = np.random.default_rng(21)
    out = []
    shapes = [((96, 40, 3, 3), 0), ((120, 80), 0), ((80, 120), 1), ((24, 64, 3, 3), 1)]
    for number, (shape, axis) in enumerate(shapes + ([((_POOLED_GRAM + 16, 2 * _POOLED_GRAM), 0)] if wide else [])):
        ref = rng.standard_normal(shape).astype(np.float32)
        spread = np.expand_dims(1 + rng.random(shape[axis]), tuple(d for d in range(len(shape)) if d != axis))
        sus = (ref + 0.1 * rng.standard_normal(shape) * spread).astype(np.float32)  # rows of unequal noise
        out.append((WeightInfo(f"w{number}", "Conv", axis), ref, sus))
    return out


def test_gram_in_a_late_worker_gives_the_sequential_figures() -> None:
    buffers = _Scratch()
    with _LatePool() as pool:
        for info, ref, sus in _pairs(wide=True):
            before = len(pool.tasks)
            found = _measure(info.tensor, info, ref, sus, None, buffers, pool)
            # Rows that are a view of the change (not a kernel's input axis): the product and its top
            # eigenvalue ran in the worker, the deviation between them where the product is small...
            in_worker = info.row_axis == 0 or ref.ndim == 2
            small = min(ref.shape[info.row_axis], ref.size // ref.shape[info.row_axis]) <= _POOLED_GRAM
            if in_worker:
                expected = ["_gram", *(["median_deviation"] if small else []), "_top_of_product"]
            else:  # ...and the deviation alone where rows a transpose copies (no product there)
                expected = ["median_deviation"]
            assert pool.tasks[before:] == expected
            assert threading.current_thread().name not in pool.threads
            assert repr(found) == repr(_measure_widened(info.tensor, info, ref, sus))  # ...on the change as computed
            assert found["spectral_excess"] is not None and found["spectral_excess"] > 0.5


def test_spectral_excess_is_the_top_singular_value() -> None:
    """The figure the worker returns is the squared top singular value over its Gaussian expectation."""
    with _LatePool() as pool:
        for info, ref, sus in _pairs():
            found = _measure(info.tensor, info, ref, sus, None, _Scratch(), pool)["spectral_excess"]
            change = np.moveaxis(sus.astype(np.float64) - ref, info.row_axis, 0).reshape(ref.shape[info.row_axis], -1)
            m, n = change.shape
            expected = np.linalg.svd(change, compute_uv=False)[0] ** 2 / (np.mean(change**2) * (m**0.5 + n**0.5) ** 2)
            assert abs(found - expected) <= 1e-9 * expected


def test_classification_uses_one_worker_and_lets_it_go() -> None:
    pairs = _pairs()
    ref = {info.tensor: r for info, r, _ in pairs}
    sus = {info.tensor: s for info, _, s in pairs}
    infos = {info.tensor: info for info, _, _ in pairs}
    before = {t.name for t in threading.enumerate()}
    result = classify_change(ref, sus, infos, 1e-5)
    assert [e["spectral_excess"] is not None for e in result["evidence"]["per_tensor"]] == [True] * len(pairs)
    leftover = {t.name for t in threading.enumerate()} - before
    assert not [name for name in leftover if name.startswith("onnxlady-forensics")]
