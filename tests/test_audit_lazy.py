"""The audit of models stored with external data reads their weights on demand, with the same report.

:mod:`onnxlady._audit._lazy`: the reference's constants, the suspect's and the re-synchronized
suspect's are read (or computed from the suspect's file and the match) when the audit indexes
them, never all held; every verdict and finding must be what the same models loaded whole give.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxlady
import onnxlady._audit._verdicts as verdicts_module
import onnxlady._io._external as external_module
from fixtures import FIXTURES
from onnxlady._analysis._channels import analyze
from onnxlady._audit._lazy import LazyConstants, Overlay, constants_of, resynced_constants
from onnxlady._audit._verdicts import audit_models
from onnxlady._io._files import load_model
from onnxlady._io._tensors import read_constants, tensor_holders
from onnxlady._resync._entry import resync_model
from onnxlady._transforms._permute import draw_permutations, permute_model
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import copy_model, permute_producer_only


def _permute(model: onnx.ModelProto, seed: int = 1) -> onnx.ModelProto:
    analysis = analyze(model)
    permute_model(analysis, draw_permutations(analysis, seed))
    return model


def _edit(model: onnx.ModelProto, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    holder = tensor_holders(model)[name]
    values = numpy_helper.to_array(holder).copy()
    holder.CopyFrom(numpy_helper.from_array(fn(values).astype(np.float32), name))


def _rescaled(model: onnx.ModelProto) -> onnx.ModelProto:
    scales = np.random.default_rng(0).uniform(0.5, 2.0, 32).astype(np.float32)
    _edit(model, "features.block2.conv.weight", lambda v: v * scales[:, None, None, None])
    _edit(model, "features.block2.conv.bias", lambda v: v * scales)
    _edit(model, "features.block3.conv.weight", lambda v: v / scales[None, :, None, None])
    return model


def _attacked(model: onnx.ModelProto) -> onnx.ModelProto:
    def scale(values: np.ndarray) -> np.ndarray:
        values[[2, 5, 11]] *= 1.5
        return values

    _edit(model, "features.block2.conv.weight", scale)
    return model


def _noisy(model: onnx.ModelProto, **kwargs: Any) -> onnx.ModelProto:
    perturb_model(model, seed=3, **kwargs)
    return model


def _wrong(model: onnx.ModelProto) -> onnx.ModelProto:
    permute_producer_only(model, analyze(model))
    return model


#: Suspect builders (from a copy of the reference) and the verdict each must get.
SUSPECTS: dict[str, tuple[str, Callable[[onnx.ModelProto], onnx.ModelProto], str | None]] = {
    "identical": ("vgg", lambda m: m, "identical"),
    "permuted": ("resnet", _permute, "permuted"),
    "rescaled": ("vgg", lambda m: _permute(_rescaled(m)), "permuted-rescaled"),
    "attacked": ("vgg", lambda m: _permute(_attacked(m)), "scaled"),
    "rescaled-noise": ("vgg", lambda m: _noisy(_permute(_rescaled(m)), noise=0.05), "perturbed"),
    "attacked-noise": ("vgg", lambda m: _noisy(_permute(_attacked(m)), noise=0.05), None),
    "quantized": ("resnet", lambda m: _noisy(_permute(m), quantize_bits=6), "perturbed"),
    "pruned": ("resnet", lambda m: _noisy(_permute(m), prune_percent=50), "perturbed"),
    "wrong": ("resnet", lambda m: _wrong(_permute(m)), None),
}


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(
        copy_model(model), path, save_as_external_data=True, all_tensors_to_one_file=True,
        location=path.name + ".data", size_threshold=0,
    )  # fmt: skip
    return path


@pytest.fixture(autouse=True)
def _map_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixtures' tensors are small: map every one of at least 1 KB, as large ones are."""
    monkeypatch.setattr(external_module, "INLINE_BYTES", 1024)


