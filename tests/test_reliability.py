"""Issue 14, reliability and security: each failure the fault-injection campaign found, as a test.

``base.onnx`` is the vgg fixture, ``perm.onnx`` and ``k.json`` come from ``permute base.onnx -o
perm.onnx --key-out k.json --seed 5``, as in the issue. Every command runs in-process through
:func:`onnxlady.cli.main`, except where a real process is needed (SIGKILL, SIGTERM, a file size
limit, a FIFO that could block): those run in children of the fault-injection zygote
(:mod:`tools._faults`). Every run is checked the same way: exit 0, 1 or 2 (or killed), exactly
one stderr line on exit 2, no traceback, inputs unchanged, no output without its companions and
no temporaries left (after the next run into the folder).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlady
from fixtures import FIXTURES, build_large_model
from onnxlady._io import _outputs
from onnxlady._io._outputs import TEMP_PREFIX, OutputSet, recover_folder
from onnxlady.cli import main
from tools._faults import (
    outcome_problems,
    permute_set_problems,
    resync_set_problems,
    run_cli,
    snapshot,
    temporaries,
)

CONV_WEIGHT = "features.block1.conv.weight"
CONV_BIAS = "features.block1.conv.bias"


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


def cli(*argv: object) -> Run:
    """``onnxlady ARGV --quiet`` in-process; inputs named on the command line must not change."""
    args = [str(a) for a in argv] + ["--quiet"]
    inputs = snapshot(a for a in args if os.path.isfile(a))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    if "--overwrite-input" not in args:
        assert snapshot(inputs) == inputs, "an input changed"
    return Run(int(code), out.getvalue(), err.getvalue())


def refused(run: Run, *words: str) -> None:
    """Exit 2, one stderr line (holding ``words``), no traceback."""
    assert run.code == 2, (run.code, run.out[-300:], run.err)
    lines = run.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxlady"), run.err
    assert "Traceback" not in run.out + run.err
    for word in words:
        assert word in run.err, run.err


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder with base.onnx, perm.onnx and k.json (vgg permuted with seed 5)."""
    onnx.save(FIXTURES["vgg"](0), str(tmp_path / "base.onnx"))
    assert cli("permute", tmp_path / "base.onnx", "-o", tmp_path / "perm.onnx", "--key-out", tmp_path / "k.json",
               "--seed", 5).code == 0  # fmt: skip
    return tmp_path


# -- no output may be an input -----------------------------------------------------------------
@pytest.mark.parametrize("trick", ["same path", "other spelling", "hard link", "symlink"])
def test_inspect_dot_never_replaces_the_model(work: Path, trick: str) -> None:
    base = work / "base.onnx"
    target = {"same path": base, "other spelling": work / ".." / work.name / "base.onnx"}.get(trick, work / "alias")
    if trick == "hard link":
        os.link(base, target)
    elif trick == "symlink":
        os.symlink(base, target)
    refused(cli("inspect", base, "--dot", target), "refusing to overwrite an input")
    onnxlady.load_model(base)  # still the model


def test_key_out_never_replaces_the_perms_file(work: Path) -> None:
    perms = work / "p.json"
    perms.write_text("{}")
    refused(cli("permute", work / "base.onnx", "-o", work / "out.onnx", "--perms", perms, "--key-out", perms))
    assert perms.read_text() == "{}" and not (work / "out.onnx").exists()


#: Commands whose output ``OUT`` (the argument after the option, spelled ``=name``) is one of their inputs.
COLLISIONS = [
    ["unpermute", "{perm}", "--key", "{key}", "-o", "=key"],
    ["unpermute", "{perm}", "--key", "{key}", "-o", "=perm"],
    ["resync", "{base}", "{perm}", "-o", "{out}", "--key-out", "=base"],
    ["resync", "{base}", "{perm}", "-o", "{out}", "--true-key", "{key}", "--key-out", "=key"],
    ["audit", "{base}", "{perm}", "--markdown", "=perm"],
    ["audit", "{base}", "{perm}", "--canonicalize", "=base"],
    ["watermark", "embed", "{base}", "--layer", "features.block2.conv", "-o", "{out}", "--key-out", "=base"],
    ["perturb", "{base}", "-o", "=base", "--noise", "0.1"],
    ["permute", "{base}", "-o", "{out}", "--key-out", "=base"],
    ["inspect", "{base}", "--dot", "=base"],
]


