"""The audit of an inline twin holds the re-synchronized suspect whole, never the reference beside it.

The reference of a model read as views of its ``.onnx`` file is read tensor by tensor
(:class:`onnxlady._audit._lazy.ReadEachTime`): the steps that only gather rows or compare values
(similarity, comparison, scale analysis, the searches for scaled neurons under noise) read its
views, never copied (:class:`~onnxlady._audit._lazy.FileViews`); the classification of the
change reads an aligned copy of one tensor at a time. Holding a copy of every reference tensor
beside the moved ones made the audit's peak twice the model. Every verdict and finding must be
what the reference read whole gives, byte for byte.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from test_audit_lazy import SUSPECTS as LAZY_SUSPECTS
from test_audit_lazy import _noisy, _permute

import onnxlady
import onnxlady._audit._lazy as lazy_module
import onnxlady._audit._verdicts as verdicts_module
import onnxlady._io._external as external_module
import onnxlady._io._files as files_module
from fixtures import FIXTURES
from onnxlady._audit._lazy import FileViews, Held, constants_of
from onnxlady._io._files import load_model
from onnxlady._io._tensors import read_array, tensor_holders
from onnxlady.testing import copy_model

#: The suspects of tests/test_audit_lazy.py (builders from a copy of the reference, and the
#: verdict each must get; None: any change found), and a permuted copy with noise.
SUSPECTS = {**LAZY_SUSPECTS, "noise": ("resnet", lambda m: _noisy(_permute(m), noise=0.05), "perturbed")}


@pytest.fixture(autouse=True)
def _map_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixtures' tensors are small: map every one of at least 1 KB from the file, as large ones are."""
    monkeypatch.setattr(external_module, "INLINE_BYTES", 1024)
    monkeypatch.setattr(files_module, "INLINE_BYTES", 1024)


def _paths(case: str, tmp_path: Path) -> tuple[Path, Path]:
    name, build, _ = SUSPECTS[case]
    reference = FIXTURES[name](0)
    reference_path, suspect_path = tmp_path / "ref.onnx", tmp_path / "sus.onnx"
    onnx.save(reference, reference_path)
    onnx.save(build(copy_model(reference)), suspect_path)
    return reference_path, suspect_path


@pytest.mark.parametrize("case", sorted(SUSPECTS))
def test_report_is_that_of_the_reference_read_whole(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference_path, suspect_path = _paths(case, tmp_path)
    viewed = onnxlady.audit(reference_path, suspect_path)
    # As before: an aligned copy of every reference tensor, read once and held to the end.
    monkeypatch.setattr(verdicts_module, "reference_constants", constants_of)
    whole = onnxlady.audit(reference_path, suspect_path)
    assert viewed.to_json_text() == whole.to_json_text()
    assert viewed.to_markdown() == whole.to_markdown()
    verdict = SUSPECTS[case][2]
    if verdict is None:
        assert viewed.exit_code == 1 and viewed.verdict not in ("identical", "permuted", "permuted-rescaled")
    else:
        assert viewed.verdict == verdict, viewed.summary
    if case == "wrong":  # a wrong permutation is caught
        assert viewed.report.differing_tensors


@pytest.mark.parametrize("case", ["noise", "rescaled", "attacked-noise"])
def test_reference_copies_are_never_held_all(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference_path, suspect_path = _paths(case, tmp_path)
    # Every aligned copy made of a reference tensor, watched (weakly) until it is let go.
    copies: list[weakref.ref[np.ndarray]] = []
    label: list[str] = [""]
    read, plain = lazy_module.read_array, lazy_module._plain

    def reading(holder: onnx.TensorProto, text: str) -> np.ndarray:
        label[0] = text
        return read(holder, text)

    def copying(values: np.ndarray) -> np.ndarray:
        out = plain(values)
        if out is not values and label[0].endswith("of the reference"):
            copies.append(weakref.ref(out))
        return out

    monkeypatch.setattr(lazy_module, "read_array", reading)
    monkeypatch.setattr(lazy_module, "_plain", copying)
    alive: dict[str, int] = {}

    def counting(step: str, run: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any) -> Any:
            alive[step] = max(alive.get(step, 0), sum(copy() is not None for copy in copies))
            return run(*args)

        return counted

    for step in ("_scale_analysis", "_noisy_rescales", "classify_change"):
        monkeypatch.setattr(verdicts_module, step, counting(step, getattr(verdicts_module, step)))
    report = onnxlady.audit(reference_path, suspect_path).report
    # Views of the file at addresses their item size does not divide: each needs a copy to be aligned.
    model = load_model(reference_path, map_external=True).model
    unaligned = [name for name, holder in tensor_holders(model).items() if not read_array(holder, name).flags.aligned]
    assert len(unaligned) > 1, "every reference tensor aligned in its file: nothing checked"
    assert alive and max(alive.values()) <= 1, (alive, len(copies))
    assert report.verdict == SUSPECTS[case][2] or (SUSPECTS[case][2] is None and report.exit_code == 1)


def test_held_maps_each_view_once_per_step(tmp_path: Path) -> None:
    reads: list[str] = []
    views = FileViews({"a": lambda: reads.append("a") or np.zeros(2), "b": lambda: reads.append("b") or np.ones(2)})
    views["a"], views["a"]
    assert reads == ["a", "a"]  # read anew at each index, nothing kept
    held = Held(views)
    first = held["a"]
    held["b"], held["a"], held["b"]
    assert reads == ["a", "a", "a", "b"] and held["a"] is first
    assert set(held) == {"a", "b"} and len(held) == 2 and "a" in held


@pytest.mark.parametrize("case", ["rescaled", "rescaled-noise", "attacked-noise"])
def test_reference_views_are_mapped_per_step_not_per_neuron(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rescaled neurons are checked one at a time (their biases, statistics, consumer columns): each view mapped once per group."""
    reference_path, suspect_path = _paths(case, tmp_path)
    counts: dict[str, int] = {}
    read = lazy_module.read_array

    def reading(holder: onnx.TensorProto, text: str) -> np.ndarray:
        if text.endswith("of the reference"):
            counts[holder.name] = counts.get(holder.name, 0) + 1
        return read(holder, text)

    monkeypatch.setattr(lazy_module, "read_array", reading)
    report = onnxlady.audit(reference_path, suspect_path).report
    assert report.rescaled or report.scaled_neurons, report.summary  # neurons were checked one by one
    assert counts and max(counts.values()) <= 10, counts
