"""The ``onnxlady`` command line: exit codes, one-line errors, --json, atomic outputs.

Standards checked on every call made through :func:`cli`: the input files named on the command
line keep their bytes and mtime (unless ``--overwrite-input``). Every exit-2 case goes through
:func:`assert_usage_error`: exactly one non-empty line on stderr, no traceback anywhere and
nothing (not even a temporary file) left in the output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxlady.cli import main

REPO = Path(__file__).resolve().parents[1]
#: Options whose value names a file the command writes, not one it reads.
_OUTPUT_OPTIONS = {"-o", "--output", "--key-out", "--dot", "--workdir"}


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch) -> None:
    monkeypatch.delenv("ONNXLADY_DEBUG", raising=False)


@pytest.fixture
def cli(capsys):
    """``cli("permute", path, "-o", out)`` runs ``onnxlady.cli.main`` in-process."""

    def run(*argv: object) -> Result:
        args = [str(a) for a in argv]
        inputs = {}
        for index, arg in enumerate(args):
            if index and args[index - 1] in _OUTPUT_OPTIONS:
                continue
            if os.path.isfile(arg):
                inputs[arg] = (Path(arg).read_bytes(), os.stat(arg).st_mtime_ns)
        capsys.readouterr()
        try:
            code = main(args)
        except SystemExit as exc:  # argparse: usage errors, --help, --version
            code = 0 if exc.code is None else exc.code
        captured = capsys.readouterr()
        if "--overwrite-input" not in args:
            for arg, (data, mtime) in inputs.items():
                assert os.path.isfile(arg), f"input {arg} was removed"
                assert Path(arg).read_bytes() == data, f"input {arg} was modified"
                assert os.stat(arg).st_mtime_ns == mtime, f"input {arg} was touched"
        return Result(int(code), captured.out, captured.err)

    return run


def assert_usage_error(result: Result, *folders: Path, allowed: tuple[str, ...] = ()) -> None:
    """Exit 2, one non-empty line on stderr, no traceback, nothing new in ``folders``."""
    assert result.code == 2, (result.code, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one stderr line, got {result.err!r}"
    assert "Traceback" not in result.err + result.out
    for folder in folders:
        if folder.exists():
            assert sorted(set(os.listdir(folder)) - set(allowed)) == [], f"left in {folder}: {os.listdir(folder)}"


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def groups_of(cli, path: Path) -> dict:
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def permutable_ids(document: dict) -> list[str]:
    return [g["id"] for g in document["groups"] if g["permutable"]]


def frozen_ids(document: dict) -> list[str]:
    return [g["id"] for g in document["groups"] if g["frozen"]]


@pytest.fixture
def permuted(cli, model_file, out_dir: Path) -> tuple[Path, Path, Path]:
    """Vgg permuted with seed 7: (source, permuted model, key)."""
    source = model_file("vgg")
    result = cli("permute", source, "-o", out_dir / "p.onnx", "--seed", 7)
    assert result.code == 0, result.err
    return source, out_dir / "p.onnx", out_dir / "p.onnx.key.json"


# -- inspect ------------------------------------------------------------------------------
def test_inspect_json(cli, model_file) -> None:
    document = groups_of(cli, model_file("vgg"))
    summary = document["summary"]
    for key in ("groups", "permutable_groups", "frozen_groups", "producer_neurons", "permutable_fraction"):
        assert key in summary
    groups = document["groups"]
    assert summary["groups"] == len(groups) > 0
    assert summary["permutable_groups"] == len(permutable_ids(document)) > 0
    assert summary["frozen_groups"] == len(frozen_ids(document)) > 0
    assert len({g["id"] for g in groups}) == len(groups)
    for group in groups:
        assert {"id", "size", "permutable", "frozen", "reasons", "members"} <= group.keys()
        assert isinstance(group["size"], int) and group["size"] > 0
        assert not (group["permutable"] and group["frozen"])
        if group["frozen"]:
            assert group["reasons"], group
        for reason in group["reasons"]:
            assert reason["kind"] and reason["message"]
        for member in group["members"]:
            assert {"tensor", "axis", "role"} <= member.keys()
    # vgg's classifier output is a graph output: its neurons cannot move
    assert any(r["kind"] == "graph-output" for g in groups for r in g["reasons"])


def test_inspect_text_matches_json(cli, model_file) -> None:
    path = model_file("vgg")
    document = groups_of(cli, path)
    result = cli("inspect", path)
    assert result.code == 0 and result.err == ""
    summary = document["summary"]
    head = result.out.splitlines()[0]
    assert f"{summary['groups']} groups, {summary['permutable_groups']} permutable" in head
    rows = {line.split()[0] for line in result.out.splitlines() if line.strip()}
    assert {g["id"] for g in document["groups"]} <= rows
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.out)


def test_inspect_dot(cli, model_file, out_dir: Path) -> None:
    path = model_file("resnet")
    document = groups_of(cli, path)
    dot = out_dir / "groups.dot"
    result = cli("inspect", path, "--dot", dot, "--json")
    assert result.code == 0, result.err
    json.loads(result.out)
    assert os.listdir(out_dir) == ["groups.dot"]
    text = dot.read_text()
    assert text.lstrip().startswith("digraph") and text.rstrip().endswith("}")
    for group in document["groups"]:
        assert f'"{group["id"]}" [' in text, group["id"]


def test_inspect_dot_into_missing_folder(cli, model_file, tmp_path: Path) -> None:
    result = cli("inspect", model_file("vgg"), "--dot", tmp_path / "missing" / "g.dot")
    assert_usage_error(result)
    assert not (tmp_path / "missing").exists()


def test_inspect_custom_domain(cli, model_file, out_dir: Path) -> None:
    path = model_file("custom_op")
    document = groups_of(cli, path)
    reasons = [r for g in document["groups"] for r in g["reasons"]]
    assert any("Mystery" in r["message"] for r in reasons), reasons
    result = cli("inspect", path)
    assert result.code == 0 and "Mystery" in result.out
    # Every group freezes (the unknown operator, what it hides, the output): permute refuses
    # to write an unchanged copy, and says why (issue 12).
    assert not permutable_ids(document)
    result = cli("permute", path, "-o", out_dir / "p.onnx", "--json")
    assert result.code == 2 and "nothing to permute" in result.err and "Mystery" in result.err, result.err
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("problem", ["missing", "not-onnx", "folder"])
def test_inspect_bad_input(cli, tmp_path: Path, problem: str) -> None:
    path = tmp_path / "model.onnx"
    if problem == "not-onnx":
        path.write_bytes(b"\x00\xff garbage \x13" * 50)
    elif problem == "folder":
        path.mkdir()
    assert_usage_error(cli("inspect", path))


# -- permute ------------------------------------------------------------------------------
def test_permute_writes_model_and_key(cli, model_file, out_dir: Path) -> None:
    source = model_file("vgg")
    result = cli("permute", source, "-o", out_dir / "p.onnx")
    assert result.code == 0, result.err
    assert sorted(os.listdir(out_dir)) == ["p.onnx", "p.onnx.key.json"]
    key = json.loads((out_dir / "p.onnx.key.json").read_text())
    assert key["format"] == "onnxlady-permutation-key"
    assert key["groups"] and all("perm" in g for g in key["groups"])
    assert "p.onnx" in result.out
    before, after = weights(source), weights(out_dir / "p.onnx")
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[n], after[n]) for n in before)


def test_permute_key_names_source_and_output_files(cli, model_file, out_dir: Path) -> None:
    source = model_file("vgg")
    assert cli("permute", source, "-o", out_dir / "p.onnx").code == 0
    key = json.loads((out_dir / "p.onnx.key.json").read_text())
    assert key["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert key["permuted"]["sha256"] == hashlib.sha256((out_dir / "p.onnx").read_bytes()).hexdigest()


def test_permute_key_out(cli, model_file, out_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    result = cli("permute", model_file("vgg"), "-o", out_dir / "p.onnx", "--key-out", keys / "k.json", "--json")
    assert result.code == 0, result.err
    assert os.listdir(out_dir) == ["p.onnx"] and os.listdir(keys) == ["k.json"]
    assert json.loads(result.out)["key"] == str(keys / "k.json")


def test_permute_seed_is_reproducible(cli, model_file, out_dir: Path) -> None:
    source = model_file("vgg")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert cli("permute", source, "-o", out_dir / f"{name}.onnx", "--seed", seed).code == 0
    data = {name: (out_dir / f"{name}.onnx").read_bytes() for name in "abc"}
    assert data["a"] == data["b"]
    assert data["a"] != data["c"]
    key_a, key_c = (json.loads((out_dir / f"{n}.onnx.key.json").read_text()) for n in "ac")
    assert key_a["seed"] == 3 and key_c["seed"] == 4


def test_permute_one_group(cli, model_file, out_dir: Path) -> None:
    source = model_file("vgg")
    document = groups_of(cli, source)
    chosen = permutable_ids(document)[1]
    result = cli("permute", source, "-o", out_dir / "p.onnx", "--group", chosen, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["permuted_groups"] == 1
    key = json.loads((out_dir / "p.onnx.key.json").read_text())
    assert [g["id"] for g in key["groups"]] == [chosen]
    touched = {m["tensor"] for g in document["groups"] if g["id"] == chosen for m in g["members"]}
    before, after = weights(source), weights(out_dir / "p.onnx")
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed and changed <= touched


@pytest.mark.parametrize("which", ["frozen", "unknown"])
def test_permute_group_not_permutable(cli, model_file, out_dir: Path, which: str) -> None:
    source = model_file("vgg")
    gid = frozen_ids(groups_of(cli, source))[0] if which == "frozen" else "g999"
    assert_usage_error(cli("permute", source, "-o", out_dir / "p.onnx", "--group", gid), out_dir)


def test_permute_with_given_perms(cli, model_file, out_dir: Path, tmp_path: Path) -> None:
    source = model_file("vgg")
    document = groups_of(cli, source)
    group = next(g for g in document["groups"] if g["permutable"])
    perm = list(range(group["size"]))[::-1]
    perms = tmp_path / "perms.json"
    perms.write_text(json.dumps({group["id"]: perm}))
    result = cli("permute", source, "-o", out_dir / "p.onnx", "--perms", perms, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["permuted_groups"] == 1
    before, after = weights(source), weights(out_dir / "p.onnx")
    checked = 0
    for member in group["members"]:
        if member.get("weight") and member.get("index_map") == "p" and member["tensor"] in before:
            expected = np.take(before[member["tensor"]], perm, axis=member["axis"])
            np.testing.assert_array_equal(after[member["tensor"]], expected)
            checked += 1
    assert checked >= 2


def test_key_as_perms_reproduces_output(cli, permuted, out_dir: Path) -> None:
    source, first, key = permuted
    result = cli("permute", source, "-o", out_dir / "again.onnx", "--perms", key)
    assert result.code == 0, result.err
    assert (out_dir / "again.onnx").read_bytes() == first.read_bytes()


def test_another_models_key_is_named_as_such(cli, permuted, model_file, tmp_path: Path) -> None:
    _, _, key = permuted  # vgg's key, given to another model
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli("permute", model_file("resnet"), "-o", elsewhere / "p.onnx", "--perms", key)
    assert_usage_error(result, elsewhere)
    assert "was made for another model" in result.err


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param('{"g0": [0, 0, 1]}', id="not-a-permutation"),
        pytest.param('{"g999": [1, 0]}', id="unknown-group"),
        pytest.param('{"g0": ["a", "b"]}', id="not-integers"),
        pytest.param("[1, 2, 3]", id="not-an-object"),
    ],
)
def test_permute_bad_perms_file(cli, model_file, out_dir: Path, tmp_path: Path, content: str) -> None:
    perms = tmp_path / "perms.json"
    perms.write_text(content)
    assert_usage_error(cli("permute", model_file("vgg"), "-o", out_dir / "p.onnx", "--perms", perms), out_dir)


def test_permute_perms_for_frozen_group(cli, model_file, out_dir: Path, tmp_path: Path) -> None:
    source = model_file("vgg")
    document = groups_of(cli, source)
    frozen = next(g for g in document["groups"] if g["frozen"])
    perms = tmp_path / "perms.json"
    perms.write_text(json.dumps({frozen["id"]: list(range(frozen["size"]))[::-1]}))
    assert_usage_error(cli("permute", source, "-o", out_dir / "p.onnx", "--perms", perms), out_dir)


@pytest.mark.parametrize("groups", [[{"id": "g0"}], ["g0"], 5])
def test_permute_perms_malformed_key_file(cli, model_file, out_dir: Path, tmp_path: Path, groups) -> None:
    perms = tmp_path / "perms.json"
    perms.write_text(json.dumps({"groups": groups}))
    assert_usage_error(cli("permute", model_file("vgg"), "-o", out_dir / "p.onnx", "--perms", perms), out_dir)


def test_permute_perms_with_unknown_group(cli, model_file, out_dir: Path, tmp_path: Path) -> None:
    perms = tmp_path / "perms.json"
    perms.write_text(json.dumps({"g0": [1, 0]}))
    result = cli("permute", model_file("vgg"), "-o", out_dir / "p.onnx", "--perms", perms, "--group", "g999")
    assert_usage_error(result, out_dir)


def test_permute_verify(cli, model_file, out_dir: Path) -> None:
    source = model_file("vgg")
    result = cli("permute", source, "-o", out_dir / "p.onnx", "--verify", "--provider", "cpu")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[-1] == "EQUIVALENT"
    assert any(line.startswith("logits") and line.rstrip().endswith("PASS") for line in lines)
    result = cli("permute", source, "-o", out_dir / "q.onnx", "--verify", "--provider", "cpu", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)["verify"]
    assert report["equivalent"] is True
    assert [o["name"] for o in report["outputs"]] == ["logits"]


@pytest.mark.parametrize("bad", [["--shape", "input:1xbadx3"], ["--iterations", "0"], ["--atol", "-1"]])
def test_permute_verify_bad_options_write_nothing(cli, model_file, out_dir: Path, bad: list[str]) -> None:
    result = cli("permute", model_file("vgg"), "-o", out_dir / "p.onnx", "--verify", *bad)
    assert_usage_error(result, out_dir)


def test_permute_output_is_input(cli, model_file) -> None:
    source = model_file("vgg")
    assert_usage_error(cli("permute", source, "-o", source), source.parent, allowed=(source.name,))
    assert sorted(os.listdir(source.parent)) == [source.name]
    # the same file through another spelling of its path
    other = source.parent / ".." / source.parent.name / source.name
    assert_usage_error(cli("permute", source, "-o", other), source.parent, allowed=(source.name,))


def test_permute_overwrite_input(cli, model_file) -> None:
    source = model_file("vgg")
    before = source.read_bytes()
    result = cli("permute", source, "-o", source, "--overwrite-input")
    assert result.code == 0, result.err
    assert source.read_bytes() != before
    assert sorted(os.listdir(source.parent)) == [source.name, source.name + ".key.json"]


def test_permute_output_folder_missing(cli, model_file, tmp_path: Path) -> None:
    result = cli("permute", model_file("vgg"), "-o", tmp_path / "missing" / "p.onnx")
    assert_usage_error(result)
    assert not (tmp_path / "missing").exists()


def test_permute_input_missing(cli, tmp_path: Path, out_dir: Path) -> None:
    assert_usage_error(cli("permute", tmp_path / "absent.onnx", "-o", out_dir / "p.onnx"), out_dir)


def test_permute_input_not_onnx(cli, tmp_path: Path, out_dir: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_text('{"this": "is json"}')
    assert_usage_error(cli("permute", bad, "-o", out_dir / "p.onnx"), out_dir)


def test_permute_key_out_folder_missing(cli, model_file, out_dir: Path, tmp_path: Path) -> None:
    result = cli("permute", model_file("vgg"), "-o", out_dir / "p.onnx", "--key-out", tmp_path / "missing" / "k.json")
    assert_usage_error(result, out_dir)


def test_permute_key_out_equal_to_output(cli, model_file, out_dir: Path) -> None:
    result = cli("permute", model_file("vgg"), "-o", out_dir / "p.onnx", "--key-out", out_dir / "p.onnx")
    assert_usage_error(result, out_dir)


def test_permute_never_overwrites_input_external_data(cli, saved_models, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save_model(onnx.load(str(saved_models["vgg"])), str(folder / "q.onnx"), save_as_external_data=True,
                    location="p.onnx.data", size_threshold=0)
    data_before = (folder / "p.onnx.data").read_bytes()
    result = cli("permute", folder / "q.onnx", "-o", folder / "p.onnx")
    assert (folder / "p.onnx.data").read_bytes() == data_before, f"exit {result.code}: input weights overwritten"
    assert_usage_error(result, folder, allowed=("q.onnx", "p.onnx.data"))


def test_permute_write_failure(cli, model_file, out_dir: Path, disk_full) -> None:
    """A disk that fills up mid-write: no partial output, one line, no traceback."""
    result = cli("permute", model_file("vgg"), "-o", out_dir / "p.onnx")
    assert result.code != 0
    assert len(result.err.splitlines()) == 1 and "Traceback" not in result.err
    assert os.listdir(out_dir) == []


def test_permute_write_failure_is_exit_2(cli, model_file, out_dir: Path, disk_full) -> None:
    assert_usage_error(cli("permute", model_file("vgg"), "-o", out_dir / "p.onnx"), out_dir)


# -- unpermute ----------------------------------------------------------------------------
def test_unpermute_restores_bit_identical(cli, permuted, out_dir: Path) -> None:
    source, model, key = permuted
    result = cli("unpermute", model, "--key", key, "-o", out_dir / "u.onnx")
    assert result.code == 0, result.err
    assert "bit-identical" in result.out
    original, restored = onnx.load(str(source)), onnx.load(str(out_dir / "u.onnx"))
    assert [t.name for t in original.graph.initializer] == [t.name for t in restored.graph.initializer]
    for a, b in zip(original.graph.initializer, restored.graph.initializer):
        assert a.SerializeToString() == b.SerializeToString(), a.name
    result = cli("unpermute", model, "--key", key, "-o", out_dir / "u2.onnx", "--json")
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["weights_identical_to_source"] is True
    assert document["output_identical_to_source_file"] is True
    assert (out_dir / "u2.onnx").read_bytes() == source.read_bytes()


def test_unpermute_key_of_another_model(cli, model_file, permuted, tmp_path: Path) -> None:
    _, _, key_a = permuted
    other = tmp_path / "other"
    other.mkdir()
    assert cli("permute", model_file("resnet"), "-o", other / "b.onnx").code == 0
    restored = tmp_path / "restored"
    restored.mkdir()
    assert_usage_error(cli("unpermute", other / "b.onnx", "--key", key_a, "-o", restored / "u.onnx"), restored)


def test_unpermute_source_model_with_its_key(cli, permuted, tmp_path: Path) -> None:
    """The key undoes the permuted model; applied to the source it must not silently scramble it."""
    source, _, key = permuted
    restored = tmp_path / "restored"
    restored.mkdir()
    result = cli("unpermute", source, "--key", key, "-o", restored / "u.onnx")
    if result.code == 0:
        assert "differ" in result.out  # at least it must not claim bit-identity
    else:
        assert_usage_error(result, restored)


def _key_variants() -> dict[str, object]:
    def drop(field):
        return lambda k: k.pop(field)

    def set_(path, value):
        def change(k):
            target = k
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = value(target[path[-1]]) if callable(value) else value

        return change

    return {
        "not-json": "{oops",
        "not-an-object": "[1, 2]",
        "wrong-format": set_(["format"], "something-else"),
        "wrong-version": set_(["version"], 99),
        "no-groups": drop("groups"),
        "perm-not-a-permutation": set_(["groups", 0, "perm"], lambda p: [0] * len(p)),
        "perm-too-short": set_(["groups", 0, "perm"], lambda p: p[:-1]),
        "perm-out-of-range": set_(["groups", 0, "perm"], lambda p: [i + 1 for i in p]),
        "perm-not-integers": set_(["groups", 0, "perm"], lambda p: ["x"] * len(p)),
    }


@pytest.mark.parametrize("variant", sorted(_key_variants()))
def test_unpermute_malformed_key(cli, permuted, tmp_path: Path, variant: str) -> None:
    _, model, key = permuted
    change = _key_variants()[variant]
    bad = tmp_path / "bad.key.json"
    if isinstance(change, str):
        bad.write_text(change)
    else:
        data = json.loads(key.read_text())
        change(data)
        bad.write_text(json.dumps(data))
    restored = tmp_path / "restored"
    restored.mkdir()
    assert_usage_error(cli("unpermute", model, "--key", bad, "-o", restored / "u.onnx"), restored)


@pytest.mark.parametrize(
    "variant", ["tensor-without-axes", "expr-unknown-group", "tensor-entry-not-object", "axis-not-int", "untied-malformed"]
)
def test_unpermute_malformed_key_tensors(cli, permuted, tmp_path: Path, variant: str) -> None:
    _, model, key = permuted
    data = json.loads(key.read_text())
    if variant == "tensor-without-axes":
        del data["tensors"][0]["axes"]
    elif variant == "expr-unknown-group":
        data["tensors"][0]["axes"][0]["expr"] = {"group": "g999"}
    elif variant == "tensor-entry-not-object":
        data["tensors"][0] = "features.block1.conv.weight"
    elif variant == "axis-not-int":
        data["tensors"][0]["axes"][0]["axis"] = "zero"
    else:
        data["untied"].append({"source": "x"})
    bad = tmp_path / "bad.key.json"
    bad.write_text(json.dumps(data))
    restored = tmp_path / "restored"
    restored.mkdir()
    assert_usage_error(cli("unpermute", model, "--key", bad, "-o", restored / "u.onnx"), restored)


def test_unpermute_key_with_fractional_perm(cli, permuted, tmp_path: Path) -> None:
    _, model, key = permuted
    data = json.loads(key.read_text())
    data["groups"][0]["perm"] = [i + 0.25 for i in data["groups"][0]["perm"]]
    bad = tmp_path / "bad.key.json"
    bad.write_text(json.dumps(data))
    restored = tmp_path / "restored"
    restored.mkdir()
    assert_usage_error(cli("unpermute", model, "--key", bad, "-o", restored / "u.onnx"), restored)


def test_unpermute_missing_key(cli, permuted, tmp_path: Path) -> None:
    _, model, _ = permuted
    restored = tmp_path / "restored"
    restored.mkdir()
    assert_usage_error(cli("unpermute", model, "--key", tmp_path / "nokey.json", "-o", restored / "u.onnx"), restored)


def test_unpermute_output_is_an_input(cli, permuted, out_dir: Path) -> None:
    _, model, key = permuted
    before = sorted(os.listdir(out_dir))
    assert_usage_error(cli("unpermute", model, "--key", key, "-o", model), out_dir, allowed=tuple(before))
    assert_usage_error(cli("unpermute", model, "--key", key, "-o", key), out_dir, allowed=tuple(before))
    assert sorted(os.listdir(out_dir)) == before


# -- verify -------------------------------------------------------------------------------
@pytest.fixture
def changed_weight(model_file) -> tuple[Path, Path]:
    """(vgg, a copy whose last Gemm weight has one element changed)."""
    source = model_file("vgg")
    model = onnx.load(str(source))
    tensor = next(t for t in model.graph.initializer if t.name.startswith("logits") and len(t.dims) == 2)
    array = numpy_helper.to_array(tensor).copy()
    array.flat[0] += 5.0
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    changed = source.parent / "changed.onnx"
    onnx.save_model(model, str(changed))
    return source, changed


def test_verify_model_against_itself(cli, model_file) -> None:
    source = model_file("vgg")
    result = cli("verify", source, source, "--provider", "cpu")
    assert result.code == 0, result.err
    assert result.out.splitlines()[-1] == "EQUIVALENT"


def test_verify_changed_weight(cli, changed_weight) -> None:
    source, changed = changed_weight
    result = cli("verify", source, changed, "--provider", "cpu")
    assert result.code == 1, result.err
    lines = result.out.splitlines()
    assert lines[-1] == "NOT EQUIVALENT"
    assert any(line.startswith("logits") and line.rstrip().endswith("FAIL") for line in lines)
    result = cli("verify", source, changed, "--provider", "cpu", "--json")
    assert result.code == 1
    document = json.loads(result.out)
    assert document["equivalent"] is False
    (output,) = document["outputs"]
    assert output["name"] == "logits" and output["passed"] is False
    assert output["max_abs_error"] > 0 and output["mismatched_elements"] > 0
    for field in ("max_rel_error", "reference_max_abs", "total_elements"):
        assert field in output


def test_verify_provider_cuda_without_gpu(cli, model_file) -> None:
    source = model_file("matmul_mlp")
    result = cli("verify", source, source, "--provider", "cuda")
    if result.code == 0:
        pytest.skip("CUDA really loads on this machine")
    assert_usage_error(result)
    assert "CUDA" in result.err


@pytest.mark.parametrize("spec", ["input", "input:1xax3", "input:0x3x32x32", ":1x3", "nosuch:1x3x32x32"])
def test_verify_bad_shape(cli, model_file, spec: str) -> None:
    source = model_file("vgg")
    assert_usage_error(cli("verify", source, source, "--shape", spec))


def test_verify_missing_and_unrunnable(cli, model_file, tmp_path: Path) -> None:
    source = model_file("vgg")
    assert_usage_error(cli("verify", source, tmp_path / "absent.onnx"))
    custom = model_file("custom_op")
    assert_usage_error(cli("verify", custom, custom, "--provider", "cpu"))


# -- demo ---------------------------------------------------------------------------------
def test_demo(cli, tmp_path: Path) -> None:
    result = cli("demo")
    assert result.code == 0, result.err
    numbers = [f"{k}." for k in range(1, 9)]
    steps = [line for line in result.out.splitlines() if line[:2] in numbers]
    assert [s[:2] for s in steps] == numbers
    assert "EQUIVALENT" in steps[2] and "caught" in steps[3] and "True" in steps[4]
    assert "Psi = 100.00 %" in steps[6] and "EQUIVALENT" in steps[7]
    workdir = tmp_path / "demo"
    result = cli("demo", "--json", "--workdir", workdir)
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["ok"] is True and len(document["lines"]) == 8
    assert document["psi_hungarian"] == 100.0 and document["resynced_equivalent_to_suspect"] is True
    assert (workdir / "demo.onnx").exists()


# -- --json everywhere --------------------------------------------------------------------
def test_every_command_prints_one_json_document(cli, permuted, out_dir: Path) -> None:
    source, model, key = permuted
    commands = [
        ["inspect", source],
        ["permute", source, "-o", out_dir / "j.onnx"],
        ["unpermute", model, "--key", key, "-o", out_dir / "ju.onnx"],
        ["verify", source, model, "--provider", "cpu"],
        ["demo"],
    ]
    for argv in commands:
        result = cli(*argv, "--json")
        assert result.code == 0, (argv, result.err)
        assert isinstance(json.loads(result.out), dict), argv


# -- argparse -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        ["permute", "model.onnx"],
        ["unpermute", "model.onnx", "-o", "x.onnx"],
        ["verify", "a.onnx"],
        ["inspect"],
        ["permute", "model.onnx", "-o", "x.onnx", "--seed", "abc"],
        ["verify", "a.onnx", "b.onnx", "--provider", "tpu"],
        ["inspect", "model.onnx", "--no-such-flag"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_usage_errors(cli, tmp_path: Path, monkeypatch, argv: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert_usage_error(cli(*argv), tmp_path)


def test_no_command_is_one_line(cli, tmp_path: Path) -> None:
    assert_usage_error(cli())


def test_version(cli) -> None:
    result = cli("--version")
    assert result.code == 0 and "onnxlady" in result.out


# -- the real entry point -----------------------------------------------------------------
def _run_module(*argv: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ONNXLADY_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "onnxlady", *map(str, argv)],
        check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
    )  # fmt: skip


def test_module_entry_point_inspect_json(model_file, tmp_path: Path) -> None:
    result = _run_module("inspect", model_file("vgg"), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["groups"] > 0


def test_module_entry_point_bad_input(tmp_path: Path, out_dir: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 definitely not a model")
    for argv in (
        ["permute", bad, "-o", out_dir / "p.onnx"],
        ["permute", tmp_path / "absent.onnx", "-o", out_dir / "p.onnx"],
        ["frobnicate"],
    ):
        result = _run_module(*argv, cwd=tmp_path)
        assert_usage_error(Result(result.returncode, result.stdout, result.stderr), out_dir)


def test_module_entry_point_round_trip(model_file, out_dir: Path) -> None:
    source = model_file("matmul_mlp")
    before = source.read_bytes()
    result = _run_module("permute", source, "-o", out_dir / "p.onnx", "--verify", "--provider", "cpu", cwd=out_dir)
    assert result.returncode == 0, result.stderr
    assert "EQUIVALENT" in result.stdout and "Traceback" not in result.stderr
    result = _run_module("unpermute", out_dir / "p.onnx", "--key", out_dir / "p.onnx.key.json",
                         "-o", out_dir / "u.onnx", cwd=out_dir)
    assert result.returncode == 0, result.stderr
    assert (out_dir / "u.onnx").read_bytes() == before == source.read_bytes()


# -- a thin layer over the public API -----------------------------------------------------
def test_cli_imports_only_the_standard_library_and_the_public_api() -> None:
    import ast

    tree = ast.parse((REPO / "onnxlady" / "cli.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add(node.module or "")
            if node.module == "onnxlady":
                import onnxlady

                public = set(onnxlady.__all__) | {"__version__"}
                assert {alias.name for alias in node.names} <= public
    foreign = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names and name != "onnxlady"}
    assert not foreign, f"cli.py imports more than the standard library and onnxlady: {sorted(foreign)}"
    assert "onnxlady" in imported


def _subcommands() -> dict[str, object]:
    import argparse

    from onnxlady.cli import build_parser

    def children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    found = {}
    for name, sub in children(build_parser()).items():
        nested = children(sub)
        found.update({f"{name} {n}": s for n, s in nested.items()} if nested else {name: sub})
    return found


def test_every_subcommand_mirrors_its_api_function() -> None:
    """Each option is a keyword of the public function, with the same default, and the reverse."""
    import inspect

    import onnxlady

    functions = {
        "demo": onnxlady.demo, "inspect": onnxlady.inspect, "permute": onnxlady.permute,
        "unpermute": onnxlady.unpermute, "resync": onnxlady.resync, "match": onnxlady.match,
        "audit": onnxlady.audit, "perturb": onnxlady.perturb, "verify": onnxlady.verify,
        "watermark embed": onnxlady.embed_watermark, "watermark extract": onnxlady.extract_watermark,
        "index build": onnxlady.build_index, "find": onnxlady.find,
    }  # fmt: skip
    subcommands = _subcommands()
    assert sorted(subcommands) == sorted(functions)
    for name, parser in subcommands.items():
        parameters = inspect.signature(functions[name]).parameters
        options = {a.dest: a for a in parser._actions if a.dest not in ("help", "json", "quiet")}
        assert set(options) == set(parameters) - {"progress"}, name
        for dest, action in options.items():
            default = parameters[dest].default
            if default is inspect.Parameter.empty or action.default is None:
                continue
            assert (list(action.default) if isinstance(action.default, list) else action.default) == (
                list(default) if isinstance(default, tuple) else default
            ), (name, dest)


def test_tolerance_defaults_are_named_constants() -> None:
    from onnxlady._audit._verdicts import AUDIT_RTOL
    from onnxlady._verify._compare import VERIFY_ATOL, VERIFY_RTOL

    subcommands = _subcommands()
    defaults = {
        name: {a.dest: a.default for a in parser._actions}  # type: ignore[attr-defined]
        for name, parser in subcommands.items()
    }
    assert defaults["audit"]["rtol"] == AUDIT_RTOL == 1e-5
    # None: chosen from the models' arithmetic (VERIFY_* for float32, wider for float16/bfloat16).
    assert defaults["verify"]["rtol"] is defaults["permute"]["rtol"] is None and VERIFY_RTOL == 1e-3
    assert defaults["verify"]["atol"] is defaults["permute"]["atol"] is None and VERIFY_ATOL == 1e-4


def test_json_documents_are_the_api_results(cli, model_file, out_dir: Path) -> None:
    """``--json`` prints ``to_json()`` of the public function called with the same options."""
    import onnxlady

    source = model_file("vgg")
    result = cli("inspect", source, "--json")
    assert result.code == 0 and json.loads(result.out) == onnxlady.inspect(source).to_json()
    result = cli("permute", source, "-o", out_dir / "p.onnx", "--seed", 2, "--json")
    api = onnxlady.permute(source, seed=2).to_json()
    cli_document = json.loads(result.out)
    assert result.code == 0 and cli_document["output"] == str(out_dir / "p.onnx")
    assert {k: v for k, v in cli_document.items() if k not in ("output", "key")} == {
        k: v for k, v in api.items() if k not in ("output", "key")
    }


# -- index build / find -------------------------------------------------------------------
@pytest.fixture
def registry_index(cli, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(registry folder with vgg, resnet, matmul_mlp and one corrupt file, its index, a permuted vgg)."""
    from fixtures import FIXTURES
    from onnxlady.testing import permute_copy

    registry = tmp_path / "registry"
    registry.mkdir()
    for name in ("vgg", "resnet", "matmul_mlp"):
        onnx.save(FIXTURES[name](0), registry / f"{name}.onnx")
    (registry / "broken.onnx").write_bytes(b"\x08\x07 not a model" * 10)
    index = tmp_path / "registry.idx"
    result = cli("index", "build", registry, "-o", index, "--workers", 1, "--quiet")
    assert result.code == 0, result.err
    suspect = tmp_path / "suspect.onnx"
    onnx.save(permute_copy(FIXTURES["vgg"](0), 4)[0], suspect)
    return registry, index, suspect


