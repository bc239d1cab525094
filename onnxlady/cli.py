"""The ``onnxlady`` command line: argparse, then one public API call, then its text or JSON.

Subcommands in the style of Polygraphy: explicit tolerances, seeds and per-output reporting,
``--json`` on every command for pipelines. Each subcommand calls the public function of the same
name (:func:`onnxlady.permute` for ``permute``...) with its options as keyword arguments, and the
defaults shown in ``--help`` are read from those functions' signatures, so the command line and
the API cannot drift apart. Exit codes: 0 success, 1 a negative verdict (outputs not equivalent),
2 bad input or usage (one line on stderr, never a traceback), 3 an internal error.

This module imports only the standard library and the public API.
"""

from __future__ import annotations

import argparse
import inspect as pyinspect
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

import onnxlady

Progress = Callable[[str], None] | None
#: A subcommand's handler: the parsed arguments and a progress printer in, a public result out.
Handler = Callable[[argparse.Namespace, Progress], Any]


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Terminated(BaseException):
    """SIGTERM, raised where the program is so that every output set removes its temporaries."""


def _terminate(signum: int, frame: object) -> NoReturn:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    _import_command(sys.argv[1:] if argv is None else argv)
    # SIGTERM unwinds like Ctrl-C (outputs staged so far are removed), then exits 143.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    # Ctrl-C during the imports exited at once (see onnxlady/__init__.py); from here on it unwinds,
    # removing what was staged, and after the command it exits at once again.
    starting = getattr(onnxlady, "_interrupted_while_starting", None)
    took_over = in_main_thread and starting is not None and signal.getsignal(signal.SIGINT) is starting
    if took_over:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            with warnings.catch_warnings():
                # Library warnings (numpy's "invalid value in sqrt" on a hostile model...) are not the
                # user's business: stderr carries progress and one error line; debugging shows them.
                if not os.environ.get("ONNXLADY_DEBUG"):
                    warnings.simplefilter("ignore")
                return _main(argv)
        except KeyboardInterrupt:  # while the arguments were parsed, before any command ran
            print("onnxlady: interrupted", file=sys.stderr)
            return 130
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            if took_over:
                signal.signal(signal.SIGINT, starting)
    except _Terminated:  # while the arguments were parsed, or as the handlers were put back
        print("onnxlady: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


def _main(argv: Sequence[str] | None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # A first word naming a subcommand is parsed by its parser alone (see build_parser).
    parser = build_parser(arguments[0] if arguments and arguments[0] in _BUILDERS else None)
    args = parser.parse_args(arguments)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    progress = _progress_printer(args)
    try:
        try:
            result = args.handler(args, progress)
        finally:  # the bar goes (or the line printer stops) before anything else is printed
            if progress is not None:
                progress.close()
        _emit(args, result)
        # A result that printed what it did and still failed (an index build that read no file)
        # says why in one line on stderr, as bad input does.
        failure = getattr(result, "failure", None)
        if failure:
            print(f"onnxlady: error: {_printable(failure)}", file=sys.stderr)
        return int(result.exit_code)
    except onnxlady.OnnxladyError as exc:
        print(f"onnxlady: error: {_printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("onnxlady: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("onnxlady: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except MemoryError as exc:  # sizes the user chose (a --shape, a model) that do not fit in memory
        message = _printable(" ".join(str(exc).split())) or "an allocation failed"
        print(f"onnxlady: error: not enough memory: {message} (smaller --shape or inputs?)", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug must still end in one line unless debugging
        if os.environ.get("ONNXLADY_DEBUG"):
            raise
        message = _printable(" ".join(str(exc).split()))
        print(
            f"onnxlady: internal error: {type(exc).__name__}: {message} (set ONNXLADY_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 3


# -- handlers: one public call each ----------------------------------------------------------
def _demo(args: argparse.Namespace, progress: Progress) -> onnxlady.DemoResult:
    return onnxlady.demo(seed=args.seed, workdir=args.workdir, progress=progress)


def _inspect(args: argparse.Namespace, progress: Progress) -> onnxlady.InspectResult:
    return onnxlady.inspect(
        args.model, dot=args.dot, members=args.members, kv_state=args.kv_state, progress=progress
    )


def _permute(args: argparse.Namespace, progress: Progress) -> onnxlady.PermuteResult:
    return onnxlady.permute(
        args.model, output=args.output, seed=args.seed, key_out=args.key_out, group=args.group, perms=args.perms,
        verify=args.verify, **_verify_options(args), external_data=args.external_data,
        overwrite_input=args.overwrite_input, progress=progress, max_memory=args.max_memory, kv_state=args.kv_state,
    )  # fmt: skip


def _unpermute(args: argparse.Namespace, progress: Progress) -> onnxlady.UnpermuteResult:
    return onnxlady.unpermute(
        args.model, args.key, output=args.output, external_data=args.external_data,
        overwrite_input=args.overwrite_input, allow_changed_model=args.allow_changed_model, progress=progress,
        max_memory=args.max_memory,
    )  # fmt: skip


def _resync(args: argparse.Namespace, progress: Progress) -> onnxlady.ResyncResult:
    return onnxlady.resync(
        args.reference, args.suspect, output=args.output, key_out=args.key_out, true_key=args.true_key,
        method=args.method, refine=args.refine, external_data=args.external_data,
        overwrite_input=args.overwrite_input, progress=progress, max_memory=args.max_memory,
    )  # fmt: skip


def _match(args: argparse.Namespace, progress: Progress) -> onnxlady.MatchResult:
    return onnxlady.match(args.reference, args.suspect, progress=progress)


def _audit(args: argparse.Namespace, progress: Progress) -> onnxlady.AuditResult:
    return onnxlady.audit(
        args.reference, args.suspect, rtol=args.rtol, method=args.method, refine=args.refine, html=args.html,
        markdown=args.markdown, canonicalize=args.canonicalize, progress=progress, max_memory=args.max_memory,
    )  # fmt: skip


def _embed(args: argparse.Namespace, progress: Progress) -> onnxlady.WatermarkResult:
    return onnxlady.embed_watermark(
        args.model, args.layer, output=args.output, key_out=args.key_out, bits=args.bits, seed=args.seed,
        shape=args.shape, external_data=args.external_data, overwrite_input=args.overwrite_input, progress=progress,
    )  # fmt: skip


def _extract(args: argparse.Namespace, progress: Progress) -> onnxlady.WatermarkExtraction:
    return onnxlady.extract_watermark(args.model, args.key)


def _perturb(args: argparse.Namespace, progress: Progress) -> onnxlady.PerturbResult:
    return onnxlady.perturb(
        args.model, output=args.output, noise=args.noise, quantize=args.quantize, prune=args.prune, seed=args.seed,
        only=args.only, external_data=args.external_data, overwrite_input=args.overwrite_input, progress=progress,
    )  # fmt: skip


def _verify(args: argparse.Namespace, progress: Progress) -> onnxlady.VerifyResult:
    return onnxlady.verify(args.reference, args.candidate, **_verify_options(args), progress=progress)


def _index_build(args: argparse.Namespace, progress: Progress) -> onnxlady.IndexResult:
    return onnxlady.build_index(
        args.paths, args.index, workers=args.workers, engine=args.engine, scheduler=args.scheduler, progress=progress
    )


def _find(args: argparse.Namespace, progress: Progress) -> onnxlady.FindResult | onnxlady.ClusterResult:
    if args.all_pairs and args.suspect is not None:
        raise onnxlady.OnnxladyError("find: give either SUSPECT or --all-pairs, not both")
    if args.all_pairs:
        return onnxlady.find(None, args.index, threshold=args.threshold, all_pairs=True, progress=progress)
    if args.suspect is None:
        raise onnxlady.OnnxladyError("find: a SUSPECT model is needed (or --all-pairs to list related models)")
    return onnxlady.find(
        args.suspect, args.index, top=args.top, confirm=args.confirm, threshold=args.threshold, progress=progress
    )


def _verify_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "provider": args.provider, "atol": args.atol, "rtol": args.rtol, "iterations": args.iterations,
        "input_seed": args.input_seed, "shape": args.shape, "add_output": args.add_output,
        "val_range": args.val_range, "load_inputs": args.load_inputs, "data_loader_script": args.data_loader_script,
        "squash_inputs": args.squash_inputs,
    }  # fmt: skip


# -- the parser ------------------------------------------------------------------------------
def _default(function: Callable[..., Any], name: str) -> Any:
    """The default of ``function``'s keyword ``name``: the command line shows and uses the API's."""
    return pyinspect.signature(function).parameters[name].default


#: The package's names each subcommand runs and reads its defaults from (:func:`_import_command`).
_COMMAND_NAMES: dict[str, tuple[str, ...]] = {
    "demo": ("demo",),
    "inspect": ("inspect",),
    "permute": ("permute",),
    "unpermute": ("unpermute",),
    "resync": ("resync",),
    "match": ("match",),
    "audit": ("audit",),
    "watermark": ("embed_watermark", "extract_watermark"),
    "perturb": ("perturb",),
    "index": ("build_index",),
    "find": ("find",),
    "verify": ("verify",),
}


def _import_command(arguments: Sequence[str]) -> None:
    """Import what the command line will run while Ctrl-C still ends the process at once.

    The package imports each of its names on first use (``onnxlady/__init__.py``), so the
    command's modules, numpy's and onnx's extensions among them, are imported here, before
    :func:`main` takes Ctrl-C (and SIGTERM) over: an extension interrupted while it imports
    raises an ImportError, not the KeyboardInterrupt, and nothing unwinds cleanly from there.
    Any first word that names no subcommand (``--help``, a typo) builds every subcommand's
    parser, which reads every command's defaults: all are imported.
    """
    named = _COMMAND_NAMES.get(arguments[0]) if arguments else None
    for name in (*(named or (name for names in _COMMAND_NAMES.values() for name in names)), "ProgressReporter"):
        getattr(onnxlady, name)


#: The subcommands' parsers are added to this (``add_subparsers``'s action).
Commands: TypeAlias = "argparse._SubParsersAction[_Parser]"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``onnxlady`` argument parser: one subcommand per public function.

    Args:
        command: build only this subcommand (default: all of them). A command line whose
            first word is a subcommand's name is parsed by that subcommand's parser alone (the
            others are never asked), so :func:`main` builds only that one: argparse spends
            milliseconds on each option of the other ones (gettext looks up every message).
    """
    parser = _Parser(
        prog="onnxlady",
        description="Permute, verify and re-synchronize the neurons of ONNX models at graph level.",
    )
    parser.add_argument("--version", action="version", version=f"onnxlady {onnxlady.__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for name, add in _BUILDERS.items():
        if command is None or name == command:
            add(commands)
    return parser


def _add_demo(commands: Commands) -> None:
    """The ``demo`` subcommand."""
    demo = commands.add_parser("demo", help="run the whole job end to end on a model onnxlady builds")
    seed = _default(onnxlady.demo, "seed")
    demo.add_argument("--seed", type=int, default=seed, help=f"seed of the permutation (default {seed})")
    demo.add_argument("--workdir", type=Path, help="keep the demo's files in this folder (default: a temporary one)")
    _common(demo, _demo)


def _add_inspect(commands: Commands) -> None:
    """The ``inspect`` subcommand."""
    inspect = commands.add_parser("inspect", help="show the coupled channel groups and why some are frozen")
    inspect.add_argument("model", type=Path)
    inspect.add_argument("--dot", type=Path, metavar="FILE", help="write the group graph for Graphviz")
    inspect.add_argument("--members", action="store_true", help="list every member of every group")
    inspect.add_argument(
        "--kv-state", action="store_true",
        help="analyse each KV cache (past_key_values.* input, present.* output) as one state, as permute --kv-state does",
    )  # fmt: skip
    _common(inspect, _inspect)


def _add_permute(commands: Commands) -> None:
    """The ``permute`` subcommand."""
    permute = commands.add_parser("permute", help="permute the neurons of every permutable group")
    permute.add_argument("model", type=Path)
    _output_options(permute)
    seed = _default(onnxlady.permute, "seed")
    permute.add_argument("--seed", type=int, default=seed, help=f"seed of the random permutations (default {seed})")
    permute.add_argument("--key-out", type=Path, help="where to write the key (default OUTPUT.key.json)")
    permute.add_argument("--group", action="append", metavar="ID", help="permute only this group (repeatable)")
    permute.add_argument(
        "--perms", type=Path, metavar="FILE", help="JSON {group id: permutation} instead of random ones"
    )
    permute.add_argument("--verify", action="store_true", help="check the result with ONNX Runtime")
    permute.add_argument(
        "--kv-state", action="store_true",
        help="permute each KV cache (past_key_values.* input, present.* output) as one state (see docs/cli.md)",
    )  # fmt: skip
    _check_options(permute)
    _memory_option(permute)
    _common(permute, _permute)


def _add_unpermute(commands: Commands) -> None:
    """The ``unpermute`` subcommand."""
    unpermute = commands.add_parser("unpermute", help="undo a permutation with its key")
    unpermute.add_argument("model", type=Path)
    unpermute.add_argument("--key", type=Path, required=True)
    _output_options(unpermute)
    unpermute.add_argument(
        "--allow-changed-model", action="store_true",
        help="apply the key although the model's sha256 is not the one the key recorded (changed after permuting)",
    )  # fmt: skip
    _memory_option(unpermute)
    _common(unpermute, _unpermute)


def _add_resync(commands: Commands) -> None:
    """The ``resync`` subcommand."""
    resync = commands.add_parser("resync", help="put a permuted (and perturbed) copy back in a reference's order")
    resync.add_argument("reference", type=Path)
    resync.add_argument("suspect", type=Path)
    _output_options(resync)
    resync.add_argument("--key-out", type=Path, help="write the recovered key here")
    resync.add_argument("--true-key", type=Path, help="the key that made the suspect: report Psi")
    resync.add_argument("--method", choices=("hungarian", "argmax"), default=_default(onnxlady.resync, "method"))
    resync.add_argument("--refine", action="store_true", help="re-solve every group with all its slices aligned")
    _memory_option(resync)
    _common(resync, _resync)


def _add_match(commands: Commands) -> None:
    """The ``match`` subcommand."""
    match = commands.add_parser(
        "match", help="pair the groups of two models whose graphs differ (a converter ran on one of them)"
    )
    match.add_argument("reference", type=Path)
    match.add_argument("suspect", type=Path)
    _common(match, _match)


def _add_audit(commands: Commands) -> None:
    """The ``audit`` subcommand."""
    audit = commands.add_parser("audit", help="is the suspect the reference, up to permutation? what was done to it?")
    audit.add_argument("reference", type=Path)
    audit.add_argument("suspect", type=Path)
    audit_rtol = _default(onnxlady.audit, "rtol")
    audit.add_argument(
        "--rtol", type=float, default=audit_rtol, help=f"relative tolerance for float rounding (default {audit_rtol:g})"
    )
    audit.add_argument("--method", choices=("hungarian", "argmax"), default=_default(onnxlady.audit, "method"))
    audit.add_argument("--refine", action="store_true", help="refine the resync before comparing")
    audit.add_argument("--html", type=Path, metavar="REPORT.html", help="write a self-contained HTML report")
    audit.add_argument("--markdown", type=Path, metavar="REPORT.md", help="write a Markdown report")
    audit.add_argument(
        "--canonicalize", type=Path, metavar="OUT.onnx",
        help="write the resynchronized suspect with function-preserving rescaling undone",
    )  # fmt: skip
    _memory_option(audit)
    _common(audit, _audit)


def _add_watermark(commands: Commands) -> None:
    """The ``watermark`` subcommand."""
    watermark = commands.add_parser("watermark", help="embed or extract a white-box (Uchida) watermark in a Conv layer")
    marks = watermark.add_subparsers(title="actions", metavar="ACTION", parser_class=_Parser)
    marks.required = True
    embed = marks.add_parser("embed", help="mark a Conv layer without retraining (smallest weight change)")
    embed.add_argument("model", type=Path)
    embed.add_argument("--layer", required=True, help="name of the Conv node to mark")
    bits = _default(onnxlady.embed_watermark, "bits")
    embed.add_argument("--bits", type=int, default=bits, help=f"number of bits (default {bits})")
    embed.add_argument(
        "--seed", type=int, default=_default(onnxlady.embed_watermark, "seed"),
        help="seed of the secret projection and the bits",
    )  # fmt: skip
    embed.add_argument("--key-out", type=Path, required=True, metavar="WM.npz", help="where to write the secret key")
    embed.add_argument(
        "--shape", action="append", default=[], metavar="NAME:1x3x224x224",
        help="input shape for the output-change measurement, as for verify (repeatable)",
    )  # fmt: skip
    _output_options(embed)
    _common(embed, _embed)
    extract = marks.add_parser("extract", help="read the bits back and report the bit error rate")
    extract.add_argument("model", type=Path)
    extract.add_argument("--key", type=Path, required=True, metavar="WM.npz")
    _common(extract, _extract)


def _add_perturb(commands: Commands) -> None:
    """The ``perturb`` subcommand."""
    perturb = commands.add_parser("perturb", help="add noise, quantize or prune the weight tensors")
    perturb.add_argument("model", type=Path)
    _output_options(perturb)
    perturb.add_argument("--noise", type=float, metavar="OMEGA", help="add N(0, (OMEGA*std(t))^2) to each weight t")
    perturb.add_argument("--quantize", type=int, metavar="BITS", help="uniform min-max, 2^BITS levels per tensor")
    perturb.add_argument("--prune", type=float, metavar="PERCENT", help="zero the PERCENT smallest-magnitude entries")
    seed = _default(onnxlady.perturb, "seed")
    perturb.add_argument("--seed", type=int, default=seed, help=f"seed of the noise (default {seed})")
    perturb.add_argument(
        "--only", action="append", metavar="GROUP_ID|TENSOR", help="perturb only these groups' or tensors' weights"
    )
    _common(perturb, _perturb)


def _add_index(commands: Commands) -> None:
    """The ``index`` subcommand."""
    index = commands.add_parser("index", help="fingerprint a registry of models into one index file")
    index_actions = index.add_subparsers(title="actions", metavar="ACTION", parser_class=_Parser)
    index_actions.required = True
    build = index_actions.add_parser(
        "build", help="fingerprint the models under PATHs into INDEX (only new or changed files)"
    )
    build.add_argument("paths", nargs="+", metavar="PATH", help="model files, folders (searched for *.onnx) or URLs")
    build.add_argument("-o", "--index", dest="index", type=Path, required=True, metavar="INDEX", help="the index file")
    build.add_argument(
        "--workers", type=int, metavar="N", help="worker processes (default: one per CPU; 1: this process)"
    )
    engine = _default(onnxlady.build_index, "engine")
    build.add_argument(
        "--engine", choices=("process", "dask"), default=engine,
        help=f"a local process pool, or a Dask cluster (pip install 'onnxlady[scale]') (default {engine})",
    )  # fmt: skip
    build.add_argument(
        "--scheduler", metavar="ADDR", help="with --engine dask: a running scheduler (tcp://host:8786); default: a local cluster"
    )
    _common(build, _index_build)


def _add_find(commands: Commands) -> None:
    """The ``find`` subcommand."""
    find = commands.add_parser(
        "find", help="rank an index's models by how likely SUSPECT derives from them (or list related models)"
    )
    find.add_argument("suspect", type=Path, nargs="?", metavar="SUSPECT", help="the model to trace")
    find.add_argument("--index", type=Path, required=True, metavar="INDEX", help="an index from 'onnxlady index build'")
    top = _default(onnxlady.find, "top")
    find.add_argument("--top", type=int, default=top, metavar="K", help=f"candidates to show (default {top})")
    find.add_argument("--confirm", action="store_true", help="audit each candidate against the suspect (resync + verdict)")
    find.add_argument(
        "--threshold", type=float, default=_default(onnxlady.find, "threshold"), metavar="T",
        help="a fixed largest fingerprint distance called 'derived' (default: the limit the number of layers "
        "compared sets, 0.40 at 3 layers to 0.90 at 60; see docs/provenance.md)",
    )  # fmt: skip
    find.add_argument("--all-pairs", action="store_true", help="list every cluster of related models in INDEX instead")
    _common(find, _find)


def _add_verify(commands: Commands) -> None:
    """The ``verify`` subcommand."""
    verify = commands.add_parser("verify", help="run two models in ONNX Runtime and compare their outputs")
    verify.add_argument("reference", type=Path)
    verify.add_argument("candidate", type=Path)
    _check_options(verify)
    _common(verify, _verify)


#: Each subcommand's builder, in the order ``onnxlady --help`` lists them.
_BUILDERS: dict[str, Callable[[Commands], None]] = {
    "demo": _add_demo,
    "inspect": _add_inspect,
    "permute": _add_permute,
    "unpermute": _add_unpermute,
    "resync": _add_resync,
    "match": _add_match,
    "audit": _add_audit,
    "watermark": _add_watermark,
    "perturb": _add_perturb,
    "index": _add_index,
    "find": _add_find,
    "verify": _add_verify,
}


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, required=True, help="the model to write")
    parser.add_argument("--external-data", action="store_true", help="save weights to OUTPUT.data")
    parser.add_argument("--overwrite-input", action="store_true", help="allow OUTPUT to be an input file")


def _memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-memory", metavar="SIZE",
        help="refuse to start (exit 2) when the estimated peak memory exceeds SIZE (e.g. 2G, 512M)",
    )  # fmt: skip


def _common(parser: argparse.ArgumentParser, handler: Handler) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    parser.set_defaults(handler=handler)


def _check_options(parser: argparse.ArgumentParser) -> None:
    """The equivalence check's options, with :func:`onnxlady.verify`'s defaults."""
    group = parser.add_argument_group("equivalence check")
    atol, rtol = _default(onnxlady.verify, "atol"), _default(onnxlady.verify, "rtol")
    iterations, input_seed = _default(onnxlady.verify, "iterations"), _default(onnxlady.verify, "input_seed")
    group.add_argument("--provider", choices=("auto", "cuda", "cpu"), default=_default(onnxlady.verify, "provider"))
    group.add_argument(
        "--atol", type=float, default=atol,
        help="absolute tolerance (default 1e-4; 4e-3 for models computing in float16, 3e-2 in bfloat16)",
    )  # fmt: skip
    group.add_argument(
        "--rtol", type=float, default=rtol,
        help="relative tolerance (default 1e-3; 1e-2 for models computing in float16, 8e-2 in bfloat16)",
    )  # fmt: skip
    group.add_argument(
        "--iterations", type=int, default=iterations, help=f"number of random input batches (default {iterations})"
    )
    group.add_argument(
        "--input-seed", dest="input_seed", type=int, default=input_seed,
        help=f"seed of the inputs (default {input_seed})",
    )  # fmt: skip
    group.add_argument("--shape", action="append", default=[], metavar="NAME:1x3x224x224", help="input shape")
    group.add_argument(
        "--add-output", action="append", default=[], metavar="TENSOR",
        help="also compare this intermediate tensor (e.g. logits before a saturating activation)",
    )  # fmt: skip
    group.add_argument(
        "--val-range", action="append", default=[], metavar="NAME:[lo,hi]",
        help="range of an input's generated values ([lo,hi] alone: every other input)",
    )  # fmt: skip
    group.add_argument(
        "--load-inputs", type=Path, metavar="FILE",
        help="run these feeds instead of generated ones (Polygraphy JSON or .npz)",
    )  # fmt: skip
    group.add_argument(
        "--data-loader-script", metavar="FILE.py[:FUNC]",
        help="a script whose function (load_data by default) returns the feeds",
    )  # fmt: skip
    group.add_argument(
        "--no-squash-inputs", dest="squash_inputs", action="store_false",
        help="compare the graph outputs only, not also the inputs of the Sigmoid/Softmax/Tanh/Clip making them",
    )  # fmt: skip


# -- rendering -------------------------------------------------------------------------------
def _progress_printer(args: argparse.Namespace) -> onnxlady.ProgressReporter | None:
    """A bar on a terminal, one line every few seconds elsewhere; nothing with ``--quiet``."""
    if getattr(args, "quiet", False):
        return None
    return onnxlady.ProgressReporter(sys.stderr)


def _emit(args: argparse.Namespace, result: Any) -> None:
    """Print the result: its JSON document with ``--json``, else its text (control characters shown, not sent)."""
    print(result.to_json_text() if args.json else _printable(result.to_text()))


#: Characters a terminal would act on (ESC sequences, carriage returns, bidirectional overrides):
#: names in a model are data, so they are printed as escapes. Newlines and tabs are kept.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    """``text`` with every terminal control character replaced by its Python escape (ESC: backslash x1b)."""
    return _CONTROL.sub(lambda match: ascii(match.group())[1:-1], text)


if __name__ == "__main__":
    sys.exit(main())
