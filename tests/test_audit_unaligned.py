"""The suspect as stored is read as views of its file, not copied: same values, same report.

The audit compares the suspect as stored with the reference whole (identical?) and samples its
rows (similarity before the resync), then lets it go. Views of an inline ``.onnx`` file start
wherever protobuf put their bytes; aligned copies of them (three quarters of a model in fresh
memory) cost their page faults. Rows of such a view are gathered as
bytes (:func:`onnxlady._audit._lazy.gather`): numpy gathers misaligned elements one by one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxlady
import onnxlady._audit._lazy as lazy_module
from fixtures import build_large_model
from onnxlady._audit._lazy import constants_of, gather
from onnxlady._audit._verdicts import audit_models
from onnxlady._io._external import is_view
from onnxlady._io._files import load_model
from onnxlady._io._tensors import tensor_holders


def _misaligned(values: np.ndarray) -> np.ndarray:
    """``values`` copied to an address its item size does not divide (as protobuf may place them)."""
    buffer = np.zeros(values.nbytes + 1, dtype=np.uint8)
    view = np.frombuffer(buffer.data, dtype=values.dtype, count=values.size, offset=1).reshape(values.shape)
    view[...] = values
    assert not view.flags.aligned
    return view


@pytest.mark.parametrize(("dtype", "shape"), [(np.float32, (6, 4, 3, 3)), (np.float16, (5, 7)), (np.float64, (3, 4, 5)), (np.int64, (9,))])
def test_gather_is_take_on_misaligned_arrays(dtype: type, shape: tuple[int, ...]) -> None:
    values = _misaligned(np.random.default_rng(0).normal(size=shape).astype(dtype))
    for axis in range(-values.ndim, values.ndim):
        indices = np.array([2, 0, 1, 0])
        taken = gather(values, indices, axis)
        expected = np.take(values, indices, axis=axis)
        assert taken.shape == expected.shape and taken.dtype == expected.dtype
        assert taken.tobytes() == expected.tobytes()
        assert taken.flags.aligned and taken.flags.c_contiguous


def test_gather_of_a_misaligned_array_moves_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The misaligned case gathers single bytes (numpy's fast path), the aligned one the elements."""
    seen: list[np.dtype] = []
    original = np.take

    def take(array: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        seen.append(array.dtype)
        return original(array, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(lazy_module.np, "take", take)
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    gather(values, np.array([1, 0]), 0)
    gather(_misaligned(values), np.array([1, 0]), 0)
    assert seen == [np.dtype(np.float32), np.dtype(np.uint8)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A 2 MiB model, its twin suspect (permuted, then noise) and an identical copy of it."""
    folder = tmp_path_factory.mktemp("unaligned")
    reference, suspect, same = folder / "ref.onnx", folder / "sus.onnx", folder / "same.onnx"
    onnx.save(build_large_model(2), reference)
    permuted = onnxlady.permute(reference, seed=3).model
    onnx.save(onnxlady.perturb(permuted, noise=0.1, seed=4).model, suspect)
    same.write_bytes(reference.read_bytes())
    return reference, suspect, same


def test_constants_as_stored_are_uncopied_views(pair: tuple[Path, Path, Path]) -> None:
    model = load_model(pair[1], map_external=True).model
    holders = tensor_holders(model)
    assert any(is_view(holder) for holder in holders.values())
    stored = constants_of(model, "suspect", aligned=False)
    loaded = tensor_holders(onnx.load(pair[1]))
    misaligned = 0
    for name, values in stored.items():
        assert np.array_equal(values, onnx.numpy_helper.to_array(loaded[name])), name
        if is_view(holders[name]):
            assert not values.flags.owndata, name  # the file's bytes, not a copy
            misaligned += not values.flags.aligned
    assert misaligned  # the case under test: protobuf placed some at odd addresses
    assert all(values.flags.aligned for values in constants_of(model, "suspect").values())


@pytest.mark.parametrize("which", [1, 2])
def test_audit_of_views_reports_what_whole_models_give(pair: tuple[Path, Path, Path], which: int) -> None:
    """The noisy twin and the identical copy (whose rows are then read aligned) as a full load reports them."""
    viewed = audit_models(load_model(pair[0], map_external=True).model, load_model(pair[which], map_external=True).model)
    whole = audit_models(onnx.load(pair[0]), onnx.load(pair[which]))
    assert viewed.verdict == whole.verdict == ("perturbed" if which == 1 else "identical")
    assert viewed.to_dict() == whole.to_dict()
    assert viewed.similarity == whole.similarity


def test_the_audit_hashes_no_moved_tensor_and_the_key_digest_is_unchanged(
    pair: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit never writes the key: its moved tensors are not hashed, yet the digest read later is the resync's."""
    from onnxlady._resync._entry import resync_model
    from onnxlady._transforms._permute import SourceDigest

    expected = resync_model(load_model(pair[0], map_external=True).model, load_model(pair[1], map_external=True).model)
    digest = expected.key.source_weights_sha256
    hashed: list[str] = []
    original = SourceDigest.add_now

    def add_now(self: SourceDigest, source: str, data: bytes | memoryview) -> None:
        hashed.append(source)
        original(self, source, data)

    monkeypatch.setattr(SourceDigest, "add_now", add_now)
    report = audit_models(load_model(pair[0], map_external=True).model, load_model(pair[1], map_external=True).model)
    assert report.verdict == "perturbed" and report.resync is not None
    assert hashed == []  # every moved tensor was read (the forensics compares them all), none hashed
    assert report.resync.key.source_weights_sha256 == digest
    assert hashed  # the digest, once read, hashed them
