"""Verify on real models, as a new user runs it: which inputs it draws, what it compares, its verdicts.

For every model (the PyPI models ``tools.fetch_models`` takes out of wheels in ``.cache/models``;
when present, the zoo ``tools.zoo`` exports to ``.cache/zoo`` and ``.cache/zoo_timm`` and the
models ``tools.export_deployment_models`` writes to ``.cache/deployment``; or the folders given
with ``--models``; and the runnable test fixtures), with verify's *default*
options (no ``--shape``, no ``--add-output``, no ``--val-range``):

- ``verify M M``: the model against itself;
- ``verify M P``: against a copy permuted with seed 1 (``onnxlady.permute``);
- ``verify M W``: against a *wrong* permutation (one producer's rows swapped, its consumers left
  alone), which must not come out EQUIVALENT;

and records the inputs verify drew (name, shape, dtype, rule and range), the tensors it compared
(graph outputs, and the inputs of squashing ops making them), which of them proved nothing and
why. The goal (issue 13): no EQUIVALENT verdict with a compared output that is non-finite or
degenerate (a saturated squashing output counts as rescued only when its own input, compared
too, carries signal).

Run from the repository root::

    python3 -m tools.verify_real_models [--models DIR ...] [--no-fixtures] [--markdown] [--json]

Exit status 0 when no EQUIVALENT verdict rests on a hollow comparison and every wrong
permutation is caught (not EQUIVALENT), 1 otherwise. A model ONNX Runtime cannot run on the
default inputs is a row with the error (it names the ``--shape`` to give), not a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxlady import OnnxladyError, VerifyResult, analyze, load_model, permute, save_model, verify
from onnxlady.testing import permute_producer_only
from tools._report import PERMUTATION_SEED, markdown

#: Folders searched for ``*.onnx`` by default, when they exist: ``tools.fetch_models`` (PyPI
#: wheels), ``tools.zoo`` (torchvision/transformers, and timm) and ``tools.export_deployment_models``.
DEFAULT_FOLDERS = (Path(".cache/models"), Path(".cache/zoo"), Path(".cache/zoo_timm"), Path(".cache/deployment"))


def _models(folders: Sequence[Path], fixtures: bool, scratch: Path) -> Iterator[tuple[str, str, Path]]:
    """(source, name, path) of every model: the folders' ``*.onnx`` files, then the runnable fixtures."""
    for folder in folders:
        for path in sorted(folder.glob("*.onnx")):
            yield folder.name, path.stem, path
    if fixtures:
        from fixtures import FIXTURES, RUNNABLE

        for name in sorted(RUNNABLE):
            path = scratch / f"fixture_{name}.onnx"
            onnx.save(FIXTURES[name](0), str(path))
            yield "fixtures", name, path


def _inputs(result: VerifyResult) -> list[dict[str, Any]]:
    return [
        {"name": r.name, "shape": list(r.shape), "dtype": r.dtype, "rule": r.rule, "low": r.low, "high": r.high,
         "detail": r.detail}
        for r in result.report.inputs
    ]  # fmt: skip


def _judged(result: VerifyResult) -> dict[str, Any]:
    """The verdict, what was compared, the hollow comparisons, and whether EQUIVALENT rests on one."""
    report = result.report
    rescued = {s.stands_for for s in report.squash_inputs if s.carries_evidence}
    hollow = [
        {"name": o.name, "kind": o.kind, "why": o.degenerate,
         "rescued_by_input": o.kind != "squash-input" and o.name in rescued}
        for o in (*report.outputs, *report.squash_inputs)
        if o.degenerate is not None
    ]  # fmt: skip
    unsupported = [h for h in hollow if not h["rescued_by_input"] or "non-finite" in str(h["why"])]
    return {
        "verdict": report.verdict,
        "reason": report.reason,
        "compared": [o.name for o in report.outputs],
        "squash_inputs": [f"{s.name} (input of {s.op} -> {s.stands_for})" for s in report.squash_inputs],
        "hollow": hollow,
        "hollow_equivalent": report.verdict == "equivalent" and bool(unsupported),
        "provider": report.provider_used,
    }


def _verify(reference: Path, candidate: Path) -> tuple[VerifyResult | None, str | None]:
    try:
        return verify(reference, candidate), None
    except OnnxladyError as exc:
        return None, str(exc)


