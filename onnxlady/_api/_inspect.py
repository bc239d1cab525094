"""``onnxlady.inspect``: the coupled channel groups of a model, and why some cannot move."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxlady._analysis._channels import ChannelAnalysis, ChannelGroup, analyze, overridable_initializers
from onnxlady._api._json_text import dumps_indented
from onnxlady._api._results import Result
from onnxlady._api._sources import (
    ModelSource,
    OpenedModel,
    jsonable,
    open_model,
    output_path,
    path_text,
    source_path,
    write_text,
)
from onnxlady._io._collector import collector_paused
from onnxlady._io._outputs import check_output_paths


@dataclass
class InspectResult(Result):
    """The outcome of :func:`inspect`: the analysis of one model.

    Attributes:
        analysis: the coupled channel groups, the tensors each permutation touches and why
            frozen groups cannot move.
        source: the model's path; ``None`` for a model given in memory.
        sha256: the model file's sha256; ``None`` for a model given in memory.
        members: whether :meth:`to_text` lists every member of every group (``--members``).
    """

    analysis: ChannelAnalysis = field(repr=False)
    source: Path | None = None
    sha256: str | None = None
    members: bool = False

    @property
    def groups(self) -> list[ChannelGroup]:
        """Every channel group, permutable or not."""
        return self.analysis.groups

    @property
    def summary(self) -> dict[str, Any]:
        """Counts: groups, permutable and frozen groups, producer neurons, reasons by kind."""
        return jsonable(self.analysis.summary())

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady inspect --json`` prints: summary, groups with members, untied constants."""
        document = inspect_document(self.analysis)
        # The groups and untied lists are plain JSON already (inspect_document makes them so):
        # jsonable's walk over every member would cost a fifth of the command at 50,000 nodes.
        groups, untied = document.pop("groups"), document.pop("untied")
        return {**jsonable({"model": path_text(self.source), "sha256": self.sha256, **document}), "groups": groups,
                "untied": untied}  # fmt: skip

    def to_json_text(self) -> str:
        """What ``onnxlady inspect --json`` prints: ``json.dumps(self.to_json(), indent=2)``'s text.

        The groups are written straight from the analysis, member by member, without making
        the document's dict per member first (a tenth of the command at 50,000 nodes); the rest
        of the document goes through :func:`~onnxlady._api._json_text.dumps_indented`.
        """
        analysis = self.analysis
        head = jsonable({"model": path_text(self.source), "sha256": self.sha256, "summary": analysis.summary()})
        text = dumps_indented({**head, "groups": _GROUPS_MARK, "untied": _untied_document(analysis)})
        # Top-level keys are the only lines starting with two spaces and a quote (string values
        # never hold a raw newline): the marker's line is found exactly once.
        marker = f'\n  "groups": {json.dumps(_GROUPS_MARK)},\n  "untied": '
        groups = _groups_parts(analysis.groups)
        if groups is None or text.count(marker) != 1:
            return dumps_indented(self.to_json())  # a value of an unusual type: the general writer
        # One join of the pieces: the groups' text (most of the document) is copied once, into
        # the document, not into a list's text, then a replacement's, then the document.
        head_text, _, tail_text = text.partition(marker)
        return "".join([head_text, '\n  "groups": ', *groups, ',\n  "untied": ', tail_text])

    def to_text(self) -> str:
        """The table ``onnxlady inspect`` prints: one row per group, reasons under frozen ones."""
        return _inspect_text(self.analysis, self.source, self.members)

    def write_dot(self, path: str | os.PathLike[str]) -> None:
        """Write the group graph for Graphviz (a group points to the groups its neurons feed).

        Args:
            path: the ``.dot`` file to write (atomically).

        Raises:
            OnnxladyError: the folder does not exist or the file cannot be written.
        """
        write_text(path, group_dot(self.analysis))


