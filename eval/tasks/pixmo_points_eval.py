"""PixMo-Points-Eval: Molmo's pointing eval (precision / recall / F1 of points in object masks).

Data: ``allenai/pixmo-points-eval`` (card ``dataset_info``: ``image_url``, ``image_sha256``,
``label``, ``points`` a list of ``{x, y}``, ``masks`` a sequence of H x W bool masks, one per
object; split ``test``, 436 rows). The rows hold image URLs: attach the downloaded images first
(``python -m eval.attach_images``, see ``eval/attach_images.py``) and give that copy:
``--data pixmo_points_eval=OUT``. As in Molmo's ``PixMoPointsEval.get`` (allenai/molmo
``olmo/data/pixmo_datasets.py``) the points are percent of the image (``point_scale=100``); the
question is the first of Molmo's ``pointing`` prompts (``olmo/data/data_formatter.py``,
``GENERAL_PROMPTS_V1``) with the label lower-cased, and scoring is ``PointingEval``
(``olmo/eval/evaluators.py``; :func:`eval.metrics.molmo_pointing_scores`). Answers are read in
Molmo2's ``coords`` text or Molmo's tags (``mmsmall.processing.points``); a whole answer in either
is a valid pointing answer.
"""

from __future__ import annotations

import re

import numpy as np

from mmsmall.processing.points import read_point_text

from ..metrics import molmo_pointing_scores
from .base import EvalDataError, Record, Task, register
from .common import clean
from .loaders import image_fields, iter_rows
from .pointing import read_counts

PROMPT = "Point to {label}\nPlease say 'This isn't in the image.' if it is not in the image."
ATTACH = (
    "holds image URLs, not images: attach the downloaded images first "
    "(python -m eval.attach_images ROWS --downloads DIR --out OUT) and give --data {task}=OUT"
)

_N = r"\s*\d+(?:\.\d+)?"
# A whole answer in one pointing form (Molmo's is_valid_format, plus Molmo2's coords tag).
_VALID = re.compile(
    r"(?:\(\s*-?\d+(?:\.\d+)?\s*,\s*-?\d+(?:\.\d+)?\s*\)\n?)+"
    rf'|<point\s+x="{_N}"\s+y="{_N}"\s+alt="[\s\S]*?">[\s\S]*?</point>'
    rf'|<points\s+(?:x\d+="{_N}"\s+y\d+="{_N}"\s+)+alt="[\s\S]*?">[\s\S]*?</points>'
    r'|<point\s+p=\s*\d{3}\s*,\s*\d{3}\s+alt="[\s\S]*?">[\s\S]*?</point>'
    r'|<points\s+(?:\d+=\s*\d{3}\s*,\s*\d{3}\s+)+alt="[\s\S]*?">[\s\S]*?</points>'
    r'|<points(?:\s+alt="[^"]*")?\s+coords="[0-9\t:;, .]+">[\s\S]*?</points>'
)


def valid_point_answer(text: str) -> bool:
    """Whether the whole (stripped) answer is one pointing answer."""
    return _VALID.fullmatch(text.strip()) is not None


def _masks(cell, rid: str, source: str) -> np.ndarray:
    try:
        masks = np.asarray(cell if cell is not None else [], dtype=bool)
    except (TypeError, ValueError) as e:
        raise EvalDataError(f"sample {rid!r} in {source}: masks are not H x W bool arrays ({e})") from None
    if masks.size == 0:
        return np.zeros((0, 1, 1), dtype=bool)
    if masks.ndim != 3:
        raise EvalDataError(
            f"sample {rid!r} in {source}: masks have shape {masks.shape}, want (objects, H, W)"
        )
    return masks


def load(path: str, limit: int | None = None) -> list[Record]:
    records = []
    rows = iter_rows(
        path, ["label", "points", "masks"], split="test", limit=limit, optional=("image", "image_url")
    )
    for row, source, index in rows:
        rid = f"{index:06d}"
        if row.get("image") is None:
            raise EvalDataError(f"{source} " + ATTACH.format(task="pixmo_points_eval"))
        pts = [[float(p["x"]), float(p["y"])] for p in row["points"] or []]
        masks = _masks(row["masks"], rid, source)
        meta = {"points_pct": pts, "masks": np.packbits(masks, axis=-1), "mask_shape": list(masks.shape),
                "label": str(row["label"]), "image_url": row.get("image_url")}  # fmt: skip
        records.append(
            Record(id=rid, question=PROMPT.format(label=str(row["label"]).lower()), answers=[f"{len(pts)} point(s)"],
                   meta=meta, source=source, **image_fields(row["image"], source, rid))
        )  # fmt: skip
    return records


def prompt(record: Record, molmo: bool) -> str:
    return record.question


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    """Molmo's PointingEval on one answer; needs ``meta["size"] = [W, H]`` (set by the runner)."""
    if "size" not in record.meta:
        raise EvalDataError(f"sample {record.id!r}: pixmo_points_eval needs the image size in meta['size']")
    w, h = record.meta["size"]
    n, mh, mw = record.meta["mask_shape"]
    masks = np.unpackbits(record.meta["masks"], axis=-1, count=mw).astype(bool).reshape(n, mh, mw)
    if n and (mh, mw) != (h, w):
        raise EvalDataError(
            f"sample {record.id!r} in {record.source}: masks are {mw} x {mh} but the image is {w} x {h}; "
            "the attached image is not the one the masks were drawn on"
        )
    text = clean(raw, molmo)
    read = read_point_text(text, [(w, h)])
    gold = np.asarray(record.meta["points_pct"], dtype=np.float64).reshape(-1, 2) * np.array(
        [w / 100, h / 100]
    )
    return {**molmo_pointing_scores(read.points, gold, masks, valid_point_answer(text)), **read_counts(read)}


DESCRIPTION = "PixMo-Points-Eval (Molmo's pointing eval: points in masks, F1); images attached first"
TASK = register(Task(name="pixmo_points_eval", load=load, prompt=prompt, score=score, primary="f1",
                     max_new_tokens=192, split="test", molmo_style="pointing", description=DESCRIPTION))  # fmt: skip
