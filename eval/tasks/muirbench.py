"""MuirBench (multi-image multiple choice): accuracy as lmms-eval 0.7.3's ``muirbench`` scores it.

Data: the hub layout of ``MUIRBENCH/MUIRBENCH`` (split ``test``), as lmms-eval's
``tasks/muirbench/utils.py`` reads it: ``idx``, ``task``, ``question``, ``options`` (a list),
``answer`` (the letter), ``image_list`` (the images, in order), ``image_relation``,
``image_type``. The prompt is the question, one ``A. option`` line per option and lmms-eval's post
prompt. Scoring: the response's leading ``X.`` letter if it has one (lmms-eval's
``MultiChoiceRegexFilter``), else the whole response, compared lower-cased and stripped with the
gold letter: unlike AI2D, punctuation is not ignored (``B!`` is wrong, ``b`` is right).
"""

from __future__ import annotations

from ..answers import after_answer, strip_reasoning
from ..metrics import option_letter
from .base import EvalDataError, Record, Task, register
from .loaders import iter_rows

SUFFIX = "\nAnswer with the option's letter from the given choices directly."
COLUMNS = ["idx", "task", "question", "options", "answer", "image_list"]


def load(path: str, limit: int | None = None) -> list[Record]:
    records = []
    optional = ("image_relation", "image_type")
    for row, source, _ in iter_rows(path, COLUMNS, split="test", limit=limit, optional=optional):
        rid = str(row["idx"])
        images = list(row["image_list"] or [])
        if not images:
            raise EvalDataError(f"sample {rid!r} in {source}: empty image_list")
        options = [str(o) for o in row["options"] or []]
        if not options:
            raise EvalDataError(f"sample {rid!r} in {source}: no options")
        meta = {"options": options, "task": row["task"]}
        meta.update({k: row.get(k) for k in optional})
        records.append(
            Record(
                id=rid,
                question=str(row["question"]),
                answers=[str(row["answer"])],
                images=images,
                meta=meta,
                source=source,
            )  # fmt: skip
        )
    return records


def prompt(record: Record, molmo: bool) -> str:
    options = record.meta["options"]
    lines = "\n".join(f"{chr(ord('A') + i)}. {text}" for i, text in enumerate(options))
    return f"{record.question}\n{lines}" + ("" if molmo else SUFFIX)


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    """The letter filter sees the raw text, then reasoning tags are stripped (lmms-eval's order)."""
    pred = option_letter(after_answer(strip_reasoning(raw))) if molmo else strip_reasoning(option_letter(raw))
    return {"accuracy": float(pred.lower().strip() == record.answers[0].lower().strip())}


TASK = register(
    Task(
        name="muirbench",
        load=load,
        prompt=prompt,
        score=score,
        primary="accuracy",
        max_new_tokens=16,
        default_data="MUIRBENCH/MUIRBENCH",
        split="test",
        molmo_style="vqa",
        description="MuirBench (2-9 images per question), option-letter accuracy",
    )
)
