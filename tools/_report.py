"""The report of one model, shared by ``tools.real_models`` and ``tools.zoo``.

Each tool runs the same pipeline on each of its models: ``inspect`` (groups, producer neurons
that can move, those pinned by graph outputs, why the others froze), ``permute`` every
permutable group with seed 1, ``verify`` the permuted copy against the original, and check
that a *wrong* permutation (one producer's rows swapped, its consumers left alone) is caught.
:func:`report_model` makes one table row of it; :func:`markdown` and :func:`frozen_text` print
the rows. (``onnxlady demo`` runs the same steps on its own small model.)
"""

from __future__ import annotations

import gc
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxlady import ChannelAnalysis, analyze, inspect, load_model, permute, save_model, verify
from onnxlady.testing import permute_producer_only

#: The seed of the permutation every report draws.
PERMUTATION_SEED = 1
#: The columns of every report table after the model's name and size (see :func:`cells`).
COLUMNS = (
    "groups (permutable)",
    "producer neurons",
    "permutable",
    "pinned by outputs",
    "permutable excl. outputs",
    "verify after permute: max abs err / max abs ref",
    "wrong perm caught",
)

_NODE_REASON = re.compile(r"^(?P<op>[\w.]+) '(?P<node>[^']*)': (?P<detail>.*)$", re.DOTALL)


