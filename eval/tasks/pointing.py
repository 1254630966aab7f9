"""Pointing: precision / recall / F1 of predicted points against gold masks or points.

Data (parquet, one row per question): ``image`` (HF image struct), ``question`` (e.g. "Point to
the mugs."), and ``masks`` (a list of HF image structs, one binary mask per gold object, white =
inside; PixMo-Points style) and/or ``points`` (a list of ``[x, y]`` normalized to [0, 1]). With
masks a prediction matches an object when it lies inside its mask; with points only, when it is
within ``DIST_THRESHOLD`` x the image diagonal. Matching is one-to-one (Hungarian). A question
whose gold list is empty is right only when the model points at nothing (``There are none.``).
Answers are read in Molmo2's ``coords`` text first and Molmo's tags as the fallback
(``mmsmall.processing.points``); coordinates off the image and malformed ``coords`` triplets are
not points: they are dropped before matching and counted per question as ``points_outside``.
``read_molmo2`` / ``read_molmo`` give the share of answers read in each format.
"""

from __future__ import annotations

import io

import numpy as np

from mmsmall.processing.points import PointsRead, read_point_text

from ..metrics import pointing_scores_distance, pointing_scores_images, pointing_scores_masks
from .base import EvalDataError, Record, Task, register
from .common import clean
from .loaders import image_fields, iter_rows

DIST_THRESHOLD = 0.05  # fraction of the image diagonal


def _mask_array(cell, rid: str, source: str) -> np.ndarray:
    from PIL import Image

    fields = image_fields(cell, source, rid)
    try:
        im = (
            Image.open(io.BytesIO(fields["image_bytes"]))
            if "image_bytes" in fields
            else Image.open(fields["image_path"])
        )
        return np.asarray(im.convert("L")) > 127  # (H, W)
    except Exception as e:
        raise EvalDataError(
            f"sample {rid!r} in {source}: a mask cannot be decoded ({type(e).__name__}: {e})"
        ) from None


def load(path: str, limit: int | None = None) -> list[Record]:
    records = []
    rows = iter_rows(path, ["question", "image"], split="test", limit=limit, optional=("masks", "points"))
    for row, source, index in rows:
        rid = f"{index:06d}"
        masks, points = row.get("masks"), row.get("points")
        if masks is None and points is None:
            raise EvalDataError(f"sample {rid!r} in {source}: needs a 'masks' or a 'points' column")
        meta: dict = {}
        if masks is not None:
            meta["mask_cells"] = list(masks)
            gold = f"{len(masks)} object mask(s)"
        else:
            meta["points"] = [{"label": "", "xy": [list(map(float, p)) for p in points]}]
            gold = f"{len(points)} point(s)"
        records.append(
            Record(id=rid, question=str(row["question"]), answers=[gold], meta=meta, source=source,
                   **image_fields(row["image"], source, rid))
        )  # fmt: skip
    return records


def prompt(record: Record, molmo: bool) -> str:
    return record.question


def _image_gold(gold: dict, size, record: Record) -> tuple[np.ndarray | None, np.ndarray | None, tuple]:
    """One image's gold: ``(masks (G, H, W) or None, points (G, 2) pixels or None, (W, H))``."""
    if "mask_cells" in gold:
        cells = gold["mask_cells"]
        masks = np.stack([_mask_array(c, record.id, record.source) for c in cells]) if cells else None
        if masks is not None:
            return masks, None, (masks.shape[2], masks.shape[1])
        if size is None:
            size = (1, 1)
        return np.zeros((0, int(size[1]), int(size[0])), dtype=bool), None, tuple(size)
    if size is None:
        raise EvalDataError(f"sample {record.id!r}: pointing needs the image size in meta['size']")
    w, h = size
    xy = np.asarray([p for group in gold.get("points", []) for p in group["xy"]], dtype=np.float64)
    return None, xy.reshape(-1, 2) * np.array([w, h], dtype=np.float64), (w, h)


def score_points(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    """Score pointing text in Molmo2's or Molmo's format; gold points need ``meta["size"] = [W, H]``
    (set by the runner). A record of several images gives ``meta["images"]`` (one gold dict per
    image, each like a one-image meta) and ``meta["sizes"]``: each image's points are scored against
    that image's gold only (``pointing_scores_images``)."""
    text = clean(raw, molmo)
    golds = record.meta.get("images") or [record.meta]
    sizes = record.meta.get("sizes") or [record.meta.get("size")]
    if len(sizes) != len(golds):
        raise EvalDataError(f"sample {record.id!r}: {len(golds)} images' gold but {len(sizes)} image sizes")
    images = [_image_gold(g, s, record) for g, s in zip(golds, sizes)]
    read = read_point_text(text, [(w, h) for _, _, (w, h) in images])
    counts = []
    for (masks, gold, (w, h)), found in zip(images, read.per_image):
        pred = np.asarray(found, dtype=np.float64).reshape(-1, 2)  # (P, 2) pixels on this image
        if masks is not None:
            s = pointing_scores_masks(pred, masks)
            n_gold = len(masks)
        else:
            s = pointing_scores_distance(pred, gold, DIST_THRESHOLD * float(np.hypot(w, h)))
            n_gold = len(gold)
        counts.append((int(s["n_match"]), len(pred), n_gold))
    out = pointing_scores_images(counts)
    out.pop("n_match", None)
    return {**out, **read_counts(read)}


def read_counts(read: PointsRead) -> dict[str, float]:
    """What reading the answer found besides its points: ``points_outside`` (coordinates that are
    not points, not scored) and which pointing text it was in (their means: the share of answers
    in each)."""
    return {
        "points_outside": float(read.dropped),
        "read_molmo2": float(read.format == "molmo2"),
        "read_molmo": float(read.format == "molmo"),
    }


TASK = register(
    Task(
        name="pointing",
        load=load,
        prompt=prompt,
        score=score_points,
        primary="f1",
        max_new_tokens=192,
        default_data=None,
        split="test",
        molmo_style="pointing",
        description="Pointing, precision/recall/F1 (points in masks, Hungarian matching)",
    )
)
