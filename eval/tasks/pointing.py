"""Pointing: precision / recall / F1 of predicted points against gold masks or points.

Data (parquet, one row per question): ``image`` (HF image struct), ``question`` (e.g. "Point to
the mugs."), and ``masks`` (a list of HF image structs, one binary mask per gold object, white =
inside; PixMo-Points style) and/or ``points`` (a list of ``[x, y]`` normalized to [0, 1]). With
masks a prediction matches an object when it lies inside its mask; with points only, when it is
within ``DIST_THRESHOLD`` x the image diagonal. Matching is one-to-one (Hungarian). A question
whose gold list is empty is right only when the model points at nothing (``There are none.``).
Coordinates outside 0-100 (or non-finite) are not points: they are dropped before matching and
counted per question as ``points_outside``.
"""

from __future__ import annotations

import io

import numpy as np

from mmsmall.processing.points import read_points

from ..metrics import pointing_scores_distance, pointing_scores_masks
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


def score_points(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    """Score pointing text; needs ``meta["size"] = [W, H]`` (set by the runner) for gold points."""
    text = clean(raw, molmo)
    if "mask_cells" in record.meta:
        masks = np.stack([_mask_array(c, record.id, record.source) for c in record.meta["mask_cells"]]) if record.meta[
            "mask_cells"] else np.zeros((0, 1, 1), dtype=bool)  # fmt: skip
        h, w = masks.shape[1:] if len(masks) else record.meta.get("size", (1, 1))[::-1]
        pred, outside = read_points(text, w, h)
        out = pointing_scores_masks(np.asarray(pred, dtype=np.float64).reshape(-1, 2), masks)
    else:
        if "size" not in record.meta:
            raise EvalDataError(f"sample {record.id!r}: pointing needs the image size in meta['size']")
        w, h = record.meta["size"]
        gold = np.asarray(
            [xy for group in record.meta.get("points", []) for xy in group["xy"]], dtype=np.float64
        )
        gold = gold.reshape(-1, 2) * np.array([w, h], dtype=np.float64)  # (G, 2) pixels
        pred, outside = read_points(text, w, h)
        pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)  # (P, 2) on the image
        out = pointing_scores_distance(pred, gold, DIST_THRESHOLD * float(np.hypot(w, h)))
    out.pop("n_match", None)
    out["points_outside"] = float(outside)  # coordinates off the image (not 0-100), not counted as points
    return out


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