def report_model(name: str, path: Path, work: Path, verify_options: Mapping[str, Any]) -> dict[str, Any]:
    """Inspect, permute, verify and check a wrong permutation on one model file.

    Args:
        name: The model's short name: the row's ``model``, and the stem of the scratch files.
        path: The model file.
        work: A scratch folder for the permuted and the wrongly permuted copies (removed after use).
        verify_options: Keyword arguments of :func:`onnxlady.verify` (provider, iterations,
            input_seed, shape, add_output), the same for the permuted copy and the wrong one.

    Returns:
        One row (JSON-ready): the analysis's counts, the frozen groups and why they froze (see
        :func:`frozen_accounting`), verify's verdict and its worst output error against the
        largest reference value, the tensor the wrong permutation changed and whether verify
        caught it, and the seconds each step took.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    inspected = inspect(path)
    summary = inspected.analysis.summary()
    frozen = frozen_accounting(inspected.analysis)
    del inspected  # the zoo's largest models: one copy in memory at a time
    gc.collect()
    timings["analyze"] = time.perf_counter() - start

    start = time.perf_counter()
    permuted = work / f"{name}.permuted.onnx"
    # Streamed to the file: the permuted model is never held whole.
    permuted_groups = len(permute(path, output=permuted, seed=PERMUTATION_SEED).permuted_groups)
    gc.collect()
    timings["permute"] = time.perf_counter() - start

    start = time.perf_counter()
    report = verify(path, permuted, **verify_options)
    timings["verify"] = time.perf_counter() - start
    for written in work.glob(permuted.name + "*"):  # the model and its key
        written.unlink()

    start = time.perf_counter()
    wrong_model = load_model(path).model
    wrong_tensor = permute_producer_only(wrong_model, analyze(wrong_model))
    wrong = work / f"{name}.wrong.onnx"
    save_model(wrong_model, wrong)
    del wrong_model
    gc.collect()
    caught = not verify(path, wrong, **verify_options).equivalent
    wrong.unlink()
    timings["wrong"] = time.perf_counter() - start

    meaningful = [o for o in report.outputs if not o.degenerate] or list(report.outputs)
    worst = max(meaningful, key=lambda o: o.max_abs_error / max(o.reference_max_abs, 1e-30))
    total, pinned = summary["producer_neurons"], summary["producer_neurons_pinned_by_outputs"]
    return {
        "model": name,
        "size_mb": round(path.stat().st_size / 1e6, 1),
        "groups": summary["groups"],
        "permutable_groups": summary["permutable_groups"],
        "permuted_groups": permuted_groups,
        "producer_neurons": total,
        "permutable_neurons": summary["permutable_producer_neurons"],
        "permutable_fraction": round(summary["permutable_fraction"], 4),
        "pinned_by_outputs": pinned,
        "permutable_fraction_excluding_outputs": round(summary["permutable_producer_neurons"] / max(1, total - pinned), 4),
        "untied_constants": summary["untied_constants"],
        "freeze_reasons_by_kind": summary["freeze_reasons_by_kind"],
        **frozen,
        "provider": report.provider_used,
        "equivalent": report.equivalent,
        "outputs": [
            {
                "name": o.name,
                "max_abs_error": o.max_abs_error,
                "reference_max_abs": o.reference_max_abs,
                "mismatched": o.mismatched_elements,
                "total": o.total_elements,
                "degenerate": o.degenerate,
            }
            for o in report.outputs
        ],
        "compared": [o.name for o in meaningful],
        "max_abs_error": worst.max_abs_error,
        "reference_max_abs": worst.reference_max_abs,
        "wrong_permutation_tensor": wrong_tensor,
        "wrong_permutation_caught": caught,
        "seconds": {step: round(seconds, 2) for step, seconds in timings.items()},
    }


def passed(row: Mapping[str, Any]) -> bool:
    """Whether a row is clean: no error, permuted copy equivalent, wrong permutation caught."""
    return "error" not in row and bool(row["equivalent"]) and bool(row["wrong_permutation_caught"])


def reason_keys(kind: str, message: str) -> tuple[str, str, str]:
    """(kind + op type, kind + op type + node, detail) of one freeze reason."""
    match = _NODE_REASON.match(message)
    if match is None:
        return f"{kind}", f"{kind}: {message}", message
    op, node, detail = match["op"], match["node"], match["detail"]
    return f"{kind}: {op}", f"{kind}: {op} '{node}'", detail


def frozen_producer_neurons(analysis: ChannelAnalysis) -> dict[str, int]:
    """For each frozen group, the producer neurons it governs that no permutable group moves."""
    counts: Counter[str] = Counter()
    for _, _, expr in analysis.producers:
        labels = analysis.neuron_labels(expr)
        governed = np.zeros(expr.size, dtype=bool)
        for gid, lab in labels.items():
            if analysis.group(gid).permutable:
                governed |= lab >= 0
        for gid, lab in labels.items():
            group = analysis.group(gid)
            if group.frozen and group.size > 1:
                counts[gid] += int(((lab >= 0) & ~governed).sum())
    return dict(counts)


def frozen_accounting(analysis: ChannelAnalysis) -> dict[str, Any]:
    """Why the frozen groups (of two neurons or more) froze, by their first reason.

    Returns:
        ``frozen_group_sizes_by_op`` and ``..._by_node`` (neurons of the frozen groups, keyed by
        the first reason's kind and operator, then also its node), the same counted in producer
        neurons no permutable group moves (``frozen_producer_neurons_by_op`` / ``..._by_node``),
        and ``frozen_groups``: each group's size, members and first eight reasons.
    """
    producer_frozen = frozen_producer_neurons(analysis)
    by_op: Counter[str] = Counter()
    by_node: Counter[str] = Counter()
    neurons_by_op: Counter[str] = Counter()
    neurons_by_node: Counter[str] = Counter()
    frozen_groups = []
    for group in analysis.groups:
        if not group.frozen or group.size < 2:
            continue
        first = group.reasons[0] if group.reasons else None
        kind, message = (first.kind, first.message) if first else ("unknown", "no reason recorded")
        op_key, node_key, _ = reason_keys(kind, message)
        by_op[op_key] += group.size
        by_node[node_key] += group.size
        neurons_by_op[op_key] += producer_frozen.get(group.id, 0)
        neurons_by_node[node_key] += producer_frozen.get(group.id, 0)
        frozen_groups.append({
            "id": group.id,
            "size": group.size,
            "frozen_producer_neurons": producer_frozen.get(group.id, 0),
            "reasons": [str(r) for r in group.reasons[:8]],
            "more_reasons": max(0, len(group.reasons) - 8),
            "members": len(group.members),
        })  # fmt: skip
    return {
        "frozen_group_sizes_by_op": dict(by_op.most_common()),
        "frozen_group_sizes_by_node": dict(by_node.most_common()),
        "frozen_producer_neurons_by_op": dict(neurons_by_op.most_common()),
        "frozen_producer_neurons_by_node": dict(neurons_by_node.most_common()),
        "frozen_groups": frozen_groups,
    }


def percent(fraction: float) -> str:
    """``0.9123`` -> ``'91.2 %'``."""
    return f"{100 * fraction:.1f} %"


def cells(row: Mapping[str, Any]) -> list[str]:
    """The :data:`COLUMNS` cells of one row."""
    verdict = "EQUIVALENT" if row["equivalent"] else "**NOT EQUIVALENT**"
    return [
        f"{row['groups']} ({row['permutable_groups']})",
        str(row["producer_neurons"]),
        percent(row["permutable_fraction"]),
        str(row["pinned_by_outputs"]),
        percent(row["permutable_fraction_excluding_outputs"]),
        f"{verdict}: {row['max_abs_error']:.1e} / {row['reference_max_abs']:.3g}",
        "yes" if row["wrong_permutation_caught"] else "**NO**",
    ]


def markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A Markdown table: ``header`` then one line of cells per entry of ``lines``."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def frozen_text(rows: Sequence[Mapping[str, Any]], limit: int = 12) -> str:
    """Per model: frozen group sizes (and the producer neurons they hold) by first reason, then by node."""
    out = []
    for row in rows:
        if "error" in row:
            continue
        neurons_by_op, neurons_by_node = row["frozen_producer_neurons_by_op"], row["frozen_producer_neurons_by_node"]
        ops = "; ".join(
            f"{key} ({size}, {neurons_by_op.get(key, 0)} producer neurons)"
            for key, size in row["frozen_group_sizes_by_op"].items()
        )
        out.append(f"- {row['model']}: frozen group sizes by first reason: {ops or 'none'}")
        nodes = sorted(
            row["frozen_group_sizes_by_node"].items(), key=lambda kv: (-neurons_by_node.get(kv[0], 0), -kv[1])
        )
        for key, size in nodes[:limit]:
            out.append(f"    - {key}: {size} ({neurons_by_node.get(key, 0)} producer neurons)")
        if len(nodes) > limit:
            out.append(f"    - ... {len(nodes) - limit} more (see --json)")
    return "\n".join(out)
