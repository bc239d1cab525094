"""The audit of inline models read as views of their file: each weight read once, aligned, same report.

A model without external data is loaded with its large weights left in the ``.onnx`` file
(:func:`onnxlady._io._external.map_inline_payloads`). The audit reads every neuron's row many
times (scale analysis, noisy scales and rescales, forensics); it must read each tensor of the
reference, the suspect and the re-synchronized suspect once (a memory map per index, and a
re-synchronized tensor moved again per index, made a 118 MB audit four times slower), as
aligned arrays (protobuf puts the bytes at any offset: numpy gathers from a misaligned array
element by element), and report what the models loaded whole give.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import onnxlady
import onnxlady._audit._lazy as lazy_module
from fixtures import build_large_model
from onnxlady._audit._lazy import LazyConstants, _plain, constants_of, resynced_constants
from onnxlady._audit._verdicts import audit_models
from onnxlady._io._external import has_mapped, is_view
from onnxlady._io._files import load_model
from onnxlady._io._tensors import tensor_holders
from onnxlady._resync._entry import resync_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2 MiB model and its twin suspect (permuted, then noise): every audit step runs on it."""
    folder = tmp_path_factory.mktemp("views")
    reference, suspect = folder / "ref.onnx", folder / "sus.onnx"
    onnx.save(build_large_model(2), reference)
    permuted = onnxlady.permute(reference, seed=3).model
    onnx.save(onnxlady.perturb(permuted, noise=0.1, seed=4).model, suspect)
    return reference, suspect


def _views(path: Path) -> onnx.ModelProto:
    model = load_model(path, map_external=True).model
    assert any(is_view(t) for t in tensor_holders(model).values())  # the case under test
    return model


def test_plain_is_a_view_when_aligned_and_an_aligned_copy_otherwise() -> None:
    values = np.arange(64, dtype=np.float32)
    assert _plain(values) is values
    buffer = np.zeros(4 * 64 + 1, dtype=np.uint8)
    misaligned = np.frombuffer(buffer.data, dtype=np.float32, count=64, offset=1)
    misaligned_values = misaligned.copy()
    assert not misaligned.flags.aligned
    copied = _plain(misaligned)
    assert copied.flags.aligned and not np.shares_memory(copied, buffer)
    assert np.array_equal(copied, misaligned_values)


def test_constants_of_views_are_read_once_as_plain_aligned_arrays(pair: tuple[Path, Path]) -> None:
    model = _views(pair[0])
    constants = constants_of(model, "reference")
    assert isinstance(constants, dict)  # not re-read at every index
    for name, values in constants.items():
        assert type(values) is np.ndarray and values.flags.aligned, name
        assert np.array_equal(values, onnx.numpy_helper.to_array(tensor_holders(onnx.load(pair[0]))[name]))


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the reads of each tensor through the audit's readers (the reference's as ``name@reference``)."""
    counts: dict[str, int] = {}
    original = lazy_module.read_array

    def read_array(holder: onnx.TensorProto, label: str) -> np.ndarray:
        key = holder.name + ("@reference" if label.endswith("of the reference") else "")
        counts[key] = counts.get(key, 0) + 1
        return original(holder, label)

    monkeypatch.setattr(lazy_module, "read_array", read_array)
    return counts


def test_resynced_views_are_computed_once_each(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    reference, suspect = _views(pair[0]), _views(pair[1])
    result = resync_model(reference, suspect)
    moved: dict[str, int] = {}
    assert result.unbuilt is not None
    overrides = result.unbuilt[1]
    for name, compute in list(overrides.items()):
        assert callable(compute)

        def counted(name: str = name, compute: Callable[[], Any] = compute) -> Any:
            moved[name] = moved.get(name, 0) + 1
            return compute()

        overrides[name] = counted
    counts = _counting(monkeypatch)
    after = resynced_constants(result)
    assert isinstance(after, LazyConstants)
    for _ in range(3):
        for name in after:
            assert after[name] is after[name]
    assert moved and set(moved.values()) == {1}
    assert counts and set(counts.values()) == {1}


def test_audit_reads_each_tensor_a_few_times_not_per_row(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the suspect's tensors were read again for every neuron row (hundreds of reads each)."""
    reference, suspect = _views(pair[0]), _views(pair[1])
    counts = _counting(monkeypatch)
    report = audit_models(reference, suspect)
    assert report.verdict == "perturbed" and report.perturbation is not None
    assert report.perturbation["kind"] == "noise"
    # Suspect, re-synchronized suspect, and that once more for the classification of the change,
    # which reads it after its kept arrays are let go (the audit's peak memory).
    suspect = {name: count for name, count in counts.items() if not name.endswith("@reference")}
    assert suspect and max(suspect.values()) <= 3
    # The reference once per step, not kept (see ReadEachTime): the identical check, two
    # similarities, the comparison, the scale analysis (a group of which the tensor is a
    # producer, one of which it is a consumer), the two searches under noise, the classification.
    reference = {name: count for name, count in counts.items() if name.endswith("@reference")}
    assert reference and max(reference.values()) <= 10


def test_audit_of_views_reports_what_a_full_load_does(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    viewed = onnxlady.audit(*pair)
    import onnxlady._api._sources as sources

    monkeypatch.setattr(sources, "load_model", functools.partial(load_model, map_inline=False))
    whole = onnxlady.audit(*pair)
    assert not has_mapped(onnx.load(pair[0]))
    assert viewed.to_json() == whole.to_json()
    assert viewed.to_markdown() == whole.to_markdown()
    assert viewed.verdict == "perturbed"