@pytest.mark.parametrize("command", COLLISIONS, ids=lambda c: " ".join([c[0], *(a for a in c if a.startswith("-"))]))
@pytest.mark.parametrize("trick", ["path", "hard link", "symlink"])
def test_no_command_writes_over_an_input(work: Path, command: list[str], trick: str) -> None:
    names = {"base": work / "base.onnx", "perm": work / "perm.onnx", "key": work / "k.json", "out": work / "o.onnx"}
    args = []
    for value in command:
        if value.startswith("="):  # the colliding output: the input itself, or a link to it
            value = str(names[value[1:]])
            if trick != "path":
                alias = work / "alias"
                (os.link if trick == "hard link" else os.symlink)(value, alias)
                value = str(alias)
        args.append(value.format(**names))
    before = set(listing(work))
    refused(cli(*args), "refusing to overwrite an input")
    assert set(listing(work)) == before


# -- all outputs or none -----------------------------------------------------------------------
def test_a_key_that_cannot_be_written_leaves_no_model(work: Path) -> None:
    folder = work / "D"
    folder.mkdir()
    before = set(listing(work))
    refused(cli("permute", work / "base.onnx", "-o", work / "out.onnx", "--key-out", folder))
    refused(cli("resync", work / "base.onnx", work / "perm.onnx", "-o", work / "out.onnx", "--key-out", folder))
    refused(cli("watermark", "embed", work / "base.onnx", "--layer", "features.block2.conv", "-o", work / "out.onnx",
                "--key-out", folder))  # fmt: skip
    assert set(listing(work)) == before and listing(folder) == []


def test_a_failing_canonicalization_leaves_no_report(work: Path) -> None:
    """An identical suspect cannot be canonicalized: the HTML report asked for with it is not kept either."""
    copy_path = work / "copy.onnx"
    copy_path.write_bytes((work / "base.onnx").read_bytes())
    refused(cli("audit", work / "base.onnx", copy_path, "--html", work / "r.html", "--canonicalize", work / "c.onnx"))
    assert not (work / "r.html").exists() and not (work / "c.onnx").exists()


