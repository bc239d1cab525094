"""Match every pair of different real models: how many ``onnxlady.match`` accepts (goal: none).

``onnxlady match`` refuses two models as *different models* when less than ``MATCH_THRESHOLD``
of them pairs (weights, weight-reading operators and their connections). This tool checks that
rule on every ordered pair of distinct real models (the PyPI models of ``.cache/models``, the zoo
exports of ``.cache/zoo`` and ``.cache/zoo_timm`` and the deployment models of
``.cache/deployment``; or the folders given with ``--models``), and, for the other side of the
threshold, on each model against a permuted copy of itself (``onnxlady.permute``, seed 1: a
true twin, which must be accepted; ``--float16`` adds that copy converted to float16). Pairs that are one model in different forms (the LLaMA-style
decoder exported by torch and by ONNX Runtime GenAI's builder in fp32 and int4; the packed and
unpacked ``torch.nn.MultiheadAttention`` exports) are left out: see :data:`SAME_MODEL`.

Each model is analysed once; a pair is then what :func:`onnxlady.match` does after analysing:
:func:`onnxlady._resync._match.match_analyses` and the refusal
:func:`onnxlady._resync._match.check_same_model` (``--check N`` also runs the public
:func:`onnxlady.match` on the first N pairs of different models and on every twin, and fails
when its answer differs).

Prints the counts of accepted and refused pairs, the highest confidence among different models,
the lowest among twins, every accepted pair of different models and every refused twin, and the
machine load::

    python3 -m tools.match_real_models [--models DIR ...] [--no-twins] [--float16] [--check N] [--markdown] [--json FILE]

Exit status 0 when no pair of different models is accepted and every twin is, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

import onnxlady
from fixtures.conversions import to_float16
from onnxlady._analysis._channels import ChannelAnalysis, analyze
from onnxlady._resync._match import MATCH_THRESHOLD, check_same_model, match_analyses

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FOLDERS = tuple(REPO / ".cache" / name for name in ("models", "zoo", "zoo_timm", "deployment"))
#: Families of models that are one model in different forms (same weights, another exporter or
#: converter): pairs inside a family are not pairs of different models.
SAME_MODEL: tuple[frozenset[str], ...] = (
    frozenset({"deployment/llama", "deployment/genai_fp32", "deployment/genai_int4"}),
    frozenset({"deployment/torch_mha", "deployment/torch_mha_unfolded"}),
)


@dataclass
class Entry:
    """A real model: its short name, path, loaded form and analysis."""

    name: str
    path: Path
    model: onnx.ModelProto
    analysis: ChannelAnalysis


def find_models(folders: list[Path]) -> list[tuple[str, Path]]:
    """``(folder/stem, path)`` of every ``*.onnx`` in ``folders`` and of every ``model.onnx`` one level down."""
    found: list[tuple[str, Path]] = []
    for folder in folders:
        if not folder.is_dir():
            print(f"{folder}: missing, skipped", file=sys.stderr)
            continue
        for path in sorted(folder.glob("*.onnx")):
            found.append((f"{folder.name}/{path.stem}", path))
        for path in sorted(folder.glob("*/model.onnx")):
            found.append((f"{folder.name}/{path.parent.name}", path))
    return found


def same_model(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one model in different forms (:data:`SAME_MODEL`)."""
    return a == b or any(a in family and b in family for family in SAME_MODEL)


def _pair(reference: Entry, suspect: Entry) -> dict[str, Any]:
    """What :func:`onnxlady.match` answers for the pair, from the cached analyses."""
    start = time.perf_counter()
    details = match_analyses(reference.analysis, suspect.analysis)
    try:
        check_same_model(details)
        accepted, message = True, ""
    except onnxlady.OnnxladyError as exc:
        accepted, message = False, str(exc)
    return {
        "reference": reference.name,
        "suspect": suspect.name,
        "accepted": accepted,
        "confidence": round(details.confidence, 6),
        "groups_paired": len(details.groups),
        "message": message[:300],
        "seconds": round(time.perf_counter() - start, 3),
    }


def _public(reference: Entry | onnx.ModelProto, suspect: Entry | onnx.ModelProto) -> tuple[bool, float | None]:
    """The public :func:`onnxlady.match`'s answer: accepted, and the confidence when accepted."""
    a = reference.model if isinstance(reference, Entry) else reference
    b = suspect.model if isinstance(suspect, Entry) else suspect
    try:
        return True, onnxlady.match(a, b).confidence
    except onnxlady.OnnxladyError:
        return False, None


