"""The public Python API: one function per command, typed results, inputs never changed.

Every public function is called on fixture models, with paths and with ``onnx.ModelProto``s:
its result has the documented type, ``to_json()`` is a JSON document equal to what the command
line prints, no model (or key) given to it changes by a single byte, and bad input raises
:class:`onnxlady.OnnxladyError`. Permuting is checked with ONNX Runtime both ways: the permuted
model is equivalent, and a wrong permutation is caught.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import onnxlady
from fixtures import FIXTURES
from onnxlady.cli import main
from onnxlady.testing import constant_bytes, copy_model, permute_producer_only

COMMANDS = (
    "inspect", "permute", "unpermute", "verify", "perturb", "resync", "audit", "match",
    "embed_watermark", "extract_watermark", "demo",
)  # fmt: skip
#: A Conv layer of the vgg fixture, fed by a permutable group (so permuting scrambles its mark).
LAYER = "features.block2.conv"


@pytest.fixture(scope="module")
def vgg() -> onnx.ModelProto:
    return FIXTURES["vgg"](0)


@pytest.fixture(scope="module")
def permuted_vgg(vgg: onnx.ModelProto) -> onnxlady.PermuteResult:
    return onnxlady.permute(vgg, seed=5)


@pytest.fixture(scope="module")
def suspect(permuted_vgg: onnxlady.PermuteResult) -> onnx.ModelProto:
    """vgg, permuted and then perturbed with a little noise."""
    return onnxlady.perturb(permuted_vgg.model, noise=0.05, seed=1).model


def serialized(*models: onnx.ModelProto) -> list[bytes]:
    return [model.SerializeToString() for model in models]


def assert_json_document(result: onnxlady._api._results.Result) -> dict[str, Any]:
    """``to_json()`` is a dict that survives a strict JSON round trip (no NaN either way)."""
    document = result.to_json()
    assert isinstance(document, dict)
    assert json.loads(json.dumps(document)) == document  # JSON types only: nothing is lost on the way
    assert isinstance(result.to_text(), str) and result.to_text()
    assert result.exit_code in (0, 1)
    return document


def cli_json(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main([str(a) for a in argv] + ["--json", "--quiet"])
    return code, json.loads(capsys.readouterr().out)


# -- the public surface ----------------------------------------------------------------------
def test_every_command_is_public_and_named_after_the_package() -> None:
    for name in COMMANDS:
        assert name in onnxlady.__all__, name
    for name in onnxlady.__all__:
        assert getattr(onnxlady, name).__module__ == "onnxlady", name


@pytest.mark.parametrize("name", [*COMMANDS, "read_watermark_key"])
def test_commands_have_full_docstrings(name: str) -> None:
    doc = pyinspect.getdoc(getattr(onnxlady, name)) or ""
    for section in ("Args:", "Returns:", "Raises:"):
        assert section in doc, (name, section)
    parameters = list(pyinspect.signature(getattr(onnxlady, name)).parameters)
    for parameter in parameters:
        assert f"{parameter}:" in doc, (name, parameter)


@pytest.mark.parametrize("name", [n for n in onnxlady.__all__ if n.endswith(("Result", "Extraction"))])
def test_results_are_documented_dataclasses(name: str) -> None:
    cls = getattr(onnxlady, name)
    assert issubclass(cls, onnxlady._api._results.Result)
    doc = pyinspect.getdoc(cls) or ""
    assert "Attributes:" in doc, name
    for method in ("to_json", "to_text"):
        assert pyinspect.getdoc(getattr(cls, method)), (name, method)


# -- inputs are never changed ----------------------------------------------------------------
def _calls(
    vgg: onnx.ModelProto,
    shared: onnx.ModelProto,
    permuted: onnxlady.PermuteResult,
    suspect: onnx.ModelProto,
    marked: onnxlady.WatermarkResult,
    tmp: Path,
) -> dict[str, Callable[[], onnxlady._api._results.Result]]:
    return {
        "inspect": lambda: onnxlady.inspect(vgg),
        "permute": lambda: onnxlady.permute(vgg, seed=3),
        "permute-untie": lambda: onnxlady.permute(shared, seed=3),
        "permute-output": lambda: onnxlady.permute(shared, output=tmp / "p.onnx", verify=True, provider="cpu"),
        "permute-perms": lambda: onnxlady.permute(vgg, perms=permuted.key),
        "unpermute": lambda: onnxlady.unpermute(permuted.model, permuted.key),
        "verify": lambda: onnxlady.verify(vgg, permuted.model, provider="cpu"),
        "perturb": lambda: onnxlady.perturb(vgg, noise=0.5, quantize=6, prune=10),
        "resync": lambda: onnxlady.resync(vgg, suspect, true_key=permuted.key),
        "match": lambda: onnxlady.match(vgg, suspect),
        "audit": lambda: onnxlady.audit(vgg, suspect, canonicalize=tmp / "c.onnx"),
        "embed_watermark": lambda: onnxlady.embed_watermark(vgg, LAYER, bits=16),
        "extract_watermark": lambda: onnxlady.extract_watermark(suspect, marked.key),
        "resync-watermarked": lambda: onnxlady.resync(marked.model, onnxlady.permute(marked.model, seed=2).model),
    }


CALLS = (
    "inspect", "permute", "permute-untie", "permute-output", "permute-perms", "unpermute", "verify", "perturb",
    "resync", "match", "audit", "embed_watermark", "extract_watermark", "resync-watermarked",
)  # fmt: skip


@pytest.mark.parametrize("call", CALLS)
def test_no_function_changes_the_models_it_is_given(
    call: str, vgg: onnx.ModelProto, permuted_vgg: onnxlady.PermuteResult, suspect: onnx.ModelProto, tmp_path: Path
) -> None:
    shared = FIXTURES["shared_initializer"](0)  # permute unties a shared constant: a structural change
    marked = onnxlady.embed_watermark(vgg, LAYER, bits=16, seed=3)
    calls = _calls(vgg, shared, permuted_vgg, suspect, marked, tmp_path)
    given = [vgg, shared, permuted_vgg.model, suspect, marked.model]
    before = serialized(*given)
    key_before = json.dumps(permuted_vgg.key.to_json(), sort_keys=True)
    mark_before = (marked.key.bits.tobytes(), marked.key.projection.tobytes())
    result = calls[call]()
    assert serialized(*given) == before, f"{call} changed a model it was given"
    assert json.dumps(permuted_vgg.key.to_json(), sort_keys=True) == key_before, f"{call} changed the key"
    assert (marked.key.bits.tobytes(), marked.key.projection.tobytes()) == mark_before
    assert_json_document(result)


def test_permute_leaves_a_shared_constant_model_untouched() -> None:
    """Untying a shared constant adds initializers and rewires nodes: all of it in a copy."""
    from fixtures.deployment import build_shared_bias_untied  # a bias whose uses cannot agree

    model = build_shared_bias_untied(0)
    before = model.SerializeToString()
    result = onnxlady.permute(model, seed=1)
    assert result.untied_constants == ["shared.bias"]
    assert model.SerializeToString() == before
    assert len(result.model.graph.initializer) > len(model.graph.initializer)


def test_path_inputs_are_left_as_they_were(model_file, out_dir: Path) -> None:
    source = model_file("vgg")
    data, mtime = source.read_bytes(), os.stat(source).st_mtime_ns
    permuted = onnxlady.permute(source, output=out_dir / "p.onnx", seed=2)
    onnxlady.perturb(permuted.output, output=out_dir / "s.onnx", noise=0.3)
    onnxlady.resync(source, out_dir / "s.onnx", output=out_dir / "r.onnx", true_key=permuted.key_path)
    onnxlady.audit(source, out_dir / "s.onnx")
    assert source.read_bytes() == data and os.stat(source).st_mtime_ns == mtime


# -- permute and verify ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vgg", "resnet", "matmul_mlp", "shared_initializer"])
def test_permute_is_equivalent_and_a_wrong_permutation_is_caught(name: str) -> None:
    model = FIXTURES[name](0)
    permuted = onnxlady.permute(model, seed=4, verify=True, provider="cpu")
    assert isinstance(permuted, onnxlady.PermuteResult) and isinstance(permuted.verify, onnxlady.VerifyResult)
    assert permuted.equivalent is True and permuted.exit_code == 0
    assert permuted.permuted_groups and permuted.permuted_neurons > 0
    assert constant_bytes(permuted.model) != constant_bytes(model)
    check = onnxlady.verify(model, permuted.model, provider="cpu")
    assert check.equivalent and check.exit_code == 0 and check.max_abs_error < 1e-3

    wrong = copy_model(permuted.model)
    permute_producer_only(wrong, onnxlady.analyze(wrong))
    caught = onnxlady.verify(model, wrong, provider="cpu")
    assert not caught.equivalent and caught.exit_code == 1
    assert caught.to_json()["equivalent"] is False


def test_permute_seed_group_and_perms(vgg: onnx.ModelProto, permuted_vgg: onnxlady.PermuteResult) -> None:
    again = onnxlady.permute(vgg, seed=5)
    assert again.model.SerializeToString() == permuted_vgg.model.SerializeToString()
    assert onnxlady.permute(vgg, seed=6).model.SerializeToString() != permuted_vgg.model.SerializeToString()
    chosen = permuted_vgg.permuted_groups[1]
    one = onnxlady.permute(vgg, seed=5, group=chosen)
    assert one.permuted_groups == [chosen] and [g["id"] for g in one.key.groups] == [chosen]
    # the key's permutations, given back, reproduce the permutation (a mapping works too)
    assert onnxlady.permute(vgg, perms=permuted_vgg.key).model.SerializeToString() == again.model.SerializeToString()
    mapping = {gid: list(perm) for gid, perm in permuted_vgg.key.permutations().items()}
    assert onnxlady.permute(vgg, perms=mapping).key.permutations().keys() == mapping.keys()
    assert onnxlady.permute(vgg, perms=mapping).key.seed is None


def test_permute_path_and_proto_give_the_same_files(model_file, out_dir: Path) -> None:
    """The streaming route (path in, path out) and the in-memory one write the same model.

    (The streaming writer orders a tensor's fields its own way, so the files are compared parsed.)
    """
    source = model_file("vgg")
    streamed = onnxlady.permute(source, output=out_dir / "a.onnx", seed=9)
    in_memory = onnxlady.permute(onnx.load(str(source)), output=out_dir / "b.onnx", seed=9)
    parsed = [onnx.load(str(out_dir / f"{n}.onnx")).SerializeToString() for n in "ab"]
    assert parsed[0] == parsed[1] == in_memory.model.SerializeToString()
    key_a, key_b = (json.loads((out_dir / f"{n}.onnx.key.json").read_text()) for n in "ab")
    assert key_a["source"]["file"] == "vgg.onnx" and key_b["source"]["file"] == ""
    assert key_a["permuted"].pop("sha256") == streamed.key.permuted_sha256  # the files' own bytes differ
    key_b["permuted"].pop("sha256")
    key_a["source"]["file"] = ""
    assert key_a == key_b
    assert streamed.key_path == out_dir / "a.onnx.key.json" and streamed.output == out_dir / "a.onnx"
    assert streamed._model is None  # streamed to disk, never held whole
    assert streamed.model.SerializeToString() == parsed[0]
    assert in_memory.to_json()["model"] is None and streamed.to_json()["model"] == str(source)


def test_permute_save_and_unpermute_round_trip(vgg: onnx.ModelProto, tmp_path: Path) -> None:
    result = onnxlady.permute(vgg, seed=2)
    assert result.output is None and result.key_path is None
    key = result.save(tmp_path / "p.onnx")
    assert sorted(os.listdir(tmp_path)) == ["p.onnx", "p.onnx.key.json"]
    assert key.permuted_sha256 and key.permuted_sha256 != result.key.permuted_sha256
    restored = onnxlady.unpermute(tmp_path / "p.onnx", tmp_path / "p.onnx.key.json", output=tmp_path / "u.onnx")
    assert isinstance(restored, onnxlady.UnpermuteResult)
    assert restored.weights_identical_to_source and restored.output_identical_to_source_file
    assert (tmp_path / "u.onnx").read_bytes() == vgg.SerializeToString()
    in_memory = onnxlady.unpermute(result.model, result.key)
    assert in_memory.output is None and in_memory.output_identical_to_source_file is None
    assert in_memory.save(tmp_path / "v.onnx") == restored.output_sha256
    assert assert_json_document(in_memory)["weights_identical_to_source"] is True


def test_permute_verify_failure_leaves_nothing(model_file, out_dir: Path, monkeypatch) -> None:
    import onnxlady._api._permute as api_permute

    def broken(*args: object, **kwargs: object) -> None:
        raise onnxlady.OnnxladyError("ONNX Runtime cannot run this")

    monkeypatch.setattr(api_permute, "_run_verify", broken)
    with pytest.raises(onnxlady.OnnxladyError):
        onnxlady.permute(model_file("vgg"), output=out_dir / "p.onnx", verify=True)
    assert os.listdir(out_dir) == []


def test_verify_inputs_ranges_files_and_scripts(vgg: onnx.ModelProto, permuted_vgg: onnxlady.PermuteResult,
                                                tmp_path: Path) -> None:  # fmt: skip
    """The check's feeds: value ranges (command-line strings or a mapping), a .npz file, a script."""
    for val_range, rule in ((["input:[0,0.5]"], "value-range"), ({"input": (0, 0.5)}, "value-range"),
                            ("[0,0.5]", "uniform")):  # fmt: skip
        check = onnxlady.verify(vgg, permuted_vgg.model, provider="cpu", val_range=val_range)
        (record,) = check.report.inputs
        assert check.equivalent and (record.rule, record.low, record.high) == (rule, 0.0, 0.5), val_range
    feeds = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "feeds.npz", input=feeds)
    loaded = onnxlady.verify(vgg, permuted_vgg.model, provider="cpu", load_inputs=tmp_path / "feeds.npz")
    assert loaded.equivalent and loaded.report.inputs[0].rule == "loaded"
    assert loaded.report.inputs[0].high == float(feeds.max())
    script = tmp_path / "feeds.py"
    script.write_text("import numpy as np\n\ndef feeds():\n    return [{'input': np.ones((1, 3, 32, 32), np.float32)}]\n")
    scripted = onnxlady.permute(vgg, seed=1, verify=True, provider="cpu", data_loader_script=f"{script}:feeds")
    assert scripted.equivalent and scripted.verify.report.inputs[0].rule == "script"
    wrong = copy_model(permuted_vgg.model)
    permute_producer_only(wrong, onnxlady.analyze(wrong))
    assert not onnxlady.verify(vgg, wrong, provider="cpu", load_inputs=tmp_path / "feeds.npz").equivalent


