"""The ``onnxlady`` command line.

Subcommands in the style of Polygraphy: explicit tolerances, seeds and per-output reporting,
``--json`` on every command for pipelines. Exit codes: 0 success, 1 a negative verdict
(outputs not equivalent), 2 bad input or usage (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import numpy as np

from onnxlady import __version__
from onnxlady._analysis._channels import ChannelAnalysis, analyze
from onnxlady._errors import OnnxladyError
from onnxlady._io._files import LoadedModel, load_model, save_model, write_atomically
from onnxlady._transforms._key import read_key
from onnxlady._transforms._permute import DeferredTensors, draw_permutations, permute_model, unpermute_model
from onnxlady._verify._compare import DEFAULT_ATOL, DEFAULT_RTOL, VerifyReport, parse_shape_overrides, verify_models

Progress = Callable[[str], None] | None


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    progress = _progress_printer(args)
    try:
        return int(args.handler(args, progress))
    except OnnxladyError as exc:
        print(f"onnxlady: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("onnxlady: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug must still end in one line unless debugging
        if os.environ.get("ONNXLADY_DEBUG"):
            raise
        message = " ".join(str(exc).split())
        print(
            f"onnxlady: internal error: {type(exc).__name__}: {message} (set ONNXLADY_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 3


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxlady",
        description="Permute, verify and re-synchronize the neurons of ONNX models at graph level.",
    )
    parser.add_argument("--version", action="version", version=f"onnxlady {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser("demo", help="run the whole job end to end on a model onnxlady builds")
    demo.add_argument("--seed", type=int, default=0, help="seed of the permutation (default 0)")
    demo.add_argument("--workdir", type=Path, help="keep the demo's files in this folder (default: a temporary one)")
    _common(demo)
    demo.set_defaults(handler=_cmd_demo)

    inspect = commands.add_parser("inspect", help="show the coupled channel groups and why some are frozen")
    inspect.add_argument("model", type=Path)
    inspect.add_argument("--dot", type=Path, metavar="FILE", help="write the group graph for Graphviz")
    inspect.add_argument("--members", action="store_true", help="list every member of every group")
    _common(inspect)
    inspect.set_defaults(handler=_cmd_inspect)

    permute = commands.add_parser("permute", help="permute the neurons of every permutable group")
    permute.add_argument("model", type=Path)
    _output_options(permute)
    permute.add_argument("--seed", type=int, default=0, help="seed of the random permutations (default 0)")
    permute.add_argument("--key-out", type=Path, help="where to write the key (default OUTPUT.key.json)")
    permute.add_argument("--group", action="append", metavar="ID", help="permute only this group (repeatable)")
    permute.add_argument("--perms", type=Path, metavar="FILE", help="JSON {group id: permutation} instead of random ones")
    permute.add_argument("--verify", action="store_true", help="check the result with ONNX Runtime")
    _verify_options(permute)
    _common(permute)
    permute.set_defaults(handler=_cmd_permute)

    unpermute = commands.add_parser("unpermute", help="undo a permutation with its key")
    unpermute.add_argument("model", type=Path)
    unpermute.add_argument("--key", type=Path, required=True)
    _output_options(unpermute)
    _common(unpermute)
    unpermute.set_defaults(handler=_cmd_unpermute)

    resync = commands.add_parser("resync", help="put a permuted (and perturbed) copy back in a reference's order")
    resync.add_argument("reference", type=Path)
    resync.add_argument("suspect", type=Path)
    _output_options(resync)
    resync.add_argument("--key-out", type=Path, help="write the recovered key here")
    resync.add_argument("--true-key", type=Path, help="the key that made the suspect: report Psi")
    resync.add_argument("--method", choices=("hungarian", "argmax"), default="hungarian")
    resync.add_argument("--refine", action="store_true", help="re-solve every group with all its slices aligned")
    _common(resync)
    resync.set_defaults(handler=_cmd_resync)

    match = commands.add_parser(
        "match", help="pair the groups of two models whose graphs differ (a converter ran on one of them)"
    )
    match.add_argument("reference", type=Path)
    match.add_argument("suspect", type=Path)
    _common(match)
    match.set_defaults(handler=_cmd_match)

    audit = commands.add_parser("audit", help="is the suspect the reference, up to permutation? what was done to it?")
    audit.add_argument("reference", type=Path)
    audit.add_argument("suspect", type=Path)
    audit.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance for float rounding (default 1e-5)")
    audit.add_argument("--method", choices=("hungarian", "argmax"), default="hungarian")
    audit.add_argument("--refine", action="store_true", help="refine the resync before comparing")
    audit.add_argument("--html", type=Path, metavar="REPORT.html", help="write a self-contained HTML report")
    audit.add_argument("--markdown", type=Path, metavar="REPORT.md", help="write a Markdown report")
    audit.add_argument(
        "--canonicalize", type=Path, metavar="OUT.onnx",
        help="write the resynchronized suspect with function-preserving rescaling undone",
    )  # fmt: skip
    _common(audit)
    audit.set_defaults(handler=_cmd_audit)

    watermark = commands.add_parser("watermark", help="embed or extract a white-box (Uchida) watermark in a Conv layer")
    marks = watermark.add_subparsers(title="actions", metavar="ACTION", parser_class=_Parser)
    marks.required = True
    embed = marks.add_parser("embed", help="mark a Conv layer without retraining (smallest weight change)")
    embed.add_argument("model", type=Path)
    embed.add_argument("--layer", required=True, help="name of the Conv node to mark")
    embed.add_argument("--bits", type=int, default=64, help="number of bits (default 64)")
    embed.add_argument("--seed", type=int, default=0, help="seed of the secret projection and the bits")
    embed.add_argument("--key-out", type=Path, required=True, metavar="WM.npz", help="where to write the secret key")
    _output_options(embed)
    _common(embed)
    embed.set_defaults(handler=_cmd_watermark_embed)
    extract = marks.add_parser("extract", help="read the bits back and report the bit error rate")
    extract.add_argument("model", type=Path)
    extract.add_argument("--key", type=Path, required=True, metavar="WM.npz")
    _common(extract)
    extract.set_defaults(handler=_cmd_watermark_extract)

    perturb = commands.add_parser("perturb", help="add noise, quantize or prune the weight tensors")
    perturb.add_argument("model", type=Path)
    _output_options(perturb)
    perturb.add_argument("--noise", type=float, metavar="OMEGA", help="add N(0, (OMEGA*std(t))^2) to each weight t")
    perturb.add_argument("--quantize", type=int, metavar="BITS", help="uniform min-max, 2^BITS levels per tensor")
    perturb.add_argument("--prune", type=float, metavar="PERCENT", help="zero the PERCENT smallest-magnitude entries")
    perturb.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    perturb.add_argument(
        "--only", action="append", metavar="GROUP_ID|TENSOR", help="perturb only these groups' or tensors' weights"
    )
    _common(perturb)
    perturb.set_defaults(handler=_cmd_perturb)

    verify = commands.add_parser("verify", help="run two models in ONNX Runtime and compare their outputs")
    verify.add_argument("reference", type=Path)
    verify.add_argument("candidate", type=Path)
    _verify_options(verify)
    _common(verify)
    verify.set_defaults(handler=_cmd_verify)
    return parser


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, required=True, help="the model to write")
    parser.add_argument("--external-data", action="store_true", help="save weights to OUTPUT.data")
    parser.add_argument("--overwrite-input", action="store_true", help="allow OUTPUT to be an input file")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")


def _verify_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("equivalence check")
    group.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto")
    group.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance (default {DEFAULT_ATOL})")
    group.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance (default {DEFAULT_RTOL})")
    group.add_argument("--iterations", type=int, default=1, help="number of random input batches (default 1)")
    group.add_argument("--input-seed", dest="input_seed", type=int, default=0, help="seed of the inputs (default 0)")
    group.add_argument("--shape", action="append", default=[], metavar="NAME:1x3x224x224", help="input shape")
    group.add_argument(
        "--add-output", action="append", default=[], metavar="TENSOR",
        help="also compare this intermediate tensor (e.g. logits before a saturating activation)",
    )  # fmt: skip


def _progress_printer(args: argparse.Namespace) -> Progress:
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return None
    start = time.perf_counter()

    def show(message: str) -> None:
        print(f"\r[{time.perf_counter() - start:6.1f}s] {message}\033[K", end="", file=sys.stderr, flush=True)

    return show


def _emit(args: argparse.Namespace, document: dict[str, Any], text: Callable[[], str]) -> None:
    if sys.stderr.isatty() and not getattr(args, "quiet", False):
        print("\r\033[K", end="", file=sys.stderr)
    if args.json:
        print(json.dumps(document, indent=2, default=_json_default))
    else:
        print(text())


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


# -- inspect ------------------------------------------------------------------------------
def inspect_document(analysis: ChannelAnalysis, members: bool = True) -> dict[str, Any]:
    """The JSON form of an analysis, as printed by ``inspect --json``."""
    return {
        "summary": analysis.summary(),
        "groups": [
            {
                "id": group.id,
                "size": group.size,
                "permutable": group.permutable,
                "frozen": group.frozen,
                "reasons": [{"kind": r.kind, "message": r.message} for r in group.reasons],
                "members": [
                    {
                        "tensor": m.tensor,
                        "axis": m.axis,
                        "role": m.role,
                        "node": m.node,
                        "index_map": m.index_map,
                        "weight": m.is_weight,
                    }
                    for m in group.members
                    if members or m.is_weight
                ],
            }
            for group in analysis.groups
        ],
        "untied": [
            {"source": t.source, "copy": t.tensor, "uses": len(t.uses)} for t in analysis.tensors if t.copy > 0
        ],
    }


def _inspect_text(analysis: ChannelAnalysis, path: Path, all_members: bool) -> str:
    summary = analysis.summary()
    lines = [
        f"{path}: {summary['groups']} groups, {summary['permutable_groups']} permutable, {summary['frozen_groups']} frozen",
        f"producer neurons (Conv/ConvTranspose/Gemm/MatMul outputs): {summary['producer_neurons']}, "
        f"permutable {summary['permutable_producer_neurons']} ({100 * summary['permutable_fraction']:.1f} %), "
        f"pinned by graph outputs {summary['producer_neurons_pinned_by_outputs']}",
    ]
    for source in summary["untied_constants"]:
        lines.append(f"untied: constant '{source}' is shared by uses that need different permutations; each gets a copy")
    lines.append("")
    lines.append(f"{'group':>6} {'size':>6}  {'status':<10} members / reasons")
    for group in analysis.groups:
        status = "permutable" if group.permutable else ("frozen" if group.frozen else "trivial")
        weights = [m for m in group.members if m.is_weight]
        shown = group.members if all_members else weights
        head = ", ".join(f"{m.tensor}[{m.axis}]" for m in shown[:4])
        more = f" (+{len(shown) - 4} more)" if len(shown) > 4 else ""
        lines.append(f"{group.id:>6} {group.size:>6}  {status:<10} {head}{more}")
        if all_members:
            for m in group.members:
                lines.append(f"{'':>26}{m.tensor}[{m.axis}] {m.role} at {m.node}: {m.index_map}")
        for reason in group.reasons:
            lines.append(f"{'':>26}! {reason}")
    return "\n".join(lines)


def write_group_dot(analysis: ChannelAnalysis, path: Path) -> None:
    """The group graph for Graphviz: a group points to the groups its neurons feed."""
    lines = ["digraph groups {", "  rankdir=LR;", '  node [shape=box, style=filled, fontname="Helvetica"];']
    for group in analysis.groups:
        colour = "palegreen" if group.permutable else ("lightpink" if group.frozen else "lightgrey")
        why = f"\\n{group.reasons[0].kind}" if group.reasons else ""
        lines.append(f'  "{group.id}" [label="{group.id}\\n{group.size} neurons{why}", fillcolor={colour}];')
    for (a, b), ops in sorted(analysis.group_edges().items()):
        lines.append(f'  "{a}" -> "{b}" [label="{",".join(sorted(ops))}"];')
    lines.append("}")
    _write_text(path, "\n".join(lines) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxladyError(f"{path}: output folder '{folder}' does not exist")
    write_atomically(path, text.encode())


def _cmd_inspect(args: argparse.Namespace, progress: Progress) -> int:
    loaded = load_model(args.model)
    analysis = analyze(loaded.model, progress=progress)
    if args.dot:
        write_group_dot(analysis, args.dot)
    document = {"model": str(args.model), "sha256": loaded.sha256, **inspect_document(analysis)}
    _emit(args, document, lambda: _inspect_text(analysis, args.model, args.members))
    return 0


# -- permute / unpermute ------------------------------------------------------------------
def _check_output(args: argparse.Namespace, inputs: Sequence[Path], extra: Sequence[Path] = ()) -> None:
    """Refuse outputs that would overwrite an input (model, key) or each other, before any work."""
    written = _written_paths(args, extra)
    protected = {path.resolve() for path in inputs}
    for target in written:
        if target in protected and not args.overwrite_input:
            raise OnnxladyError(f"{target}: refusing to overwrite an input file (pass --overwrite-input)")
    if len(set(written)) != len(written):
        raise OnnxladyError(f"{args.output}: the key and the model would be written to the same file")
    for target in written[:1] + [path.resolve() for path in extra]:
        if not target.parent.is_dir():
            raise OnnxladyError(f"{target}: output folder '{target.parent}' does not exist")


def _check_external_inputs(args: argparse.Namespace, loaded: Sequence[LoadedModel], extra: Sequence[Path] = ()) -> None:
    """Refuse outputs that would overwrite the external-data files the inputs were read from."""
    protected = {path.resolve() for model in loaded for path in model.external_files}
    for target in _written_paths(args, extra):
        if target in protected and not args.overwrite_input:
            raise OnnxladyError(f"{target}: refusing to overwrite an input's external data (pass --overwrite-input)")


def _written_paths(args: argparse.Namespace, extra: Sequence[Path]) -> list[Path]:
    output = args.output.resolve()
    return [output, output.with_name(output.name + ".data"), *(path.resolve() for path in extra)]


def _read_perms(path: Path) -> dict[str, np.ndarray]:
    """Permutations from JSON: {group id: [..]} or a key file (its groups' ``perm``)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise OnnxladyError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxladyError(f"{path}: not JSON ({exc})") from exc
    if isinstance(data, dict) and "groups" in data:
        try:
            data = {str(g["id"]): g["perm"] for g in data["groups"]}
        except (KeyError, TypeError) as exc:
            raise OnnxladyError(f"{path}: malformed key (each group needs 'id' and 'perm')") from exc
    if not isinstance(data, dict):
        raise OnnxladyError(f"{path}: expected a JSON object {{group id: permutation}}")
    perms = {}
    for gid, values in data.items():
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise OnnxladyError(f"{path}: the permutation of group {gid} must be a list of integers")
        perms[str(gid)] = np.asarray(values, dtype=np.int64)
    return perms


def _cmd_permute(args: argparse.Namespace, progress: Progress) -> int:
    key_path = args.key_out or args.output.with_name(args.output.name + ".key.json")
    _check_output(args, [args.model], extra=[key_path])
    if args.verify:
        _check_verify_options(args)
    loaded = load_model(args.model)
    _check_external_inputs(args, [loaded], [key_path])
    analysis = analyze(loaded.model, progress=progress)
    if args.perms:
        perms = _read_perms(args.perms)
        if args.group:
            draw_permutations(analysis, 0, args.group)  # checks that the groups exist and can move
            missing = [gid for gid in args.group if gid not in perms]
            if missing:
                raise OnnxladyError(f"{args.perms}: no permutation for group {missing[0]}")
            perms = {gid: p for gid, p in perms.items() if gid in args.group}
    else:
        perms = draw_permutations(analysis, args.seed, args.group)
    # Large tensors are permuted as the writer streams them out: one copy of the weights at a time.
    deferred = DeferredTensors()
    key = permute_model(
        analysis, perms, source_sha256=loaded.sha256, source_file=args.model.name,
        seed=None if args.perms else args.seed, progress=progress, deferred=deferred,
    )  # fmt: skip
    if progress:
        progress(f"saving {args.output}")
    key.permuted_sha256 = save_model(
        loaded.model, args.output, external_data=args.external_data or loaded.external_data, digest=True,
        overrides=deferred.overrides,
    )  # fmt: skip
    deferred.finish(key)
    _write_text(key_path, json.dumps(key.to_json(), indent=1) + "\n")
    try:
        report = _verify(args, args.model, args.output, progress) if args.verify else None
    except OnnxladyError:
        for written in (args.output, args.output.with_name(args.output.name + ".data"), key_path):
            if written.exists():
                written.unlink()  # exit 2 leaves nothing behind
        raise
    summary = analysis.summary()
    neurons = sum(analysis.group(gid).size for gid in perms)
    document = {
        "model": str(args.model),
        "output": str(args.output),
        "key": str(key_path),
        "seed": key.seed,
        "permuted_groups": len(perms),
        "permuted_neurons": neurons,
        "permutable_groups": summary["permutable_groups"],
        "untied_constants": summary["untied_constants"],
        "verify": report.to_dict() if report else None,
    }

    def text() -> str:
        lines = [
            f"permuted {len(perms)} of {summary['permutable_groups']} permutable groups ({neurons} neurons) "
            f"-> {args.output}",
            f"key -> {key_path}",
        ]
        if summary["untied_constants"]:
            lines.append(f"untied shared constants: {', '.join(summary['untied_constants'])}")
        if report:
            lines.append(_verify_text(report))
        return "\n".join(lines)

    _emit(args, document, text)
    return 0 if report is None or report.equivalent else 1


def _cmd_unpermute(args: argparse.Namespace, progress: Progress) -> int:
    _check_output(args, [args.model, args.key])
    key = read_key(args.key)
    loaded = load_model(args.model)
    _check_external_inputs(args, [loaded])
    identical = unpermute_model(loaded.model, key)
    if progress:
        progress(f"saving {args.output}")
    sha = save_model(loaded.model, args.output, external_data=args.external_data or loaded.external_data, digest=True)
    document = {
        "model": str(args.model),
        "key": str(args.key),
        "output": str(args.output),
        "weights_identical_to_source": identical,
        "output_sha256": sha,
        "output_identical_to_source_file": sha == key.source_sha256,
    }

    def text() -> str:
        verdict = (
            "the restored weights are bit-identical to the source"
            if identical
            else "the weights differ from the source (the model was changed after it was permuted); neuron order restored"
        )
        return f"unpermuted -> {args.output}: {verdict}"

    _emit(args, document, text)
    return 0


def _cmd_perturb(args: argparse.Namespace, progress: Progress) -> int:
    from onnxlady._transforms._perturb import perturb_model

    _check_output(args, [args.model])
    loaded = load_model(args.model)
    _check_external_inputs(args, [loaded])
    report = perturb_model(
        loaded.model, noise=args.noise, quantize_bits=args.quantize, prune_percent=args.prune,
        seed=args.seed, only=args.only, progress=progress,
    )  # fmt: skip
    save_model(loaded.model, args.output, external_data=args.external_data or loaded.external_data)
    document = {"model": str(args.model), "output": str(args.output), **report.to_dict()}

    def text() -> str:
        lines = [f"perturbed {len({c.tensor for c in report.changes})} weight tensors -> {args.output}"]
        lines.append(f"{'tensor':<40} {'op':<14} {'kind':<9} {'changed':>12} {'rel. L2 change':>15}")
        for change in report.changes:
            lines.append(
                f"{change.tensor[:40]:<40} {change.op_type:<14} {change.kind:<9} "
                f"{f'{change.changed_elements}/{change.elements}':>12} {change.relative_l2_change:>15.4f}"
            )
        return "\n".join(lines)

    _emit(args, document, text)
    return 0


def _cmd_resync(args: argparse.Namespace, progress: Progress) -> int:
    from onnxlady._resync._entry import resync_model

    extra = [args.key_out] if args.key_out else []
    _check_output(args, [args.reference, args.suspect] + ([args.true_key] if args.true_key else []), extra=extra)
    true_key = read_key(args.true_key) if args.true_key else None
    reference = load_model(args.reference)
    suspect = load_model(args.suspect)
    _check_external_inputs(args, [reference, suspect], extra)
    result = resync_model(
        reference.model, suspect.model, method=args.method, refine=args.refine, true_key=true_key, progress=progress
    )
    save_model(result.model, args.output, external_data=args.external_data or suspect.external_data)
    if args.key_out:
        _write_text(args.key_out, json.dumps(result.key.to_json(), indent=1) + "\n")
    document = {
        "reference": str(args.reference),
        "suspect": str(args.suspect),
        "output": str(args.output),
        "key": str(args.key_out) if args.key_out else None,
        **result.to_dict(),
    }

    def text() -> str:
        lines = [f"re-synchronized {args.suspect} to {args.reference} ({result.method}) -> {args.output}"]
        lines.append(
            f"{'group':>6} {'size':>6} {'mean margin':>12} {'min margin':>11} {'ambiguous':>10} {'zeroed':>7} {'Psi %':>7}"
        )
        for group in result.groups:
            psi = "" if group.psi is None else f"{group.psi:.1f}"
            lines.append(
                f"{group.id:>6} {group.size:>6} {group.mean_margin:>12.3f} {group.min_margin:>11.3f} "
                f"{group.ambiguous:>10} {group.zero_neurons:>7} {psi:>7}"
            )
        if result.psi is not None:
            lines.append(
                f"Psi over all permuted neurons: {result.psi:.2f} %"
                + (
                    f" ({result.psi_distinguishable:.2f} % over distinguishable ones)"
                    if result.psi_distinguishable is not None
                    else ""
                )
            )
        ambiguous = sum(g.ambiguous for g in result.groups)
        lines.append(f"{ambiguous} ambiguous neurons (margin below the ambiguity threshold)")
        if result.across is not None:
            lines.append("the suspect is no node-for-node copy of the reference: matched across conversions")
            for finding in result.across.match.conversions:
                lines.append(f"conversion ({finding.kind}) in the {finding.model}: {finding.detail}")
            for item in result.across.match.unmatched:
                lines.append(f"unmatched: {item.model} group {item.group} ({item.size}): {item.reason}")
            if result.across.unwritten:
                lines.append(
                    "matched but left in place in the output (frozen in the suspect's own form): "
                    + ", ".join(result.across.unwritten)
                )
        return "\n".join(lines)

    _emit(args, document, text)
    return 0


def _cmd_match(args: argparse.Namespace, progress: Progress) -> int:
    from onnxlady._resync._match import match_analyses

    reference = load_model(args.reference)
    suspect = load_model(args.suspect)
    if progress is not None:
        progress("match: analysing both models")
    result = match_analyses(analyze(reference.model), analyze(suspect.model))
    document = {"reference": str(args.reference), "suspect": str(args.suspect), **result.to_dict()}

    def text() -> str:
        paired = sum(pair.permutable for pair in result.groups)
        lines = [
            f"{args.reference} <-> {args.suspect}: {len(result.sites)} of {result.site_counts[0]} reference sites "
            f"and {result.site_counts[1]} suspect sites paired; {paired} permutable groups paired"
        ]
        lines.append(f"{'reference':>10} {'suspect':>8} {'size':>6}  permutable")
        for pair in result.groups:
            lines.append(f"{pair.reference:>10} {pair.suspect:>8} {pair.size:>6}  {'yes' if pair.permutable else 'no'}")
        for item in result.unmatched:
            lines.append(f"unmatched {item.model} group {item.group} ({item.size}): {item.reason}")
        for where in result.divergences:
            lines.append(f"structures diverge {where}")
        for finding in result.conversions:
            lines.append(f"conversion ({finding.kind}) in the {finding.model}: {finding.detail}")
        if result.complete:
            lines.append("every permutable group has its counterpart")
        return "\n".join(lines)

    _emit(args, document, text)
    return 0 if result.complete else 1


def _cmd_audit(args: argparse.Namespace, progress: Progress) -> int:
    from onnxlady._audit._verdicts import audit_models, canonicalize
    from onnxlady._audit._render import render_html, render_markdown

    inputs = [args.reference.resolve(), args.suspect.resolve()]
    for target in (args.html, args.markdown, args.canonicalize):
        if target is None:
            continue
        if target.resolve() in inputs:
            raise OnnxladyError(f"{target}: refusing to overwrite an input file")
        if not target.resolve().parent.is_dir():
            raise OnnxladyError(f"{target}: output folder '{target.resolve().parent}' does not exist")
    if not args.rtol >= 0:
        raise OnnxladyError("--rtol must be a number >= 0")
    reference = load_model(args.reference)
    suspect = load_model(args.suspect)
    report = audit_models(
        reference.model, suspect.model, rtol=args.rtol, method=args.method, refine=args.refine, progress=progress
    )
    if args.markdown:
        _write_text(args.markdown, render_markdown(report))
    if args.html:
        _write_text(args.html, render_html(report, analyze(reference.model)))
    if args.canonicalize:
        if report.resync is None:
            raise OnnxladyError("the suspect is identical to the reference: nothing to canonicalize")
        save_model(canonicalize(report.resync.model, report, reference.model), args.canonicalize)
    document = {"reference": str(args.reference), "suspect": str(args.suspect), **report.to_dict()}
    _emit(args, document, lambda: render_markdown(report))
    return report.exit_code


def _cmd_watermark_embed(args: argparse.Namespace, progress: Progress) -> int:
    from onnxlady._transforms._watermark import embed_watermark, relative_output_change, save_key

    _check_output(args, [args.model], extra=[args.key_out])
    loaded = load_model(args.model)
    _check_external_inputs(args, [loaded], [args.key_out])
    original = load_model(args.model).model
    key, report = embed_watermark(loaded.model, args.layer, args.bits, args.seed)
    report["relative_output_change"] = relative_output_change(original, loaded.model)
    save_model(loaded.model, args.output, external_data=args.external_data or loaded.external_data)
    save_key(key, args.key_out)
    document = {"model": str(args.model), "output": str(args.output), "key": str(args.key_out), **report}

    def text() -> str:
        return (
            f"embedded {report['bits']} bits in {args.layer} -> {args.output} (key {args.key_out}); "
            f"weight change {100 * report['relative_weight_change']:.2f} %, "
            f"output change {100 * report['relative_output_change']:.2f} % on random inputs"
        )

    _emit(args, document, text)
    return 0


def _cmd_watermark_extract(args: argparse.Namespace, progress: Progress) -> int:
    from onnxlady._transforms._watermark import extract_watermark, load_key

    key = load_key(args.key)
    loaded = load_model(args.model)
    bits, ber = extract_watermark(loaded.model, key)
    document = {"model": str(args.model), "key": str(args.key), "layer": key.layer, "bits": int(bits.size),
                "bit_error_rate": ber}  # fmt: skip
    _emit(args, document, lambda: f"{key.layer}: {bits.size} bits, bit error rate {100 * ber:.1f} %")
    return 0


# -- verify -------------------------------------------------------------------------------
def _check_verify_options(args: argparse.Namespace) -> None:
    """Reject bad check options before any file is written."""
    if args.iterations < 1:
        raise OnnxladyError("--iterations must be at least 1")
    if not (args.atol >= 0 and args.rtol >= 0):
        raise OnnxladyError("--atol and --rtol must be numbers >= 0")
    parse_shape_overrides(args.shape)


def _verify(args: argparse.Namespace, reference: Path, candidate: Path, progress: Progress) -> VerifyReport:
    _check_verify_options(args)
    return verify_models(
        str(reference), str(candidate), provider=args.provider, atol=args.atol, rtol=args.rtol,
        iterations=args.iterations, seed=args.input_seed, shapes=parse_shape_overrides(args.shape),
        progress=progress, extra_outputs=args.add_output,
    )  # fmt: skip


def _verify_text(report: VerifyReport) -> str:
    lines = [
        f"execution provider: {report.provider_used}"
        + (f" (fell back: {report.fallback_reason})" if report.fallback_reason else ""),
        f"inputs: {', '.join(f'{k}{list(v)}' for k, v in report.input_shapes.items())}; "
        f"{report.iterations} iteration(s), seed {report.seed}; atol {report.atol:g}, rtol {report.rtol:g}",
        f"{'output':<24} {'max abs err':>12} {'max rel err':>12} {'max |ref|':>10} {'mismatched':>14}  result",
    ]
    for out in report.outputs:
        result = "PASS" if out.passed else "FAIL"
        lines.append(
            f"{out.name:<24} {out.max_abs_error:>12.3e} {out.max_rel_error:>12.3e} {out.reference_max_abs:>10.3g} "
            f"{f'{out.mismatched_elements}/{out.total_elements}':>14}  {result}"
        )
        if out.degenerate:
            lines.append(f"{'':<24} warning: {out.degenerate}: this comparison proves nothing")
    lines.append("EQUIVALENT" if report.equivalent else "NOT EQUIVALENT")
    return "\n".join(lines)


def _cmd_verify(args: argparse.Namespace, progress: Progress) -> int:
    report = _verify(args, args.reference, args.candidate, progress)
    document = {"reference": str(args.reference), "candidate": str(args.candidate), **report.to_dict()}
    _emit(args, document, lambda: _verify_text(report))
    return 0 if report.equivalent else 1


# -- demo ---------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace, progress: Progress) -> int:
    from onnxlady._api._demo import run_demo

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        document = run_demo(args.workdir, seed=args.seed, progress=progress)
    else:
        with tempfile.TemporaryDirectory(prefix="onnxlady-demo-") as folder:
            document = run_demo(Path(folder), seed=args.seed, progress=progress)
    _emit(args, document, lambda: "\n".join(document["lines"]))
    return 0 if document["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
