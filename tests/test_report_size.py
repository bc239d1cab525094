"""The audit's HTML report stays small on any model: heatmaps are PNG images, not SVG cells."""

from __future__ import annotations

import base64
import re
import struct
import zlib

import numpy as np

from fixtures import FIXTURES
from onnxlady import analyze, draw_permutations, permute_model
from onnxlady._audit._render import _png, _rgb, render_html
from onnxlady._audit._verdicts import MAX_MATRIX, audit_models


def _decode(png: bytes) -> list[list[tuple[int, int, int]]]:
    """Read back an 8-bit RGB PNG with filter 0 rows (what _png writes), checking every CRC."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = {}, 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind, data = png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF, kind
        chunks[kind] = data
        offset += 12 + length
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = []
    for y in range(height):
        line = raw[y * (1 + 3 * width) : (y + 1) * (1 + 3 * width)]
        assert line[0] == 0
        rows.append([(line[1 + 3 * x], line[2 + 3 * x], line[3 + 3 * x]) for x in range(width)])
    return rows


def test_png_holds_one_pixel_per_cell() -> None:
    matrix = [[1.0, 0.0, -1.0], [0.5, -0.5, float("nan")]]
    pixels = _decode(_png([[_rgb(v) for v in row] for row in matrix]))
    assert pixels == [
        [(255, 0, 0), (255, 255, 255), (0, 0, 255)],
        [(255, 127, 127), (127, 127, 255), (255, 255, 255)],
    ]


def test_report_size_is_bounded_per_group() -> None:
    reference = FIXTURES["resnet"](0)
    suspect = FIXTURES["resnet"](0)
    analysis = analyze(suspect)
    permute_model(analysis, draw_permutations(analysis, 1))
    report = audit_models(reference, suspect)
    page = render_html(report, analyze(reference))
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 2 * len(report.similarity) > 0
    for data, mats in zip(images, (m[k] for m in report.similarity.values() for k in ("before", "after"))):
        pixels = _decode(base64.b64decode(data))
        assert len(pixels) == len(mats) <= MAX_MATRIX and len(pixels[0]) == len(mats[0])
        # The after-resync matrix of a permuted copy has its diagonal red (cosine 1).
    after = _decode(base64.b64decode(images[1]))
    assert all(after[i][i] == (255, 0, 0) for i in range(len(after)))
    # A heatmap costs at most a few kB whatever the group's size (64 x 64 cells at most):
    # no SVG cell per neuron pair.
    assert "<rect x=" not in page.split("<h2>Groups</h2>")[1]
    assert max(len(data) for data in images) < 4 * MAX_MATRIX * MAX_MATRIX
    assert np.mean([len(data) for data in images]) < 16_000


def test_many_groups_and_wide_tensors_stay_small() -> None:
    """Pictures for a bounded number of groups and tensors; the rest are table rows, capped too."""
    from fixtures import build_deep_model
    from onnxlady import perturb
    from onnxlady._audit._render import FIGURE_GROUPS, FIGURE_TENSORS, GRAPH_GROUPS, TABLE_ROWS

    reference = build_deep_model(3000)  # 500 residual blocks: 500 groups, 500 producer tensors
    suspect = perturb(permute_model_copy(reference), noise=0.05, seed=3).model
    report = audit_models(reference, suspect)
    analysis = analyze(reference)
    assert len(report.similarity) > FIGURE_GROUPS and len(report.tensors) > TABLE_ROWS + FIGURE_TENSORS
    assert len(analysis.groups) > GRAPH_GROUPS
    page = render_html(report, analysis)
    assert page.count("data:image/png;base64,") == 2 * FIGURE_GROUPS
    assert page.count("<svg") == FIGURE_TENSORS  # no group graph: too many groups to draw
    assert "--dot" in page and "--json</code> lists them all" in page
    assert page.count("<tr>") <= 3 * (TABLE_ROWS + 1) + 20
    assert len(page) < 1_500_000


def test_ratio_plot_of_a_wide_tensor_is_strokes_not_dots() -> None:
    from onnxlady._audit._render import _ratio_plot

    rng = np.random.default_rng(0)
    ratios = list(1.0 + 0.01 * rng.normal(size=3072))
    ratios[1000] = 3.0
    plot = _ratio_plot(ratios, [1000], "wide")
    assert "<circle" not in plot and plot.count("<path") == 2 and 'stroke="#d00"' in plot
    assert len(plot) < 12_000  # one circle per neuron was about 150 kB
    small = _ratio_plot(ratios[:100], [7], "narrow")
    assert small.count("<circle") == 100 and small.count('fill="#d00"') == 1


def permute_model_copy(model: object) -> object:
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # type: ignore[arg-type]
    analysis = analyze(copy)
    permute_model(analysis, draw_permutations(analysis, 1))
    return copy