# -- the other commands ----------------------------------------------------------------------
def test_inspect(model_file, tmp_path: Path, vgg: onnx.ModelProto) -> None:
    path = model_file("resnet")
    result = onnxlady.inspect(path, dot=tmp_path / "g.dot", members=True)
    assert isinstance(result, onnxlady.InspectResult) and isinstance(result.analysis, onnxlady.ChannelAnalysis)
    assert result.sha256 and result.source == path
    assert (tmp_path / "g.dot").read_text().startswith("digraph")
    document = assert_json_document(result)
    assert document["summary"]["groups"] == len(result.groups) > 0
    assert "members / reasons" in result.to_text() and " at " in result.to_text()  # --members lists every member
    memory = onnxlady.inspect(onnx.load(str(path)))
    assert memory.sha256 is None and memory.to_json()["groups"] == document["groups"]


def test_perturb(vgg: onnx.ModelProto, model_file, out_dir: Path) -> None:
    result = onnxlady.perturb(vgg, noise=1.0, seed=3)
    assert isinstance(result, onnxlady.PerturbResult) and isinstance(result.report, onnxlady.PerturbReport)
    assert result.changes and all(isinstance(c, onnxlady.TensorChange) for c in result.changes)
    assert constant_bytes(result.model) != constant_bytes(vgg)
    from_file = onnxlady.perturb(model_file("vgg"), output=out_dir / "s.onnx", noise=1.0, seed=3)
    assert (out_dir / "s.onnx").read_bytes() == result.model.SerializeToString()
    assert from_file.to_json()["changes"] == result.to_json()["changes"]
    result.save(out_dir / "t.onnx")
    assert (out_dir / "t.onnx").read_bytes() == (out_dir / "s.onnx").read_bytes()