def test_disk_full_on_the_second_report_keeps_neither(work: Path, monkeypatch) -> None:
    real_write = _outputs._write_file
    calls = []

    def write(path: Path, data) -> None:
        calls.append(path.name)
        if len(calls) == 2:
            path.write_bytes(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(_outputs, "_write_file", write)
    before = set(listing(work))
    refused(cli("audit", work / "base.onnx", work / "perm.onnx", "--markdown", work / "r.md", "--html", work / "r.html"),
            "no space left")  # fmt: skip
    assert calls == ["r.md", "r.html"] and set(listing(work)) == before


class _Killed(BaseException):
    """Stands for SIGKILL: raised from inside the commit, with every cleanup switched off."""


def _die_at_rename(monkeypatch, after: int) -> None:
    """Make the process "die" at rename number ``after`` + 1 of the next commit: nothing is cleaned."""
    real_replace = os.replace
    count = [0]

    def replace(source, target) -> None:
        count[0] += 1
        if count[0] > after:
            raise _Killed
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(OutputSet, "abort", lambda self: None)


def test_a_kill_between_model_and_key_is_refused_then_completed(work: Path, monkeypatch) -> None:
    """The issue's case: the new model renamed into place beside the old key.

    unpermute refuses the pair (sha256), and the next run into the folder completes the set.
    """
    base, out, key = work / "base.onnx", work / "out.onnx", work / "out.onnx.key.json"
    assert cli("permute", base, "-o", out, "--seed", 1).code == 0
    with monkeypatch.context() as patch:
        _die_at_rename(patch, after=1)
        with pytest.raises(_Killed):
            onnxlady.permute(base, output=out, seed=2)
    _outputs._ACTIVE.clear()  # the "killed" process is gone
    assert [name for name in listing(work) if name.startswith(TEMP_PREFIX)]
    assert permute_set_problems(out, key), "expected the new model beside the old key"
    refused(cli("unpermute", out, "--key", key, "-o", work / "u.onnx"), "not the model the key was written for")
    assert not (work / "u.onnx").exists()
    # The next run into this folder completes the set: the new model with its new key.
    assert cli("inspect", base, "--dot", work / "g.dot").code == 0
    assert temporaries(work) == [] and permute_set_problems(out, key) == []
    restored = cli("unpermute", out, "--key", key, "-o", work / "u.onnx")
    assert restored.code == 0 and (work / "u.onnx").read_bytes() == base.read_bytes()


def test_a_kill_before_the_commit_point_is_rolled_back(work: Path, monkeypatch) -> None:
    base, out, key = work / "base.onnx", work / "out.onnx", work / "out.onnx.key.json"
    assert cli("permute", base, "-o", out, "--seed", 1).code == 0
    before = snapshot([out, key])
    with monkeypatch.context() as patch:
        patch.setattr(OutputSet, "abort", lambda self: None)
        patch.setattr(OutputSet, "_write_journal", lambda self: (_ for _ in ()).throw(_Killed()))
        with pytest.raises(_Killed):
            onnxlady.permute(base, output=out, seed=2)
    _outputs._ACTIVE.clear()
    assert recover_folder(work)  # what the next run does first
    assert temporaries(work) == [] and snapshot([out, key]) == before


def test_interrupt_and_terminate_leave_no_temporaries(work: Path, monkeypatch) -> None:
    real_write = _outputs._write_file

    def interrupted(path: Path, data) -> None:
        real_write(path, data[: len(data) // 3])
        raise KeyboardInterrupt

    monkeypatch.setattr(_outputs, "_write_file", interrupted)
    run = cli("permute", work / "base.onnx", "-o", work / "out.onnx", "--key-out", work / "out.json")
    assert run.code == 130 and not (work / "out.onnx").exists() and temporaries(work) == []


def test_sigterm_removes_what_was_staged(work: Path) -> None:
    large = work / "large.onnx"
    onnx.save(build_large_model(24), str(large))
    out = work / "out"
    out.mkdir()
    args = ["permute", large, "-o", out / "p.onnx", "--quiet"]
    full = run_cli(args, work)
    assert full.code == 0 and listing(out) == ["p.onnx", "p.onnx.key.json"]
    for name in listing(out):
        (out / name).unlink()
    for fraction in (0.6, 0.4, 0.2):  # SIGTERM while it works (the first delay that lands in time)
        outcome = run_cli(args, work, signal_after=(signal.SIGTERM, fraction * full.seconds))
        assert outcome.code in (0, 143, -signal.SIGTERM), outcome  # -15: before the handler was set
        if outcome.code == -signal.SIGTERM:
            assert listing(out) == []
            return
        if outcome.code == 143:
            assert outcome.stderr.strip() == "onnxlady: terminated" and listing(out) == []
            return
        assert permute_set_problems(out / "p.onnx", out / "p.onnx.key.json") == []
        for name in listing(out):
            (out / name).unlink()
    pytest.fail("no SIGTERM landed while permute ran")


def test_random_sigkills_leave_whole_sets(tmp_path: Path) -> None:
    """SIGKILL at random moments of permute (fresh folder and over an earlier set) and resync."""
    model = tmp_path / "m.onnx"
    onnx.save(build_large_model(8), str(model))
    full = run_cli(["permute", model, "-o", tmp_path / "full.onnx", "--quiet"], tmp_path)
    assert full.code == 0, full.stderr
    rng = random.Random(14)
    for trial in range(6):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        out, key = folder / "p.onnx", folder / "p.onnx.key.json"
        previous = None
        if trial % 2 and trial < 4:
            assert cli("permute", model, "-o", out, "--seed", 99).code == 0
            previous = snapshot([out, key])
        inputs = snapshot([model])
        if trial < 4:
            args = ["permute", model, "-o", out, "--seed", trial, "--quiet"]
        else:
            args = ["resync", model, tmp_path / "full.onnx", "-o", out, "--key-out", key, "--quiet"]
        outcome = run_cli(args, tmp_path, kill_after=rng.uniform(0.0, 1.2 * full.seconds))
        assert outcome_problems(outcome) == [], outcome
        assert snapshot([model]) == inputs
        assert cli("inspect", _small_model(tmp_path), "--dot", folder / "next.dot").code == 0  # the next run
        (folder / "next.dot").unlink()
        assert temporaries(folder) == []
        problems = permute_set_problems(out, key, previous=previous) if trial < 4 else resync_set_problems(out, key)
        assert problems == [], (trial, outcome.killed, problems)


def test_a_real_sigkill_inside_the_commit_is_completed_by_the_next_run(work: Path) -> None:
    """Each rename of the commit slowed to 1.5 s (in the child only), SIGKILL lands between them."""
    base = work / "base.onnx"
    full = run_cli(["permute", base, "-o", work / "full.onnx", "--quiet"], work)
    assert full.code == 0, full.stderr
    landed = 0
    for number, extra in enumerate((0.75, 2.25)):  # before the first rename, between the two
        out = work / f"k{number}"
        out.mkdir()
        outcome = run_cli(["permute", base, "-o", out / "p.onnx", "--quiet"], work, commit_delay=1.5,
                          kill_after=full.seconds + extra)  # fmt: skip
        assert outcome_problems(outcome) == [], outcome
        committed = any((out / name / "journal.json").exists() for name in temporaries(out))
        landed += committed
        assert cli("inspect", base, "--dot", out / "next.dot").code == 0  # the next run into the folder
        assert temporaries(out) == []
        assert permute_set_problems(out / "p.onnx", out / "p.onnx.key.json") == []
        assert (out / "p.onnx").exists() or not committed, "a set past its commit point must be completed"
    assert landed, "no kill landed inside the commit"


def _small_model(tmp_path: Path) -> Path:
    """A small model to run "the next command" on."""
    path = tmp_path / "small.onnx"
    if not path.exists():
        onnx.save(FIXTURES["matmul_mlp"](0), str(path))
    return path


@pytest.mark.parametrize("command", ["permute", "audit", "watermark"])
def test_a_full_disk_leaves_nothing(work: Path, command: str) -> None:
    """RLIMIT_FSIZE in the child: a write past it fails (EFBIG) as a full disk would (ENOSPC)."""
    out = work / "out"
    out.mkdir()
    args = {
        "permute": ["permute", work / "base.onnx", "-o", out / "p.onnx"],
        "audit": ["audit", work / "base.onnx", work / "perm.onnx", "--markdown", out / "r.md", "--html", out / "r.html"],
        "watermark": ["watermark", "embed", work / "base.onnx", "--layer", "features.block2.conv", "-o", out / "w.onnx",
                      "--key-out", out / "w.npz"],
    }[command]  # fmt: skip
    inputs = snapshot([work / "base.onnx", work / "perm.onnx"])
    # Nothing fits; then the small files fit but not the model (or the HTML report).
    for limit in (0, 3000, 30_000 if command == "audit" else 100_000):
        outcome = run_cli([*args, "--quiet"], work, fsize=limit)
        assert outcome_problems(outcome, expect=(2,)) == [], outcome
        assert "cannot write" in outcome.stderr
        assert listing(out) == [] and snapshot(inputs) == inputs


def test_stale_temporaries_of_a_dead_process_are_removed(work: Path) -> None:
    stale = work / f"{TEMP_PREFIX}999999999-deadbeef"
    (stale / "0").mkdir(parents=True)
    (stale / "0" / "out.onnx").write_bytes(b"half a model")
    alive = work / f"{TEMP_PREFIX}{os.getppid()}-cafebabe"  # a running process's: left alone
    alive.mkdir()
    assert cli("permute", work / "base.onnx", "-o", work / "out.onnx").code == 0
    assert not stale.exists() and alive.exists() and (work / "out.onnx.key.json").is_file()
    alive.rmdir()


def test_a_255_byte_output_name_works(work: Path) -> None:
    name = "n" * 250 + ".onnx"
    assert len(name.encode()) == 255
    assert cli("unpermute", work / "perm.onnx", "--key", work / "k.json", "-o", work / name).code == 0
    assert (work / name).read_bytes() == (work / "base.onnx").read_bytes()
    assert (
        cli("permute", work / "base.onnx", "-o", work / ("p" * 250 + ".onnx"), "--key-out", work / "k2.json").code == 0
    )
    refused(cli("permute", work / "base.onnx", "-o", work / ("q" * 250 + ".onnx")), "--key-out")
    refused(cli("unpermute", work / "perm.onnx", "--key", work / "k.json", "-o", work / ("x" * 256)), "longer than 255")
    assert temporaries(work) == []


# -- keys: validated before use; claims from evidence --------------------------------------------
def _key_variants() -> dict[str, Callable[[dict], object]]:
    def at(path: str, value: object) -> Callable[[dict], object]:
        def edit(key: dict) -> None:
            target: dict = key
            *parents, last = path.split(".")
            for part in parents:
                target = target[int(part)] if isinstance(target, list) else target[part]
            target[int(last) if isinstance(target, list) else last] = value

        return edit

    return {
        "a tensor listed twice": lambda k: k["tensors"].append(copy.deepcopy(k["tensors"][0])),
        "a group listed twice": lambda k: k["groups"].append(copy.deepcopy(k["groups"][0])),
        "2**63": at("groups.0.perm.0", 2**63),
        "size 1e400": lambda k: "1e400",
        "100k-deep nesting": lambda k: "deep",
        "sum of 1e12 and -1e12+16": at("tensors.0.axes.0.expr", {"sum": [{"identity": 10**12}, {"identity": -(10**12) + 16}]}),
        "sum of 22 and -6": at("tensors.0.axes.0.expr", {"sum": [{"identity": 22}, {"identity": -6}]}),
        "product 0 x 1e9": at("tensors.0.axes.0.expr", {"product": [{"identity": 0}, {"identity": 10**9}]}),
        "unknown untied copy": lambda k: k["untied"].append({"source": "x", "copy": "nope", "nodes": [], "rewired": []}),
        "axis -4": at("tensors.0.axes.0.axis", -4),
        "axis beyond the rank": at("tensors.0.axes.0.axis", 9),
        "empty tensors": at("tensors", []),
        "not a permutation": at("groups.0.perm", [0] * 16),
        "a float size": at("groups.0.size", 16.0),
        "a boolean axis": at("tensors.0.axes.0.axis", True),
        "an unknown group": at("tensors.0.axes.0.expr", {"group": "g99"}),
        "an index map nested 40 deep": at("tensors.0.axes.0.expr", json.loads('{"sum": [' * 40 + '{"identity": 16}' + "]}" * 40)),
        "NaN": lambda k: "nan",
    }  # fmt: skip


@pytest.mark.parametrize("variant", list(_key_variants()))
def test_hostile_keys_are_refused_before_anything_is_applied(work: Path, variant: str) -> None:
    key = json.loads((work / "k.json").read_text())
    edited = _key_variants()[variant](key)
    text = json.dumps(key)
    if edited == "1e400":
        text = text.replace(f'"size": {key["groups"][0]["size"]}', '"size": 1e400', 1)
    elif edited == "deep":
        text = "[" * 100_000 + "]" * 100_000
    elif edited == "nan":
        text = text.replace(f'"size": {key["groups"][0]["size"]}', '"size": NaN', 1)
    bad = work / "bad.json"
    bad.write_text(text)
    refused(cli("unpermute", work / "perm.onnx", "--key", bad, "-o", work / "u.onnx"))
    assert not (work / "u.onnx").exists()


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, f'{{"g1": [{2**63}]}}', '{"g1": [1e400]}'])
def test_hostile_perms_and_true_keys_are_refused(work: Path, content: str) -> None:
    bad = work / "bad.json"
    bad.write_text(content)
    refused(cli("permute", work / "base.onnx", "-o", work / "o.onnx", "--perms", bad))
    refused(cli("resync", work / "base.onnx", work / "perm.onnx", "-o", work / "o.onnx", "--true-key", bad))
    assert not (work / "o.onnx").exists()


def test_a_key_listing_a_tensor_twice_claims_nothing(work: Path) -> None:
    """The issue's false claim: the inverse applied twice and still "identical to the source"."""
    key = json.loads((work / "k.json").read_text())
    first = next(entry for entry in key["tensors"] if entry["tensor"] == CONV_WEIGHT)
    key["tensors"].append(copy.deepcopy(first))
    bad = work / "twice.json"
    bad.write_text(json.dumps(key))
    run = cli("unpermute", work / "perm.onnx", "--key", bad, "-o", work / "u.onnx", "--json")
    refused(run, "listed twice")
    assert "identical" not in run.out


def test_unpermute_refuses_a_model_changed_after_permuting(work: Path) -> None:
    perturbed = work / "noisy.onnx"
    assert cli("perturb", work / "perm.onnx", "-o", perturbed, "--noise", "0.01").code == 0
    refused(cli("unpermute", perturbed, "--key", work / "k.json", "-o", work / "u.onnx"), "--allow-changed-model")
    run = cli(
        "unpermute", perturbed, "--key", work / "k.json", "-o", work / "u.onnx", "--allow-changed-model", "--json"
    )
    document = json.loads(run.out)
    assert run.code == 0 and document["weights_identical_to_source"] is False
    assert document["output_identical_to_source_file"] is False
    assert "bit-identical" not in cli("unpermute", perturbed, "--key", work / "k.json", "-o", work / "v.onnx",
                                      "--allow-changed-model").out  # fmt: skip


def test_bit_identical_only_when_the_recorded_sha256_matches(work: Path) -> None:
    key = json.loads((work / "k.json").read_text())
    key["source"]["sha256"] = "0" * 64
    key["source"]["weights_sha256"] = "0" * 64
    edited = work / "edited.json"
    edited.write_text(json.dumps(key))
    # The model is the file the key recorded, so a result that is not the recorded source means the
    # key itself was edited: refused, nothing written.
    refused(cli("unpermute", work / "perm.onnx", "--key", edited, "-o", work / "u.onnx"), "edited or is corrupt")
    assert not (work / "u.onnx").exists()
    # Applied anyway on request: restored, but not claimed bit-identical.
    run = cli("unpermute", work / "perm.onnx", "--key", edited, "-o", work / "u.onnx", "--allow-changed-model")
    assert run.code == 0 and "bit-identical" not in run.out
    assert (work / "u.onnx").read_bytes() == (work / "base.onnx").read_bytes()


def test_external_data_is_named_in_the_key(work: Path) -> None:
    out = work / "ext.onnx"
    assert cli("permute", work / "base.onnx", "-o", out, "--external-data", "--seed", 3).code == 0
    data = work / "ext.onnx.data"
    assert json.loads((work / "ext.onnx.key.json").read_text())["permuted"]["data_sha256"]
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    refused(cli("unpermute", out, "--key", work / "ext.onnx.key.json", "-o", work / "u.onnx"), "not the weights")


# -- models validated before use ---------------------------------------------------------------
def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _external(location: str) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        tensor = _initializer(model, CONV_WEIGHT)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=location)

    return edit


