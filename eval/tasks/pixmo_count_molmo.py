"""PixMo-Count validation / test as Molmo scores them: human-verified counts (2 to 10), no points.

Data: ``allenai/pixmo-count`` splits ``validation`` and ``test`` (card ``dataset_info``:
``image_url``, ``image_sha256``, ``count``, ``points``, ``label``; 540 rows each). The rows hold
image URLs: attach the downloaded images first (``python -m eval.attach_images ROWS --split
validation ...``, see ``eval/attach_images.py``) and give that copy. Molmo evaluates these splits
as ``pixmo_count_counting`` (allenai/molmo ``launch_scripts/eval_downstream.py``): ``PixMoCount``
with ``counting=True`` (style ``point_count``), the question the first ``point_count`` prompt
(``olmo/data/data_formatter.py``: "How many {label} are there?", label lower-cased), scored by
``PointCountEval`` (``correct``, ``close``, ``valid``; :func:`eval.metrics.molmo_count_scores`).
``pixmo_count`` (eval/tasks/pixmo_count.py) is lmms-eval's test-split copy with its own scoring.
"""

from __future__ import annotations

from ..metrics import molmo_count_scores
from .base import EvalDataError, Record, Task, register
from .common import clean
from .loaders import image_fields, iter_rows
from .pixmo_points_eval import ATTACH

PROMPT = "How many {label} are there?"


def _loader(split: str, task: str):
    def load(path: str, limit: int | None = None) -> list[Record]:
        records = []
        for row, source, index in iter_rows(path, ["count", "label"], split=split, limit=limit,
                                            optional=("image", "image_url")):  # fmt: skip
            rid = f"{index:06d}"
            if row.get("image") is None:
                raise EvalDataError(f"{source} ({split}) " + ATTACH.format(task=task))
            try:
                count = int(row["count"])
            except (TypeError, ValueError):
                raise EvalDataError(
                    f"sample {rid!r} in {source}: count {row['count']!r} is not a number"
                ) from None
            records.append(
                Record(id=rid, question=PROMPT.format(label=str(row["label"]).lower()), answers=[str(count)],
                       meta={"count": count, "image_url": row.get("image_url")}, source=source,
                       **image_fields(row["image"], source, rid))
            )  # fmt: skip
        return records

    return load


def prompt(record: Record, molmo: bool) -> str:
    return record.question


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    return molmo_count_scores(clean(raw, molmo), int(record.meta["count"]))


for _split, _name in (("validation", "pixmo_count_val"), ("test", "pixmo_count_test")):
    register(
        Task(
            name=_name,
            load=_loader(_split, _name),
            prompt=prompt,
            score=score,
            primary="correct",
            max_new_tokens=192,  # Molmo's answer points first, then says the total
            default_data=None,
            split=_split,
            molmo_style="counting",
            description=f"PixMo-Count {_split} (human-verified counts, Molmo's PointCountEval); images attached first",
        )
    )