def test_resync_recovers_the_order(
    vgg: onnx.ModelProto, permuted_vgg: onnxlady.PermuteResult, suspect: onnx.ModelProto, tmp_path: Path
) -> None:
    result = onnxlady.resync(vgg, suspect, true_key=permuted_vgg.key)
    assert isinstance(result, onnxlady.ResyncResult) and result.psi == 100.0
    assert all(isinstance(g, onnxlady.GroupResync) for g in result.groups)
    assert onnxlady.verify(suspect, result.model, provider="cpu").equivalent
    result.save(tmp_path / "r.onnx", key_out=tmp_path / "r.key.json")
    assert sorted(os.listdir(tmp_path)) == ["r.key.json", "r.onnx"]
    assert onnxlady.read_key(tmp_path / "r.key.json").permutations().keys() == result.key.permutations().keys()
    # the recovered key's source is the output and its permuted model the suspect
    assert onnxlady.unpermute(suspect, result.key).model.SerializeToString() == result.model.SerializeToString()
    assert assert_json_document(result)["psi"] == 100.0


def test_match_and_audit(vgg: onnx.ModelProto, permuted_vgg: onnxlady.PermuteResult, suspect: onnx.ModelProto,
                         tmp_path: Path) -> None:  # fmt: skip
    paired = onnxlady.match(vgg, permuted_vgg.model)
    assert isinstance(paired, onnxlady.MatchResult) and isinstance(paired.details, onnxlady.ModelMatch)
    assert paired.complete and paired.exit_code == 0 and paired.groups
    assert paired.confidence == 1.0
    with pytest.raises(onnxlady.OnnxladyError, match="different models"):  # another architecture
        onnxlady.match(vgg, FIXTURES["resnet"](0))

    clean = onnxlady.audit(vgg, permuted_vgg.model)
    assert isinstance(clean, onnxlady.AuditResult) and clean.verdict == "permuted" and clean.exit_code == 0
    noisy = onnxlady.audit(vgg, suspect, html=tmp_path / "a.html", markdown=tmp_path / "a.md")
    assert noisy.verdict == "perturbed" and noisy.exit_code == 1
    assert (tmp_path / "a.md").read_text() == noisy.to_markdown() == noisy.to_text()
    assert (tmp_path / "a.html").read_text().lstrip().lower().startswith("<!doctype html")
    assert assert_json_document(noisy)["verdict"] == "perturbed"
    canonical = clean.canonical_model()
    assert onnxlady.verify(vgg, canonical, provider="cpu").equivalent