def test_index_build_lists_unreadable_files_and_is_incremental(cli, registry_index) -> None:
    registry, index, _ = registry_index
    result = cli("index", "build", registry, "-o", index, "--json")
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["models"] == 3 and document["indexed"] == [] and document["unchanged"] == 3
    assert [e["path"] for e in document["errors"]] == [str(registry / "broken.onnx")]
    text = cli("index", "build", registry, "-o", index)
    assert text.code == 0 and "3 models" in text.out and "1 unreadable" in text.out
    assert f"unreadable: {registry / 'broken.onnx'}: not an ONNX model" in text.out


def test_find_ranks_the_reference_first_and_exit_codes(cli, registry_index) -> None:
    registry, index, suspect = registry_index
    result = cli("find", suspect, "--index", index, "--top", 3, "--json")
    assert result.code == 0, result.err  # a derived candidate found: exit 0, like grep
    document = json.loads(result.out)
    assert document["derived"] == 1 and len(document["candidates"]) == 3
    first, second = document["candidates"][:2]
    assert first["path"] == str(registry / "vgg.onnx") and first["call"] == "derived" and first["rank"] == 1
    assert second["call"] == "unrelated" and first["score"] > 0.5 > second["score"]
    text = cli("find", suspect, "--index", index, "--top", 2, "--confirm")
    assert text.code == 0, text.err
    rows = [line for line in text.out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 2 and "derived" in rows[0] and "permuted" in rows[0] and str(registry / "vgg.onnx") in rows[0]
    assert "unrelated" in rows[1] and "unmatched" in rows[1]
    # A model of the registry's architectures but other weights: nothing derived, exit 1.
    from fixtures import FIXTURES

    other = registry.parent / "other.onnx"
    onnx.save(FIXTURES["resnet"](3), other)
    unrelated = cli("find", other, "--index", index, "--json")
    assert unrelated.code == 1 and json.loads(unrelated.out)["derived"] == 0


def test_find_all_pairs(cli, registry_index) -> None:
    registry, index, suspect = registry_index
    none = cli("find", "--index", index, "--all-pairs", "--json")
    assert none.code == 1 and json.loads(none.out)["clusters"] == []  # nothing related: exit 1
    import shutil

    shutil.copyfile(suspect, registry / "vgg.permuted.onnx")
    assert cli("index", "build", registry, "-o", index, "--quiet").code == 0
    found = cli("find", "--index", index, "--all-pairs")
    assert found.code == 0, found.err
    assert "1 clusters" in found.out and str(registry / "vgg.permuted.onnx") in found.out


@pytest.mark.parametrize(
    "problem", ["corrupt index", "newer index", "missing suspect", "no suspect", "suspect and all-pairs", "bad top"]
)
def test_find_bad_input_is_one_line_exit_2(cli, registry_index, tmp_path: Path, problem: str) -> None:
    import sqlite3

    _, index, suspect = registry_index
    argv: list[object] = ["find", suspect, "--index", index]
    if problem == "corrupt index":
        corrupt = tmp_path / "corrupt.idx"
        corrupt.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
        argv = ["find", suspect, "--index", corrupt]
    elif problem == "newer index":
        with sqlite3.connect(index) as connection:
            connection.execute("PRAGMA user_version=99")
    elif problem == "missing suspect":
        argv = ["find", tmp_path / "absent.onnx", "--index", index]
    elif problem == "no suspect":
        argv = ["find", "--index", index]
    elif problem == "suspect and all-pairs":
        argv.append("--all-pairs")
    else:
        argv += ["--top", 0]
    result = cli(*argv)
    assert_usage_error(result)
    if problem == "newer index":
        assert "newer" in result.err


def test_index_build_bad_input_is_one_line_exit_2(cli, registry_index, tmp_path: Path) -> None:
    registry, _, _ = registry_index
    garbage = tmp_path / "garbage.idx"
    garbage.write_bytes(b"not an index" * 50)
    assert_usage_error(cli("index", "build", registry, "-o", garbage))
    assert_usage_error(cli("index", "build", registry, "-o", tmp_path / "x.idx", "--workers", 0))
    assert_usage_error(cli("index", "build", registry, "-o", tmp_path / "y.idx", "--engine", "spark"))


def test_provenance_json_documents_are_the_api_results(cli, registry_index) -> None:
    import onnxlady

    _, index, suspect = registry_index
    result = cli("find", suspect, "--index", index, "--top", 2, "--json")
    api = onnxlady.find(str(suspect), index, top=2).to_json()
    cli_document = json.loads(result.out)
    for document in (api, cli_document):
        document.pop("seconds")
        document.pop("search_seconds")
    assert cli_document == api
    clusters = onnxlady.find(None, index, all_pairs=True)
    assert isinstance(clusters, onnxlady.ClusterResult) and clusters.exit_code == 1


# -- issue 13: verdicts that prove something, and a check that could not run ------------------
def _hollow_model(kind: str) -> onnx.ModelProto:
    """A model whose output agreement proves nothing: NaN, vanishing, constant, or a saturated Sigmoid."""
    from onnxlady.testing import GraphBuilder

    b = GraphBuilder(f"hollow_{kind}", seed=0)
    x = b.input("input", [1, 4])
    h = b.gemm(b.relu(b.gemm(x, 8, name="fc1")), 4, name="fc2")  # fc1's 8 neurons can move
    if kind == "nan":
        return b.build(b.sqrt(b.mul(b.relu(h), np.full((1,), -1.0, np.float32), name="neg"), name="out"))
    if kind == "zero":
        return b.build(b.mul(h, np.zeros((1,), np.float32), name="out"))
    if kind == "constant":
        return b.build(b.add(b.mul(h, np.zeros((1,), np.float32), name="zero"), np.full((1,), 3.0, np.float32),
                             name="out"))  # fmt: skip
    return b.build(b.sigmoid(b.mul(h, np.full((1,), 1e4, np.float32), name="logits"), name="out"))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("nan", "non-finite"), ("zero", "below"), ("constant", "constant"), ("saturated", "saturated")],
)
def test_verify_hollow_outputs_are_inconclusive_exit_1(cli, tmp_path: Path, kind: str, reason: str) -> None:
    """`verify M M` on outputs that prove nothing: INCONCLUSIVE with the reason, exit 1, never 0."""
    path = tmp_path / f"{kind}.onnx"
    onnx.save(_hollow_model(kind), str(path))
    extra = ["--no-squash-inputs"] if kind == "saturated" else []
    result = cli("verify", path, path, "--provider", "cpu", *extra)
    assert result.code == 1, result.err
    lines = result.out.splitlines()
    assert lines[-1] == "INCONCLUSIVE" and any(line.startswith("why: ") and reason in line for line in lines)
    document = json.loads(cli("verify", path, path, "--provider", "cpu", "--json", *extra).out)
    assert document["verdict"] == "inconclusive" and document["equivalent"] is False
    assert reason in document["reason"] and document["reasons"] and isinstance(document["notes"], list)
    assert [record["name"] for record in document["inputs"]] == ["input"]
    assert isinstance(document["squash_inputs"], list)


