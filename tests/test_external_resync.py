"""Resync and audit of models stored with external data: weights read on demand, same results.

``onnxlady.resync`` and ``onnxlady.audit`` leave a file's external weights in their files
(:func:`onnxlady._io._external.map_external_data`); the twin solver then reads each tensor when
a group needs it (:mod:`onnxlady._resync._mapped`) and the output is written tensor by tensor.
Everything they report and write must be what the same models loaded whole give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import onnxlady
import onnxlady._resync._twin as twin_module
from fixtures import FIXTURES, save_large_external_model
from onnxlady._io._external import has_mapped
from onnxlady._io._files import load_model
from onnxlady._io._tensors import FloatConstants, read_array, tensor_holders
from onnxlady._resync._mapped import AlignedArrays, MappedState, StoredArrays
from onnxlady._resync._match import analyze_with_state
from onnxlady._resync._solver import ResyncOptions, ResyncState, group_slices
from onnxlady._resync._twin import twin_leaves
from onnxlady.testing import permute_producer_only


def _values(model: onnx.ModelProto) -> dict[str, bytes]:
    return {name: np.array(read_array(t, name)).tobytes() for name, t in tensor_holders(model).items()}


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A generated external-data model and three suspects of it, all with external data."""
    folder = tmp_path_factory.mktemp("external_resync")
    reference = folder / "ref.onnx"
    save_large_external_model(reference, 4)
    permuted = folder / "permuted.onnx"
    onnxlady.permute(reference, output=permuted, seed=4, external_data=True)
    noisy = folder / "noisy.onnx"
    onnxlady.perturb(permuted, output=noisy, noise=0.5, seed=1, external_data=True)
    wrong = onnx.load(permuted)  # a wrong permutation: one producer's rows moved, nothing else
    permute_producer_only(wrong, onnxlady.analyze(wrong))
    return {
        "reference": reference,
        "permuted": permuted,
        "noisy": noisy,
        "wrong": _save_external(wrong, folder / "wrong.onnx"),
    }


def _without_paths(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k not in ("reference", "suspect", "output", "key")}


@pytest.mark.parametrize("suspect", ["permuted", "noisy", "wrong"])
def test_resync_of_external_data_equals_resync_of_loaded_models(
    models: dict[str, Path], suspect: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states: list[type] = []
    real = twin_module.MappedState

    def spy(*args: Any, **kwargs: Any) -> MappedState:
        states.append(real)
        return real(*args, **kwargs)

    monkeypatch.setattr(twin_module, "MappedState", spy)
    reference, path = models["reference"], models[suspect]
    mapped = onnxlady.resync(reference, path, output=tmp_path / "e.onnx", key_out=tmp_path / "e.key.json")
    assert states, "the weights were not read on demand"
    loaded = onnxlady.resync(onnx.load(reference), onnx.load(path))
    assert len(states) == 1  # models given in memory hold their weights: the usual route
    assert _without_paths(mapped.to_json()) == _without_paths(loaded.to_json())
    assert mapped.key.source_weights_sha256 == loaded.key.source_weights_sha256
    assert mapped.key.groups == loaded.key.groups
    written = onnx.load(tmp_path / "e.onnx")
    assert _values(written) == _values(loaded.model)
    assert not has_mapped(mapped.model) and _values(mapped.model) == _values(loaded.model)
    # The output is written with external data, relative to itself, like its suspect.
    stored = onnx.load(tmp_path / "e.onnx", load_external_data=False)
    locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"e.onnx.data"}
    if suspect == "permuted":  # put back bit for bit; unpermute with the key gives the output
        assert _values(written) == _values(onnx.load(reference))
        restored = onnxlady.unpermute(path, tmp_path / "e.key.json", output=tmp_path / "u.onnx")
        assert restored.weights_identical_to_source
    if suspect == "wrong":  # one producer's rows swapped alone cannot be put back
        assert _values(written) != _values(onnx.load(reference))


@pytest.mark.parametrize("suspect", ["permuted", "noisy", "wrong"])
def test_audit_of_external_data_equals_audit_of_loaded_models(models: dict[str, Path], suspect: str) -> None:
    reference, path = models["reference"], models[suspect]
    mapped = onnxlady.audit(reference, path)
    loaded = onnxlady.audit(onnx.load(reference), onnx.load(path))
    assert _without_paths(mapped.to_json()) == _without_paths(loaded.to_json())
    expected = {"permuted": "permuted", "noisy": "perturbed", "wrong": None}[suspect]
    if expected is None:
        assert mapped.verdict not in ("identical", "permuted") and mapped.exit_code == 1
    else:
        assert mapped.verdict == expected