def _set_array(name: str, shape_of: Callable[[np.ndarray], np.ndarray]) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        tensor = _initializer(model, name)
        tensor.CopyFrom(numpy_helper.from_array(shape_of(numpy_helper.to_array(tensor)), name))

    return edit


def _outer_scope(model: onnx.ModelProto) -> None:
    branches = [
        helper.make_graph([helper.make_node("Identity", ["ghost"], [f"{b}_out"])], b, [],
                          [helper.make_tensor_value_info(f"{b}_out", TensorProto.FLOAT, None)])
        for b in ("then", "else")
    ]  # fmt: skip
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["if_out"], then_branch=branches[0], else_branch=branches[1])
    )


def _float_data_short(model: onnx.ModelProto) -> None:
    tensor = _initializer(model, CONV_BIAS)
    values = numpy_helper.to_array(tensor)
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values[:-1].tolist())


def _string_bias(model: onnx.ModelProto) -> None:
    tensor = _initializer(model, CONV_BIAS)
    tensor.ClearField("raw_data")
    tensor.data_type = TensorProto.STRING
    tensor.string_data.extend([b"x"] * 16)


def _huge_dims(model: onnx.ModelProto) -> None:
    tensor = _initializer(model, CONV_BIAS)
    del tensor.dims[:]
    tensor.dims.extend([2**32, 2**32])
    tensor.raw_data = b""