def test_saturated_sigmoid_is_judged_on_its_input_unless_told_not_to(cli, tmp_path: Path) -> None:
    """The Sigmoid's input (the logits) is compared automatically; a wrong permutation is caught there."""
    from onnxlady import analyze
    from onnxlady.testing import copy_model, permute_producer_only

    model = _hollow_model("saturated")
    path, wrong_path = tmp_path / "sat.onnx", tmp_path / "wrong.onnx"
    onnx.save(model, str(path))
    result = cli("verify", path, path, "--provider", "cpu", "--json")
    document = json.loads(result.out)
    assert result.code == 0 and document["verdict"] == "equivalent"
    assert [s["name"] for s in document["squash_inputs"]] == ["logits"] and document["notes"]
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(copy_model(wrong)))
    onnx.save(wrong, str(wrong_path))
    result = cli("verify", path, wrong_path, "--provider", "cpu")
    assert result.code == 1 and result.out.splitlines()[-1] == "NOT EQUIVALENT", result.out
    # Without the logits, the saturated output alone cannot tell the wrong model apart.
    result = cli("verify", path, wrong_path, "--provider", "cpu", "--no-squash-inputs")
    assert result.code == 1 and result.out.splitlines()[-1] == "INCONCLUSIVE", result.out


def test_permute_verify_hollow_output_exits_1(cli, tmp_path: Path, out_dir: Path) -> None:
    path = tmp_path / "nan.onnx"
    onnx.save(_hollow_model("nan"), str(path))
    result = cli("permute", path, "-o", out_dir / "p.onnx", "--verify", "--provider", "cpu")
    assert result.code == 1 and result.out.splitlines()[-1] == "INCONCLUSIVE", result.err
    assert any("non-finite" in line for line in result.out.splitlines() if line.startswith("why: "))
    result = cli("permute", path, "-o", out_dir / "q.onnx", "--verify", "--provider", "cpu", "--json")
    assert result.code == 1 and json.loads(result.out)["verify"]["verdict"] == "inconclusive"


