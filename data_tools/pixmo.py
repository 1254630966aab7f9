"""PixMo layouts (allenai/pixmo-*) read into our sample schema; the input kind ``pixmo``.

``{kind: pixmo, layout: points, path: allenai/pixmo-points (or a local copy), downloads: DIR}``.
Every layout comes in through :func:`mmsmall.data.hfdata.load_hf` (hub id, hub-layout folder,
``save_to_disk`` folder). Images come from an ``image`` column when the rows have one (pixmo-docs,
or a copy with images attached), else from the row's ``image_url`` fetched beforehand by the
download stage into ``downloads`` (``mmsmall download ROWS --out DIR --url-field image_url
--sha256-field image_sha256``); a URL that failed there keeps its fetch reason (``fetch_http_404``,
``fetch_sha256_mismatch``, ...), one never tried is ``not_downloaded``. docs/PIXMO.md lists the columns.

Layouts and the samples they become:

- ``points``: rows ``(image_url, image_sha256, points [{x, y}] in pixels, count, label,
  collection_method)``, one per label; grouped by image into one ``pointing`` sample per image
  with one ``Point to {label}.`` turn per label (no points: ``There are none.``);
- ``count``: the same columns, one label per image: a ``counting`` sample ``How many {label} are
  there?`` -> the count, with the points kept;
- ``cap``: ``(image_url, caption, transcripts)``: a ``caption`` sample; transcripts go to meta;
- ``ama``: ``(image_url, image_sha256, question, answer)``: a ``vqa`` sample;
- ``docs``: ``(image, image_id, questions {question: [...], answer: [...]})``: one ``doc_qa``
  sample per image with every question as a turn (config ``charts`` / ``tables`` / ``diagrams`` /
  ``other``);
- ``clocks``: ``(example_id, watch_time, time_format, hour_visible, minute_visible, ...)`` plus an
  image (the repository ships none; render them or give ``image``/``image_url``): a ``clock``
  sample ``What time is shown?`` -> ``watch_time``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmsmall.config import ConfigError

PIXMO_LAYOUTS = ("points", "count", "cap", "ama", "docs", "clocks")
GROUPED = ("points",)  # layouts with several rows per image


def _check(inp) -> None:
    if inp.layout not in PIXMO_LAYOUTS:
        raise ConfigError(f"input kind 'pixmo': layout {inp.layout!r}; valid: {', '.join(PIXMO_LAYOUTS)}")


def pixmo_units(inp, ds, unit_size: int) -> list[dict]:
    """Units of row-index groups: one group per image for grouped layouts, else one per row."""
    _check(inp)
    if inp.layout in GROUPED:
        groups: dict[str, list[int]] = {}
        for i, url in enumerate(ds["image_url"]):
            groups.setdefault(str(url), []).append(i)
        order = list(groups.values())
    else:
        order = [[i] for i in range(len(ds))]
    return [{"groups": order[a : a + unit_size], "offset": a} for a in range(0, len(order), unit_size)]


class Downloads:
    """``image_url`` -> image bytes (or a failure reason) from a download stage's output folder."""

    def __init__(self, folder: str | None):
        from .download import read_log

        self.folder = Path(folder) if folder else None
        self.log = read_log(self.folder / "fetch_log.jsonl", self.folder) if self.folder else {}

    def get(self, url: str) -> tuple[bytes | None, str, str | None]:
        f = self.log.get(url)
        if f is None:
            return None, url, "not_downloaded"
        if f.reason != "ok":
            return None, url, f.reason
        return (self.folder / f.file).read_bytes(), url, None


def _image(row: dict, downloads: Downloads) -> tuple[bytes | None, str, str | None]:
    cell = row.get("image")
    if isinstance(cell, dict) and cell.get("bytes"):
        return bytes(cell["bytes"]), str(cell.get("path") or "<bytes>"), None
    url = row.get("image_url")
    if isinstance(url, str) and url:
        return downloads.get(url)
    return None, "<none>", "missing_image"


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    msgs = []
    for q, a in pairs:
        msgs += [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
    return msgs


def _sample(rows: list[dict], inp) -> dict[str, Any]:
    """Task, messages, points and meta of one image's rows (see the module docstring)."""
    first, layout = rows[0], inp.layout
    if layout in ("points", "count"):
        pts = [{"label": r.get("label") or "", "raw": list(r.get("points") or []), "width": None,
                "height": None} for r in rows]  # fmt: skip
        meta = {"coords": "pixels", "collection_method": first.get("collection_method")}
        if layout == "points":
            return {"task": "pointing", "messages": [], "points": pts, "meta": meta}
        msgs = _turns([(f"How many {first.get('label')} are there?", first.get("count"))])
        return {"task": "counting", "messages": msgs, "points": pts, "meta": meta}
    if layout == "cap":
        from .records import CAPTION_PROMPT

        msgs = _turns([(CAPTION_PROMPT, first.get("caption") or "")])
        return {
            "task": "caption",
            "messages": msgs,
            "meta": {"transcripts": list(first.get("transcripts") or [])},
        }
    if layout == "ama":
        return {"task": "vqa", "messages": _turns([(first.get("question"), first.get("answer"))]), "meta": {}}
    if layout == "docs":
        qs = first.get("questions") or {}
        return {"task": "doc_qa", "messages": _turns(list(zip(qs.get("question", []), qs.get("answer", [])))),
                "meta": {"image_id": first.get("image_id")}}  # fmt: skip
    time = first.get("watch_time")
    return {"task": "clock", "messages": _turns([("What time is shown?", time)]),
            "meta": {"time_format": first.get("time_format"), "watchface_id": first.get("watchface_id")}}  # fmt: skip


def pixmo_records(unit: dict, inp, ds, record) -> Iterator[dict]:
    """The records of one pixmo unit; ``record(id, source, **fields)`` builds each."""
    source = inp.name or f"pixmo-{inp.layout}"
    downloads = Downloads(inp.downloads)
    for n, group in enumerate(unit["groups"]):
        rows = [ds[i] for i in group]
        first = rows[0]
        rid = str(first.get("example_id") or first.get("image_id") or first.get("image_sha256") or
                  f"{source}_{unit['offset'] + n}")  # fmt: skip
        data, ref, err = _image(first, downloads)
        s = _sample(rows, inp)
        task = inp.task or s["task"]
        if not s["messages"] and s.get("points") is None:
            err = err or "bad_annotation"
        yield record(rid, source, task=task, image_bytes=data, image_ref=ref, messages=s["messages"],
                     points=s.get("points"), meta=s["meta"], error=err)  # fmt: skip