def test_watermark_embed_and_extract(vgg: onnx.ModelProto, tmp_path: Path) -> None:
    marked = onnxlady.embed_watermark(vgg, LAYER, bits=24, seed=7)
    assert isinstance(marked, onnxlady.WatermarkResult) and isinstance(marked.key, onnxlady.WatermarkKey)
    assert marked.bits == 24 and marked.relative_output_change < 0.1
    assert onnxlady.extract_watermark(marked.model, marked.key).bit_error_rate == 0.0
    assert onnxlady.extract_watermark(vgg, marked.key).bit_error_rate > 0.0
    marked.save(tmp_path / "w.onnx", key_out=tmp_path / "w.npz")
    read = onnxlady.extract_watermark(tmp_path / "w.onnx", tmp_path / "w.npz")
    assert isinstance(read, onnxlady.WatermarkExtraction) and read.bit_error_rate == 0.0 and read.bits.size == 24
    assert onnxlady.read_watermark_key(tmp_path / "w.npz").layer == LAYER
    # permuting the group feeding the layer scrambles the mark; resync restores it
    stolen = onnxlady.permute(marked.model, seed=3).model
    assert onnxlady.extract_watermark(stolen, marked.key).bit_error_rate > 0.1
    fixed = onnxlady.resync(marked.model, stolen).model
    assert onnxlady.extract_watermark(fixed, marked.key).bit_error_rate == 0.0