def main(argv: list[str] | None = None) -> int:
    """Match every ordered pair of different real models and every model with its permuted twin."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.match_real_models", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, default=list(DEFAULT_FOLDERS), help="folders of .onnx files")
    parser.add_argument("--no-twins", action="store_true", help="leave out the permuted twins")
    parser.add_argument("--float16", action="store_true", help="also a permuted twin converted to float16")
    parser.add_argument("--check", type=int, default=0, help="also run onnxlady.match on the first N pairs")
    parser.add_argument("--markdown", action="store_true", help="print the summary as a Markdown table")
    parser.add_argument("--json", type=Path, help="write every pair to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    entries: list[Entry] = []
    for name, path in find_models(args.models):
        try:
            model = onnxlady.load_model(path).model
            entries.append(Entry(name, path, model, analyze(model)))
        except onnxlady.OnnxladyError as exc:
            print(f"{name}: cannot be analysed, skipped: {exc}", file=sys.stderr)
    pairs = [
        _pair(a, b) for a in entries for b in entries if not same_model(a.name, b.name)
    ]
    skipped = sum(1 for a in entries for b in entries if a.name != b.name and same_model(a.name, b.name))
    twins: list[dict[str, Any]] = []
    mismatches: list[str] = []
    if not args.no_twins:
        for entry in entries:
            permuted = onnxlady.permute(entry.model, seed=1).model
            forms = [("permuted", permuted)]
            if args.float16:
                try:
                    forms.append(("permuted, float16", to_float16(permuted)))
                except Exception as exc:  # a converter that cannot handle the model: said, not a twin
                    print(f"{entry.name}: float16 conversion failed, no such twin: {exc}", file=sys.stderr)
            for form, model in forms:
                twin = Entry(f"{entry.name} ({form})", entry.path, model, analyze(model))
                record = _pair(entry, twin)
                twins.append(record)
                if args.check:
                    accepted, _ = _public(entry, model)
                    if accepted != record["accepted"]:
                        mismatches.append(f"twin {twin.name}: onnxlady.match accepted={accepted}")
    by_name = {e.name: e for e in entries}
    for record in pairs[: args.check]:
        accepted, _ = _public(by_name[record["reference"]], by_name[record["suspect"]])
        if accepted != record["accepted"]:
            mismatches.append(f"{record['reference']} -> {record['suspect']}: onnxlady.match accepted={accepted}")
    seconds = time.perf_counter() - start
    accepted_pairs = [p for p in pairs if p["accepted"]]
    refused_twins = [t for t in twins if not t["accepted"]]
    highest = max(pairs, key=lambda p: p["confidence"], default=None)
    lowest = min(twins, key=lambda t: t["confidence"], default=None)
    load = os.getloadavg()
    rows = [
        ("models", str(len(entries))),
        ("ordered pairs of different models", str(len(pairs))),
        ("pairs left out (one model in different forms)", str(skipped)),
        ("pairs of different models accepted", str(len(accepted_pairs))),
        ("pairs of different models refused", str(len(pairs) - len(accepted_pairs))),
        (
            "highest confidence, different models",
            f"{100 * highest['confidence']:.1f} % ({highest['reference']} -> {highest['suspect']})" if highest else "-",
        ),
        ("twins accepted", f"{len(twins) - len(refused_twins)} of {len(twins)}"),
        (
            "lowest confidence, twins",
            f"{100 * lowest['confidence']:.1f} % ({lowest['reference']})" if lowest else "-",
        ),
        ("threshold (MATCH_THRESHOLD)", f"{100 * MATCH_THRESHOLD:.0f} %"),
    ]
    if args.check:
        rows.append((f"onnxlady.match disagreements (first {args.check} pairs and the twins)", str(len(mismatches))))
    if args.markdown:
        print("| | |\n|---|---|")
        for label, value in rows:
            print(f"| {label} | {value} |")
    else:
        for label, value in rows:
            print(f"{label}: {value}")
    for p in accepted_pairs:
        print(f"- ACCEPTED different models: {p['reference']} -> {p['suspect']}: confidence {p['confidence']:.4f}")
    for t in refused_twins:
        print(f"- REFUSED twin: {t['reference']}: confidence {t['confidence']:.4f}: {t['message']}")
    for line in mismatches:
        print(f"- DISAGREES: {line}")
    top = sorted(pairs, key=lambda p: -p["confidence"])[:5]
    print("highest confidences of different models: " + "; ".join(
        f"{p['reference']} -> {p['suspect']} {100 * p['confidence']:.1f} %" for p in top
    ))  # fmt: skip
    print(f"{len(pairs) + len(twins)} matches in {seconds:.0f} s; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"pairs": pairs, "twins": twins, "skipped": skipped}, indent=1) + "\n")
    return 0 if entries and not accepted_pairs and not refused_twins and not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
