"""The audit's HTML report renders in a real browser (headless Chromium), offline."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fixtures import FIXTURES
from onnxlady import analyze, draw_permutations, permute_model
from onnxlady._audit._render import render_html
from onnxlady._audit._verdicts import audit_models

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def _browser(*arguments: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *arguments],  # type: ignore[list-item]
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip


def test_html_report_renders_with_its_pictures(tmp_path: Path) -> None:
    reference = FIXTURES["vgg"](0)
    suspect = FIXTURES["vgg"](0)
    analysis = analyze(suspect)
    permute_model(analysis, draw_permutations(analysis, 1))
    report = audit_models(reference, suspect)
    page = tmp_path / "report.html"
    page.write_text(render_html(report))
    source = page.read_text()
    source_svgs, images = source.count("<svg"), source.count("<img src='data:image/png;base64,")
    assert images == 2 * len(report.similarity) >= 2 * len(report.resync.groups)

    dom = _browser("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-500:]
    assert "permuted" in dom.stdout and dom.stdout.count("<svg") == source_svgs  # every picture parsed
    # The heatmaps are PNG data: the browser must decode every one (a copy of the page reports
    # how many it decoded, at their natural size of one pixel per cell).
    probe = tmp_path / "probe.html"
    probe.write_text(
        source.replace(
            "</body>",
            "<script>window.onload=()=>{const i=[...document.images];"
            "document.body.dataset.decoded=i.filter(x=>x.complete&&x.naturalWidth>0).length;"
            "document.body.dataset.widths=[...new Set(i.map(x=>x.naturalWidth))].join(' ');}</script></body>",
        )
    )
    decoded = _browser("--dump-dom", "--virtual-time-budget=5000", probe.as_uri())
    assert f'data-decoded="{images}"' in decoded.stdout, decoded.stdout[-300:]
    sizes = {len(mats["before"][0]) for mats in report.similarity.values()}
    assert f'data-widths="{" ".join(map(str, sorted(sizes)))}"' in decoded.stdout or len(sizes) > 1

    shot = tmp_path / "shot.png"
    result = _browser(f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr[-500:]
    assert shot.stat().st_size > 20_000  # a page with heatmaps, not a blank one