def test_demo(tmp_path: Path) -> None:
    result = onnxlady.demo(workdir=tmp_path / "demo")
    assert isinstance(result, onnxlady.DemoResult) and result.ok and result.exit_code == 0
    assert len(result.lines) == 8 and result.psi_hungarian == 100.0 and result.wrong_permutation_caught
    assert (tmp_path / "demo" / "demo.resynced.onnx").exists()
    assert assert_json_document(result)["lines"] == result.lines


# -- the same documents as the command line --------------------------------------------------
def test_to_json_is_what_the_cli_prints(capsys, model_file, out_dir: Path) -> None:
    source = model_file("vgg")
    code, document = cli_json(capsys, "inspect", source)
    assert code == 0 and document == onnxlady.inspect(source).to_json()
    code, document = cli_json(capsys, "permute", source, "-o", out_dir / "p.onnx", "--seed", 4)
    expected = onnxlady.permute(source, output=out_dir / "q.onnx", seed=4).to_json()
    assert code == 0 and {**document, "output": None, "key": None} == {**expected, "output": None, "key": None}
    code, document = cli_json(capsys, "verify", source, out_dir / "p.onnx", "--provider", "cpu")
    assert code == 0 and document == onnxlady.verify(source, out_dir / "p.onnx", provider="cpu").to_json()
    code, document = cli_json(capsys, "match", source, out_dir / "p.onnx")
    assert code == 0 and document == onnxlady.match(source, out_dir / "p.onnx").to_json()
    code, document = cli_json(capsys, "audit", source, out_dir / "p.onnx")
    assert code == 0 and document == onnxlady.audit(source, out_dir / "p.onnx").to_json()