def test_api_verdicts_say_three_values() -> None:
    import onnxlady

    result = onnxlady.verify(_hollow_model("zero"), _hollow_model("zero"), provider="cpu")
    assert result.verdict == "inconclusive" and result.exit_code == 1 and not result.equivalent
    assert result.to_text().splitlines()[-1] == "INCONCLUSIVE"
    for name in ("verdict", "exit_code", "to_text"):
        doc = getattr(onnxlady.VerifyResult, name).__doc__ or ""
        assert "inconclusive" in doc.lower(), name


def test_permute_verify_reference_that_cannot_run_keeps_the_permutation(cli, tmp_path: Path, out_dir: Path) -> None:
    """A VAD-like model ONNX Runtime cannot run at the default length: exit 2, files kept, --shape named."""
    from fixtures.dynamic import VAD_FRAME, build_vad_like

    source = tmp_path / "vad.onnx"
    onnx.save(build_vad_like(0), str(source))
    result = cli("permute", source, "-o", out_dir / "p.onnx", "--verify", "--provider", "cpu")
    assert_usage_error(result, out_dir, allowed=("p.onnx", "p.onnx.key.json"))
    message = result.err
    assert "could not run" in message and "--shape audio:1xN" in message and "kept" in message
    assert str(out_dir / "p.onnx") in message and str(out_dir / "p.onnx.key.json") in message
    # The kept files are the permutation: unpermute restores the source, verify with --shape passes.
    assert cli("unpermute", out_dir / "p.onnx", "--key", out_dir / "p.onnx.key.json", "-o", out_dir / "u.onnx").code == 0
    assert (out_dir / "u.onnx").read_bytes() == source.read_bytes()
    shape = f"audio:1x{2 * VAD_FRAME}"
    result = cli("verify", source, out_dir / "p.onnx", "--provider", "cpu", "--shape", shape)
    assert result.code == 0 and result.out.splitlines()[-1] == "EQUIVALENT", result.out
    result = cli("permute", source, "-o", out_dir / "q.onnx", "--verify", "--provider", "cpu", "--shape", shape)
    assert result.code == 0 and result.out.splitlines()[-1] == "EQUIVALENT", result.err