def inspect(
    model: ModelSource,
    *,
    dot: str | os.PathLike[str] | None = None,
    members: bool = False,
    kv_state: bool = False,
    progress: Callable[[str], None] | None = None,
) -> InspectResult:
    """Find the coupled channel groups of a model: what one permutation must traverse.

    The model is not modified.

    Args:
        model: a path to an ONNX file or an ``onnx.ModelProto``.
        dot: also write the group graph for Graphviz to this file.
        members: list every member of every group in :meth:`InspectResult.to_text` (the JSON
            document always holds them all).
        kv_state: analyse each KV cache (a ``past_key_values.*`` input and its ``present.*``
            output) as one recurrent state, as ``permute(kv_state=True)`` permutes it, instead
            of pinning both as graph input and output.
        progress: called with one line per analysis step.

    Returns:
        The analysis, with the groups, the permutable fraction of producer neurons and a reason
        for every frozen group.

    Raises:
        OnnxladyError: the model cannot be read, or ``dot`` is the model (or its external data)
            or its folder does not exist.
    """
    target = output_path(dot)
    if target is not None:  # before any work: the group graph must never replace the model
        check_output_paths([target], [source_path(model)])
    opened, analysis = _open_and_analyze(model, target, progress, bool(kv_state))
    result = InspectResult(analysis, opened.path, opened.sha256, bool(members))
    if target is not None:
        result.write_dot(target)
    return result


@collector_paused  # reading and checking a model makes as many objects per node as analysing it
def _open_and_analyze(
    model: ModelSource, target: Path | None, progress: Callable[[str], None] | None, kv_state: bool
) -> tuple[OpenedModel, ChannelAnalysis]:
    # External weights stay in their files, read as memory maps only where a rule needs a value:
    # the analysis reads shapes and small constants, so memory does not grow with the weights.
    # (The nodes as the check read them go straight to the analysis's graph: read once.)
    opened = open_model(model, progress=progress, map_external=True, node_table=True)
    if target is not None:
        check_output_paths([target], list(opened.external_files))
    nodes, opened.nodes = opened.nodes, None
    return opened, analyze(opened.model, progress=progress, kv_state=kv_state, nodes=nodes)


def inspect_document(analysis: ChannelAnalysis, members: bool = True) -> dict[str, Any]:
    """The JSON form of an analysis: summary, groups (with members and reasons), untied constants.

    The groups and the untied list hold JSON types only (numbers made ``int``/``bool`` here), so
    that :meth:`InspectResult.to_json` need not walk them again; the summary may hold numpy values.
    """
    return {
        "summary": analysis.summary(),
        "groups": [
            {
                "id": str(group.id),
                "size": int(group.size),
                "permutable": bool(group.permutable),
                "frozen": bool(group.frozen),
                "reasons": [{"kind": r.kind, "message": r.message} for r in group.reasons],
                "members": [
                    {
                        "tensor": m.tensor,
                        "axis": int(m.axis),
                        "role": m.role,
                        "node": m.node,
                        "index_map": m.index_map,
                        "weight": bool(m.is_weight),
                    }
                    for m in group.members
                    if members or m.is_weight
                ],
            }
            for group in analysis.groups
        ],
        "untied": _untied_document(analysis),
    }


def _untied_document(analysis: ChannelAnalysis) -> list[dict[str, Any]]:
    """The ``untied`` list of the JSON document: each copy of a shared constant."""
    return [{"source": t.source, "copy": t.tensor, "uses": len(t.uses)} for t in analysis.tensors if t.copy > 0]


#: Stands for the groups in the document :meth:`InspectResult.to_json_text` writes around them.
_GROUPS_MARK = "\x00onnxlady groups\x00"
_QUOTE = json.encoder.encode_basestring_ascii
#: Indentation of a group's fields (level 3), of a member or reason (level 4) and of its fields.
_FIELD, _ITEM, _ITEM_FIELD = ",\n" + " " * 6, " " * 8, ",\n" + " " * 10


def _groups_text(groups: list[ChannelGroup]) -> str | None:
    """The ``groups`` list as ``json.dumps(..., indent=2)`` writes it at level 1 of the document.

    None when a value is not of the type the document holds (a name that is no ``str``): the
    caller then writes the document the general way, so the text is always the standard one.
    """
    parts = _groups_parts(groups)
    return None if parts is None else "".join(parts)