# -- errors ----------------------------------------------------------------------------------
def _bad_calls(vgg: onnx.ModelProto, permuted: onnxlady.PermuteResult, tmp: Path) -> dict[str, Callable[[], Any]]:
    not_a_model = tmp / "bad.onnx"
    not_a_model.write_bytes(b"\x08\x07 definitely not a model")
    resnet = FIXTURES["resnet"](0)
    return {
        "inspect-missing": lambda: onnxlady.inspect(tmp / "absent.onnx"),
        "inspect-not-onnx": lambda: onnxlady.inspect(not_a_model),
        "inspect-wrong-type": lambda: onnxlady.inspect(42),  # type: ignore[arg-type]
        "permute-unknown-group": lambda: onnxlady.permute(vgg, group="g999"),
        "permute-negative-seed": lambda: onnxlady.permute(vgg, seed=-1),
        "permute-bad-perms": lambda: onnxlady.permute(vgg, perms={permuted.permuted_groups[0]: [0, 0]}),
        "permute-bad-check": lambda: onnxlady.permute(vgg, output=tmp / "p.onnx", verify=True, iterations=0),
        "permute-bad-shape": lambda: onnxlady.permute(vgg, verify=True, shape=["input:1xbad"]),
        "permute-bad-val-range": lambda: onnxlady.permute(vgg, output=tmp / "p.onnx", verify=True, val_range="[1,0]"),
        "verify-missing-inputs": lambda: onnxlady.verify(vgg, vgg, load_inputs=tmp / "absent.npz"),
        "permute-output-missing-folder": lambda: onnxlady.permute(vgg, output=tmp / "missing" / "p.onnx"),
        "unpermute-other-model": lambda: onnxlady.unpermute(resnet, permuted.key),
        "unpermute-missing-key": lambda: onnxlady.unpermute(permuted.model, tmp / "absent.json"),
        "verify-different-models": lambda: onnxlady.verify(vgg, FIXTURES["matmul_mlp"](0), provider="cpu"),
        "verify-negative-atol": lambda: onnxlady.verify(vgg, vgg, atol=-1.0),
        "perturb-nothing": lambda: onnxlady.perturb(vgg),
        "perturb-bad-noise": lambda: onnxlady.perturb(vgg, noise=-1.0),
        "resync-other-architecture": lambda: onnxlady.resync(vgg, resnet),
        "resync-unknown-method": lambda: onnxlady.resync(vgg, permuted.model, method="magic"),
        "audit-negative-rtol": lambda: onnxlady.audit(vgg, permuted.model, rtol=-1.0),
        "audit-canonicalize-identical": lambda: onnxlady.audit(vgg, vgg, canonicalize=tmp / "c.onnx"),
        "embed-unknown-layer": lambda: onnxlady.embed_watermark(vgg, "nope"),
        "extract-not-a-key": lambda: onnxlady.extract_watermark(vgg, not_a_model),
    }