def _zero_channels(model: onnx.ModelProto) -> None:
    for name in (CONV_WEIGHT, CONV_BIAS):
        tensor = _initializer(model, name)
        tensor.dims[0] = 0
        tensor.raw_data = b""


INVALID_MODELS: dict[str, Callable[[onnx.ModelProto], None]] = {
    "float_data count not matching dims": _float_data_short,
    "a Conv with 0 output channels": _zero_channels,
    "data_type 0": lambda m: setattr(_initializer(m, CONV_BIAS), "data_type", 0),
    "data_type 999": lambda m: setattr(_initializer(m, CONV_BIAS), "data_type", 999),
    "a string bias": _string_bias,
    "dims [2^32, 2^32] with empty data": _huge_dims,
    "a negative dim": lambda m: _initializer(m, CONV_BIAS).dims.__setitem__(0, -16),
    "a node output defined twice": lambda m: m.graph.node[1].output.__setitem__(0, m.graph.node[0].output[0]),
    "an initializer defined twice": lambda m: m.graph.initializer.append(copy.deepcopy(_initializer(m, CONV_BIAS))),
    "an initializer shadowing a node output": lambda m: m.graph.initializer.append(
        numpy_helper.from_array(np.zeros(1, np.float32), m.graph.node[0].output[0])
    ),
    "an undefined input": lambda m: m.graph.node[1].input.__setitem__(0, "nowhere"),
    "an undefined outer-scope name": _outer_scope,
    "an undefined graph output": lambda m: setattr(m.graph.output[0], "name", "nothing"),
    "a Conv weight of rank 2": _set_array(CONV_WEIGHT, lambda a: a.reshape(a.shape[0], -1)),
    "a Conv bias of the wrong length": _set_array(CONV_BIAS, lambda a: a[:8]),
    "a Gemm weight of rank 1": _set_array("classifier.fc1.weight", lambda a: a.reshape(-1)),
    "a Flatten axis of 2**63 - 1 (a rule would count to it)": lambda m: next(
        a for n in m.graph.node if n.op_type == "Flatten" for a in n.attribute if a.name == "axis"
    ).__setattr__("i", 2**63 - 1),
    "a NUL byte in an external-data location": _external("w\0.bin"),
    "an external-data location escaping with ..": _external("../outside.bin"),
    "an absolute external-data location": _external("/etc/passwd"),
    "an external-data location of 300 bytes": _external("x" * 300),
    "an ONNX opset no onnx knows": lambda m: setattr(
        next(o for o in m.opset_import if o.domain in ("", "ai.onnx")), "version", 1000
    ),
}


