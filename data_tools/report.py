"""Reports: a reusable sample gallery, and the curation report (one self-contained HTML + PNGs).

Public:
- ``render_grid(samples, path, title="", cols=6, thumb=160) -> Path``: one PNG grid.
- ``write_gallery(samples, out_dir, title, cols=6, thumb=160) -> Path``: ``{slug}.png`` and a
  self-contained ``{slug}.html`` (images inlined as data URIs) in ``out_dir``; returns the HTML path.
  A sample is a dict ``{"image": PIL.Image | bytes | None, "caption": str, "label": str}`` (label
  and caption optional; ``None`` images show as "no image").
- ``write_curation_report(...)``: the curation report (funnel, histograms, grids, decontamination
  hits, config and versions) as ``report.html`` with every PNG inlined and also saved beside it.
"""

from __future__ import annotations

import base64
import html
import io
import platform
import re
import tarfile
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}td.n{text-align:right}img{max-width:100%;border:1px solid #ddd}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}h2{border-bottom:1px solid #ddd}
.grid{display:inline-block;vertical-align:top;margin:0 12px 8px 0}.grid h3{font-size:14px;margin:6px 0}
.cell{display:inline-block;width:180px;vertical-align:top;margin:4px;font-size:11px;word-wrap:break-word}
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "gallery"


def _as_image(x) -> Image.Image | None:
    if x is None:
        return None
    if isinstance(x, Image.Image):
        return x
    try:
        im = Image.open(io.BytesIO(x))
        im.load()
        return im
    except Exception:  # noqa: BLE001 - a gallery never fails on one bad image
        return None


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_grid(
    samples: Sequence[dict], path: str | Path, title: str = "", cols: int = 6, thumb: int = 160
) -> Path:
    """Paste sample thumbnails (with label and caption lines) into one PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = max(1, min(cols, len(samples) or 1))
    rows = max(1, -(-len(samples) // cols))
    text_h, pad, head = 40, 6, 24 if title else 0
    cell_w, cell_h = thumb + pad, thumb + text_h + pad
    canvas = Image.new("RGB", (cols * cell_w + pad, head + rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if title:
        draw.text((pad, 5), title, fill="black", font=_font(14))
    if not samples:
        draw.text((pad, head + 10), "(no samples)", fill="gray", font=font)
    for n, s in enumerate(samples):
        x, y = pad + (n % cols) * cell_w, head + pad + (n // cols) * cell_h
        im = _as_image(s.get("image"))
        if im is None:
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline="gray", fill="#eee")
            draw.text((x + 8, y + thumb // 2 - 6), "no image", fill="gray", font=font)
        else:
            t = im.convert("RGB")
            t.thumbnail((thumb, thumb))
            canvas.paste(t, (x + (thumb - t.width) // 2, y + (thumb - t.height) // 2))
        chars = max(8, thumb // 6)  # the default font is about 6 px per character
        lines = [str(s.get("label", ""))[:chars]] + textwrap.wrap(str(s.get("caption", "")), chars)[:2]
        for k, line in enumerate(line for line in lines if line):
            draw.text(
                (x, y + thumb + 2 + 12 * k), line[:chars], fill="black" if k == 0 else "#555", font=font
            )
    canvas.save(path, format="PNG", optimize=False)
    return path


def _data_uri(png: Path | bytes) -> str:
    data = png.read_bytes() if isinstance(png, Path) else png
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def write_gallery(
    samples: Sequence[dict], out_dir: str | Path, title: str, cols: int = 6, thumb: int = 160
) -> Path:
    """A grid PNG and a self-contained HTML gallery of ``samples``; returns the HTML path."""
    out_dir = Path(out_dir)
    slug = _slug(title)
    png = render_grid(samples, out_dir / f"{slug}.png", title, cols, thumb)
    cells = []
    for s in samples:
        im = _as_image(s.get("image"))
        if im is not None:
            t = im.convert("RGB")
            t.thumbnail((thumb, thumb))
            buf = io.BytesIO()
            t.save(buf, format="PNG")
            img = f"<img src='{_data_uri(buf.getvalue())}' alt='{html.escape(str(s.get('label', '')))}'>"
        else:
            img = "<div>(no image)</div>"
        cells.append(
            f"<div class='cell'>{img}<br><b>{html.escape(str(s.get('label', '')))}</b> "
            f"{html.escape(str(s.get('caption', ''))[:200])}</div>"
        )
    body = f"<p><img src='{_data_uri(png)}' alt='grid'></p><h2>Samples</h2>{''.join(cells)}"
    page = out_dir / f"{slug}.html"
    page.write_text(_page(title, body), encoding="utf-8")
    return page


# ----------------------------------------------------------------------------- curation report


def _hist(
    values: Sequence[float], path: Path, title: str, xlabel: str, line: float | None = None, bins: int = 40
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=90)
    vals = np.asarray([v for v in values if v is not None], dtype=float)
    if len(vals):
        ax.hist(vals, bins=bins, color="#4a7fb5")
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    if line is not None:
        ax.axvline(line, color="red", linestyle="--", label=f"threshold {line:.4f}")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("samples", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


class _Images:
    def __init__(self, units_dir: Path):
        self.units_dir = units_dir
        self.cache: dict[str, dict[str, bytes]] = {}

    def get(self, uid: str, pos: int, thumb: bool) -> bytes | None:
        if uid not in self.cache:
            path = self.units_dir / f"{uid}.tar"
            members: dict[str, bytes] = {}
            if path.exists():
                with tarfile.open(path) as tar:
                    members = {
                        m.name: tar.extractfile(m).read()
                        for m in tar
                        if m.isfile() and not m.name.endswith(".json")
                    }
            self.cache[uid] = members
        m = self.cache[uid]
        if thumb:
            return m.get(f"d{pos:06d}.jpg")
        first = (f"s{pos:06d}.{ext}" for ext in ("jpg", "png", "0.jpg", "0.png"))  # several images: the first
        return next((m[n] for n in first if n in m), None)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("mmsmall", "numpy", "pillow", "open_clip_torch", "torch", "pyarrow", "webdataset", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_curation_report(
    out_dir: Path,
    cfg,
    summary: dict,
    view: dict,
    decisions: dict,
    drops: list[dict],
    hits: list[dict],
    units_dir: Path,
) -> Path:
    """Write ``report.html`` (self-contained) and its PNGs into ``out_dir``; returns the HTML path."""
    import yaml

    from mmsmall.config import to_dict

    from .textfilters import language_id_available

    out_dir.mkdir(parents=True, exist_ok=True)
    imgs = _Images(units_dir)
    g = cfg.report.grid_size
    thr = decisions["clip_threshold"]
    pngs: list[tuple[str, Path]] = []

    # histograms over every candidate that passed the per-sample stages
    pngs.append(
        (
            "CLIP score",
            _hist(view["clip"], out_dir / "hist_clip.png", "CLIP score", "cosine similarity", thr),
        )
    )
    pngs.append(
        (
            "Caption length",
            _hist(
                view["text_len"],
                out_dir / "hist_caption_len.png",
                "Assistant text length",
                "characters",
            ),
        )
    )
    pngs.append(
        (
            "Min side",
            _hist(
                np.minimum(view["w"], view["h"]), out_dir / "hist_min_side.png", "Image min side", "pixels"
            ),
        )
    )
    pngs.append(("Aspect", _hist(np.maximum(view["w"], view["h"]) / np.minimum(view["w"], view["h"]), out_dir / "hist_aspect.png", "Aspect ratio", "long / short side")))  # fmt: skip

    # grids
    grids: list[tuple[str, Path]] = []
    kept = [
        {"image": imgs.get(u, p, False), "label": key, "caption": text}
        for u, p, key, text in view["kept"][:g]
    ]
    grids.append(("Kept", render_grid(kept, out_dir / "grid_kept.png", "kept", thumb=120)))
    by_reason: dict[str, list[dict]] = defaultdict(list)
    for d in drops:
        if len(by_reason[d["reason"]]) < g:
            im = (
                imgs.get(d["uid"], d["pos"], thumb=not d.get("cand"))
                if (d.get("thumb") or d.get("cand"))
                else None
            )
            by_reason[d["reason"]].append({"image": im, "label": str(d["id"])[:30], "caption": d["detail"]})
    for reason in sorted(by_reason):
        grids.append((f"Dropped: {reason}", render_grid(by_reason[reason], out_dir / f"grid_drop_{_slug(reason)}.png", reason, thumb=120)))  # fmt: skip
    if thr is not None:
        border = [{"image": imgs.get(u, p, False), "label": f"{clip:.4f}", "caption": text}
                  for u, p, clip, text in view["border"]]  # fmt: skip
        grids.append(("Borderline (CLIP score near the threshold)", render_grid(border, out_dir / "grid_borderline.png", "borderline", thumb=120)))  # fmt: skip

    # html
    n_in = summary["n_in"]
    rows, remaining = [], n_in
    for f in summary["funnel"]:
        remaining -= f["count"]
        rows.append(f"<tr><td>{f['stage']}</td><td>{f['reason']}</td><td class=n>{f['count']}</td>"
                    f"<td class=n>{100 * f['count'] / max(n_in, 1):.1f}%</td><td class=n>{remaining}</td></tr>")  # fmt: skip
    funnel = (
        f"<p>in: <b>{n_in}</b> &nbsp; kept: <b>{summary['n_kept']}</b> &nbsp; dropped: "
        f"<b>{n_in - summary['n_kept']}</b> &nbsp; shards: {len(list(Path(summary['out_dir']).glob('*.tar')))}</p>"
        "<table><tr><th>stage</th><th>reason</th><th>dropped</th><th>share of input</th><th>remaining</th></tr>"
        + "".join(rows) + "</table>"
    )  # fmt: skip
    notes = []
    if cfg.text.languages and not language_id_available():
        notes.append("Language id skipped: the optional package <code>langid</code> is not installed.")
    if not cfg.clip.enabled:
        notes.append("CLIP scoring off (clip.enabled: false).")
    elif thr is not None:
        notes.append(f"CLIP threshold {thr:.5f} ({'quantile ' + str(cfg.clip.quantile) if cfg.clip.quantile is not None else 'absolute'}).")  # fmt: skip
    hist_html = "".join(
        f"<img src='{_data_uri(p)}' alt='{html.escape(t)}' style='width:48%'>" for t, p in pngs
    )
    grid_html = "".join(
        f"<div class='grid'><h3>{html.escape(t)}</h3><img src='{_data_uri(p)}' alt='{html.escape(t)}'></div>"
        for t, p in grids
    )
    hit_rows = "".join(
        f"<tr><td>{html.escape(str(h['id']))}</td><td>{html.escape(h['source'])}</td><td>{h['kind']}</td>"
        f"<td>{html.escape(h['benchmark'])}</td><td>{html.escape(h['detail'])}</td></tr>" for h in hits
    )  # fmt: skip
    indexed = "".join(
        f"<tr><td>{html.escape(b)}</td><td>{n['items']}</td><td>{n['images']}</td><td>{n['questions']}</td></tr>"
        for b, n in summary.get("decontam_benchmarks", {}).items()
    )
    hits_html = (
        "<table><tr><th>benchmark</th><th>items indexed</th><th>images</th><th>questions</th></tr>"
        f"{indexed}</table><p>{len(hits)} samples matched evaluation data (removed).</p><table><tr><th>id</th><th>source</th>"
        f"<th>kind</th><th>benchmark item</th><th>detail</th></tr>{hit_rows}</table>"
        if cfg.decontam.benchmarks else "<p>No benchmarks configured (decontam.benchmarks is empty).</p>"
    )  # fmt: skip
    vers = "".join(f"<tr><td>{k}</td><td>{html.escape(v)}</td></tr>" for k, v in _versions().items())
    body = (
        f"<h2>Funnel</h2>{funnel}<p>{'<br>'.join(notes)}</p><h2>Distributions</h2>{hist_html}"
        f"<h2>Samples</h2>{grid_html}<h2>Decontamination</h2>{hits_html}"
        f"<h2>Config</h2><pre>{html.escape(yaml.safe_dump(to_dict(cfg), sort_keys=False))}</pre>"
        f"<h2>Versions</h2><table>{vers}</table>"
    )
    page = out_dir / "report.html"
    page.write_text(_page(f"Curation report: {cfg.name}", body), encoding="utf-8")
    return page
