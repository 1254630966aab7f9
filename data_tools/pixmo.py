"""PixMo layouts (allenai/pixmo-*) read into our sample schema; the input kind ``pixmo``.

``{kind: pixmo, layout: points, path: allenai/pixmo-points (or a local copy), downloads: DIR}``.
Every layout comes in through :func:`mmsmall.data.hfdata.load_hf` (hub id, hub-layout folder,
``save_to_disk`` folder). Images come from an ``image`` column when the rows have one (pixmo-docs,
or a copy with images attached), else from the row's ``image_url`` fetched beforehand by the
download stage into ``downloads`` (``mmsmall download ROWS --out DIR --url-field image_url
--sha256-field image_sha256 --output files``); a URL that failed there keeps its fetch reason (``fetch_http_404``,
``fetch_sha256_mismatch``, ...), one never tried is ``not_downloaded``. docs/PIXMO.md lists the columns.

Layouts and the samples they become:

- ``points``: rows ``(image_url, image_sha256, points, count, label, collection_method)``, one per
  label, ``points`` a list of ``{x, y}`` in **percent** of the image (0-100: Molmo's loader gives
  them ``point_scale=100``, though the card's prose says pixels); grouped by image into one
  ``pointing`` sample per image with one ``Point to {label}.`` turn per label (no points: ``There
  are none.``). ``hold_out: allenai/pixmo-points-eval`` drops the images of that eval set, as
  Molmo's download does (reason ``decontam_eval_url``);
- ``count``: ``(image_url, image_sha256, count, points, label)``, one label per image, ``points``
  a ``sequence`` of ``{x, y}`` (``datasets`` yields ``{"x": [...], "y": [...]}``) in **pixels**,
  read for split ``train`` only (validation and test are human-verified counts): a ``counting``
  sample ``How many {label} are there?`` -> the count, with the train points kept;
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

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmsmall.config import ConfigError

PIXMO_LAYOUTS = ("points", "count", "cap", "ama", "docs", "clocks")
GROUPED = ("points",)  # layouts with several rows per image
# Coordinate space of each layout's points, as Molmo's loader (olmo/data/pixmo_datasets.py) reads
# them: PixMoPoints passes point_scale=100 (percent); PixMoCount passes none (pixels).
COORDS = {"points": "percent", "count": "pixels"}
POINTS_SPLITS = {"count": ("train",)}  # PixMoCount.get reads points only for split train


def _check(inp) -> None:
    if inp.layout not in PIXMO_LAYOUTS:
        raise ConfigError(f"input kind 'pixmo': layout {inp.layout!r}; valid: {', '.join(PIXMO_LAYOUTS)}")


def _held_out_urls(inp) -> set[str]:
    """The ``image_url`` values of the eval set named by ``hold_out`` (its ``test`` split)."""
    from mmsmall.data.hfdata import HFDataError, load_hf

    try:
        ev = load_hf(inp.hold_out, split="test")
    except HFDataError as e:
        raise ConfigError(f"input kind 'pixmo': hold_out: {e}") from None
    if "image_url" not in ev.column_names:
        raise ConfigError(
            f"input kind 'pixmo': hold_out {inp.hold_out}: no image_url column ({ev.column_names})"
        )
    return {str(u) for u in ev["image_url"]}


def pixmo_units(inp, ds, unit_size: int) -> list[dict]:
    """Units of row-index groups: one group per image for grouped layouts, else one per row;
    ``held_out`` lists the unit's groups whose image is in the ``hold_out`` eval set."""
    _check(inp)
    urls = [str(u) for u in ds["image_url"]] if "image_url" in ds.column_names else None
    if urls is None and (inp.hold_out or inp.layout in GROUPED):
        raise ConfigError(
            f"input kind 'pixmo', layout {inp.layout!r}: {inp.path} has no image_url column "
            f"(columns: {ds.column_names}); grouping by image and hold_out need it"
        )
    if inp.layout in GROUPED:
        groups: dict[str, list[int]] = {}
        for i, url in enumerate(urls):
            groups.setdefault(url, []).append(i)
        order = list(groups.values())
    else:
        order = [[i] for i in range(len(ds))]
    held = _held_out_urls(inp) if inp.hold_out else set()
    units = []
    for a in range(0, len(order), unit_size):
        part = order[a : a + unit_size]
        out = [n for n, g in enumerate(part) if held and urls[g[0]] in held]
        units.append({"groups": part, "offset": a, "held_out": out})
    return units


@functools.lru_cache(maxsize=4)
def _read_downloads(folder: str, stamp: tuple[int, int]) -> dict:
    """The fetch log of ``folder``, read once per process while the log is unchanged (``stamp``)."""
    from .fetch import read_log

    return read_log(Path(folder) / "fetch_log.jsonl", Path(folder))


class Downloads:
    """``image_url`` -> image bytes (or a failure reason) from a download stage's output folder."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        log = self.folder / "fetch_log.jsonl" if self.folder else None
        if log is not None and log.exists():
            st = log.stat()
            self.log = _read_downloads(str(self.folder), (st.st_mtime_ns, st.st_size))
        else:
            self.log = {}

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


def _xy(cell) -> list:
    """Points of a cell as ``[[x, y], ...]``: the card's ``list:`` of ``{x, y}`` arrives as a list of
    dicts (pixmo-points), its ``sequence:`` of ``{x, y}`` as ``{"x": [...], "y": [...]}`` (pixmo-count).
    Anything else is passed on for the points check to reject as ``point_malformed``."""
    if isinstance(cell, dict) and set(cell) == {"x", "y"} and isinstance(cell["x"], list):
        if not isinstance(cell["y"], list) or len(cell["x"]) != len(cell["y"]):
            return [cell]  # unequal x and y lists: malformed
        return [[x, y] for x, y in zip(cell["x"], cell["y"])]
    return list(cell) if isinstance(cell, list) else cell


def _sample(rows: list[dict], inp) -> dict[str, Any]:
    """Task, messages, points and meta of one image's rows (see the module docstring)."""
    first, layout = rows[0], inp.layout
    if layout in ("points", "count"):
        meta = {"coords": COORDS[layout], "collection_method": first.get("collection_method")}
        pts = [{"label": r.get("label") or "", "raw": _xy(r.get("points") or []), "width": None,
                "height": None} for r in rows]  # fmt: skip
        if layout == "points":
            return {"task": "pointing", "messages": [], "points": pts, "meta": meta}
        if inp.split not in POINTS_SPLITS[layout]:
            pts, meta = None, {}
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
    held = set(unit.get("held_out", ()))
    for n, group in enumerate(unit["groups"]):
        rows = [ds[i] for i in group]
        first = rows[0]
        rid = str(first.get("example_id") or first.get("image_id") or first.get("image_sha256") or
                  f"{source}_{unit['offset'] + n}")  # fmt: skip
        if n in held:
            data, ref, err = None, str(first.get("image_url")), "decontam_eval_url"
        else:
            data, ref, err = _image(first, downloads)
        s = _sample(rows, inp)
        task = inp.task or s["task"]
        if not s["messages"] and s.get("points") is None:
            err = err or "bad_annotation"
        yield record(rid, source, task=task, image_bytes=data, image_ref=ref, messages=s["messages"],
                     points=s.get("points"), meta=s["meta"], error=err)  # fmt: skip