@pytest.mark.parametrize("case", list(INVALID_MODELS))
def test_invalid_models_are_refused_with_one_line(tmp_path: Path, case: str) -> None:
    model = FIXTURES["vgg"](0)
    INVALID_MODELS[case](model)
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    refused(cli("inspect", path), "bad.onnx")
    refused(cli("permute", path, "-o", tmp_path / "out.onnx"))
    assert listing(tmp_path) == ["bad.onnx"]


def test_names_that_are_not_utf8_are_refused(tmp_path: Path) -> None:
    """Protobuf hands back a string field holding invalid UTF-8 as bytes: refused, not a TypeError later."""
    raw = FIXTURES["vgg"](0).SerializeToString()
    assert b"Relu" in raw  # an op_type: the node names are lower case
    path = tmp_path / "bad.onnx"
    path.write_bytes(raw.replace(b"Relu", b"\xffelu", 1))
    refused(cli("inspect", path), "not UTF-8")
    refused(cli("audit", _vgg_path(tmp_path), path))


def _vgg_path(tmp_path: Path) -> Path:
    path = tmp_path / "vgg.onnx"
    onnx.save(FIXTURES["vgg"](0), str(path))
    return path


READERS = [
    ["inspect", "{x}"],
    ["permute", "{x}", "-o", "{o}"],
    ["unpermute", "{x}", "--key", "{k}", "-o", "{o}"],
    ["unpermute", "{p}", "--key", "{x}", "-o", "{o}"],
    ["resync", "{x}", "{p}", "-o", "{o}"],
    ["resync", "{b}", "{x}", "-o", "{o}"],
    ["resync", "{b}", "{p}", "-o", "{o}", "--true-key", "{x}"],
    ["permute", "{b}", "-o", "{o}", "--perms", "{x}"],
    ["match", "{x}", "{p}"],
    ["audit", "{b}", "{x}"],
    ["watermark", "embed", "{x}", "--layer", "features.block2.conv", "-o", "{o}", "--key-out", "{o}.npz"],
    ["watermark", "extract", "{x}", "--key", "{o}.npz"],
    ["watermark", "extract", "{b}", "--key", "{x}"],
    ["perturb", "{x}", "-o", "{o}", "--noise", "0.1"],
    ["verify", "{b}", "{x}"],
    ["verify", "{b}", "{p}", "--load-inputs", "{x}"],
]


