"""Human-readable renderings of an :class:`~onnxlady._audit.AuditReport`.

:func:`render_markdown` and :func:`render_html` carry the same facts as ``report.to_dict()``;
the HTML page adds pictures drawn by hand (no matplotlib, no external assets): per group a
similarity heatmap before and after resync (groups above 64 neurons downsampled), each an
embedded PNG image (one pixel per cell, encoded here with zlib: a few kB, where one SVG
rectangle per cell made a YOLOv8n report 31 MB), and per producer tensor the L2-norm ratio of
every neuron with flagged neurons marked, as inline SVG (above one point per two pixels, one
vertical min-max stroke per pixel pair instead: a 3,072-neuron tensor drew 153 kB of circles).

The page's size is bounded whatever the model: pictures are drawn for at most
:data:`FIGURE_GROUPS` groups (those an auditor looks at first: ambiguous, then lowest margin,
then largest) and :data:`FIGURE_TENSORS` tensors (flagged first), the others are one table row
each, and the group graph is left out above :data:`GRAPH_GROUPS` groups (``onnxlady inspect
--dot`` draws it). A 340-layer transformer's report was 10 MB with a picture for every group.
"""

from __future__ import annotations

import base64
import html
import math
import re
import struct
import zlib
from typing import Any

import numpy as np

from onnxlady._audit._verdicts import AuditReport

__all__ = ["render_html", "render_markdown"]

#: Groups with heatmaps, tensors with norm-ratio plots, and groups up to which the graph is drawn.
FIGURE_GROUPS = 32
FIGURE_TENSORS = 48
GRAPH_GROUPS = 300
#: Rows of each per-tensor or per-group table; the JSON (``--json``) has them all.
TABLE_ROWS = 400


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


#: Characters Markdown (or the HTML it may carry) would act on; each is shown escaped.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~#!])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _md(value: Any) -> str:
    """A name (or a sentence holding names) as inert Markdown text: names are data.

    HTML is escaped (``<script>`` shows as text), Markdown's active characters get a backslash
    (``|`` cannot end a table cell, ``__init__`` is not bold), control characters and line
    breaks are shown as escapes so a name cannot break a table row or drive a terminal.
    """
    text = html.escape(str(value), quote=False)
    text = _CONTROL.sub(lambda match: ascii(match.group())[1:-1], text)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _group_rows(report: AuditReport) -> list[dict[str, Any]]:
    return report.resync.to_dict()["groups"] if report.resync is not None else []


def render_markdown(report: AuditReport) -> str:
    lines = [
        f"# Audit verdict: **{report.verdict}** (exit {report.exit_code})",
        "",
        _md(report.summary),
        "",
    ]
    if report.conversions:
        lines += ["## Conversions (not integrity changes)", "", "| kind | in the | what |", "|---|---|---|"]
        lines += [f"| {_md(c.kind)} | {_md(c.model)} | {_md(c.detail)} |" for c in report.conversions]
        lines.append("")
    if report.rescaled:
        lines += [
            "## Function-preserving rescales",
            "",
            "| group | neuron | tensor | scale | undone by |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {_md(s.group)} | {s.neuron} | {_md(s.tensor)} | {s.k:.6g} | {_md(s.compensated_by)} |"
            for s in report.rescaled
        ]
        lines.append("")
    if report.scaled_neurons:
        lines += [
            "## Scaled neurons (no compensation)",
            "",
            "| group | neuron | tensor | k |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {_md(s.group)} | {s.neuron} | {_md(s.tensor)} | {s.k:.6g} |"
            for s in report.scaled_neurons
        ]
        lines.append("")
    if report.perturbation:
        p = report.perturbation
        ev = p["evidence"]
        lines += [f"## Perturbation: {_md(p['kind'])}", "", _md(p["reason"]), ""]
        lines += [
            f"- changed weight fraction: {ev['changed_fraction']:.4f}",
            f"- new zeros: {ev['new_zeros']} ({ev['new_zero_fraction']:.4f})",
            f"- tensors with few distinct values: {ev['tensors_with_few_distinct_values']}/{ev['weight_tensors']}",
            f"- per-tensor relative change CV: {ev['relative_change_cv']:.3f}",
            f"- non-weight constants changed: {len(ev['non_weight_constants_changed'])}",
            "",
            "| tensor | elements | changed | new zeros | distinct (suspect / reference) | relative change |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {_md(t['tensor'])} | {t['elements']} | {t['changed']} | {t['new_zeros']} | "
            f"{t['distinct_values']} / {t['reference_distinct_values']} | {t['relative_change']:.4g} |"
            for t in ev["per_tensor"]
        ]
        lines.append("")
    groups = _group_rows(report)
    if groups:
        lines += [
            "## Resync per group",
            "",
            "| group | size | mean margin | min margin | ambiguous | zero neurons | Psi |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {_md(g['id'])} | {g['size']} | {_fmt(g['mean_margin'])} | {_fmt(g['min_margin'])} | {g['ambiguous']} | "
            f"{g['zero_neurons']} | {_fmt(g['psi'])} |"
            for g in groups
        ]
        lines.append("")
    if report.tensors:
        lines += [
            "## Per tensor",
            "",
            "| tensor | group | min cosine | norm ratio min / max | flagged neurons |",
            "|---|---|---|---|---|",
        ]
        for t in report.tensors:
            lines.append(
                f"| {_md(t.tensor)} | {_md(t.group)} | {min(t.cosine):.6f} | {min(t.norm_ratio):.4g} / {max(t.norm_ratio):.4g} | "
                f"{', '.join(map(str, t.flagged)) or '-'} |"
            )
        lines.append("")
    return "\n".join(lines)