def _groups_parts(groups: list[ChannelGroup]) -> list[str] | None:
    """:func:`_groups_text`'s text in pieces (one per group, and the brackets and commas between)."""
    if not groups:
        return ["[]"]
    written = ["[\n"]
    for group in groups:
        reasons, members = group.reasons, group.members
        if any(type(r.kind) is not str or type(r.message) is not str for r in reasons):
            return None
        reason_text = (
            "[\n"
            + ",\n".join(
                f'{_ITEM}{{\n          "kind": {_QUOTE(r.kind)}{_ITEM_FIELD}"message": {_QUOTE(r.message)}\n{_ITEM}}}'
                for r in reasons
            )
            + "\n      ]"
            if reasons
            else "[]"
        )
        member_texts = []
        for m in members:  # each field's type checked as it is written (one pass over the members)
            tensor, role, node, index_map = m.tensor, m.role, m.node, m.index_map
            if type(tensor) is not str or type(role) is not str or type(node) is not str or type(index_map) is not str:
                return None
            member_texts.append(
                f'{_ITEM}{{\n          "tensor": {_QUOTE(tensor)}{_ITEM_FIELD}"axis": {int(m.axis)}'
                f'{_ITEM_FIELD}"role": {_QUOTE(role)}{_ITEM_FIELD}"node": {_QUOTE(node)}'
                f'{_ITEM_FIELD}"index_map": {_QUOTE(index_map)}'
                f'{_ITEM_FIELD}"weight": {"true" if m.is_weight else "false"}\n{_ITEM}}}'
            )
        member_text = "[\n" + ",\n".join(member_texts) + "\n      ]" if members else "[]"
        written.append(
            f'    {{\n      "id": {_QUOTE(str(group.id))}{_FIELD}"size": {int(group.size)}'
            f'{_FIELD}"permutable": {"true" if group.permutable else "false"}'
            f'{_FIELD}"frozen": {"true" if group.frozen else "false"}'
            f'{_FIELD}"reasons": {reason_text}{_FIELD}"members": {member_text}\n    }}'
        )
        written.append(",\n")
    written[-1] = "\n  ]"  # (the last group's comma)
    return written


def _inspect_text(analysis: ChannelAnalysis, path: Path | None, all_members: bool) -> str:
    summary: dict[str, Any] = analysis.summary()
    lines = [
        (
            f"{path if path is not None else '(model in memory)'}: {summary['groups']} groups, "
            f"{summary['permutable_groups']} permutable, {summary['frozen_groups']} frozen"
        ),
        (
            f"producer neurons (Conv/ConvTranspose/Gemm/MatMul outputs): {summary['producer_neurons']}, "
            f"permutable {summary['permutable_producer_neurons']} ({100 * summary['permutable_fraction']:.1f} %), "
            f"pinned by graph outputs {summary['producer_neurons_pinned_by_outputs']}"
        ),
    ]
    # A shared constant is untied only where its uses cannot take one permutation: say why.
    lines.extend(f"untied: {reason}" for reason in analysis.untie_reasons)
    listed = overridable_initializers(analysis.graph) if analysis.permutable_groups else set()
    if listed and len(listed) == len(analysis.graph.initializers):
        # (listed alone, they freeze their groups with the reason; listed all, nobody meant an interface)
        lines.append(
            f"note: every initializer ({len(listed)}) is also listed as a graph input, as IR version 3 requires: "
            "they permute as weights; a caller feeding its own values there must permute them with the key"
        )
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


def group_dot(analysis: ChannelAnalysis) -> str:
    """The group graph in Graphviz's language: green permutable, pink frozen, grey trivial groups."""
    lines = ["digraph groups {", "  rankdir=LR;", '  node [shape=box, style=filled, fontname="Helvetica"];']
    for group in analysis.groups:
        colour = "palegreen" if group.permutable else ("lightpink" if group.frozen else "lightgrey")
        why = f"\\n{group.reasons[0].kind}" if group.reasons else ""
        lines.append(f'  "{group.id}" [label="{group.id}\\n{group.size} neurons{why}", fillcolor={colour}];')
    for (a, b), ops in sorted(analysis.group_edges().items()):
        lines.append(f'  "{a}" -> "{b}" [label="{",".join(sorted(ops))}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
