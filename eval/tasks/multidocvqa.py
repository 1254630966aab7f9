"""MP-DocVQA validation (multi-page documents): ANLS and accuracy as MP-DocVQA's evaluator scores.

Data: the lmms-eval parquet layout (``lmms-lab-encoder/MP-DocVQA``, split ``val``), as lmms-eval
0.7.3's ``tasks/multidocvqa/utils.py`` reads it: ``questionId``, ``question``, ``answers`` (a
Python-literal list held as a string, read with ``ast.literal_eval``) and up to 20 page images
``image_1`` .. ``image_20`` (``None`` past the document's last page). Every page is asked about
together, in order. The prompt adds lmms-eval's post prompt; scoring is :func:`eval.metrics.mp_anls`
and :func:`eval.metrics.mp_accuracy`.
"""

from __future__ import annotations

import ast

from ..metrics import mp_accuracy, mp_anls
from .base import EvalDataError, Record, Task, register
from .common import SHORT_ANSWER, clean
from .loaders import answers_list, iter_rows

PAGES = [f"image_{i}" for i in range(1, 21)]


def _answers(value, rid: str, source: str) -> list[str]:
    if isinstance(value, str):  # the lmms-lab copy holds the list as its repr
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise EvalDataError(
                f"sample {rid!r} in {source}: answers {value!r:.80} is not a Python list literal"
            ) from None
    return answers_list(value, rid, source)


def load(path: str, limit: int | None = None) -> list[Record]:
    records = []
    columns = ["questionId", "question", "answers"]
    for row, source, _ in iter_rows(path, columns, split="val", limit=limit, optional=tuple(PAGES)):
        rid = str(row["questionId"])
        pages = [row[c] for c in PAGES if row.get(c) is not None]
        if not pages:
            raise EvalDataError(f"sample {rid!r} in {source}: no page images (image_1 .. image_20 all empty)")
        records.append(
            Record(
                id=rid,
                question=str(row["question"]),
                answers=_answers(row["answers"], rid, source),
                images=pages,
                source=source,
            )
        )
    return records


def prompt(record: Record, molmo: bool) -> str:
    return record.question if molmo else f"{record.question}{SHORT_ANSWER}"


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    pred = clean(raw, molmo)  # reasoning removed and stripped (+ Molmo's Answer: rule)
    return {"anls": mp_anls(pred, record.answers), "accuracy": mp_accuracy(pred, record.answers)}


TASK = register(
    Task(
        name="multidocvqa",
        load=load,
        prompt=prompt,
        score=score,
        primary="anls",
        max_new_tokens=32,
        default_data="lmms-lab-encoder/MP-DocVQA",
        split="val",
        molmo_style="doc_qa",
        description="MP-DocVQA validation (up to 20 pages per question), ANLS",
    )
)