def test_a_fifo_or_a_long_name_never_hangs_any_command(work: Path) -> None:
    fifo = work / "fifo"
    os.mkfifo(fifo)
    long_name = work / ("m" * 300 + ".onnx")
    names = {"b": work / "base.onnx", "p": work / "perm.onnx", "k": work / "k.json", "o": work / "out.onnx"}
    for command in READERS:
        for special in (fifo, long_name):
            args = [a.format(x=special, **names) for a in command]
            outcome = run_cli([*args, "--quiet"], work, timeout=30)
            assert outcome_problems(outcome, expect=(2,)) == [], outcome
    assert not (work / "out.onnx").exists()


# -- names are data ----------------------------------------------------------------------------
def _renamed_vgg(old: str, new: str) -> onnx.ModelProto:
    model = FIXTURES["vgg"](0)
    _initializer(model, old).name = new
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name == old:
                node.input[position] = new
    return model


def test_markdown_reports_escape_names(tmp_path: Path) -> None:
    hostile = "w1<script>alert(1)</script>|x"
    reference = _renamed_vgg(CONV_WEIGHT, hostile)
    onnx.save(reference, str(tmp_path / "ref.onnx"))
    assert cli("permute", tmp_path / "ref.onnx", "-o", tmp_path / "sus.onnx", "--seed", 2).code == 0
    assert cli("audit", tmp_path / "ref.onnx", tmp_path / "sus.onnx", "--markdown", tmp_path / "r.md").code == 0
    report = (tmp_path / "r.md").read_text()
    assert "<script>" not in report and "&lt;script&gt;" in report
    row = next(line for line in report.splitlines() if "alert(1)" in line)
    assert row.count("|") - row.count("\\|") == 6  # five cells: the name's bar cannot open a sixth