def test_across_conversions_of_external_data(models: dict[str, Path], tmp_path: Path) -> None:
    """A suspect that is no twin is read in whole (matching across conversions permutes copies)."""
    from onnx import numpy_helper

    converted = onnx.load(models["permuted"])
    for tensor in converted.graph.initializer:  # a float64 copy: another storage, the same values
        if tensor.data_type == onnx.TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for node in converted.graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT:
                attribute.i = onnx.TensorProto.DOUBLE
    converted.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    converted.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    path = _save_external(converted, tmp_path / "f64.onnx")
    mapped = onnxlady.resync(models["reference"], path, output=tmp_path / "out.onnx")
    loaded = onnxlady.resync(onnx.load(models["reference"]), onnx.load(path))
    assert mapped.details.across is not None
    assert _without_paths(mapped.to_json()) == _without_paths(loaded.to_json())
    assert _values(onnx.load(tmp_path / "out.onnx")) == _values(loaded.model)


@pytest.mark.parametrize(
    "name", ["vgg", "resnet", "concat", "grouped_conv", "channel_shuffle", "bert_like", "float16_convnet"]
)
def test_work_arrays_computed_from_the_matches_equal_the_moved_ones(name: str) -> None:
    """What AlignedArrays computes in one gather is what the solver's chain of gathers holds."""
    reference = FIXTURES[name](0)
    suspect = onnxlady.perturb(onnxlady.permute(reference, seed=2).model, noise=0.3, seed=3).model
    analysis = analyze_with_state(reference)
    leaves = twin_leaves(analysis, suspect)
    order = analysis.permutable_groups
    ref_values, sus_values = FloatConstants(reference, "reference"), FloatConstants(suspect, "suspect")

    def state(lazy: bool) -> ResyncState:
        slices, touched = group_slices(analysis, {g.id for g in order})
        common: dict[str, Any] = {"analysis": analysis, "order": order, "slices": slices, "touched": touched}
        options = ResyncOptions(refine=True)
        if not lazy:
            return ResyncState(
                **common, options=options,
                reference=[ref_values.array(p.source) for p in analysis.tensors],
                work=[sus_values.array(n[0]) for n in leaves],
            )  # fmt: skip
        return MappedState(
            **common, options=options,
            reference=StoredArrays(len(analysis.tensors), lambda i: ref_values.array(analysis.tensors[i].source)),
            work=AlignedArrays(len(leaves), lambda i: sus_values.array(leaves[i][0]), analysis),
        )  # fmt: skip

    eager, lazy = state(False), state(True)
    assert eager.run(None) == lazy.run(None)
    assert any(not np.array_equal(m, np.arange(m.size)) for m in eager.match.values())  # something moved
    assert eager.match.keys() == lazy.match.keys()
    assert all(np.array_equal(eager.match[g], lazy.match[g]) for g in eager.match)
    assert len(lazy.work) == len(eager.work)
    for number, array in enumerate(eager.work):
        computed = lazy.work[number]
        assert computed.dtype == array.dtype and np.array_equal(computed, array), analysis.tensors[number].source
    assert [s.margins.tolist() for s in eager.stats.values()] == [s.margins.tolist() for s in lazy.stats.values()]


def test_stored_arrays_index_like_a_list() -> None:
    arrays = [np.full(2, i) for i in range(3)]
    stored = StoredArrays(3, lambda i: arrays[i])
    assert len(stored) == 3 and stored[-1] is arrays[2] and [a[0] for a in stored] == [0, 1, 2]
    assert [a[0] for a in stored[1:]] == [1, 2]
    with pytest.raises(IndexError):
        stored[3]


def test_mapped_models_keep_their_weights_in_their_files(models: dict[str, Path]) -> None:
    loaded = load_model(models["reference"], map_external=True).model
    assert has_mapped(loaded)
    before = loaded.SerializeToString()
    onnxlady.resync(loaded, load_model(models["permuted"], map_external=True).model)
    assert loaded.SerializeToString() == before  # never changed, never read into the model