def test_verify_catches_a_wrong_permutation_of_the_vad_like_model(cli, tmp_path: Path) -> None:
    from fixtures.dynamic import build_vad_like
    from onnxlady import analyze
    from onnxlady.testing import copy_model, permute_producer_only

    model = build_vad_like(0)
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(copy_model(wrong)))
    source, suspect = tmp_path / "vad.onnx", tmp_path / "wrong.onnx"
    onnx.save(model, str(source))
    onnx.save(wrong, str(suspect))
    result = cli("verify", source, suspect, "--provider", "cpu", "--shape", "audio:1x512")
    assert result.code == 1 and result.out.splitlines()[-1] == "NOT EQUIVALENT", result.out


def test_permute_verify_candidate_failure_says_nothing_was_written(cli, model_file, out_dir: Path) -> None:
    """A check that fails on the permuted model itself (here: a tensor it lacks) leaves nothing, and says so."""
    result = cli("permute", model_file("vgg"), "-o", out_dir / "p.onnx", "--verify", "--add-output", "nope")
    assert_usage_error(result, out_dir)
    assert "nope" in result.err


@pytest.mark.parametrize("command", ["inspect", "audit"])
def test_a_sparse_initializer_is_refused_naming_it(cli, model_file, tmp_path: Path, command: str) -> None:
    """Held-out round 13, F5: a weight stored as a ``sparse_initializer`` was "a tensor nothing defines"."""
    model_file = model_file("vgg")
    model = onnx.load(model_file)
    dense = next(t for t in model.graph.initializer if len(t.dims) >= 2)
    values = numpy_helper.to_array(dense)
    indices = np.flatnonzero(values).astype(np.int64)
    sparse = onnx.helper.make_sparse_tensor(
        numpy_helper.from_array(values.reshape(-1)[indices], dense.name), numpy_helper.from_array(indices), list(values.shape)
    )
    model.graph.initializer.remove(dense)
    model.graph.sparse_initializer.append(sparse)
    path = tmp_path / "sparse.onnx"
    onnx.save(model, path)
    args = [path] if command == "inspect" else [model_file, path]
    result = cli(command, *args)
    assert result.code == 2
    assert f"'{dense.name}', a sparse_initializer" in result.err and len(result.err.strip().splitlines()) == 1
