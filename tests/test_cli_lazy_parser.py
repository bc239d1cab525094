"""Issue 15, small models' fixed costs: the command line builds only the subcommand it runs.

argparse spends milliseconds on every option it is given (each message goes through gettext,
which looks up its catalogue anew on every call, and each option builds a help formatter), and
the whole parser has some two hundred. A command line whose first word names a subcommand is
parsed by that subcommand's parser alone, so ``main`` builds only that one. These tests check
that it does, and that the parser it builds is the whole parser's, help texts and parsed
arguments alike.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

import pytest

from onnxlady import cli


def _children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parsed(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[Any, str, str]:
    """What parsing ``argv`` gives: the arguments (or the exit code), stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            namespace = vars(parser.parse_args(argv))
            parsed: Any = {k: (v.__name__ if k == "handler" else repr(v)) for k, v in namespace.items()}
        except SystemExit as exc:
            parsed = ("exit", exc.code)
    return parsed, out.getvalue(), err.getvalue()


#: Command lines of every subcommand: valid ones, help, and usage errors.
_ARGVS = [
    "demo --seed 2", "inspect m.onnx --members --dot d.dot --json",
    "permute m.onnx -o o.onnx --seed 3 --group g1 --group g2 --verify --atol 1e-3 --shape x:1x3 --max-memory 2G --kv-state",
    "permute m.onnx -o o.onnx --see 3", "permute m.onnx", "permute m.onnx -o o.onnx --seed x", "permute -- -m.onnx -o o",
    "unpermute m.onnx --key k.json -o o.onnx --allow-changed-model", "unpermute m.onnx -o o.onnx",
    "resync r.onnx s.onnx -o o.onnx --method argmax --refine --key-out k.json", "resync r s -o o --method bad",
    "match r.onnx s.onnx --json", "audit r.onnx s.onnx --rtol 0.1 --html h.html --canonicalize c.onnx",
    "watermark embed m.onnx --layer conv --key-out wm.npz -o o.onnx --bits 32", "watermark extract m.onnx --key wm.npz",
    "watermark", "watermark mark", "perturb m.onnx -o o.onnx --noise 0.1 --only g1", "index build a b -o i.json --workers 2",
    "index", "find s.onnx --index i.json --top 3", "find --index i.json --all-pairs",
    "verify a.onnx b.onnx --no-squash-inputs --val-range x:[0,1] --iterations 2", "verify a.onnx",
]  # fmt: skip


@pytest.mark.parametrize("command", sorted(_children(cli.build_parser())))
def test_a_subcommand_built_alone_is_the_whole_parsers(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Help texts (nested actions' too) and parsed arguments are those of the parser with every subcommand."""
    monkeypatch.setenv("COLUMNS", "100")  # one width for both (help is wrapped to the terminal)
    whole, alone = cli.build_parser(), cli.build_parser(command)
    assert list(_children(alone)) == [command]
    parsers = [(_children(whole)[command], _children(alone)[command])]
    parsers += [(_children(parsers[0][0])[name], sub) for name, sub in _children(parsers[0][1]).items()]
    for full, built in parsers:
        assert built.format_help() == full.format_help()
    argvs = [argv.split() for argv in _ARGVS if argv.split()[0] == command]
    argvs += [[command], [command, "--help"], [command, "--bogus"]]
    for argv in argvs:
        assert _parsed(alone, argv) == _parsed(whole, argv), argv


def test_main_builds_only_the_subcommand_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``permute`` builds permute's parser only; a first word naming no subcommand builds them all."""
    built: list[str] = []
    builders = {
        name: (lambda commands, name=name, add=add: (built.append(name), add(commands))[1])
        for name, add in cli._BUILDERS.items()
    }
    monkeypatch.setattr(cli, "_BUILDERS", builders)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        cli.main(["permute", "--help"])
    assert built == ["permute"]
    built.clear()
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
        cli.main(["permut", "m.onnx"])  # a usage error: its message lists every subcommand
    assert built == list(cli._BUILDERS)
    assert "invalid choice: 'permut' (choose from 'demo', 'inspect', 'permute'," in err.getvalue()
