"""Reliability campaign (issue 14): thousands of hostile files, paths, kills and full disks.

Every case runs ``onnxlady`` in a child forked from the fault-injection zygote
(:mod:`tools._faults`), with a timeout (a hang is a failure), and is checked the same way:

* the run ended with exit 0, 1 or 2, or was killed; exit 2 with exactly one stderr line; no
  traceback; an invalid graph, a hostile path or a collision refused (exit 2);
* the inputs are unchanged (sha256 of every file in the input folder);
* no output without its companions: a model and its key (the key naming the model's sha256), a
  marked model and its watermark key (the mark reads back), reports and a canonical model (all or
  none), and after a kill the state before the run or the whole new set;
* no temporary left (after the next run into the folder, which cleans what a kill left).

Categories: mutated model files (bit flips, truncation, splices, random protobuf field edits),
invalid graphs, hostile keys and permutation files, special input files (FIFO, device, folder,
over-long name), output paths colliding with inputs (path, other spelling, hard link, symlink),
external-data paths, SIGKILL at random moments and disk full (``RLIMIT_FSIZE``) on small models,
and SIGKILL of permute, resync and watermark embed on a model over 80 MB.

    python3 -m tools.reliability_campaign [--seed 14] [--scale 1.0] [--large-kills 54] [--large-mb 96]

Prints one row per category (cases, failures) and the count of partial output sets.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxlady
from fixtures import FIXTURES, build_large_model
from tools._faults import (
    Outcome,
    all_or_none,
    changed_inputs,
    outcome_problems,
    permute_set_problems,
    resync_set_problems,
    run_cli,
    snapshot,
    temporaries,
)

LAYER = "features.block2.conv"  # the vgg fixture's Conv the watermark goes in
LARGE_LAYER = "body1.conv"


@dataclass
class Tally:
    """Cases and failures of one category."""

    cases: int = 0
    failures: int = 0
    partial_sets: int = 0
    killed: int = 0  # runs SIGKILL stopped (the others had ended before their kill came)
    staged: int = 0  # of those, killed while files were staged, before the journal
    committing: int = 0  # of those, killed after the commit point (completed by the next run)
    examples: list[str] = field(default_factory=list)

    def add(self, label: str, problems: list[str]) -> None:
        self.cases += 1
        self.killed += "(killed" in label
        self.staged += "staged" in label
        self.committing += "journal" in label
        if problems:
            self.failures += 1
            self.partial_sets += any("partial output set" in p for p in problems)
            if len(self.examples) < 5:
                self.examples.append(f"{label}: {'; '.join(problems)[:300]}")


class Campaign:
    """The shared inputs (saved once) and the checks every case goes through."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = np.random.default_rng(seed)
        self.inputs = root / "inputs"
        self.inputs.mkdir()
        for name in ("vgg", "resnet", "matmul_mlp", "custom_op"):
            onnx.save(FIXTURES[name](0), str(self.inputs / f"{name}.onnx"))
        self.vgg = self.inputs / "vgg.onnx"
        self.perm, self.key = self.inputs / "perm.onnx", self.inputs / "k.json"
        onnxlady.permute(self.vgg, output=self.perm, key_out=self.key, seed=5)
        self.wm_key = self.inputs / "wm.npz"
        onnxlady.embed_watermark(self.vgg, LAYER, output=self.inputs / "wm.onnx", key_out=self.wm_key)
        self.small = self.inputs / "matmul_mlp.onnx"
        self.counter = 0

    def folder(self) -> Path:
        """A fresh, empty output folder."""
        self.counter += 1
        path = self.root / "cases" / f"c{self.counter:05d}"
        path.mkdir(parents=True)
        return path

    def next_run(self, folder: Path) -> None:
        """The next command run into ``folder``: it completes or removes what a killed run left."""
        outcome = run_cli(["inspect", self.small, "--dot", folder / ".next.dot", "--quiet"], self.root)
        if outcome.code != 0:
            raise RuntimeError(f"the next run failed: {outcome.stderr}")
        (folder / ".next.dot").unlink()

    def run(
        self, args: list[object], *, expect: tuple[int, ...] = (0, 1, 2), watch: list[Path] | None = None,
        kill_after: float | None = None, fsize: int | None = None, commit_delay: float = 0.0, timeout: float = 180.0,
    ) -> tuple[Outcome, list[str]]:  # fmt: skip
        """Run a case; the problems of how it ended and of its inputs (every file of ``watch`` folders)."""
        watched = [path for folder in (watch or [self.inputs]) for path in sorted(folder.iterdir()) if path.is_file()]
        before = snapshot(watched)
        outcome = run_cli(
            [*args, "--quiet"],
            self.root,
            kill_after=kill_after,
            fsize=fsize,
            commit_delay=commit_delay,
            timeout=timeout,
        )
        return outcome, outcome_problems(outcome, expect=expect) + changed_inputs(before)

    def draw(self, options: list[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]


# -- mutated model files -----------------------------------------------------------------------
def mutated_files(c: Campaign, count: int) -> Iterator[tuple[str, list[str]]]:
    models = ["vgg", "resnet", "matmul_mlp", "custom_op"]
    for number in range(count):
        name = c.draw(models)
        kind = c.draw(["bit flips", "truncation", "splice", "field edits"])
        if kind == "field edits":
            model = FIXTURES[name](0)
            for _ in range(int(c.rng.integers(1, 4))):
                _edit_field(model, c)
            try:
                raw = model.SerializeToString()
            except Exception:  # protobuf cannot encode it: no file to test
                raw = (c.inputs / f"{name}.onnx").read_bytes()[:100]
        else:
            raw = bytearray((c.inputs / f"{name}.onnx").read_bytes())
            if kind == "bit flips":
                for _ in range(int(c.rng.integers(1, 9))):
                    bit = int(c.rng.integers(len(raw) * 8))
                    raw[bit // 8] ^= 1 << (bit % 8)
            elif kind == "truncation":
                raw = raw[: int(c.rng.integers(len(raw)))]
            else:
                start, target = int(c.rng.integers(len(raw))), int(c.rng.integers(len(raw)))
                length = int(c.rng.integers(1, 65))
                raw[target : target + length] = raw[start : start + length]
            raw = bytes(raw)
        folder = c.folder()
        path = folder / "in" / "mutated.onnx"
        path.parent.mkdir()
        path.write_bytes(raw)
        command = c.draw(["inspect", "permute", "audit"])
        out = folder / "out"
        out.mkdir()
        args: list[object] = {
            "inspect": ["inspect", path],
            "permute": ["permute", path, "-o", out / "p.onnx"],
            "audit": ["audit", c.vgg, path, "--markdown", out / "r.md"],
        }[command]
        _, problems = c.run(args, watch=[path.parent, c.inputs])
        if command == "permute":
            problems += permute_set_problems(out / "p.onnx", out / "p.onnx.key.json")
        problems += [f"temporary left: {t}" for t in temporaries(out)]
        yield f"{kind} #{number} {command}", problems


_BIG_VALUES = [0, -1, 1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63), 999, 7]


def _edit_field(model: onnx.ModelProto, c: Campaign) -> None:
    graph = model.graph
    target = c.draw(["tensor", "node", "attribute", "opset"])
    if target == "tensor":
        tensor = c.draw(list(graph.initializer))
        what = c.draw(["dim", "data_type", "raw_data", "name", "typed"])
        if what == "dim" and tensor.dims:
            tensor.dims[int(c.rng.integers(len(tensor.dims)))] = c.draw(_BIG_VALUES)
        elif what == "data_type":
            tensor.data_type = c.draw([0, 8, 16, 999, 2**20, int(c.rng.integers(1, 26))])
        elif what == "raw_data":
            tensor.raw_data = tensor.raw_data[: int(c.rng.integers(len(tensor.raw_data) + 1))]
        elif what == "name":
            tensor.name = c.draw(["", "x", graph.node[0].output[0], graph.input[0].name])
        else:
            tensor.float_data.extend([1.0] * int(c.rng.integers(1, 5)))
    elif target == "node":
        node = c.draw(list(graph.node))
        what = c.draw(["op_type", "input", "output", "domain"])
        if what == "op_type":
            node.op_type = c.draw(["Conv", "Gemm", "MatMul", "Add", "Concat", "Reshape", "Nope"])
        elif what == "input" and node.input:
            node.input[int(c.rng.integers(len(node.input)))] = c.draw(["", "ghost", graph.initializer[0].name])
        elif what == "output":
            node.output[0] = c.draw(["", graph.input[0].name, graph.node[0].output[0]])
        else:
            node.domain = c.draw(["", "com.microsoft", "x.y"])
    elif target == "attribute":
        nodes = [node for node in graph.node if node.attribute]
        if nodes:
            attribute = c.draw(nodes).attribute[0]
            if attribute.type == onnx.AttributeProto.INT:
                attribute.i = c.draw(_BIG_VALUES)
            elif attribute.type == onnx.AttributeProto.INTS and attribute.ints:
                attribute.ints[0] = c.draw(_BIG_VALUES)
            else:
                attribute.type = int(c.rng.integers(0, 16))
    else:
        model.opset_import[0].version = int(c.rng.integers(-5, 40))


# -- invalid graphs ----------------------------------------------------------------------------
def _break(model: onnx.ModelProto, kind: str, c: Campaign) -> None:
    graph = model.graph
    node, tensor = c.draw(list(graph.node)), c.draw(list(graph.initializer))
    if kind == "undefined input":
        node.input.append(f"ghost{int(c.rng.integers(100))}")
    elif kind == "output defined twice":
        other = graph.node[(list(graph.node).index(node) + 1) % len(graph.node)]
        other.output[0] = node.output[0] if other is not node else graph.input[0].name
    elif kind == "initializer defined twice":
        graph.initializer.append(copy.deepcopy(tensor))
    elif kind == "initializer shadowing a node output":
        graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), node.output[0]))
    elif kind == "undefined graph output":
        graph.output[0].name = "never_produced"
    elif kind == "negative dim":
        if not tensor.dims:
            tensor.dims.append(1)
        tensor.dims[0] = -int(c.rng.integers(1, 2**40))
    elif kind == "unknown data_type":
        tensor.data_type = c.draw([0, 999, 2**20, 64])
    elif kind == "huge dims, no data":
        del tensor.dims[:]
        tensor.dims.extend([2**32, 2**32])
        tensor.raw_data = b""
    elif kind == "typed values short":
        values = numpy_helper.to_array(tensor).astype(np.float32).reshape(-1)
        tensor.ClearField("raw_data")
        tensor.data_type = TensorProto.FLOAT
        tensor.float_data.extend(values[:-1].tolist())
        if values.size == 0:
            tensor.dims.append(1)
    elif kind == "string where a number is needed":
        conv = c.draw([n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")])
        weight = next(t for t in graph.initializer if t.name in conv.input)
        count = int(np.prod(weight.dims))
        weight.ClearField("raw_data")
        weight.data_type = TensorProto.STRING
        weight.string_data.extend([b"x"] * count)
    elif kind == "undefined outer-scope name":
        branch = helper.make_graph(
            [helper.make_node("Identity", [f"outer{int(c.rng.integers(10))}"], ["b_out"])], "b", [],
            [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)],
        )  # fmt: skip
        graph.initializer.append(numpy_helper.from_array(np.array(True), "campaign_cond"))
        graph.node.append(
            helper.make_node("If", ["campaign_cond"], ["campaign_if"], then_branch=branch, else_branch=branch)
        )
    elif kind in ("weight rank", "bias length", "zero output channels"):
        layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
        layer = c.draw(layers)
        slot = 2 if kind == "bias length" else 1
        weight = next(t for t in graph.initializer if t.name == layer.input[slot])
        array = numpy_helper.to_array(weight)
        if kind == "weight rank":
            changed = array.reshape(-1)
        elif kind == "bias length":
            changed = np.concatenate([array, array[:1]])
        else:
            changed = array[:0]
        weight.CopyFrom(numpy_helper.from_array(changed, weight.name))
        if kind == "zero output channels" and layer.op_type == "Gemm":
            weight.CopyFrom(numpy_helper.from_array(array.reshape(-1)[:0], weight.name))
    else:
        raise ValueError(kind)


INVALID_KINDS = [
    "undefined input", "output defined twice", "initializer defined twice", "initializer shadowing a node output",
    "undefined graph output", "negative dim", "unknown data_type", "huge dims, no data", "typed values short",
    "string where a number is needed", "undefined outer-scope name", "weight rank", "bias length",
    "zero output channels",
]  # fmt: skip


def invalid_graphs(c: Campaign, count: int) -> Iterator[tuple[str, list[str]]]:
    for number in range(count):
        name = c.draw(["vgg", "resnet", "matmul_mlp"])
        kind = INVALID_KINDS[number % len(INVALID_KINDS)]
        model = FIXTURES[name](0)
        if kind in ("weight rank", "bias length", "zero output channels") and name == "matmul_mlp":
            name, model = "vgg", FIXTURES["vgg"](0)
        _break(model, kind, c)
        folder = c.folder()
        path = folder / "invalid.onnx"
        path.write_bytes(model.SerializeToString())
        command = c.draw(["inspect", "permute", "resync"])
        args: list[object] = {
            "inspect": ["inspect", path],
            "permute": ["permute", path, "-o", folder / "p.onnx"],
            "resync": ["resync", c.inputs / f"{name}.onnx", path, "-o", folder / "r.onnx"],
        }[command]
        _, problems = c.run(args, expect=(2,), watch=[folder, c.inputs])
        if sorted(os.listdir(folder)) != ["invalid.onnx"]:
            problems.append(f"left in the folder: {sorted(os.listdir(folder))}")
        yield f"{kind} in {name} ({command})", problems


# -- hostile keys ------------------------------------------------------------------------------
_KEY_VALUES: list[Any] = [
    None, True, -1, 0, 1, 2**31, 2**63, -(2**63), 1e300, 0.5, "g0", "g99", "", [], {}, [0, 0], {"identity": -6},
    {"sum": [{"identity": 10**12}, {"identity": -(10**12) + 16}]}, {"sum": [{"identity": 22}, {"identity": -6}]},
    {"product": [{"identity": 0}, {"identity": 10**9}]}, {"group": "g0"}, {"interleave": []},
]  # fmt: skip


def _places(document: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(document, dict):
        for name, value in document.items():
            if name != "members":
                found += _places(value, (*prefix, name))
    elif isinstance(document, list):
        for index, value in enumerate(document[:12]):
            found += _places(value, (*prefix, index))
    return found


def _mutated_key(key: dict, c: Campaign) -> str:
    special = c.draw(["edit", "edit", "edit", "deep", "1e400", "NaN", "dup tensor", "dup group", "untied", "empty"])
    key = copy.deepcopy(key)
    if special == "deep":
        depth = int(c.rng.integers(65, 100_001))
        return "[" * depth + "]" * depth
    if special in ("1e400", "NaN"):
        return json.dumps(key).replace(f'"size": {key["groups"][0]["size"]}', f'"size": {special}', 1)
    if special == "dup tensor":
        key["tensors"].append(copy.deepcopy(c.draw(key["tensors"])))
    elif special == "dup group":
        key["groups"].append(copy.deepcopy(c.draw(key["groups"])))
    elif special == "untied":
        key["untied"].append({"source": "x", "copy": "nope", "nodes": [], "rewired": []})
    elif special == "empty":
        key["tensors"] = []
    else:
        for _ in range(int(c.rng.integers(1, 4))):
            place = c.draw(_places(key)[1:])
            parent = key
            for part in place[:-1]:
                parent = parent[part]
            action = c.draw(["replace", "replace", "delete", "duplicate", "swap"])
            if action == "replace":
                parent[place[-1]] = copy.deepcopy(c.draw(_KEY_VALUES))
            elif action == "delete":
                del parent[place[-1]]
            elif action == "duplicate" and isinstance(parent, list):
                parent.append(copy.deepcopy(parent[place[-1]]))
            elif action == "swap" and isinstance(parent[place[-1]], list) and len(parent[place[-1]]) > 1:
                values = parent[place[-1]]
                values[0], values[-1] = values[-1], values[0]
    return json.dumps(key)


def hostile_keys(c: Campaign, count: int) -> Iterator[tuple[str, list[str]]]:
    key = json.loads(c.key.read_text())
    source = onnx.load(str(c.vgg))
    for number in range(count):
        folder = c.folder()
        bad = folder / "in" / "key.json"
        bad.parent.mkdir()
        bad.write_text(_mutated_key(key, c))
        out = folder / "out"
        out.mkdir()
        command = c.draw(["unpermute", "unpermute", "unpermute", "true-key", "perms"])
        args: list[object] = {
            "unpermute": ["unpermute", c.perm, "--key", bad, "-o", out / "u.onnx", "--json"],
            "true-key": ["resync", c.vgg, c.perm, "-o", out / "r.onnx", "--true-key", bad],
            "perms": ["permute", c.vgg, "-o", out / "p.onnx", "--perms", bad],
        }[command]
        outcome, problems = c.run(args, expect=(0, 2), watch=[bad.parent, c.inputs])
        problems += [f"temporary left: {t}" for t in temporaries(out)]
        if outcome.code == 2 and os.listdir(out):
            problems.append(f"refused, but wrote {os.listdir(out)}")
        if command == "unpermute" and outcome.code == 0:
            document = json.loads(outcome.stdout)
            restored = onnx.load(str(out / "u.onnx"))
            same = all(
                a.SerializeToString() == b.SerializeToString()
                for a, b in zip(source.graph.initializer, restored.graph.initializer)
            )
            if (document["weights_identical_to_source"] or document["output_identical_to_source_file"]) and not same:
                problems.append("claimed bit-identical, but the weights differ")
        if command == "perms":
            problems += permute_set_problems(out / "p.onnx", out / "p.onnx.key.json")
        yield f"key #{number} ({command})", problems


# -- special input files -----------------------------------------------------------------------
READERS = [
    ["inspect", "{x}"], ["permute", "{x}", "-o", "{o}/p.onnx"], ["unpermute", "{x}", "--key", "{k}", "-o", "{o}/u.onnx"],
    ["unpermute", "{p}", "--key", "{x}", "-o", "{o}/u.onnx"], ["resync", "{x}", "{p}", "-o", "{o}/r.onnx"],
    ["resync", "{b}", "{x}", "-o", "{o}/r.onnx"], ["resync", "{b}", "{p}", "-o", "{o}/r.onnx", "--true-key", "{x}"],
    ["permute", "{b}", "-o", "{o}/p.onnx", "--perms", "{x}"], ["match", "{x}", "{p}"], ["audit", "{b}", "{x}"],
    ["watermark", "embed", "{x}", "--layer", LAYER, "-o", "{o}/w.onnx", "--key-out", "{o}/w.npz"],
    ["watermark", "extract", "{x}", "--key", "{w}"], ["watermark", "extract", "{b}", "--key", "{x}"],
    ["perturb", "{x}", "-o", "{o}/n.onnx", "--noise", "0.1"], ["verify", "{b}", "{x}"],
    ["verify", "{b}", "{p}", "--load-inputs", "{x}"],
]  # fmt: skip


def special_files(c: Campaign, count: int) -> Iterator[tuple[str, list[str]]]:
    kinds = ["fifo", "folder", "long name", "device", "dangling symlink", "symlink loop"]
    for number in range(count):
        command, kind = READERS[number % len(READERS)], kinds[(number // len(READERS)) % len(kinds)]
        folder = c.folder()
        special = folder / "special"
        if kind == "fifo":
            os.mkfifo(special)
        elif kind == "folder":
            special.mkdir()
        elif kind == "long name":
            special = folder / ("m" * 300 + ".onnx")
        elif kind == "device":
            special = Path(os.devnull)
        elif kind == "dangling symlink":
            os.symlink(folder / "nowhere", special)
        else:
            os.symlink(special, special)
        out = folder / "out"
        out.mkdir()
        names = {"b": c.vgg, "p": c.perm, "k": c.key, "w": c.wm_key, "o": out}
        args: list[object] = [a.format(x=special, **names) for a in command]
        _, problems = c.run(args, expect=(2,), timeout=60)
        if os.listdir(out):
            problems.append(f"refused, but wrote {os.listdir(out)}")
        yield f"{kind} as {' '.join(command[:2])}", problems


# -- output paths ------------------------------------------------------------------------------
_WRITERS = {
    "inspect": (["inspect", "{b}"], ["--dot"]),
    "permute": (["permute", "{b}", "-o", "{o}/p.onnx", "--perms", "{perms}"], ["-o", "--key-out"]),
    "unpermute": (["unpermute", "{p}", "--key", "{k}", "-o", "{o}/u.onnx"], ["-o"]),
    "resync": (["resync", "{b}", "{p}", "-o", "{o}/r.onnx", "--true-key", "{k}"], ["-o", "--key-out"]),
    "audit": (["audit", "{b}", "{p}"], ["--html", "--markdown", "--canonicalize"]),
    "perturb": (["perturb", "{b}", "-o", "{o}/n.onnx", "--noise", "0.1"], ["-o"]),
    "embed": (["watermark", "embed", "{b}", "--layer", LAYER, "-o", "{o}/w.onnx", "--key-out", "{o}/w.npz"],
              ["-o", "--key-out"]),
    "verify": (["permute", "{b}", "-o", "{o}/p.onnx", "--verify", "--provider", "cpu", "--load-inputs", "{feeds}"],
               ["-o", "--key-out"]),
}  # fmt: skip


def output_paths(c: Campaign, count: int) -> Iterator[tuple[str, list[str]]]:
    perms = c.inputs / "perms.json"
    perms.write_text(json.dumps({"g0": list(range(16))[::-1]}))
    feeds = c.inputs / "feeds.npz"
    np.savez(feeds, input=np.zeros((1, 3, 32, 32), np.float32))
    for number in range(count):
        command = sorted(_WRITERS)[number % len(_WRITERS)]
        template, options = _WRITERS[command]
        folder = c.folder()
        inputs = folder / "in"
        shutil.copytree(c.inputs, inputs, symlinks=True)
        names = {"b": inputs / "vgg.onnx", "p": inputs / "perm.onnx", "k": inputs / "k.json",
                 "perms": inputs / "perms.json", "feeds": inputs / "feeds.npz", "o": folder}  # fmt: skip
        args: list[object] = [a.format(**names) for a in template]
        read = [Path(str(a)) for a in args if os.path.isfile(str(a))]
        victim = c.draw(read)
        trick = c.draw(["path", "other spelling", "hard link", "symlink", "key is the model"])
        option = c.draw(options)
        if trick == "path":
            target = victim
        elif trick == "other spelling":
            target = victim.parent / "." / ".." / victim.parent.name / victim.name
        elif trick == "key is the model" and "--key-out" in options and "-o" in args:
            option, target = "--key-out", Path(str(args[args.index("-o") + 1]))
        else:
            target = folder / "alias"
            (os.link if trick == "hard link" else os.symlink)(victim, target)
        if option in args:
            args[args.index(option) + 1] = target
        else:
            args += [option, target]
        listing = sorted(os.listdir(folder))
        _, problems = c.run(args, expect=(2,), watch=[inputs])
        if sorted(os.listdir(folder)) != listing:
            problems.append(f"wrote {sorted(set(os.listdir(folder)) - set(listing))}")
        yield f"{command} {option} onto {victim.name} by {trick}", problems


# -- external-data paths -----------------------------------------------------------------------
_LOCATIONS: list[tuple[str, bool]] = [  # (location, refused?)
    ("../outside/w.data", True), ("{abs}", True), ("sub/../../outside/w.data", True), ("w.data\0x", True),
    ("x" * 300, True), ("", True), ("link.data", True), ("fifo.data", True), ("folder.data", True),
    ("missing.data", True), (".", True), ("w.data", False), ("./w.data", False), ("sub/../w.data", False),
]  # fmt: skip
_OFFSETS: list[tuple[dict[str, str], bool]] = [
    ({"offset": "-1"}, True), ({"offset": "x"}, True), ({"length": "-5"}, True), ({"length": "1e9"}, True),
    ({"offset": str(2**40)}, True), ({"length": str(2**40)}, True), ({}, False),
]  # fmt: skip


def external_data(c: Campaign, count: int) -> Iterator[tuple[str, list[str]]]:
    for number in range(count):
        folder = c.folder()
        models = folder / "models"
        (models / "sub").mkdir(parents=True)
        outside = folder / "outside"
        outside.mkdir()
        model = onnx.load(str(c.vgg))
        onnx.save_model(model, str(models / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="w.data", size_threshold=0)  # fmt: skip
        shutil.copy(models / "w.data", outside / "w.data")
        os.symlink(outside / "w.data", models / "link.data")
        os.mkfifo(models / "fifo.data")
        (models / "folder.data").mkdir()
        raw = onnx.load(str(models / "m.onnx"), load_external_data=False)
        tensors = [t for t in raw.graph.initializer if t.external_data]
        chosen = tensors if c.rng.random() < 0.3 else [c.draw(tensors)]
        if number % 2:
            location, refused = c.draw(_LOCATIONS)
            location = location.replace("{abs}", str(outside / "w.data"))
            for tensor in chosen:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = location
            label = f"location {location[:40]!r}"
        else:
            edits, refused = c.draw(_OFFSETS)
            for tensor in chosen:
                for entry in tensor.external_data:
                    if entry.key in edits:
                        entry.value = edits[entry.key]
                for name, value in edits.items():
                    if name not in {e.key for e in tensor.external_data}:
                        tensor.external_data.add(key=name, value=value)
            label = f"external data {edits}"
        (models / "m.onnx").write_bytes(raw.SerializeToString())
        out = folder / "out"
        out.mkdir()
        command = c.draw(["inspect", "permute", "permute external"])
        args: list[object] = {
            "inspect": ["inspect", models / "m.onnx"],
            "permute": ["permute", models / "m.onnx", "-o", out / "p.onnx"],
            "permute external": ["permute", models / "m.onnx", "-o", models / "p.onnx", "--external-data"],
        }[command]
        watch_before = sorted(os.listdir(models))
        outcome, problems = c.run(args, expect=(2,) if refused else (0,), watch=[models, outside], timeout=60)
        if command.startswith("permute") and outcome.code == 0:
            target = out if command == "permute" else models
            problems += permute_set_problems(target / "p.onnx", target / "p.onnx.key.json")
        if outcome.code == 2 and (os.listdir(out) or sorted(os.listdir(models)) != watch_before):
            problems.append("refused, but wrote files")
        problems += [f"temporary left: {t}" for t in temporaries(out) + temporaries(models)]
        yield f"{label} ({command})", problems


# -- kills and full disks ----------------------------------------------------------------------
@dataclass
class Job:
    """A command that writes an output set, and how to check what it left."""

    name: str
    args: Callable[[Path], list[object]]
    check: Callable[[Path, dict[str, str] | None], list[str]]
    outputs: Callable[[Path], list[Path]]


def _watermark_check(model: Path, key: Path, layer: str) -> list[str]:
    problems = all_or_none([model, key])
    if not problems and model.exists():
        extraction = onnxlady.extract_watermark(model, key)
        if extraction.bit_error_rate > 0 or extraction.layer != layer:
            problems.append(
                f"partial output set: the watermark key does not read the model (BER {extraction.bit_error_rate})"
            )
    return problems


def _single_model_check(model: Path) -> list[str]:
    if not model.exists():
        return []
    try:
        onnxlady.load_model(model)
    except onnxlady.OnnxladyError as exc:
        return [f"a broken output: {exc}"]
    return []


def jobs(reference: Path, permuted: Path, key: Path, layer: str) -> dict[str, Job]:
    return {
        "permute": Job(
            "permute",
            lambda o: ["permute", reference, "-o", o / "p.onnx", "--seed", 3],
            lambda o, previous: permute_set_problems(o / "p.onnx", o / "p.onnx.key.json", previous=previous),
            lambda o: [o / "p.onnx", o / "p.onnx.key.json"],
        ),
        "permute external": Job(
            "permute external",
            lambda o: ["permute", reference, "-o", o / "p.onnx", "--external-data", "--seed", 4],
            lambda o, previous: permute_set_problems(o / "p.onnx", o / "p.onnx.key.json", previous=previous),
            lambda o: [o / "p.onnx", o / "p.onnx.data", o / "p.onnx.key.json"],
        ),
        "resync": Job(
            "resync",
            lambda o: ["resync", reference, permuted, "-o", o / "r.onnx", "--key-out", o / "r.json"],
            lambda o, previous: resync_set_problems(o / "r.onnx", o / "r.json"),
            lambda o: [o / "r.onnx", o / "r.json"],
        ),
        "watermark embed": Job(
            "watermark embed",
            lambda o: ["watermark", "embed", reference, "--layer", layer, "-o", o / "w.onnx", "--key-out", o / "w.npz"],
            lambda o, previous: _watermark_check(o / "w.onnx", o / "w.npz", layer),
            lambda o: [o / "w.onnx", o / "w.npz"],
        ),
        "audit": Job(
            "audit",
            lambda o: [
                "audit",
                reference,
                permuted,
                "--markdown",
                o / "r.md",
                "--html",
                o / "r.html",
                "--canonicalize",
                o / "c.onnx",
            ],
            lambda o, previous: all_or_none([o / "r.md", o / "r.html", o / "c.onnx"]),
            lambda o: [o / "r.md", o / "r.html", o / "c.onnx"],
        ),
        "unpermute": Job(
            "unpermute",
            lambda o: ["unpermute", permuted, "--key", key, "-o", o / "u.onnx"],
            lambda o, previous: _single_model_check(o / "u.onnx"),
            lambda o: [o / "u.onnx"],
        ),
        "perturb": Job(
            "perturb",
            lambda o: ["perturb", reference, "-o", o / "n.onnx", "--noise", "0.5"],
            lambda o, previous: _single_model_check(o / "n.onnx"),
            lambda o: [o / "n.onnx"],
        ),
    }


def kills(
    c: Campaign, count: int, table: dict[str, Job], watch: Path, commit_delay: float = 0.0, *, killed: bool = False
) -> Iterator[tuple[str, list[str]]]:
    """SIGKILL at a random moment (uniform over 1.1 x the run's median length), half of the runs over an earlier set.

    A run that ends before its kill is checked all the same. ``count`` runs; with ``killed``,
    runs until ``count`` of them were actually killed (at most three times as many). With
    ``commit_delay``, every rename of the commit waits that long, so that many kills land
    between the renames of one set (the window a real commit leaves is microseconds).
    """
    names = sorted(table)
    durations = {}
    for name in names:  # three clean runs each: how long it takes, and that it works at all
        times = []
        for _ in range(3):
            folder = c.folder()
            outcome, problems = c.run(table[name].args(folder), watch=[watch], commit_delay=commit_delay)
            if problems or outcome.code != 0:
                raise RuntimeError(f"{name} fails without faults: {problems} {outcome.stderr}")
            times.append(outcome.seconds)
            shutil.rmtree(folder)
        durations[name] = float(np.median(times))
    done = 0
    for number in range(3 * count if killed else count):
        if killed and done >= count:
            return
        job = table[names[number % len(names)]]
        folder = c.folder()
        previous = None
        if number % 2 and job.name.startswith("permute"):
            earlier = run_cli([*job.args(folder)[:-1], "99", "--quiet"], c.root)  # another seed: another set
            if earlier.code != 0:
                raise RuntimeError(earlier.stderr)
            previous = snapshot(job.outputs(folder))
        delay = float(c.rng.uniform(0.0, 1.1 * durations[job.name]))
        outcome, problems = c.run(job.args(folder), kill_after=delay, watch=[watch], commit_delay=commit_delay)
        left = [folder / name for name in temporaries(folder)]
        phase = ""
        if left:  # what the kill interrupted: staging, or the renames after the journal
            phase = ", journal written" if any((path / "journal.json").exists() for path in left) else ", staged"
        c.next_run(folder)
        problems += [f"temporary left: {t}" for t in temporaries(folder)]
        problems += job.check(folder, previous)
        done += outcome.killed
        state = f"killed{phase}" if outcome.killed else f"exit {outcome.code}"
        yield f"{job.name} at {delay:.2f}s/{durations[job.name]:.2f}s ({state})", problems


def disk_full(c: Campaign, count: int, table: dict[str, Job], watch: Path) -> Iterator[tuple[str, list[str]]]:
    """RLIMIT_FSIZE at a random size below what the command writes: exit 2, nothing written."""
    names = sorted(table)
    sizes = {}
    for name in names:
        folder = c.folder()
        c.run(table[name].args(folder), watch=[watch])
        sizes[name] = max(path.stat().st_size for path in table[name].outputs(folder) if path.exists())
    for number in range(count):
        job = table[names[number % len(names)]]
        folder = c.folder()
        limit = int(c.rng.integers(0, sizes[job.name]))
        outcome, problems = c.run(job.args(folder), fsize=limit, expect=(2,), watch=[watch])
        if outcome.code == 2 and "cannot write" not in outcome.stderr:
            problems.append(f"unexpected message: {outcome.stderr.strip()[:120]}")
        left = sorted(os.listdir(folder))
        if left:
            problems.append(f"left after a full disk: {left}")
        yield f"{job.name} with {limit} bytes", problems


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every category's case count")
    parser.add_argument("--large-kills", type=int, default=54, help="runs killed on the large model (0: none)")
    parser.add_argument("--large-mb", type=int, default=96, help="weights of the large model, MiB")
    parser.add_argument("--workdir", type=Path, help="keep the cases here (default: a temporary folder)")
    parser.add_argument("--only", action="append", help="run only these categories")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="onnxlady-campaign-")) if args.workdir is None else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    c = Campaign(root, args.seed)
    medium_folder = root / "medium"
    medium_folder.mkdir()
    medium = medium_folder / "medium.onnx"
    onnx.save(build_large_model(4), str(medium))
    medium_permuted = medium_folder / "medium_perm.onnx"
    onnxlady.permute(medium, output=medium_permuted, key_out=medium_folder / "medium_key.json", seed=1)
    small_jobs = jobs(medium, medium_permuted, medium_folder / "medium_key.json", LARGE_LAYER)
    scale = args.scale
    categories: list[tuple[str, Callable[[], Iterator[tuple[str, list[str]]]]]] = [
        ("mutated model files", lambda: mutated_files(c, int(500 * scale))),
        ("invalid graphs", lambda: invalid_graphs(c, int(300 * scale))),
        ("hostile keys and perms", lambda: hostile_keys(c, int(400 * scale))),
        ("special input files", lambda: special_files(c, int(96 * scale))),
        ("output paths", lambda: output_paths(c, int(300 * scale))),
        ("external-data paths", lambda: external_data(c, int(200 * scale))),
        ("kills (4 MiB model)", lambda: kills(c, int(154 * scale), small_jobs, medium_folder)),
        (
            "kills in the commit (4 MiB model, renames slowed 0.2 s)",
            lambda: kills(c, int(70 * scale), small_jobs, medium_folder, commit_delay=0.2),
        ),
        ("disk full", lambda: disk_full(c, int(105 * scale), small_jobs, medium_folder)),
    ]
    if args.large_kills:
        large_folder = root / "large"
        large_folder.mkdir()
        large = large_folder / "large.onnx"
        onnx.save(build_large_model(args.large_mb), str(large))
        large_permuted = large_folder / "large_perm.onnx"
        onnxlady.permute(large, output=large_permuted, seed=1)
        table = jobs(large, large_permuted, large_folder / "large_perm.onnx.key.json", LARGE_LAYER)
        large_jobs = {name: table[name] for name in ("permute", "resync", "watermark embed")}
        size = large.stat().st_size / 1e6
        categories.append(
            (f"kills ({size:.0f} MB model)", lambda: kills(c, args.large_kills, large_jobs, large_folder, killed=True))
        )
    tallies: dict[str, Tally] = {}
    for name, cases in categories:
        if args.only and name.split(" (")[0] not in args.only:
            continue
        tally = tallies.setdefault(name, Tally())
        began = time.perf_counter()
        for label, problems in cases():
            tally.add(label, problems)
        print(f"  {name}: {tally.cases} cases, {tally.failures} failures ({time.perf_counter() - began:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    print("| category | cases | failures | partial output sets |\n|---|---:|---:|---:|")
    for name, tally in tallies.items():
        print(f"| {name} | {tally.cases} | {tally.failures} | {tally.partial_sets} |")
    kill_rows = [(name, tally) for name, tally in tallies.items() if tally.killed]
    total = Tally(sum(t.cases for t in tallies.values()), sum(t.failures for t in tallies.values()),
                  sum(t.partial_sets for t in tallies.values()))  # fmt: skip
    print(f"| **all** | **{total.cases}** | **{total.failures}** | **{total.partial_sets}** |")
    if kill_rows:
        print("\n| kills | runs | killed | while staging | after the journal (completed by the next run) |")
        print("|---|---:|---:|---:|---:|")
        for name, tally in kill_rows:
            print(f"| {name} | {tally.cases} | {tally.killed} | {tally.staged} | {tally.committing} |")
    for name, tally in tallies.items():
        for example in tally.examples:
            print(f"failure ({name}): {example}")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"\n{time.perf_counter() - start:.0f} s; seed {args.seed}; uptime: {uptime}")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if total.failures else 0


if __name__ == "__main__":
    sys.exit(main())