def report_model(source: str, name: str, path: Path, scratch: Path) -> dict[str, Any]:
    """The row of one model: verify M M, M P(M) and M W(M) with default options."""
    row: dict[str, Any] = {"source": source, "model": name, "size_mb": round(path.stat().st_size / 1e6, 2)}
    itself, error = _verify(path, path)
    if itself is None:
        row["error"] = error
        return row
    row["inputs"] = _inputs(itself)
    row["itself"] = _judged(itself)
    permuted = scratch / f"{name}.permuted.onnx"
    try:
        permute(path, output=permuted, seed=PERMUTATION_SEED)
    except OnnxladyError as exc:  # nothing permutable: M P(M) is M M
        row["permuted"] = {"verdict": "not permuted", "reason": str(exc)}
    else:
        result, error = _verify(path, permuted)
        row["permuted"] = _judged(result) if result is not None else {"verdict": "error", "reason": error}
    for written in scratch.glob(permuted.name + "*"):
        written.unlink()
    try:
        wrong_model = load_model(path).model
        tensor = permute_producer_only(wrong_model, analyze(wrong_model))
    except (AssertionError, OnnxladyError) as exc:  # no permutable producer weight
        row["wrong"] = {"verdict": "no wrong permutation", "reason": str(exc) or "no permutable producer weight"}
        return row
    wrong = scratch / f"{name}.wrong.onnx"
    save_model(wrong_model, wrong)
    del wrong_model
    result, error = _verify(path, wrong)
    row["wrong"] = {
        "tensor": tensor,
        **(_judged(result) if result is not None else {"verdict": "error", "reason": error}),
    }
    wrong.unlink()
    return row


def _range(record: dict[str, Any]) -> str:
    low, high = record["low"], record["high"]
    if low is None or high is None:
        return ""
    if record["rule"] in ("mask-ones", "segment-zeros"):
        return ""
    closing = "]" if record["dtype"].startswith(("int", "uint", "bool")) else ")"
    return f" [{low:g}, {high:g}{closing}"


def _verdict_cell(judged: dict[str, Any] | None) -> str:
    if not judged:
        return ""
    verdict = str(judged["verdict"]).upper().replace("-", " ")
    if judged.get("hollow_equivalent"):
        verdict += " (HOLLOW)"
    return verdict


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The README/results table: one row per model."""
    header = ["source", "model", "inputs drawn (shape, dtype: rule range)", "compared", "verify M M",
              "verify M P(M)", "hollow comparisons (why)", "wrong perm"]  # fmt: skip
    lines = []
    for row in rows:
        if "error" in row:
            lines.append([row["source"], row["model"], "", "", f"error: {row['error'][:160]}", "", "", ""])
            continue
        inputs = "; ".join(
            f"`{r['name']}` {'x'.join(map(str, r['shape']))} {r['dtype']}: {r['rule']}{_range(r)}"
            for r in row["inputs"]
        )
        itself = row["itself"]
        compared = ", ".join(f"`{n}`" for n in itself["compared"])
        if itself["squash_inputs"]:
            compared += " + " + ", ".join(f"`{s}`" for s in itself["squash_inputs"])
        hollow = (
            "; ".join(
                f"`{h['name']}`: {h['why']}" + (" (judged on its input)" if h["rescued_by_input"] else "")
                for h in itself["hollow"]
            )
            or "none"
        )
        wrong = row["wrong"]
        caught = {"equivalent": "NOT caught"}.get(
            str(wrong["verdict"]), str(wrong["verdict"]).upper().replace("-", " ")
        )
        lines.append([row["source"], row["model"], inputs, compared, _verdict_cell(itself),
                      _verdict_cell(row["permuted"]), hollow, caught])  # fmt: skip
    return markdown(header, [[cell.replace("|", "\\|") for cell in line] for line in lines])


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Counts over the rows: verdicts of M P(M), EQUIVALENT verdicts resting on a hollow comparison, wrong perms missed."""
    judged = [row for row in rows if "error" not in row]
    verdicts = [row["permuted"]["verdict"] for row in judged] + [row["itself"]["verdict"] for row in judged]
    return {
        "models": len(rows),
        "not_runnable_on_defaults": len(rows) - len(judged),
        "equivalent": verdicts.count("equivalent"),
        "inconclusive": verdicts.count("inconclusive"),
        "not_equivalent": verdicts.count("not-equivalent"),
        "hollow_equivalent": sum(
            bool(row[key].get("hollow_equivalent")) for row in judged for key in ("itself", "permuted", "wrong")
        ),
        "wrong_permutations_missed": sum(row["wrong"]["verdict"] == "equivalent" for row in judged),
    }


def main(argv: list[str] | None = None) -> int:
    """Verify every model, print the table (or JSON); 0 when no EQUIVALENT rests on a hollow comparison."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.verify_real_models", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", type=Path, action="append", help="folders of *.onnx (default: those of DEFAULT_FOLDERS that exist)"
    )
    parser.add_argument("--no-fixtures", action="store_true", help="leave out the runnable test fixtures")
    parser.add_argument("--markdown", action="store_true", help="print only the table")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    folders = args.models or [folder for folder in DEFAULT_FOLDERS if folder.is_dir()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxlady-verify-real-") as folder:
        scratch = Path(folder)
        for source, name, path in _models(folders, not args.no_fixtures, scratch):
            rows.append(report_model(source, name, path, scratch))
            print(
                f"{source}/{name}: {rows[-1].get('permuted', {}).get('verdict', rows[-1].get('error'))}",
                file=sys.stderr,
            )
    counts = summary(rows)
    if args.json:
        print(json.dumps({"summary": counts, "rows": rows}, indent=2))
    else:
        print(table(rows))
        if not args.markdown:
            print()
            print(", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in counts.items()))
    return 0 if counts["hollow_equivalent"] == 0 and counts["wrong_permutations_missed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