def test_terminal_output_shows_control_characters_as_escapes(tmp_path: Path) -> None:
    hostile = "w\x1b[2J\x1b]0;pwned\x07\r\u202e"
    onnx.save(_renamed_vgg(CONV_WEIGHT, hostile), str(tmp_path / "m.onnx"))
    run = cli("inspect", tmp_path / "m.onnx")
    assert run.code == 0 and "\\x1b[2J" in run.out
    assert not any(c in run.out for c in "\x1b\x07\r\u202e")
    document = json.loads(cli("inspect", tmp_path / "m.onnx", "--json").out)  # JSON keeps the name exactly
    assert any(m["tensor"] == hostile for g in document["groups"] for m in g["members"])


def test_error_messages_show_control_characters_as_escapes(tmp_path: Path) -> None:
    model = FIXTURES["vgg"](0)
    model.graph.node[1].input[0] = "evil\x1b[31m"
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    run = cli("inspect", tmp_path / "m.onnx")
    refused(run, "\\x1b[31m")
    assert "\x1b" not in run.err


def test_outputset_commit_is_atomic_per_set(tmp_path: Path, monkeypatch) -> None:
    """A rename that fails halfway through a commit puts back what the earlier renames replaced."""
    (tmp_path / "a").write_text("old a")
    real_replace = os.replace
    calls = []

    def replace(source, target) -> None:
        calls.append(Path(target).name)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    with OutputSet() as outputs:
        outputs.write_text(tmp_path / "a", "new a")
        outputs.write_text(tmp_path / "b", "new b")
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(onnxlady.OnnxladyError, match="cannot write"):
            outputs.commit()
    assert calls[:2] == ["a", "b"] and listing(tmp_path) == ["a"] and (tmp_path / "a").read_text() == "old a"


# -- models given in memory --------------------------------------------------------------------
def _hostile_flatten_model(axis: int) -> onnx.ModelProto:
    """Conv -> Flatten(axis) -> MatMul: a Flatten axis far outside the rank, built in memory."""
    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    head = helper.make_tensor("h", TensorProto.FLOAT, [16, 2], [1.0] * 32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Flatten", ["c"], ["f"], axis=axis),
            helper.make_node("MatMul", ["f", "h"], ["y"]),
        ],
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight, head],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_flatten_axis_past_the_rank_freezes_with_its_reason() -> None:
    with pytest.raises(onnxlady.OnnxladyError, match="no tensor axis"):
        onnxlady.inspect(_hostile_flatten_model(10**12))
    text = onnxlady.inspect(_hostile_flatten_model(6)).to_text()
    assert "outside the input's rank" in text


@pytest.mark.parametrize(
    "damage",
    ["zero_out_channels", "float_data_short", "unknown_dtype", "undefined_input"],
)
def test_models_in_memory_are_validated_like_files(damage: str) -> None:
    model = _hostile_flatten_model(1)
    before = model.SerializeToString()
    if damage == "zero_out_channels":
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((0, 3, 1, 1), np.float32), "w"))
    elif damage == "float_data_short":
        del model.graph.initializer[1].float_data[5:]
    elif damage == "unknown_dtype":
        model.graph.initializer[1].data_type = 999
    else:
        model.graph.node[2].input[0] = "nowhere"
    damaged = model.SerializeToString()
    for call in (onnxlady.inspect, onnxlady.permute):
        with pytest.raises(onnxlady.OnnxladyError, match=r"in memory"):
            call(model)
    assert model.SerializeToString() == damaged != before