def test_resync_over_its_own_external_suspect(models: dict[str, Path], tmp_path: Path) -> None:
    """The output replaces the data file the suspect is read from: the result still holds the right weights."""
    suspect = _save_external(onnx.load(models["permuted"]), tmp_path / "sus.onnx")
    result = onnxlady.resync(models["reference"], suspect, output=suspect, overwrite_input=True)
    expected = _values(onnx.load(models["reference"]))
    assert _values(onnx.load(suspect)) == expected
    assert _values(result.model) == expected


def test_max_memory_of_an_external_twin_follows_its_largest_group(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnxlady._api._memory import BASELINE_BYTES, largest_group, pair_peak
    from onnxlady.cli import main

    reference, suspect = models["reference"], models["permuted"]
    group = largest_group(analyze_with_state(load_model(reference, map_external=True).model))
    twin = pair_peak("resync", [reference, suspect], twin=True, group=group)
    across = pair_peak("resync", [reference, suspect], twin=False)
    assert BASELINE_BYTES < twin < across
    # Between the two estimates: a twin of external-data models runs, no longer refused.
    budget = (twin + across) // 2
    result = onnxlady.resync(reference, suspect, output=tmp_path / "out.onnx", max_memory=budget)
    assert _values(result.model) == _values(onnx.load(reference))
    with pytest.raises(onnxlady.OnnxladyError, match=r"max_memory.*nothing was done"):
        onnxlady.resync(reference, suspect, output=tmp_path / "refused.onnx", max_memory=twin - 1)
    assert not (tmp_path / "refused.onnx").exists()
    out = str(tmp_path / "cli.onnx")
    assert main(["resync", str(reference), str(suspect), "-o", out, "--max-memory", "1M", "--quiet"]) == 2
    assert "max_memory" in capsys.readouterr().err and not Path(out).exists()
    assert main(["resync", str(reference), str(suspect), "-o", out, "--max-memory", "lots", "--quiet"]) == 2


@pytest.mark.parametrize("external", ["reference", "suspect"])
def test_resync_with_one_model_stored_externally(models: dict[str, Path], external: str, tmp_path: Path) -> None:
    """One model's weights read on demand, the other's held in its file: the same output."""
    paths = {"reference": models["reference"], "suspect": models["noisy"]}
    inline = tmp_path / "inline.onnx"
    onnx.save(onnx.load(paths["suspect" if external == "reference" else "reference"]), inline)
    reference = paths["reference"] if external == "reference" else inline
    suspect = inline if external == "reference" else paths["suspect"]
    mapped = onnxlady.resync(reference, suspect, output=tmp_path / "out.onnx")
    loaded = onnxlady.resync(onnx.load(reference), onnx.load(suspect))
    assert _without_paths(mapped.to_json()) == _without_paths(loaded.to_json())
    assert mapped.key.source_weights_sha256 == loaded.key.source_weights_sha256
    assert _values(onnx.load(tmp_path / "out.onnx")) == _values(loaded.model)


def test_max_memory_of_an_external_twin_audit_follows_its_largest_tensors(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audit of an external-data twin reads its constants from their files (held-out F11:
    it was estimated at 10 times both models, refusing budgets it fits in)."""
    from onnxlady._api._memory import FORENSICS_LARGEST, largest_group, pair_peak
    from onnxlady.cli import main

    reference, suspect = models["reference"], models["permuted"]
    group = largest_group(analyze_with_state(load_model(reference, map_external=True).model))
    audit = pair_peak("audit", [reference, suspect], twin=True, group=group)
    assert pair_peak("resync", [reference, suspect], twin=True, group=group) < audit and FORENSICS_LARGEST > 0
    inline = pair_peak("audit", [reference, suspect], twin=True, group=group, inline_moved=True)
    assert audit < inline
    budget = (audit + inline) // 2  # refused before: the inline estimate is above it
    assert onnxlady.audit(reference, suspect, max_memory=budget).verdict == "permuted"
    with pytest.raises(onnxlady.OnnxladyError, match=r"audit needs about .* nothing was done"):
        onnxlady.audit(reference, suspect, max_memory=audit - 1)
    html = tmp_path / "report.html"
    assert main(["audit", str(reference), str(suspect), "--html", str(html), "--max-memory", "1M", "--quiet"]) == 2
    assert "max_memory" in capsys.readouterr().err and not html.exists()