# -- pictures ----------------------------------------------------------------------------------
def _rgb(value: float) -> tuple[int, int, int]:
    """A cosine as a colour: -1 blue, 0 white, 1 red (NaN white)."""
    v = max(-1.0, min(1.0, float(value))) if math.isfinite(value) else 0.0
    if v >= 0:
        c = int(255 * (1 - v))
        return 255, c, c
    c = int(255 * (1 + v))
    return c, c, 255


def _png(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` (rows of (r, g, b)), with the standard library only."""
    height = len(pixels)
    width = len(pixels[0]) if height else 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    # Each scanline starts with its filter type (0: none).
    raw = b"".join(b"\x00" + bytes(channel for pixel in row for channel in pixel) for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _heatmap_png(rows: list[list[float]]) -> bytes:
    """``_png([[_rgb(v) for v in row] for row in rows])``, the colours computed for all cells at once.

    The same arithmetic as :func:`_rgb` elementwise (its ``int`` of a non-negative value is the
    floor), hence the same bytes; a fifth of a small model's audit was that loop per pixel.
    """
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        return _png([[_rgb(v) for v in row] for row in rows])
    values = np.array(rows, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        v = np.where(np.isfinite(values), np.clip(values, -1.0, 1.0), 0.0)
        positive = v >= 0
        fade = np.floor(255 * np.where(positive, 1 - v, 1 + v)).astype(np.uint8)
    pixels = np.empty((len(rows), width, 3), dtype=np.uint8)
    pixels[..., 0] = np.where(positive, 255, fade)
    pixels[..., 1] = fade
    pixels[..., 2] = np.where(positive, fade, 255)
    return _png_bytes(pixels)


def _png_bytes(pixels: np.ndarray) -> bytes:
    """:func:`_png` of an (height, width, 3) uint8 array."""
    height, width = pixels.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    lines = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # each scanline starts with filter type 0
    lines[:, 1:] = pixels.reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(lines.tobytes(), 9)) + chunk(b"IEND", b"")


def _heatmap(matrix: list[list[float]], title: str, px: int = 200) -> str:
    """A similarity matrix as an embedded PNG (one pixel per cell, scaled up without smoothing)."""
    rows = matrix if matrix and matrix[0] else [[0.0]]
    image = base64.b64encode(_heatmap_png(rows)).decode("ascii")
    label = html.escape(title)
    return (
        f"<figure class='heatmap'><figcaption>{label}</figcaption>"
        f"<img src='data:image/png;base64,{image}' width='{px}' height='{px}' alt='{label}'></figure>"
    )


def _ratio_plot(
    ratios: list[float],
    flagged: list[int],
    title: str,
    width: int = 420,
    height: int = 120,
) -> str:
    """The norm ratio of every neuron: a dot each, or a min-max stroke per two pixels when denser."""
    finite = [r for r in ratios if math.isfinite(r)]
    top = max([*finite, 1.0]) * 1.1 or 1.0
    n = max(1, len(ratios))
    step = width / n
    parts = [f'<text x="0" y="12" font-size="12">{html.escape(title)}</text>']
    y1 = 16 + height * (1 - 1.0 / top)
    parts.append(
        f'<line x1="0" x2="{width}" y1="{y1:.1f}" y2="{y1:.1f}" stroke="#888" stroke-dasharray="3,3"/>'
    )
    flag = set(flagged)

    def y_of(r: float) -> float:
        return 16 + height * (1 - (r if math.isfinite(r) else top) / top)

    if n <= width // 2:
        for i, r in enumerate(ratios):
            color = "#d00" if i in flag else "#36c"
            radius = 3 if i in flag else 1.6
            parts.append(f'<circle cx="{(i + 0.5) * step:.1f}" cy="{y_of(r):.1f}" r="{radius}" fill="{color}"/>')
    else:
        columns = width // 2
        strokes: dict[bool, list[str]] = {False: [], True: []}
        for column in range(columns):
            members = range(column * n // columns, (column + 1) * n // columns)
            for red in (False, True):
                ys = [y_of(ratios[i]) for i in members if (i in flag) == red]
                if ys:  # a stroke at least 1.5 px tall, so a single value stays visible
                    low, high = min(ys), max(ys)
                    strokes[red].append(f"M{2 * column + 1} {low - 0.75:.1f}V{max(high, low) + 0.75:.1f}")
        for red, colour, stroke in ((False, "#36c", 2), (True, "#d00", 3)):
            if strokes[red]:
                parts.append(f'<path d="{"".join(strokes[red])}" stroke="{colour}" stroke-width="{stroke}" fill="none"/>')
    return (
        f'<svg width="{width}" height="{height + 20}" role="img">{"".join(parts)}</svg>'
    )


def _group_graph(analysis: Any) -> str:
    """The group graph as inline SVG: columns by depth, green permutable, pink frozen."""
    import networkx as nx

    graph = nx.DiGraph()
    graph.add_nodes_from(g.id for g in analysis.groups)
    # Edges in the groups' order: group_edges() gathers them from sets of group ids, whose order
    # follows Python's string hashing, and the spanning tree a cycle keeps follows edge order.
    rank = {g.id: number for number, g in enumerate(analysis.groups)}
    graph.add_edges_from(sorted(analysis.group_edges(), key=lambda edge: (rank[edge[0]], rank[edge[1]])))
    if not nx.is_directed_acyclic_graph(graph):
        graph = nx.DiGraph(nx.dfs_tree(graph))  # a cycle cannot be layered: keep a spanning tree
    depth: dict[str, int] = {}
    for gid in nx.topological_sort(graph):
        depth[gid] = max((depth[p] + 1 for p in graph.predecessors(gid)), default=0)
    columns: dict[int, list[str]] = {}
    for group in analysis.groups:
        columns.setdefault(depth.get(group.id, 0), []).append(group.id)
    box_w, box_h, gap_x, gap_y = 86, 30, 40, 10
    position = {gid: (10 + d * (box_w + gap_x), 10 + row * (box_h + gap_y))
                for d, ids in columns.items() for row, gid in enumerate(ids)}  # fmt: skip
    width = 20 + (max(columns, default=0) + 1) * (box_w + gap_x)
    height = 20 + max((len(ids) for ids in columns.values()), default=1) * (box_h + gap_y)
    parts = [f"<svg width='{width}' height='{height}'>"]  # inline SVG in HTML needs no namespace
    for a, b in graph.edges:
        (x1, y1), (x2, y2) = position[a], position[b]
        parts.append(f"<line x1='{x1 + box_w}' y1='{y1 + box_h / 2}' x2='{x2}' y2='{y2 + box_h / 2}' stroke='#888'/>")
    for group in analysis.groups:
        x, y = position[group.id]
        colour = "#b7e4b0" if group.permutable else ("#f5b5c4" if group.frozen else "#ddd")
        parts.append(f"<rect x='{x}' y='{y}' width='{box_w}' height='{box_h}' fill='{colour}' stroke='#555'/>")
        parts.append(
            f"<text x='{x + 4}' y='{y + 19}' font-size='11' font-family='sans-serif'>"
            f"{html.escape(group.id)} ({group.size})</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _by_attention(report: AuditReport, stats: dict[str, dict[str, Any]]) -> list[str]:
    """Groups in the order an auditor looks at them: ambiguous, then lowest min margin, then largest."""

    def order(gid: str) -> tuple[float, float, float]:
        g = stats.get(gid, {})
        margin = g.get("min_margin")
        margin = float(margin) if isinstance(margin, (int, float)) and math.isfinite(margin) else math.inf
        return (-float(g.get("ambiguous") or 0), margin, -float(g.get("size") or 0))

    return sorted(report.similarity, key=order)


def _more_rows(shown: int, total: int, order: str) -> str:
    return f"<p>{shown} of {total} rows ({order}); <code>--json</code> lists them all.</p>"


def render_html(report: AuditReport, analysis: Any = None) -> str:
    """A self-contained HTML page (inline SVG and PNG data URIs, no external assets).

    ``analysis`` (optional, a :class:`~onnxlady.ChannelAnalysis` of the reference) adds each
    group's members.
    """
    esc = html.escape
    body = [
        f"<h1>Audit verdict: <span class='verdict'>{esc(report.verdict)}</span> (exit {report.exit_code})</h1>",
        f"<p>{esc(report.summary)}</p>",
    ]
    if report.conversions:
        body.append("<h2>Conversions (not integrity changes)</h2><table><tr><th>kind</th><th>in the</th><th>what</th></tr>")
        for c in report.conversions:
            body.append(f"<tr><td>{esc(c.kind)}</td><td>{esc(c.model)}</td><td>{esc(c.detail)}</td></tr>")
        body.append("</table>")
    if report.scaled_neurons or report.rescaled:
        body.append(
            "<h2>Scaled neurons</h2><table><tr><th>group</th><th>neuron</th><th>tensor</th><th>k</th><th>undone by</th></tr>"
        )
        for s in report.scaled_neurons + report.rescaled:
            body.append(
                f"<tr><td>{esc(s.group)}</td><td>{s.neuron}</td><td>{esc(s.tensor)}</td><td>{s.k:.6g}</td>"
                f"<td>{esc(str(s.compensated_by or 'nothing (attack)'))}</td></tr>"
            )
        body.append("</table>")
    if report.perturbation:
        p = report.perturbation
        body.append(f"<h2>Perturbation: {esc(p['kind'])}</h2><p>{esc(p['reason'])}</p>")
        body.append(
            "<table><tr><th>tensor</th><th>elements</th><th>changed</th><th>new zeros</th><th>distinct (suspect / reference)</th><th>relative change</th></tr>"
        )
        per_tensor = p["evidence"]["per_tensor"]
        shown = sorted(per_tensor, key=lambda t: -float(t["relative_change"]))[:TABLE_ROWS]
        if len(shown) < len(per_tensor):
            body.append(_more_rows(len(shown), len(per_tensor), "largest relative change first"))
        for t in (per_tensor if len(shown) == len(per_tensor) else shown):
            body.append(
                f"<tr><td>{esc(t['tensor'])}</td><td>{t['elements']}</td><td>{t['changed']}</td><td>{t['new_zeros']}</td>"
                f"<td>{t['distinct_values']} / {t['reference_distinct_values']}</td><td>{t['relative_change']:.4g}</td></tr>"
            )
        body.append("</table>")
    stats = {g["id"]: g for g in _group_rows(report)}
    if analysis is not None and len(analysis.groups) <= GRAPH_GROUPS:
        body.append("<h2>Group graph</h2>" + _group_graph(analysis))
    elif analysis is not None:
        body.append(
            f"<h2>Group graph</h2><p>{len(analysis.groups)} groups: too many to draw here "
            "(<code>onnxlady inspect MODEL --dot</code> writes the graph).</p>"
        )
    body.append("<h2>Groups</h2>")
    ordered = _by_attention(report, stats)
    drawn = set(ordered[:FIGURE_GROUPS])  # heatmaps for the groups to look at first
    if len(drawn) < len(report.similarity):
        body.append(
            f"<p>Heatmaps for {len(drawn)} of {len(report.similarity)} groups (ambiguous first, then the "
            "lowest margins, then the largest); the others in the table below.</p>"
        )
    for gid, mats in report.similarity.items():
        if gid not in drawn:
            continue
        g = stats.get(gid)
        facts = ""
        if g is not None:
            facts = (
                f"size {g['size']}, mean margin {_fmt(g['mean_margin'])}, min margin {_fmt(g['min_margin'])}, "
                f"ambiguous {g['ambiguous']}, Psi {_fmt(g['psi'])}"
            )
        members = ""
        if analysis is not None:
            try:
                group = analysis.group(gid)
                members = ", ".join(
                    f"{m.tensor}[{m.axis}]" for m in group.members if m.is_weight
                )
            except KeyError:
                members = ""
        step = mats.get("step", 1)
        note = f" (every {step}th neuron)" if step and step > 1 else ""
        body.append(
            f"<div class='group'><h3>{esc(gid)}</h3><p>{esc(facts)}{esc(note)}</p>"
        )
        if members:
            body.append(f"<p class='members'>{esc(members)}</p>")
        body.append(
            "<div class='heatmaps'>"
            + _heatmap(mats["before"], "cosine before resync")
            + _heatmap(mats["after"], "cosine after resync")
            + "</div></div>"
        )
    undrawn = ordered[FIGURE_GROUPS:]
    if len(undrawn) > TABLE_ROWS:
        body.append(_more_rows(TABLE_ROWS, len(undrawn), "ambiguous and lowest margins first"))
        undrawn = undrawn[:TABLE_ROWS]
    if undrawn:
        body.append(
            "<table><tr><th>group</th><th>size</th><th>mean margin</th><th>min margin</th>"
            "<th>ambiguous</th><th>Psi</th></tr>"
        )
        for gid in undrawn:
            g = stats.get(gid, {})
            body.append(
                f"<tr><td>{esc(gid)}</td><td>{g.get('size', '')}</td><td>{_fmt(g.get('mean_margin'))}</td>"
                f"<td>{_fmt(g.get('min_margin'))}</td><td>{g.get('ambiguous', '')}</td><td>{_fmt(g.get('psi'))}</td></tr>"
            )
        body.append("</table>")
    if report.tensors:
        body.append(
            "<h2>Per-tensor L2-norm ratio (suspect / reference), flagged neurons in red</h2>"
        )
        plotted = sorted(range(len(report.tensors)), key=lambda i: (not report.tensors[i].flagged, i))
        plotted = sorted(plotted[:FIGURE_TENSORS])
        if len(plotted) < len(report.tensors):
            body.append(
                f"<p>Plots for {len(plotted)} of {len(report.tensors)} tensors (those with flagged "
                "neurons first); the others in the table below.</p>"
            )
        for i in plotted:
            t = report.tensors[i]
            body.append(
                f"<div>{_ratio_plot(t.norm_ratio, t.flagged, f'{t.tensor} ({t.group})')}</div>"
            )
        rest = sorted(set(range(len(report.tensors))) - set(plotted), key=lambda i: (-len(report.tensors[i].flagged), i))
        if len(rest) > TABLE_ROWS:
            body.append(_more_rows(TABLE_ROWS, len(rest), "most flagged neurons first"))
            rest = rest[:TABLE_ROWS]
        if rest:
            body.append("<table><tr><th>tensor</th><th>group</th><th>neurons</th><th>norm ratio min</th><th>max</th><th>flagged</th></tr>")
            for i in rest:
                t = report.tensors[i]
                finite = [r for r in t.norm_ratio if math.isfinite(r)]
                low, high = (min(finite), max(finite)) if finite else (float("nan"), float("nan"))
                body.append(
                    f"<tr><td>{esc(t.tensor)}</td><td>{esc(str(t.group or '-'))}</td><td>{len(t.norm_ratio)}</td>"
                    f"<td>{_fmt(low)}</td><td>{_fmt(high)}</td><td>{len(t.flagged)}</td></tr>"
                )
            body.append("</table>")
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:2px 6px}.verdict{color:#a00}.heatmaps{display:flex;gap:1em}figure{margin:4px}"
        "figcaption{font-size:12px}.heatmap img{image-rendering:pixelated;display:block}svg{margin:4px}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>onnxlady audit: "
        f"{esc(report.verdict)}</title><style>{style}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