@pytest.mark.parametrize("case", sorted(SUSPECTS))
def test_external_twin_audit_equals_inline_audit(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, build, verdict = SUSPECTS[case]
    reference = FIXTURES[name](0)
    suspect = build(copy_model(reference))
    inline = audit_models(reference, suspect)
    reference_path = _save_external(reference, tmp_path / "ref.onnx")
    suspect_path = _save_external(suspect, tmp_path / "sus.onnx")
    assert all(
        isinstance(constants_of(load_model(p, map_external=True).model, "x"), LazyConstants)
        for p in (reference_path, suspect_path)
    ), "the weights were not left in their files"

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the re-synchronized suspect was built whole")

    monkeypatch.setattr(verdicts_module, "_resynced_constants", refused)
    external = onnxlady.audit(reference_path, suspect_path).report
    assert external.to_dict() == inline.to_dict()
    assert external.similarity == inline.similarity
    if external.resync is not None:
        assert external.resync.built is None  # compared tensor by tensor, the model never built
    if verdict is None:
        assert external.exit_code == 1 and external.verdict not in ("identical", "permuted")
    else:
        assert external.verdict == verdict, external.summary
    if case == "wrong":  # a wrong permutation is caught the same way inline
        assert inline.differing_tensors and external.differing_tensors == inline.differing_tensors


def test_resynced_constants_are_those_of_the_built_model(tmp_path: Path) -> None:
    reference = FIXTURES["resnet"](0)
    suspect = _permute(copy_model(reference), seed=5)
    models = [
        load_model(_save_external(m, tmp_path / f"{n}.onnx"), map_external=True).model
        for n, m in (("r", reference), ("s", suspect))
    ]
    result = resync_model(*models)
    lazy = resynced_constants(result)
    assert isinstance(lazy, LazyConstants)
    built = read_constants(result.model, "resynced")
    assert list(lazy) == list(built)
    moved = [n for n in built if not np.array_equal(built[n], read_constants(models[1], "s")[n])]
    assert moved, "nothing moved: the test would not tell a wrong gather"
    for n, values in built.items():
        assert lazy[n].dtype == values.dtype and np.array_equal(lazy[n], values), n
    # Inline models keep their arrays in memory: nothing to compute on demand.
    assert resynced_constants(resync_model(reference, suspect)) is None
    assert isinstance(constants_of(reference, "reference"), dict)


def test_lazy_constants_read_when_indexed_and_keep_only_the_last() -> None:
    calls: list[str] = []

    def loader(name: str) -> Callable[[], np.ndarray]:
        return lambda: calls.append(name) or np.full(2, len(calls))  # type: ignore[func-returns-value]

    lazy = LazyConstants({"a": loader("a"), "b": loader("b")}, keep_last=True)
    assert "a" in lazy and "c" not in lazy and len(lazy) == 2 and list(lazy) == ["a", "b"]
    assert not calls  # in, len and iteration read nothing
    assert lazy["a"][0] == 1 and lazy["a"][0] == 1 and calls == ["a"]  # the last one kept
    assert lazy["b"][0] == 2 and lazy["a"][0] == 3 and calls == ["a", "b", "a"]  # not two
    plain = LazyConstants({"a": loader("a")})
    plain["a"], plain["a"]
    assert calls[3:] == ["a", "a"]
    with pytest.raises(KeyError):
        lazy["c"]


def test_overlay_leaves_its_base_alone() -> None:
    base = {"a": np.zeros(2), "b": np.ones(2)}
    overlay = Overlay(base)
    overlay["b"] = np.full(2, 5.0)
    overlay["c"] = np.full(2, 7.0)
    assert list(overlay) == list({**base, "b": 0, "c": 0}) and len(overlay) == 3
    assert overlay["b"][0] == 5 and base["b"][0] == 1 and "c" not in base
    copied = overlay.copy()
    copied["a"] = np.full(2, 9.0)
    assert overlay["a"][0] == 0 and copied["a"][0] == 9 and copied["b"][0] == 5
    del overlay["c"]
    assert "c" not in overlay and "c" in copied
    with pytest.raises(KeyError):
        del overlay["a"]
