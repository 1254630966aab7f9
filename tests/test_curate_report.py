"""The curation report renders in headless Chromium and every image on it loads."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from data_tools.clipscore import TINY_CLIP
from data_tools.curate import run_curation
from data_tools.fixtures import build_curation_fixture, natural_image
from data_tools.report import write_gallery

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Appended to a copy of the page: after load, record every <img>'s decoded width in the DOM.
PROBE = """<script>window.addEventListener('load', () => {
  const w = Array.from(document.images).map(i => (i.complete ? i.naturalWidth : -1));
  const el = document.createElement('div'); el.id = 'probe'; el.textContent = 'IMGS:' + w.join(',') + ':END';
  document.body.appendChild(el);
});</script>"""


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'chrome'}",
           "--virtual-time-budget=5000", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _image_widths(page: Path, tmp: Path) -> list[int]:
    probed = page.with_name("probe_" + page.name)
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(["--dump-dom", probed.as_uri()], tmp).stdout
    m = re.search(r"IMGS:([-\d,]*):END", dom)
    assert m, f"page did not finish loading in Chromium: {dom[:500]}"
    return [int(x) for x in m.group(1).split(",") if x]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make system-deps installs it)")
def test_report_renders_and_images_load(tmp_path):
    cfg, expected = build_curation_fixture(tmp_path / "data", n_good=6)
    cfg["clip"] = {"enabled": True, "model": "mmsmall-tiny-clip", "custom": TINY_CLIP, "quantile": 0.2}
    summary = run_curation(cfg, workers=1)
    page = Path(summary["report"])
    html = page.read_text()
    for section in ("Funnel", "Distributions", "Kept", "Dropped: near_duplicate", "Borderline", "Decontamination",
                    "Config", "Versions", "decompression_bomb"):  # fmt: skip
        assert section in html
    assert re.search(r"src='(?!data:)", html) is None  # self-contained: every image inlined
    widths = _image_widths(page, tmp_path)
    assert (
        len(widths) >= 4 + 1 + len(summary["dropped"]) + 1
    )  # histograms, kept, per-reason grids, borderline
    assert all(w > 0 for w in widths), widths
    shot = tmp_path / "shot.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()], tmp_path)
    im = Image.open(shot).convert("L")
    assert im.size == (1200, 2000) and im.getextrema()[0] < 100  # something dark (text) was drawn
    for name in (
        "hist_clip.png",
        "hist_caption_len.png",
        "hist_min_side.png",
        "hist_aspect.png",
        "grid_kept.png",
    ):
        assert (page.parent / name).stat().st_size > 1000


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make system-deps installs it)")
def test_gallery_is_reusable(tmp_path):
    samples = [
        {"image": natural_image(1), "caption": "a scene", "label": "one"},
        {"image": None, "caption": "lost", "label": "missing"},
        {"image": b"not an image", "caption": "broken bytes", "label": "bad"},
    ]
    page = write_gallery(samples, tmp_path / "g", "Synth charts: sample")
    assert page.name == "synth_charts_sample.html" and (tmp_path / "g" / "synth_charts_sample.png").exists()
    widths = _image_widths(page, tmp_path)
    assert len(widths) == 2 and all(w > 0 for w in widths)  # the grid and the one real thumbnail