BAD_CALLS = (
    "inspect-missing", "inspect-not-onnx", "inspect-wrong-type", "permute-unknown-group", "permute-negative-seed",
    "permute-bad-perms", "permute-bad-check", "permute-bad-shape", "permute-bad-val-range", "verify-missing-inputs",
    "permute-output-missing-folder",
    "unpermute-other-model", "unpermute-missing-key", "verify-different-models", "verify-negative-atol",
    "perturb-nothing", "perturb-bad-noise", "resync-other-architecture", "resync-unknown-method",
    "audit-negative-rtol", "audit-canonicalize-identical", "embed-unknown-layer", "extract-not-a-key",
)  # fmt: skip


@pytest.mark.parametrize("call", BAD_CALLS)
def test_bad_input_raises_onnxlady_error_and_writes_nothing(
    call: str, vgg: onnx.ModelProto, permuted_vgg: onnxlady.PermuteResult, tmp_path: Path
) -> None:
    calls = _bad_calls(vgg, permuted_vgg, tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(onnxlady.OnnxladyError):
        calls[call]()
    assert sorted(os.listdir(tmp_path)) == before


def test_outputs_never_overwrite_inputs(model_file) -> None:
    source = model_file("vgg")
    data = source.read_bytes()
    with pytest.raises(onnxlady.OnnxladyError, match="refusing to overwrite an input file"):
        onnxlady.permute(source, output=source)
    with pytest.raises(onnxlady.OnnxladyError, match="refusing to overwrite an input file"):
        onnxlady.audit(source, source, html=source)
    assert source.read_bytes() == data
    result = onnxlady.permute(source, output=source, overwrite_input=True)
    assert source.read_bytes() != data and result.key_path == source.with_name("vgg.onnx.key.json")
    assert list(result.key.permutations()) == result.permuted_groups
